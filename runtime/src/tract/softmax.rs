//! The attention's softmax, stage by stage over the whole buffer of rows (issue 4; BENCHMARKS.md,
//! "The attention's softmax, LayerNorm and the MLP's hidden layout").
//!
//! tract's softmax op hands a buffer of contiguous rows to a rows kernel where tract-linalg has
//! one (arm64 and wasm do); on x86_64 it has none, and each row runs three kernels (max, exp and
//! sum, scale), each padding the row's tail through a scratch buffer: the default model's 96-long
//! rows took ~1 ns an element, a tenth of a step. `softmax_rows` is such a rows kernel: each
//! row's max subtracted, then tract's own exp kernel over the whole buffer in one call, then each
//! row scaled by its sum's reciprocal. On x86_64 it is registered with tract-linalg, so tract's
//! softmax op runs it where its rows are a multiple of 4 long. `RowSoftmax`, the CPU plans' own
//! softmax operator, runs it on rows of any length, and adds the attention's bias in its first
//! pass over each row, where tract would add the bias in a pass of its own.
//!
//! The max, sum and scale loops keep 16 lanes apart (`lanes`), so the compiler vectorizes them
//! for the instruction set each entry is compiled for. Sums are taken in another order than
//! tract's, and the exp is tract's exp kernel rather than its softmax's own fit: the results
//! differ from tract's in the last bits (~4e-7 relative).

use super::lanes;
use std::sync::Arc;
use tract_nnef::internal::*;
use tract_nnef::tract_core::tract_linalg::element_wise::ElementWise;
use tract_nnef::tract_core::tract_linalg::Func;

/// tract-linalg's exp kernel for this machine, made once.
fn exp_kernel() -> Option<&'static dyn ElementWise<f32>> {
    static KERNEL: std::sync::OnceLock<Option<Box<dyn ElementWise<f32>>>> =
        std::sync::OnceLock::new();
    KERNEL.get_or_init(|| Func::Exp.ew_f32().ok()).as_deref()
}

/// The softmax of each `row_len`-long row of `rows` plus `bias` (whole rows, repeated as often
/// as it fits), in place.
#[inline(always)]
fn softmax_rows(rows: &mut [f32], row_len: usize, bias: &[f32]) {
    if row_len == 0 {
        return;
    }
    exponentials(rows, row_len, bias);
    for row in rows.chunks_exact_mut(row_len) {
        let scale = lanes::sum(row, |x| x).recip();
        row.iter_mut().for_each(|x| *x *= scale);
    }
}

/// The softmax of each row before its normalization: `exp(x + bias - max(x + bias))`, in place.
#[inline(always)]
pub(super) fn exponentials(rows: &mut [f32], row_len: usize, bias: &[f32]) {
    if row_len == 0 {
        return;
    }
    let mut bias_rows = bias.chunks_exact(row_len).cycle();
    for row in rows.chunks_exact_mut(row_len) {
        if let Some(bias) = bias_rows.next() {
            row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
        }
        let max = lanes::max(row);
        row.iter_mut().for_each(|x| *x -= max);
    }
    // The kernel cannot fail on a plain f32 slice; were it missing, libm's exp gives the same
    // answer, slower.
    if exp_kernel().is_none_or(|exp| exp.run(rows).is_err()) {
        rows.iter_mut().for_each(|x| *x = x.exp());
    }
}

#[cfg(target_arch = "x86_64")]
mod entries {
    use tract_nnef::tract_core::tract_linalg::isa::{Arch, Isa, IsaReq};
    use tract_nnef::tract_core::tract_linalg::routines::{Routine, RoutineFactory};
    use tract_nnef::tract_core::tract_linalg::Func;

    #[target_feature(enable = "avx512f")]
    fn avx512(rows: &mut [f32], row_len: usize, bias: &[f32]) {
        super::softmax_rows(rows, row_len, bias)
    }

    #[target_feature(enable = "avx2,fma")]
    fn avx2(rows: &mut [f32], row_len: usize, bias: &[f32]) {
        super::softmax_rows(rows, row_len, bias)
    }

    fn softmax_rows_avx512(rows: &mut [f32], row_len: usize) {
        // Safety: tract-linalg calls this entry only where its instruction set, which can only
        // take features away from the probed one (`TRACT_CPU_ISA`), has AVX-512F.
        unsafe { avx512(rows, row_len, &[]) }
    }

    fn softmax_rows_avx2(rows: &mut [f32], row_len: usize) {
        // Safety: as above, where it has AVX2 and FMA.
        unsafe { avx2(rows, row_len, &[]) }
    }

    /// tract-linalg prefers the entry of the highest instruction set the machine has.
    const fn entry(
        needs: &'static [Isa],
        name: &'static str,
        run: fn(&mut [f32], usize),
    ) -> Routine {
        Routine {
            func: Func::SoftmaxRows,
            arch: Some(Arch::X86_64),
            isa: IsaReq { needs },
            boost: 0,
            round_trip: false,
            factory: RoutineFactory::SoftmaxRowsF32 { name, run },
        }
    }

    inventory::submit! {
        entry(&[Isa::X86_64Avx512f], "chardiff_avx512_softmax_rows_f32", softmax_rows_avx512)
    }
    const AVX2_FMA: &[Isa] = &[Isa::X86_64Avx2, Isa::X86_64Fma];
    inventory::submit! {
        entry(AVX2_FMA, "chardiff_avx2_softmax_rows_f32", softmax_rows_avx2)
    }
}

/// `softmax_rows` built for the widest vector instructions this CPU has.
fn widest_softmax_rows(rows: &mut [f32], row_len: usize, bias: &[f32]) {
    lanes::widest(
        #[inline(always)]
        || softmax_rows(rows, row_len, bias),
    )
}

/// `softmax(x + bias)` over the last axis of f32 `x`, `bias` (if any) a constant of the shape of
/// `x`'s trailing axes (broadcast over the leading ones).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct RowSoftmax {
    pub bias: Option<Arc<Tensor>>,
}

impl RowSoftmax {
    /// Whether `bias` fits `x`'s shape as `RowSoftmax` reads it.
    pub fn fits(x: &[usize], bias: &[usize]) -> bool {
        let bias = &bias[bias.iter().take_while(|&&d| d == 1).count()..];
        !bias.is_empty() && x.ends_with(bias)
    }
}

impl Op for RowSoftmax {
    fn name(&self) -> StaticName {
        "RowSoftmax".into()
    }
    op_as_typed_op!();
}

impl EvalOp for RowSoftmax {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut x = args_1!(inputs).into_tensor();
        let row_len = *x.shape().last().context("a scalar")?;
        if let Some(bias) = &self.bias {
            ensure!(Self::fits(x.shape(), bias.shape()), "{:?} + {bias:?}", x.shape());
        }
        let bias = self.bias.as_ref().map(|b| b.try_as_plain_ram()).transpose()?;
        let bias = bias.as_ref().map(|b| b.as_slice()).transpose()?.unwrap_or(&[]);
        widest_softmax_rows(x.try_as_plain_ram_mut()?.as_slice_mut()?, row_len, bias);
        Ok(tvec!(x.into_tvalue()))
    }
}

impl TypedOp for RowSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == DatumType::F32);
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tract's softmax op without a rows kernel: three kernels per row.
    fn tract_rows(rows: &mut [f32], row_len: usize) {
        let max = Func::ReduceMax.reduce_f32().unwrap();
        let exp_sum = Func::Softmax2.map_reduce_f32().unwrap();
        let scale = Func::MulByScalar.ew_f32_param().unwrap();
        for row in rows.chunks_exact_mut(row_len) {
            let m = max.run(row).unwrap();
            let sum = exp_sum.run_with_params(row, m).unwrap();
            scale.run_with_params(row, sum.recip()).unwrap();
        }
    }

    /// Rows of attention-like scores: spread over tens, some far below their row's max (whose
    /// exponentials vanish), one row constant, lengths with and without a tail of lanes.
    fn scores(rows: usize, row_len: usize) -> Vec<f32> {
        (0..rows * row_len)
            .map(|i| match i / row_len {
                0 => 1.5,
                r => ((i * 7919) % 1000) as f32 / 1000.0 * (r % 7) as f32 * 20.0 - 30.0,
            })
            .collect()
    }

    fn assert_close(expected: &[f32], found: &[f32], row_len: usize) {
        for (row, (e, f)) in expected.chunks(row_len).zip(found.chunks(row_len)).enumerate() {
            let total: f32 = f.iter().sum();
            assert!((total - 1.0).abs() < 1e-6, "row {row} of {row_len} sums to {total}");
            for (e, f) in e.iter().zip(f) {
                assert!((e - f).abs() <= 1e-6 * e.abs().max(1e-30), "{e} vs {f}");
            }
        }
    }

    #[test]
    fn rows_match_tracts_row_kernels() {
        for row_len in [96, 82, 16, 5, 300] {
            let mut expected = scores(12, row_len);
            let mut found = expected.clone();
            tract_rows(&mut expected, row_len);
            widest_softmax_rows(&mut found, row_len, &[]);
            assert_close(&expected, &found, row_len);
        }
    }

    /// The bias of 3 rows, repeated over 12 rows, as tract would add it before its softmax.
    #[test]
    fn the_bias_is_added_row_by_row() -> TractResult<()> {
        let row_len = 96;
        let x = scores(12, row_len);
        let bias: Vec<f32> = (0..3 * row_len).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let mut expected: Vec<f32> =
            (x.iter().enumerate()).map(|(i, v)| v + bias[i % bias.len()]).collect();
        tract_rows(&mut expected, row_len);
        let bias = Tensor::from_shape(&[1, 3, row_len], &bias)?;
        let op = RowSoftmax { bias: Some(Arc::new(bias)) };
        let x = Tensor::from_shape(&[4, 3, row_len], &x)?;
        let found = op.eval(&EvalContext::out_of_plan(), tvec!(x.into_tvalue()))?.remove(0);
        assert_close(&expected, found.try_as_plain_ram()?.as_slice()?, row_len);
        Ok(())
    }

    #[test]
    fn the_bias_fits_the_trailing_axes() {
        assert!(RowSoftmax::fits(&[4, 96, 96], &[4, 96, 96]));
        assert!(RowSoftmax::fits(&[8, 4, 96, 96], &[1, 4, 96, 96]));
        assert!(!RowSoftmax::fits(&[4, 96, 96], &[4, 1, 96]), "broadcast inside");
        assert!(RowSoftmax::fits(&[4, 96, 96], &[1, 96]), "one bias row for all");
        assert!(!RowSoftmax::fits(&[4, 96, 96], &[1, 1]), "a scalar");
    }

    /// tract-linalg runs the rows kernel wherever the CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tract_runs_it() {
        use tract_nnef::tract_core::tract_linalg::{isa, routines};
        let here = routines::best_for(Func::SoftmaxRows, DatumType::F32, &isa::native());
        let name = here.map(|routine| routine.name());
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        assert_eq!(name.is_some_and(|n| n.starts_with("chardiff_")), avx2, "{name:?}");
    }
}
