//! Calibration for int8 export: the range of values each weight matrix's product sees at its
//! input, measured by running the trained network (candle, f32) on corpus windows noised across
//! the whole t range, as sampling sees them: a first pass without self-conditioning, a second
//! with the first's x0 estimate, and, for conditional models, the training's mix of known spans.

use crate::candle::{CandleOps, Frozen};
use crate::checkpoint::TrainedModel;
use crate::model;
use crate::trainer::{make_batch, TimeSampling, TrainError};
use candle_core::{DType, Tensor, TensorId};
use chardiff_runtime::corpus::spaced_windows;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// The file a run directory keeps its calibration text in (a sample of the training corpus).
pub const CALIBRATION_FILE: &str = "calibration.txt";

/// Windows calibration runs the network on (each twice: without and with self-conditioning).
pub const CALIBRATION_WINDOWS: usize = 256;
const BATCH: usize = 32;

/// Whether a parameter is a weight matrix the network multiplies activations by (`linear`):
/// what int8 export quantizes.
pub fn is_matmul_weight(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && name.ends_with(".w")
}

/// Smallest and largest value at the input of each weight's matrix product, by weight name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ActivationRanges(pub BTreeMap<String, (f32, f32)>);

/// Watches a candle forward pass (`CandleOps::probe`): which tensors are weight matrices, and
/// the range of every left operand multiplied by one.
#[derive(Default)]
pub struct Probe {
    weights: HashMap<TensorId, String>,
    pub ranges: ActivationRanges,
}

impl Probe {
    pub fn param(&mut self, name: &str, value: &Tensor) {
        if is_matmul_weight(name, value.dims()) {
            self.weights.insert(value.id(), name.to_string());
        }
    }

    pub fn matmul(&mut self, a: &Tensor, b: &Tensor) -> candle_core::Result<()> {
        let Some(name) = self.weights.get(&b.id()) else { return Ok(()) };
        let values = a.flatten_all()?.to_dtype(DType::F32)?;
        let (lo, hi) = (values.min(0)?.to_scalar::<f32>()?, values.max(0)?.to_scalar::<f32>()?);
        let range = self.ranges.0.entry(name.clone()).or_insert((lo, hi));
        *range = (range.0.min(lo), range.1.max(hi));
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error(
        "the calibration text has {found} characters of the model's charset, calibration needs \
         at least {needed} (one window)"
    )]
    TooShort { found: usize, needed: usize },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The activation ranges of `model` over windows of `text` (characters outside the model's
/// charset are left out).
pub fn calibrate(model: &TrainedModel, text: &[u8]) -> Result<ActivationRanges, CalibrationError> {
    let spec = &model.spec;
    let known: Vec<u8> = text.iter().copied().filter(|&c| spec.charset.contains(c)).collect();
    if known.len() < spec.window {
        return Err(CalibrationError::TooShort { found: known.len(), needed: spec.window });
    }
    let windows = spaced_windows(&known, spec.window, CALIBRATION_WINDOWS);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut probe = Probe::default();
    let b = f64::from(spec.bit_scale);
    let passes = if spec.self_conditioning { 2 } else { 1 };
    for chunk in windows.chunks(BATCH) {
        let batch = make_batch(
            spec,
            &chunk.concat(),
            &vec![false; chunk.len()],
            TimeSampling::Uniform,
            DType::F32,
            &mut rng,
        )?;
        let mut x_self = batch.x0.zeros_like()?;
        for _pass in 0..passes {
            let mut params = Frozen(&model.weights);
            let mut ops =
                CandleOps { probe: Some(&mut probe), ..CandleOps::new(&mut params, DType::F32) };
            let inputs = model::Inputs {
                x_t: batch.x_t.clone(),
                x_self,
                t: batch.t.clone(),
                condition: batch.condition.clone(),
            };
            let out = model::forward(&mut ops, &model.config, spec, inputs)?;
            x_self = out.x0.clamp(-b, b)?;
        }
    }
    Ok(probe.ranges)
}
