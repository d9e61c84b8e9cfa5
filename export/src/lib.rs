//! chardiff-export: a trained checkpoint becomes one self-describing ONNX file: the denoiser
//! graph, its weights, and the model spec in `metadata_props` (or the same graph as tract's NNEF
//! archive, with the spec in its properties, for edge builds).

pub mod denoiser;
pub mod graph;

pub use denoiser::{denoiser_graph, ExportError};

use chardiff_runtime::tract::{onnx_to_nnef, Format, LoadError};
use chardiff_runtime::Precision;
use chardiff_train::checkpoint::{write_atomic, CheckpointError};
use chardiff_train::TrainedModel;
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

    #[error("cannot write {path}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// What an export wrote.
pub struct Summary {
    pub bytes: usize,
    pub parameters: usize,
    pub training_steps: u64,
}

/// Exports the run in `dir` (its EMA weights when it has them) to `out`, atomically.
pub fn export_run(
    dir: &Path,
    out: &Path,
    format: Format,
    precision: Precision,
) -> Result<Summary, Error> {
    let model = TrainedModel::load(dir)?;
    let onnx = to_onnx_bytes(&model, precision)?;
    let bytes = match format {
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

/// The model as the bytes of an ONNX file.
pub fn to_onnx_bytes(model: &TrainedModel, precision: Precision) -> Result<Vec<u8>, ExportError> {
    Ok(denoiser_graph(model, precision)?.encode_to_vec())
}
