//! The denoiser's I/O contract, shared by the trainer's candle model, the exporter and every runtime
//! backend, and the `Denoiser` trait the sampler is generic over.

use crate::spec::ModelSpec;

/// Names of the exported graph's inputs and outputs. Inputs are f32: `x_t`, `x_self` and `cond`
/// are [B, L, K], `t` is [B], `cond_mask` is [B, L, 1]; outputs are f32: `x0` [B, L, K] and, for a
/// softmax head, `logits` [B, L, V].
pub mod io {
    pub const X_T: &str = "x_t";
    pub const X_SELF: &str = "x_self";
    pub const T: &str = "t";
    pub const COND: &str = "cond";
    pub const COND_MASK: &str = "cond_mask";
    pub const X0: &str = "x0";
    pub const LOGITS: &str = "logits";

    /// Graph inputs in order: conditional models take the last two as well.
    pub const INPUTS: [&str; 5] = [X_T, X_SELF, T, COND, COND_MASK];

    pub fn inputs(conditioning: bool) -> &'static [&'static str] {
        if conditioning {
            &INPUTS
        } else {
            &INPUTS[..3]
        }
    }
}

/// Known characters, for a conditional denoiser: analog bits where known, zeros elsewhere.
#[derive(Clone, Copy, Debug)]
pub struct Condition<'a> {
    /// [B, L, K]
    pub cond: &'a [f32],
    /// [B, L, 1]: 1 where the character is known.
    pub mask: &'a [f32],
}

/// One call of the network on a batch, flat row-major buffers.
#[derive(Clone, Copy, Debug)]
pub struct DenoiseInput<'a> {
    pub batch: usize,
    /// [B, L, K]
    pub x_t: &'a [f32],
    /// [B, L, K]: the previous x0 estimate (zeros without self-conditioning).
    pub x_self: &'a [f32],
    /// [B]
    pub t: &'a [f32],
    /// Present exactly when the spec says the model is conditional.
    pub condition: Option<Condition<'a>>,
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One input of the graph for a call: its contract name, shape [B, ...] and row-major data.
#[derive(Clone, Copy, Debug)]
pub struct GraphInput<'a> {
    pub name: &'static str,
    pub shape: [usize; 3],
    /// How many of `shape`'s axes are real: `t` is [B] only.
    pub rank: usize,
    pub data: &'a [f32],
}

impl GraphInput<'_> {
    pub fn shape(&self) -> &[usize] {
        &self.shape[..self.rank]
    }

    /// Values per sequence of the batch.
    pub fn per_row(&self) -> usize {
        self.shape()[1..].iter().product()
    }
}

impl<'a> DenoiseInput<'a> {
    /// The graph's inputs for this call in contract order (`io::inputs`): every backend feeds
    /// these. A conditional model without a condition is an error.
    pub fn graph_inputs(&self, spec: &ModelSpec) -> Result<Vec<GraphInput<'a>>, BoxError> {
        let (b, l, k) = (self.batch, spec.window, spec.bits);
        let input = |name, shape, rank, data| GraphInput { name, shape, rank, data };
        let mut inputs = vec![
            input(io::X_T, [b, l, k], 3, self.x_t),
            input(io::X_SELF, [b, l, k], 3, self.x_self),
            input(io::T, [b, 0, 0], 1, self.t),
        ];
        if spec.conditioning {
            let c = self.condition.ok_or("a conditional model needs `cond` and `cond_mask`")?;
            inputs.push(input(io::COND, [b, l, k], 3, c.cond));
            inputs.push(input(io::COND_MASK, [b, l, 1], 3, c.mask));
        }
        Ok(inputs)
    }
}

/// Anything that predicts x0 from a noisy batch.
pub trait Denoiser {
    fn spec(&self) -> &ModelSpec;

    /// Writes the x0 prediction [B, L, K] into `x0`.
    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError>;

    /// For a softmax head: writes the logits [B, L, V] over the charset (V characters) whose
    /// softmax x0 is the mean code of (`bits::mean_code`). The sampler asks for them to
    /// apply a temperature or self-guidance (`SamplerConfig`).
    fn logits(&mut self, _input: &DenoiseInput<'_>, _logits: &mut [f32]) -> Result<(), BoxError> {
        Err(NO_LOGITS.into())
    }
}

/// What a denoiser without the softmax head's logits answers when asked for them.
pub const NO_LOGITS: &str = "this denoiser gives no logits (only a softmax head has them)";
