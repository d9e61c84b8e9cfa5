//! End to end: train a tiny model on tests/data, export it, and check that tract runs the same
//! network candle trained (parity of x0, and the same text for the same seed).

use candle_core::{DType, Device, Tensor};
use chardiff_export::{denoiser_graph, read_onnx_model, to_onnx_bytes, ExportError};
use chardiff_runtime::bench::{max_x0_difference, x0_differences, RandomBatch};
use chardiff_runtime::sampler::{sample, GuidedOutput, SamplerConfig, StepRule};
use chardiff_runtime::tract::{native_f16, onnx_to_nnef, LoadError, Parallelism, TractDenoiser};
use chardiff_runtime::{mean_code, Denoiser};
use chardiff_runtime::{Head, Precision};
use chardiff_train::calibrate::{calibrate, CalibrationError};
use chardiff_train::candle::Params;
use chardiff_train::checkpoint::{read_json, TrainedModel, TRAIN_FILE};
use chardiff_train::{
    Activation, AttentionBias, InitialWeights, ModelConfig, TrainConfig, Trainer,
};
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::sync::OnceLock;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/garden.txt")
}

fn tiny_model() -> ModelConfig {
    ModelConfig {
        dim: 32,
        layers: 2,
        heads: 2,
        ffn: 64,
        activation: Activation::Gelu,
        attention_bias: AttentionBias::Relative,
    }
}

fn tiny_config(head: Head, conditioning: bool, steps: u64) -> TrainConfig {
    TrainConfig {
        corpus: corpus(),
        window: 24,
        head,
        conditioning,
        steps,
        batch: 16,
        lr: 3e-3,
        warmup: 20,
        eval_every: steps / 2,
        checkpoint_every: steps / 2,
        val_batches: 2,
        eval_samples: 1,
        sample_steps: 10,
        ..TrainConfig::default()
    }
}

struct Trained {
    _dir: tempfile::TempDir,
    model: TrainedModel,
    first_val: f64,
    last_val: f64,
}

/// One tiny training run shared by the tests of this file.
fn trained() -> &'static Trained {
    static RUN: OnceLock<Trained> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut trainer =
            Trainer::create(dir.path(), tiny_config(Head::Softmax, true, 300), tiny_model())
                .unwrap();
        let mut vals = vec![trainer.evaluate(f64::NAN).unwrap().val_loss];
        trainer
            .run(|e| {
                if let chardiff_train::Event::Eval(r) = e {
                    vals.push(r.val_loss)
                }
            })
            .unwrap();
        let model = TrainedModel::load(dir.path()).unwrap();
        Trained { first_val: vals[0], last_val: *vals.last().unwrap(), _dir: dir, model }
    })
}

fn clone_model(m: &TrainedModel) -> TrainedModel {
    TrainedModel { spec: m.spec.clone(), config: m.config.clone(), weights: m.weights.clone() }
}

/// Random weights scaled up so that every layer matters to the output.
fn random_model(head: Head, conditioning: bool, activation: Activation, seed: u64) -> TrainedModel {
    let dir = tempfile::tempdir().unwrap();
    // Every form of the attention block.
    let attention_bias =
        [AttentionBias::Relative, AttentionBias::None, AttentionBias::Full][seed as usize % 3];
    // Heads of 32 features (the CPU plans' own attention operator) and of 16 (tract's products).
    let heads = [1, 2][seed as usize % 2];
    let model = ModelConfig { activation, attention_bias, heads, ..tiny_model() };
    let trainer = Trainer::create(dir.path(), tiny_config(head, conditioning, 10), model).unwrap();
    let mut spec = trainer.spec.clone();
    spec.recommended_steps = 10;
    let params = Params::initialized(seed, DType::F32, &trainer.model, &spec).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let weights = params
        .vars()
        .iter()
        .map(|(name, var)| {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 0.6 - 0.3).collect();
            (name.clone(), Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
        })
        .collect();
    TrainedModel { spec, config: trainer.model.clone(), weights }
}

/// Max |x0_candle - x0_tract| over random inputs at several batch sizes.
/// The ONNX file and its NNEF conversion are both checked.
fn parity(model: TrainedModel) -> f32 {
    let onnx = to_onnx_bytes(&model, Precision::F32, None).unwrap();
    let mut tract = TractDenoiser::from_bytes(&onnx).unwrap();
    let mut nnef = TractDenoiser::from_bytes(&onnx_to_nnef(&onnx).unwrap()).unwrap();
    // Parity on an all-zero output would prove nothing.
    let data = RandomBatch::new(&model.spec, 2, 9);
    let mut out = data.output();
    tract.denoise(&data.input(), &mut out).unwrap();
    assert!(out.iter().any(|v| v.abs() > 1e-2), "outputs are degenerate");
    let config = model.config.clone();
    let mut candle = model.denoiser();
    let mut worst = 0.0f32;
    for (seed, batch) in [1, 3, 8].into_iter().enumerate() {
        let diff = max_x0_difference(&mut candle, &mut tract, batch, seed as u64).unwrap();
        let nnef_diff = max_x0_difference(&mut candle, &mut nnef, batch, seed as u64).unwrap();
        worst = worst.max(diff).max(nnef_diff);
    }
    // The CPU plans run the attention as one operator where a head's features fill its tiles,
    // reading the three projections from one product, from either format.
    let head_features = config.dim / config.heads;
    for plan in [&tract, &nnef] {
        let ops = plan.plan_ops();
        let attention: Vec<_> = ops.iter().filter(|(op, _)| op.starts_with("Attention")).collect();
        let expected = [("Attention(qkv)".to_string(), config.layers)];
        let expected = if head_features.is_multiple_of(32) { &expected[..] } else { &[] };
        assert_eq!(attention, expected.iter().collect::<Vec<_>>(), "{config:?}");
    }
    worst.max(logits_parity(&mut candle, &mut [&mut tract, &mut nnef]))
}

/// A softmax head's logits, which the sampler reshapes (temperature, self-guidance): the same in
/// candle and in each tract plan, and their mean code at temperature 1 is the graph's x0. A bit
/// head has none to give. The worst difference of the logits.
fn logits_parity(candle: &mut impl Denoiser, plans: &mut [&mut TractDenoiser]) -> f32 {
    let spec = candle.spec().clone();
    let data = RandomBatch::new(&spec, 3, 5);
    let size = 3 * spec.window * spec.charset.bytes().len();
    let (mut expected, mut logits, mut x0) = (vec![0.0; size], vec![0.0; size], data.output());
    let mut worst = 0.0f32;
    for plan in plans {
        if spec.head == Head::Bits {
            let err = plan.logits(&data.input(), &mut logits).unwrap_err().to_string();
            assert!(err.contains("gives no logits"), "{err}");
            continue;
        }
        candle.logits(&data.input(), &mut expected).unwrap();
        plan.logits(&data.input(), &mut logits).unwrap();
        plan.denoise(&data.input(), &mut x0).unwrap();
        let diff = expected.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        worst = worst.max(diff);
        let mut mean = data.output();
        mean_code(&spec.analog_bits().codes(&spec.charset), &logits, 1.0, &mut mean);
        let from_logits = mean.iter().zip(&x0).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(
            from_logits <= 1e-5,
            "the graph's x0 vs the mean code of its logits: {from_logits}"
        );
    }
    worst
}

#[test]
fn tract_matches_candle_on_random_weights_for_every_head_and_input_set() {
    for (i, (head, conditioning, act)) in [
        (Head::Softmax, true, Activation::Gelu),
        (Head::Softmax, false, Activation::Silu),
        (Head::Bits, true, Activation::Silu),
        (Head::Bits, false, Activation::Gelu),
    ]
    .into_iter()
    .enumerate()
    {
        let err = parity(random_model(head, conditioning, act, i as u64));
        eprintln!("{head:?} conditioning={conditioning} {act:?}: max |x0 diff| = {err:.2e}");
        assert!(err <= 1e-4, "{head:?}/{conditioning}/{act:?}: {err}");
    }
}

#[test]
fn training_lowers_the_validation_loss_and_tract_matches_the_trained_model() {
    let run = trained();
    eprintln!("val loss {:.4} -> {:.4}", run.first_val, run.last_val);
    assert!(run.last_val < 0.8 * run.first_val, "{} -> {}", run.first_val, run.last_val);
    let err = parity(clone_model(&run.model));
    eprintln!("trained: max |x0 diff| = {err:.2e}");
    assert!(err <= 1e-4);
}

#[test]
fn a_run_starts_from_an_exported_model_and_takes_its_network_from_the_file() {
    let run = trained();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: Vec<u8>| {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).unwrap();
        file
    };
    let file = write("tiny.onnx", to_onnx_bytes(&run.model, Precision::F32, None).unwrap());
    let (from, sha256) = read_onnx_model(&file).unwrap();
    assert_eq!(sha256.len(), 64);
    assert_eq!(from.config, tiny_model());
    assert_eq!(from.spec.provenance.loss.as_deref(), Some("mse"));

    // The new run's first weights are the file's: its validation loss is where the old run
    // ended, and exported again it is the same graph.
    let out = dir.path().join("run");
    let steps = from.spec.provenance.steps;
    assert!(steps > 0);
    let init = InitialWeights { file: file.clone(), sha256, steps };
    let config = TrainConfig { init: Some(init.clone()), ..tiny_config(Head::Softmax, true, 20) };
    let mut trainer = Trainer::create_from(&out, config, tiny_model(), &from).unwrap();
    let val = trainer.evaluate(f64::NAN).unwrap().val_loss;
    assert!((val - run.last_val).abs() < 1e-4 * run.last_val, "{val} vs {}", run.last_val);
    let again = denoiser_graph(&TrainedModel::load(&out).unwrap(), Precision::F32, None).unwrap();
    let original = denoiser_graph(&run.model, Precision::F32, None).unwrap();
    assert!(again.graph == original.graph);
    let saved: TrainConfig = read_json(&out, TRAIN_FILE).unwrap();
    assert_eq!(saved.init, Some(init));
    trainer.run(|_| {}).unwrap();
    drop(trainer);
    // Its model counts the file's training steps and its own.
    let provenance = TrainedModel::load(&out).unwrap().spec.provenance;
    assert_eq!(provenance.steps, steps + 20);

    // What no weight shows is found too: the activation, and the head count of a network
    // whose attention has no per-head bias.
    for seed in 0..6 {
        let activation = [Activation::Gelu, Activation::Silu][seed % 2];
        let mut model = random_model(Head::Softmax, true, activation, seed as u64);
        if model.config.attention_bias == AttentionBias::None {
            model.config.heads = [4, 1][seed % 2];
        }
        let bytes = to_onnx_bytes(&model, Precision::F32, None).unwrap();
        let (back, _) = read_onnx_model(&write("random.onnx", bytes)).unwrap();
        assert_eq!(back.config, model.config);
    }

    // Another precision, an edited graph, other characters: refused, saying why.
    let refused = |file: &PathBuf, why: &str| {
        let err = read_onnx_model(file).err().expect("refused").to_string();
        assert!(err.contains(why), "{err}");
    };
    let f16 = to_onnx_bytes(&run.model, Precision::F16, None).unwrap();
    refused(&write("tiny.f16.onnx", f16), "f32 weights only");
    let mut edited = denoiser_graph(&run.model, Precision::F32, None).unwrap();
    let graph = edited.graph.as_mut().unwrap();
    let i = graph.node.iter().position(|n| n.op_type == "Softmax").unwrap();
    graph.node[i].op_type = "LogSoftmax".into();
    refused(&write("edited.onnx", edited.encode_to_vec()), "or it was edited");
    let lower = dir.path().join("lower.txt");
    std::fs::write(&lower, std::fs::read_to_string(corpus()).unwrap().to_lowercase()).unwrap();
    let config = TrainConfig { corpus: lower, ..tiny_config(Head::Softmax, true, 20) };
    let err = Trainer::create_from(&dir.path().join("lower"), config, tiny_model(), &from);
    assert!(err.err().unwrap().to_string().contains("the same characters"));
}

#[test]
fn a_run_grows_a_model_deeper_without_changing_what_it_computes() {
    let run = trained();
    let dir = tempfile::tempdir().unwrap();
    let deeper = ModelConfig { layers: 4, ..tiny_model() };
    let config = tiny_config(Head::Softmax, true, 20);
    let mut trainer = Trainer::create_from(dir.path(), config.clone(), deeper, &run.model).unwrap();
    let val = trainer.evaluate(f64::NAN).unwrap().val_loss;
    assert!((val - run.last_val).abs() < 1e-4 * run.last_val, "{val} vs {}", run.last_val);
    trainer.run(|_| {}).unwrap();
    drop(trainer);
    // The new blocks learn: their output projections leave zero.
    let grown = &TrainedModel::load(dir.path()).unwrap().weights["blocks.3.mlp.down.w"];
    assert!(grown.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    // Another width is not growth.
    let wider = ModelConfig { dim: 64, ffn: 128, ..tiny_model() };
    let err = Trainer::create_from(&dir.path().join("w"), config, wider, &run.model).err().unwrap();
    assert!(err.to_string().contains("or that network with more layers"), "{err}");
}

#[test]
fn same_seed_gives_the_same_text_on_candle_and_tract() {
    let model = clone_model(&trained().model);
    let mut tract =
        TractDenoiser::from_bytes(&to_onnx_bytes(&model, Precision::F32, None).unwrap()).unwrap();
    let mut candle = model.denoiser();
    let config = SamplerConfig::new(20, 1.0, StepRule::Ddim, 42);
    let a = sample(&mut candle, &config, 3, None, |_, _| {}).unwrap();
    let b = sample(&mut tract, &config, 3, None, |_, _| {}).unwrap();
    assert_eq!(a, b);
    for text in &a {
        assert_eq!(text.len(), 24);
        eprintln!("➜ {}", String::from_utf8_lossy(text));
    }
    let ddpm = SamplerConfig { rule: StepRule::Ddpm, ..config };
    assert_eq!(
        sample(&mut candle, &ddpm, 2, None, |_, _| {}).unwrap(),
        sample(&mut tract, &ddpm, 2, None, |_, _| {}).unwrap()
    );
    // Through the softmax head's logits: cooler, self-guided on them or on x0.
    for on in [GuidedOutput::Logits, GuidedOutput::X0] {
        let reshaped =
            SamplerConfig { self_guidance: 2.0, self_guidance_on: on, temperature: 0.6, ..ddpm };
        assert_eq!(
            sample(&mut candle, &reshaped, 2, None, |_, _| {}).unwrap(),
            sample(&mut tract, &reshaped, 2, None, |_, _| {}).unwrap()
        );
    }
}

#[test]
fn threads_and_call_sizes_change_the_speed_not_the_text() {
    let model = clone_model(&trained().model);
    let file = to_onnx_bytes(&model, Precision::F32, None).unwrap();
    // One thread, one sequence per call (the CPU default).
    let mut one = TractDenoiser::from_bytes(&file).unwrap();
    let config = SamplerConfig::new(10, 1.0, StepRule::Ddpm, 7);
    let reference = sample(&mut one, &config, 5, None, |_, _| {}).unwrap();
    let reference_of_2 = sample(&mut one, &config, 2, None, |_, _| {}).unwrap();
    // 5 sequences: with 2 threads parts of 2 and 3, with 3 threads 1, 2 and 2, with a call batch
    // of 3 calls of 3 and 2 (two plans), with 5 the whole batch in one call.
    for (threads, parallelism, call_batch) in [
        (1, Parallelism::Batch, Some(5)),
        (1, Parallelism::Batch, Some(3)),
        (2, Parallelism::Batch, None),
        (2, Parallelism::Batch, Some(2)),
        (3, Parallelism::Batch, None),
        (2, Parallelism::Matmul, None),
        (2, Parallelism::Matmul, Some(5)),
        (8, Parallelism::Batch, None),
    ] {
        let mut net = TractDenoiser::from_bytes(&file).unwrap();
        net.set_threads(threads, parallelism).unwrap();
        net.set_call_batch(call_batch);
        let how = format!("{threads} threads, {parallelism:?}, call batch {call_batch:?}");
        let diff = max_x0_difference(&mut one, &mut net, 5, 3).unwrap();
        assert!(diff <= 1e-6, "{how}: max |x0 diff| {diff}");
        let texts = sample(&mut net, &config, 5, None, |_, _| {}).unwrap();
        assert_eq!(texts, reference, "{how}");
        // Another batch size on the same denoiser: new parts, plans kept where they fit.
        let texts = sample(&mut net, &config, 2, None, |_, _| {}).unwrap();
        assert_eq!(texts, reference_of_2, "{how}, 2 sequences");
    }
}

#[test]
fn the_flops_of_a_step_are_those_of_its_matrix_products() {
    let model = clone_model(&trained().model);
    let tract =
        TractDenoiser::from_bytes(&to_onnx_bytes(&model, Precision::F32, None).unwrap()).unwrap();
    assert_eq!(tract.flops_per_sequence().unwrap(), model.config.forward_flops(&model.spec));
}

#[test]
fn f16_files_stay_close_to_f32_and_say_what_they_compute_in() {
    let model = clone_model(&trained().model);
    let f32_file = to_onnx_bytes(&model, Precision::F32, None).unwrap();
    let f16_file = to_onnx_bytes(&model, Precision::F16, None).unwrap();
    let mut reference = TractDenoiser::from_bytes(&f32_file).unwrap();
    let mut widened = TractDenoiser::from_bytes(&f16_file).unwrap();
    assert_eq!(widened.spec().precision, Precision::F16);
    let native = if native_f16() { Precision::F16 } else { Precision::F32 };
    assert_eq!(widened.compute(), native, "f16 arithmetic only where the CPU has it");
    let cpu = chardiff_runtime::tract::Device::Cpu;
    let mut f16 = TractDenoiser::from_bytes_with(&f16_file, cpu, Some(Precision::F16)).unwrap();
    assert_eq!(f16.compute(), Precision::F16);
    for (what, net, limit) in [("f16 weights", &mut widened, 1e-2), ("f16 compute", &mut f16, 3e-2)]
    {
        let diff = max_x0_difference(&mut reference, net, 3, 1).unwrap();
        eprintln!("{what}: max |x0 diff| vs f32 = {diff:.2e}");
        assert!(diff <= limit, "{what}: {diff}");
    }
    assert!(matches!(onnx_to_nnef(&f16_file), Err(LoadError::NnefNotF32(Precision::F16))));
}

#[test]
fn int8_files_are_smaller_stay_close_to_f32_and_refuse_what_does_not_apply() {
    let model = clone_model(&trained().model);
    let needs = to_onnx_bytes(&model, Precision::Int8, None);
    assert!(matches!(needs, Err(ExportError::NeedsCalibration)));
    let text = std::fs::read(corpus()).unwrap();
    let ranges = calibrate(&model, &text).unwrap();
    let weights = model.weights.keys().filter(|n| n.ends_with(".w") && !n.contains("ln"));
    assert_eq!(ranges.0.keys().collect::<Vec<_>>(), weights.collect::<Vec<_>>());

    let f32_file = to_onnx_bytes(&model, Precision::F32, None).unwrap();
    let int8_file = to_onnx_bytes(&model, Precision::Int8, Some(&ranges)).unwrap();
    let ratio = int8_file.len() as f64 / f32_file.len() as f64;
    eprintln!("int8 file: {} bytes, {ratio:.2} of f32", int8_file.len());
    assert!(ratio < 0.6, "{ratio}");
    let mut reference = TractDenoiser::from_bytes(&f32_file).unwrap();
    // int8 products (emulated where the CPU lacks int8 dot products), and f32 products of the
    // widened weights (the default: faster in tract); they compute differently and both stay
    // close.
    let cpu = chardiff_runtime::tract::Device::Cpu;
    let compute = |p| TractDenoiser::from_bytes_with(&int8_file, cpu, Some(p));
    let (mut int8, mut widened) =
        (compute(Precision::Int8).unwrap(), compute(Precision::F32).unwrap());
    assert_eq!(int8.spec().precision, Precision::Int8);
    assert_eq!((int8.compute(), widened.compute()), (Precision::Int8, Precision::F32));
    // The default whatever the CPU has (`arithmetic` does not look at the device: on a GPU
    // tract's products take f32 and f16 only).
    assert_eq!(TractDenoiser::from_bytes(&int8_file).unwrap().compute(), Precision::F32);
    for (what, net, limit) in [("int8 products", &mut int8, 0.1), ("widened", &mut widened, 0.1)] {
        let diff = max_x0_difference(&mut reference, net, 3, 1).unwrap();
        eprintln!("{what}: max |x0 diff| vs f32 = {diff:.2e}");
        assert!(diff <= limit, "{what}: {diff}");
    }
    let between = max_x0_difference(&mut int8, &mut widened, 3, 1).unwrap();
    assert!(between > 1e-4, "widening left the int8 products in place: {between}");
    // Widened, the products are in the f32 file's form, and the plans alike: the products'
    // scaling folded into the weights, so that the CPU plans' rewrites find what they rewrite.
    assert_eq!(widened.plan_ops(), reference.plan_ops());

    let f32_compute = |p| TractDenoiser::from_bytes_with(&f32_file, cpu, Some(p)).err();
    assert!(matches!(f32_compute(Precision::Int8), Some(LoadError::ComputeInt8(Precision::F32))));
    assert!(matches!(compute(Precision::F16).err(), Some(LoadError::Int8InF16)));
    assert!(matches!(onnx_to_nnef(&int8_file), Err(LoadError::NnefNotF32(Precision::Int8))));
    let short = calibrate(&model, b"the garden");
    assert!(matches!(short, Err(CalibrationError::TooShort { found: 10, needed: 24 })));
    let mut partial = ranges.clone();
    partial.0.remove("head.w");
    let uncalibrated = to_onnx_bytes(&model, Precision::Int8, Some(&partial));
    assert!(matches!(uncalibrated, Err(ExportError::Uncalibrated(name)) if name == "head.w"));
}

#[test]
fn the_shipped_f16_and_int8_files_are_the_default_model_and_stay_close_to_it() {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    let cpu = chardiff_runtime::tract::Device::Cpu;
    let load = |file: &str, compute| TractDenoiser::load_with(&models.join(file), cpu, compute);
    let mut reference = load("default.onnx", None).unwrap();
    // x0 lies in [-1, 1]. Over random inputs (wider than the calibration's) int8 moves single
    // values far where the sharp cross-entropy-trained head sits near a tie of two characters
    // (a small change of the logits flips an expected bit; the head's own product stays f32):
    // the largest move grew with training, 0.16-0.19 on the defaults of sessions 4-12, 0.25,
    // 0.31 and 0.30 after the second to fourth stages, 0.42 and 0.40 on the 6-layer sixth and
    // eighth, while the mean move stayed at 0.015-0.016. So int8 is held to twice that mean,
    // and its max only to a bound on nonsense; where measured, int8 sampled within about a
    // point of f32's word rate (BENCHMARKS.md). Widened to f32 (the activations not quantized)
    // the int8 file moves x0 by 0.07-0.09 at most, 0.0055-0.0057 on average.
    for (file, precision, compute, max_limit, mean_limit) in [
        ("default.f16.onnx", Precision::F16, None, 1e-2, 1e-3),
        ("default.int8.onnx", Precision::Int8, Some(Precision::Int8), 0.6, 0.03),
        ("default.int8.onnx", Precision::Int8, Some(Precision::F32), 0.2, 0.012),
    ] {
        let mut net = load(file, compute).unwrap();
        let spec = net.spec().clone();
        assert_eq!(spec.precision, precision);
        let same = chardiff_runtime::ModelSpec { precision: Precision::F32, ..spec };
        assert_eq!(
            &same,
            reference.spec(),
            "models/{file} is stale: export it from the default run"
        );
        let diffs = x0_differences(&mut reference, &mut net, 8, 1).unwrap();
        let max = diffs.iter().copied().fold(0.0, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        eprintln!("{file} ({}): |x0 diff| vs f32: max {max:.2e}, mean {mean:.2e}", net.compute());
        assert!(max <= max_limit && mean <= mean_limit, "{file}: max {max}, mean {mean}");
        // The CPU plans run each layer's attention as one operator, which reads the queries',
        // keys' and values' projections from one product (f32 or int8).
        for plan in [&net, &reference] {
            let ops = plan.plan_ops();
            let attention = ops.iter().filter(|(op, _)| op.starts_with("Attention"));
            assert_eq!(attention.collect::<Vec<_>>(), [&("Attention(qkv)".to_string(), 6)]);
        }
        // With AVX512-VNNI kernels, int8 inputs are quantized straight into the kernels' panels.
        let packed = net.plan_ops().iter().any(|(op, _)| op == "QuantizePacked");
        let vnni = chardiff_runtime::tract::int8_dot_product() == Some("avx512vnni");
        assert_eq!(packed, vnni && net.compute() == Precision::Int8, "{file}");
    }
}
