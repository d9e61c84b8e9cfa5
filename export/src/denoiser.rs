//! The denoiser graph: `chardiff_train::model::forward` traced through `OnnxOps`, which writes
//! one ONNX node (or two) per operation, with the trained weights as initializers.

use crate::graph::{attr_float, attr_int, attr_ints, attr_string, Dim, GraphBuilder};
use crate::quantize::{quantize_columns, ActivationQuant};
use chardiff_runtime::denoiser::io;
use chardiff_runtime::{Head, ModelSpec, Precision};
use chardiff_train::calibrate::{is_matmul_weight, ActivationRanges};
use chardiff_train::model::{self, Init, Ops, LN_EPS};
use chardiff_train::TrainedModel;
use std::collections::BTreeMap;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::ModelProto;

/// Weight matrices whose products stay f32 in int8 files: the head's logits feed a softmax, and
/// a sharp softmax turns a small logit error into a large change of the expected bits (int8
/// moved x0 by up to 0.28 with it quantized; it is ~5% of a step's arithmetic).
const KEPT_F32: &[&str] = &["head.w"];

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the checkpoint lacks the parameter `{0}` the model needs")]
    MissingParam(String),
    #[error("parameter `{name}` has shape {found:?}, the model needs {expected:?}")]
    Shape { name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error(transparent)]
    Spec(#[from] chardiff_runtime::SpecError),
    #[error("cannot read the weights: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("int8 export needs activation ranges: calibrate the model first")]
    NeedsCalibration,
    #[error("the calibration has no activation range for `{0}`: it was made for another model")]
    Uncalibrated(String),
}

/// Writes each operation of the architecture as ONNX nodes; tensors are value names.
struct OnnxOps<'a> {
    g: GraphBuilder,
    weights: &'a BTreeMap<String, candle_core::Tensor>,
    precision: Precision,
    /// Index tensors already written (every block gathers with the same indices).
    indices: BTreeMap<Vec<usize>, String>,
    /// int8: the calibrated input range of each weight matrix's product.
    ranges: Option<&'a ActivationRanges>,
    /// int8: weight matrices read but not written yet (their product writes them, in int8).
    deferred: BTreeMap<String, (Vec<f32>, [usize; 2])>,
}

impl OnnxOps<'_> {
    fn scalar(&mut self, name: &str, v: f32) -> String {
        self.g.initializer_f32(name, &[], &[v])
    }

    /// x W as int8 arithmetic (`crate::quantize`): x quantized with its calibrated u8 grid,
    /// W per output column, the int32 product scaled back to f32.
    fn int8_matmul(&mut self, x: &str, name: &str, w: &[f32], shape: [usize; 2]) -> String {
        let [n_in, n_out] = shape;
        let (lo, hi) = self.ranges.and_then(|r| r.0.get(name)).copied().expect("checked at start");
        let act = ActivationQuant::for_range(lo, hi);
        let (w_q, w_scales) = quantize_columns(w, n_in, n_out);
        let x_scale = self.scalar(&format!("{name}.x_scale"), act.scale);
        let x_zero = self.g.initializer_u8(&format!("{name}.x_zero"), &[], &[act.zero_point]);
        let x_q = self.g.node("QuantizeLinear", &[x, &x_scale, &x_zero], vec![]);
        let w_q = self.g.initializer_i8(&format!("{name}.int8"), &shape, &w_q);
        let product = self.g.node("MatMulInteger", &[&x_q, &w_q, &x_zero], vec![]);
        let to_f32 = attr_int("to", DataType::Float as i64);
        let product = self.g.node("Cast", &[&product], vec![to_f32]);
        let scales: Vec<f32> = w_scales.iter().map(|s| s * act.scale).collect();
        let scales = self.g.initializer_f32(&format!("{name}.scale"), &[n_out], &scales);
        self.g.node("Mul", &[&product, &scales], vec![])
    }
}

impl Ops for OnnxOps<'_> {
    type T = String;
    type E = ExportError;

    fn param(&mut self, name: &str, shape: &[usize], _: Init) -> Result<String, ExportError> {
        let t = self.weights.get(name).ok_or_else(|| ExportError::MissingParam(name.into()))?;
        if t.dims() != shape {
            return Err(ExportError::Shape {
                name: name.into(),
                found: t.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let data = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        match self.precision {
            Precision::Int8 if is_matmul_weight(name, shape) && !KEPT_F32.contains(&name) => {
                self.deferred.insert(name.into(), (data, [shape[0], shape[1]]));
                Ok(name.into())
            }
            Precision::F32 | Precision::Int8 => Ok(self.g.initializer_f32(name, shape, &data)),
            // f16 storage, widened by a Cast that tract folds at load: the graph computes in f32
            // unless the runtime converts it.
            Precision::F16 => {
                let stored = self.g.initializer_f16(&format!("{name}.f16"), shape, &data);
                let to_f32 = attr_int("to", DataType::Float as i64);
                Ok(self.g.node("Cast", &[&stored], vec![to_f32]))
            }
        }
    }

    fn constant(
        &mut self,
        name: &str,
        shape: &[usize],
        data: Vec<f32>,
    ) -> Result<String, ExportError> {
        Ok(self.g.initializer_f32(name, shape, &data))
    }

    fn matmul(&mut self, a: &String, b: &String) -> Result<String, ExportError> {
        if let Some((w, shape)) = self.deferred.remove(b) {
            return Ok(self.int8_matmul(a, b, &w, shape));
        }
        Ok(self.g.node("MatMul", &[a, b], vec![]))
    }

    fn add(&mut self, a: &String, b: &String) -> Result<String, ExportError> {
        Ok(self.g.node("Add", &[a, b], vec![]))
    }

    fn mul(&mut self, a: &String, b: &String) -> Result<String, ExportError> {
        Ok(self.g.node("Mul", &[a, b], vec![]))
    }

    fn scale(&mut self, a: &String, s: f32) -> Result<String, ExportError> {
        let s = self.scalar(&format!("{a}.scale"), s);
        Ok(self.g.node("Mul", &[a, &s], vec![]))
    }

    fn layer_norm(&mut self, x: &String, w: &String, b: &String) -> Result<String, ExportError> {
        let attrs = vec![attr_int("axis", -1), attr_float("epsilon", LN_EPS)];
        Ok(self.g.node("LayerNormalization", &[x, w, b], attrs))
    }

    fn softmax(&mut self, x: &String) -> Result<String, ExportError> {
        Ok(self.g.node("Softmax", &[x], vec![attr_int("axis", -1)]))
    }

    fn gelu_tanh(&mut self, x: &String) -> Result<String, ExportError> {
        Ok(self.g.node("Gelu", &[x], vec![attr_string("approximate", "tanh")]))
    }

    fn silu(&mut self, x: &String) -> Result<String, ExportError> {
        let s = self.g.node("Sigmoid", &[x], vec![]);
        Ok(self.g.node("Mul", &[x, &s], vec![]))
    }

    fn sin(&mut self, x: &String) -> Result<String, ExportError> {
        Ok(self.g.node("Sin", &[x], vec![]))
    }

    fn cos(&mut self, x: &String) -> Result<String, ExportError> {
        Ok(self.g.node("Cos", &[x], vec![]))
    }

    fn concat(&mut self, xs: &[String]) -> Result<String, ExportError> {
        let inputs: Vec<&str> = xs.iter().map(String::as_str).collect();
        Ok(self.g.node("Concat", &inputs, vec![attr_int("axis", -1)]))
    }

    fn split(&mut self, x: &String, sizes: &[usize]) -> Result<Vec<String>, ExportError> {
        let sizes: Vec<i64> = sizes.iter().map(|&s| s as i64).collect();
        let split = self.g.initializer_i64(&[sizes.len()], &sizes);
        Ok(self.g.node_n("Split", &[x, &split], sizes.len(), vec![attr_int("axis", -1)]))
    }

    fn reshape(&mut self, x: &String, dims: &[usize]) -> Result<String, ExportError> {
        // 0 copies the input's (symbolic) batch dimension.
        let shape: Vec<i64> = std::iter::once(0).chain(dims.iter().map(|&d| d as i64)).collect();
        let shape = self.g.initializer_i64(&[shape.len()], &shape);
        Ok(self.g.node("Reshape", &[x, &shape], vec![]))
    }

    fn transpose(&mut self, x: &String, perm: &[usize]) -> Result<String, ExportError> {
        let perm: Vec<i64> = perm.iter().map(|&p| p as i64).collect();
        Ok(self.g.node("Transpose", &[x], vec![attr_ints("perm", &perm)]))
    }

    fn gather(
        &mut self,
        table: &String,
        indices: &[usize],
        shape: &[usize],
    ) -> Result<String, ExportError> {
        let name = match self.indices.get(indices) {
            Some(name) => name.clone(),
            None => {
                let values: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
                let name = self.g.initializer_i64(shape, &values);
                self.indices.insert(indices.to_vec(), name.clone());
                name
            }
        };
        Ok(self.g.node("Gather", &[table, &name], vec![attr_int("axis", 1)]))
    }

    fn unsqueeze(&mut self, x: &String, axis: usize) -> Result<String, ExportError> {
        let axes = self.g.initializer_i64(&[1], &[axis as i64]);
        Ok(self.g.node("Unsqueeze", &[x, &axes], vec![]))
    }
}

/// The model as one self-describing ONNX graph, weights stored at `precision`, its spec in
/// `metadata_props`. int8 needs the activation ranges of `chardiff_train::calibrate`.
pub fn denoiser_graph(
    model: &TrainedModel,
    precision: Precision,
    ranges: Option<&ActivationRanges>,
) -> Result<ModelProto, ExportError> {
    let spec = &ModelSpec { precision, ..model.spec.clone() };
    let (l, k) = (spec.window, spec.bits);
    let ranges = match (precision, ranges) {
        (Precision::Int8, None) => return Err(ExportError::NeedsCalibration),
        (Precision::Int8, Some(ranges)) => Some(ranges),
        _ => None,
    };
    if let Some(ranges) = ranges {
        let weights = model.weights.iter().filter(|(n, t)| is_matmul_weight(n, t.dims()));
        if let Some((name, _)) = weights.into_iter().find(|(n, _)| !ranges.0.contains_key(*n)) {
            return Err(ExportError::Uncalibrated(name.clone()));
        }
    }
    let mut ops = OnnxOps {
        g: GraphBuilder::default(),
        weights: &model.weights,
        precision,
        indices: BTreeMap::new(),
        ranges,
        deferred: BTreeMap::new(),
    };
    let bits = [Dim::Batch, Dim::Fixed(l), Dim::Fixed(k)];
    let inputs = model::Inputs {
        x_t: ops.g.input(io::X_T, &bits),
        x_self: ops.g.input(io::X_SELF, &bits),
        t: ops.g.input(io::T, &[Dim::Batch]),
        condition: spec.conditioning.then(|| {
            let cond = ops.g.input(io::COND, &bits);
            let mask = ops.g.input(io::COND_MASK, &[Dim::Batch, Dim::Fixed(l), Dim::Fixed(1)]);
            (cond, mask)
        }),
    };
    let outputs = model::forward(&mut ops, &model.config, spec, inputs)?;
    assert!(
        ops.deferred.is_empty(),
        "weights used outside a matrix product: {:?}",
        ops.deferred.keys()
    );
    ops.g.output(io::X0, &outputs.x0, &bits);
    if let (Head::Softmax, Some(logits)) = (spec.head, &outputs.logits) {
        let dims = [Dim::Batch, Dim::Fixed(l), Dim::Fixed(spec.charset.len())];
        ops.g.output(io::LOGITS, logits, &dims);
    }
    Ok(ops.g.finish("chardiff_denoiser", spec.to_metadata()))
}
