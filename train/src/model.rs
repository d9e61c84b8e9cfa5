//! The Transformer denoiser, written once over an `Ops` backend: candle runs it for training
//! (`crate::candle`), the exporter records it as an ONNX graph. One architecture, two executions,
//! so the exported graph is the trained model op for op.
//!
//! x0 = head(LN(blocks(W_in [x_t, x_self, (cond, cond_mask)] + pos + MLP(sinusoid(t)))))
//! block(h) = h + Attn(LN(h)); h + MLP(LN(h))   (pre-LN)

use chardiff_runtime::{Head, ModelSpec};
use serde::{Deserialize, Serialize};

/// The network's size and shape; everything else comes from the `ModelSpec`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    /// Hidden width of each block's MLP.
    pub ffn: usize,
    pub activation: Activation,
    /// A position bias on the attention scores. Absent (`false`) in the configs of the oldest
    /// runs, `true` in those of runs with the full bias.
    #[serde(default, deserialize_with = "attention_bias_compat")]
    pub attention_bias: AttentionBias,
}

/// How attention finds neighbours. Through absolute position embeddings alone it did not, on the
/// diffusion objective, within thousands of steps (BENCHMARKS.md "Picking up context"): learning
/// position-to-position attention from small q/k and position weights is a saddle the weak
/// signal of noisy neighbours does not push the model off. A bias on the scores learns directly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionBias {
    /// Absolute position embeddings only (the first default model).
    #[default]
    None,
    /// A free learned [heads, L, L] bias.
    Full,
    /// A learned bias per head and offset j - i on top of ALiBi's -slope_h |j - i|: every head
    /// attends locally from the first step, and each parameter sees the gradient of all L
    /// positions at its offset.
    Relative,
}

/// `attention_bias` was a bool before `Relative` existed.
fn attention_bias_compat<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<AttentionBias, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Bool(bool),
        Kind(AttentionBias),
    }
    Ok(match Stored::deserialize(d)? {
        Stored::Bool(true) => AttentionBias::Full,
        Stored::Bool(false) => AttentionBias::None,
        Stored::Kind(kind) => kind,
    })
}

/// tanh-GELU and SiLU run on every tract path (exact GELU has no NNEF or CUDA kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Gelu,
    Silu,
}

impl ModelConfig {
    /// Floating-point operations of one forward pass per sequence: twice the multiply-adds of its
    /// matrix products (element-wise work left out, as in GEMM peak figures). tract's cost model
    /// of the exported graph gives the same count (tests/pipeline.rs).
    pub fn forward_flops(&self, spec: &ModelSpec) -> u64 {
        let (l, d, f, k, v) = (spec.window, self.dim, self.ffn, spec.bits, spec.charset.len());
        let input = if spec.conditioning { 3 * k + 1 } else { 2 * k };
        let time = 2 * d * d; // two linears on one vector per sequence
        let block = l * (3 * d * d + d * d + 2 * d * f) + 2 * l * l * d; // projections, attention
        let head = match spec.head {
            Head::Softmax => l * (d * v + v * k),
            Head::Bits => l * d * k,
        };
        2 * (l * input * d + time + self.layers * block + head) as u64
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.dim == 0 || self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            return Err(format!(
                "dim ({}) must be a positive multiple of heads ({})",
                self.dim, self.heads
            ));
        }
        if !self.dim.is_multiple_of(2) {
            return Err(format!("dim ({}) must be even (sin and cos time features)", self.dim));
        }
        if self.layers == 0 || self.ffn == 0 {
            return Err("layers and ffn must be at least 1".into());
        }
        Ok(())
    }
}

/// How a parameter starts before training.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

pub const LN_EPS: f32 = 1e-5;

/// The operations the architecture is made of. Tensors are row-major with the batch first;
/// `matmul` broadcasts a 2-D right operand over leading dimensions, `add`/`mul` broadcast numpy-style.
pub trait Ops {
    type T: Clone;
    type E;

    fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Self::T, Self::E>;
    fn constant(&mut self, name: &str, shape: &[usize], data: Vec<f32>)
        -> Result<Self::T, Self::E>;
    fn matmul(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::E>;
    /// `x w + b`: w [n, m] over x's last axis, b [m].
    fn linear(&mut self, x: &Self::T, w: &Self::T, b: &Self::T) -> Result<Self::T, Self::E> {
        let y = self.matmul(x, w)?;
        self.add(&y, b)
    }
    fn add(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::E>;
    fn mul(&mut self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::E>;
    fn scale(&mut self, a: &Self::T, s: f32) -> Result<Self::T, Self::E>;
    /// Over the last axis.
    fn layer_norm(&mut self, x: &Self::T, w: &Self::T, b: &Self::T) -> Result<Self::T, Self::E>;
    /// Over the last axis.
    fn softmax(&mut self, x: &Self::T) -> Result<Self::T, Self::E>;
    fn gelu_tanh(&mut self, x: &Self::T) -> Result<Self::T, Self::E>;
    fn silu(&mut self, x: &Self::T) -> Result<Self::T, Self::E>;
    fn sin(&mut self, x: &Self::T) -> Result<Self::T, Self::E>;
    fn cos(&mut self, x: &Self::T) -> Result<Self::T, Self::E>;
    /// Along the last axis.
    fn concat(&mut self, xs: &[Self::T]) -> Result<Self::T, Self::E>;
    /// `table` [rows, n] indexed along its last axis by constant indices: [rows, shape...].
    fn gather(
        &mut self,
        table: &Self::T,
        indices: &[usize],
        shape: &[usize],
    ) -> Result<Self::T, Self::E>;
    /// Along the last axis, into parts of the given sizes.
    fn split(&mut self, x: &Self::T, sizes: &[usize]) -> Result<Vec<Self::T>, Self::E>;
    /// To [batch, dims...]: the batch axis is kept.
    fn reshape(&mut self, x: &Self::T, dims: &[usize]) -> Result<Self::T, Self::E>;
    fn transpose(&mut self, x: &Self::T, perm: &[usize]) -> Result<Self::T, Self::E>;
    fn unsqueeze(&mut self, x: &Self::T, axis: usize) -> Result<Self::T, Self::E>;

    /// Multi-head self-attention from packed projections: `qkv` [B, L, 3d] holds q, k and v side
    /// by side (d = heads x dh), `bias` [heads, L, L] is added to the scores; -> [B, L, d], per
    /// head softmax(q k^T / sqrt(dh) + bias) v.
    fn attention(
        &mut self,
        qkv: &Self::T,
        bias: Option<&Self::T>,
        Heads { l, heads, dh }: Heads,
    ) -> Result<Self::T, Self::E> {
        let d = heads * dh;
        let [q, k, v]: [Self::T; 3] =
            self.split(qkv, &[d, d, d])?.try_into().ok().expect("three parts");
        let mut split_heads = |x: &Self::T, perm: &[usize]| {
            let x = self.reshape(x, &[l, heads, dh])?;
            self.transpose(&x, perm)
        };
        let q = split_heads(&q, &[0, 2, 1, 3])?; // [B, H, L, dh]
        let k_t = split_heads(&k, &[0, 2, 3, 1])?; // [B, H, dh, L]
        let v = split_heads(&v, &[0, 2, 1, 3])?;
        // Scaled before the product: q has dh / L as many elements as the scores.
        let q = self.scale(&q, 1.0 / (dh as f32).sqrt())?;
        let mut scores = self.matmul(&q, &k_t)?;
        if let Some(bias) = bias {
            scores = self.add(&scores, bias)?;
        }
        let attention = self.softmax(&scores)?;
        let mixed = self.matmul(&attention, &v)?; // [B, H, L, dh]
        let mixed = self.transpose(&mixed, &[0, 2, 1, 3])?;
        self.reshape(&mixed, &[l, d])
    }
}

/// The sizes of multi-head attention: window, heads, and width per head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub l: usize,
    pub heads: usize,
    pub dh: usize,
}

/// Graph inputs (see `chardiff_runtime::denoiser::io`).
pub struct Inputs<T> {
    pub x_t: T,
    pub x_self: T,
    pub t: T,
    /// `cond` and `cond_mask`, for conditional models.
    pub condition: Option<(T, T)>,
}

pub struct Outputs<T> {
    pub x0: T,
    /// Softmax head only: logits over the charset.
    pub logits: Option<T>,
}

/// Scale of t inside the sinusoidal features: t in [0, 1] needs high frequencies to be resolved.
const TIME_SCALE: f32 = 1000.0;

pub fn forward<O: Ops>(
    o: &mut O,
    config: &ModelConfig,
    spec: &ModelSpec,
    inputs: Inputs<O::T>,
) -> Result<Outputs<O::T>, O::E> {
    let (d, k, l) = (config.dim, spec.bits, spec.window);
    let mut features = vec![inputs.x_t, inputs.x_self];
    if let Some((cond, mask)) = inputs.condition {
        features.extend([cond, mask]);
    }
    let x = o.concat(&features)?;
    let in_features = if spec.conditioning { 3 * k + 1 } else { 2 * k };
    let mut h = linear(o, "input", &x, in_features, d, 0.02)?;
    let pos = o.param("pos_emb", &[l, d], Init::Normal(0.02))?;
    h = o.add(&h, &pos)?;

    let time = time_embedding(o, d, &inputs.t)?;
    let time = o.unsqueeze(&time, 1)?;
    h = o.add(&h, &time)?;

    for i in 0..config.layers {
        h = block(o, config, l, &format!("blocks.{i}"), &h)?;
    }
    let h = layer_norm(o, "final_ln", &h, d)?;
    match spec.head {
        Head::Bits => Ok(Outputs { x0: linear(o, "head", &h, d, k, 0.02)?, logits: None }),
        Head::Softmax => {
            let v = spec.charset.len();
            let logits = linear(o, "head", &h, d, v, 0.02)?;
            let p = o.softmax(&logits)?;
            let codes =
                o.constant("charset_codes", &[v, k], spec.analog_bits().codes(&spec.charset))?;
            Ok(Outputs { x0: o.matmul(&p, &codes)?, logits: Some(logits) })
        }
    }
}

/// MLP(sin(t f) ++ cos(t f)), geometric frequencies f: [B] -> [B, d].
fn time_embedding<O: Ops>(o: &mut O, d: usize, t: &O::T) -> Result<O::T, O::E> {
    let half = d / 2;
    let freqs = (0..half)
        .map(|i| TIME_SCALE * (-(10_000f32.ln()) * i as f32 / half as f32).exp())
        .collect();
    let freqs = o.constant("time.freqs", &[1, half], freqs)?;
    let t = o.unsqueeze(t, 1)?;
    let angles = o.mul(&t, &freqs)?;
    let (sin, cos) = (o.sin(&angles)?, o.cos(&angles)?);
    let features = o.concat(&[sin, cos])?;
    let hidden = linear(o, "time.mlp1", &features, d, d, 0.02)?;
    let hidden = o.silu(&hidden)?;
    linear(o, "time.mlp2", &hidden, d, d, 0.02)
}

fn block<O: Ops>(
    o: &mut O,
    config: &ModelConfig,
    l: usize,
    name: &str,
    h: &O::T,
) -> Result<O::T, O::E> {
    let (d, heads) = (config.dim, config.heads);
    let dh = d / heads;
    // Residual branches start small so a deep stack begins close to the identity.
    let out_std = 0.02 / (2.0 * config.layers as f32).sqrt();

    let a = layer_norm(o, &format!("{name}.ln1"), h, d)?;
    let qkv = linear(o, &format!("{name}.attn.qkv"), &a, d, 3 * d, 0.02)?;
    let bias = match config.attention_bias {
        AttentionBias::None => None,
        AttentionBias::Full => {
            Some(o.param(&format!("{name}.attn.bias"), &[heads, l, l], Init::Zeros)?)
        }
        AttentionBias::Relative => {
            let learned =
                o.param(&format!("{name}.attn.rel_bias"), &[heads, 2 * l - 1], Init::Zeros)?;
            let alibi =
                o.constant(&format!("{name}.attn.alibi"), &[heads, 2 * l - 1], alibi(heads, l))?;
            let table = o.add(&learned, &alibi)?;
            // Score (i, j) reads the table at offset j - i, shifted to 0..2L-1.
            let offsets: Vec<usize> =
                (0..l).flat_map(|i| (0..l).map(move |j| j + l - 1 - i)).collect();
            Some(o.gather(&table, &offsets, &[l, l])?)
        }
    };
    let mixed = o.attention(&qkv, bias.as_ref(), Heads { l, heads, dh })?;
    let attended = linear(o, &format!("{name}.{ATTENTION_OUT}"), &mixed, d, d, out_std)?;
    let h = o.add(h, &attended)?;

    let m = layer_norm(o, &format!("{name}.ln2"), &h, d)?;
    let m = linear(o, &format!("{name}.mlp.up"), &m, d, config.ffn, 0.02)?;
    let m = match config.activation {
        Activation::Gelu => o.gelu_tanh(&m)?,
        Activation::Silu => o.silu(&m)?,
    };
    let m = linear(o, &format!("{name}.{MLP_DOWN}"), &m, config.ffn, d, out_std)?;
    o.add(&h, &m)
}

/// ALiBi (Press et al. 2022): head h adds -slope_h |j - i| with geometric slopes 2^(-8(h+1)/H),
/// from local heads to nearly global ones; [heads, 2L - 1] over offsets -(L-1)..=L-1.
fn alibi(heads: usize, l: usize) -> Vec<f32> {
    (0..heads)
        .flat_map(|h| {
            let slope = 2f32.powf(-8.0 * (h + 1) as f32 / heads as f32);
            (0..2 * l - 1).map(move |o| -slope * (o as f32 - (l - 1) as f32).abs())
        })
        .collect()
}

fn linear<O: Ops>(
    o: &mut O,
    name: &str,
    x: &O::T,
    n_in: usize,
    n_out: usize,
    std: f32,
) -> Result<O::T, O::E> {
    let w = o.param(&format!("{name}.w"), &[n_in, n_out], Init::Normal(std))?;
    let b = o.param(&format!("{name}.b"), &[n_out], Init::Zeros)?;
    o.linear(x, &w, &b)
}

fn layer_norm<O: Ops>(o: &mut O, name: &str, x: &O::T, d: usize) -> Result<O::T, O::E> {
    let w = o.param(&format!("{name}.w"), &[d], Init::Ones)?;
    let b = o.param(&format!("{name}.b"), &[d], Init::Zeros)?;
    o.layer_norm(x, &w, &b)
}

/// Parameters that get no weight decay: biases, norms, position embeddings.
pub fn decays(name: &str) -> bool {
    name.ends_with(".w") && !name.contains("ln")
}

/// The two projections that write a block's branches into the residual stream.
const ATTENTION_OUT: &str = "attn.out";
const MLP_DOWN: &str = "mlp.down";

/// Whether `name` is a weight matrix writing a block's branch into the residual stream: with
/// it zero, the block computes the identity.
pub fn writes_residual(name: &str) -> bool {
    [ATTENTION_OUT, MLP_DOWN].iter().any(|p| name.ends_with(&format!(".{p}.w")))
}
