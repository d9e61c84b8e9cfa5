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
use tract_nnef::tract_core::ops::matmul::pack::DynPackedExoticFact;
use tract_nnef::tract_core::ops::quant::QuantizeLinearU8;
use tract_nnef::tract_core::tract_linalg::mmm::{
    EagerPackedInput, MMMInputFormat, PackedExoticFact, PackedMatrixStorage,
};
use tract_nnef::tract_core::tract_linalg::pack::PackedI8K4;

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

/// `QuantizeU8` writing its bytes where tract's int8 kernels read them: shifted to i8 (tract's
/// `OffsetU8asI8`) and packed into `PackedI8K4` panels (tract's `OptMatMulPack`), in one pass.
/// tract's packer moves one byte at a time: 11 us for each [96, 512] input of the default
/// model's MLP down projections, where quantizing the same takes ~1.5 us. The input f32 [mn, k]
/// (or [mn, ...], the axes after the first k); the output the packed value tract's products take
/// (`packers`, from the replaced pack's output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizePacked {
    pub quantize: QuantizeLinearU8,
    pub format: PackedI8K4,
    pub packers: Vec<Box<dyn MMMInputFormat>>,
}

/// Rows of `k` values of `x` quantized (`quantize`, shifted to i8) into `r`-row panels of
/// `PackedI8K4`: a panel holds, for each group of 4 values, that group of each of its rows one
/// after the other (4 r bytes). `row` is a row's scratch, padded to whole groups (with zeros,
/// whose bytes are the padding).
#[inline(always)]
fn quantize_packed(
    x: &[f32],
    k: usize,
    q: &QuantizeLinearU8,
    r: usize,
    out: &mut [u8],
    row: &mut [u8],
) {
    let panel_len = k.div_ceil(4) * 4 * r;
    for (m, x) in x.chunks_exact(k).enumerate() {
        quantize(x, &mut row[..k], q.scale, q.zero_point as f32);
        // i8 = u8 - 128: the top bit flipped.
        row[..k].iter_mut().for_each(|b| *b ^= 0x80);
        let panel = &mut out[m / r * panel_len..][..panel_len];
        for (groups, bytes) in panel.chunks_exact_mut(4 * r).zip(row.chunks_exact(4)) {
            groups[m % r * 4..][..4].copy_from_slice(bytes);
        }
    }
}

impl Op for QuantizePacked {
    fn name(&self) -> StaticName {
        "QuantizePacked".into()
    }
    op_as_typed_op!();
}

impl EvalOp for QuantizePacked {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let Some((&mn, rest)) = x.shape().split_first() else {
            bail!("QuantizePacked of a scalar")
        };
        let k = rest.iter().product();
        let r = self.format.r;
        let len = self.format.len(k, mn);
        // Safety: filled below where the rows leave gaps (a last group of fewer than 4 values, a
        // last panel of fewer rows), else every byte is written.
        let mut blob = unsafe { Blob::new_for_size_and_align(len, self.format.alignment()) };
        if k % 4 != 0 || mn % r != 0 {
            blob.as_bytes_mut().fill(0);
        }
        // A row's scratch, zero after its `k` values (the padding of its last group).
        let mut row = vec![0u8; k.div_ceil(4) * 4];
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        let out = blob.as_bytes_mut();
        lanes::widest(
            #[inline(always)]
            || quantize_packed(xs, k, &self.quantize, r, out, &mut row),
        );
        let value = EagerPackedInput {
            fact: PackedExoticFact { format: Box::new(self.format.clone()), mn: mn.to_dim(), k },
            packed: Arc::new(blob),
            panel_bytes: self.format.single_panel_len(k),
            mn,
        };
        let packed = PackedMatrixStorage::new_batched(&[], tvec![Box::new(value) as _]);
        Ok(tvec!(packed.into_tensor(DatumType::I8).into_tvalue()))
    }
}

impl TypedOp for QuantizePacked {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == DatumType::F32 && inputs[0].rank() >= 2);
        let (mn, rest) = (inputs[0].shape[0].clone(), &inputs[0].shape[1..]);
        let k = rest.iter().product::<TDim>();
        let exotic = DynPackedExoticFact { k, mn, packers: self.packers.clone() };
        Ok(tvec!(i8::fact::<[usize; 0]>([]).with_exotic_fact(exotic)))
    }
    as_op!();
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

    /// The same panels as tract's quantization, shift to i8 and packing: the default model's
    /// MLP input, and rows and groups left part-filled.
    #[test]
    fn quantize_packed_gives_tracts_panels() -> TractResult<()> {
        for [mn, k] in [[96, 512], [13, 10], [5, 3]] {
            let x: Vec<f32> = (0..mn * k).map(|i| (i as f32 * 0.37).sin() * 40.0).collect();
            let q = QuantizeLinearU8 { scale: 3.1, zero_point: 120 };
            let format = PackedI8K4::new(16);
            let i8s: Vec<i8> = x
                .iter()
                .map(|&v| {
                    (quantize_linear_f32_u8(v, q.scale, q.zero_point as i32) as i32 - 128) as i8
                })
                .collect();
            let i8s = Tensor::from_shape(&[mn, k], &i8s)?;
            let expected = format.pack_view(&i8s.view(), 1, 0)?;
            let expected = expected.downcast_ref::<EagerPackedInput>().context("eager")?;
            let op = QuantizePacked {
                quantize: q,
                format: format.clone(),
                packers: vec![Box::new(format)],
            };
            // As [mn, k], and with k in two axes (a per-head input).
            for shape in [vec![mn, k], vec![mn, 2, k / 2]]
                .into_iter()
                .filter(|s| s.iter().product::<usize>() == mn * k)
            {
                let x = Tensor::from_shape(&shape, &x)?.into_tvalue();
                let found = op.eval(&EvalContext::out_of_plan(), tvec!(x))?.remove(0);
                let found = found.try_storage_as::<PackedMatrixStorage>()?.value();
                let found = found.downcast_ref::<EagerPackedInput>().context("eager")?;
                assert_eq!(found.packed.as_bytes(), expected.packed.as_bytes(), "{shape:?}");
                assert_eq!((found.panel_bytes, found.mn), (expected.panel_bytes, expected.mn));
            }
        }
        Ok(())
    }

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
