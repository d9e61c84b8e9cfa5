//! Times every f32 tile tract-linalg can run on this CPU on the products of one step of a
//! model, one sequence per call as the sampler makes them, and prints them fastest first: what
//! `chardiff_runtime::tract::tiles` rests on (BENCHMARKS.md, "The products' tile").
//!
//!   cargo run --release -p chardiff-runtime --example tiles -- [MxKxN ...] [--iterations N]
//!
//! Each shape is m (weight rows: output features), k, n (positions). The default shapes are the
//! default model's at batch 1: MLP up and down, the Q/K/V and output projections, and the two
//! attention products per head. Each timing packs the activation (as the plan does every call)
//! and runs the kernel on weights packed once.

use chardiff_runtime::tract::tiles;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{bail, format_err};
use tract_onnx::tract_core::tract_linalg::mmm::{AsInputValue, FusedSpec};
use tract_onnx::tract_core::tract_linalg::{MmmDispatch, WeightType};

const DEFAULT_SHAPES: [[usize; 3]; 5] =
    [[512, 128, 96], [128, 512, 96], [128, 128, 96], [96, 32, 96], [32, 96, 96]];

fn main() -> TractResult<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut iterations = 500;
    if let Some(at) = args.iter().position(|a| a == "--iterations") {
        let Some(value) = args.get(at + 1) else { bail!("--iterations needs a number") };
        iterations = value.parse()?;
        args.drain(at..at + 2);
    }
    let shapes: Vec<[usize; 3]> = if args.is_empty() {
        DEFAULT_SHAPES.to_vec()
    } else {
        let shape = |arg: &String| -> TractResult<[usize; 3]> {
            let dims: Vec<usize> = arg.split('x').map(str::parse).collect::<Result<_, _>>()?;
            dims.try_into().map_err(|_| format_err!("{arg}: not MxKxN"))
        };
        args.iter().map(shape).collect::<TractResult<_>>()?
    };
    let dispatch = MmmDispatch::native();
    let tiles: Vec<_> = (dispatch.runnable().iter())
        .filter(|k| k.internal_type() == DatumType::F32 && k.nr() > 1)
        .filter(|k| k.packings()[0].0.precursor() == WeightType::from(DatumType::F32))
        .collect();
    for [m, k, n] in shapes {
        let choice = || {
            let kernel = dispatch.preferred_kernel(DatumType::F32, Some(m), Some(k), Some(n));
            kernel.map(|k| k.name().to_string()).unwrap_or_default()
        };
        tiles::ENABLED.store(false, Ordering::Relaxed);
        let tracts = choice();
        tiles::ENABLED.store(true, Ordering::Relaxed);
        let samplers = choice();
        let values =
            |len: usize| -> Vec<f32> { (0..len).map(|i| (i % 17) as f32 / 17.0).collect() };
        let (a, b) = (
            Tensor::from_shape(&[m, k], &values(m * k))?,
            Tensor::from_shape(&[k, n], &values(k * n))?,
        );
        let mut rows = vec![];
        for tile in &tiles {
            let (pack_a, pack_b) = &tile.packings()[0];
            let packed_a = pack_a.prepare_one(&a, 1, 0)?;
            // The output as the plans store it: positions by features, features contiguous.
            let mut c = Tensor::zero::<f32>(&[n, m])?;
            let mut micros = vec![];
            for i in 0..iterations + 50 {
                let start = Instant::now();
                let packed_b = pack_b.prepare_one(&b, 0, 1)?;
                // Safety: the store describes `c` ([n, m], f32, m-axis stride 1, n-axis stride
                // m), which outlives the run, and the packings are the tile's own.
                unsafe {
                    let store = tile.c_from_data_and_strides(4, 1, m as isize);
                    let view = c.view_mut();
                    let a = AsInputValue::Borrowed(&*packed_a);
                    let b = AsInputValue::Owned(packed_b);
                    let ops = [
                        FusedSpec::AddMatMul { a, b, packing: 0 },
                        FusedSpec::Store(store.wrap(&view)),
                    ];
                    tile.run(m, n, &ops)?;
                }
                if i >= 50 {
                    micros.push(start.elapsed().as_secs_f64() * 1e6);
                }
            }
            micros.sort_by(f64::total_cmp);
            rows.push((micros[micros.len() / 2], tile.name().to_string()));
        }
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mflop = (2 * m * k * n) as f64 / 1e6;
        println!(
            "m {m} k {k} n {n}: {mflop:.1} MFLOP; tract picks {tracts}, the sampler {samplers}"
        );
        for (us, name) in rows {
            let gflops = (2 * m * k * n) as f64 / us / 1e3;
            println!("  {us:8.1} us {gflops:6.1} GFLOP/s  {name}");
        }
    }
    Ok(())
}
