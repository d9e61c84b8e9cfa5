//! Which of tract-linalg's f32 tiles the CPU plans' matrix products run on, where that was
//! measured to beat tract's own choice (issue 4; BENCHMARKS.md, "The products' tile").
//!
//! tract-linalg picks a product's kernel by asking a ladder of tiers, highest precedence first,
//! and takes the first kernel named. On AMD CPUs with AVX-512 its tier weighs the tiles with a
//! cost model fitted on a Ryzen 9 9950X3D, which picks the 16x12 tile for every product of the
//! default model. On a Zen 5 EPYC the 32x6 tile runs each of them 4-8% faster in isolation, and
//! products of up to 2048 x 2048 weights too (`runtime/examples/tiles.rs`); a whole step is
//! 10-12% faster. Per step along k the 32x6 loads 8 vectors for 12 multiply-adds, the 16x12 13;
//! tract's model charges the 32x6 for streaming the weights twice as often, which costs less
//! than that here. Every tile sums each output in the same order, so the choice changes no
//! result.
//!
//! This tier, asked before tract's, names the 32x6 where it was measured and nowhere else: on
//! Zen 5 or later AMD cores, for f32 products whose sizes are known when the plan is made (the
//! sampler fixes the batch) and fill the tile. Any other product, and every product elsewhere,
//! runs on tract's choice.

use std::sync::atomic::AtomicBool;
use tract_nnef::prelude::DatumType;

/// Whether plans made from now on use this tier; off, every product runs on tract's choice. For
/// measurements: `runtime/examples/plan_profile.rs` times both in one process.
pub static ENABLED: AtomicBool = AtomicBool::new(true);

/// The kernel: 32 rows (the product's m axis, output features) by 6 columns (n, positions).
pub const TILE: &str = "avx512_mmm_f32_32x6";
const TILE_M: usize = 32;
const TILE_N: usize = 6;

/// The tile for an `m x n` product accumulated in `accumulator`, on a CPU where the tier
/// applies; `None` leaves the choice to tract.
pub fn tile_for(accumulator: DatumType, m: usize, n: usize) -> Option<&'static str> {
    (accumulator == DatumType::F32 && m >= TILE_M && n >= TILE_N).then_some(TILE)
}

/// Whether this CPU's plans use `tile_for`: AMD Zen 5 or later (CPU family 0x1A and up) with
/// AVX-512.
#[cfg(target_arch = "x86_64")]
pub fn applies() -> bool {
    static ANSWER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ANSWER.get_or_init(|| {
        // CPUID leaf 0 names the vendor; leaf 1's eax holds the family, extended past 0xF.
        let vendor = std::arch::x86_64::__cpuid(0);
        let amd = [vendor.ebx, vendor.edx, vendor.ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163];
        let eax = std::arch::x86_64::__cpuid(1).eax;
        let family = ((eax >> 8) & 0xf) + ((eax >> 20) & 0xff);
        amd && family >= 0x1a && std::arch::is_x86_feature_detected!("avx512f")
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub fn applies() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
mod tier {
    use std::sync::atomic::Ordering;
    use tract_nnef::prelude::DatumType;
    use tract_nnef::tract_core::tract_linalg::isa::{Arch, Isa, IsaSet};
    use tract_nnef::tract_core::tract_linalg::mmm::{Query, Suitable};
    use tract_nnef::tract_core::tract_linalg::mmm_tiers::MmmTier;

    fn preferred(
        _: &IsaSet,
        acc: DatumType,
        query: &Query,
        _: &[Suitable],
    ) -> Option<&'static str> {
        if !super::ENABLED.load(Ordering::Relaxed) {
            return None;
        }
        super::tile_for(acc, query.m?, query.n?)
    }

    inventory::submit! {
        MmmTier {
            arch: Some(Arch::X86_64),
            // Above every tier tract declares for x86_64 (the highest, AMX int8, is 7).
            precedence: 10,
            name: "chardiff-zen5-f32",
            // The instruction set tract-linalg sees (`TRACT_CPU_ISA` can take AVX-512 away).
            applies: |isa| isa.has(Isa::X86_64Avx512f) && super::applies(),
            preferred,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use tract_nnef::prelude::*;
    use tract_nnef::tract_core::ops::einsum::EinSum;
    use tract_nnef::tract_core::ops::matmul::optimized::OptMatMul;

    #[test]
    fn the_tile_is_for_f32_products_that_fill_it() {
        assert_eq!(tile_for(DatumType::F32, 512, 96), Some(TILE));
        assert_eq!(tile_for(DatumType::F32, 32, 6), Some(TILE));
        assert_eq!(tile_for(DatumType::F32, 16, 96), None, "half a tile of rows");
        assert_eq!(tile_for(DatumType::F32, 512, 4), None, "a tile's columns unfilled");
        assert_eq!(tile_for(DatumType::I32, 512, 96), None, "int8 products");
    }

    /// A product of a [96, 128] activation with [128, 512] weights, optimized with the tier on and
    /// off: the same outputs to the bit, and the tile where the tier applies.
    #[test]
    fn the_tile_changes_no_result() -> TractResult<()> {
        let plan = |own_tiles: bool| -> TractResult<_> {
            let mut model = TypedModel::default();
            let w: Vec<f32> = (0..128 * 512).map(|i| (i as f32 * 0.37).sin()).collect();
            let w = model.add_const("w", Tensor::from_shape(&[128, 512], &w)?)?;
            let x = model.add_source("x", f32::fact([96, 128]))?;
            let product = EinSum::new("ik,kn->in".parse()?, f32::datum_type());
            let y = model.wire_node("y", product, &[x, w])?[0];
            model.select_output_outlets(&[y])?;
            ENABLED.store(own_tiles, Ordering::Relaxed);
            let model = model.into_optimized();
            ENABLED.store(true, Ordering::Relaxed);
            let model = model?;
            let kernels: Vec<String> = (model.nodes().iter())
                .filter_map(|n| n.op_as::<OptMatMul>())
                .flat_map(|op| op.mmm.iter().map(|k| k.name().to_string()))
                .collect();
            Ok((kernels, model.into_runnable()?))
        };
        let x =
            tract_ndarray::Array2::from_shape_fn((96, 128), |(i, k)| ((i * 128 + k) as f32).cos());
        let x = tvec!(x.into_tensor().into_tvalue());
        let (tract_kernels, tract_plan) = plan(false)?;
        let (kernels, own_plan) = plan(true)?;
        assert_eq!(kernels == [TILE], applies(), "{kernels:?} (tract's: {tract_kernels:?})");
        let (expected, found) = (tract_plan.run(x.clone())?, own_plan.run(x)?);
        assert_eq!(
            expected[0].to_plain_array_view::<f32>()?,
            found[0].to_plain_array_view::<f32>()?
        );
        Ok(())
    }
}
