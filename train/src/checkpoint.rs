//! A run directory: `spec.json` (the model spec), `model.json` (network size), `train.json`
//! (training settings), `checkpoint.safetensors` (weights, EMA weights, optimizer state, step,
//! generator position) and `metrics.jsonl`. Every file is written under a temporary name and
//! renamed, so a killed run leaves the previous checkpoint intact.

use crate::model::ModelConfig;
use candle_core::{Device, Tensor};
use chardiff_runtime::ModelSpec;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const SPEC_FILE: &str = "spec.json";
pub const MODEL_FILE: &str = "model.json";
pub const TRAIN_FILE: &str = "train.json";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Held by the trainer working in a run (`Trainer` refuses a second one).
pub const LOCK_FILE: &str = "train.lock";

/// Tensor-name prefixes inside the checkpoint file.
pub const PARAMS: &str = "params/";
pub const EMA: &str = "ema/";
pub const ADAM_M: &str = "adam_m/";
pub const ADAM_V: &str = "adam_v/";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{dir} is not a chardiff run directory: {file} is missing")]
    Missing { dir: PathBuf, file: &'static str },
    #[error("cannot read or write {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

pub use chardiff_runtime::files::write_atomic;

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), CheckpointError> {
    let text = serde_json::to_string_pretty(value).expect("settings always serialize");
    write_atomic(path, text.as_bytes())
        .map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })
}

pub fn read_json<T: DeserializeOwned>(
    dir: &Path,
    file: &'static str,
) -> Result<T, CheckpointError> {
    let path = dir.join(file);
    let text = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CheckpointError::Missing { dir: dir.to_path_buf(), file })
        }
        other => other.map_err(|source| CheckpointError::Io { path: path.clone(), source })?,
    };
    serde_json::from_str(&text)
        .map_err(|e| CheckpointError::Invalid { path, message: e.to_string() })
}

/// The saved state of a run.
pub struct Checkpoint {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

impl Checkpoint {
    pub fn save(&self, dir: &Path) -> Result<(), CheckpointError> {
        let path = dir.join(CHECKPOINT_FILE);
        let invalid = |e: safetensors::SafeTensorError| CheckpointError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        };
        let bytes =
            safetensors::serialize(&self.tensors, Some(self.metadata.clone())).map_err(invalid)?;
        write_atomic(&path, &bytes)
            .map_err(|source| CheckpointError::Io { path: path.clone(), source })
    }

    pub fn load(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let path = dir.join(CHECKPOINT_FILE);
        let bytes = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::Missing {
                    dir: dir.to_path_buf(),
                    file: CHECKPOINT_FILE,
                })
            }
            other => other.map_err(|source| CheckpointError::Io { path: path.clone(), source })?,
        };
        let invalid = |message: String| CheckpointError::Invalid { path: path.clone(), message };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| invalid(e.to_string()))?
            .into_iter()
            .collect();
        Ok(Checkpoint { tensors, metadata })
    }

    /// The tensors under one prefix, with the prefix removed.
    pub fn group(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, t)| Some((k.strip_prefix(prefix)?.to_string(), t.clone())))
            .collect()
    }
}

/// What inference needs from a run directory: the spec, the network size and the weights to ship
/// (the EMA weights when the run kept them).
pub struct TrainedModel {
    pub spec: ModelSpec,
    pub config: ModelConfig,
    pub weights: BTreeMap<String, Tensor>,
}

impl TrainedModel {
    pub fn load(dir: &Path) -> Result<TrainedModel, CheckpointError> {
        let spec: ModelSpec = read_json(dir, SPEC_FILE)?;
        let config: ModelConfig = read_json(dir, MODEL_FILE)?;
        let checkpoint = Checkpoint::load(dir)?;
        let ema = checkpoint.group(EMA);
        let weights = if ema.is_empty() { checkpoint.group(PARAMS) } else { ema };
        if weights.is_empty() {
            return Err(CheckpointError::Invalid {
                path: dir.join(CHECKPOINT_FILE),
                message: "it holds no model weights".into(),
            });
        }
        Ok(TrainedModel { spec, config, weights })
    }

    pub fn denoiser(self) -> crate::candle::CandleDenoiser {
        crate::candle::CandleDenoiser {
            spec: self.spec,
            config: self.config,
            weights: self.weights,
        }
    }
}
