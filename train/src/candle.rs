//! The architecture on candle: `CandleOps` implements `model::Ops` with differentiable operations
//! only (candle's fused LayerNorm and softmax have no backward: ours in `crate::fused` have),
//! `Params` holds the trainable variables, and `CandleDenoiser` plugs frozen weights into the
//! runtime's sampler.

use crate::fused;
use crate::model::{self, Heads, Init, ModelConfig, Ops, LN_EPS};
use candle_core::{DType, Device, Tensor, Var, D};
use chardiff_runtime::{BoxError, DenoiseInput, Denoiser, ModelSpec, NO_LOGITS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::collections::BTreeMap;

/// Where `Ops::param` finds a parameter.
pub trait ParamSource {
    fn get(&mut self, name: &str, shape: &[usize], init: Init) -> candle_core::Result<Tensor>;
}

/// Trainable parameters, created on first use from a seeded generator (candle's CPU RNG cannot
/// be seeded) or given by a checkpoint.
pub struct Params {
    vars: BTreeMap<String, Var>,
    rng: ChaCha8Rng,
    dtype: DType,
}

impl Params {
    pub fn new(seed: u64, dtype: DType) -> Params {
        Params { vars: BTreeMap::new(), rng: ChaCha8Rng::seed_from_u64(seed), dtype }
    }

    /// Trainable copies of existing tensors (a checkpoint being resumed).
    pub fn from_tensors(tensors: &BTreeMap<String, Tensor>) -> candle_core::Result<Params> {
        let dtype = tensors.values().next().map_or(DType::F32, Tensor::dtype);
        let vars = tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), Var::from_tensor(t)?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Params { vars, rng: ChaCha8Rng::seed_from_u64(0), dtype })
    }

    /// Every parameter of the model, created in a fixed order by tracing it once.
    pub fn initialized(
        seed: u64,
        dtype: DType,
        config: &ModelConfig,
        spec: &ModelSpec,
    ) -> candle_core::Result<Params> {
        let mut params = Params::new(seed, dtype);
        let (l, k) = (spec.window, spec.bits);
        let z = |shape: &[usize]| Tensor::zeros(shape, dtype, &Device::Cpu);
        let inputs = model::Inputs {
            x_t: z(&[1, l, k])?,
            x_self: z(&[1, l, k])?,
            t: z(&[1])?,
            condition: if spec.conditioning {
                Some((z(&[1, l, k])?, z(&[1, l, 1])?))
            } else {
                None
            },
        };
        model::forward(&mut CandleOps::new(&mut params, dtype), config, spec, inputs)?;
        Ok(params)
    }

    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Copies of the current values, detached from training.
    pub fn snapshot(&self) -> candle_core::Result<BTreeMap<String, Tensor>> {
        self.vars.iter().map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?.detach()))).collect()
    }
}

impl ParamSource for Params {
    fn get(&mut self, name: &str, shape: &[usize], init: Init) -> candle_core::Result<Tensor> {
        if let Some(var) = self.vars.get(name) {
            check_shape(name, var.as_tensor(), shape)?;
            return Ok(var.as_tensor().clone());
        }
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match init {
            Init::Normal(std) => {
                (0..n).map(|_| std * self.rng.sample::<f32, _>(StandardNormal)).collect()
            }
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
        };
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&tensor)?;
        self.vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }
}

/// candle's f32 matrix-product speed on this CPU (its default threads), in GFLOP/s: the best of
/// `runs` products of two n x n matrices. What a training step's arithmetic is rated against.
/// A 1024^3 product takes ~7 ms; on a VM a handful of them ranged over 139-357 GFLOP/s, so the
/// trainer takes the best of 20.
pub fn matmul_peak_gflops(n: usize, runs: usize) -> candle_core::Result<f64> {
    let a = Tensor::ones((n, n), DType::F32, &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) + 1 {
        let start = std::time::Instant::now();
        drop(a.matmul(&a)?);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// Fixed weights (EMA, a loaded checkpoint): every parameter must be present with its shape.
pub struct Frozen<'a>(pub &'a BTreeMap<String, Tensor>);

impl ParamSource for Frozen<'_> {
    fn get(&mut self, name: &str, shape: &[usize], _: Init) -> candle_core::Result<Tensor> {
        let t = self.0.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("the weights lack the parameter `{name}`"))
        })?;
        check_shape(name, t, shape)?;
        Ok(t.clone())
    }
}

fn check_shape(name: &str, t: &Tensor, shape: &[usize]) -> candle_core::Result<()> {
    if t.dims() != shape {
        return Err(candle_core::Error::Msg(format!(
            "parameter `{name}` has shape {:?}, the model needs {shape:?}",
            t.dims()
        )));
    }
    Ok(())
}

pub struct CandleOps<'a> {
    pub params: &'a mut dyn ParamSource,
    pub dtype: DType,
    /// Records what each weight matrix's product sees at its input (int8 calibration).
    pub probe: Option<&'a mut crate::calibrate::Probe>,
}

impl<'a> CandleOps<'a> {
    pub fn new(params: &'a mut dyn ParamSource, dtype: DType) -> CandleOps<'a> {
        CandleOps { params, dtype, probe: None }
    }
}

impl Ops for CandleOps<'_> {
    type T = Tensor;
    type E = candle_core::Error;

    fn param(&mut self, name: &str, shape: &[usize], init: Init) -> candle_core::Result<Tensor> {
        let param = self.params.get(name, shape, init)?;
        if let Some(probe) = self.probe.as_deref_mut() {
            probe.param(name, &param);
        }
        Ok(param)
    }

    fn constant(
        &mut self,
        _: &str,
        shape: &[usize],
        data: Vec<f32>,
    ) -> candle_core::Result<Tensor> {
        Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(self.dtype)
    }

    fn matmul(&mut self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(probe) = self.probe.as_deref_mut() {
            probe.matmul(a, b)?;
        }
        if b.rank() == 2 && a.rank() > 2 {
            // [.., n] x [n, m] as one 2-D matmul instead of a broadcast batch.
            let (lead, n) = a.dims().split_at(a.rank() - 1);
            let rows: usize = lead.iter().product();
            let y = a.reshape((rows, n[0]))?.matmul(b)?;
            let mut dims = lead.to_vec();
            dims.push(b.dim(1)?);
            return y.reshape(dims);
        }
        a.contiguous()?.matmul(&b.contiguous()?)
    }

    fn linear(&mut self, x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(probe) = self.probe.as_deref_mut() {
            probe.matmul(x, w)?;
        }
        fused::linear(x, w, b)
    }

    fn attention(
        &mut self,
        qkv: &Tensor,
        bias: Option<&Tensor>,
        Heads { l, heads, .. }: Heads,
    ) -> candle_core::Result<Tensor> {
        match bias {
            Some(bias) => fused::attention(qkv, bias, heads),
            None => {
                let zeros = Tensor::zeros((heads, l, l), qkv.dtype(), qkv.device())?;
                fused::attention(qkv, &zeros, heads)
            }
        }
    }

    fn add(&mut self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        if b.rank() < a.rank() && a.dims().ends_with(b.dims()) {
            fused::add_bias(a, b)
        } else {
            a.broadcast_add(b)
        }
    }

    fn mul(&mut self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        a.broadcast_mul(b)
    }

    fn scale(&mut self, a: &Tensor, s: f32) -> candle_core::Result<Tensor> {
        a.affine(f64::from(s), 0.0)
    }

    fn layer_norm(&mut self, x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        fused::layer_norm(x, w, b, LN_EPS)
    }

    fn softmax(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        fused::softmax_last_dim(x)
    }

    fn gelu_tanh(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        fused::gelu_tanh(x)
    }

    fn silu(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        fused::silu(x)
    }

    fn sin(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.sin()
    }

    fn cos(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.cos()
    }

    fn concat(&mut self, xs: &[Tensor]) -> candle_core::Result<Tensor> {
        Tensor::cat(xs, D::Minus1)
    }

    fn gather(
        &mut self,
        table: &Tensor,
        indices: &[usize],
        shape: &[usize],
    ) -> candle_core::Result<Tensor> {
        // As a matmul with a one-hot matrix: candle's index_select and gather have no gradient.
        let (n, m) = (table.dim(1)?, indices.len());
        let mut one_hot = vec![0f32; n * m];
        for (column, &i) in indices.iter().enumerate() {
            one_hot[i * m + column] = 1.0;
        }
        let one_hot = Tensor::from_vec(one_hot, (n, m), &Device::Cpu)?.to_dtype(self.dtype)?;
        let mut dims = vec![table.dim(0)?];
        dims.extend_from_slice(shape);
        table.matmul(&one_hot)?.reshape(dims)
    }

    fn split(&mut self, x: &Tensor, sizes: &[usize]) -> candle_core::Result<Vec<Tensor>> {
        let mut start = 0;
        sizes
            .iter()
            .map(|&n| {
                let part = x.narrow(D::Minus1, start, n);
                start += n;
                part
            })
            .collect()
    }

    fn reshape(&mut self, x: &Tensor, dims: &[usize]) -> candle_core::Result<Tensor> {
        let mut shape = vec![x.dim(0)?];
        shape.extend_from_slice(dims);
        x.reshape(shape)
    }

    fn transpose(&mut self, x: &Tensor, perm: &[usize]) -> candle_core::Result<Tensor> {
        x.permute(perm)
    }

    fn unsqueeze(&mut self, x: &Tensor, axis: usize) -> candle_core::Result<Tensor> {
        x.unsqueeze(axis)
    }
}

/// Tensors [B, L, K] etc. for one network call, from the sampler's flat buffers.
pub fn input_tensors(
    spec: &ModelSpec,
    input: &DenoiseInput<'_>,
    dtype: DType,
) -> candle_core::Result<model::Inputs<Tensor>> {
    let (b, l, k) = (input.batch, spec.window, spec.bits);
    let t = |data: &[f32], shape: &[usize]| {
        Tensor::from_slice(data, shape, &Device::Cpu)?.to_dtype(dtype)
    };
    Ok(model::Inputs {
        x_t: t(input.x_t, &[b, l, k])?,
        x_self: t(input.x_self, &[b, l, k])?,
        t: t(input.t, &[b])?,
        condition: match input.condition {
            Some(c) => Some((t(c.cond, &[b, l, k])?, t(c.mask, &[b, l, 1])?)),
            None => None,
        },
    })
}

/// The trained network as a sampler's denoiser (f32, CPU).
pub struct CandleDenoiser {
    pub spec: ModelSpec,
    pub config: ModelConfig,
    pub weights: BTreeMap<String, Tensor>,
}

impl CandleDenoiser {
    pub fn forward(&self, input: &DenoiseInput<'_>) -> candle_core::Result<model::Outputs<Tensor>> {
        let dtype = self.weights.values().next().map_or(DType::F32, Tensor::dtype);
        let inputs = input_tensors(&self.spec, input, dtype)?;
        let mut params = Frozen(&self.weights);
        let mut ops = CandleOps::new(&mut params, dtype);
        model::forward(&mut ops, &self.config, &self.spec, inputs)
    }
}

impl Denoiser for CandleDenoiser {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError> {
        let out = self.forward(input)?;
        let values = out.x0.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        x0.copy_from_slice(&values);
        Ok(())
    }

    fn logits(&mut self, input: &DenoiseInput<'_>, logits: &mut [f32]) -> Result<(), BoxError> {
        let out = self.forward(input)?.logits.ok_or(NO_LOGITS)?;
        logits.copy_from_slice(&out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
