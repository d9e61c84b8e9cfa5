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
