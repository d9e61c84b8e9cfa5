//! LayerNorm as one operator of the CPU plans, with the residual connection before it (issue 4;
//! BENCHMARKS.md, "The attention's softmax, LayerNorm and the MLP's hidden layout").
//!
//! tract runs a LayerNorm of the default model's [96, 128] activations as five operators after
//! `cpu_forms`: the row sums as a product with a column of ones (with the packing of its input),
//! the scaling of the sums into means, their subtraction, tract's fused RMS normalization and
//! the scaling by the weights: ~11 us, 13 times a step. `LayerNorm` does it row by row in one
//! operator: each row's mean, then its centred sum of squares, then the row written out centred,
//! normalized and scaled. Where the residual connection before it is a subtraction of two
//! activations (as `cpu_forms` writes it), it takes that too, row by row, and gives both the
//! residual stream and its normalization: one pass over the stream fewer. The loops keep 16
//! lanes apart so that they vectorize (`lanes`), and run compiled for AVX-512 or AVX2 where the
//! CPU has it. The sums are taken in another order than tract's: relative differences of ~1e-7.

use super::lanes;
use std::sync::Arc;
use tract_nnef::internal::*;

/// `(x - mean(x)) / sqrt(var(x) + eps) * gamma` over the last axis, `gamma` as long as that axis.
/// With `residual`, the inputs are `h` and `n`, `x = h - n`, and the outputs `x` and its norm.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LayerNorm {
    pub eps: Arc<Tensor>,
    pub gamma: Arc<Tensor>,
    pub residual: bool,
}

/// Each `gamma`-long row of `x` (less the same row of `n`, written to `sums`, unless `n` is
/// empty) normalized into the same row of `y`.
#[inline(always)]
fn rows(x: &[f32], n: &[f32], sums: &mut [f32], y: &mut [f32], gamma: &[f32], eps: f32) {
    let width = gamma.len();
    for (i, y) in y.chunks_exact_mut(width).enumerate() {
        let row = i * width..(i + 1) * width;
        let x = if n.is_empty() {
            &x[row]
        } else {
            let sum = &mut sums[row.clone()];
            sum.iter_mut().zip(&x[row.clone()]).zip(&n[row]).for_each(|((s, a), b)| *s = a - b);
            &*sum
        };
        let mean = lanes::sum(x, |v| v) / width as f32;
        let variance = lanes::sum(x, |v| (v - mean) * (v - mean)) / width as f32;
        let scale = (variance + eps).sqrt().recip();
        for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
            *y = (x - mean) * scale * g;
        }
    }
}

impl Op for LayerNorm {
    fn name(&self) -> StaticName {
        if self.residual { "ResidualLayerNorm" } else { "LayerNorm" }.into()
    }
    op_as_typed_op!();
}

impl EvalOp for LayerNorm {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, n) = if self.residual {
            let (h, n) = args_2!(inputs);
            ensure!(h.shape() == n.shape(), "{:?} - {:?}", h.shape(), n.shape());
            (h, Some(n))
        } else {
            (args_1!(inputs), None)
        };
        let gamma = self.gamma.try_as_plain_ram()?;
        let gamma = gamma.as_slice::<f32>()?;
        ensure!(x.shape().last() == Some(&gamma.len()), "LayerNorm of {:?}", x.shape());
        let eps = self.eps.cast_to_scalar::<f32>()?;
        // Safety: `rows` writes every element of both (of `sums` if it is read).
        let mut y = unsafe { Tensor::uninitialized::<f32>(x.shape())? };
        let sums_shape: &[usize] = if n.is_some() { x.shape() } else { &[0] };
        let mut sums = unsafe { Tensor::uninitialized::<f32>(sums_shape)? };
        let n = n.as_ref().map(|n| n.try_as_plain_ram()).transpose()?;
        let x = x.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let n = n.as_ref().map(|n| n.as_slice::<f32>()).transpose()?.unwrap_or(&[]);
        let (mut sums_view, mut y_view) = (sums.try_as_plain_ram_mut()?, y.try_as_plain_ram_mut()?);
        let (sums_slice, y_slice) =
            (sums_view.as_slice_mut::<f32>()?, y_view.as_slice_mut::<f32>()?);
        lanes::widest(
            #[inline(always)]
            || rows(x, n, sums_slice, y_slice, gamma, eps),
        );
        Ok(if self.residual {
            tvec!(sums.into_tvalue(), y.into_tvalue())
        } else {
            tvec!(y.into_tvalue())
        })
    }
}

impl TypedOp for LayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.iter().all(|fact| fact.datum_type == DatumType::F32));
        let fact = f32::fact(inputs[0].shape.clone());
        Ok(if self.residual { tvec!(fact.clone(), fact) } else { tvec!(fact) })
    }
    as_op!();
}
