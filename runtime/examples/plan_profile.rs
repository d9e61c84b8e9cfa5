//! Where one denoising step's time goes inside tract: prepares an exported ONNX file's plan for a
//! fixed batch as the sampler does (batch fixed, then optimized), runs it on one thread, and
//! prints the time per operator kind and the slowest nodes with their output shapes. The whole
//! step is timed first without the per-node timers, so the two totals show their overhead.
//! BENCHMARKS.md ("Speed: where tract's step goes") uses it for issue 4.
//!
//!   cargo run --release -p chardiff-runtime --example plan_profile -- MODEL [BATCH] [ITERATIONS] [NODES]
//!
//! The allocator is the system's: with glibc, set `MALLOC_MMAP_THRESHOLD_` and
//! `MALLOC_TRIM_THRESHOLD_` high to see the step without the page faults of memory returned to
//! the OS between operators.

use std::collections::HashMap;
use std::time::Instant;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{bail, TractErrorContext};
use tract_onnx::tract_core::plan::{eval, SimplePlan, SimpleState};

fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        bail!("usage: plan_profile MODEL [BATCH] [ITERATIONS] [NODES]");
    };
    let number = |i: usize, default: usize| -> TractResult<usize> {
        args.get(i).map_or(Ok(default), |s| Ok(s.parse()?))
    };
    let (batch, iterations, shown) = (number(1, 8)?, number(2, 50)?, number(3, 20)?);

    let model = tract_onnx::onnx().model_for_path(path)?.into_typed()?;
    let symbol =
        model.symbols.get(chardiff_runtime::tract::BATCH_SYMBOL).context("no batch axis")?;
    let model = model.set_symbols(&HashMap::from([(symbol, (batch as i64).to_dim())]))?;
    let model = model.into_optimized()?;
    // Any values in [-0.5, 0.5) serve: the step's work does not depend on them.
    let inputs: TVec<TValue> = model
        .input_outlets()?
        .iter()
        .map(|&outlet| {
            let shape =
                model.outlet_fact(outlet)?.shape.as_concrete().context("symbolic")?.to_vec();
            let data =
                (0..shape.iter().product()).map(|i: usize| (i * 7919 % 1000) as f32 / 1e3 - 0.5);
            Ok(tract_ndarray::ArrayD::from_shape_vec(shape, data.collect())?.into_tvalue())
        })
        .collect::<TractResult<_>>()?;

    let plan = SimplePlan::new(model)?;
    let mut state = SimpleState::new(&plan)?;
    for _ in 0..5 {
        state.run(inputs.clone())?;
    }
    let start = Instant::now();
    for _ in 0..iterations {
        state.run(inputs.clone())?;
    }
    let step_ms = start.elapsed().as_secs_f64() * 1e3 / iterations as f64;

    let mut node_ms: HashMap<usize, f64> = HashMap::new();
    for _ in 0..iterations {
        state.run_plan_with_eval(inputs.clone(), |ctx, op_state, node, input| {
            let start = Instant::now();
            let outputs = eval(ctx, op_state, node, input);
            *node_ms.entry(node.id).or_default() +=
                start.elapsed().as_secs_f64() * 1e3 / iterations as f64;
            outputs
        })?;
    }

    let model = plan.model();
    let total: f64 = node_ms.values().sum();
    println!(
        "{path}, batch {batch}: step {step_ms:.3} ms, nodes timed one by one {total:.3} ms, {} nodes",
        model.nodes().len()
    );
    let mut by_kind: HashMap<String, (f64, usize)> = HashMap::new();
    for (&id, &ms) in &node_ms {
        let kind = by_kind.entry(model.node(id).op.name().to_string()).or_default();
        kind.0 += ms;
        kind.1 += 1;
    }
    let mut by_kind: Vec<_> = by_kind.into_iter().collect();
    by_kind.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    for (kind, (ms, count)) in by_kind {
        println!("{ms:>9.3} ms {:>5.1}% {count:>4} x {kind}", 100.0 * ms / total);
    }
    let mut nodes: Vec<_> = node_ms.into_iter().collect();
    nodes.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("slowest nodes:");
    for (id, ms) in nodes.into_iter().take(shown) {
        let node = model.node(id);
        let outputs = model.node_output_facts(id)?;
        let outputs: Vec<String> = outputs.iter().map(|f| format!("{f:?}")).collect();
        println!("{ms:>9.3} ms {} {} -> {}", node.name, node.op.name(), outputs.join(", "));
    }
    Ok(())
}
