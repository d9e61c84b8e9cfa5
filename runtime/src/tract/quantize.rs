//! The int8 plans' quantization of activations and scaling of products, vectorized (issue 4;
//! BENCHMARKS.md, "The attention's softmax, LayerNorm and the MLP's hidden layout").
//!
//! Before each int8 product tract quantizes its f32 input to u8 (`QuantizeLinearU8`) one element
//! at a time through a scalar rounding: ~2.8 ns an element, 46% of the default model's int8 step
//! on the machine measured. `QuantizeU8` computes the same (the value times the reciprocal scale,
//! rounded half to even, plus the zero point, clamped to u8) in a loop the compiler vectorizes:
//! the same bytes for any activation an int8 file's calibration could meet.

use super::lanes;
use std::sync::Arc;
use tract_nnef::internal::*;
use tract_nnef::tract_core::ops::quant::QuantizeLinearU8;

/// tract's `QuantizeLinearU8` of f32 activations, vectorized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizeU8(pub QuantizeLinearU8);

/// Each of `x` times `scale`, rounded half to even, plus `zero_point`, clamped to u8. The clamp
/// is in f32, where it vectorizes (Rust's saturating cast to an integer does not): the same as
/// tract's integer arithmetic wherever the rounded value is below 2^31 in magnitude (past that
/// tract's addition of the zero point wraps around; this saturates).
#[inline(always)]
fn quantize(x: &[f32], y: &mut [u8], scale: f32, zero_point: f32) {
    for (y, &x) in y.iter_mut().zip(x) {
        let rounded = (x * scale).round_ties_even();
        // Not a number quantizes to the zero point, as in tract.
        let rounded = if rounded.is_nan() { 0.0 } else { rounded };
        let q = (rounded + zero_point).clamp(0.0, 255.0);
        // Safety: `q` is a whole number in [0, 255] (exact: below 2^24 a rounded value plus the
        // zero point is, and anything larger was clamped).
        *y = unsafe { q.to_int_unchecked::<u8>() };
    }
}

impl Op for QuantizeU8 {
    fn name(&self) -> StaticName {
        "QuantizeU8".into()
    }
    op_as_typed_op!();
}

impl EvalOp for QuantizeU8 {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        // Safety: `quantize` writes every element.
        let mut y = unsafe { Tensor::uninitialized::<u8>(x.shape())? };
        let (xs, mut ys) = (x.try_as_plain_ram()?, y.try_as_plain_ram_mut()?);
        let (xs, ys) = (xs.as_slice::<f32>()?, ys.as_slice_mut::<u8>()?);
        let QuantizeLinearU8 { scale, zero_point } = self.0;
        lanes::widest(
            #[inline(always)]
            || quantize(xs, ys, scale, zero_point as f32),
        );
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for QuantizeU8 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == DatumType::F32);
        Ok(tvec!(u8::fact(inputs[0].shape.clone())))
    }
    as_op!();
}

/// `x * scale + bias` of the i32 sums of an int8 product, `scale` and `bias` per output feature
/// (the last axis): tract casts the sums to f32 in one pass and scales and shifts them in another
/// (0.43 ms of the default model's int8 step). The same operations in the same order: the same
/// values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dequantize {
    pub scale: Arc<Tensor>,
    pub bias: Arc<Tensor>,
}

#[inline(always)]
fn dequantize(x: &[i32], y: &mut [f32], scale: &[f32], bias: &[f32]) {
    for (x, y) in x.chunks_exact(scale.len()).zip(y.chunks_exact_mut(scale.len())) {
        for (((y, &x), s), b) in y.iter_mut().zip(x).zip(scale).zip(bias) {
            *y = x as f32 * s + b;
        }
    }
}

impl Op for Dequantize {
    fn name(&self) -> StaticName {
        "Dequantize".into()
    }
    op_as_typed_op!();
}

impl EvalOp for Dequantize {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let (scale, bias) = (self.scale.try_as_plain_ram()?, self.bias.try_as_plain_ram()?);
        let (scale, bias) = (scale.as_slice::<f32>()?, bias.as_slice::<f32>()?);
        let features = x.shape().last().copied();
        ensure!(features == Some(scale.len()) && scale.len() == bias.len(), "{:?}", x.shape());
        // Safety: `dequantize` writes every element.
        let mut y = unsafe { Tensor::uninitialized::<f32>(x.shape())? };
        let (xs, mut ys) = (x.try_as_plain_ram()?, y.try_as_plain_ram_mut()?);
        let (xs, ys) = (xs.as_slice::<i32>()?, ys.as_slice_mut::<f32>()?);
        lanes::widest(
            #[inline(always)]
            || dequantize(xs, ys, scale, bias),
        );
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Dequantize {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == DatumType::I32);
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_nnef::tract_core::ops::quant::quantize_linear_f32_u8;

    /// The same bytes as tract's, over values that round both ways at ties, saturate at both
    /// ends, and are not numbers; past 2^31, where tract's arithmetic wraps around, the ends.
    #[test]
    fn the_bytes_are_tracts() -> TractResult<()> {
        let mut values: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.25).collect();
        values.extend([f32::NAN, -f32::NAN, 1e9, -1e9, 3e9, -3e9, -0.0, 0.0, 254.6, 255.5]);
        let (scale, zero_point) = (0.5, 128);
        let run = |values: &[f32]| -> TractResult<Vec<u8>> {
            let op = QuantizeU8(QuantizeLinearU8 { scale, zero_point });
            let x = tensor1(values).into_tvalue();
            let y = op.eval(&EvalContext::out_of_plan(), tvec!(x))?.remove(0);
            Ok(y.try_as_plain_ram()?.as_slice::<u8>()?.to_vec())
        };
        let tracts = values.iter().map(|&v| quantize_linear_f32_u8(v, scale, zero_point as i32));
        assert_eq!(run(&values)?, tracts.collect::<Vec<_>>());
        let ends = [f32::INFINITY, 1e30, f32::NEG_INFINITY, -1e30];
        assert_eq!(run(&ends)?, [255, 255, 0, 0]);
        Ok(())
    }

    /// tract's cast, product and sum, one after the other.
    #[test]
    fn dequantizing_is_tracts_cast_scale_and_shift() -> TractResult<()> {
        let sums: Vec<i32> = (0..6 * 5).map(|i| (i * 7919 % 2001) - 1000).collect();
        let scale: Vec<f32> = (0..5).map(|i| 1e-4 * (i + 1) as f32 / 3.0).collect();
        let bias: Vec<f32> = (0..5).map(|i| (i as f32 * 0.37).sin()).collect();
        let expected: Vec<f32> =
            sums.iter().enumerate().map(|(i, &x)| x as f32 * scale[i % 5] + bias[i % 5]).collect();
        let op = Dequantize { scale: Arc::new(tensor1(&scale)), bias: Arc::new(tensor1(&bias)) };
        let x = Tensor::from_shape(&[6, 5], &sums)?.into_tvalue();
        let y = op.eval(&EvalContext::out_of_plan(), tvec!(x))?.remove(0);
        assert_eq!(y.try_as_plain_ram()?.as_slice::<f32>()?, expected);
        Ok(())
    }
}
