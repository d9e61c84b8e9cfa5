//! Criterion benches: one denoising step of the shipped model per precision (f32, f16 weights,
//! int8; named `-as-f32` where this CPU computes them in f32) and batch size (tract, CPU, one
//! thread), the full sampling loop, and one training step of the same architecture (candle).
//! `cargo bench --bench denoise`; `chardiff bench` reports the same step figures from the CLI.
//! With `--features ort` (and ORT_DYLIB_PATH set) the step group runs onnxruntime on the same
//! files beside tract, one thread each.

use chardiff_runtime::bench::step_latency;
use chardiff_runtime::sampler::{sample, SamplerConfig, StepRule};
use chardiff_runtime::tract::TractDenoiser;
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

fn step(c: &mut Criterion) {
    let mut group = c.benchmark_group("step");
    for (precision, file) in FILES {
        let mut tract = model(file);
        let window = tract.spec().window as u64;
        #[cfg(feature = "ort")]
        let mut ort = {
            let bytes = std::fs::read(path(file)).unwrap();
            chardiff_runtime::onnxruntime::OrtDenoiser::from_bytes(&bytes, 1).unwrap()
        };
        for batch in [1usize, 8, 64] {
            group.throughput(Throughput::Elements(batch as u64 * window));
            // What the file computes in here, where it is not its weights' precision (f16 and
            // int8 weights widened to f32 on CPUs without native fp16 or int8 dot products).
            let compute = tract.compute().to_string();
            let arithmetic =
                if compute == precision { String::new() } else { format!("-as-{compute}") };
            let id = BenchmarkId::new(format!("tract-{precision}{arithmetic}"), batch);
            group.bench_with_input(id, &batch, |b, &batch| {
                b.iter(|| step_latency(&mut tract, batch, 0, 1).unwrap())
            });
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
