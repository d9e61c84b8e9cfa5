//! The inverse of export: the network of an f32 ONNX file, as a `TrainedModel` a new training
//! run can start from (`chardiff train --init-from`). The file shows its network's size in its
//! weights' names and shapes; what no weight shows (the activation, and the head count when no
//! attention bias has a per-head axis) is found by exporting each candidate and keeping the one
//! whose graph is exactly the file's, so nothing can differ unnoticed.

use crate::denoiser::denoiser_graph;
use crate::Error;
use candle_core::{Device, Tensor};
use chardiff_runtime::corpus::sha256_hex;
use chardiff_runtime::tract::Format;
use chardiff_runtime::{ModelSpec, Precision};
use chardiff_train::{Activation, AttentionBias, ModelConfig, TrainedModel};
use prost::Message;
use std::collections::BTreeMap;
use std::path::Path;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{ModelProto, TensorProto};

/// The model in `path` (written by `chardiff export` at f32), its network read from the file,
/// and the SHA-256 of the file.
pub fn read_onnx_model(path: &Path) -> Result<(TrainedModel, String), Error> {
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
    let shown = network_shown_by(&weights).map_err(foreign)?;
    let mut model = TrainedModel { spec, config: shown.clone(), weights };
    for candidate in candidates(&shown) {
        model.config = candidate;
        if denoiser_graph(&model, Precision::F32, None).ok().and_then(|p| p.graph).as_ref()
            == Some(graph)
        {
            return Ok((model, sha256_hex(&bytes)));
        }
    }
    Err(foreign(format!(
        "its graph is not one this exporter writes for a network of its weights' sizes (dim {}, \
         {} layers, MLP {}, {:?} attention bias) with any head count and activation: another \
         version wrote it, or it was edited",
        shown.dim, shown.layers, shown.ffn, shown.attention_bias
    )))
}

/// What the weights' names and shapes say: width, depth, MLP width, attention bias, and the
/// head count where a bias has one row per head (otherwise 1, for `candidates` to vary).
fn network_shown_by(weights: &BTreeMap<String, Tensor>) -> Result<ModelConfig, String> {
    let size = |name: &str, axis: usize| {
        let w = weights.get(name).ok_or(format!("it has no weight `{name}`"))?;
        w.dims().get(axis).copied().ok_or(format!("its weight `{name}` has no axis {axis}"))
    };
    let dim = size("pos_emb", 1)?;
    let layers = (0..).take_while(|i| weights.contains_key(&format!("blocks.{i}.ln1.w"))).count();
    if layers == 0 {
        return Err("it has no Transformer blocks (`blocks.0.ln1.w`)".into());
    }
    let ffn = size("blocks.0.mlp.up.w", 1)?;
    let (attention_bias, heads) = if let Ok(heads) = size("blocks.0.attn.rel_bias", 0) {
        (AttentionBias::Relative, heads)
    } else if let Ok(heads) = size("blocks.0.attn.bias", 0) {
        (AttentionBias::Full, heads)
    } else {
        (AttentionBias::None, 1)
    };
    Ok(ModelConfig { dim, layers, heads, ffn, activation: Activation::Silu, attention_bias })
}

/// The networks the weights allow: either activation, and with no per-head bias every head
/// count that divides the width.
fn candidates(shown: &ModelConfig) -> Vec<ModelConfig> {
    let heads: Vec<usize> = match shown.attention_bias {
        AttentionBias::None => (1..=shown.dim).filter(|h| shown.dim.is_multiple_of(*h)).collect(),
        _ => vec![shown.heads],
    };
    let activations = [Activation::Silu, Activation::Gelu];
    heads
        .iter()
        .flat_map(|&heads| {
            activations.map(|activation| ModelConfig { heads, activation, ..shown.clone() })
        })
        .filter(|config| config.validate().is_ok())
        .collect()
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
