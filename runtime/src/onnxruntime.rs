//! onnxruntime on the same ONNX file, for comparison only (`chardiff bench --ort`, the criterion
//! benches): chardiff's runtime is tract. The library is loaded at run time from
//! `ORT_DYLIB_PATH`; nothing is downloaded or linked at build time.

use crate::denoiser::{io, BoxError, DenoiseInput, Denoiser, NO_LOGITS};
use crate::spec::{Head, ModelSpec, SpecError};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

/// The environment variable naming onnxruntime's shared library.
pub const DYLIB_VAR: &str = "ORT_DYLIB_PATH";

#[derive(Debug, thiserror::Error)]
pub enum OrtError {
    #[error(
        "onnxruntime is loaded at run time: set {DYLIB_VAR} to its shared library (`pip install \
         onnxruntime` puts it at .../site-packages/onnxruntime/capi/libonnxruntime.so.*)"
    )]
    NoLibrary,
    #[error("onnxruntime: {0}")]
    Ort(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
}

fn ort_error(e: impl std::fmt::Display) -> OrtError {
    OrtError::Ort(e.to_string())
}

/// A denoiser running an exported ONNX file with onnxruntime on the CPU, f32.
pub struct OrtDenoiser {
    spec: ModelSpec,
    session: Session,
}

impl OrtDenoiser {
    /// All graph optimizations, `threads` threads inside each operator (onnxruntime's own
    /// parallelism), one session for every batch size.
    pub fn from_bytes(onnx: &[u8], threads: usize) -> Result<OrtDenoiser, OrtError> {
        let library = std::env::var_os(DYLIB_VAR).ok_or(OrtError::NoLibrary)?;
        let environment = ort::init_from(library).map_err(ort_error)?.build().map_err(ort_error)?;
        let session = (|| -> ort::Result<Session> {
            Session::builder(&environment)?
                .with_optimization_level(GraphOptimizationLevel::All)?
                .with_intra_threads(threads.max(1))?
                .with_inter_threads(1)?
                .commit_from_memory(onnx)
        })()
        .map_err(ort_error)?;
        let metadata = session.metadata().map_err(ort_error)?;
        let keys = metadata.custom_keys().map_err(ort_error)?;
        let props: Vec<(String, String)> = keys
            .into_iter()
            .filter_map(|k| Some((metadata.custom(&k)?, k)))
            .map(|(v, k)| (k, v))
            .collect();
        let spec = ModelSpec::from_metadata(props.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
        drop(metadata);
        Ok(OrtDenoiser { spec, session })
    }
}

impl Denoiser for OrtDenoiser {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError> {
        self.run_output(input, io::X0, x0)
    }

    fn logits(&mut self, input: &DenoiseInput<'_>, logits: &mut [f32]) -> Result<(), BoxError> {
        if self.spec.head != Head::Softmax {
            return Err(NO_LOGITS.into());
        }
        self.run_output(input, io::LOGITS, logits)
    }
}

impl OrtDenoiser {
    /// One call of the network, copying its output `name` into `out`.
    fn run_output(
        &mut self,
        input: &DenoiseInput<'_>,
        name: &str,
        out: &mut [f32],
    ) -> Result<(), BoxError> {
        let inputs = input
            .graph_inputs(&self.spec)?
            .into_iter()
            .map(|i| {
                Ok((i.name, TensorRef::from_array_view((i.shape().to_vec(), i.data))?.into_dyn()))
            })
            .collect::<Result<Vec<_>, ort::Error>>()?;
        let outputs = self.session.run(inputs)?;
        let (_, data) = outputs[name].try_extract_tensor::<f32>()?;
        out.copy_from_slice(data);
        Ok(())
    }
}
