//! Reductions over f32 rows written so that the compiler vectorizes them: `LANES` accumulators
//! kept apart (one AVX-512 register of f32, two AVX2 ones), combined at the end. They are inlined
//! into the functions the CPU plans' operators build for the CPU's vector instructions
//! (`#[target_feature]`), and vectorize for those.

pub const LANES: usize = 16;

/// The sum of `term` of each value of `row`.
#[inline(always)]
pub fn sum(row: &[f32], term: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&x| term(x)).sum();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += term(x);
        }
    }
    lanes.into_iter().sum::<f32>() + tail
}

/// The largest value of `row` (minus infinity for none).
#[inline(always)]
pub fn max(row: &[f32]) -> f32 {
    let greater = |a: f32, b: f32| if b > a { b } else { a };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| greater(m, x));
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = greater(*lane, x);
        }
    }
    lanes.into_iter().fold(tail, greater)
}

/// Runs `f` compiled for AVX-512, else AVX2 and FMA, as far as the CPU has them (x86_64; else
/// as built): `f` is inlined into a function built for those instructions, and the loops inlined
/// into `f` vectorize for them. `f` must be an `#[inline(always)]` closure: left to itself the
/// compiler built the larger ones (a LayerNorm, a softmax) apart, for the baseline instruction
/// set, 2-4x slower.
#[inline(always)]
pub fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if is_x86_feature_detected!("avx512f") {
            // Safety: the CPU has AVX-512F.
            return unsafe { avx512(f) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // Safety: the CPU has AVX2 and FMA.
            return unsafe { avx2(f) };
        }
    }
    f()
}
