//! chardiff-export: a trained checkpoint becomes one self-describing ONNX file: the denoiser
//! graph, its weights, and the model spec in `metadata_props` (or the same graph as tract's NNEF
//! archive, with the spec in its properties, for edge builds).

pub mod denoiser;
pub mod graph;
pub mod quantize;

pub use denoiser::{denoiser_graph, ExportError};

use chardiff_runtime::corpus::{read_text, Corpus, CorpusError};
use chardiff_runtime::sampler::StepRule;
use chardiff_runtime::tract::{onnx_to_nnef, Format, LoadError};
use chardiff_runtime::Precision;
use chardiff_train::calibrate::{calibrate, ActivationRanges, CalibrationError, CALIBRATION_FILE};
use chardiff_train::checkpoint::{read_json, write_atomic, CheckpointError, TRAIN_FILE};
use chardiff_train::{TrainConfig, TrainedModel};
use prost::Message;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("converting to NNEF")]
    Nnef(#[from] LoadError),
    #[error("calibrating int8")]
    Calibration(#[from] CalibrationError),
    #[error("reading the calibration text")]
    CalibrationText(#[from] CorpusError),
    #[error("{0} has no {CALIBRATION_FILE} (its run predates int8 export) and its training corpus is not where train.json says: pass --calibration FILE, e.g. the training corpus")]
    NoCalibration(PathBuf),

    #[error("cannot write {path}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// What an export wrote.
pub struct Summary {
    pub bytes: usize,
    pub parameters: usize,
    pub training_steps: u64,
}

/// How to write a model file.
#[derive(Clone, Debug)]
pub struct Options {
    pub format: Format,
    pub precision: Precision,
    /// Sampling steps, td, step rule and guidance the file recommends, when measured after training
    /// (`chardiff eval`) rather than the run's settings.
    pub recommended_steps: Option<usize>,
    pub recommended_td: Option<f32>,
    pub recommended_sampler: Option<StepRule>,
    pub recommended_guidance: Option<f32>,
    /// int8: the text whose windows calibrate the activation scales [default: the run's
    /// calibration.txt, else its training corpus], preprocessed as the run's corpus was.
    pub calibration: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            format: Format::Onnx,
            precision: Precision::F32,
            recommended_steps: None,
            recommended_td: None,
            recommended_sampler: None,
            recommended_guidance: None,
            calibration: None,
        }
    }
}

/// Exports the run in `dir` (its EMA weights when it has them) to `out`, atomically.
pub fn export_run(dir: &Path, out: &Path, options: Options) -> Result<Summary, Error> {
    let mut model = TrainedModel::load(dir)?;
    let spec = &mut model.spec;
    spec.recommended_steps = options.recommended_steps.unwrap_or(spec.recommended_steps);
    spec.recommended_td = options.recommended_td.unwrap_or(spec.recommended_td);
    spec.recommended_sampler = options.recommended_sampler.unwrap_or(spec.recommended_sampler);
    spec.recommended_guidance = options.recommended_guidance.unwrap_or(spec.recommended_guidance);
    spec.validate().map_err(|e| Error::Export(ExportError::Spec(e)))?;
    let ranges = match options.precision {
        Precision::Int8 => Some(calibrate(&model, &calibration_text(dir, &options)?)?),
        _ => None,
    };
    let onnx = to_onnx_bytes(&model, options.precision, ranges.as_ref())?;
    let bytes = match options.format {
        Format::Onnx => onnx,
        Format::Nnef => onnx_to_nnef(&onnx)?,
    };
    write_atomic(out, &bytes).map_err(|source| Error::Write { path: out.to_path_buf(), source })?;
    Ok(Summary {
        bytes: bytes.len(),
        parameters: model.weights.values().map(|t| t.elem_count()).sum(),
        training_steps: model.spec.provenance.steps,
    })
}

/// The model as the bytes of an ONNX file (int8 needs `ranges`).
pub fn to_onnx_bytes(
    model: &TrainedModel,
    precision: Precision,
    ranges: Option<&ActivationRanges>,
) -> Result<Vec<u8>, ExportError> {
    Ok(denoiser_graph(model, precision, ranges)?.encode_to_vec())
}

/// The text int8 calibration runs on (see `Options::calibration`).
fn calibration_text(dir: &Path, options: &Options) -> Result<Vec<u8>, Error> {
    // A run's settings say how its corpus was preprocessed; a bare checkpoint has none.
    let config: Option<TrainConfig> = match read_json(dir, TRAIN_FILE) {
        Ok(config) => Some(config),
        Err(CheckpointError::Missing { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(path) = &options.calibration {
        let preprocess = config.map_or(Default::default(), |c| c.preprocess);
        return Ok(read_text(path, preprocess)?);
    }
    // Bytes of the run's preprocessed train split (pieces may cut a UTF-8 sequence: read raw).
    let sample = dir.join(CALIBRATION_FILE);
    if sample.exists() {
        return std::fs::read(&sample)
            .map_err(|source| Error::CalibrationText(CorpusError::Io { path: sample, source }));
    }
    match config {
        Some(c) if c.corpus.exists() => Ok(Corpus::load(&c.corpus, c.preprocess, c.window)?.train),
        _ => Err(Error::NoCalibration(dir.to_path_buf())),
    }
}
