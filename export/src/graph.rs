//! A small builder over tract_onnx's ONNX protobuf types: inputs, outputs, initializers and
//! single-output nodes with generated names.

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
use tract_onnx::pb::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The default-domain opset the graphs are written for (Gelu with approximate="tanh" needs 20).
pub const OPSET: i64 = 20;
/// The IR version that goes with opset 20.
const IR_VERSION: i64 = 9;

/// A dimension of a graph input or output.
#[derive(Clone, Copy, Debug)]
pub enum Dim {
    /// The symbolic batch dimension.
    Batch,
    Fixed(usize),
}

#[derive(Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    counter: usize,
}

impl GraphBuilder {
    pub fn input(&mut self, name: &str, dims: &[Dim]) -> String {
        self.graph.input.push(value_info(name, dims));
        name.to_string()
    }

    pub fn output(&mut self, name: &str, value: &str, dims: &[Dim]) {
        // Identity gives the output its contract name; tract removes it when decluttering.
        self.graph.node.push(node("Identity", &[value], &[name], name, vec![]));
        self.graph.output.push(value_info(name, dims));
    }

    pub fn initializer_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, DataType::Float, raw)
    }

    pub fn initializer_f16(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        let raw = data.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        self.push_initializer(name, dims, DataType::Float16, raw)
    }

    pub fn initializer_i8(&mut self, name: &str, dims: &[usize], data: &[i8]) -> String {
        let raw = data.iter().map(|&v| v as u8).collect();
        self.push_initializer(name, dims, DataType::Int8, raw)
    }

    pub fn initializer_u8(&mut self, name: &str, dims: &[usize], data: &[u8]) -> String {
        self.push_initializer(name, dims, DataType::Uint8, data.to_vec())
    }

    pub fn initializer_i64(&mut self, dims: &[usize], data: &[i64]) -> String {
        let name = self.fresh("const");
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(&name, dims, DataType::Int64, raw)
    }

    fn push_initializer(
        &mut self,
        name: &str,
        dims: &[usize],
        dtype: DataType,
        raw: Vec<u8>,
    ) -> String {
        self.graph.initializer.push(TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dtype as i32,
            raw_data: raw,
            ..Default::default()
        });
        name.to_string()
    }

    /// Adds a node with one output and returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        self.node_n(op, inputs, 1, attributes).remove(0)
    }

    pub fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: usize,
        attributes: Vec<AttributeProto>,
    ) -> Vec<String> {
        let name = self.fresh(op);
        let outs: Vec<String> = (0..outputs).map(|i| format!("{name}:{i}")).collect();
        let out_refs: Vec<&str> = outs.iter().map(String::as_str).collect();
        self.graph.node.push(node(op, inputs, &out_refs, &name, attributes));
        outs
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}_{}", self.counter)
    }

    pub fn finish(mut self, name: &str, metadata: Vec<(String, String)>) -> ModelProto {
        self.graph.name = name.to_string();
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
            producer_name: "chardiff".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph),
            metadata_props: metadata
                .into_iter()
                .map(|(key, value)| StringStringEntryProto { key, value })
                .collect(),
            ..Default::default()
        }
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
    name: &str,
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: name.to_string(),
        op_type: op.to_string(),
        attribute,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Batch => dimension::Value::DimParam("batch".into()),
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i, ..Default::default() }
}

pub fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

pub fn attr_string(name: &str, s: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: s.as_bytes().to_vec(),
        ..Default::default()
    }
}
