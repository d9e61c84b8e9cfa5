//! Criterion benches: one denoising step of the shipped model per precision (f32, f16 weights,
//! int8; named `-as-f32` where this CPU computes them in f32, with the int8 products beside
//! where it has int8 dot products) and batch size (tract, CPU, one thread), the full sampling
//! loop, and one training step of the same architecture (candle).
//! `cargo bench --bench denoise`; `chardiff bench` reports the same step figures from the CLI.
//! With `--features ort` (and ORT_DYLIB_PATH set) the step group runs onnxruntime on the same
//! files beside tract, one thread each.

use chardiff_runtime::bench::step_latency;
use chardiff_runtime::sampler::{sample, SamplerConfig, StepRule};
use chardiff_runtime::spec::Precision;
use chardiff_runtime::tract::{int8_dot_product, Device, TractDenoiser};
use chardiff_runtime::Denoiser;
use chardiff_train::{Activation, AttentionBias, ModelConfig, TrainConfig, Trainer};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::path::{Path, PathBuf};

/// The shipped default model in each precision it is shipped in.
const FILES: [(&str, &str); 3] =
    [("f32", "default.onnx"), ("f16", "default.f16.onnx"), ("int8", "default.int8.onnx")];

fn path(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(file)
}

fn model(file: &str) -> TractDenoiser {
    TractDenoiser::load(&path(file)).expect("the shipped model loads")
}

/// The file as the sampler runs it here, named by its weights and, where they differ, its
/// arithmetic (`-as-f32`: f16 weights on CPUs without native fp16, int8 weights everywhere); and
/// an int8 file's own int8 products too where the CPU has int8 dot products (elsewhere tract
/// emulates them, tens of times slower).
fn tract_runs(precision: &str, file: &str) -> Vec<(String, TractDenoiser)> {
    let net = model(file);
    let compute = net.compute().to_string();
    let arithmetic = if compute == precision { String::new() } else { format!("-as-{compute}") };
    let mut runs = vec![(format!("tract-{precision}{arithmetic}"), net)];
    if precision == "int8" && int8_dot_product().is_some() {
        let int8 = TractDenoiser::load_with(&path(file), Device::Cpu, Some(Precision::Int8));
        runs.push((format!("tract-{precision}"), int8.expect("the int8 file computes in int8")));
    }
    runs
}

fn step(c: &mut Criterion) {
    let mut group = c.benchmark_group("step");
    for (precision, file) in FILES {
        let mut tract = tract_runs(precision, file);
        let window = tract[0].1.spec().window as u64;
        #[cfg(feature = "ort")]
        let mut ort = {
            let bytes = std::fs::read(path(file)).unwrap();
            chardiff_runtime::onnxruntime::OrtDenoiser::from_bytes(&bytes, 1).unwrap()
        };
        for batch in [1usize, 8, 64] {
            group.throughput(Throughput::Elements(batch as u64 * window));
            for (name, net) in &mut tract {
                group.bench_with_input(
                    BenchmarkId::new(name.as_str(), batch),
                    &batch,
                    |b, &batch| b.iter(|| step_latency(net, batch, 0, 1).unwrap()),
                );
            }
            #[cfg(feature = "ort")]
            group.bench_with_input(
                BenchmarkId::new(format!("onnxruntime-{precision}"), batch),
                &batch,
                |b, &batch| b.iter(|| step_latency(&mut ort, batch, 0, 1).unwrap()),
            );
        }
    }
    group.finish();
}

fn full_sample(c: &mut Criterion) {
    let mut net = model("default.onnx");
    let config = SamplerConfig::new(50, 1.0, StepRule::Ddim, 0);
    let mut group = c.benchmark_group("sample_50_steps");
    group.sample_size(10);
    for batch in [1usize, 8] {
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter(|| sample(&mut net, &config, batch, None, |_, _| {}).unwrap())
        });
    }
    group.finish();
}

fn train_step(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let config = TrainConfig {
        corpus: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/garden.txt"),
        window: 96,
        batch: 16,
        steps: u64::MAX,
        ..TrainConfig::default()
    };
    let model = ModelConfig {
        dim: 128,
        layers: 4,
        heads: 4,
        ffn: 512,
        activation: Activation::Silu,
        attention_bias: AttentionBias::Relative,
    };
    let mut trainer = Trainer::create(dir.path(), config, model).unwrap();
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements(16 * 96));
    group.bench_function("dim128_layers4_batch16_window96", |b| {
        b.iter(|| trainer.train_step().unwrap())
    });
    group.finish();
}

criterion_group!(benches, step, full_sample, train_step);
criterion_main!(benches);
