//! Where one denoising step's time goes inside tract: prepares an exported ONNX file's plan for a
//! fixed batch as the sampler does (batch fixed, rewritten, optimized), runs it on one thread, and
//! prints the time per operator kind and the slowest nodes with their output shapes. The whole
//! step is timed first without the per-node timers, so the two totals show their overhead.
//! BENCHMARKS.md ("Where tract's step goes", "Forms of the graph tract runs faster") uses it
//! for issue 4.
//!
//!   cargo run --release -p chardiff-runtime --example plan_profile -- MODEL [BATCH] [ITERATIONS] [NODES]
//!
//! It times the file's graph as filed and rewritten as the sampler prepares it for the CPU
//! (`chardiff_runtime::tract::optimized_for_cpu`), step by step in turn, then profiles the rewritten
//! plan (`PLAN_PROFILE_AS_FILED=1`: the other); `PLAN_PROFILE_INFO=1` adds each shown node's
//! details (a product's kernel and what it fuses).
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
    // The file's graph, and the same rewritten as the sampler prepares a CPU plan.
    let as_filed = model.clone().into_optimized()?;
    let rewritten = chardiff_runtime::tract::optimized_for_cpu(model)?;
    // Any values in [-0.5, 0.5) serve: the step's work does not depend on them.
    let inputs: TVec<TValue> = as_filed
        .input_outlets()?
        .iter()
        .map(|&outlet| {
            let shape =
                as_filed.outlet_fact(outlet)?.shape.as_concrete().context("symbolic")?.to_vec();
            let data =
                (0..shape.iter().product()).map(|i: usize| (i * 7919 % 1000) as f32 / 1e3 - 0.5);
            Ok(tract_ndarray::ArrayD::from_shape_vec(shape, data.collect())?.into_tvalue())
        })
        .collect::<TractResult<_>>()?;

    // Steps of the two plans interleaved, so that a VM's drifting speed touches both alike.
    let plans = [SimplePlan::new(as_filed)?, SimplePlan::new(rewritten)?];
    let mut states = [SimpleState::new(&plans[0])?, SimpleState::new(&plans[1])?];
    let mut step_ms = [vec![], vec![]];
    for i in 0..iterations + 5 {
        for (state, times) in states.iter_mut().zip(&mut step_ms) {
            let start = Instant::now();
            state.run(inputs.clone())?;
            if i >= 5 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let median = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let [filed_ms, rewritten_ms] = step_ms.each_mut().map(median);
    println!(
        "{path}, batch {batch}: step {filed_ms:.3} ms as filed, {rewritten_ms:.3} ms rewritten \
         for the CPU (medians of {iterations} interleaved steps)"
    );
    let profiled = std::env::var_os("PLAN_PROFILE_AS_FILED").is_some();
    let (plan, state) =
        if profiled { (&plans[0], &mut states[0]) } else { (&plans[1], &mut states[1]) };

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
    let which = if profiled { "as filed" } else { "rewritten" };
    println!("{which}: nodes timed one by one {total:.3} ms, {} nodes", model.nodes().len());
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
        if std::env::var_os("PLAN_PROFILE_INFO").is_some() {
            for line in node.op.info()? {
                println!("              {line}");
            }
        }
    }
    Ok(())
}
