//! Every parameter tensor's gradient against central finite differences, in f64. candle has ops
//! whose gradients silently vanish, so "has a gradient" is not enough: the values must match.

use candle_core::{DType, Device, Tensor};
use chardiff_runtime::sampler::{GuidedOutput, StepRule};
use chardiff_runtime::spec::{Precision, Provenance, FORMAT_VERSION};
use chardiff_runtime::{BitCode, Charset, Head, ModelSpec, Schedule, BITS};
use chardiff_train::candle::{CandleOps, Params};
use chardiff_train::model::{self, Activation, AttentionBias, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn spec(head: Head, conditioning: bool) -> ModelSpec {
    ModelSpec {
        format_version: FORMAT_VERSION,
        window: 5,
        bits: BITS,
        bit_scale: 1.0,
        code: BitCode::Binary,
        charset: Charset::of(b"abcdef "),
        schedule: Schedule::Cosine,
        self_conditioning: true,
        conditioning,
        head,
        recommended_steps: 10,
        recommended_td: 0.0,
        recommended_free_td: None,
        recommended_sampler: StepRule::Ddim,
        recommended_guidance: 1.0,
        recommended_self_guidance: 1.0,
        recommended_temperature: 1.0,
        recommended_refine: 0,
        recommended_self_guidance_on: GuidedOutput::X0,
        recommended_warp: 1.0,
        provenance: Provenance {
            corpus: String::new(),
            corpus_sha256: String::new(),
            steps: 0,
            date: String::new(),
            loss: None,
        },
        precision: Precision::F32,
    }
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| scale * (rng.random::<f64>() * 2.0 - 1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A scalar that depends on every output value: sum(x0 * r) (+ sum(logits * r')).
fn objective(
    params: &mut Params,
    config: &ModelConfig,
    spec: &ModelSpec,
    inputs: &[Tensor],
    probes: &[Tensor],
) -> Tensor {
    let mut ops = CandleOps::new(params, DType::F64);
    let condition = spec.conditioning.then(|| (inputs[3].clone(), inputs[4].clone()));
    let x = model::Inputs {
        x_t: inputs[0].clone(),
        x_self: inputs[1].clone(),
        t: inputs[2].clone(),
        condition,
    };
    let out = model::forward(&mut ops, config, spec, x).unwrap();
    let mut total = (out.x0 * &probes[0]).unwrap().sum_all().unwrap();
    if let Some(logits) = out.logits {
        total = (total + (logits * &probes[1]).unwrap().sum_all().unwrap()).unwrap();
    }
    total
}

fn check(head: Head, conditioning: bool, activation: Activation) {
    // Both learned score biases (the block without one is a subset of either).
    let attention_bias =
        if head == Head::Softmax { AttentionBias::Relative } else { AttentionBias::Full };
    let config = ModelConfig { dim: 8, layers: 2, heads: 2, ffn: 12, activation, attention_bias };
    let spec = spec(head, conditioning);
    let (b, l, k, v) = (2, spec.window, spec.bits, spec.charset.len());
    let mut params = Params::initialized(3, DType::F64, &config, &spec).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    // Larger than the training init so no path is numerically negligible.
    for var in params.vars().values() {
        var.set(&random(&mut rng, var.dims(), 0.6)).unwrap();
    }
    let mask = Tensor::from_vec(
        vec![1.0f64, 0., 0., 1., 0., 0., 1., 1., 0., 0.],
        &[b, l, 1],
        &Device::Cpu,
    )
    .unwrap();
    let inputs = [
        random(&mut rng, &[b, l, k], 1.5),
        random(&mut rng, &[b, l, k], 1.0),
        Tensor::from_vec(vec![0.3f64, 0.8], &[b], &Device::Cpu).unwrap(),
        random(&mut rng, &[b, l, k], 1.0),
        mask,
    ];
    let probes = [random(&mut rng, &[b, l, k], 1.0), random(&mut rng, &[b, l, v], 1.0)];

    let grads = objective(&mut params, &config, &spec, &inputs, &probes).backward().unwrap();
    let vars: Vec<(String, candle_core::Var)> =
        params.vars().iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    let eps = 1e-6;
    for (name, var) in vars {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let original = var.as_tensor().copy().unwrap();
        let values = original.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // A few entries of every tensor, including the first and last.
        let picks = [0, values.len() / 2, values.len() - 1, rng.random_range(0..values.len())];
        for &i in &picks {
            let mut at = |delta: f64| {
                let mut moved = values.clone();
                moved[i] += delta;
                var.set(&Tensor::from_vec(moved, original.dims(), &Device::Cpu).unwrap()).unwrap();
                let y = objective(&mut params, &config, &spec, &inputs, &probes)
                    .to_scalar::<f64>()
                    .unwrap();
                var.set(&original).unwrap();
                y
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            // The floor admits exact zeros (a key bias cannot change attention) against FD noise.
            let err = (numeric - grad[i]).abs() / (1e-4 + numeric.abs().max(grad[i].abs()));
            assert!(
                err < 1e-4,
                "{name}[{i}]: backprop {} vs finite differences {numeric}",
                grad[i]
            );
        }
        let norm: f64 = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
        assert!(norm > 1e-8, "{name}: gradient vanished (norm {norm})");
    }
}

#[test]
fn softmax_head_conditional_gelu() {
    check(Head::Softmax, true, Activation::Gelu);
}

#[test]
fn bits_head_unconditional_silu() {
    check(Head::Bits, false, Activation::Silu);
}
