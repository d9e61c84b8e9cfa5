//! The attention of one sequence as one operator of the CPU plans: per head, the scores, their
//! biased softmax and the values' weighted sum, a few rows of queries at a time (issue 4;
//! BENCHMARKS.md, "The attention in one operator").
//!
//! tract runs the default model's attention per layer as two products of 4 heads of [96, 32] by
//! [32, 96] each, with the softmax between: ~35 us of products on panels of 96 x 96 scores, and
//! ~20 us of packing their four inputs, three of them transposed. Here every input is read where
//! it lies: a head's keys transposed once into a [32, 96] block, then for each few queries their
//! scores (queries broadcast against rows of the transposed keys, the bias added as they are
//! stored), the exponentials of their softmax (`softmax::exponentials`), and their weighted sum
//! of the values (exponentials broadcast against rows of values) divided by their sum. Scores
//! and exponentials never leave a few rows of L1.
//!
//! The tiles keep their sums in registers: `ROWS` queries by 32 keys (scores) or by 32 of a
//! head's features (values), two vectors of 16 lanes each: 6 queries, 12 registers, with AVX-512;
//! 3 queries, 12 registers of 8 lanes, with AVX2. Each sum runs over its terms in order, as a
//! product would; the results differ from tract's in the last bits.

use super::{lanes, softmax};
use std::sync::Arc;
use tract_nnef::internal::*;

const LANES: usize = lanes::LANES;
/// Keys per scores tile, a head's features per values tile: two vectors.
const TILE: usize = 2 * LANES;
type Vector = [f32; LANES];

/// `softmax(q k^T + bias) v` per head, for `q`, `k`, `v` of shape [positions, heads, features]
/// or [positions, features] (one head; the queries already scaled), the output of the same shape
/// or, `heads_first`, [heads, positions, features] (as tract's NNEF reading lays it out).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Attention {
    pub bias: Bias,
    pub joined: Option<Joined>,
    pub heads_first: bool,
}

/// The queries, keys and values as one input, their features side by side, [positions, 3 x
/// heads x features], as one product of the three projections gives them; the queries not yet
/// scaled.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Joined {
    /// The output's: [positions, heads, features] or [positions, features].
    pub shape: TVec<usize>,
    /// What multiplies the scores: the queries' scale.
    pub scale: Arc<Tensor>,
}

/// The constant added to the scores [heads, positions, positions].
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Bias {
    None,
    /// Rows of the scores' trailing axes, repeated over the leading ones (as `RowSoftmax` takes
    /// it): [positions], [positions, positions] or [heads, positions, positions].
    Rows(Arc<Tensor>),
    /// One value per head (or one head's for all) and offset `j - i` of key `j` from query `i`,
    /// at `j - i + positions - 1`: [heads or 1, 2 positions - 1]. A relative position bias, as
    /// the default model's is, read from 3 KB a layer where its rows take 147 KB.
    Offsets(Arc<Tensor>),
}

impl Bias {
    /// `bias` of the scores' trailing axes (as `RowSoftmax` takes it), as offsets where each
    /// head's is constant along its diagonals.
    pub fn of(bias: Arc<Tensor>, positions: usize) -> TractResult<Bias> {
        let values = bias.cast_to::<f32>()?;
        let values = values.try_as_plain_ram()?;
        let values = values.as_slice::<f32>()?;
        let square = positions * positions;
        if values.len() % square != 0 || values.is_empty() {
            return Ok(Bias::Rows(bias));
        }
        let mut offsets = vec![];
        for head in values.chunks_exact(square) {
            let at = |i: usize, j: usize| head[i * positions + j];
            // Row 0 gives the offsets 0.., column 0 the offsets ..0.
            let mut diagonals: Vec<f32> = (1..positions).rev().map(|i| at(i, 0)).collect();
            diagonals.extend((0..positions).map(|j| at(0, j)));
            let row = |i: usize| &diagonals[positions - 1 - i..][..positions];
            if (0..positions).any(|i| head[i * positions..][..positions] != *row(i)) {
                return Ok(Bias::Rows(bias));
            }
            offsets.extend(diagonals);
        }
        let heads = values.len() / square;
        Ok(Bias::Offsets(Arc::new(Tensor::from_shape(&[heads, 2 * positions - 1], &offsets)?)))
    }

    /// Where head `h`'s bias rows start in the bias's `len` values, and the step from one
    /// query's row to the next (`None` for no bias): query `i`'s `positions` values start at
    /// `start + i * step`.
    fn head_rows(&self, len: usize, h: usize, positions: usize) -> Option<(usize, isize)> {
        let p = positions as isize;
        match self {
            Bias::None => None,
            // One row for all, or a head's rows (or those of the only head).
            Bias::Rows(_) if len == positions => Some((0, 0)),
            Bias::Rows(_) => Some(((h * positions * positions) % len, p)),
            // Query i's row starts at offset -i: `positions - 1 - i`.
            Bias::Offsets(_) => {
                let width = 2 * positions - 1;
                Some(((h % (len / width)) * width + positions - 1, -1))
            }
        }
    }

    fn tensor(&self) -> Option<&Arc<Tensor>> {
        match self {
            Bias::None => None,
            Bias::Rows(t) | Bias::Offsets(t) => Some(t),
        }
    }

    /// Whether the bias fits scores [heads, positions, positions].
    fn fits(&self, heads: usize, positions: usize) -> bool {
        match self {
            Bias::None => true,
            Bias::Rows(t) => softmax::RowSoftmax::fits(&[heads, positions, positions], t.shape()),
            Bias::Offsets(t) => {
                matches!(*t.shape(), [h, w] if (h == 1 || h == heads) && w == 2 * positions - 1)
            }
        }
    }
}

impl Attention {
    /// Whether the operator gives an output of `shape` with its bias: a whole number of values
    /// tiles per head.
    pub fn fits(&self, shape: &[usize]) -> bool {
        let Some([positions, heads, features]) = self.dims(shape) else { return false };
        positions > 0
            && features > 0
            && features.is_multiple_of(TILE)
            && self.bias.fits(heads, positions)
    }

    /// Positions, heads and features of an output of `shape`.
    fn dims(&self, shape: &[usize]) -> Option<[usize; 3]> {
        match (self.heads_first, shape) {
            (true, &[heads, positions, features]) | (false, &[positions, heads, features]) => {
                Some([positions, heads, features])
            }
            (false, &[positions, features]) => Some([positions, 1, features]),
            _ => None,
        }
    }

    /// The output's shape for queries of `shape`.
    pub fn output_shape<D: Clone>(&self, queries: &[D]) -> TVec<D> {
        match (self.heads_first, queries) {
            (true, [positions, heads, features]) => {
                tvec![heads.clone(), positions.clone(), features.clone()]
            }
            _ => queries.into(),
        }
    }
}

/// The multiply-add of the tiles: fused where the instructions are built for FMA, two operations
/// in the baseline build (where `mul_add` would be a call into libm).
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

struct Fused;
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Separate;
impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `acc += a * b`, lane by lane.
#[inline(always)]
fn accumulate<M: MulAdd>(acc: &mut Vector, a: f32, b: &Vector) {
    for lane in 0..LANES {
        acc[lane] = M::mul_add(a, b[lane], acc[lane]);
    }
}

/// The two vectors at the start of `row`.
#[inline(always)]
fn tile_of(row: &[f32]) -> (&Vector, &Vector) {
    let (a, b) = row[..TILE].split_at(LANES);
    (a.try_into().unwrap(), b.try_into().unwrap())
}

/// `ROWS` sums of two vectors each: for each of `terms` rows of `tiles` (one every `stride`,
/// two vectors each), sum `r` plus the row times its weight, the `i`th term's weight of sum `r`
/// at `weights[r * weights_stride + i]`.
#[inline(always)]
fn tile_sums<M: MulAdd, const ROWS: usize>(
    (weights, weights_stride): (&[f32], usize),
    tiles: &[f32],
    stride: usize,
    terms: usize,
) -> [[Vector; 2]; ROWS] {
    let mut acc = [[[0f32; LANES]; 2]; ROWS];
    if terms == 0 {
        return acc;
    }
    // Bounds checked once here rather than at each load of the loop.
    assert!(weights.len() >= (ROWS - 1) * weights_stride + terms);
    assert!(tiles.len() >= (terms - 1) * stride + TILE);
    for i in 0..terms {
        // Safety: within the lengths asserted above.
        let tile = unsafe { tiles.get_unchecked(i * stride..i * stride + TILE) };
        let (low, high) = tile_of(tile);
        for (r, [acc_low, acc_high]) in acc.iter_mut().enumerate() {
            // Safety: as above.
            let w = unsafe { *weights.get_unchecked(r * weights_stride + i) };
            accumulate::<M>(acc_low, w, low);
            accumulate::<M>(acc_high, w, high);
        }
    }
    acc
}

/// The operator's shapes and buffers, as slices: each position's queries, keys and values at
/// the start of its row of `input_row` values of `q`, `k` and `v`; position `i`'s output of head
/// `h` at `i * out_strides.0 + h * out_strides.1`.
struct Heads<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    input_row: usize,
    scale: f32,
    bias: (&'a Bias, &'a [f32]),
    out: &'a mut [f32],
    out_strides: (usize, usize),
    positions: usize,
    heads: usize,
    features: usize,
}

/// The attention of every head, `ROWS` queries at a time.
#[inline(always)]
fn attention<M: MulAdd, const ROWS: usize>(a: Heads) {
    let Heads { q, k, v, input_row, scale, bias, out, out_strides, positions, heads, features } = a;
    // The keys' side padded to whole tiles with zero keys, whose scores are never read.
    let stride = positions.div_ceil(TILE) * TILE;
    let mut kt = vec![0f32; features * stride];
    let mut scores = vec![0f32; ROWS * positions];
    let mut last_queries = vec![0f32; ROWS * features];
    let (bias, bias_values) = bias;
    for h in 0..heads {
        transpose(&k[h * features..], input_row, positions, features, &mut kt, stride);
        let head_bias = bias.head_rows(bias_values.len(), h, positions);
        for first in (0..positions).step_by(ROWS) {
            let rows = ROWS.min(positions - first);
            let block = first * input_row + h * features;
            // A last block of fewer queries is copied out, after zeros, whose scores are not kept.
            let queries = if rows == ROWS {
                (&q[block..], input_row)
            } else {
                for (r, query) in last_queries.chunks_exact_mut(features).take(rows).enumerate() {
                    query.copy_from_slice(&q[block + r * input_row..][..features]);
                }
                (&last_queries[..], features)
            };
            for j in (0..stride).step_by(TILE) {
                let acc = tile_sums::<M, ROWS>(queries, &kt[j..], stride, features);
                let kept = TILE.min(positions - j);
                let rows_of_scores = scores.chunks_exact_mut(positions).zip(&acc);
                for (r, (scores, acc)) in rows_of_scores.enumerate().take(rows) {
                    let (scores, acc) = (&mut scores[j..j + kept], &acc.as_flattened()[..kept]);
                    match head_bias {
                        None => scores.iter_mut().zip(acc).for_each(|(s, a)| *s = a * scale),
                        Some((start, step)) => {
                            let at = (start as isize + (first + r) as isize * step) as usize + j;
                            (scores.iter_mut().zip(acc).zip(&bias_values[at..at + kept]))
                                .for_each(|((s, a), b)| *s = a * scale + b)
                        }
                    }
                }
            }
            // The softmax's exponentials; their sums divide the weighted sums of the values
            // (32 values a row rather than 96 probabilities).
            let exponentials = &mut scores[..rows * positions];
            softmax::exponentials(exponentials, positions, &[]);
            let mut sums = [1f32; ROWS];
            for (sum, row) in sums.iter_mut().zip(exponentials.chunks_exact(positions)) {
                *sum = lanes::sum(row, |x| x).recip();
            }
            // (In a last block of fewer queries, the rows after them hold zeros or earlier
            // exponentials, whose sums are not kept.)
            let weights = (&scores[..], positions);
            for c in (0..features).step_by(TILE) {
                let values = &v[h * features + c..];
                let acc = tile_sums::<M, ROWS>(weights, values, input_row, positions);
                for (r, (acc, scale)) in acc.iter().zip(sums).enumerate().take(rows) {
                    let at = (first + r) * out_strides.0 + h * out_strides.1 + c;
                    let out = out[at..at + TILE].iter_mut().zip(acc.as_flattened());
                    out.for_each(|(y, x)| *y = x * scale);
                }
            }
        }
    }
}

/// `rows` rows of `columns` values, one row every `row_stride` values of `from`, transposed into
/// `to`: column `i` at `to[i * to_stride..]`.
#[inline(always)]
fn transpose(
    from: &[f32],
    row_stride: usize,
    rows: usize,
    columns: usize,
    to: &mut [f32],
    to_stride: usize,
) {
    assert!(from.len() >= (rows - 1) * row_stride + columns);
    assert!(to.len() >= (columns - 1) * to_stride + rows);
    // Safety: the lengths are asserted above.
    let done =
        unsafe { transposed_blocks(from.as_ptr(), row_stride, rows, columns, to, to_stride) };
    for i in 0..columns {
        for j in done..rows {
            // Safety: within the lengths asserted above.
            unsafe {
                *to.get_unchecked_mut(i * to_stride + j) = *from.get_unchecked(j * row_stride + i)
            };
        }
    }
}

/// `transpose` of the first rows in whole 16 x 16 blocks through AVX-512 registers, where the
/// CPU has it (the scalar copy, a strided load and a store per value, took ~10% of the
/// attention); the rows done.
///
/// # Safety
/// `rows` rows of `columns` values lie at `from`, one every `row_stride`; `to` holds the
/// transposition.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
unsafe fn transposed_blocks(
    from: *const f32,
    row_stride: usize,
    rows: usize,
    columns: usize,
    to: &mut [f32],
    to_stride: usize,
) -> usize {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        let done = rows / 16 * 16;
        for j in (0..done).step_by(16) {
            for i in (0..columns / 16 * 16).step_by(16) {
                // Safety: the CPU has AVX-512F; the block lies within both buffers.
                unsafe {
                    let (from, to) = (from.add(j * row_stride + i), to.as_mut_ptr());
                    transposed_block(from, row_stride, to.add(i * to_stride + j), to_stride)
                }
            }
            // The columns past the last whole block.
            for i in columns / 16 * 16..columns {
                for r in j..j + 16 {
                    to[i * to_stride + r] = unsafe { *from.add(r * row_stride + i) };
                }
            }
        }
        return done;
    }
    0
}

/// The 16 x 16 block at `from` (rows `from_stride` apart) transposed to `to` (rows `to_stride`
/// apart): pairs of rows interleaved, then pairs of pairs, then 128-bit lanes gathered.
///
/// # Safety
/// The CPU has AVX-512F; 16 rows of 16 values at `from` and at `to` lie in their buffers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transposed_block(from: *const f32, from_stride: usize, to: *mut f32, to_stride: usize) {
    use std::arch::x86_64::*;
    let row = |r: usize| unsafe { _mm512_loadu_ps(from.add(r * from_stride)) };
    // Lane l of pairs[2p] holds a[4l], b[4l], a[4l+1], b[4l+1] of rows a, b = 2p, 2p+1, and
    // pairs[2p+1] the same of 4l+2 and 4l+3.
    let mut pairs = [_mm512_setzero_ps(); 16];
    for p in 0..8 {
        let (a, b) = (row(2 * p), row(2 * p + 1));
        pairs[2 * p] = _mm512_unpacklo_ps(a, b);
        pairs[2 * p + 1] = _mm512_unpackhi_ps(a, b);
    }
    // Lane l of quads[4q + c] holds column 4l + c of rows 4q..4q+4.
    let mut quads = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let (low, high) = (pairs[4 * q], pairs[4 * q + 1]);
        let (low2, high2) = (pairs[4 * q + 2], pairs[4 * q + 3]);
        quads[4 * q] = _mm512_shuffle_ps::<0x44>(low, low2);
        quads[4 * q + 1] = _mm512_shuffle_ps::<0xEE>(low, low2);
        quads[4 * q + 2] = _mm512_shuffle_ps::<0x44>(high, high2);
        quads[4 * q + 3] = _mm512_shuffle_ps::<0xEE>(high, high2);
    }
    // Column 4l + c: lane l of quads[c], quads[4 + c], quads[8 + c], quads[12 + c].
    let store =
        |column: usize, values| unsafe { _mm512_storeu_ps(to.add(column * to_stride), values) };
    for c in 0..4 {
        let (first, second) = (quads[c], quads[4 + c]);
        let (third, fourth) = (quads[8 + c], quads[12 + c]);
        let even = _mm512_shuffle_f32x4::<0x88>(first, second);
        let odd = _mm512_shuffle_f32x4::<0xDD>(first, second);
        let even2 = _mm512_shuffle_f32x4::<0x88>(third, fourth);
        let odd2 = _mm512_shuffle_f32x4::<0xDD>(third, fourth);
        store(c, _mm512_shuffle_f32x4::<0x88>(even, even2));
        store(8 + c, _mm512_shuffle_f32x4::<0xDD>(even, even2));
        store(4 + c, _mm512_shuffle_f32x4::<0x88>(odd, odd2));
        store(12 + c, _mm512_shuffle_f32x4::<0xDD>(odd, odd2));
    }
}

/// `attention` built for the widest vector instructions this CPU has, with tiles that keep
/// their sums in its registers.
fn widest_attention(heads: Heads) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512(heads: Heads) {
            attention::<Fused, 6>(heads)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2(heads: Heads) {
            attention::<Fused, 3>(heads)
        }
        if is_x86_feature_detected!("avx512f") {
            // Safety: the CPU has AVX-512F.
            return unsafe { avx512(heads) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // Safety: the CPU has AVX2 and FMA.
            return unsafe { avx2(heads) };
        }
        attention::<Separate, 1>(heads)
    }
    #[cfg(not(target_arch = "x86_64"))]
    attention::<Fused, 3>(heads)
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        if self.joined.is_some() { "Attention(qkv)" } else { "Attention" }.into()
    }
    op_as_typed_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let shape: TVec<usize> = match &self.joined {
            Some(joined) => joined.shape.clone(),
            None => self.output_shape(inputs[0].shape()),
        };
        ensure!(self.fits(&shape), "attention giving {shape:?}, bias {:?}", self.bias);
        let [positions, heads, features] = self.dims(&shape).context("fits")?;
        let row = heads * features;
        let (scale, input_row, [q, k, v]) = match &self.joined {
            Some(joined) => {
                let qkv = args_1!(inputs);
                ensure!(qkv.shape() == [positions, 3 * row], "{:?} for {shape:?}", qkv.shape());
                (joined.scale.cast_to_scalar::<f32>()?, 3 * row, [qkv.clone(), qkv.clone(), qkv])
            }
            None => {
                let (q, k, v) = args_3!(inputs);
                ensure!(q.len() == positions * row, "queries {:?} for {shape:?}", q.shape());
                ensure!(k.shape() == q.shape() && v.shape() == q.shape(), "{q:?} {k:?} {v:?}");
                (1.0, row, [q, k, v])
            }
        };
        let bias = self.bias.tensor().map(|b| b.try_as_plain_ram()).transpose()?;
        let bias = bias.as_ref().map(|b| b.as_slice::<f32>()).transpose()?.unwrap_or(&[]);
        let mut out = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        let (q, k, v) = (q.try_as_plain_ram()?, k.try_as_plain_ram()?, v.try_as_plain_ram()?);
        // Joined, the keys and values start a head's features after the queries.
        let offsets = if self.joined.is_some() { [0, row, 2 * row] } else { [0; 3] };
        let out_strides =
            if self.heads_first { (features, positions * features) } else { (row, features) };
        let mut out_view = out.try_as_plain_ram_mut()?;
        widest_attention(Heads {
            q: &q.as_slice()?[offsets[0]..],
            k: &k.as_slice()?[offsets[1]..],
            v: &v.as_slice()?[offsets[2]..],
            input_row,
            scale,
            bias: (&self.bias, bias),
            // Safety: `attention` writes every element.
            out: out_view.as_slice_mut()?,
            out_strides,
            positions,
            heads,
            features,
        });
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.iter().all(|fact| fact.datum_type == DatumType::F32));
        Ok(tvec!(match &self.joined {
            Some(joined) => f32::fact(&*joined.shape),
            None => f32::fact(self.output_shape(&inputs[0].shape)),
        }))
    }
    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attention in f64, term by term.
    fn reference(q: &[f32], k: &[f32], v: &[f32], bias: &[f32], [s, h, d]: [usize; 3]) -> Vec<f32> {
        let mut out = vec![0f32; s * h * d];
        let at = |p: usize, head: usize| (p * h + head) * d;
        for head in 0..h {
            for i in 0..s {
                let bias_row = |j: usize| match bias.len() / s {
                    0 => 0.0,
                    n => bias[((head * s + i) % n) * s + j] as f64,
                };
                let scores: Vec<f64> = (0..s)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|c| q[at(i, head) + c] as f64 * k[at(j, head) + c] as f64)
                            .sum();
                        dot + bias_row(j)
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for c in 0..d {
                    let sum: f64 = (0..s).map(|j| e[j] / total * v[at(j, head) + c] as f64).sum();
                    out[at(i, head) + c] = sum as f32;
                }
            }
        }
        out
    }

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * 0.618 + seed).sin()).collect()
    }

    /// A constant's shape and values.
    type ShapedValues = (Vec<usize>, Vec<f32>);

    /// A relative position bias per head: a value per offset j - i.
    fn offsets_bias(heads: usize, positions: usize) -> Vec<f32> {
        let mut bias = vec![];
        for h in 0..heads {
            for i in 0..positions {
                for j in 0..positions {
                    let offset = j as f32 - i as f32;
                    bias.push((offset * 0.3 + h as f32).sin() - 0.1 * offset.abs());
                }
            }
        }
        bias
    }

    #[test]
    fn matches_the_attention_in_f64() -> TractResult<()> {
        // The default model's shape and bias; positions not a multiple of the tiles' rows nor
        // of 32 keys; two values tiles per head; each form of bias.
        let cases: [([usize; 3], Option<ShapedValues>); 5] = [
            ([96, 4, 32], Some((vec![4, 96, 96], offsets_bias(4, 96)))),
            ([13, 3, 32], Some((vec![1, 13, 13], offsets_bias(1, 13)))),
            ([37, 2, 64], Some((vec![37], values(37, 2.9)))),
            ([33, 2, 32], Some((vec![2, 33, 33], values(2 * 33 * 33, 1.9)))),
            ([5, 1, 32], None),
        ];
        for (shape, bias) in cases {
            let len = shape.iter().product();
            let (q, k, v) = (values(len, 0.1), values(len, 0.7), values(len, 1.3));
            let bias_values = bias.as_ref().map(|(_, b)| b.as_slice()).unwrap_or(&[]);
            let expected = reference(&q, &k, &v, bias_values, shape);
            let bias = match bias {
                Some((s, b)) => Bias::of(Arc::new(Tensor::from_shape(&s, &b)?), shape[0])?,
                None => Bias::None,
            };
            // The relative biases are read by offsets, the others by rows.
            let offsets = matches!(bias, Bias::Offsets(_));
            assert_eq!(offsets, [96, 13].contains(&shape[0]), "{shape:?}: {bias:?}");
            let op = Attention { bias, joined: None, heads_first: false };
            assert!(op.fits(&shape));
            let tensor = |x: &[f32]| Tensor::from_shape(&shape, x).map(|t| t.into_tvalue());
            let inputs = tvec!(tensor(&q)?, tensor(&k)?, tensor(&v)?);
            let found = op.eval(&EvalContext::out_of_plan(), inputs)?.remove(0);
            let found = found.try_as_plain_ram()?;
            // Heads first: the same values, [heads, positions, features].
            let heads_first = Attention { heads_first: true, ..op.clone() };
            let inputs = tvec!(tensor(&q)?, tensor(&k)?, tensor(&v)?);
            let by_heads = heads_first.eval(&EvalContext::out_of_plan(), inputs)?.remove(0);
            let [s, h, d] = shape;
            assert_eq!(by_heads.shape(), [h, s, d]);
            let by_heads = by_heads.try_as_plain_ram()?;
            let by_heads = by_heads.as_slice::<f32>()?;
            // Element n of [s, h, d] is at position n / (h d), head n / d % h, feature n % d.
            let by_heads: Vec<f32> = (0..s * h * d)
                .map(|n| by_heads[(n / d % h * s + n / (h * d)) * d + n % d])
                .collect();
            // And each build's tiles, whatever this CPU has.
            let bias_tensor = op.bias.tensor().map(|b| b.try_as_plain_ram()).transpose()?;
            let bias_values = match &bias_tensor {
                Some(b) => b.as_slice::<f32>()?,
                None => &[],
            };
            let mut builds = vec![vec![0f32; len]; 2];
            for (build, out) in builds.iter_mut().enumerate() {
                let [positions, heads, features] = shape;
                let (q, k, v, bias) = (&q[..], &k[..], &v[..], (&op.bias, bias_values));
                let (input_row, scale) = (heads * features, 1.0);
                let out_strides = (heads * features, features);
                let heads = Heads {
                    q,
                    k,
                    v,
                    input_row,
                    scale,
                    bias,
                    out,
                    out_strides,
                    positions,
                    heads,
                    features,
                };
                match build {
                    0 => attention::<Separate, 1>(heads),
                    _ => attention::<Fused, 3>(heads),
                }
            }
            // And the three as one input of the projections side by side, the queries unscaled.
            let scale = 0.25f32;
            let row = len / shape[0];
            let rows = |x: &[f32]| x.chunks_exact(row).map(|r| r.to_vec()).collect::<Vec<_>>();
            let unscaled: Vec<f32> = q.iter().map(|x| x / scale).collect();
            let [q, k, v] = [rows(&unscaled), rows(&k), rows(&v)];
            let qkv: Vec<f32> =
                (0..shape[0]).flat_map(|p| [&q[p], &k[p], &v[p]]).flatten().copied().collect();
            let joined = Joined { shape: shape[..].into(), scale: rctensor0(scale) };
            let op = Attention { joined: Some(joined), ..op };
            let qkv = Tensor::from_shape(&[shape[0], 3 * row], &qkv)?.into_tvalue();
            let joined = op.eval(&EvalContext::out_of_plan(), tvec!(qkv))?.remove(0);
            let joined = joined.try_as_plain_ram()?;
            let builds =
                [found.as_slice::<f32>()?, &builds[0], &builds[1], joined.as_slice()?, &by_heads];
            for found in builds {
                for (e, f) in expected.iter().zip(found) {
                    assert!((e - f).abs() < 1e-6, "{shape:?}: {e} vs {f}");
                }
            }
        }
        Ok(())
    }

    /// Whole 16 x 16 blocks (with AVX-512) and the rows and columns past them.
    #[test]
    fn transposes_blocks_and_what_is_left() {
        for (rows, columns, row_stride, to_stride) in
            [(96, 32, 384, 96), (37, 35, 40, 48), (16, 16, 16, 16), (5, 3, 7, 9), (33, 17, 17, 40)]
        {
            let from: Vec<f32> = (0..rows * row_stride).map(|x| x as f32).collect();
            let mut to = vec![-1f32; columns * to_stride];
            transpose(&from, row_stride, rows, columns, &mut to, to_stride);
            for (i, j) in (0..columns).flat_map(|i| (0..to_stride).map(move |j| (i, j))) {
                let expected = if j < rows { from[j * row_stride + i] } else { -1.0 };
                assert_eq!(to[i * to_stride + j], expected, "{rows}x{columns}: {i}, {j}");
            }
        }
    }

    #[test]
    fn fits_whole_values_tiles() -> TractResult<()> {
        let rows = |shape: &[usize]| Bias::Rows(Arc::new(Tensor::zero::<f32>(shape).unwrap()));
        let fits = |bias, shape: &[usize]| {
            Attention { bias, joined: None, heads_first: false }.fits(shape)
        };
        assert!(fits(rows(&[4, 96, 96]), &[96, 4, 32]));
        assert!(fits(rows(&[1, 96]), &[96, 4, 32]), "one bias row for all");
        assert!(!fits(Bias::None, &[96, 4, 24]), "features not a multiple of 32");
        assert!(!fits(Bias::None, &[1, 96, 4, 32]), "a batch axis");
        assert!(fits(rows(&[96, 96]), &[96, 32]), "one head");
        assert!(!fits(rows(&[4, 1, 96]), &[96, 4, 32]), "broadcast inside");
        let offsets = Bias::of(Arc::new(Tensor::zero::<f32>(&[4, 96, 96])?), 96)?;
        assert!(matches!(offsets, Bias::Offsets(ref t) if t.shape() == [4, 191]));
        assert!(fits(offsets.clone(), &[96, 4, 32]));
        assert!(!fits(offsets, &[95, 4, 32]), "offsets of other positions");
        Ok(())
    }
}
