//! Measurements of a denoiser's speed: per-step latency percentiles after warm-up, and the
//! process' peak memory. Only measures; `chardiff bench` and the criterion benches report.

use crate::denoiser::{BoxError, Condition, DenoiseInput, Denoiser};
use crate::sampler::gaussian;
use crate::spec::ModelSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct StepLatency {
    pub batch: usize,
    pub iterations: usize,
    pub median_ms: f64,
    pub p10_ms: f64,
    pub p90_ms: f64,
}

/// Owned inputs of one network call on random data: noisy x_t, clipped noisy x_self, random t
/// and (for conditional models) random known positions.
pub struct RandomBatch {
    pub batch: usize,
    x_t: Vec<f32>,
    x_self: Vec<f32>,
    t: Vec<f32>,
    cond: Vec<f32>,
    mask: Vec<f32>,
    conditioning: bool,
}

impl RandomBatch {
    pub fn new(spec: &ModelSpec, batch: usize, seed: u64) -> RandomBatch {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let size = batch * spec.values_per_sequence();
        RandomBatch {
            batch,
            x_t: gaussian(&mut rng, size),
            x_self: gaussian(&mut rng, size).iter().map(|v| v.clamp(-1.0, 1.0)).collect(),
            t: (0..batch).map(|_| rng.random()).collect(),
            cond: gaussian(&mut rng, size),
            mask: (0..batch * spec.window).map(|_| f32::from(rng.random::<bool>())).collect(),
            conditioning: spec.conditioning,
        }
    }

    pub fn input(&self) -> DenoiseInput<'_> {
        DenoiseInput {
            batch: self.batch,
            x_t: &self.x_t,
            x_self: &self.x_self,
            t: &self.t,
            condition: self
                .conditioning
                .then_some(Condition { cond: &self.cond, mask: &self.mask }),
        }
    }

    /// The output buffer x0 for this batch.
    pub fn output(&self) -> Vec<f32> {
        vec![0.0; self.x_t.len()]
    }
}

/// Runs `warmup` untimed then `iterations` timed network calls on a random batch.
pub fn step_latency<D: Denoiser + ?Sized>(
    net: &mut D,
    batch: usize,
    warmup: usize,
    iterations: usize,
) -> Result<StepLatency, BoxError> {
    let data = RandomBatch::new(net.spec(), batch, 0);
    let (input, mut x0) = (data.input(), data.output());
    for _ in 0..warmup {
        net.denoise(&input, &mut x0)?;
    }
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations.max(1) {
        let start = Instant::now();
        net.denoise(&input, &mut x0)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(StepLatency {
        batch,
        iterations: times.len(),
        median_ms: percentile(&times, 0.5),
        p10_ms: percentile(&times, 0.1),
        p90_ms: percentile(&times, 0.9),
    })
}

/// The largest |x0| difference between two denoisers of the same spec over one random batch.
pub fn max_x0_difference<A: Denoiser + ?Sized, B: Denoiser + ?Sized>(
    a: &mut A,
    b: &mut B,
    batch: usize,
    seed: u64,
) -> Result<f32, BoxError> {
    Ok(x0_differences(a, b, batch, seed)?.into_iter().fold(0.0, f32::max))
}

/// Every |x0| difference (one per position and bit) between two denoisers of the same spec
/// over one random batch.
pub fn x0_differences<A: Denoiser + ?Sized, B: Denoiser + ?Sized>(
    a: &mut A,
    b: &mut B,
    batch: usize,
    seed: u64,
) -> Result<Vec<f32>, BoxError> {
    let data = RandomBatch::new(a.spec(), batch, seed);
    let (mut x, mut y) = (data.output(), data.output());
    a.denoise(&data.input(), &mut x)?;
    b.denoise(&data.input(), &mut y)?;
    Ok(x.iter().zip(&y).map(|(p, q)| (p - q).abs()).collect())
}

/// Linear interpolation between the closest ranks of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The process' peak resident memory (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 0.1), 1.4);
        assert_eq!(percentile(&v, 1.0), 5.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn peak_memory_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
        }
    }
}
