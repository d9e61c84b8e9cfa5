//! The tract backend: an exported ONNX denoiser goes load -> typed -> decluttered -> prepared by
//! a tract runtime (CPU: optimized plan; CUDA: the same graph translated to GPU kernels) once, and
//! one state is reused for every denoising step.

use crate::denoiser::{io, BoxError, DenoiseInput, Denoiser};
use crate::spec::{ModelSpec, SpecError};
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{runtime_for_name, Runnable, State};

#[cfg(feature = "cuda")]
use tract_cuda as _; // links the "cuda" runtime into tract's registry

/// Where the network runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
    /// CUDA when it is usable, otherwise the CPU (and the reason is kept).
    Auto,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read model file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not an ONNX model (the file does not parse as ONNX protobuf): {0}")]
    NotOnnx(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("the graph does not follow the chardiff I/O contract: {0}")]
    Contract(String),
    #[error("tract could not prepare the graph: {0}")]
    Tract(String),
    #[error("this chardiff was built without CUDA support: rebuild with `cargo build --release --features cuda`")]
    CudaNotBuilt,
    #[error("CUDA is not usable here: {0}")]
    Cuda(String),
}

/// A denoiser running an exported graph with tract, f32, on the CPU or a GPU.
pub struct TractDenoiser {
    spec: ModelSpec,
    state: Box<dyn State>,
    runnable: Box<dyn Runnable>,
    device: Device,
    /// Why `Device::Auto` fell back to the CPU.
    fallback: Option<String>,
}

impl TractDenoiser {
    pub fn load(path: &Path) -> Result<TractDenoiser, LoadError> {
        TractDenoiser::load_on(path, Device::Cpu)
    }

    pub fn load_on(path: &Path, device: Device) -> Result<TractDenoiser, LoadError> {
        let bytes = std::fs::read(path)
            .map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
        TractDenoiser::from_bytes_on(&bytes, device)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<TractDenoiser, LoadError> {
        TractDenoiser::from_bytes_on(bytes, Device::Cpu)
    }

    pub fn from_bytes_on(bytes: &[u8], device: Device) -> Result<TractDenoiser, LoadError> {
        let onnx = tract_onnx::onnx();
        let proto = onnx
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| LoadError::NotOnnx(format!("{e:#}")))?;
        let spec = ModelSpec::from_metadata(
            proto.metadata_props.iter().map(|p| (p.key.as_str(), p.value.as_str())),
        )?;
        check_contract(&proto, &spec)?;
        let tract_err = |e: TractError| LoadError::Tract(format!("{e:#}"));
        let model = onnx
            .model_for_proto_model(&proto)
            .and_then(|m| m.into_typed())
            .and_then(|m| m.into_decluttered())
            .map_err(tract_err)?;
        let (runnable, device, fallback) = match device {
            Device::Cpu => (prepare_cpu(model)?, Device::Cpu, None),
            Device::Cuda => (prepare_cuda(model)?, Device::Cuda, None),
            Device::Auto => match prepare_cuda(model.clone()) {
                Ok(runnable) => (runnable, Device::Cuda, None),
                Err(why) => (prepare_cpu(model)?, Device::Cpu, Some(why.to_string())),
            },
        };
        let state = runnable.spawn().map_err(tract_err)?;
        Ok(TractDenoiser { spec, state, runnable, device, fallback })
    }

    /// Where the network actually runs.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Why `Device::Auto` runs on the CPU, when it does.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Operators of a CUDA plan that run on the CPU (with a sync on each side): everything but
    /// GPU kernels, device syncs, inputs and constants. Empty for a CPU plan.
    pub fn cpu_fallbacks(&self) -> Vec<String> {
        if self.device != Device::Cuda {
            return vec![];
        }
        let on_gpu = |op: &str| {
            ["Cuda", "Gpu", "DeviceSync", "Source", "Const"].iter().any(|p| op.starts_with(p))
        };
        self.plan_ops().into_iter().map(|(op, _)| op).filter(|op| !on_gpu(op)).collect()
    }

    /// Operator names of the prepared plan with how many nodes use each: on CUDA, the ones
    /// without a GPU prefix run on the CPU.
    pub fn plan_ops(&self) -> Vec<(String, usize)> {
        let mut counts = std::collections::BTreeMap::new();
        if let Some(model) = self.runnable.typed_model() {
            for node in model.nodes() {
                *counts.entry(node.op.name().to_string()).or_insert(0) += 1;
            }
        }
        counts.into_iter().collect()
    }
}

fn prepare_cpu(model: TypedModel) -> Result<Box<dyn Runnable>, LoadError> {
    let cpu = runtime_for_name("cpu").ok().flatten().expect("tract always has its cpu runtime");
    cpu.prepare(model).map_err(|e| LoadError::Tract(format!("{e:#}")))
}

#[cfg(not(feature = "cuda"))]
fn prepare_cuda(_: TypedModel) -> Result<Box<dyn Runnable>, LoadError> {
    Err(LoadError::CudaNotBuilt)
}

#[cfg(feature = "cuda")]
fn prepare_cuda(model: TypedModel) -> Result<Box<dyn Runnable>, LoadError> {
    let cuda_err = |e: TractError| LoadError::Cuda(format!("{e:#}"));
    let runtime = runtime_for_name("cuda").map_err(cuda_err)?.ok_or(LoadError::CudaNotBuilt)?;
    // NVRTC compiles tract's kernels at run time against the toolkit headers: say so up front
    // rather than fail deep inside the first kernel compile.
    cuda::headers()?;
    let prepared =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.prepare(model)));
    match prepared {
        Ok(result) => result.map_err(cuda_err),
        Err(_) => Err(LoadError::Cuda("tract-cuda failed while preparing the graph".into())),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::LoadError;
    use std::path::PathBuf;

    /// The CUDA toolkit include directory holding `cuda_fp16.h`, found as tract-cuda finds it:
    /// `CUDA_HOME`, then /usr/local/cuda, then the directory above `nvcc` on the PATH.
    pub fn headers() -> Result<PathBuf, LoadError> {
        let mut roots: Vec<PathBuf> =
            std::env::var_os("CUDA_HOME").map(PathBuf::from).into_iter().collect();
        roots.push(PathBuf::from("/usr/local/cuda"));
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("nvcc").exists() {
                    roots.extend(dir.parent().map(PathBuf::from));
                }
            }
        }
        for root in &roots {
            let mut candidates = vec![root.join("include")];
            if let Ok(targets) = std::fs::read_dir(root.join("targets")) {
                candidates.extend(targets.flatten().map(|t| t.path().join("include")));
            }
            if let Some(found) = candidates.into_iter().find(|d| d.join("cuda_fp16.h").exists()) {
                return Ok(found);
            }
        }
        Err(LoadError::Cuda(format!(
            "the CUDA toolkit headers (cuda_fp16.h) were not found under {roots:?}: install the CUDA \
             toolkit headers and set CUDA_HOME to its root (tract compiles its GPU kernels with NVRTC)"
        )))
    }
}

fn check_contract(proto: &tract_onnx::pb::ModelProto, spec: &ModelSpec) -> Result<(), LoadError> {
    let graph = proto.graph.as_ref().ok_or_else(|| LoadError::Contract("no graph".into()))?;
    let inputs: Vec<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
    let expected = io::inputs(spec.conditioning);
    if inputs != expected {
        return Err(LoadError::Contract(format!("inputs are {inputs:?}, expected {expected:?}")));
    }
    if graph.output.first().map(|o| o.name.as_str()) != Some(io::X0) {
        return Err(LoadError::Contract(format!("the first output must be `{}`", io::X0)));
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
            let c = input.condition.ok_or("a conditional model needs `cond` and `cond_mask`")?;
            inputs.push(Tensor::from_shape(&[b, l, k], c.cond)?.into());
            inputs.push(Tensor::from_shape(&[b, l, 1], c.mask)?.into());
        }
        let outputs = self.state.run(inputs)?;
        let view = outputs[0].try_as_plain_ram()?;
        x0.copy_from_slice(view.as_slice::<f32>()?);
        Ok(())
    }
}
