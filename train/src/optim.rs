//! AdamW with decoupled weight decay and a state that can be saved (candle's keeps its moments
//! private), gradient clipping by global norm, and an exponential moving average of the weights.

use crate::candle::Params;
use crate::model::decays;
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to matrices only (see `model::decays`).
    pub weight_decay: f64,
    /// Global gradient norm above which gradients are scaled down; 0 disables clipping.
    pub clip_norm: f64,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Number of updates taken.
    pub step: u64,
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

/// What one update saw.
pub struct UpdateStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &Params) -> candle_core::Result<AdamW> {
        let zeros = || -> candle_core::Result<BTreeMap<String, Tensor>> {
            params
                .vars()
                .iter()
                .map(|(k, v)| Ok((k.clone(), v.as_tensor().zeros_like()?)))
                .collect()
        };
        Ok(AdamW { config, step: 0, m: zeros()?, v: zeros()? })
    }

    /// One update at learning rate `lr`. Fails, changing nothing, when a gradient is not finite.
    pub fn update(
        &mut self,
        params: &Params,
        grads: &GradStore,
        lr: f64,
    ) -> candle_core::Result<UpdateStats> {
        let mut sq = 0.0f64;
        let mut found = Vec::with_capacity(params.vars().len());
        for (name, var) in params.vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                found.push((name, var, g));
            }
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(candle_core::Error::Msg(format!("gradient norm is {grad_norm}")));
        }
        let c = &self.config;
        let clip = if c.clip_norm > 0.0 && grad_norm > c.clip_norm {
            c.clip_norm / grad_norm
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let (bias1, bias2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (name, var, g) in found {
            let g = (g * clip)?;
            let m = ((&self.m[name] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[name] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bias2)?.sqrt()? + c.eps)?;
            let mut delta = ((&m / bias1)? / denom)?;
            let w = var.as_tensor();
            if decays(name) && c.weight_decay > 0.0 {
                delta = (delta + (w * c.weight_decay)?)?;
            }
            var.set(&(w - (delta * lr)?)?)?;
            // Detached: gradients carry the step's whole graph, and a moment that kept it would
            // keep every step's graph alive.
            self.m.insert(name.clone(), m.detach());
            self.v.insert(name.clone(), v.detach());
        }
        Ok(UpdateStats { grad_norm })
    }
}

/// Exponential moving average of the weights, with the warm-up decay_k = min(target, (1+k)/(10+k))
/// so early averages are not dominated by the random initialization.
pub struct Ema {
    pub target: f64,
    pub weights: BTreeMap<String, Tensor>,
}

impl Ema {
    pub fn new(target: f64, params: &Params) -> candle_core::Result<Ema> {
        Ok(Ema { target, weights: params.snapshot()? })
    }

    /// Folds in the weights after update number `k` (1-based).
    pub fn update(&mut self, k: u64, params: &Params) -> candle_core::Result<()> {
        let decay = self.target.min((1.0 + k as f64) / (10.0 + k as f64));
        for (name, var) in params.vars() {
            let avg = &self.weights[name];
            // The arithmetic makes a new tensor (a bare `detach` of the weights would share their
            // storage); detaching the result drops the chain back to every earlier average.
            let next = ((avg * decay)? + (var.as_tensor().detach() * (1.0 - decay))?)?;
            self.weights.insert(name.clone(), next.detach());
        }
        Ok(())
    }
}
