//! The tract backend: an exported ONNX denoiser goes load -> typed -> decluttered -> optimized ->
//! runnable once, and one `SimpleState` is reused for every denoising step.

use crate::denoiser::{io, BoxError, DenoiseInput, Denoiser};
use crate::spec::{ModelSpec, SpecError};
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not an ONNX model (the file does not parse as ONNX protobuf): {0}")]
    NotOnnx(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("the graph does not follow the chardiff I/O contract: {0}")]
    Contract(String),
    #[error("tract could not prepare the graph: {0}")]
    Tract(String),
}

/// A denoiser running an exported graph on the CPU with tract, f32.
pub struct TractDenoiser {
    spec: ModelSpec,
    state: TypedSimpleState,
}

impl TractDenoiser {
    pub fn load(path: &Path) -> Result<TractDenoiser, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        TractDenoiser::from_bytes(&bytes)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<TractDenoiser, LoadError> {
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| LoadError::NotOnnx(format!("{e:#}")))?;
        let spec = ModelSpec::from_metadata(
            proto
                .metadata_props
                .iter()
                .map(|p| (p.key.as_str(), p.value.as_str())),
        )?;
        check_contract(&proto, &spec)?;
        let tract_err = |e: TractError| LoadError::Tract(format!("{e:#}"));
        let plan = onnx
            .model_for_proto_model(&proto)
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(tract_err)?;
        let state = plan.spawn().map_err(tract_err)?;
        Ok(TractDenoiser { spec, state })
    }
}

fn check_contract(proto: &tract_onnx::pb::ModelProto, spec: &ModelSpec) -> Result<(), LoadError> {
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| LoadError::Contract("no graph".into()))?;
    let inputs: Vec<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    let expected = io::inputs(spec.conditioning);
    if inputs != expected {
        return Err(LoadError::Contract(format!(
            "inputs are {inputs:?}, expected {expected:?}"
        )));
    }
    if graph.output.first().map(|o| o.name.as_str()) != Some(io::X0) {
        return Err(LoadError::Contract(format!(
            "the first output must be `{}`",
            io::X0
        )));
    }
    Ok(())
}

impl Denoiser for TractDenoiser {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError> {
        let (b, l, k) = (input.batch, self.spec.window, self.spec.bits);
        let mut inputs: TVec<TValue> = tvec![
            Tensor::from_shape(&[b, l, k], input.x_t)?.into(),
            Tensor::from_shape(&[b, l, k], input.x_self)?.into(),
            Tensor::from_shape(&[b], input.t)?.into(),
        ];
        if self.spec.conditioning {
            let c = input
                .condition
                .ok_or("a conditional model needs `cond` and `cond_mask`")?;
            inputs.push(Tensor::from_shape(&[b, l, k], c.cond)?.into());
            inputs.push(Tensor::from_shape(&[b, l, 1], c.mask)?.into());
        }
        let outputs = self.state.run(inputs)?;
        let view = outputs[0].try_as_plain_ram()?;
        x0.copy_from_slice(view.as_slice::<f32>()?);
        Ok(())
    }
}
