//! Where one denoising step's time goes inside tract: prepares an exported ONNX file's plan for a
//! fixed batch as the sampler does (batch fixed, rewritten, optimized), runs it on one thread, and
//! prints the time per operator kind and the slowest nodes with their output shapes. The whole
//! step is timed first without the per-node timers, so the two totals show their overhead.
//! BENCHMARKS.md ("Where tract's step goes", "Forms of the graph tract runs faster") uses it
//! for issue 4.
//!
//!   cargo run --release -p chardiff-runtime --example plan_profile -- MODEL [BATCH] [ITERATIONS] [NODES]
//!
//! It times three plans step by step in turn: the file's graph as filed and rewritten as the
//! sampler prepares it for the CPU (`chardiff_runtime::tract::optimized_for_cpu`), both on the
//! tiles tract picks for their products, and the sampler's own plan (the same rewritten graph, on
//! the tiles of `chardiff_runtime::tract::tiles` where it names one). Then it profiles the
//! sampler's plan (`PLAN_PROFILE=as-filed` or `rewritten`: another); `PLAN_PROFILE_INFO=1` adds
//! each shown node's details (a product's kernel and what it fuses).
//!
//! The allocator is the system's: with glibc, set `MALLOC_MMAP_THRESHOLD_` and
//! `MALLOC_TRIM_THRESHOLD_` high to see the step without the page faults of memory returned to
//! the OS between operators.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
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
    // The file's graph and the same rewritten as the sampler prepares a CPU plan, both on
    // tract's own choice of tiles for their products, and the sampler's plan itself (the tiles
    // of `chardiff_runtime::tract::tiles` where it names one).
    let own_tiles = |on| chardiff_runtime::tract::tiles::ENABLED.store(on, Ordering::Relaxed);
    own_tiles(false);
    let as_filed = model.clone().into_optimized()?;
    let rewritten = chardiff_runtime::tract::optimized_for_cpu(model.clone())?;
    own_tiles(true);
    let sampler = chardiff_runtime::tract::optimized_for_cpu(model)?;
    let labels = ["as filed", "rewritten", "the sampler's (rewritten, its tiles)"];
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

    // Steps of the plans interleaved, so that a VM's drifting speed touches them alike.
    let plans: Vec<_> = [as_filed, rewritten, sampler]
        .map(SimplePlan::new)
        .into_iter()
        .collect::<TractResult<_>>()?;
    let mut states: Vec<_> = plans.iter().map(SimpleState::new).collect::<TractResult<_>>()?;
    let mut step_ms = [vec![], vec![], vec![]];
    for i in 0..iterations + 5 {
        for (state, times) in states.iter_mut().zip(&mut step_ms) {
            let start = Instant::now();
            state.run(inputs.clone())?;
            if i >= 5 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    println!("{path}, batch {batch}, medians of {iterations} interleaved steps:");
    for (label, times) in labels.iter().zip(&mut step_ms) {
        times.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2];
        println!("  {ms:.3} ms {label}");
    }
    // How far each plan's outputs lie from the previous plan's.
    let outputs: Vec<_> =
        states.iter_mut().map(|state| state.run(inputs.clone())).collect::<TractResult<_>>()?;
    for (i, found) in outputs.iter().enumerate().skip(1) {
        let mut worst = 0f32;
        for (e, f) in outputs[i - 1].iter().zip(found) {
            let (e, f) = (e.to_plain_array_view::<f32>()?, f.to_plain_array_view::<f32>()?);
            worst = e.iter().zip(f.iter()).map(|(e, f)| (e - f).abs()).fold(worst, f32::max);
        }
        println!("  outputs of '{}' within {worst:.1e} of '{}'", labels[i], labels[i - 1]);
    }
    let profiled = match std::env::var("PLAN_PROFILE") {
        Ok(label) if label == "as-filed" => 0,
        Ok(label) if label == "rewritten" => 1,
        _ => 2,
    };
    let (plan, state) = (&plans[profiled], &mut states[profiled]);

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
        "{}: nodes timed one by one {total:.3} ms, {} nodes",
        labels[profiled],
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
        if std::env::var_os("PLAN_PROFILE_INFO").is_some() {
            for line in node.op.info()? {
                println!("              {line}");
            }
        }
    }
    Ok(())
}
