//! The inverse of export: the network of an f32 ONNX file, as a `TrainedModel` a new training
//! run can start from (`chardiff train --init-from`). The file's graph must be exactly the one
//! this exporter writes for the given network size, so that no setting the graph does not show as
//! a weight shape (the activation, the attention scale) can differ unnoticed.

use crate::denoiser::denoiser_graph;
use crate::Error;
use candle_core::{Device, Tensor};
use chardiff_runtime::corpus::sha256_hex;
use chardiff_runtime::tract::Format;
use chardiff_runtime::{ModelSpec, Precision};
use chardiff_train::{ModelConfig, TrainedModel};
use prost::Message;
use std::collections::BTreeMap;
use std::path::Path;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{ModelProto, TensorProto};

/// The model in `path` (written by `chardiff export` at f32 for the network `config` describes)
/// and the SHA-256 of the file.
pub fn read_onnx_model(path: &Path, config: &ModelConfig) -> Result<(TrainedModel, String), Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let not_onnx = |why: String| Error::NotOnnx { path: path.into(), why };
    if Format::of(&bytes) == Format::Nnef {
        return Err(not_onnx("it is an NNEF archive; start from the ONNX file".into()));
    }
    let proto = ModelProto::decode(&bytes[..]).map_err(|e| not_onnx(e.to_string()))?;
    let props = proto.metadata_props.iter().map(|p| (p.key.as_str(), p.value.as_str()));
    let spec = ModelSpec::from_metadata(props).map_err(crate::ExportError::Spec)?;
    let foreign = |why: String| Error::Foreign { path: path.into(), why };
    if spec.precision != Precision::F32 {
        return Err(foreign(format!(
            "its weights are {}; training starts from f32 weights only (the f32 export of the same run)",
            spec.precision
        )));
    }
    let graph = proto.graph.as_ref().ok_or_else(|| foreign("it has no graph".into()))?;
    // Every f32 initializer: the weights and the graph's own constants (scales, position
    // tables), which regenerating the graph reads back too; a trainer takes the names it needs.
    let weights = graph
        .initializer
        .iter()
        .filter(|t| t.data_type == DataType::Float as i32)
        .map(|t| Ok((t.name.clone(), f32_tensor(t).map_err(foreign)?)))
        .collect::<Result<BTreeMap<_, _>, Error>>()?;
    let model = TrainedModel { spec, config: config.clone(), weights };
    let mismatch = |why: String| {
        foreign(format!(
            "{why}: it is not the network of {} (pass the --dim, --layers, --heads, --ffn, \
             --activation and --attention-bias it was trained with)",
            describe(config)
        ))
    };
    let expected =
        denoiser_graph(&model, Precision::F32, None).map_err(|e| mismatch(e.to_string()))?;
    if expected.graph.as_ref() != Some(graph) {
        return Err(mismatch("its graph differs from the one such a network exports".into()));
    }
    Ok((model, sha256_hex(&bytes)))
}

fn describe(c: &ModelConfig) -> String {
    format!(
        "dim {}, {} layers, {} heads, MLP {}, {:?} activation, {:?} attention bias",
        c.dim, c.layers, c.heads, c.ffn, c.activation, c.attention_bias
    )
    .to_lowercase()
}

fn f32_tensor(t: &TensorProto) -> Result<Tensor, String> {
    let data: Vec<f32> = if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    };
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    Tensor::from_vec(data, dims, &Device::Cpu)
        .map_err(|e| format!("its initializer `{}` is malformed: {e}", t.name))
}
