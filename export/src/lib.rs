//! chardiff-export: a trained checkpoint becomes one self-describing ONNX file: the denoiser
//! graph, its weights, and the model spec in `metadata_props` (or the same graph as tract's NNEF
//! archive, with the spec in its properties, for edge builds).

pub mod denoiser;
pub mod graph;
pub mod import;
pub mod quantize;

pub use denoiser::{denoiser_graph, ExportError};
pub use import::read_onnx_model;

use chardiff_runtime::corpus::{read_text, Corpus, CorpusError};
use chardiff_runtime::sampler::{GuidedOutput, StepRule};
use chardiff_runtime::spec::METADATA_PREFIX;
use chardiff_runtime::tract::{onnx_to_nnef, Format, LoadError};
use chardiff_runtime::{ModelSpec, Precision, SpecError};
use chardiff_train::calibrate::{calibrate, ActivationRanges, CalibrationError, CALIBRATION_FILE};
use chardiff_train::checkpoint::{read_json, write_atomic, CheckpointError, TRAIN_FILE};
use chardiff_train::{TrainConfig, TrainedModel};
use prost::Message;
use std::path::{Path, PathBuf};
use tract_onnx::pb::{ModelProto, StringStringEntryProto};

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

    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not an ONNX file ({why})")]
    NotOnnx { path: PathBuf, why: String },
    #[error("{path} cannot be read back as a trained network: {why}")]
    Foreign { path: PathBuf, why: String },
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
    /// Sampling settings measured after training (`chardiff eval`) rather than the run's.
    pub recommended: Recommendation,
    /// int8: the text whose windows calibrate the activation scales [default: the run's
    /// calibration.txt, else its training corpus], preprocessed as the run's corpus was.
    pub calibration: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            format: Format::Onnx,
            precision: Precision::F32,
            recommended: Recommendation::default(),
            calibration: None,
        }
    }
}

/// The sampling settings a model file recommends; `None` keeps the one it has.
#[derive(Clone, Debug, Default)]
pub struct Recommendation {
    pub steps: Option<usize>,
    pub td: Option<f32>,
    /// Free samples' own td (`ModelSpec::recommended_free_td`).
    pub free_td: Option<f32>,
    pub sampler: Option<StepRule>,
    pub guidance: Option<f32>,
    pub warp: Option<f32>,
    pub self_guidance: Option<f32>,
    pub self_guidance_on: Option<GuidedOutput>,
    pub temperature: Option<f32>,
    pub refine: Option<usize>,
}

impl Recommendation {
    /// Writes the settings into `spec` and checks them.
    pub fn apply(&self, spec: &mut ModelSpec) -> Result<(), SpecError> {
        spec.recommended_steps = self.steps.unwrap_or(spec.recommended_steps);
        spec.recommended_td = self.td.unwrap_or(spec.recommended_td);
        spec.recommended_free_td = self.free_td.or(spec.recommended_free_td);
        spec.recommended_sampler = self.sampler.unwrap_or(spec.recommended_sampler);
        spec.recommended_guidance = self.guidance.unwrap_or(spec.recommended_guidance);
        spec.recommended_warp = self.warp.unwrap_or(spec.recommended_warp);
        spec.recommended_self_guidance =
            self.self_guidance.unwrap_or(spec.recommended_self_guidance);
        spec.recommended_self_guidance_on =
            self.self_guidance_on.unwrap_or(spec.recommended_self_guidance_on);
        spec.recommended_temperature = self.temperature.unwrap_or(spec.recommended_temperature);
        spec.recommended_refine = self.refine.unwrap_or(spec.recommended_refine);
        spec.validate()
    }
}

/// Exports the run in `dir` (its EMA weights when it has them) to `out`, atomically.
pub fn export_run(dir: &Path, out: &Path, options: Options) -> Result<Summary, Error> {
    let mut model = TrainedModel::load(dir)?;
    options.recommended.apply(&mut model.spec).map_err(ExportError::Spec)?;
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

/// Rewrites the sampling settings an exported ONNX file recommends, leaving its network as it
/// is (for an NNEF archive, convert the rewritten ONNX file again). Returns the new spec.
pub fn retune(model: &Path, out: &Path, recommended: &Recommendation) -> Result<ModelSpec, Error> {
    let read = |source| Error::Read { path: model.to_path_buf(), source };
    let bytes = std::fs::read(model).map_err(read)?;
    let not_onnx = |why: String| Error::NotOnnx { path: model.to_path_buf(), why };
    if Format::of(&bytes) == Format::Nnef {
        return Err(not_onnx(
            "it is an NNEF archive; settings can be rewritten in ONNX files only (convert to \
             NNEF afterwards)"
                .into(),
        ));
    }
    let mut proto = ModelProto::decode(&bytes[..]).map_err(|e| not_onnx(e.to_string()))?;
    let props = proto.metadata_props.iter().map(|p| (p.key.as_str(), p.value.as_str()));
    let mut spec = ModelSpec::from_metadata(props).map_err(ExportError::Spec)?;
    recommended.apply(&mut spec).map_err(ExportError::Spec)?;
    // Other keys (a producer's own) stay; the spec's are written anew.
    proto.metadata_props.retain(|p| !p.key.starts_with(METADATA_PREFIX));
    proto.metadata_props.extend(
        spec.to_metadata().into_iter().map(|(key, value)| StringStringEntryProto { key, value }),
    );
    write_atomic(out, &proto.encode_to_vec())
        .map_err(|source| Error::Write { path: out.to_path_buf(), source })?;
    Ok(spec)
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
