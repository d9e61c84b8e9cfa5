//! LayerNorm as one operator of the CPU plans, with the residual connection before it (issue 4;
//! BENCHMARKS.md, "The attention's softmax, LayerNorm and the MLP's hidden layout").
//!
//! tract runs a LayerNorm of the default model's [96, 128] activations as five operators after
//! `cpu_forms`: the row sums as a product with a column of ones (with the packing of its input),
//! the scaling of the sums into means, their subtraction, tract's fused RMS normalization and
//! the scaling by the weights: ~11 us, 13 times a step. `LayerNorm` does it row by row in one
//! operator: each row's mean, then its centred sum of squares, then the row written out centred,
//! normalized and scaled (and shifted, where no product's bias takes the shift). Where the
//! residual connection before it is the sum or difference of two activations (as `cpu_forms`
//! writes it in f32 plans, as the int8 export does), it takes that too, row by row, and gives
//! both the residual stream and its normalization: one pass over the stream fewer. The loops
//! keep 16 lanes apart so that they vectorize (`lanes`), and run compiled for AVX-512 or AVX2
//! where the CPU has it. The sums are taken in another order than tract's: relative differences
//! of ~1e-7.

use super::lanes;
use std::sync::Arc;
use tract_nnef::internal::*;

/// `(x - mean(x)) / sqrt(var(x) + eps) * gamma + beta` over the last axis, `gamma` and `beta` as
/// long as that axis. With a `residual`, the inputs are `h` and `p`, `x = h + p` or `h - p`, and
/// the outputs `x` and its norm.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LayerNorm {
    pub eps: Arc<Tensor>,
    pub gamma: Arc<Tensor>,
    pub beta: Option<Arc<Tensor>>,
    pub residual: Option<Residual>,
}

/// How a residual connection combines the stream and a block's output.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Residual {
    Add,
    Sub,
}

/// Each `gamma`-long row of `x` (combined with the same row of `p` as `residual` says, written to
/// `sums`, unless `p` is empty) normalized into the same row of `y`.
#[inline(always)]
fn rows(x: &[f32], p: (&[f32], Residual), sums: &mut [f32], y: &mut [f32], norm: Norm) {
    let width = norm.gamma.len();
    for (i, y) in y.chunks_exact_mut(width).enumerate() {
        let row = i * width..(i + 1) * width;
        let x = match p {
            ([], _) => &x[row],
            (p, residual) => {
                let sum = &mut sums[row.clone()];
                let terms = sum.iter_mut().zip(&x[row.clone()]).zip(&p[row]);
                match residual {
                    Residual::Add => terms.for_each(|((s, a), b)| *s = a + b),
                    Residual::Sub => terms.for_each(|((s, a), b)| *s = a - b),
                }
                &*sum
            }
        };
        let mean = lanes::sum(x, |v| v) / width as f32;
        let variance = lanes::sum(x, |v| (v - mean) * (v - mean)) / width as f32;
        let scale = (variance + norm.eps).sqrt().recip();
        let scaled = y.iter_mut().zip(x).zip(norm.gamma);
        match norm.beta {
            [] => scaled.for_each(|((y, &x), &g)| *y = (x - mean) * scale * g),
            beta => scaled.zip(beta).for_each(|(((y, &x), &g), b)| *y = (x - mean) * scale * g + b),
        }
    }
}

/// The normalization's constants, as slices.
#[derive(Clone, Copy)]
struct Norm<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
    eps: f32,
}

impl Op for LayerNorm {
    fn name(&self) -> StaticName {
        if self.residual.is_some() { "ResidualLayerNorm" } else { "LayerNorm" }.into()
    }
    op_as_typed_op!();
}

impl EvalOp for LayerNorm {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, p) = match self.residual {
            Some(_) => {
                let (h, p) = args_2!(inputs);
                ensure!(h.shape() == p.shape(), "{:?} and {:?}", h.shape(), p.shape());
                (h, Some(p))
            }
            None => (args_1!(inputs), None),
        };
        let (gamma, beta) = (self.gamma.try_as_plain_ram()?, self.beta.as_ref());
        let beta = beta.map(|b| b.try_as_plain_ram()).transpose()?;
        let gamma = gamma.as_slice::<f32>()?;
        let beta = beta.as_ref().map(|b| b.as_slice::<f32>()).transpose()?.unwrap_or(&[]);
        let width = x.shape().last().copied();
        ensure!(width == Some(gamma.len()), "LayerNorm of {:?}", x.shape());
        ensure!(beta.is_empty() || beta.len() == gamma.len(), "a shift of {}", beta.len());
        let norm = Norm { gamma, beta, eps: self.eps.cast_to_scalar::<f32>()? };
        // Safety: `rows` writes every element of both (of `sums` if it is read).
        let mut y = unsafe { Tensor::uninitialized::<f32>(x.shape())? };
        let sums_shape: &[usize] = if p.is_some() { x.shape() } else { &[0] };
        let mut sums = unsafe { Tensor::uninitialized::<f32>(sums_shape)? };
        let p = p.as_ref().map(|p| p.try_as_plain_ram()).transpose()?;
        let x = x.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let p = p.as_ref().map(|p| p.as_slice::<f32>()).transpose()?.unwrap_or(&[]);
        let p = (p, self.residual.unwrap_or(Residual::Sub));
        let (mut sums_view, mut y_view) = (sums.try_as_plain_ram_mut()?, y.try_as_plain_ram_mut()?);
        let (sums_slice, y_slice) =
            (sums_view.as_slice_mut::<f32>()?, y_view.as_slice_mut::<f32>()?);
        lanes::widest(
            #[inline(always)]
            || rows(x, p, sums_slice, y_slice, norm),
        );
        Ok(match self.residual {
            Some(_) => tvec!(sums.into_tvalue(), y.into_tvalue()),
            None => tvec!(y.into_tvalue()),
        })
    }
}

impl TypedOp for LayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.iter().all(|fact| fact.datum_type == DatumType::F32));
        let fact = f32::fact(inputs[0].shape.clone());
        Ok(if self.residual.is_some() { tvec!(fact.clone(), fact) } else { tvec!(fact) })
    }
    as_op!();
}
