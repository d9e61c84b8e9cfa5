//! The tract backend: an exported denoiser (ONNX, or tract's NNEF archive) is read into a typed
//! graph once, with the batch size a symbol. The first step of a batch size splits it into parts
//! (one per thread) and each part into network calls (on the CPU of one sequence each, by
//! default), fixes the symbol at each call size and prepares a plan for it with a tract runtime
//! (CPU: the graph rewritten into forms tract's kernels run faster, `cpu_forms`, then an optimized
//! plan; CUDA: the same graph translated to GPU kernels, one call per batch);
//! the plans' states are reused for every denoising step at that size. A concrete batch halves
//! tract's optimization time (start-up) and gives a leaner plan.
//!
//! NNEF is always readable; ONNX needs the `onnx` feature (tract-onnx), which edge builds leave out.

use crate::denoiser::{io, BoxError, DenoiseInput, Denoiser, NO_LOGITS};
use crate::spec::{Head, ModelSpec, Precision, SpecError};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use tract_nnef::prelude::*;
use tract_nnef::tract_core::ops::array::TypedConcat;
use tract_nnef::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_nnef::tract_core::ops::cast::Cast;
use tract_nnef::tract_core::ops::change_axes::AxisOp;
use tract_nnef::tract_core::ops::einsum::EinSum;
use tract_nnef::tract_core::ops::element_wise::ElementWiseOp;
use tract_nnef::tract_core::ops::math::{self, Add, Mul, Sub};
use tract_nnef::tract_core::ops::matmul::optimized::{OptMatMul, ProtoFusedSpec};
use tract_nnef::tract_core::ops::matmul::pack::DynPackedExoticFact;
use tract_nnef::tract_core::ops::matmul::ModePicker;
use tract_nnef::tract_core::ops::nn::rms_norm::RmsNorm;
use tract_nnef::tract_core::ops::nn::{Reduce, Reducer, Softmax, SoftmaxKind};
use tract_nnef::tract_core::ops::quant::QuantizeLinearU8;
use tract_nnef::tract_core::runtime::{Runnable, State};
use tract_nnef::tract_core::tract_linalg::mmm::OutputStoreSpec;
use tract_nnef::tract_core::tract_linalg::pack::PackedI8K4;

/// The symbol of the batch axis in exported graphs (ONNX `dim_param`, NNEF `tract_symbol`).
pub const BATCH_SYMBOL: &str = "batch";

mod attention;
mod lanes;
mod layer_norm;
mod quantize;
mod softmax;
pub mod tiles;

#[cfg(feature = "cuda")]
use tract_cuda as _; // links the "cuda" runtime into tract's registry

/// Where the network runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
    /// CUDA when it is usable, otherwise the CPU (and the reason is kept).
    Auto,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read model file {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not an ONNX model (the file does not parse as ONNX protobuf): {0}")]
    NotOnnx(String),
    #[error("not a readable NNEF archive: {0}")]
    NotNnef(String),
    #[error(
        "this looks like an ONNX file, and this chardiff reads NNEF archives only (built without \
         the `onnx` feature): rebuild with `--features onnx`, or convert the file once with \
         `chardiff convert MODEL.onnx --out MODEL.nnef.tar` on a full build"
    )]
    OnnxNotBuilt,
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("the graph does not follow the chardiff I/O contract: {0}")]
    Contract(String),
    #[error("NNEF archives are written from f32 models only (tract folds f16 weights to f32 when it prepares a graph, and its NNEF writer has no form for ONNX's quantize operator): keep {0} models as ONNX")]
    NnefNotF32(Precision),
    #[error("--compute int8 runs a file's int8 matrix products, and this file stores {0} weights: export the run with `chardiff export --precision int8`")]
    ComputeInt8(Precision),
    #[error("an int8 model computes its matrix products in int8, or in f32 from its widened weights (--compute int8 or f32): --compute f16 does not apply to it")]
    Int8InF16,
    #[error("cannot widen this file's int8 matrix products to f32 ({0}): run them in int8 with --compute int8")]
    NotWidenable(String),
    #[error("tract could not prepare the graph: {0}")]
    Tract(String),
    #[error("the graph's batch axis is not the `{BATCH_SYMBOL}` symbol")]
    NoBatchSymbol,
    #[error("this chardiff was built without split matrix products (rayon adds ~5 MB, so edge builds leave it out): use `--parallelism batch`, or rebuild with `--features matmul-threads`")]
    MatmulThreadsNotBuilt,
    #[error("this chardiff was built without CUDA support: rebuild with `cargo build --release --features cuda`")]
    CudaNotBuilt,
    #[error("CUDA is not usable here: {0}")]
    Cuda(String),
}

/// A denoiser running an exported graph with tract, f32, on the CPU or a GPU.
pub struct TractDenoiser {
    spec: ModelSpec,
    /// The graph as read, batch symbolic (in f16 when computing in f16).
    model: TypedModel,
    /// The batch size the workers are prepared for.
    prepared_for: Option<usize>,
    /// One per part of the batch, each with its own states; all but the first run on threads
    /// of their own.
    workers: Vec<Worker>,
    /// The prepared plans by batch size, shared by the workers' states.
    plans: Vec<(usize, Arc<dyn Runnable>)>,
    threads: usize,
    parallelism: Parallelism,
    /// Sequences per network call on the CPU (`None`: `DEFAULT_CALL_BATCH`).
    call_batch: Option<usize>,
    /// The pool split matmuls run on (`Parallelism::Matmul`, more than one thread).
    pool: Option<matmul_pool::Pool>,
    /// Asked for until the first plan is prepared, then where the network runs.
    device: Device,
    /// What the network computes in (`arithmetic`); for f16, inputs and outputs are converted
    /// at the boundary.
    compute: Precision,
    /// Why `Device::Auto` fell back to the CPU.
    fallback: Option<String>,
}

/// How one network call uses more than one CPU thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parallelism {
    /// Contiguous parts of the batch (up to one per thread) on separate threads, one plan state
    /// each: no synchronisation inside a step. A single sequence runs on one thread.
    #[default]
    Batch,
    /// Every matrix product split across a pool of threads (tract-linalg's executor). On 2
    /// cores it was slower than one thread for 1 and 8 sequences (BENCHMARKS.md); it is for
    /// single sequences on machines with more cores.
    Matmul,
}

/// Sequences per network call on the CPU unless `set_call_batch` says otherwise. One at a time:
/// tract's step per sequence of the default model was 1.4-1.7x faster that way than in calls of
/// 8 or 64 on both machines measured. A call of one sequence allocates at most ~200 KB at a
/// time, which the allocator keeps between steps, while a whole batch's megabyte buffers are
/// faulted in afresh each step (BENCHMARKS.md, "Where tract's step goes"; with `cpu_forms`
/// still 30.0 against 20 ms at B=8). On a GPU a call takes the whole batch.
pub const DEFAULT_CALL_BATCH: usize = 1;

/// One part of the batch: its network calls (contiguous rows each, in order) and the runner of
/// the plan states it makes them with.
struct Worker {
    calls: Vec<Range<usize>>,
    runner: Runner,
}

/// A worker's plan states, one per call size it makes.
struct States(Vec<(usize, Box<dyn State>)>);

/// A worker's share of one denoising step: its network calls' inputs, and which of the graph's
/// outputs it wants back (0: x0, 1: a softmax head's logits, the order `check_contract` holds
/// every file to).
struct Job {
    calls: Vec<TVec<Tensor>>,
    output: usize,
}

impl States {
    /// One network call per input set, in order: the wanted output of each, as f32.
    fn run(&mut self, Job { calls, output }: Job) -> TractResult<Vec<Tensor>> {
        let mut outputs = Vec::with_capacity(calls.len());
        for inputs in calls {
            let size = inputs[0].shape()[0];
            let (_, state) = self
                .0
                .iter_mut()
                .find(|(batch, _)| *batch == size)
                .expect("a state for every call size");
            let results = state.run(inputs.into_iter().map(TValue::from).collect())?;
            outputs.push(results[output].cast_to::<f32>()?.into_owned());
        }
        Ok(outputs)
    }
}

/// Where a worker's plan states run: on the calling thread (the first part), or on a thread kept
/// for the life of the plans (no thread is started per denoising step).
enum Runner {
    Here(States),
    Thread {
        jobs: Option<mpsc::Sender<Job>>,
        results: mpsc::Receiver<TractResult<Vec<Tensor>>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
}

impl Runner {
    fn thread(mut states: States) -> Runner {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, results) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            for job in inbox {
                if outbox.send(states.run(job)).is_err() {
                    break;
                }
            }
        });
        Runner::Thread { jobs: Some(jobs), results, thread: Some(thread) }
    }
}

impl Drop for Runner {
    /// Ends the thread (its inbox closes) and waits, so that its memory is gone before new
    /// plans are made.
    fn drop(&mut self) {
        if let Runner::Thread { jobs, thread, .. } = self {
            drop(jobs.take());
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The CPU feature that gives tract's int8 matrix products their dot-product kernels here (u8 x
/// i8: AVX512-VNNI or AVX-VNNI on x86-64, dotprod on aarch64), if there is one. Without it tract
/// emulates them, tens of times slower than f32.
pub fn int8_dot_product() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            return Some("avx512vnni");
        }
        if std::arch::is_x86_feature_detected!("avxvnni") {
            return Some("avxvnni");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            return Some("dotprod");
        }
    }
    None
}

/// The arithmetic a file with `stored` weights runs in: the one `asked` for where it applies,
/// else a default. f16 weights compute in f16 only with native fp16 (tract's f16 is scalar code
/// elsewhere). int8 files compute in f32 from their weights widened once at load: the closest to
/// the f32 model (the default model's x0 moves by 0.07 at most, by 0.40 with int8 products), on
/// any CPU and on a GPU (tract's CUDA products take f32 and f16 only). Asked for, they run in
/// int8: with the CPU plans' vectorized quantization and row-stored products, 0.51-0.53x the f32
/// step on the one VNNI CPU measured since (1.0-1.6x before, on two; BENCHMARKS.md), tens of
/// times slower where the CPU has no int8 dot products.
pub fn arithmetic(stored: Precision, asked: Option<Precision>) -> Result<Precision, LoadError> {
    match (asked, stored) {
        (Some(Precision::Int8), Precision::F32 | Precision::F16) => {
            Err(LoadError::ComputeInt8(stored))
        }
        (Some(Precision::F16), Precision::Int8) => Err(LoadError::Int8InF16),
        (Some(asked), _) => Ok(asked),
        (None, Precision::F16) if native_f16() => Ok(Precision::F16),
        (None, _) => Ok(Precision::F32),
    }
}

/// Whether this CPU has native fp16 arithmetic (aarch64 FEAT_FP16) that tract's kernels use.
/// Elsewhere tract computes f16 in scalar code, tens of times slower than f32.
pub fn native_f16() -> bool {
    tract_nnef::tract_core::tract_linalg::has_fp16()
}

impl TractDenoiser {
    pub fn load(path: &Path) -> Result<TractDenoiser, LoadError> {
        TractDenoiser::load_on(path, Device::Cpu)
    }

    pub fn load_on(path: &Path, device: Device) -> Result<TractDenoiser, LoadError> {
        TractDenoiser::load_with(path, device, None)
    }

    /// `load_on` with a choice of arithmetic (see `from_bytes_with`).
    pub fn load_with(
        path: &Path,
        device: Device,
        compute: Option<Precision>,
    ) -> Result<TractDenoiser, LoadError> {
        let bytes = std::fs::read(path)
            .map_err(|source| LoadError::Io { path: path.to_path_buf(), source })?;
        TractDenoiser::from_bytes_with(&bytes, device, compute)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<TractDenoiser, LoadError> {
        TractDenoiser::from_bytes_on(bytes, Device::Cpu)
    }

    pub fn from_bytes_on(bytes: &[u8], device: Device) -> Result<TractDenoiser, LoadError> {
        TractDenoiser::from_bytes_with(bytes, device, None)
    }

    /// `compute`: the arithmetic (see `arithmetic`), by default what is fast here for the
    /// file's weights. Nothing is prepared yet: see `prepare`.
    pub fn from_bytes_with(
        bytes: &[u8],
        device: Device,
        compute: Option<Precision>,
    ) -> Result<TractDenoiser, LoadError> {
        let (spec, mut model, compute) = typed_model(bytes, compute)?;
        if compute == Precision::F16 {
            let to_f16 = tract_nnef::tract_core::transform::get_transform("f32_to_f16")
                .map_err(tract_error)?
                .expect("tract-core registers f32_to_f16");
            model = to_f16
                .transform_into(model.into_decluttered().map_err(tract_error)?)
                .map_err(tract_error)?;
        }
        if device == Device::Cuda {
            cuda_available()?;
        }
        Ok(TractDenoiser {
            spec,
            model,
            prepared_for: None,
            workers: Vec::new(),
            plans: Vec::new(),
            threads: 1,
            parallelism: Parallelism::Batch,
            call_batch: None,
            pool: None,
            device,
            compute,
            fallback: None,
        })
    }

    /// Lets each network call use up to `threads` CPU threads, the way `parallelism` says
    /// (one thread by default), from the next call on.
    pub fn set_threads(
        &mut self,
        threads: usize,
        parallelism: Parallelism,
    ) -> Result<(), LoadError> {
        let threads = threads.max(1);
        if (threads, parallelism) != (self.threads, self.parallelism) {
            let split_matmuls = threads > 1 && parallelism == Parallelism::Matmul;
            self.pool = if split_matmuls { Some(matmul_pool::new(threads)?) } else { None };
            (self.threads, self.parallelism) = (threads, parallelism);
            self.invalidate();
        }
        Ok(())
    }

    pub fn threads(&self) -> (usize, Parallelism) {
        (self.threads, self.parallelism)
    }

    /// At most `sequences` per network call on the CPU (`None`: `DEFAULT_CALL_BATCH`); a
    /// thread's part of a larger batch is run in calls of that size, from the next call on. The
    /// text does not depend on it (tested).
    pub fn set_call_batch(&mut self, sequences: Option<usize>) {
        let sequences = sequences.map(|n| n.max(1));
        if sequences != self.call_batch {
            self.call_batch = sequences;
            self.invalidate();
        }
    }

    /// Sequences per network call for a part of `part` sequences: on the CPU at most the call
    /// batch, elsewhere all of them.
    pub fn call_size(&self, part: usize) -> usize {
        match self.device {
            Device::Cpu => self.call_batch.unwrap_or(DEFAULT_CALL_BATCH).min(part).max(1),
            Device::Cuda | Device::Auto => part.max(1),
        }
    }

    /// Drops the workers (and their states' buffers); `prepare` makes new ones, keeping the
    /// plans it can reuse.
    fn invalidate(&mut self) {
        self.workers.clear();
        self.prepared_for = None;
    }

    /// How a batch is split across workers: into up to `threads` parts on the CPU with
    /// `Parallelism::Batch`, else one part.
    fn parts(&self, batch: usize) -> Vec<Range<usize>> {
        let split = self.device == Device::Cpu && self.parallelism == Parallelism::Batch;
        let k = if split { self.threads.min(batch).max(1) } else { 1 };
        (0..k).map(|i| i * batch / k..(i + 1) * batch / k).collect()
    }

    /// The graph with its batch axis fixed at `batch`.
    fn with_batch(&self, batch: usize) -> Result<TypedModel, LoadError> {
        let symbol = self.model.symbols.get(BATCH_SYMBOL).ok_or(LoadError::NoBatchSymbol)?;
        let fixed = std::collections::HashMap::from([(symbol, (batch as i64).to_dim())]);
        self.model.set_symbols(&fixed).map_err(tract_error)
    }

    /// The graph with its batch fixed at `batch`, prepared on the device.
    fn plan(&mut self, batch: usize) -> Result<Arc<dyn Runnable>, LoadError> {
        let model = self.with_batch(batch)?;
        let runnable = match self.device {
            Device::Cpu => prepare_cpu(model)?,
            Device::Cuda => prepare_cuda(model)?,
            Device::Auto => match prepare_cuda(model.clone()) {
                Ok(runnable) => {
                    self.device = Device::Cuda;
                    runnable
                }
                Err(why) => {
                    self.device = Device::Cpu;
                    self.fallback = Some(why.to_string());
                    prepare_cpu(model)?
                }
            },
        };
        Ok(runnable.into())
    }

    /// Prepares the plans for denoising `batch` sequences at a time, unless they are the
    /// current ones. `denoise` does this itself; calling it first separates the preparation
    /// time and its errors from the first step. With `Device::Auto`, the first plan decides the
    /// device.
    pub fn prepare(&mut self, batch: usize) -> Result<(), LoadError> {
        if self.prepared_for == Some(batch) {
            return Ok(());
        }
        // Plans of call sizes still made are kept (with one sequence per call, every plan); the
        // others, and the old states' buffers, go before new plans are made.
        self.invalidate();
        let mut kept = std::mem::take(&mut self.plans);
        if self.device == Device::Auto {
            let runnable = self.plan(batch)?; // decides the device
            if self.call_size(batch) == batch {
                self.plans.push((batch, runnable));
            }
        }
        let parts: Vec<Vec<Range<usize>>> = self
            .parts(batch)
            .into_iter()
            .map(|rows| {
                let size = self.call_size(rows.len());
                rows.clone().step_by(size).map(|start| start..rows.end.min(start + size)).collect()
            })
            .collect();
        kept.retain(|(size, _)| parts.iter().flatten().any(|call| call.len() == *size));
        for calls in parts {
            let mut states = Vec::new();
            for call in &calls {
                if !states.iter().any(|(size, _)| *size == call.len()) {
                    let runnable = self.runnable(call.len(), &mut kept)?;
                    states.push((call.len(), runnable.spawn().map_err(tract_error)?));
                }
            }
            let states = States(states);
            let runner =
                if self.workers.is_empty() { Runner::Here(states) } else { Runner::thread(states) };
            self.workers.push(Worker { calls, runner });
        }
        self.prepared_for = Some(batch);
        Ok(())
    }

    /// The plan for calls of `batch` sequences: one of those prepared, or of those `kept` from
    /// the previous batch size, or a new one.
    fn runnable(
        &mut self,
        batch: usize,
        kept: &mut Vec<(usize, Arc<dyn Runnable>)>,
    ) -> Result<Arc<dyn Runnable>, LoadError> {
        if let Some((_, runnable)) = self.plans.iter().find(|(size, _)| *size == batch) {
            return Ok(runnable.clone());
        }
        let runnable = match kept.iter().position(|(size, _)| *size == batch) {
            Some(i) => kept.swap_remove(i).1,
            None => self.plan(batch)?,
        };
        self.plans.push((batch, runnable.clone()));
        Ok(runnable)
    }

    /// Floating-point operations of one network call per sequence: twice the multiply-adds of
    /// its matrix products (element-wise work is left out, as in GEMM peak figures).
    pub fn flops_per_sequence(&self) -> Result<u64, LoadError> {
        let model = self.with_batch(1)?.into_decluttered().map_err(tract_error)?;
        let mut fmas = 0;
        for node in model.nodes().iter().filter(|n| n.op_is::<EinSum>()) {
            let inputs = model.node_input_facts(node.id).map_err(tract_error)?;
            for (cost, count) in node.op.cost(&inputs).map_err(tract_error)? {
                if matches!(cost, tract_nnef::tract_core::ops::Cost::FMA(_)) {
                    fmas += count.to_i64().map_err(|e| LoadError::Tract(format!("{e:#}")))? as u64;
                }
            }
        }
        Ok(2 * fmas)
    }

    /// What the network computes in.
    pub fn compute(&self) -> Precision {
        self.compute
    }

    /// Where the network runs (`Auto` until the first plan is prepared).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Why `Device::Auto` runs on the CPU, when it does.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Operators of a CUDA plan that run on the CPU (with a sync on each side): everything but
    /// GPU kernels, device syncs, inputs and constants. Empty for a CPU plan.
    pub fn cpu_fallbacks(&self) -> Vec<String> {
        if self.device != Device::Cuda {
            return vec![];
        }
        let on_gpu = |op: &str| {
            ["Cuda", "Gpu", "DeviceSync", "Source", "Const"].iter().any(|p| op.starts_with(p))
        };
        self.plan_ops().into_iter().map(|(op, _)| op).filter(|op| !on_gpu(op)).collect()
    }

    /// Operator names of the prepared plan with how many nodes use each: on CUDA, the ones
    /// without a GPU prefix run on the CPU. Empty before the first plan.
    pub fn plan_ops(&self) -> Vec<(String, usize)> {
        let mut counts = std::collections::BTreeMap::new();
        if let Some(model) = self.plans.first().and_then(|(_, plan)| plan.typed_model()) {
            for node in model.nodes() {
                *counts.entry(node.op.name().to_string()).or_insert(0) += 1;
            }
        }
        counts.into_iter().collect()
    }
}

/// tract's f32 matrix-product speed on one thread, in GFLOP/s: the best of `runs` products of
/// two n x n matrices (n = 1024 is large enough for the kernels' peak). What a step's
/// arithmetic is measured against.
pub fn gemm_peak_gflops(n: usize, runs: usize) -> Result<f64, LoadError> {
    let mut model = TypedModel::default();
    let a = model.add_source("a", f32::fact([n, n])).map_err(tract_error)?;
    let b = model.add_const("b", Tensor::zero::<f32>(&[n, n]).map_err(tract_error)?);
    let b = b.map_err(tract_error)?;
    let axes = "mk,kn->mn".parse().map_err(tract_error)?;
    let product = EinSum::new(axes, f32::datum_type());
    let c = model.wire_node("c", product, &[a, b]).map_err(tract_error)?;
    model.select_output_outlets(&c).map_err(tract_error)?;
    let plan = prepare_cpu(model)?;
    let mut state = plan.spawn().map_err(tract_error)?;
    let input = Tensor::zero::<f32>(&[n, n]).map_err(tract_error)?;
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) + 1 {
        let start = std::time::Instant::now();
        state.run(tvec![input.clone().into()]).map_err(tract_error)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// The two file formats a model comes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Onnx,
    /// tract's NNEF archive (a tar, possibly gzipped).
    Nnef,
}

impl Format {
    /// NNEF archives are tars (`ustar` at byte 257) or gzip streams; everything else is taken
    /// for ONNX protobuf, which has no magic number.
    pub fn of(bytes: &[u8]) -> Format {
        let tar = bytes.get(257..262) == Some(b"ustar");
        let gzip = bytes.starts_with(&[0x1f, 0x8b]);
        if tar || gzip {
            Format::Nnef
        } else {
            Format::Onnx
        }
    }
}

fn tract_error(e: TractError) -> LoadError {
    LoadError::Tract(format!("{e:#}"))
}

/// The NNEF dialect chardiff writes: tract's core operators, all a decluttered chardiff graph
/// uses, the same registries as `nnef_reader`, so an export that would not load on an edge
/// build fails at export time.
#[cfg(feature = "onnx")]
fn nnef() -> tract_nnef::internal::Nnef {
    tract_nnef::nnef()
}

/// `nnef()` for reading only, built without its copy of the parsed NNEF standard library, which
/// only the writer uses (tract parses that text once more for its registry): ~4 ms of start-up.
fn nnef_reader() -> tract_nnef::internal::Nnef {
    use tract_nnef::resource::{DatLoader, GraphNnefLoader, GraphQuantLoader, ResourceLoader};
    tract_nnef::internal::Nnef {
        stdlib: Vec::new(),
        registries: vec![tract_nnef::ops::tract_nnef(), tract_nnef::ops::tract_core()],
        resource_loaders: vec![
            GraphNnefLoader.into_boxed(),
            DatLoader.into_boxed(),
            GraphQuantLoader.into_boxed(),
        ],
        allow_extended_identifier_syntax: false,
        extern_all_constants: false,
    }
}

/// Reads either format into the spec and the typed graph, checked against the contract, and
/// the arithmetic `asked` for or chosen (`arithmetic`): an int8 file computed in f32 has its
/// products widened as it is read.
fn typed_model(
    bytes: &[u8],
    asked: Option<Precision>,
) -> Result<(ModelSpec, TypedModel, Precision), LoadError> {
    let (spec, model, compute) = match Format::of(bytes) {
        Format::Nnef => {
            let model = nnef_reader()
                .model_for_read(&mut &bytes[..])
                .map_err(|e| LoadError::NotNnef(format!("{e:#}")))?;
            let text =
                |v: &Tensor| Some(v.try_as_plain_ram().ok()?.to_scalar::<String>().ok()?.clone());
            let props: Vec<(&str, String)> =
                model.properties.iter().filter_map(|(k, v)| Some((k.as_str(), text(v)?))).collect();
            let spec = ModelSpec::from_metadata(props.iter().map(|(k, v)| (*k, v.as_str())))?;
            // NNEF archives are written from f32 models only (`onnx_to_nnef`).
            let compute = arithmetic(spec.precision, asked)?;
            (spec, model, compute)
        }
        Format::Onnx => onnx::typed_model(bytes, asked)?,
    };
    check_contract(&model, &spec)?;
    Ok((spec, model, compute))
}

/// Converts an ONNX model to tract's NNEF archive: the same graph, decluttered, with the spec as
/// model properties (`chardiff.*`), with fixed timestamps in the tar.
#[cfg(feature = "onnx")]
pub fn onnx_to_nnef(onnx_bytes: &[u8]) -> Result<Vec<u8>, LoadError> {
    let (spec, model, _) = typed_model(onnx_bytes, Some(Precision::F32))?;
    if spec.precision != Precision::F32 {
        return Err(LoadError::NnefNotF32(spec.precision));
    }
    let mut model = model.into_decluttered().map_err(tract_error)?;
    model.properties.clear();
    for (key, value) in spec.to_metadata() {
        model.properties.insert(key, rctensor0(value));
    }
    nnef()
        .write_to_tar_with_config(&model, Vec::new(), false, true)
        .map_err(|e| LoadError::Tract(format!("cannot write the graph as NNEF: {e:#}")))
}

#[cfg(feature = "onnx")]
mod onnx {
    use super::{arithmetic, tract_error, LoadError};
    use crate::spec::{ModelSpec, Precision};
    use std::collections::HashSet;
    use tract_onnx::pb::{tensor_proto::DataType, GraphProto, NodeProto, TensorProto};
    use tract_onnx::prelude::*;
    use tract_onnx::tract_core::internal::{bail, ensure, TractErrorContext};

    pub fn typed_model(
        bytes: &[u8],
        asked: Option<Precision>,
    ) -> Result<(ModelSpec, TypedModel, Precision), LoadError> {
        let onnx = tract_onnx::onnx();
        let mut proto = onnx
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| LoadError::NotOnnx(format!("{e:#}")))?;
        let spec = ModelSpec::from_metadata(
            proto.metadata_props.iter().map(|p| (p.key.as_str(), p.value.as_str())),
        )?;
        let compute = arithmetic(spec.precision, asked)?;
        if spec.precision == Precision::Int8 && compute == Precision::F32 {
            let graph = proto.graph.as_mut().ok_or(LoadError::NotOnnx("no graph".into()))?;
            widen_int8(graph, &onnx).map_err(|e| LoadError::NotWidenable(format!("{e:#}")))?;
        }
        let model =
            onnx.model_for_proto_model(&proto).and_then(|m| m.into_typed()).map_err(tract_error)?;
        Ok((spec, model, compute))
    }

    /// Rewrites the int8 products of an int8 file as f32 products of its widened weights, which
    /// tract runs faster than its int8 products (`arithmetic`). The export writes x W as
    /// `Cast(MatMulInteger(QuantizeLinear(x, s_x, z), W_q, z)) * (s_x s_w)`; the whole becomes
    /// `MatMul(x, W_q s_w)`: the file's weights, the activations no longer quantized, and the
    /// products in the same form as an f32 file's, which `cpu_forms` rewrites alike (with the
    /// scaling left after the product, the MLP's hidden layout did not apply: 1.08-1.13x the f32
    /// file's step). A product not scaled so keeps its scaling, `MatMul(x, W_q / s_x)` before it.
    /// What nothing reads any more is dropped.
    fn widen_int8(graph: &mut GraphProto, onnx: &tract_onnx::Onnx) -> TractResult<()> {
        let constant = |name: &str| -> TractResult<(Vec<i64>, Tensor)> {
            let proto = graph.initializer.iter().find(|t| t.name == name);
            let proto = proto.with_context(|| format!("{name} is not a constant"))?;
            Ok((proto.dims.clone(), tract_onnx::tensor::load_tensor(&*onnx.provider, proto, None)?))
        };
        let mut widened = vec![];
        for (i, node) in graph.node.iter().enumerate() {
            if node.op_type != "MatMulInteger" {
                continue;
            }
            let [x_q, w_q, zero] = &node.input[..] else {
                bail!("{} has a weight zero point, or lacks the activation's", node.name)
            };
            let quantize = graph.node.iter().find(|n| n.output.first() == Some(x_q));
            let Some([x, x_scale, x_zero]) = quantize
                .filter(|n| n.op_type == "QuantizeLinear")
                .and_then(|n| <&[String; 3]>::try_from(&n.input[..]).ok())
            else {
                bail!("{} does not multiply a quantized f32 activation", node.name)
            };
            ensure!(
                constant(zero)?.1 == constant(x_zero)?.1,
                "{} subtracts another zero point than its activation's",
                node.name
            );
            let s_x = constant(x_scale)?.1.cast_to_scalar::<f32>()?;
            let (dims, w) = constant(w_q)?;
            ensure!(w.datum_type() == i8::datum_type(), "{w_q} is not an int8 constant");
            let w = w.cast_to::<f32>()?;
            let w = w.to_plain_array_view::<f32>()?;
            // The only reader of `output`, if the graph has exactly one.
            let reader = |output: &String| {
                let mut readers =
                    graph.node.iter().enumerate().filter(|(_, n)| n.input.contains(output));
                readers.next().filter(|_| readers.next().is_none())
            };
            let cast = reader(&node.output[0]).filter(|(_, n)| n.op_type == "Cast");
            let scaling = cast.and_then(|(c, cast)| {
                let (m, mul) = reader(&cast.output[0]).filter(|(_, n)| n.op_type == "Mul")?;
                let scale = mul.input.iter().find(|name| **name != cast.output[0])?;
                let scale = constant(scale).ok()?.1.cast_to::<f32>().ok()?.into_owned();
                Some((c, m, mul.output[0].clone(), scale))
            });
            let per_column =
                |scale: &Tensor| scale.len() == 1 || Some(scale.len()) == w.shape().last().copied();
            let (weights, output, dead) = match scaling.filter(|(.., scale)| per_column(scale)) {
                Some((c, m, output, scale)) => {
                    let scale =
                        scale.to_plain_array_view::<f32>()?.iter().copied().collect::<Vec<_>>();
                    let column =
                        |i: usize| scale[if scale.len() == 1 { 0 } else { i % scale.len() }];
                    let weights = w.iter().enumerate().map(|(i, v)| v * (column(i) / s_x));
                    (weights.flat_map(f32::to_le_bytes).collect(), output, vec![c, m])
                }
                None => (
                    w.iter().flat_map(|v| (v / s_x).to_le_bytes()).collect(),
                    node.output[0].clone(),
                    vec![],
                ),
            };
            widened.push((i, x.clone(), format!("{w_q}.widened"), dims, weights, output, dead));
        }
        let mut dead = vec![];
        for (i, x, name, dims, raw_data, output, scaling) in widened {
            graph.initializer.push(TensorProto {
                name: name.clone(),
                dims,
                data_type: DataType::Float as i32,
                raw_data,
                ..Default::default()
            });
            let node = &mut graph.node[i];
            node.op_type = "MatMul".into();
            node.input = vec![x, name];
            node.output = vec![output];
            node.attribute.clear();
            dead.extend(scaling);
        }
        // The scalings folded into the weights (their outputs are the products' now).
        dead.sort_unstable();
        for i in dead.into_iter().rev() {
            graph.node.remove(i);
        }
        // The QuantizeLinear nodes, then the int8 weights and the activations' zero points.
        loop {
            let read: HashSet<&String> = graph
                .node
                .iter()
                .flat_map(|n| &n.input)
                .chain(graph.output.iter().map(|o| &o.name))
                .collect();
            let unread = |n: &NodeProto| n.output.iter().all(|o| !read.contains(o));
            let Some(dead) = graph.node.iter().position(unread) else { break };
            graph.node.remove(dead);
        }
        let read: HashSet<String> = graph.node.iter().flat_map(|n| n.input.clone()).collect();
        graph.initializer.retain(|t| read.contains(&t.name));
        Ok(())
    }
}

#[cfg(not(feature = "onnx"))]
mod onnx {
    use super::LoadError;
    use crate::spec::{ModelSpec, Precision};
    use tract_nnef::prelude::TypedModel;

    /// ONNX protobuf starts with field 1 (`ir_version`, a varint: tag byte 0x08).
    pub fn typed_model(
        bytes: &[u8],
        _: Option<Precision>,
    ) -> Result<(ModelSpec, TypedModel, Precision), LoadError> {
        if bytes.first() == Some(&0x08) {
            Err(LoadError::OnnxNotBuilt)
        } else {
            Err(LoadError::NotNnef("neither a tar nor a gzip stream".into()))
        }
    }
}

/// tract-linalg's thread pool for split matrix products (feature `matmul-threads`).
#[cfg(feature = "matmul-threads")]
mod matmul_pool {
    use super::LoadError;
    use tract_linalg::multithread::{multithread_tract_scope, Executor};

    pub struct Pool(Executor);

    /// For more than one thread: tract's `multithread(1)` would use every core (tract #2894).
    pub fn new(threads: usize) -> Result<Pool, LoadError> {
        Ok(Pool(Executor::multithread(threads)))
    }

    /// Runs `f` with its matrix products split across the pool.
    pub fn run<R>(pool: &Pool, f: impl FnOnce() -> R) -> R {
        multithread_tract_scope(pool.0.clone(), f)
    }
}

#[cfg(not(feature = "matmul-threads"))]
mod matmul_pool {
    use super::LoadError;

    pub enum Pool {}

    pub fn new(_threads: usize) -> Result<Pool, LoadError> {
        Err(LoadError::MatmulThreadsNotBuilt)
    }

    pub fn run<R>(pool: &Pool, _f: impl FnOnce() -> R) -> R {
        match *pool {}
    }
}

/// What tract's CPU runtime does (declutter, optimize, plan) with `cpu_forms` between the first
/// two.
fn prepare_cpu(model: TypedModel) -> Result<Box<dyn Runnable>, LoadError> {
    let model = optimized_for_cpu(model).map_err(tract_error)?;
    Ok(Box::new(TypedSimplePlan::new(model).map_err(tract_error)?))
}

/// The graph of a CPU plan (batch fixed): decluttered, rewritten (`cpu_forms`), optimized.
pub fn optimized_for_cpu(model: TypedModel) -> TractResult<TypedModel> {
    let mut model = cpu_forms(model)?;
    model.optimize()?;
    let model = packed_quantization(model)?;
    Ok(row_stored_products(model))
}

/// tract-linalg's int8 tiles that hold their accumulators by rows of the output (one vector of
/// n values per row of m) and with the same panels for both inputs. Such a tile writes a row in
/// one store where the output's n axis is contiguous, and element by element otherwise.
const ROW_MAJOR_TILES: &[&str] = &["avx512vnni_mmm_i32_16x16"];

/// After tract's optimization: the products on a `ROW_MAJOR_TILES` tile whose output is
/// contiguous along m, swapped: each input on the other side, rows for columns. tract makes the
/// longer side m, here the weights' features, which are the contiguous axis of the outputs; the
/// 16x16 VNNI tile then stores its 256 sums one at a time, ~100 ns of a tile's ~200 (the MLP's up
/// projections took 35 us against the down's 18 for the same arithmetic). The sums are the
/// same: each is the same k products added in the same order.
fn row_stored_products(mut model: TypedModel) -> TypedModel {
    for id in 0..model.nodes().len() {
        if let Some(swapped) = model.node(id).op_as::<OptMatMul>().and_then(swapped_product) {
            model.node_mut(id).op = Box::new(swapped);
        }
    }
    model
}

/// `product` with a and b, m and n exchanged, where its tile is one of `ROW_MAJOR_TILES`, its
/// output is contiguous along m and not along n, and everything it fuses has a swapped form.
fn swapped_product(product: &OptMatMul) -> Option<OptMatMul> {
    let [tile] = &product.mmm[..] else { return None };
    let innermost = product.c_fact.rank().checked_sub(1)?;
    let applies = ROW_MAJOR_TILES.contains(&tile.name())
        && product.mode_picker == ModePicker::Single
        && product.c_m_axis == Some(innermost)
        && product.c_n_axis.is_some_and(|n| n != innermost);
    if !applies {
        return None;
    }
    let mut swapped = product.clone();
    std::mem::swap(&mut swapped.c_m_axis, &mut swapped.c_n_axis);
    for micro_op in &mut swapped.micro_ops {
        match micro_op {
            ProtoFusedSpec::AddMatMul { geo, a, b, packings } => {
                // Each input's panels must be what the other side reads.
                let alike = |&(ix, ref extractor): &(usize, Option<_>)| {
                    let (a, b) = &tile.packings()[ix];
                    extractor.is_none() && a.dyn_eq(&**b)
                };
                if !packings.iter().all(alike) {
                    return None;
                }
                std::mem::swap(a, b);
                std::mem::swap(&mut geo.c_to_a_axis_mapping, &mut geo.c_to_b_axis_mapping);
            }
            ProtoFusedSpec::BinPerRow(v, op, map) => {
                *micro_op = ProtoFusedSpec::BinPerCol(*v, *op, map.clone())
            }
            ProtoFusedSpec::BinPerCol(v, op, map) => {
                *micro_op = ProtoFusedSpec::BinPerRow(*v, *op, map.clone())
            }
            ProtoFusedSpec::AddRowColProducts(row, col) => std::mem::swap(row, col),
            ProtoFusedSpec::Store(specs) => {
                for spec in specs {
                    let OutputStoreSpec::View { m_axis, n_axis, mr, nr } = spec else {
                        return None;
                    };
                    std::mem::swap(m_axis, n_axis);
                    std::mem::swap(mr, nr);
                }
            }
            ProtoFusedSpec::BinScalar(..) | ProtoFusedSpec::LeakyRelu(_) => {}
            ProtoFusedSpec::Scaler(_) => {}
            ProtoFusedSpec::AddUnicast(..) => return None,
        }
    }
    Some(swapped)
}

/// After tract's optimization: where an int8 product's input is quantized (`QuantizeU8`),
/// shifted to i8 and packed for the kernel, one operator does the three
/// (`quantize::QuantizePacked`).
fn packed_quantization(mut model: TypedModel) -> TractResult<TypedModel> {
    let mut rewritten = false;
    for id in 0..model.nodes().len() {
        let pack = model.node(id);
        let fact = model.outlet_fact(id.into())?;
        let exotic = fact.exotic_fact().and_then(|f| f.downcast_ref::<DynPackedExoticFact>());
        let Some(exotic) = exotic.filter(|_| pack.op.name() == "OptMatMulPack") else { continue };
        let format = match &exotic.packers[..] {
            [only] => only.downcast_ref::<PackedI8K4>().cloned(),
            _ => None,
        };
        // (Through the reshape that merges a per-head input's trailing axes into k.)
        let mut offset = model.node(pack.inputs[0].node);
        let mut reader = id;
        if offset.op.name() == "IntoShape" && only_read_by(&model, offset, id) {
            reader = offset.id;
            offset = model.node(offset.inputs[0].node);
        }
        if offset.op.name() != "OffsetU8asI8" || !only_read_by(&model, offset, reader) {
            continue;
        }
        let quantize = model.node(offset.inputs[0].node);
        let (Some(format), Some(q)) = (format, quantize.op_as::<quantize::QuantizeU8>()) else {
            continue;
        };
        // [mn, k] (positions by features), or [mn, ...] with the rest k.
        let input = model.outlet_fact(quantize.inputs[0])?.shape.as_concrete().map(|s| s.to_vec());
        let oriented = input.as_deref().is_some_and(|s| match s {
            [mn, rest @ ..] if !rest.is_empty() => {
                let k = rest.iter().product::<usize>();
                *mn != k && exotic.mn == mn.to_dim() && exotic.k == k.to_dim()
            }
            _ => false,
        });
        if !only_read_by(&model, quantize, offset.id) || !oriented {
            continue;
        }
        let packers = exotic.packers.clone();
        let op = quantize::QuantizePacked { quantize: q.0.clone(), format, packers };
        let patch = TypedModelPatch::replace_single_op(&model, pack, &[quantize.inputs[0]], op)?;
        patch.apply(&mut model)?;
        rewritten = true;
    }
    if rewritten {
        model = model.into_compact()?;
    }
    Ok(model)
}

/// The decluttered graph in forms tract's CPU kernels run faster (issue 4; BENCHMARKS.md, "Forms
/// of the graph tract runs faster"), ready for tract's optimization. Each rule says what it
/// rewrites and why. What the rules replace is dropped, not decluttered again (which cost 3-6 ms
/// of start-up).
pub fn cpu_forms(model: TypedModel) -> TractResult<TypedModel> {
    let mut model = model.into_decluttered()?;
    let rules = [
        biased_softmax,
        own_softmax,
        fused_attention,
        joined_projections,
        joined_inputs,
        subtract_negated_constant,
        subtract_negated_product,
        fused_layer_norm,
        residual_layer_norm,
        shifted_layer_norm,
        sum_as_product,
        fold_shift,
        transposed_hidden,
        vectorized_quantize,
        fused_dequantize,
    ];
    // A pass visits every node once. After a pass that rewrote something, what nothing reads any
    // more is dropped (a rule asking for a node's only reader must not see the one it replaced)
    // and the rules run again over the result: some rewrite what others made (`transposed_hidden`
    // the products `fold_shift` rewires). No rule's output is its own pattern again.
    loop {
        let mut rewritten = false;
        for id in 0..model.nodes().len() {
            for rule in rules {
                if let Some(patch) = rule(&model, id)? {
                    patch.apply(&mut model)?;
                    rewritten = true;
                    break;
                }
            }
        }
        if !rewritten {
            return Ok(model);
        }
        model = model.into_compact()?;
    }
}

/// The only reader of `node`'s output, if there is exactly one and it is not an output of the
/// graph too.
fn only_reader<'m>(model: &'m TypedModel, node: &TypedNode) -> Option<&'m TypedNode> {
    let outlet = OutletId::new(node.id, 0);
    match (&node.outputs[..], model.outputs.contains(&outlet)) {
        ([output], false) => match &output.successors[..] {
            [only] => Some(model.node(only.node)),
            _ => None,
        },
        _ => None,
    }
}

/// Whether `reader` is the only reader of `node`'s output.
fn only_read_by(model: &TypedModel, node: &TypedNode, reader: usize) -> bool {
    only_reader(model, node).map(|r| r.id) == Some(reader)
}

/// The activation and the constant that `node` combines with the binary operator `Op`, in
/// either order.
fn with_constant<Op: BinMiniOp>(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(OutletId, Arc<Tensor>)>> {
    let (Some(TypedBinOp(op, _)), [a, b]) = (node.op_as::<TypedBinOp>(), &node.inputs[..]) else {
        return Ok(None);
    };
    let konst = |outlet: OutletId| model.outlet_fact(outlet).map(|f| f.konst.clone());
    Ok(match (op.is::<Op>(), konst(*a)?, konst(*b)?) {
        (true, None, Some(c)) => Some((*a, c)),
        (true, Some(c), None) => Some((*b, c)),
        _ => None,
    })
}

/// Whether `outlet` varies with the inputs (not a constant).
fn activation(model: &TypedModel, outlet: OutletId) -> TractResult<bool> {
    Ok(model.outlet_fact(outlet)?.konst.is_none())
}

fn f32_values(t: &Tensor) -> TractResult<Vec<f32>> {
    Ok(t.cast_to::<f32>()?.to_plain_array_view::<f32>()?.iter().copied().collect())
}

/// The length of `fact`'s last axis, if it is known.
fn last_axis(fact: &TypedFact) -> Option<usize> {
    fact.shape.last().and_then(|d| d.as_i64()).map(|d| d as usize)
}

/// `t` as an f32 vector, if it holds one value per feature of a `width`-long last axis (the same
/// for every position: a LayerNorm's weights, a product's scale or bias).
fn per_feature(t: &Tensor, width: usize) -> TractResult<Option<Arc<Tensor>>> {
    if t.len() != width || t.shape().last() != Some(&width) {
        return Ok(None);
    }
    Ok(Some(Arc::new(tract_ndarray::Array1::from(f32_values(t)?).into_tensor())))
}

fn negated(t: &Tensor) -> TractResult<Tensor> {
    let values = t.cast_to::<f32>()?.to_plain_array_view::<f32>()?.mapv(|v| -v);
    Ok(values.into_tensor().cast_to_dt(t.datum_type())?.into_owned())
}

/// A constant added to activations read only by a softmax over the last axis (the attention's
/// scores and their bias) becomes one operator, `softmax::RowSoftmax` with the bias, which adds
/// it in its first pass over each row: tract adds it in a pass of its own (10 us for the default
/// model's [4, 96, 96] scores, as `subtract_negated_constant` leaves it).
fn biased_softmax(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some((x, bias)) = with_constant::<Add>(model, node)? else { return Ok(None) };
    let Some(softmax) = only_reader(model, node) else { return Ok(None) };
    let Some(shape) = rows_softmax(model, softmax)? else { return Ok(None) };
    if bias.datum_type() != DatumType::F32 || !softmax::RowSoftmax::fits(&shape, bias.shape()) {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let x = patch.tap_model(model, x)?;
    let op = softmax::RowSoftmax { bias: Some(bias) };
    let wire = patch.wire_node(&softmax.name, op, &[x])?;
    patch.shunt_outside(model, softmax.id.into(), wire[0])?;
    Ok(Some(patch))
}

/// Any other softmax over the last axis becomes `softmax::RowSoftmax` too, which runs rows of
/// any length on the sampler's rows kernel (tract's op takes it for rows a multiple of 4 long:
/// not the head's 82, 16 us a step).
fn own_softmax(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    if rows_softmax(model, node)?.is_none() {
        return Ok(None);
    }
    // Not one another rule left unread.
    if node.outputs[0].successors.is_empty() && !model.outputs.contains(&id.into()) {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let x = patch.tap_model(model, node.inputs[0])?;
    let wire = patch.wire_node(&node.name, softmax::RowSoftmax { bias: None }, &[x])?;
    patch.shunt_outside(model, id.into(), wire[0])?;
    Ok(Some(patch))
}

/// The attention's two products per head and the softmax between them, for one sequence,
/// become one operator, `attention::Attention`: tract packs the four inputs of the two products
/// (three of them transposed) and runs each on panels of the whole [heads, 96, 96] scores; the
/// operator reads queries, keys and values where they lie and keeps a few rows of scores in L1.
fn fused_attention(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    // out[i, h, d] = sum_j p[h, i, j] v[j, h, d], p = softmax(s), s[h, i, j] = q[i, h] . k[j, h]
    // (out[h, i, d] as tract reads an NNEF file; where a graph has one head, tract's
    // decluttering took the heads' axis away.)
    let node = model.node(id);
    let heads_first = einsum_is(node, "hij,jhd->hid");
    let heads_axis = heads_first || einsum_is(node, "hij,jhd->ihd");
    if !heads_axis && !einsum_is(node, "ij,jd->id") {
        return Ok(None);
    }
    let probabilities = model.node(node.inputs[0].node);
    let Some(softmax) = probabilities.op_as::<softmax::RowSoftmax>() else { return Ok(None) };
    let scores = model.node(probabilities.inputs[0].node);
    let scores_expression = if heads_axis { "ihd,jhd->hij" } else { "id,jd->ij" };
    if !einsum_is(scores, scores_expression)
        || !only_read_by(model, scores, probabilities.id)
        || !only_read_by(model, probabilities, id)
    {
        return Ok(None);
    }
    let [q, k, v] = [scores.inputs[0], scores.inputs[1], node.inputs[1]];
    let shapes = [q, k, v]
        .map(|outlet| model.outlet_fact(outlet).map(|f| f.shape.as_concrete().map(|s| s.to_vec())));
    let [Some(q_shape), Some(k_shape), Some(v_shape)] = shapes.map(|s| s.ok().flatten()) else {
        return Ok(None);
    };
    let bias = match (&softmax.bias, q_shape.first()) {
        (Some(bias), Some(&positions)) => attention::Bias::of(bias.clone(), positions)?,
        _ => attention::Bias::None,
    };
    let op = attention::Attention { bias, joined: None, heads_first };
    if q_shape != k_shape || q_shape != v_shape || !op.fits(&op.output_shape(&q_shape)) {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let inputs = [q, k, v].map(|outlet| patch.tap_model(model, outlet));
    let [q, k, v] = inputs;
    let wire = patch.wire_node(&node.name, op, &[q?, k?, v?])?;
    patch.shunt_outside(model, id.into(), wire[0])?;
    Ok(Some(patch))
}

/// The input stage's product of the network's inputs side by side with one weight matrix (tract
/// splits it into one product per input, summed: four products of k = 8, 8, 8 and 1 for the
/// default model, ~8 us each, their cost mostly per call) as one product again, of the inputs
/// concatenated: 5 us and a 1 us concatenation. (Decluttering would split it again; the plan is
/// optimized, not decluttered, after `cpu_forms`.)
fn joined_inputs(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    // The top of a tree of sums of products: not itself read by another sum.
    let is_sum = |n: &TypedNode| n.op_as::<TypedBinOp>().is_some_and(|op| op.0.is::<Add>());
    if !is_sum(node) || only_reader(model, node).is_some_and(is_sum) {
        return Ok(None);
    }
    let (mut products, mut constants) = (vec![], vec![]);
    let mut sums = vec![node];
    while let Some(sum) = sums.pop() {
        for &input in &sum.inputs {
            let term = model.node(input.node);
            if model.outlet_fact(input)?.konst.is_some() {
                constants.push(input);
            } else if !only_read_by(model, term, sum.id) {
                return Ok(None);
            } else if is_sum(term) {
                sums.push(term);
            } else {
                products.push(term);
            }
        }
    }
    // Each an activation [.., k] times constant weights [k, n] (or [n] for k = 1).
    let mut terms = vec![];
    for product in &products {
        let one = einsum_is(product, "amk,n->mn");
        if !one && !einsum_is(product, "amk,kn->mn") {
            return Ok(None);
        }
        let Some(weights) = model.outlet_fact(product.inputs[1])?.konst.clone() else {
            return Ok(None);
        };
        let weights = if one {
            let mut row = weights.into_tensor();
            row.insert_axis(0)?;
            Arc::new(row)
        } else {
            weights
        };
        terms.push((product.inputs[0], weights));
    }
    // (Each input beside its weights: any order gives the same sum; the inputs' order here.)
    terms.sort_by_key(|(input, _)| input.node);
    let shapes: Vec<_> = terms
        .iter()
        .map(|(x, _)| model.outlet_fact(*x).map(|f| f.shape.clone()))
        .collect::<TractResult<_>>()?;
    let same_rows = shapes.windows(2).all(|w| w[0][..w[0].len() - 1] == w[1][..w[1].len() - 1]);
    if terms.len() < 2 || !same_rows || shapes[0].len() != 3 {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let inputs =
        terms.iter().map(|(x, _)| patch.tap_model(model, *x)).collect::<TractResult<Vec<_>>>()?;
    let x = patch.wire_node(format!("{}.inputs", node.name), TypedConcat { axis: 2 }, &inputs)?;
    let weights: Vec<&Tensor> = terms.iter().map(|(_, w)| &**w).collect();
    let weights =
        patch.add_const(format!("{}.weights", node.name), Tensor::stack_tensors(0, &weights)?)?;
    let product = EinSum::new("amk,kn->mn".parse()?, DatumType::F32);
    let mut wire = patch.wire_node(format!("{}.product", node.name), product, &[x[0], weights])?;
    // The sum's constant terms (the product's bias) after it.
    for (i, constant) in constants.into_iter().enumerate() {
        let constant = patch.tap_model(model, constant)?;
        wire = patch.wire_node(
            format!("{}.plus.{i}", node.name),
            math::add(),
            &[wire[0], constant],
        )?;
    }
    patch.shunt_outside(model, id.into(), wire[0])?;
    Ok(Some(patch))
}

/// The queries', keys' and values' projections (one product of the activation with the three
/// weights side by side in the file; tract's decluttering splits it in three, as each is read
/// apart) joined again into one product, which `attention::Attention` reads in place: one call
/// of [96, 128] x [128, 384] against three of [128, 128], 47 against 3 x 16.5 us on their own,
/// 50 against 3 x 19 in the plan. The queries' scale moves into the operator.
fn joined_projections(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some(op) = node.op_as::<attention::Attention>() else { return Ok(None) };
    if op.joined.is_some() {
        return Ok(None);
    }
    let shape = model.outlet_fact(id.into())?.shape.as_concrete().map(|s| s.to_vec());
    let Some(shape) = shape else { return Ok(None) };
    let projections = [0, 1, 2].map(|i| projection(model, node.inputs[i], id).ok().flatten());
    let [Some(q), Some(k), Some(v)] = projections else { return Ok(None) };
    // The queries' scale (if any) moves into the operator.
    if k.multiplier.is_some() || v.multiplier.is_some() {
        return Ok(None);
    }
    let scale = q.multiplier.clone().unwrap_or_else(|| rctensor0(1f32));
    // The same product of the same activation (with the same quantization), weights apart.
    let others = |p: &Projection| (p.product.clone(), p.inputs[0], p.inputs[2..].to_vec());
    let dequantized = |p: &Projection| p.scale.is_some();
    if others(&q) != others(&k)
        || others(&q) != others(&v)
        || [&k, &v].map(dequantized) != [dequantized(&q); 2]
    {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let weights = Tensor::stack_tensors(1, &[&*q.weights, &*k.weights, &*v.weights])?;
    let weights = patch.add_const(format!("{}.weights", node.name), weights)?;
    let mut inputs = tvec![];
    for (slot, &outlet) in q.inputs.iter().enumerate() {
        inputs.push(if slot == 1 { weights } else { patch.tap_model(model, outlet)? });
    }
    let joined = |f: fn(&Projection) -> &[f32]| [&q, &k, &v].map(f).concat();
    let biases = joined(|p| &p.bias);
    let width = biases.len();
    let qkv = patch.wire_node(format!("{}.projections", node.name), q.product.clone(), &inputs)?;
    let qkv = if q.scale.is_some() {
        let scale = joined(|p| p.scale.as_deref().unwrap_or_default());
        let [scale, bias] =
            [scale, biases].map(|v| Arc::new(tract_ndarray::Array1::from(v).into_tensor()));
        let op = quantize::Dequantize { scale, bias };
        patch.wire_node(format!("{}.dequantized", node.name), op, &qkv)?
    } else {
        let biases = patch.add_const(
            format!("{}.biases", node.name),
            Tensor::from_shape(&[1, width], &biases)?,
        )?;
        patch.wire_node(format!("{}.biased", node.name), math::add(), &[qkv[0], biases])?
    };
    let joined = attention::Joined { shape: shape.into(), scale };
    let op = attention::Attention { joined: Some(joined), ..op.clone() };
    let wire = patch.wire_node(&node.name, op, &qkv)?;
    patch.shunt_outside(model, id.into(), wire[0])?;
    Ok(Some(patch))
}

/// A projection of an activation read only on its way to `reader`: a product of the activation
/// (`inputs[0]`) with constant weights [k, n] (`inputs[1]`; int8 products have their
/// quantization's constants after them), then a bias of n values added (f32) or the i32 sums
/// scaled and shifted (`quantize::Dequantize`), maybe reshaped (heads apart) and multiplied by a
/// scalar.
struct Projection {
    product: EinSum,
    inputs: Vec<OutletId>,
    weights: Arc<Tensor>,
    bias: Vec<f32>,
    /// The int8 sums' scale, one per feature.
    scale: Option<Vec<f32>>,
    /// A scalar the output is multiplied by (the queries' scale).
    multiplier: Option<Arc<Tensor>>,
}

/// The projection that gives `outlet` to `reader`, if that is all it is.
fn projection(
    model: &TypedModel,
    outlet: OutletId,
    reader: usize,
) -> TractResult<Option<Projection>> {
    let mut node = model.node(outlet.node);
    if !only_read_by(model, node, reader) {
        return Ok(None);
    }
    // Through the reshape that splits the heads and a multiplication by a scalar, in either
    // order.
    let mut multiplier = None;
    for _ in 0..2 {
        let before = if let Some(AxisOp::Reshape(..)) = node.op_as::<AxisOp>() {
            node.inputs[0]
        } else if let Some((x, m)) =
            with_constant::<Mul>(model, node)?.filter(|(_, m)| m.len() == 1)
        {
            multiplier = Some(m);
            x
        } else {
            break;
        };
        let before = model.node(before.node);
        if !only_read_by(model, before, node.id) {
            return Ok(None);
        }
        node = before;
    }
    let (product, bias, scale) = if let Some(op) = node.op_as::<quantize::Dequantize>() {
        let scale = f32_values(&op.scale)?;
        (node.inputs[0], f32_values(&op.bias)?, Some(scale))
    } else if let Some((product, bias)) = with_constant::<Add>(model, node)? {
        (product, f32_values(&bias)?, None)
    } else {
        return Ok(None);
    };
    let product_node = model.node(product.node);
    let Some(op) = product_node.op_as::<EinSum>() else { return Ok(None) };
    // f32, or int8 with its quantization's 7 inputs.
    let form = if scale.is_some() { "mk,kn,,,,,,,->mn" } else { "mk,kn->mn" };
    if !only_read_by(model, product_node, node.id)
        || !same_axes(&op.axes.to_string(), form)
        || (scale.is_some() != op.q_params.is_some())
    {
        return Ok(None);
    }
    let Some(weights) = model.outlet_fact(product_node.inputs[1])?.konst.clone() else {
        return Ok(None);
    };
    let width = weights.shape().get(1).copied().unwrap_or(0);
    if weights.rank() != 2
        || bias.len() != width
        || scale.as_ref().is_some_and(|s| s.len() != width)
    {
        return Ok(None);
    }
    let (product, inputs) = (op.clone(), product_node.inputs.to_vec());
    Ok(Some(Projection { product, inputs, weights, bias, scale, multiplier }))
}

/// Whether `node` is a plain f32 `EinSum` of the `expression` (axes named in any letters).
fn einsum_is(node: &TypedNode, expression: &str) -> bool {
    node.op_as::<EinSum>().is_some_and(|op| {
        op.q_params.is_none()
            && op.operating_dt == DatumType::F32
            && same_axes(&op.axes.to_string(), expression)
    })
}

/// Whether two einsum expressions are the same but for the letters naming the axes.
fn same_axes(a: &str, b: &str) -> bool {
    // Each letter named by the order it first appears in.
    let canonical = |e: &str| -> String {
        let mut seen = vec![];
        e.chars()
            .map(|c| match c.is_alphabetic() {
                true => {
                    let at = seen.iter().position(|&s| s == c).unwrap_or_else(|| {
                        seen.push(c);
                        seen.len() - 1
                    });
                    (b'a' + at as u8) as char
                }
                false => c,
            })
            .collect()
    };
    canonical(a) == canonical(b)
}

/// The input's shape if `node` is a plain f32 softmax over the last axis of a known shape.
fn rows_softmax(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Vec<usize>>> {
    let Some(op) = node.op_as::<Softmax>() else { return Ok(None) };
    let fact = model.outlet_fact(node.inputs[0])?;
    let plain = op.kind == SoftmaxKind::Softmax && op.quant_output_dt.is_none();
    let last_axis = *op.axes == [fact.rank().saturating_sub(1)];
    let shape = fact.shape.as_concrete().filter(|_| plain && last_axis);
    Ok(shape.filter(|_| fact.datum_type == DatumType::F32).map(|s| s.to_vec()))
}

/// A constant matrix (not a row or a column repeated) added to activations becomes the
/// subtraction of its negation, bit for bit the same. tract fuses the addition of a whole matrix
/// into the product that makes the activations, where its kernels gather the addend element by
/// element across rows (the default model's [4, 96, 96] score product: 58 us with its bias, 21 +
/// 12 us apart, before `biased_softmax`; its input stage with the positions' embedding: 41 us,
/// 9 + 11 apart); it fuses no subtraction.
fn subtract_negated_constant(
    model: &TypedModel,
    id: usize,
) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some((product, addend)) = with_constant::<Add>(model, node)? else { return Ok(None) };
    // Of the activations' shape: tract runs a subtraction broadcasting the constant over a batch
    // in its generic loop (0.43 ms for the input stage at a batch of 8 in one call).
    let same_shape = model.outlet_fact(product)?.shape.as_concrete() == Some(addend.shape());
    if addend.shape().iter().filter(|&&d| d > 1).count() < 2 || !same_shape {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let negated = patch.add_const(format!("{}.negated", node.name), negated(&addend)?)?;
    let product = patch.tap_model(model, product)?;
    let wire = patch.wire_node(&node.name, math::sub(), &[product, negated])?;
    patch.shunt_outside(model, id.into(), wire[0])?;
    Ok(Some(patch))
}

/// An activation plus the biased result of a weight product (a residual connection),
/// h + (x W + b), becomes h - (x W + b) (-1), bit for bit the same. tract fuses that addition
/// into the product with the same gathers (the default model's [96, 128] output projection: 33
/// us with it, 26 us without); it fuses the scaling by -1 into the product's kernel instead, and
/// the subtraction apart takes 3 us.
fn subtract_negated_product(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let (Some(TypedBinOp(op, _)), [a, b]) = (node.op_as::<TypedBinOp>(), &node.inputs[..]) else {
        return Ok(None);
    };
    if !(op.is::<Add>() && activation(model, *a)? && activation(model, *b)?) {
        return Ok(None);
    }
    for (h, biased) in [(*a, *b), (*b, *a)] {
        let bias_add = model.node(biased.node);
        let Some((product, _)) = with_constant::<Add>(model, bias_add)? else { continue };
        let product = model.node(product.node);
        let weight_product = match &product.inputs[..] {
            [x, w] => {
                product.op_is::<EinSum>() && activation(model, *x)? && !activation(model, *w)?
            }
            _ => false,
        };
        let fact = model.outlet_fact(biased)?;
        if !weight_product || bias_add.outputs[0].successors.len() != 1 {
            continue;
        }
        let minus_one = tensor0(-1f32).cast_to_dt(fact.datum_type)?.into_owned();
        let minus_one = minus_one.broadcast_into_rank(fact.rank())?;
        let mut patch = TypedModelPatch::default();
        let minus_one = patch.add_const(format!("{}.minus_one", node.name), minus_one)?;
        let (h, biased) = (patch.tap_model(model, h)?, patch.tap_model(model, biased)?);
        let negated =
            patch.wire_node(format!("{}.negated", node.name), math::mul(), &[biased, minus_one])?;
        let wire = patch.wire_node(&node.name, math::sub(), &[h, negated[0]])?;
        patch.shunt_outside(model, id.into(), wire[0])?;
        return Ok(Some(patch));
    }
    Ok(None)
}

/// LayerNorm as tract's decluttering leaves it (the row sums, scaled into means, subtracted,
/// normalized by tract's `RmsNorm`, scaled by constant weights) becomes one operator,
/// `layer_norm::LayerNorm`: 11 us for the default model's [96, 128] as five operators, 3.3 us as
/// one. The shift that follows stays for `fold_shift`. It sums in another order: relative
/// differences of ~1e-7.
fn fused_layer_norm(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some((x, width)) = row_sum(model, node)? else { return Ok(None) };
    let rank = model.outlet_fact(x)?.rank();
    // Each link of the chain is the only reader of the one before.
    let reader = |node: &TypedNode| only_reader(model, node);
    let Some(mean) = reader(node) else { return Ok(None) };
    let Some((_, recip)) = with_constant::<Mul>(model, mean)? else { return Ok(None) };
    let recip = f32_values(&recip)?;
    if recip.len() != 1 || (recip[0] * width as f32 - 1.0).abs() > 1e-6 {
        return Ok(None);
    }
    let Some(centred) = reader(mean) else { return Ok(None) };
    let centring = centred.op_as::<TypedBinOp>().is_some_and(|op| op.0.is::<Sub>());
    if !centring || centred.inputs[..] != [x, mean.id.into()] {
        return Ok(None);
    }
    let Some(normalized) = reader(centred) else { return Ok(None) };
    let Some(rms) = normalized.op_as::<RmsNorm>().filter(|rms| rms.axis == rank - 1) else {
        return Ok(None);
    };
    let Some(scaled) = reader(normalized) else { return Ok(None) };
    let Some((_, gamma)) = with_constant::<Mul>(model, scaled)? else { return Ok(None) };
    let Some(gamma) = per_feature(&gamma, width)? else { return Ok(None) };
    let mut patch = TypedModelPatch::default();
    let x = patch.tap_model(model, x)?;
    let op = layer_norm::LayerNorm { eps: rms.eps.clone(), gamma, beta: None, residual: None };
    let wire = patch.wire_node(&scaled.name, op, &[x])?;
    patch.shunt_outside(model, scaled.id.into(), wire[0])?;
    Ok(Some(patch))
}

/// A LayerNorm of a residual connection, the sum or difference of two activations of one shape
/// (`subtract_negated_product`'s form in f32 plans, the int8 export's sum), takes it in:
/// `LayerNorm` with its `residual`, giving the residual stream and its norm, row by row. The
/// connection apart was a pass of 3 us over the default model's [96, 128] stream, 12 times a
/// step.
fn residual_layer_norm(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some(norm) = node.op_as::<layer_norm::LayerNorm>().filter(|op| op.residual.is_none())
    else {
        return Ok(None);
    };
    let sum = model.node(node.inputs[0].node);
    let residual = match sum.op_as::<TypedBinOp>() {
        Some(op) if op.0.is::<Sub>() => layer_norm::Residual::Sub,
        Some(op) if op.0.is::<Add>() => layer_norm::Residual::Add,
        _ => return Ok(None),
    };
    let &[h, p] = &sum.inputs[..] else { return Ok(None) };
    let (h_fact, p_fact) = (model.outlet_fact(h)?, model.outlet_fact(p)?);
    let f32s = h_fact.datum_type == DatumType::F32 && p_fact.datum_type == DatumType::F32;
    if !(f32s && h_fact.shape == p_fact.shape && activation(model, h)? && activation(model, p)?) {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let inputs = [patch.tap_model(model, h)?, patch.tap_model(model, p)?];
    let op = layer_norm::LayerNorm { residual: Some(residual), ..norm.clone() };
    let wires = patch.wire_node(&node.name, op, &inputs)?;
    patch.shunt_outside(model, sum.id.into(), wires[0])?;
    patch.shunt_outside(model, id.into(), wires[1])?;
    Ok(Some(patch))
}

/// A LayerNorm's shift that `fold_shift` left (its readers are not all weight products: in int8
/// plans, the quantization of the products' input) is added in its last pass over each row
/// instead of a pass of its own (2-3 us for the default model's [96, 128], 13 times a step).
fn shifted_layer_norm(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some(norm) = node.op_as::<layer_norm::LayerNorm>().filter(|op| op.beta.is_none()) else {
        return Ok(None);
    };
    let normalized = OutletId::new(id, norm.residual.is_some() as usize);
    let (readers, width) = (&node.outputs[normalized.slot].successors, norm.gamma.len());
    let ([reader], false) = (&readers[..], model.outputs.contains(&normalized)) else {
        return Ok(None);
    };
    let shift = model.node(reader.node);
    let Some((_, beta)) = with_constant::<Add>(model, shift)? else { return Ok(None) };
    let Some(beta) = per_feature(&beta, width)? else { return Ok(None) };
    let mut patch = TypedModelPatch::default();
    let inputs: TVec<OutletId> =
        node.inputs.iter().map(|&i| patch.tap_model(model, i)).collect::<TractResult<_>>()?;
    let op = layer_norm::LayerNorm { beta: Some(beta), ..norm.clone() };
    let wires = patch.wire_node(&node.name, op, &inputs)?;
    if norm.residual.is_some() {
        patch.shunt_outside(model, OutletId::new(id, 0), wires[0])?;
    }
    patch.shunt_outside(model, shift.id.into(), wires[normalized.slot])?;
    Ok(Some(patch))
}

/// The summed activations and their rows' width, if `node` sums f32 activations over their last
/// axis (of a known width).
fn row_sum(model: &TypedModel, node: &TypedNode) -> TractResult<Option<(OutletId, usize)>> {
    let Some(reduce) = node.op_as::<Reduce>() else { return Ok(None) };
    let fact = model.outlet_fact(node.inputs[0])?;
    let width = last_axis(fact);
    let summed_last = reduce.reducer == Reducer::Sum && *reduce.axes == [fact.rank() - 1];
    let plain = fact.datum_type == DatumType::F32 && fact.konst.is_none();
    Ok(width.filter(|_| summed_last && plain).map(|width| (node.inputs[0], width)))
}

/// A sum over the last axis (LayerNorm's mean) becomes a product with a column of ones. tract's
/// sum calls its kernel once per row (11 us for 96 x 128); the product takes 5 us with its
/// packing. It sums in another order: relative differences of ~1e-7.
fn sum_as_product(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some((x, width)) = row_sum(model, node)? else { return Ok(None) };
    let rank = model.outlet_fact(x)?.rank();
    let mut patch = TypedModelPatch::default();
    let kept: String = ('a'..='j').take(rank - 1).collect();
    let sum = EinSum::new(format!("{kept}k,kn->{kept}n").parse()?, f32::datum_type());
    let ones = tract_ndarray::Array2::<f32>::ones((width, 1)).into_tensor();
    let ones = patch.add_const(format!("{}.ones", node.name), ones)?;
    let x = patch.tap_model(model, x)?;
    let wire = patch.wire_node(&node.name, sum, &[x, ones])?;
    patch.shunt_outside(model, id.into(), wire[0])?;
    Ok(Some(patch))
}

/// A per-feature shift (LayerNorm's) read only by weight products that each add a bias:
/// x W + (t W + c) instead of (x + t) W + c, one pass over the activations fewer (tract ran
/// LayerNorm's scale and shift as one 5 us pass for 96 x 128, the scale alone takes 2 us). The
/// biases are rounded once more: relative differences of ~1e-7. The scale stays: folding it too
/// would copy the weights, 3-6 MB more at the peak of memory as a plan is made.
fn fold_shift(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some((x, shift)) = with_constant::<Add>(model, node)? else { return Ok(None) };
    let width = shift.len();
    if width < 2 || shift.shape().iter().rev().skip(1).any(|&d| d != 1) {
        return Ok(None);
    }
    let shift = f32_values(&shift)?;
    // Each reader: a product of the activations (last axis) with a [width, n] weight, then a
    // constant bias added.
    let mut folds = vec![];
    for reader in &node.outputs[0].successors {
        let product = model.node(reader.node);
        let Some(einsum) = product.op_as::<EinSum>() else { return Ok(None) };
        let axes = einsum.axes.to_string();
        let (Some((inputs, output)), [bias_add]) =
            (axes.split_once("->"), &product.outputs[0].successors[..])
        else {
            return Ok(None);
        };
        let (Some((a, w)), Some(weights)) =
            (inputs.split_once(','), model.outlet_fact(product.inputs[1])?.konst.clone())
        else {
            return Ok(None);
        };
        let contracted = a.chars().last();
        let plain = reader.slot == 0
            && w.len() == 2
            && w.chars().next() == contracted
            && contracted.is_some_and(|k| !output.contains(k));
        let bias = with_constant::<Add>(model, model.node(bias_add.node))?;
        let (true, Some((_, bias)), DatumType::F32) = (plain, bias, weights.datum_type()) else {
            return Ok(None);
        };
        if weights.shape()[0] != width || bias.len() != weights.shape()[1] {
            return Ok(None);
        }
        folds.push((product, bias_add.node, weights, bias));
    }
    if folds.is_empty() {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let x = patch.tap_model(model, x)?;
    for (product, bias_add, weights, bias) in folds {
        let w = weights.to_plain_array_view::<f32>()?;
        let w = w.into_dimensionality::<tract_ndarray::Ix2>()?;
        let biases: Vec<f32> = f32_values(&bias)?
            .iter()
            .enumerate()
            .map(|(n, c)| c + (0..width).map(|k| shift[k] * w[[k, n]]).sum::<f32>())
            .collect();
        let bias = Tensor::from_shape(bias.shape(), &biases)?;
        let bias = patch.add_const(format!("{}.shifted", model.node(bias_add).name), bias)?;
        let weights = patch.tap_model(model, product.inputs[1])?;
        let wire = patch.wire_node(&product.name, product.op.clone(), &[x, weights])?;
        let wire = patch.wire_node(&model.node(bias_add).name, math::add(), &[wire[0], bias])?;
        patch.shunt_outside(model, bias_add.into(), wire[0])?;
    }
    Ok(Some(patch))
}

/// A hidden activation between two weight products (the MLP: x W1 + b, SiLU, then h W2) is
/// computed transposed, features by positions: the first product writes it so, the bias and the
/// function do not mind, and the second product reads it so. tract packs the second product's
/// input for its kernel positions-inner: from the [positions, 512] activation that is a transpose
/// (15 us of the default model's step at batch 1, 6 times), from [512, positions] a copy of rows.
/// A whole MLP of that model: 145 -> 136 us. The same sums in the same order: bit for bit the
/// same.
fn transposed_hidden(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let (Some(up), &[x, w1]) = (node.op_as::<EinSum>(), &node.inputs[..]) else { return Ok(None) };
    if !activation(model, x)? || activation(model, w1)? {
        return Ok(None);
    }
    let Some(bias_add) = only_reader(model, node) else { return Ok(None) };
    let Some((_, bias)) = with_constant::<Add>(model, bias_add)? else { return Ok(None) };
    let Some(function) = only_reader(model, bias_add) else { return Ok(None) };
    let Some(down) = only_reader(model, function).filter(|_| function.op_is::<ElementWiseOp>())
    else {
        return Ok(None);
    };
    let (Some(down_op), &[hidden, w2]) = (down.op_as::<EinSum>(), &down.inputs[..]) else {
        return Ok(None);
    };
    if hidden != function.id.into() || activation(model, w2)? {
        return Ok(None);
    }
    let (up_axes, down_axes) = (up.axes.to_string(), down_op.axes.to_string());
    let (Some((up_inputs, up_output)), Some((down_inputs, down_output))) =
        (up_axes.split_once("->"), down_axes.split_once("->"))
    else {
        return Ok(None);
    };
    let Some((h, w2_axes)) = down_inputs.split_once(',') else { return Ok(None) };
    // Swaps the last two axes of an einsum operand.
    let swapped = |axes: &str| -> Option<String> {
        let mut axes: Vec<char> = axes.chars().collect();
        let n = axes.len();
        (n >= 2).then(|| {
            axes.swap(n - 2, n - 1);
            axes.into_iter().collect()
        })
    };
    // Positions by features, one sequence per call (the sampler's CPU calls): with a batch axis
    // too, tract's optimization moved the axes back and forth around the products and added the
    // bias in its generic loop (`plan_profile` at a batch of 8 in one call: 30 ms a step against
    // 28 without the rule).
    let rank = up_output.len();
    // The hidden axis is the up product's last output axis and what the down product sums over;
    // the bias varies along it only.
    let contracted = h.chars().last().is_some_and(|k| !down_output.contains(k));
    let per_feature = bias.rank() == rank && rank == 2 && bias.shape()[0] == 1;
    let (Some(up_output), Some(h), true, true) =
        (swapped(up_output), swapped(h), contracted, per_feature)
    else {
        return Ok(None);
    };
    let mut bias_shape = bias.shape().to_vec();
    bias_shape.swap(rank - 2, rank - 1);
    let up = EinSum { axes: format!("{up_inputs}->{up_output}").parse()?, ..up.clone() };
    let down_op =
        EinSum { axes: format!("{h},{w2_axes}->{down_output}").parse()?, ..down_op.clone() };
    let mut patch = TypedModelPatch::default();
    let (x, w1, w2) =
        (patch.tap_model(model, x)?, patch.tap_model(model, w1)?, patch.tap_model(model, w2)?);
    let bias = (*bias).clone().into_shape(&bias_shape)?;
    let bias = patch.add_const(format!("{}.transposed", bias_add.name), bias)?;
    let wire = patch.wire_node(&node.name, up, &[x, w1])?;
    let wire = patch.wire_node(&bias_add.name, math::add(), &[wire[0], bias])?;
    let wire = patch.wire_node(&function.name, function.op.clone(), &wire)?;
    let wire = patch.wire_node(&down.name, down_op, &[wire[0], w2])?;
    patch.shunt_outside(model, down.id.into(), wire[0])?;
    Ok(Some(patch))
}

/// tract's quantization of f32 activations to u8 (before each int8 product of an int8 plan)
/// becomes `quantize::QuantizeU8`: the same bytes from a loop the compiler vectorizes, where
/// tract's runs one element at a time (~2.8 ns each, 46% of the default model's int8 step).
fn vectorized_quantize(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some(ElementWiseOp(op, _)) = node.op_as::<ElementWiseOp>() else { return Ok(None) };
    let Some(quantize) = op.downcast_ref::<QuantizeLinearU8>() else { return Ok(None) };
    if model.outlet_fact(node.inputs[0])?.datum_type != DatumType::F32 {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let x = patch.tap_model(model, node.inputs[0])?;
    let wire = patch.wire_node(&node.name, quantize::QuantizeU8(quantize.clone()), &[x])?;
    patch.shunt_outside(model, id.into(), wire[0])?;
    Ok(Some(patch))
}

/// An int8 product's i32 sums cast to f32, scaled and shifted per output feature by constants
/// (`Cast(...) * s + b`, the int8 export's form) become one pass, `quantize::Dequantize`, where
/// tract made two (0.43 ms of the default model's int8 step).
fn fused_dequantize(model: &TypedModel, id: usize) -> TractResult<Option<TypedModelPatch>> {
    let node = model.node(id);
    let Some(cast) = node.op_as::<Cast>() else { return Ok(None) };
    let input = model.outlet_fact(node.inputs[0])?;
    if input.datum_type != DatumType::I32 || cast.to != DatumType::F32 {
        return Ok(None);
    }
    let Some(width) = last_axis(input) else { return Ok(None) };
    let Some(scaling) = only_reader(model, node) else { return Ok(None) };
    let Some((_, scale)) = with_constant::<Mul>(model, scaling)? else { return Ok(None) };
    let Some(shift) = only_reader(model, scaling) else { return Ok(None) };
    let Some((_, bias)) = with_constant::<Add>(model, shift)? else { return Ok(None) };
    let (Some(scale), Some(bias)) = (per_feature(&scale, width)?, per_feature(&bias, width)?)
    else {
        return Ok(None);
    };
    let op = quantize::Dequantize { scale, bias };
    let mut patch = TypedModelPatch::default();
    let x = patch.tap_model(model, node.inputs[0])?;
    let wire = patch.wire_node(&shift.name, op, &[x])?;
    patch.shunt_outside(model, shift.id.into(), wire[0])?;
    Ok(Some(patch))
}

#[cfg(not(feature = "cuda"))]
fn cuda_available() -> Result<(), LoadError> {
    Err(LoadError::CudaNotBuilt)
}

#[cfg(not(feature = "cuda"))]
fn prepare_cuda(_: TypedModel) -> Result<Box<dyn Runnable>, LoadError> {
    Err(LoadError::CudaNotBuilt)
}

/// Whether tract's CUDA runtime can run here: a GPU and driver, and the toolkit headers NVRTC
/// compiles tract's kernels against (said up front rather than deep inside a kernel compile).
#[cfg(feature = "cuda")]
fn cuda_available() -> Result<(), LoadError> {
    cuda::runtime()?; // tract checks for a device and driver
    cuda::headers().map(|_| ())
}

#[cfg(feature = "cuda")]
fn prepare_cuda(model: TypedModel) -> Result<Box<dyn Runnable>, LoadError> {
    cuda_available()?;
    let runtime = cuda::runtime()?;
    let prepared =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.prepare(model)));
    match prepared {
        Ok(result) => result.map_err(|e| LoadError::Cuda(format!("{e:#}"))),
        Err(_) => Err(LoadError::Cuda("tract-cuda failed while preparing the graph".into())),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::LoadError;
    use std::path::PathBuf;
    use tract_nnef::tract_core::runtime::{runtime_for_name, Runtime};

    /// tract's CUDA runtime, once tract has checked for a usable device and driver.
    pub fn runtime() -> Result<&'static dyn Runtime, LoadError> {
        runtime_for_name("cuda")
            .map_err(|e| LoadError::Cuda(format!("{e:#}")))?
            .ok_or(LoadError::CudaNotBuilt)
    }

    /// The CUDA toolkit include directory holding `cuda_fp16.h`, found as tract-cuda finds it:
    /// `CUDA_HOME`, then /usr/local/cuda, then the directory above `nvcc` on the PATH.
    pub fn headers() -> Result<PathBuf, LoadError> {
        let mut roots: Vec<PathBuf> =
            std::env::var_os("CUDA_HOME").map(PathBuf::from).into_iter().collect();
        roots.push(PathBuf::from("/usr/local/cuda"));
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("nvcc").exists() {
                    roots.extend(dir.parent().map(PathBuf::from));
                }
            }
        }
        for root in &roots {
            let mut candidates = vec![root.join("include")];
            if let Ok(targets) = std::fs::read_dir(root.join("targets")) {
                candidates.extend(targets.flatten().map(|t| t.path().join("include")));
            }
            if let Some(found) = candidates.into_iter().find(|d| d.join("cuda_fp16.h").exists()) {
                return Ok(found);
            }
        }
        Err(LoadError::Cuda(format!(
            "the CUDA toolkit headers (cuda_fp16.h) were not found under {roots:?}: install the CUDA \
             toolkit headers and set CUDA_HOME to its root (tract compiles its GPU kernels with NVRTC)"
        )))
    }
}

fn check_contract(model: &TypedModel, spec: &ModelSpec) -> Result<(), LoadError> {
    // Outlet labels carry the graph's I/O names in both formats; node names are the fallback.
    let name = |outlet: &OutletId| {
        model.outlet_label(*outlet).unwrap_or(&model.node(outlet.node).name).to_string()
    };
    let inputs: Vec<String> =
        model.input_outlets().map_err(tract_error)?.iter().map(name).collect();
    let expected = io::inputs(spec.conditioning);
    if inputs != expected {
        return Err(LoadError::Contract(format!("inputs are {inputs:?}, expected {expected:?}")));
    }
    let outputs: Vec<String> =
        model.output_outlets().map_err(tract_error)?.iter().map(name).collect();
    if outputs.first().map(String::as_str) != Some(io::X0) {
        return Err(LoadError::Contract(format!("the first output must be `{}`", io::X0)));
    }
    if spec.head == Head::Softmax && outputs.get(1).map(String::as_str) != Some(io::LOGITS) {
        let expected = io::LOGITS;
        return Err(LoadError::Contract(format!(
            "a softmax head's second output must be `{expected}`"
        )));
    }
    Ok(())
}

impl Denoiser for TractDenoiser {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError> {
        self.run_output(input, 0, x0)
    }

    fn logits(&mut self, input: &DenoiseInput<'_>, logits: &mut [f32]) -> Result<(), BoxError> {
        if self.spec.head != Head::Softmax {
            return Err(NO_LOGITS.into());
        }
        self.run_output(input, 1, logits)
    }
}

impl TractDenoiser {
    /// One denoising call of the whole batch, writing the graph's output number `output`
    /// ([B, L, width]) into `out`.
    fn run_output(
        &mut self,
        input: &DenoiseInput<'_>,
        output: usize,
        out: &mut [f32],
    ) -> Result<(), BoxError> {
        input.graph_inputs(&self.spec)?; // a missing condition fails before any plan is made
        self.prepare(input.batch)?;
        let (spec, compute) = (&self.spec, self.compute);
        let job = |calls: &[Range<usize>]| -> Result<Job, BoxError> {
            let calls = calls
                .iter()
                .map(|rows| network_inputs(spec, compute, input, rows.clone()))
                .collect::<Result<_, _>>()?;
            Ok(Job { calls, output })
        };
        // The other parts go to their threads, the first runs here, then all are collected.
        for worker in &self.workers {
            if let Runner::Thread { jobs: Some(jobs), .. } = &worker.runner {
                jobs.send(job(&worker.calls)?).map_err(|_| "a denoising thread has stopped")?;
            }
        }
        let pool = self.pool.as_ref().filter(|_| self.device == Device::Cpu);
        let per_row = out.len() / input.batch.max(1);
        for worker in &mut self.workers {
            let outputs = match &mut worker.runner {
                Runner::Here(states) => {
                    let job = job(&worker.calls)?;
                    match pool {
                        Some(pool) => matmul_pool::run(pool, || states.run(job)),
                        None => states.run(job),
                    }
                }
                Runner::Thread { results, .. } => {
                    results.recv().map_err(|_| "a denoising thread has stopped")?
                }
            }?;
            for (rows, output) in worker.calls.iter().zip(outputs) {
                out[rows.start * per_row..rows.end * per_row]
                    .copy_from_slice(output.try_as_plain_ram()?.as_slice::<f32>()?);
            }
        }
        Ok(())
    }
}

/// The graph's inputs for some rows of the batch; in f16 for an f16 network (the diffusion
/// state stays f32).
fn network_inputs(
    spec: &ModelSpec,
    compute: Precision,
    input: &DenoiseInput<'_>,
    rows: Range<usize>,
) -> Result<TVec<Tensor>, BoxError> {
    let mut tensors = TVec::new();
    for graph_input in input.graph_inputs(spec)? {
        let mut shape = graph_input.shape().to_vec();
        shape[0] = rows.len();
        let per_row = graph_input.per_row();
        let data = &graph_input.data[rows.start * per_row..rows.end * per_row];
        let t = Tensor::from_shape(&shape, data)?;
        tensors.push(if compute == Precision::F16 { t.cast_to::<f16>()?.into_owned() } else { t });
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_nnef::tract_core::ops::nn::Silu;

    /// Scores of two activations plus a constant; a scale and shift per feature, then a weight
    /// product plus its bias; a sum over the last axis; a residual connection; LayerNorm as tract
    /// declutters it, of a residual connection and of a sum of activations, shifted; a softmax of
    /// scores plus a constant, and one of the scores alone; an MLP. Evaluated as built and
    /// rewritten.
    fn graph() -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let values = |n: usize, scale: f32| (0..n).map(move |i| (i as f32 * 0.37).sin() * scale);
        let mut constant = |name: &str, shape: &[usize], scale: f32| {
            let n = shape.iter().product();
            let t = Tensor::from_shape(shape, &values(n, scale).collect::<Vec<_>>())?;
            model.add_const(name, t)
        };
        let bias = constant("bias", &[2, 3, 3], 2.0)?;
        let (scale, shift) =
            (constant("scale", &[1, 1, 4], 1.5)?, constant("shift", &[1, 1, 4], 0.5)?);
        let (w, b) = (constant("w", &[4, 5], 1.0)?, constant("b", &[1, 1, 5], 0.5)?);
        let (w2, b2) = (constant("w2", &[4, 4], 0.7)?, constant("b2", &[1, 1, 4], 0.3)?);
        let gamma = constant("gamma", &[1, 1, 4], 1.2)?;
        let attention_bias = constant("attention_bias", &[1, 3, 3], 3.0)?;
        let (up, up_bias) = (constant("up", &[4, 5], 0.8)?, constant("up_bias", &[1, 5], 0.4)?);
        let down = constant("down", &[5, 4], 0.6)?;
        let quarter = model.add_const("quarter", tensor3(&[[[0.25f32]]]))?;

        let x = model.add_source("x", f32::fact([2, 3, 4]))?;
        let scores = EinSum::new("bik,bjk->bij".parse()?, f32::datum_type());
        let scores = model.wire_node("scores", scores, &[x, x])?[0];
        let biased = model.wire_node("biased", math::add(), &[scores, bias])?[0];
        let scaled = model.wire_node("scaled", math::mul(), &[x, scale])?[0];
        let shifted = model.wire_node("shifted", math::add(), &[scaled, shift])?[0];
        let projected = EinSum::new("bik,kn->bin".parse()?, f32::datum_type());
        let projected = model.wire_node("projected", projected, &[shifted, w])?[0];
        let projected = model.wire_node("projected.bias", math::add(), &[projected, b])?[0];
        let sum = Reduce::new(tvec![2], Reducer::Sum);
        let sum = model.wire_node("sum", sum, &[x])?[0];
        let branch = EinSum::new("bik,kn->bin".parse()?, f32::datum_type());
        let branch = model.wire_node("branch", branch, &[x, w2])?[0];
        let branch = model.wire_node("branch.bias", math::add(), &[branch, b2])?[0];
        let residual = model.wire_node("residual", math::add(), &[x, branch])?[0];
        // LayerNorm as tract declutters it.
        let layer_norm = |model: &mut TypedModel, name: &str, x| -> TractResult<OutletId> {
            let row_sum = Reduce::new(tvec![2], Reducer::Sum);
            let row_sum = model.wire_node(format!("{name}.sum"), row_sum, &[x])?[0];
            let mean = model.wire_node(format!("{name}.mean"), math::mul(), &[row_sum, quarter])?;
            let centred = model.wire_node(format!("{name}.centred"), math::sub(), &[x, mean[0]])?;
            let rms = RmsNorm { axis: 2, eps: Arc::new(tensor0(1e-5f32)) };
            let normalized = model.wire_node(format!("{name}.rms"), rms, &centred)?;
            Ok(model.wire_node(name, math::mul(), &[normalized[0], gamma])?[0])
        };
        let norm = layer_norm(&mut model, "norm", residual)?;
        // A residual sum of two activations (no weight product), and a shift after the norm that
        // no product takes.
        let squares = model.wire_node("squares", math::mul(), &[x, x])?[0];
        let stream = model.wire_node("stream", math::add(), &[x, squares])?[0];
        let norm2 = layer_norm(&mut model, "norm2", stream)?;
        let norm2 = model.wire_node("norm2.shift", math::add(), &[norm2, shift])?[0];
        let attention =
            model.wire_node("attention.biased", math::add(), &[scores, attention_bias])?;
        let softmax = Softmax::new(tvec![2], None, SoftmaxKind::Softmax);
        let attention = model.wire_node("attention", softmax.clone(), &attention)?[0];
        let plain_attention = model.wire_node("plain_attention", softmax, &[scores])?[0];
        // One sequence's positions by features, as the sampler's calls have them.
        let y = model.add_source("y", f32::fact([6, 4]))?;
        let hidden = EinSum::new("ik,kn->in".parse()?, f32::datum_type());
        let hidden = model.wire_node("hidden", hidden, &[y, up])?[0];
        let hidden = model.wire_node("hidden.bias", math::add(), &[hidden, up_bias])?[0];
        let hidden =
            model.wire_node("hidden.silu", ElementWiseOp(Box::new(Silu {}), None), &[hidden])?;
        let mlp = EinSum::new("ik,kn->in".parse()?, f32::datum_type());
        let mlp = model.wire_node("mlp", mlp, &[hidden[0], down])?[0];
        let outputs = [
            biased,
            projected,
            sum,
            residual,
            norm,
            attention,
            mlp,
            plain_attention,
            stream,
            norm2,
        ];
        model.select_output_outlets(&outputs)?;
        Ok(model)
    }

    fn run(model: TypedModel) -> TractResult<TVec<TValue>> {
        let x = tract_ndarray::Array3::from_shape_fn((2, 3, 4), |(b, i, k)| {
            ((b * 12 + i * 4 + k) as f32 * 0.71).cos() * 3.0
        });
        let y = tract_ndarray::Array2::from_shape_fn((6, 4), |(i, k)| (i as f32 - k as f32) * 0.3);
        model
            .into_runnable()?
            .run(tvec!(x.into_tensor().into_tvalue(), y.into_tensor().into_tvalue()))
    }

    #[test]
    fn cpu_forms_change_the_operators_not_the_results() -> TractResult<()> {
        let rewritten = cpu_forms(graph()?)?.into_decluttered()?;
        let named = |names: &[&str]| -> Vec<&str> {
            let nodes = rewritten.nodes().iter().filter(|n| names.contains(&&*n.op.name()));
            nodes.map(|n| n.name.as_str()).collect()
        };
        // The scores' constant and the residual branch are subtracted, negated; the shift is
        // folded into the weight product's bias, the scale stays; the sum is a product; the
        // LayerNorms and the residual connections they read are one operator each (with the
        // shift that no product takes), and so are the softmax and the bias it reads.
        let kept = ["scaled", "projected.bias", "branch.bias", "residual.negated", "hidden.bias"];
        assert_eq!(named(&["Add", "Mul", "Reduce<Sum>", "RmsNorm"]), kept);
        assert_eq!(named(&["Sub"]), ["biased"]);
        assert_eq!(named(&["ResidualLayerNorm"]), ["norm", "norm2"]);
        assert_eq!(named(&["RowSoftmax"]), ["attention", "plain_attention"]);
        // The MLP's hidden activation is features by positions.
        let hidden = rewritten.node_by_name("hidden.silu")?;
        let shape =
            rewritten.outlet_fact(hidden.id.into())?.shape.as_concrete().map(|s| s.to_vec());
        assert_eq!(shape, Some(vec![5, 6]));
        assert_eq!(rewritten.nodes().iter().filter(|n| n.op_is::<EinSum>()).count(), 6);

        let (expected, found) = (run(graph()?.into_decluttered()?)?, run(rewritten)?);
        for (i, (e, f)) in expected.iter().zip(&found).enumerate() {
            let worst = max_difference(e, f)?;
            // The subtractions and the transposed MLP are exact; the folded bias, the sum, the
            // LayerNorm and the softmax are rounded otherwise.
            let limit = if [0, 3, 6, 8].contains(&i) { 0.0 } else { 1e-5 };
            assert!(worst <= limit, "output {i}: {worst}");
        }
        Ok(())
    }

    /// An attention block of one sequence as the default model's export declutters: the three
    /// projections of one activation (tract splits their joined product), two heads of 32
    /// features, the queries scaled, a relative position bias.
    fn attention_block() -> TractResult<TypedModel> {
        let (positions, width) = (7, 64);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([positions, width]))?;
        let mut heads = vec![];
        for (i, name) in ["q", "k", "v"].into_iter().enumerate() {
            let w: Vec<f32> =
                (0..width * width).map(|j| ((j * 7 + i) as f32 * 0.13).sin()).collect();
            let w = Tensor::from_shape(&[width, width], &w)?;
            let w = model.add_const(format!("{name}.w"), w)?;
            let b: Vec<f32> = (0..width).map(|j| (j + i) as f32 * 0.01).collect();
            let b = model.add_const(format!("{name}.b"), Tensor::from_shape(&[1, width], &b)?)?;
            let product = EinSum::new("mk,kn->mn".parse()?, f32::datum_type());
            let y = model.wire_node(name, product, &[x, w])?[0];
            let y = model.wire_node(format!("{name}.bias"), math::add(), &[y, b])?[0];
            let split = AxisOp::Reshape(1, tvec![width.to_dim()], tvec![2.to_dim(), 32.to_dim()]);
            heads.push(model.wire_node(format!("{name}.heads"), split, &[y])?[0]);
        }
        let quarter = model.add_const("quarter", tensor3(&[[[0.25f32]]]))?;
        let q = model.wire_node("q.scaled", math::mul(), &[heads[0], quarter])?[0];
        let scores = EinSum::new("ihd,jhd->hij".parse()?, f32::datum_type());
        let scores = model.wire_node("scores", scores, &[q, heads[1]])?[0];
        let bias: Vec<f32> = (0..2 * positions * positions)
            .map(|n| (n % positions) as f32 - (n / positions % positions) as f32 + (n / 49) as f32)
            .map(|offset| (offset * 0.7).sin())
            .collect();
        let bias =
            model.add_const("bias", Tensor::from_shape(&[2, positions, positions], &bias)?)?;
        let biased = model.wire_node("biased", math::add(), &[scores, bias])?[0];
        let softmax = Softmax::new(tvec![2], None, SoftmaxKind::Softmax);
        let probabilities = model.wire_node("softmax", softmax, &[biased])?[0];
        let values = EinSum::new("hij,jhd->ihd".parse()?, f32::datum_type());
        let out = model.wire_node("values", values, &[probabilities, heads[2]])?[0];
        model.select_output_outlets(&[out])?;
        Ok(model)
    }

    #[test]
    fn the_attention_becomes_one_operator_of_the_projections_side_by_side() -> TractResult<()> {
        let rewritten = cpu_forms(attention_block()?)?.into_decluttered()?;
        let ops: Vec<_> = rewritten.nodes().iter().map(|n| n.op.name().to_string()).collect();
        assert_eq!(ops.iter().filter(|op| *op == "EinSum").count(), 1, "{ops:?}");
        let attention = rewritten.nodes().iter().find_map(|n| n.op_as::<attention::Attention>());
        let attention = attention.expect("an attention operator");
        assert!(attention.joined.is_some());
        assert!(matches!(attention.bias, attention::Bias::Offsets(_)), "{:?}", attention.bias);
        let x = tract_ndarray::Array2::from_shape_fn((7, 64), |(i, k)| ((i * 64 + k) as f32).cos());
        let x = tvec!(x.into_tensor().into_tvalue());
        let expected = attention_block()?.into_decluttered()?.into_runnable()?.run(x.clone())?;
        let found = rewritten.into_runnable()?.run(x)?;
        let worst = max_difference(&expected[0], &found[0])?;
        assert!(worst <= 1e-5, "{worst}");
        Ok(())
    }

    /// An int8 product whose output is contiguous along the weights' features (tract's m): on the
    /// 16x16 VNNI tile its inputs change sides, and its sums are the same.
    #[test]
    fn int8_products_store_rows_and_keep_their_sums() -> TractResult<()> {
        // 20 positions (a tile and a part) by 37 (whole groups of 4 and a part) by 48 features.
        let (n, k, m) = (20, 37, 48);
        let x: Vec<i8> = (0..n * k).map(|i| ((i * 37 % 255) as i32 - 127) as i8).collect();
        let w: Vec<i8> = (0..k * m).map(|i| ((i * 91 % 251) as i32 - 125) as i8).collect();
        let zero: Vec<i32> = (0..m as i32).map(|j| j * 13 - 300).collect();
        let build = || -> TractResult<TypedModel> {
            let mut model = TypedModel::default();
            let input = model.add_source("x", i8::fact([n, k]))?;
            let weights = model.add_const("w", Tensor::from_shape(&[k, m], &w)?)?;
            let offsets = model.add_const("zero", Tensor::from_shape(&[1, m], &zero)?)?;
            let product = EinSum::new("nk,km->nm".parse()?, i32::datum_type());
            let product = model.wire_node("product", product, &[input, weights])?[0];
            let shifted = model.wire_node("shifted", math::sub(), &[product, offsets])?[0];
            model.select_output_outlets(&[shifted])?;
            Ok(model)
        };
        let expected = tract_ndarray::Array2::from_shape_fn((n, m), |(i, j)| {
            (0..k).map(|l| x[i * k + l] as i32 * w[l * m + j] as i32).sum::<i32>() - zero[j]
        });
        let input = tvec!(Tensor::from_shape(&[n, k], &x)?.into_tvalue());
        let plan = optimized_for_cpu(build()?)?;
        let found = plan.clone().into_runnable()?.run(input)?;
        assert_eq!(found[0].to_plain_array_view::<i32>()?, expected.into_dyn().view());
        // Where tract puts the product on a row-major tile, its output's columns are the
        // features, contiguous.
        let products = |model: &TypedModel| -> Vec<OptMatMul> {
            model.nodes().iter().filter_map(|n| n.op_as::<OptMatMul>()).cloned().collect()
        };
        let tracts = products(&build()?.into_optimized()?);
        let ours = products(&plan);
        assert_eq!(tracts.len(), ours.len());
        for (tracts, ours) in tracts.iter().zip(&ours) {
            let row_major = ROW_MAJOR_TILES.contains(&tracts.mmm[0].name());
            assert_eq!(tracts.c_m_axis, Some(1));
            assert_eq!(ours.c_m_axis, Some(if row_major { 0 } else { 1 }));
        }
        Ok(())
    }

    /// The largest difference between two f32 tensors of the same shape.
    fn max_difference(expected: &TValue, found: &TValue) -> TractResult<f32> {
        let (e, f) = (expected.to_plain_array_view::<f32>()?, found.to_plain_array_view::<f32>()?);
        assert_eq!(e.shape(), f.shape());
        Ok(e.iter().zip(f.iter()).map(|(e, f)| (e - f).abs()).fold(0.0, f32::max))
    }

    /// The input stage as tract splits it: one product per input, summed, plus a bias.
    #[test]
    fn the_inputs_products_become_one() -> TractResult<()> {
        let build = || -> TractResult<TypedModel> {
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([1, 7, 3]))?;
            let mask = model.add_source("mask", f32::fact([1, 7, 1]))?;
            let w: Vec<f32> = (0..3 * 16).map(|i| (i as f32 * 0.3).sin()).collect();
            let w = model.add_const("w", Tensor::from_shape(&[3, 16], &w)?)?;
            let m: Vec<f32> = (0..16).map(|i| (i as f32 * 0.7).cos()).collect();
            let m = model.add_const("m", Tensor::from_shape(&[16], &m)?)?;
            let b = model.add_const("b", Tensor::from_shape(&[1, 16], &[0.5f32; 16])?)?;
            let xw = EinSum::new("amk,kn->mn".parse()?, f32::datum_type());
            let xw = model.wire_node("xw", xw, &[x, w])?[0];
            let mm = EinSum::new("amk,n->mn".parse()?, f32::datum_type());
            let mm = model.wire_node("mm", mm, &[mask, m])?[0];
            let sum = model.wire_node("sum", math::add(), &[xw, mm])?[0];
            let biased = model.wire_node("biased", math::add(), &[sum, b])?[0];
            model.select_output_outlets(&[biased])?;
            Ok(model)
        };
        // (Not decluttered again: tract's decluttering would split it once more.)
        let rewritten = cpu_forms(build()?)?;
        let ops: Vec<_> = rewritten.nodes().iter().map(|n| n.op.name().to_string()).collect();
        assert_eq!(ops.iter().filter(|op| *op == "EinSum").count(), 1, "{ops:?}");
        let x =
            tract_ndarray::Array3::from_shape_fn((1, 7, 3), |(_, i, k)| (i * 3 + k) as f32 * 0.1);
        let mask = tract_ndarray::Array3::from_shape_fn((1, 7, 1), |(_, i, _)| (i % 2) as f32);
        let inputs = tvec!(x.into_tensor().into_tvalue(), mask.into_tensor().into_tvalue());
        let expected = build()?.into_decluttered()?.into_runnable()?.run(inputs.clone())?;
        let found = rewritten.into_runnable()?.run(inputs)?;
        let worst = max_difference(&expected[0], &found[0])?;
        assert!(worst <= 1e-6, "{worst}");
        Ok(())
    }
}
