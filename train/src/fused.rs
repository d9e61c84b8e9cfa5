//! Fused CPU kernels with hand-written gradients for the training step's hot spots: LayerNorm,
//! softmax, SiLU and tanh-GELU, linear layers, multi-head attention, and the broadcast add of a
//! bias.
//!
//! candle's own fused LayerNorm and softmax have no backward (their gradients silently vanish,
//! ../shared/notes/candle.md), and the same functions composed from differentiable primitives
//! cost 6-10 single-threaded passes over memory forward and as many backward (plus a zero-filled
//! gradient buffer and an add per primitive: candle's backward pass accumulates every node's
//! gradient that way). Here each is one node: one pass forward and one backward, split by rows or
//! sequences over rayon's pool, the one candle's matrix products run on; the products inside
//! `linear` and `attention` call the `gemm` crate candle uses, on strided views without copies.
//!
//! f32 for training, f64 for the finite-difference checks below.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    WithDType,
};
use num_traits::Float;
use rayon::prelude::*;

/// LayerNorm over the last axis with weight and bias: `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })
}

/// Softmax over the last axis.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

/// `x * sigmoid(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Activation::Silu)
}

/// `x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`, GELU's tanh form.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Activation::GeluTanh)
}

/// `x w + b` over the last axis: x [.., n], w [n, m], b [m] -> [.., m]. One node of the graph
/// where the composed form has four (two reshapes, the product, the bias add), each of which costs
/// a zero-filled gradient buffer and an add over the activations in candle's backward pass; the
/// bias is the product's starting value, so it costs no pass of its own either.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

/// Multi-head self-attention from packed projections (see `model::Ops::attention`): `qkv`
/// [B, L, 3 heads dh], `bias` [heads, L, L] -> [B, L, heads dh]. One node where the composed form
/// has ~15 (splits, head transposes and their copies, scaling, two batched products, the bias,
/// softmax); each sequence's heads run as small matrix products straight on the packed
/// projections, sequences in parallel. The backward pass recomputes the attention weights.
pub fn attention(qkv: &Tensor, bias: &Tensor, heads: usize) -> Result<Tensor> {
    qkv.contiguous()?.apply_op2(&bias.contiguous()?, Attention { heads })
}

/// `x + b` where b's shape is the end of x's (a linear layer's bias, position embeddings, an
/// attention bias). candle's `broadcast_add` gets the same value, but its gradient for `b` sums
/// over the leading axes with a division per element on one thread (16% of a training step).
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (x_dims, b_dims) = (x.dims(), b.dims());
    if b_dims.len() > x_dims.len() || !x_dims.ends_with(b_dims) {
        bail!("add_bias: bias {b_dims:?} is not the end of {x_dims:?}");
    }
    x.contiguous()?.apply_op2(&b.contiguous()?, AddBias)
}

/// What the kernels compute in.
trait Real: WithDType + Float + Send + Sync {
    /// e^x, in a form the compiler vectorizes.
    fn exp_fast(self) -> Self;
}

impl Real for f32 {
    /// Cephes' expf: e^x = 2^n e^r with n = round(x / ln 2) and a degree-7 polynomial for e^r,
    /// |r| <= ln 2 / 2; relative error ~1e-7. libm's expf is a call per element (6% of a training
    /// step); this loop vectorizes. NaN stays NaN (divergence must still be seen).
    #[inline]
    fn exp_fast(self) -> f32 {
        const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
        let x = self.clamp(-87.3, 88.3); // 2^n stays a normal f32
        let shifted = x * std::f32::consts::LOG2_E + ROUND; // n sits in its low mantissa bits
        let n = shifted - ROUND;
        let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4; // x - n ln 2, ln 2 in two parts
        let p = 1.987_569_1e-4_f32;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 0.166_666_65;
        let p = p * r + 0.5;
        // 2^n from n's bits: integer arithmetic that vectorizes (`n as i32` is a scalar convert).
        let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
        let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
        (p * r * r + r + 1.0) * two_n
    }
}

impl Real for f64 {
    /// Exact: f64 runs the finite-difference checks.
    fn exp_fast(self) -> f64 {
        self.exp()
    }
}

/// Runs `$f::<T>` for the storage's element type.
macro_rules! dispatch {
    ($dtype:expr, $op:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            other => bail!("{} runs on f32 or f64, not {other:?}", $op),
        }
    };
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => bail!("fused kernels take contiguous tensors"),
    }
}

/// `sums += v`, element by element: how partial sums over rows are gathered.
fn add_into<T: Real>(sums: &mut [T], v: &[T]) {
    sums.iter_mut().zip(v).for_each(|(sum, &v)| *sum += v);
}

/// Rows handed to one rayon task: ~16 K elements, enough to outweigh the task's overhead.
fn rows_per_task(d: usize) -> usize {
    (16 * 1024 / d.max(1)).max(1)
}

/// `f(out_row, in_rows...)` for every row of `d` elements, in parallel.
fn map_rows<T: Real>(
    d: usize,
    inputs: [&[T]; 2],
    f: impl Fn(&mut [T], &[T], &[T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::zero(); inputs[0].len()];
    let chunk = d * rows_per_task(d);
    out.par_chunks_mut(chunk)
        .zip(inputs[0].par_chunks(chunk).zip(inputs[1].par_chunks(chunk)))
        .for_each(|(out, (a, b))| {
            for ((out, a), b) in out.chunks_mut(d).zip(a.chunks(d)).zip(b.chunks(d)) {
                f(out, a, b);
            }
        });
    out
}

/// Independent accumulators a reduction keeps: a single running value is one long dependency
/// chain (~4 cycles per element); this many chains side by side vectorize.
const LANES: usize = 16;

/// `combine` over `map` of every element, in `LANES` interleaved chains: `combine` must be
/// associative and commutative, `init` its identity.
#[inline]
fn reduce_lanes<T: Real>(x: &[T], init: T, map: impl Fn(T) -> T, combine: impl Fn(T, T) -> T) -> T {
    let mut lanes = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder().iter().fold(init, |acc, &v| combine(acc, map(v)));
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = combine(*lane, map(v));
        }
    }
    lanes.into_iter().fold(rest, combine)
}

fn sum<T: Real>(x: &[T]) -> T {
    reduce_lanes(x, T::zero(), |v| v, |a, b| a + b)
}

/// sum of a b, in `LANES` chains.
#[inline]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest = a_chunks.remainder().iter().zip(b_chunks.remainder());
    let rest = rest.fold(T::zero(), |acc, (&a, &b)| acc + a * b);
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((lane, &a), &b) in lanes.iter_mut().zip(a).zip(b) {
            *lane += a * b;
        }
    }
    lanes.into_iter().fold(rest, |acc, v| acc + v)
}

/// Softmax of one row, in place.
#[inline]
fn softmax_in_place<T: Real>(row: &mut [T]) {
    let max = reduce_lanes(row, T::neg_infinity(), |v| v, Float::max);
    row.iter_mut().for_each(|v| *v = (*v - max).exp_fast());
    let inv = sum(row).recip();
    row.iter_mut().for_each(|v| *v *= inv);
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let x = slice::<T>(s, l)?;
            let y = map_rows(last_dim(l), [x, x], |y, x, _| {
                y.copy_from_slice(x);
                softmax_in_place(y);
            });
            Ok(T::to_cpu_storage_owned(y))
        }
        Ok((dispatch!(s.dtype(), self.name(), run(s, l))?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

/// dx = y * (g - <g, y>) per row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            ys: &CpuStorage,
            yl: &Layout,
            gs: &CpuStorage,
            gl: &Layout,
        ) -> Result<CpuStorage> {
            let (y, g) = (slice::<T>(ys, yl)?, slice::<T>(gs, gl)?);
            let dx = map_rows(last_dim(yl), [y, g], |dx, y, g| {
                let dot = dot(y, g);
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = y * (g - dot);
                }
            });
            Ok(T::to_cpu_storage_owned(dx))
        }
        Ok((dispatch!(ys.dtype(), self.name(), run(ys, yl, gs, gl))?, yl.shape().clone()))
    }
}

/// An element-wise activation: its value and its derivative, per element.
#[derive(Clone, Copy)]
enum Activation {
    Silu,
    GeluTanh,
}

impl Activation {
    /// f(x) per element. Each activation gets its own loop (static calls the compiler inlines
    /// and vectorizes; a function pointer chosen at run time would be a call per element).
    fn values<T: Real>(self, d: usize, x: &[T]) -> Vec<T> {
        fn apply<T: Real>(d: usize, x: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
            map_rows(d, [x, x], |y, x, _| y.iter_mut().zip(x).for_each(|(y, &x)| *y = f(x)))
        }
        match self {
            Activation::Silu => apply(d, x, silu_value),
            Activation::GeluTanh => apply(d, x, gelu_value),
        }
    }

    /// The gradient g f'(x) per element.
    fn gradients<T: Real>(self, d: usize, x: &[T], g: &[T]) -> Vec<T> {
        fn apply<T: Real>(d: usize, x: &[T], g: &[T], df: impl Fn(T) -> T + Sync) -> Vec<T> {
            map_rows(d, [x, g], |dx, x, g| {
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    *dx = g * df(x);
                }
            })
        }
        match self {
            Activation::Silu => apply(d, x, g, silu_derivative),
            Activation::GeluTanh => apply(d, x, g, gelu_derivative),
        }
    }
}

fn sigmoid<T: Real>(x: T) -> T {
    (T::one() + (-x).exp_fast()).recip()
}

fn silu_value<T: Real>(x: T) -> T {
    x * sigmoid(x)
}

/// s (1 + x (1 - s)), s = sigmoid(x).
fn silu_derivative<T: Real>(x: T) -> T {
    let s = sigmoid(x);
    s * (T::one() + x * (T::one() - s))
}

/// tanh(u) from the kernels' exp: 1 - 2 / (e^2u + 1), exact at both saturations.
fn tanh<T: Real>(u: T) -> T {
    let two = T::one() + T::one();
    T::one() - two / ((two * u).exp_fast() + T::one())
}

/// GELU's inner argument u(x) = sqrt(2 / pi) (x + 0.044715 x^3) and du/dx.
fn gelu_inner<T: Real>(x: T) -> (T, T) {
    let c = T::from(0.797_884_560_802_865_4).expect("sqrt(2 / pi)");
    let a = T::from(0.044_715).expect("GELU's cubic coefficient");
    let three = T::from(3).expect("3");
    (c * (x + a * x * x * x), c * (T::one() + three * a * x * x))
}

fn gelu_value<T: Real>(x: T) -> T {
    let half = T::from(0.5).expect("1/2");
    half * x * (T::one() + tanh(gelu_inner(x).0))
}

/// 1/2 (1 + t) + x/2 (1 - t^2) du/dx, t = tanh(u(x)).
fn gelu_derivative<T: Real>(x: T) -> T {
    let half = T::from(0.5).expect("1/2");
    let (u, du) = gelu_inner(x);
    let t = tanh(u);
    half * (T::one() + t + x * (T::one() - t * t) * du)
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        match self {
            Activation::Silu => "fused-silu",
            Activation::GeluTanh => "fused-gelu-tanh",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(f: Activation, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(f.values(last_dim(l), slice::<T>(s, l)?)))
        }
        Ok((dispatch!(s.dtype(), self.name(), run(*self, s, l))?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &ActivationGrad(*self))?))
    }
}

/// dx = g f'(x).
struct ActivationGrad(Activation);

impl CustomOp2 for ActivationGrad {
    fn name(&self) -> &'static str {
        "fused-activation-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            f: Activation,
            [xs, gs]: [&CpuStorage; 2],
            [xl, gl]: [&Layout; 2],
        ) -> Result<CpuStorage> {
            let (x, g) = (slice::<T>(xs, xl)?, slice::<T>(gs, gl)?);
            Ok(T::to_cpu_storage_owned(f.gradients(last_dim(xl), x, g)))
        }
        let storage = dispatch!(xs.dtype(), self.name(), run(self.0, [xs, gs], [xl, gl]))?;
        Ok((storage, xl.shape().clone()))
    }
}

/// A matrix inside a buffer: its first element and its row and column strides.
#[derive(Clone, Copy)]
struct Mat<P> {
    ptr: P,
    rs: usize,
    cs: usize,
}

impl<T> Mat<*const T> {
    /// Row-major with rows of `width` elements, from the slice's start.
    fn rows(s: &[T], width: usize) -> Self {
        Mat { ptr: s.as_ptr(), rs: width, cs: 1 }
    }

    fn t(self) -> Self {
        Mat { ptr: self.ptr, rs: self.cs, cs: self.rs }
    }
}

impl<T> Mat<*mut T> {
    fn rows_mut(s: &mut [T], width: usize) -> Self {
        Mat { ptr: s.as_mut_ptr(), rs: width, cs: 1 }
    }
}

/// dst[m, n] += scale lhs[m, k] rhs[k, n], on `threads` of rayon's pool.
///
/// # Safety
/// Every matrix must lie inside its buffer for the given sizes and strides, `dst` must not
/// overlap the others, and T must be f32 or f64.
unsafe fn gemm_add<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: Mat<*mut T>,
    lhs: Mat<*const T>,
    rhs: Mat<*const T>,
    scale: T,
    threads: usize,
) {
    let parallelism =
        if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let i = |s: usize| s as isize;
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        i(dst.cs),
        i(dst.rs),
        true,
        lhs.ptr,
        i(lhs.cs),
        i(lhs.rs),
        rhs.ptr,
        i(rhs.cs),
        i(rhs.rs),
        T::one(),
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

struct Linear;

/// A linear layer's (n, m): x must end in n, w be [n, m] and b [m].
fn linear_dims(x: &[usize], w: &[usize], b: &[usize]) -> Result<(usize, usize)> {
    match (x.last(), w, b) {
        (Some(&n), &[wn, m], &[bm]) if wn == n && bm == m => Ok((n, m)),
        _ => bail!("linear: x {x:?}, w {w:?}, b {b:?} are not [.., n], [n, m], [m]"),
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            (n, m): (usize, usize),
            [xs, ws, bs]: [&CpuStorage; 3],
            [xl, wl, bl]: [&Layout; 3],
        ) -> Result<CpuStorage> {
            let (x, w, b) = (slice::<T>(xs, xl)?, slice::<T>(ws, wl)?, slice::<T>(bs, bl)?);
            let rows = x.len() / n.max(1);
            let mut y = Vec::with_capacity(rows * m);
            (0..rows).for_each(|_| y.extend_from_slice(b));
            // y = y + x w: y holds the bias.
            let threads = rayon::current_num_threads();
            let (x, w) = (Mat::rows(x, n), Mat::rows(w, m));
            // SAFETY: y is [rows, m], x [rows, n] and w [n, m], row-major.
            unsafe { gemm_add((rows, m, n), Mat::rows_mut(&mut y, m), x, w, T::one(), threads) };
            Ok(T::to_cpu_storage_owned(y))
        }
        let dims = linear_dims(xl.dims(), wl.dims(), bl.dims())?;
        let storage = dispatch!(xs.dtype(), self.name(), run(dims, [xs, ws, bs], [xl, wl, bl]))?;
        let mut shape = xl.dims().to_vec();
        *shape.last_mut().expect("x has a last axis") = dims.1;
        Ok((storage, Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, m) = w.dims2()?;
        let rows = x.elem_count() / n.max(1);
        // Detached: the gradient's own arithmetic needs no graph.
        let (x2, w) = (x.detach().reshape((rows, n))?, w.detach());
        let g = grad.detach().contiguous()?.reshape((rows, m))?;
        let dx = g.matmul(&w.t()?)?.reshape(x.shape())?;
        let dw = x2.t()?.matmul(&g)?;
        let db = g.apply_op1_no_bwd(&SumRows { n: m })?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct Attention {
    heads: usize,
}

/// (B, L, dh) of an attention call, checked.
fn attention_dims(heads: usize, qkv: &[usize], bias: &[usize]) -> Result<(usize, usize, usize)> {
    match *qkv {
        [b, l, width] if heads > 0 && width % (3 * heads) == 0 && bias == [heads, l, l] => {
            Ok((b, l, width / (3 * heads)))
        }
        _ => bail!("attention: qkv {qkv:?} and bias {bias:?} are not [B, L, 3 x {heads} dh] and [{heads}, L, L]"),
    }
}

/// One sequence's q, k and v of head `h` inside its packed [L, 3d] projections.
fn head_views<T>(qkv: &[T], d: usize, dh: usize, h: usize) -> [Mat<*const T>; 3] {
    let at = |part: usize| Mat { ptr: qkv[part * d + h * dh..].as_ptr(), rs: 3 * d, cs: 1 };
    [at(0), at(1), at(2)]
}

/// p = softmax(q k^T / sqrt(dh) + bias) for one head, [L, L] row-major, into `p`.
fn attention_weights<T: Real>(
    l: usize,
    dh: usize,
    q: Mat<*const T>,
    k: Mat<*const T>,
    bias: &[T],
    p: &mut [T],
) {
    p.copy_from_slice(bias);
    let scale = T::from(dh).expect("dh fits").sqrt().recip();
    // SAFETY: q and k are [L, dh] views inside one sequence's projections, p is [L, L].
    unsafe { gemm_add((l, l, dh), Mat::rows_mut(p, l), q, k.t(), scale, 1) };
    p.chunks_mut(l).for_each(softmax_in_place);
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            heads: usize,
            (l, dh): (usize, usize),
            [qs, bs]: [&CpuStorage; 2],
            [ql, bl]: [&Layout; 2],
        ) -> Result<CpuStorage> {
            let (qkv, bias) = (slice::<T>(qs, ql)?, slice::<T>(bs, bl)?);
            let d = heads * dh;
            let mut out = vec![T::zero(); qkv.len() / 3];
            out.par_chunks_mut(l * d).zip(qkv.par_chunks(l * 3 * d)).for_each(|(out, qkv)| {
                let mut p = vec![T::zero(); l * l];
                for h in 0..heads {
                    let [q, k, v] = head_views(qkv, d, dh, h);
                    attention_weights(l, dh, q, k, &bias[h * l * l..(h + 1) * l * l], &mut p);
                    let o = Mat { ptr: out[h * dh..].as_mut_ptr(), rs: d, cs: 1 };
                    // SAFETY: o is this sequence's [L, dh] slot of head h, v an [L, dh] view.
                    unsafe { gemm_add((l, dh, l), o, Mat::rows(&p, l), v, T::one(), 1) };
                }
            });
            Ok(T::to_cpu_storage_owned(out))
        }
        let (b, l, dh) = attention_dims(self.heads, ql.dims(), bl.dims())?;
        let storage =
            dispatch!(qs.dtype(), self.name(), run(self.heads, (l, dh), [qs, bs], [ql, bl]))?;
        Ok((storage, Shape::from((b, l, self.heads * dh))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grads = AttentionGrad { heads: self.heads };
        let packed = qkv.apply_op3_no_bwd(bias, &grad.contiguous()?, &grads)?;
        let n = qkv.elem_count();
        let dqkv = packed.narrow(0, 0, n)?.reshape(qkv.shape())?;
        let dbias = packed.narrow(0, n, bias.elem_count())?.reshape(bias.shape())?;
        Ok((Some(dqkv), Some(dbias)))
    }
}

/// Per sequence and head, with p the attention weights and g the output's gradient:
/// dv = p^T g, dp = g v^T, ds = p (dp - rowsum(dp p)), dq = ds k / sqrt(dh),
/// dk = ds^T q / sqrt(dh), dbias = sum over sequences of ds. Packed: [dqkv | dbias].
struct AttentionGrad {
    heads: usize,
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "fused-attention-grad"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            heads: usize,
            (l, dh): (usize, usize),
            [qs, bs, gs]: [&CpuStorage; 3],
            [ql, bl, gl]: [&Layout; 3],
        ) -> Result<CpuStorage> {
            let (qkv, bias, g) = (slice::<T>(qs, ql)?, slice::<T>(bs, bl)?, slice::<T>(gs, gl)?);
            let d = heads * dh;
            let scale = T::from(dh).expect("dh fits").sqrt().recip();
            let mut packed = vec![T::zero(); qkv.len() + bias.len()];
            let (dqkv, dbias) = packed.split_at_mut(qkv.len());
            let partial_sums = dqkv
                .par_chunks_mut(l * 3 * d)
                .zip(qkv.par_chunks(l * 3 * d).zip(g.par_chunks(l * d)))
                .map(|(dqkv, (qkv, g))| {
                    let mut dbias = vec![T::zero(); bias.len()];
                    let (mut p, mut ds) = (vec![T::zero(); l * l], vec![T::zero(); l * l]);
                    for h in 0..heads {
                        let [q, k, v] = head_views(qkv, d, dh, h);
                        let hb = h * l * l..(h + 1) * l * l;
                        attention_weights(l, dh, q, k, &bias[hb.clone()], &mut p);
                        let g = Mat { ptr: g[h * dh..].as_ptr(), rs: d, cs: 1 };
                        let base = dqkv.as_mut_ptr();
                        let at = |part: usize| Mat {
                            ptr: base.wrapping_add(part * d + h * dh),
                            rs: 3 * d,
                            cs: 1,
                        };
                        let (dq, dk, dv) = (at(0), at(1), at(2));
                        let p_ = Mat::rows(&p, l);
                        ds.fill(T::zero());
                        // SAFETY: every view is [L, dh] inside this sequence's buffers or [L, L]
                        // scratch; dq, dk and dv are disjoint slots of this sequence's gradient.
                        unsafe {
                            gemm_add((l, dh, l), dv, p_.t(), g, T::one(), 1);
                            gemm_add((l, l, dh), Mat::rows_mut(&mut ds, l), g, v.t(), T::one(), 1);
                        }
                        for ((ds, p), dbias) in
                            ds.chunks_mut(l).zip(p.chunks(l)).zip(dbias[hb].chunks_mut(l))
                        {
                            let dot = dot(ds, p);
                            for ((ds, &p), db) in ds.iter_mut().zip(p).zip(dbias) {
                                *ds = p * (*ds - dot);
                                *db += *ds;
                            }
                        }
                        let ds_ = Mat::rows(&ds, l);
                        unsafe {
                            gemm_add((l, dh, l), dq, ds_, k, scale, 1);
                            gemm_add((l, dh, l), dk, ds_.t(), q, scale, 1);
                        }
                    }
                    dbias
                })
                .collect::<Vec<_>>();
            partial_sums.iter().for_each(|part| add_into(dbias, part));
            Ok(T::to_cpu_storage_owned(packed))
        }
        let (_, l, dh) = attention_dims(self.heads, ql.dims(), bl.dims())?;
        let storage = dispatch!(
            qs.dtype(),
            self.name(),
            run(self.heads, (l, dh), [qs, bs, gs], [ql, bl, gl])
        )?;
        let len = ql.shape().elem_count() + bl.shape().elem_count();
        Ok((storage, Shape::from(len)))
    }
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "fused-add-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>([xs, bs]: [&CpuStorage; 2], [xl, bl]: [&Layout; 2]) -> Result<CpuStorage> {
            let (x, b) = (slice::<T>(xs, xl)?, slice::<T>(bs, bl)?);
            let y = map_rows(b.len(), [x, x], |y, x, _| {
                for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                    *y = x + b;
                }
            });
            Ok(T::to_cpu_storage_owned(y))
        }
        Ok((dispatch!(xs.dtype(), self.name(), run([xs, bs], [xl, bl]))?, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = b.elem_count();
        let db = grad.contiguous()?.apply_op1_no_bwd(&SumRows { n })?.reshape(b.shape())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// Sums of the rows of `n` elements a tensor is made of: [rows * n] -> [n].
struct SumRows {
    n: usize,
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "fused-sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(n: usize, s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
            let g = slice::<T>(s, l)?;
            let partial_sums = g
                .par_chunks(n * rows_per_task(n))
                .map(|rows| {
                    let mut sums = vec![T::zero(); n];
                    rows.chunks(n).for_each(|row| add_into(&mut sums, row));
                    sums
                })
                .collect::<Vec<_>>();
            let mut sums = vec![T::zero(); n];
            partial_sums.iter().for_each(|part| add_into(&mut sums, part));
            Ok(T::to_cpu_storage_owned(sums))
        }
        if self.n == 0 || !l.shape().elem_count().is_multiple_of(self.n) {
            bail!("fused-sum-rows: {:?} is not made of rows of {}", l.dims(), self.n);
        }
        Ok((dispatch!(s.dtype(), self.name(), run(self.n, s, l))?, Shape::from(self.n)))
    }
}

struct LayerNorm {
    eps: f32,
}

/// A row's mean and 1 / standard deviation.
fn moments<T: Real>(x: &[T], eps: T) -> (T, T) {
    let n = T::from(x.len()).expect("a row length fits any float");
    let mean = sum(x) / n;
    let var = reduce_lanes(x, T::zero(), |v| (v - mean) * (v - mean), |a, b| a + b) / n;
    (mean, (var + eps).sqrt().recip())
}

fn check_affine(name: &str, x: &Layout, w: &Layout, b: &Layout) -> Result<usize> {
    let d = last_dim(x);
    if w.shape().elem_count() != d || b.shape().elem_count() != d {
        bail!(
            "{name}: weight {:?} and bias {:?} must have the last axis of {:?}",
            w.dims(),
            b.dims(),
            x.dims()
        );
    }
    Ok(d)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            eps: f32,
            [xs, ws, bs]: [&CpuStorage; 3],
            [xl, wl, bl]: [&Layout; 3],
        ) -> Result<CpuStorage> {
            let d = check_affine("fused-layer-norm", xl, wl, bl)?;
            let (x, w, b) = (slice::<T>(xs, xl)?, slice::<T>(ws, wl)?, slice::<T>(bs, bl)?);
            let eps = T::from(eps).expect("eps fits any float");
            let y = map_rows(d, [x, x], |y, x, _| {
                let (mean, rstd) = moments(x, eps);
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *y = (x - mean) * rstd * w + b;
                }
            });
            Ok(T::to_cpu_storage_owned(y))
        }
        let storage =
            dispatch!(xs.dtype(), self.name(), run(self.eps, [xs, ws, bs], [xl, wl, bl]))?;
        Ok((storage, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One pass writes dx, dw and db into one buffer: [x.len() | d | d].
        let packed =
            x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let (n, d) = (x.elem_count(), w.elem_count());
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + d, d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// With x^ = (x - mean) rstd and gw = g * w per row: dx = rstd (gw - mean(gw) - x^ mean(gw x^)),
/// dw = sum over rows of g x^, db = sum over rows of g.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            eps: f32,
            [xs, ws, gs]: [&CpuStorage; 3],
            [xl, wl, gl]: [&Layout; 3],
        ) -> Result<CpuStorage> {
            let d = check_affine("fused-layer-norm-grad", xl, wl, wl)?;
            let (x, w, g) = (slice::<T>(xs, xl)?, slice::<T>(ws, wl)?, slice::<T>(gs, gl)?);
            let (eps, n) = (T::from(eps).expect("eps fits any float"), T::from(d).expect("d fits"));
            let mut packed = vec![T::zero(); x.len() + 2 * d];
            let (dx, dwb) = packed.split_at_mut(x.len());
            let chunk = d * rows_per_task(d);
            let partial_sums = dx
                .par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                .map(|(dx, (x, g))| {
                    let mut dwb = vec![T::zero(); 2 * d];
                    for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                        let (mean, rstd) = moments(x, eps);
                        let (mut mean_gw, mut mean_gwx) = (T::zero(), T::zero());
                        for (((x, &g), &w), dwb) in x.iter().zip(g).zip(w).zip(dwb.iter_mut()) {
                            let xhat = (*x - mean) * rstd;
                            mean_gw += g * w;
                            mean_gwx += g * w * xhat;
                            *dwb += g * xhat;
                        }
                        add_into(&mut dwb[d..], g);
                        let (mean_gw, mean_gwx) = (mean_gw / n, mean_gwx / n);
                        for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                            let xhat = (x - mean) * rstd;
                            *dx = rstd * (g * w - mean_gw - xhat * mean_gwx);
                        }
                    }
                    dwb
                })
                .collect::<Vec<_>>();
            partial_sums.iter().for_each(|part| add_into(dwb, part));
            Ok(T::to_cpu_storage_owned(packed))
        }
        let storage =
            dispatch!(xs.dtype(), self.name(), run(self.eps, [xs, ws, gs], [xl, wl, gl]))?;
        let len = xl.shape().elem_count() + 2 * wl.shape().elem_count();
        Ok((storage, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(shape: &[usize], scale: f64, rng: &mut ChaCha8Rng) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| scale * rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Compares backprop through `f` with central finite differences of sum(f(inputs) * r), for
    /// every element of every input, in f64.
    fn check_gradients(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&tensors).unwrap();
        let r = random(out.dims(), 1.0, &mut rng);
        let objective = |ts: &[Tensor]| -> f64 {
            (f(ts).unwrap() * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, var) in vars.iter().enumerate() {
            let analytic: Vec<f64> =
                grads.get(var).expect("a gradient").flatten_all().unwrap().to_vec1().unwrap();
            let values: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
            for (j, &a) in analytic.iter().enumerate() {
                let h = 1e-6;
                let at = |delta: f64| {
                    let mut v = values.clone();
                    v[j] += delta;
                    let mut ts = inputs.to_vec();
                    ts[i] = Tensor::from_vec(v, inputs[i].dims(), &Device::Cpu).unwrap();
                    objective(&ts)
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (a - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
                    "input {i}, element {j}: backprop {a} vs finite differences {numeric}"
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = random(&[2, 3, 8], 2.0, &mut rng);
        let (w, b) = (random(&[8], 1.5, &mut rng), random(&[8], 1.0, &mut rng));
        check_gradients(&[x.clone(), w, b], |t| layer_norm(&t[0], &t[1], &t[2], 1e-5));
        let x = std::slice::from_ref(&x);
        check_gradients(x, |t| softmax_last_dim(&t[0]));
        check_gradients(x, |t| silu(&t[0]));
        check_gradients(x, |t| gelu_tanh(&t[0]));
        let (qkv, bias) = (random(&[2, 5, 12], 1.5, &mut rng), random(&[2, 5, 5], 1.0, &mut rng));
        check_gradients(&[qkv, bias], |t| attention(&t[0], &t[1], 2));
        let (w, bias) = (random(&[8, 5], 1.0, &mut rng), random(&[5], 1.0, &mut rng));
        check_gradients(&[x[0].clone(), w, bias], |t| linear(&t[0], &t[1], &t[2]));
        let (bias, table) = (random(&[8], 1.0, &mut rng), random(&[3, 8], 1.0, &mut rng));
        check_gradients(&[x[0].clone(), bias], |t| add_bias(&t[0], &t[1]));
        check_gradients(&[x[0].clone(), table], |t| add_bias(&t[0], &t[1]));
    }

    /// The kernels compute what the composed candle functions compute, in f32, on shapes with a
    /// partial last task, and from non-contiguous inputs.
    #[test]
    fn kernels_match_the_composed_functions() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let x = f32(random(&[3, 700, 48], 4.0, &mut rng)).transpose(0, 1).unwrap();
        let (w, b) = (f32(random(&[48], 1.0, &mut rng)), f32(random(&[48], 1.0, &mut rng)));
        let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
        };

        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap()).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let composed = centered
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_diff(&layer_norm(&x, &w, &b, 1e-5).unwrap(), &composed) < 1e-5);
        let softmax = candle_nn::ops::softmax(&x, D::Minus1).unwrap();
        assert!(max_diff(&softmax_last_dim(&x).unwrap(), &softmax) < 1e-6);
        assert!(max_diff(&silu(&x).unwrap(), &x.silu().unwrap()) < 1e-5);
        assert!(max_diff(&gelu_tanh(&x).unwrap(), &x.gelu().unwrap()) < 1e-5);
        let weight = f32(random(&[48, 40], 1.0, &mut rng));
        let product = x.reshape((2100, 48)).unwrap().matmul(&weight).unwrap();
        let composed =
            product.reshape((700, 3, 40)).unwrap().broadcast_add(&b.narrow(0, 0, 40).unwrap());
        let fused = linear(&x, &weight, &b.narrow(0, 0, 40).unwrap()).unwrap();
        assert!(max_diff(&fused, &composed.unwrap()) < 1e-4);
        assert!(linear(&x, &weight.t().unwrap(), &b).is_err());
        let (qkv, bias) =
            (f32(random(&[3, 7, 24], 2.0, &mut rng)), f32(random(&[2, 7, 7], 1.0, &mut rng)));
        let heads = |x: Tensor, perm| x.reshape((3, 7, 2, 4)).unwrap().permute(perm).unwrap();
        let part = |i: usize| qkv.narrow(2, 8 * i, 8).unwrap();
        let (q, k, v) = (
            heads(part(0), (0, 2, 1, 3)),
            heads(part(1), (0, 2, 3, 1)),
            heads(part(2), (0, 2, 1, 3)),
        );
        let scores = ((q.contiguous().unwrap().matmul(&k.contiguous().unwrap()).unwrap() * 0.5)
            .unwrap())
        .broadcast_add(&bias)
        .unwrap();
        let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let composed = p
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .permute((0, 2, 1, 3))
            .unwrap()
            .reshape((3, 7, 8))
            .unwrap();
        assert!(max_diff(&attention(&qkv, &bias, 2).unwrap(), &composed) < 1e-5);
        assert!(attention(&qkv, &bias, 3).is_err());
        let table = f32(random(&[3, 48], 1.0, &mut rng));
        assert_eq!(max_diff(&add_bias(&x, &b).unwrap(), &x.broadcast_add(&b).unwrap()), 0.0);
        assert_eq!(
            max_diff(&add_bias(&x, &table).unwrap(), &x.broadcast_add(&table).unwrap()),
            0.0
        );
        assert!(add_bias(&x, &x.transpose(0, 1).unwrap()).is_err());
    }

    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -87_000..=88_000 {
            let x = i as f32 * 1e-3 + 1.7e-4;
            let exact = (x as f64).exp();
            worst = worst.max(((x.exp_fast() as f64 - exact) / exact).abs() as f32);
        }
        eprintln!("fast exp: max relative error {worst:e}");
        assert!(worst < 2e-7, "max relative error {worst}");
        assert!(f32::NAN.exp_fast().is_nan());
        let (tiny, huge) = ((-1e4f32).exp_fast(), 1e4f32.exp_fast());
        assert!((0.0..1e-37).contains(&tiny) && huge.is_finite() && huge > 1e38);
    }

    #[test]
    fn other_element_types_are_refused() {
        let x = Tensor::zeros((2, 4), DType::U8, &Device::Cpu).unwrap();
        let err = softmax_last_dim(&x).unwrap_err().to_string();
        assert!(err.contains("f32 or f64"), "{err}");
    }
}
