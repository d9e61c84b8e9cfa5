//! How much of a text a model recovers at each noise level: noises real validation windows to
//! x_t at t = 1/40 ... 39/40, denoises them as the sampler does (a self-conditioning pass first
//! when the model has one; unconditional), and prints per t the share of characters of the x0
//! estimate that are right, beside the share that x_t itself decodes to (what needs no network).
//! Where the two are equal there is nothing to learn; BENCHMARKS.md ("What learns fastest",
//! batch 6) uses it to choose where training should spend its times.
//!
//!   cargo run --release -p chardiff-runtime --example accuracy_by_noise -- MODEL CORPUS [none|reference]

use chardiff_runtime::corpus::{spaced_windows, Corpus, Preprocess};
use chardiff_runtime::denoiser::{Condition, DenoiseInput, Denoiser};
use chardiff_runtime::sampler::gaussian;
use chardiff_runtime::schedule::noised;
use chardiff_runtime::tract::TractDenoiser;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;

const WINDOWS: usize = 64;
const LEVELS: usize = 40;

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, corpus, rest @ ..] = args.as_slice() else {
        return Err("usage: accuracy_by_noise MODEL CORPUS [none|reference]".into());
    };
    let preprocess = match rest.first().map(String::as_str) {
        None | Some("none") => Preprocess::None,
        Some("reference") => Preprocess::Reference,
        Some(other) => return Err(format!("unknown preprocessing {other:?}").into()),
    };
    let mut net = TractDenoiser::load(Path::new(model))?;
    let spec = net.spec().clone();
    let corpus = Corpus::load(Path::new(corpus), preprocess, spec.window)?;
    let text = spaced_windows(&corpus.valid, spec.window, WINDOWS).concat();
    let x0 = spec.analog_bits().encode(&text);
    let zeros = vec![0.0f32; x0.len()];
    let unknown = vec![0.0f32; WINDOWS * spec.window];
    let condition = spec.conditioning.then_some(Condition { cond: &zeros, mask: &unknown });
    let right = |decoded: &[u8]| {
        decoded.iter().zip(&text).filter(|(a, b)| a == b).count() as f64 / text.len() as f64
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    println!("    t   gamma  x0 estimate  x_t itself");
    for level in 1..LEVELS {
        let t = level as f32 / LEVELS as f32;
        let g = spec.schedule.gamma(f64::from(t)) as f32;
        let eps = gaussian(&mut rng, x0.len());
        let x_t: Vec<f32> = x0.iter().zip(&eps).map(|(&c, &e)| noised(c, e, g)).collect();
        let times = vec![t; WINDOWS];
        let (mut x_self, mut estimate) = (zeros.clone(), vec![0.0f32; x0.len()]);
        for _pass in 0..if spec.self_conditioning { 2 } else { 1 } {
            let input =
                DenoiseInput { batch: WINDOWS, x_t: &x_t, x_self: &x_self, t: &times, condition };
            net.denoise(&input, &mut estimate)?;
            let b = spec.bit_scale;
            x_self = estimate.iter().map(|v| v.clamp(-b, b)).collect();
        }
        let (model_right, noise_right) =
            (right(&spec.decode(&estimate)), right(&spec.decode(&x_t)));
        println!("{t:.3}  {g:.4}  {:>10.1}%  {:>9.1}%", 100.0 * model_right, 100.0 * noise_right);
    }
    Ok(())
}
