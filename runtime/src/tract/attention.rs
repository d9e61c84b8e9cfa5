//! The attention of one sequence as one operator of the CPU plans: per head, the scores, their
//! biased softmax and the values' weighted sum, a few rows of queries at a time (issue 4;
//! BENCHMARKS.md, "The attention in one operator").
//!
//! tract runs the default model's attention per layer as two products of 4 heads of [96, 32] by
//! [32, 96] each, with the softmax between: ~35 us of products on panels of 96 x 96 scores, and
//! ~20 us of packing their four inputs, three of them transposed. Here every input is read where
//! it lies: a head's keys transposed once into a [32, 96] block, then for each few queries their
//! scores (queries broadcast against rows of the transposed keys), the softmax of those rows
//! (`softmax::softmax_rows`, bias and all), and their weighted sum of the values (probabilities
//! broadcast against rows of values). Scores and probabilities never leave a few rows of L1.
//!
//! The tiles keep their sums in registers: `ROWS` queries by two vectors of 16 lanes (32 keys
//! or 32 of a head's features), 12 accumulators where a register holds 16 lanes (AVX-512), 6
//! rows of 32 where it holds 8 (AVX2: 3 rows). Each sum runs over its terms in order, as a
//! product would; the results differ from tract's in the last bits.

use super::{lanes, softmax};
use std::sync::Arc;
use tract_nnef::internal::*;

const LANES: usize = lanes::LANES;
/// Keys per scores tile, a head's features per values tile: two vectors.
const TILE: usize = 2 * LANES;
type Vector = [f32; LANES];

/// `softmax(q k^T + bias) v` per head, for `q`, `k`, `v` of shape [positions, heads, features]
/// or [positions, features] (one head; the queries already scaled), the output of the same shape.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Attention {
    pub bias: Bias,
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

    /// The bias of query `i`'s scores in head `h`, `positions` long (empty for none).
    #[inline(always)]
    fn row<'a>(&self, values: &'a [f32], h: usize, i: usize, positions: usize) -> &'a [f32] {
        match self {
            Bias::None => &[],
            Bias::Rows(_) => {
                let rows = values.len() / positions;
                &values[(h * positions + i) % rows * positions..][..positions]
            }
            Bias::Offsets(_) => {
                let width = 2 * positions - 1;
                let heads = values.len() / width;
                &values[h % heads * width + positions - 1 - i..][..positions]
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
    /// Whether the operator takes `q`, `k` and `v` of `shape` and its bias: a whole number of
    /// values tiles per head.
    pub fn fits(&self, shape: &[usize]) -> bool {
        let Some([positions, heads, features]) = Self::dims(shape) else { return false };
        positions > 0
            && features > 0
            && features.is_multiple_of(TILE)
            && self.bias.fits(heads, positions)
    }

    /// Positions, heads and features of `shape`: [positions, heads, features], or [positions,
    /// features] for one head.
    fn dims(shape: &[usize]) -> Option<[usize; 3]> {
        match *shape {
            [positions, heads, features] => Some([positions, heads, features]),
            [positions, features] => Some([positions, 1, features]),
            _ => None,
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
/// two vectors each), each sum plus the row times its weight (`weights[r][i]`, the `i`th term's).
#[inline(always)]
fn tile_sums<M: MulAdd, const ROWS: usize>(
    weights: [&[f32]; ROWS],
    tiles: &[f32],
    stride: usize,
    terms: usize,
) -> [[Vector; 2]; ROWS] {
    let mut acc = [[[0f32; LANES]; 2]; ROWS];
    for i in 0..terms {
        let (low, high) = tile_of(&tiles[i * stride..]);
        for r in 0..ROWS {
            let w = weights[r][i];
            accumulate::<M>(&mut acc[r][0], w, low);
            accumulate::<M>(&mut acc[r][1], w, high);
        }
    }
    acc
}

/// The operator's shapes and buffers, as slices.
struct Heads<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    bias: (&'a Bias, &'a [f32]),
    out: &'a mut [f32],
    positions: usize,
    heads: usize,
    features: usize,
}

/// The attention of every head, `ROWS` queries at a time.
#[inline(always)]
fn attention<M: MulAdd, const ROWS: usize>(a: Heads) {
    let Heads { q, k, v, bias, out, positions, heads, features } = a;
    let row = heads * features;
    // The keys' side padded to whole tiles with zero keys, whose scores are never read.
    let stride = positions.div_ceil(TILE) * TILE;
    let mut kt = vec![0f32; features * stride];
    let mut scores = vec![0f32; ROWS * positions];
    let (bias, bias_values) = bias;
    for h in 0..heads {
        for (j, key) in k.chunks_exact(row).enumerate() {
            for (i, &x) in key[h * features..][..features].iter().enumerate() {
                kt[i * stride + j] = x;
            }
        }
        for first in (0..positions).step_by(ROWS) {
            let rows = ROWS.min(positions - first);
            // A last block of fewer queries repeats its last one, whose results are not kept.
            let at = |r: usize| (first + r.min(rows - 1)) * row + h * features;
            let queries = std::array::from_fn(|r| &q[at(r)..][..features]);
            for j in (0..stride).step_by(TILE) {
                let acc = tile_sums::<M, ROWS>(queries, &kt[j..], stride, features);
                let kept = TILE.min(positions - j);
                let rows_of_scores = scores.chunks_exact_mut(positions).zip(&acc);
                for (r, (scores, acc)) in rows_of_scores.enumerate().take(rows) {
                    let (scores, acc) = (&mut scores[j..j + kept], &acc.as_flattened()[..kept]);
                    match bias.row(bias_values, h, first + r, positions) {
                        [] => scores.copy_from_slice(acc),
                        bias => (scores.iter_mut().zip(acc).zip(&bias[j..j + kept]))
                            .for_each(|((s, a), b)| *s = a + b),
                    }
                }
            }
            let scores = &mut scores[..rows * positions];
            softmax::softmax_rows(scores, positions, &[]);
            let probabilities =
                std::array::from_fn(|r| &scores[r.min(rows - 1) * positions..][..positions]);
            for c in (0..features).step_by(TILE) {
                let acc =
                    tile_sums::<M, ROWS>(probabilities, &v[h * features + c..], row, positions);
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    let at = (first + r) * row + h * features + c;
                    out[at..at + TILE].copy_from_slice(acc.as_flattened());
                }
            }
        }
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
        "Attention".into()
    }
    op_as_typed_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, v) = args_3!(inputs);
        let shape = q.shape();
        ensure!(k.shape() == shape && v.shape() == shape, "{shape:?} {k:?} {v:?}");
        ensure!(self.fits(shape), "attention of {shape:?}, bias {:?}", self.bias);
        let [positions, heads, features] = Self::dims(shape).context("fits")?;
        let bias = self.bias.tensor().map(|b| b.try_as_plain_ram()).transpose()?;
        let bias = bias.as_ref().map(|b| b.as_slice::<f32>()).transpose()?.unwrap_or(&[]);
        let mut out = unsafe { Tensor::uninitialized::<f32>(shape)? };
        let (q, k, v) = (q.try_as_plain_ram()?, k.try_as_plain_ram()?, v.try_as_plain_ram()?);
        let mut out_view = out.try_as_plain_ram_mut()?;
        widest_attention(Heads {
            q: q.as_slice()?,
            k: k.as_slice()?,
            v: v.as_slice()?,
            bias: (&self.bias, bias),
            // Safety: `attention` writes every element.
            out: out_view.as_slice_mut()?,
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
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
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
            let op = Attention { bias };
            assert!(op.fits(&shape));
            let tensor = |x: &[f32]| Tensor::from_shape(&shape, x).map(|t| t.into_tvalue());
            let inputs = tvec!(tensor(&q)?, tensor(&k)?, tensor(&v)?);
            let found = op.eval(&EvalContext::out_of_plan(), inputs)?.remove(0);
            let found = found.try_as_plain_ram()?;
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
                let heads = Heads { q, k, v, bias, out, positions, heads, features };
                match build {
                    0 => attention::<Separate, 1>(heads),
                    _ => attention::<Fused, 3>(heads),
                }
            }
            for found in [found.as_slice::<f32>()?, &builds[0], &builds[1]] {
                for (e, f) in expected.iter().zip(found) {
                    assert!((e - f).abs() < 1e-6, "{shape:?}: {e} vs {f}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fits_whole_values_tiles() -> TractResult<()> {
        let rows = |shape: &[usize]| Bias::Rows(Arc::new(Tensor::zero::<f32>(shape).unwrap()));
        let fits = |bias, shape: &[usize]| Attention { bias }.fits(shape);
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
