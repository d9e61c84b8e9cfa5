//! Noise schedules: gamma(t), the share of signal power left at time t in [0, 1]
//! (x_t = sqrt(gamma) x_0 + sqrt(1 - gamma) eps). Training and sampling both call `gamma`.

use serde::{Deserialize, Serialize};
use std::f64::consts::FRAC_PI_2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Analog Bits' cosine schedule, cos^2(((t + ns) / (1 + ds)) pi/2) with ns = 2e-4 < ds = 2.5e-4,
    /// so gamma(1) stays above zero and the first step still sees the signal.
    Cosine,
    /// Diffusion-LM's 1 - sqrt(t + s), with t rescaled so gamma(1) > 0 (as written it turns
    /// negative for t > 1 - s and sampling from t = 1 gives NaN).
    Sqrt,
    /// gamma falls linearly from GAMMA_MAX to GAMMA_MIN.
    Linear,
}

const COSINE_NS: f64 = 2e-4;
const COSINE_DS: f64 = 2.5e-4;
const SQRT_S: f64 = 1e-4;
const GAMMA_MIN: f64 = 1e-4;
const GAMMA_MAX: f64 = 1.0 - 1e-4;

impl Schedule {
    /// gamma(t) in (0, 1), strictly decreasing; t is clamped to [0, 1].
    pub fn gamma(self, t: f64) -> f64 {
        let t = t.clamp(0.0, 1.0);
        match self {
            Schedule::Cosine => (((t + COSINE_NS) / (1.0 + COSINE_DS)) * FRAC_PI_2).cos().powi(2),
            Schedule::Sqrt => 1.0 - (SQRT_S + t * (1.0 - 2.0 * SQRT_S)).sqrt(),
            Schedule::Linear => GAMMA_MAX - (GAMMA_MAX - GAMMA_MIN) * t,
        }
    }

    pub const ALL: [Schedule; 3] = [Schedule::Cosine, Schedule::Sqrt, Schedule::Linear];
}

/// The forward process q(x_t | x_0) for one value: x_t = sqrt(gamma) x_0 + sqrt(1 - gamma) eps,
/// with eps ~ N(0, 1). Training batches, inpainting's known positions and the noise probes all
/// noise through this.
#[inline]
pub fn noised(x0: f32, eps: f32, gamma: f32) -> f32 {
    gamma.sqrt() * x0 + (1.0 - gamma).sqrt() * eps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_finite_in_range_and_strictly_decreasing() {
        for s in Schedule::ALL {
            let mut last = f64::INFINITY;
            for i in 0..=10_000 {
                let g = s.gamma(i as f64 / 10_000.0);
                assert!(g.is_finite() && g > 0.0 && g < 1.0, "{s:?} gamma({i}/1e4) = {g}");
                assert!(g < last, "{s:?} not decreasing at {i}/1e4");
                last = g;
            }
        }
    }

    #[test]
    fn cosine_keeps_signal_at_t_one_and_sqrt_is_stable_there() {
        assert!(Schedule::Cosine.gamma(1.0) > 1e-9);
        assert!(Schedule::Sqrt.gamma(1.0) > 0.0);
        assert!(Schedule::Sqrt.gamma(1.5) == Schedule::Sqrt.gamma(1.0));
    }
}
