//! `chardiff`: train, export and sample character-level bit-diffusion language models.
//! Thin: parse flags, call the crates, report errors with context.

use anyhow::{Context, Result};
use chardiff_runtime::generate;
use chardiff_runtime::sampler::{
    sample, ConditioningMethod, GuidedOutput, SamplerConfig, StepRule,
};
use chardiff_runtime::spec::serde_name;
#[cfg(feature = "train")]
use chardiff_runtime::tract::Format;
use chardiff_runtime::tract::{
    arithmetic, int8_dot_product, native_f16, Device, Parallelism, TractDenoiser,
};
use chardiff_runtime::Denoiser;
use chardiff_runtime::{ModelSpec, Precision};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;

// Tensor code allocates and frees large buffers at every op; glibc returns them to the OS and
// page-faults them back in (~15% of a training step measured), mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// When mimalloc (v3) returns freed memory to the OS, in ms; its default is 1000. Training never
/// does (-1): every step frees and reallocates the same large tensors, and refaulting them cost
/// ~8% of a step at the default (2.4-2.6 s vs 2.3-2.4 s per step of the default model, sys time
/// 3.6-5.5 s vs 2.5 s over 8 steps) and 30% at 10 ms, for 5% more peak memory. Sampling, see
/// `LOAD_PURGE_DELAY_MS` and `settle_memory`.
fn set_purge_delay(ms: std::ffi::c_long) {
    // `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (v3.3): libmimalloc-sys has no name
    // for it.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets an integer option; mimalloc reads options at each use.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, ms) }
}

/// The purge delay while a model is read and its plan optimized: that churns through
/// short-lived buffers, and returning each at once made a third of the start-up page faults
/// (load, one step, exit: 46.4 ms at 0, 40.7 ms at 20 ms; edge NNEF build, BENCHMARKS.md).
const LOAD_PURGE_DELAY_MS: std::ffi::c_long = 20;

/// The purge delay from the first denoising step on. tract allocates every step's tensors afresh:
/// never returned, sampling 8 x 96 characters on 2 threads peaked at 65-74 MiB (0.76-0.85 s);
/// returned at once (0), 45-47 MiB, but most of its 1.3 s went to faulting them back in. 2 ms:
/// 53-56 MiB, 1.0-1.1 s, under issue 7's 64 MB with room. (Those calls took a thread's whole
/// part of the batch; since the sampler calls the network one sequence at a time, a step's
/// buffers are small enough that the allocator keeps them: BENCHMARKS.md, "Where tract's step
/// goes".)
const SAMPLE_PURGE_DELAY_MS: std::ffi::c_long = 2;

/// Once a plan is prepared, for the denoising loop: no more transparent huge pages (they serve
/// loading, but every page returned between steps then comes back as 2 MB to zero, and memory
/// is held in 2 MB units), and `SAMPLE_PURGE_DELAY_MS`. Sampling 8 x 96 characters (edge NNEF
/// build, 2 threads): 1.00-1.11 s and 53-56 MiB, against 1.25-1.31 s and 52-57 MiB with huge
/// pages and a delay of 0 (BENCHMARKS.md, "Edge builds").
fn settle_memory() {
    #[cfg(target_os = "linux")]
    // SAFETY: sets a flag of this process (the kernel's MMF_DISABLE_THP); no memory is touched.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    set_purge_delay(SAMPLE_PURGE_DELAY_MS);
    // SAFETY: a plain call; `force` returns what can be returned now.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// The shipped default model in the format this build reads (NNEF builds get its NNEF twin).
#[cfg(feature = "onnx")]
macro_rules! default_model_file {
    () => {
        "/models/default.onnx"
    };
}
#[cfg(not(feature = "onnx"))]
macro_rules! default_model_file {
    () => {
        "/models/default.nnef.tar"
    };
}

/// The model `chardiff sample` uses when no --model is given.
const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), default_model_file!());

/// With `embed-model`, the default model is inside the binary.
#[cfg(feature = "embed-model")]
const EMBEDDED_MODEL: Option<&[u8]> =
    Some(include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), default_model_file!())));
#[cfg(not(feature = "embed-model"))]
const EMBEDDED_MODEL: Option<&[u8]> = None;

#[derive(Parser)]
#[command(
    name = "chardiff",
    version,
    about = "Character-level bit diffusion: train, export, sample"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a denoiser on a text corpus (candle, CPU).
    #[cfg(feature = "train")]
    Train(Box<train::TrainArgs>),
    /// Export a training run to one self-describing ONNX file (or tract's NNEF archive). The
    /// sampling flags become the file's recommendation [default: the run's --sample-steps and
    /// --sample-td, ddim, guidance 1, warp 1, self-guidance 1, temperature 1, no refinements].
    #[cfg(feature = "train")]
    Export {
        /// The run directory written by `chardiff train`.
        run: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// onnx, or nnef (tract's archive: what NNEF-only edge builds read).
        #[arg(long, default_value = "onnx", value_parser = enum_arg::<Format>)]
        format: Format,
        /// Weight storage: f32, f16 (half the file), or int8 (a third of the file: matrix
        /// products in int8, scales calibrated on corpus windows; onnxruntime runs them so,
        /// tract faster from the weights widened to f32 at load).
        #[arg(long, default_value = "f32", value_parser = enum_arg::<Precision>)]
        precision: Precision,
        /// int8: text to calibrate the activation scales on [default: RUN/calibration.txt, else
        /// the run's training corpus].
        #[arg(long)]
        calibration: Option<PathBuf>,
        #[command(flatten)]
        recommend: RecommendFlags,
    },
    /// Rewrite the sampling settings an exported ONNX file recommends (after measuring them with
    /// `chardiff eval`); the network stays as it is.
    #[cfg(feature = "train")]
    Tune {
        /// The exported ONNX file.
        model: PathBuf,
        /// Where to write the file (may be MODEL itself).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        recommend: RecommendFlags,
    },
    /// Draw a run's curves (loss, sample word rate) into RUN/curves.svg; training redraws it at
    /// every evaluation.
    #[cfg(feature = "train")]
    Curves { run: PathBuf },
    /// Convert an exported ONNX model to tract's NNEF archive (for NNEF-only edge builds).
    #[cfg(feature = "onnx")]
    Convert {
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Sample text from an exported model (tract): unconditional, a prompt, an infill template,
    /// or text longer than one window.
    Sample(SampleArgs),
    /// Measure sample quality against a corpus: interior-word rate, character entropy, repetition.
    Eval(eval::EvalArgs),
    /// Measure speed: model load, per-step latency per batch size, full sampling, peak memory.
    Bench(bench::BenchArgs),
    /// Check that a device runs the model like the CPU does: max |x0| difference, identical text
    /// for a fixed seed, and which operators fall back to the CPU.
    Parity(bench::ParityArgs),
}

/// Sampling settings: `sample`, `eval` and `bench` run with them, `export` and `tune` record them
/// in the file as its recommendation. Each one not given: the model's recommendation (export: the
/// run's --sample-steps and --sample-td, DDIM, guidance 1, warp 1, self-guidance 1, temperature 1,
/// no refinements).
#[derive(clap::Args)]
struct SamplerFlags {
    /// Denoising steps [default: the model's recommendation].
    #[arg(long)]
    steps: Option<usize>,
    /// Asymmetric time delta in steps (export and tune: for free samples too unless --free-td)
    /// [default: the model's recommendation].
    #[arg(long)]
    td: Option<f32>,
    /// Step rule, ddim or ddpm [default: the model's recommendation].
    #[arg(long, value_parser = enum_arg::<StepRule>)]
    sampler: Option<StepRule>,
    /// Classifier-free guidance for prompts, infills and --length on a model trained with
    /// conditioning: 1 is plain conditioning, above 1 leans harder on the known text for a
    /// second pass of the network per step [default: the model's recommendation].
    #[arg(long)]
    guidance: Option<f32>,
    /// Spacing of the steps' times: 1 even, below 1 more steps at middle noise levels, fewer
    /// near pure noise and near clean text [default: the model's recommendation].
    #[arg(long)]
    warp: Option<f32>,
    /// Self-guidance for free samples of a self-conditioned model: 1 is plain self-conditioning,
    /// above 1 leans harder on the previous step's estimate for a second pass of the network per
    /// step (more real words and more varied characters; 0 ignores the estimate). Prompts,
    /// infills and --length are not affected [default: the model's recommendation].
    #[arg(long)]
    self_guidance: Option<f32>,
    /// What self-guidance extrapolates: x0, or logits (softmax heads; keeps the entropy up under
    /// a low --temperature) [default: the model's recommendation, else x0].
    #[arg(long, value_parser = enum_arg::<GuidedOutput>)]
    self_guidance_on: Option<GuidedOutput>,
    /// Softmax temperature of free samples (softmax head only): x0 is the mean character code
    /// under softmax(logits / T); below 1 sharper, more real words and less varied text.
    /// Prompts, infills and --length are not affected [default: the model's recommendation].
    #[arg(long)]
    temperature: Option<f32>,
    /// Refinements of free samples of a self-conditioned model: after each step's estimate the
    /// network sees the same noisy text again, self-conditioned on that estimate, N times (N
    /// more passes per step; more real words at a given step count, less varied text). Prompts,
    /// infills and --length are not affected [default: the model's recommendation, else 0].
    #[arg(long)]
    refine: Option<usize>,
}

/// What `export` and `tune` record: the sampling settings, and a td of its own for free samples.
#[cfg(feature = "train")]
#[derive(clap::Args)]
struct RecommendFlags {
    #[command(flatten)]
    settings: SamplerFlags,
    /// Asymmetric time delta for free samples only: td buys words with duller text, and free
    /// and guided samples trade the two differently [default: the file's, else --td].
    #[arg(long)]
    free_td: Option<f32>,
}

#[cfg(feature = "train")]
impl From<RecommendFlags> for chardiff_export::Recommendation {
    fn from(f: RecommendFlags) -> Self {
        let SamplerFlags {
            steps,
            td,
            sampler,
            guidance,
            warp,
            self_guidance,
            self_guidance_on,
            temperature,
            refine,
        } = f.settings;
        let free_td = f.free_td;
        chardiff_export::Recommendation {
            steps,
            td,
            free_td,
            sampler,
            guidance,
            warp,
            self_guidance,
            self_guidance_on,
            temperature,
            refine,
        }
    }
}

/// Which model and how to run its sampler.
#[derive(clap::Args)]
struct SamplingFlags {
    /// The exported model, ONNX or NNEF [default: the shipped models/default.onnx, or the one
    /// inside the binary].
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    settings: SamplerFlags,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the network runs: cpu, cuda (needs a build with --features cuda), or auto.
    #[arg(long, default_value = "cpu", value_parser = enum_arg::<Device>)]
    device: Device,
    /// The weight precision the model file must have (f32, f16 or int8); another is refused.
    #[arg(long, value_parser = enum_arg::<Precision>)]
    precision: Option<Precision>,
    /// Arithmetic: f32, f16 (f32 and f16 files) or int8 (int8 files) [default: f16 only for f16
    /// weights on a CPU with native fp16 (aarch64 FEAT_FP16), where tract has fp16 kernels;
    /// elsewhere, and for int8 files everywhere, f32 from the weights widened at load: closest to
    /// the f32 model, and tract's CUDA products take no int8. int8 runs the int8 products: faster
    /// than f32 with int8 dot products (VNNI, dotprod; 0.52x on an AMD Zen 5), tens of times
    /// slower without].
    #[arg(long, value_parser = enum_arg::<Precision>)]
    compute: Option<Precision>,
    /// CPU threads per network call [default: the cores available].
    #[arg(long)]
    threads: Option<usize>,
    /// How threads share a call: batch (parts of the batch, one thread and plan state each; a
    /// single sequence runs on one thread) or matmul (every matrix product split).
    #[arg(long, default_value = "batch", value_parser = enum_arg::<Parallelism>)]
    parallelism: Parallelism,
    /// Sequences per network call on each CPU thread; a thread's share of the batch runs in
    /// calls of this size [default: 1, the fastest per sequence measured; on a GPU the whole
    /// batch]. The text does not depend on it.
    #[arg(long)]
    call_batch: Option<usize>,
}

impl SamplingFlags {
    /// The model, for reports.
    fn model_name(&self) -> String {
        match (&self.model, EMBEDDED_MODEL) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(_)) => "default model (embedded)".into(),
            (None, None) => DEFAULT_MODEL.into(),
        }
    }

    /// CPU threads per network call.
    fn threads(&self) -> Result<usize> {
        match self.threads {
            Some(0) => anyhow::bail!("--threads must be at least 1"),
            Some(n) => Ok(n),
            None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        }
    }

    /// The model's bytes: the --model file, else the one inside the binary, else the shipped one.
    fn model_bytes(&self) -> Result<std::borrow::Cow<'static, [u8]>> {
        let path = match (&self.model, EMBEDDED_MODEL) {
            (Some(path), _) => path.clone(),
            (None, Some(bytes)) => return Ok(bytes.into()),
            (None, None) => PathBuf::from(DEFAULT_MODEL),
        };
        anyhow::ensure!(
            self.model.is_some() || path.exists(),
            "no --model given, and the shipped default model is not at {} (this binary has no \
             model inside: pass --model FILE, or build with --features embed-model)",
            path.display()
        );
        let bytes = std::fs::read(&path)
            .with_context(|| format!("cannot read model file {}", path.display()))?;
        Ok(bytes.into())
    }

    /// The model on `device`, saying what its weights compute in.
    fn load_on(&self, device: Device) -> Result<TractDenoiser> {
        let net = self.open_on(device)?;
        self.announce(&net);
        Ok(net)
    }

    /// `load_on` without the notes (a second copy of a model already announced).
    fn open_on(&self, device: Device) -> Result<TractDenoiser> {
        let bytes = self.model_bytes()?;
        let net = TractDenoiser::from_bytes_with(&bytes, device, self.compute)
            .with_context(|| format!("loading {}", self.model_name()))?;
        self.checked(net)
    }

    /// Refuses a file whose precision is not the one asked for.
    fn checked(&self, mut net: TractDenoiser) -> Result<TractDenoiser> {
        net.set_threads(self.threads()?, self.parallelism)?;
        anyhow::ensure!(self.call_batch != Some(0), "--call-batch must be at least 1");
        net.set_call_batch(self.call_batch);
        let stored = net.spec().precision;
        if let Some(wanted) = self.precision.filter(|&p| p != stored) {
            anyhow::bail!(
                "{} stores {} weights, not {}: export the run with `chardiff export --precision {}`",
                self.model_name(),
                serde_name(stored),
                serde_name(wanted),
                serde_name(wanted)
            );
        }
        Ok(net)
    }

    /// Says what f16 and int8 weights compute in here, and why.
    fn announce(&self, net: &TractDenoiser) {
        let (stored, compute, device) = (net.spec().precision, net.compute(), net.device());
        // What this file computes in here without --compute: anything else was forced.
        let forced = arithmetic(stored, None).ok() != Some(compute);
        let mut level = "note";
        let why = if forced {
            let (slow, why) = match compute {
                Precision::Int8 if device == Device::Cuda => {
                    (true, ": tract's CUDA matrix products take f32 and f16 only".into())
                }
                Precision::Int8 => match int8_dot_product() {
                    Some(kernels) => (
                        false,
                        format!(
                            ": int8 matrix products on {kernels} kernels (0.52x the f32 step \
                             on the AMD Zen 5 measured); the activations are quantized, so x0 \
                             moves further from the f32 model's than with the widened weights"
                        ),
                    ),
                    None => (
                        true,
                        ": this CPU has no int8 dot-product instructions (VNNI, AVX-VNNI or \
                         dotprod), so tract emulates int8 matrix products, tens of times slower \
                         than f32"
                            .into(),
                    ),
                },
                Precision::F16 if !native_f16() => {
                    (true, ": scalar code here, tens of times slower".into())
                }
                _ => (false, String::new()),
            };
            if slow {
                level = "warning";
            }
            format!("forced by --compute {}{why}", serde_name(compute))
        } else {
            match (stored, compute) {
                (Precision::Int8, _) if device == Device::Cuda => {
                    "the weights are widened at load: tract's CUDA matrix products take no int8"
                        .into()
                }
                (Precision::Int8, _) => "the weights are widened at load and the activations \
                    not quantized, closest to the f32 model; --compute int8 runs the int8 \
                    products, faster where the CPU has int8 dot products (measured on VNNI)"
                    .into(),
                (_, Precision::F16) => "this CPU has native fp16 arithmetic".into(),
                (Precision::F16, _) => {
                    "the weights are widened at load: no native fp16 here".into()
                }
                (_, _) => return, // f32 weights in f32
            }
        };
        eprintln!(
            "{level}: {} weights, computing in {} ({why})",
            serde_name(stored),
            serde_name(compute)
        );
    }

    /// The model, with its plan prepared for `n` sequences (which, with `--device auto`,
    /// decides the device), and the sampler's settings for free samples or, when `conditional`,
    /// samples with known characters.
    fn load(&self, n: usize, conditional: bool) -> Result<(TractDenoiser, SamplerConfig)> {
        let mut net = self.load_on(self.device)?;
        let config = self.sampler_config(net.spec(), conditional);
        // Guidance runs the batch twice per call, with and without its condition.
        let per_call = if config.guidance == 1.0 { n } else { 2 * n };
        self.prepare(&mut net, per_call)?;
        Ok((net, config))
    }

    fn prepare(&self, net: &mut TractDenoiser, batch: usize) -> Result<()> {
        let auto = net.device() == Device::Auto;
        net.prepare(batch)
            .with_context(|| format!("preparing {} for batch {batch}", self.model_name()))?;
        settle_memory();
        if let Some(why) = net.fallback_reason().filter(|_| auto) {
            eprintln!("note: --device auto runs on the CPU: {why}");
        }
        Ok(())
    }

    /// The model's recommendation for free samples or, when `conditional`, samples with known
    /// characters, overridden by the flags given.
    fn sampler_config(&self, spec: &ModelSpec, conditional: bool) -> SamplerConfig {
        let given = &self.settings;
        let recommended = SamplerConfig::recommended(spec, self.seed, conditional);
        SamplerConfig {
            steps: given.steps.unwrap_or(recommended.steps),
            td: given.td.unwrap_or(recommended.td),
            rule: given.sampler.unwrap_or(recommended.rule),
            guidance: given.guidance.unwrap_or(recommended.guidance),
            warp: given.warp.unwrap_or(recommended.warp),
            self_guidance: given.self_guidance.unwrap_or(recommended.self_guidance),
            self_guidance_on: given.self_guidance_on.unwrap_or(recommended.self_guidance_on),
            temperature: given.temperature.unwrap_or(recommended.temperature),
            refine: given.refine.unwrap_or(recommended.refine),
            ..recommended
        }
        .for_task(conditional)
    }
}

#[derive(clap::Args)]
struct SampleArgs {
    #[command(flatten)]
    sampling: SamplingFlags,
    /// Number of samples.
    #[arg(short = 'n', long, default_value_t = 8)]
    n: usize,
    /// Text the samples start with (at most the window minus one bytes).
    #[arg(long, conflicts_with = "infill")]
    prompt: Option<String>,
    /// A template whose `_` characters are generated, one `_` per character, e.g.
    /// "The ___ was cold and ___." (`\_` is a literal underscore, `\\` a backslash).
    #[arg(long, conflicts_with = "length")]
    infill: Option<String>,
    /// Total characters per sample: longer than one window by sliding, each new window
    /// conditioned on the last half of the text so far (seams fall between words: a window
    /// rewrites the word its predecessor's edge cut).
    #[arg(long)]
    length: Option<usize>,
}

/// Parses a lower-case enum value with the type's own serde names, so CLI and files agree.
fn enum_arg<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_lowercase())).map_err(|e| e.to_string())
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        // Until `settle_memory`, once a plan is prepared.
        Command::Sample(_) | Command::Eval(_) | Command::Bench(_) => {
            set_purge_delay(LOAD_PURGE_DELAY_MS)
        }
        #[cfg(feature = "train")]
        Command::Train(_) => set_purge_delay(-1),
        _ => {}
    }
    let result = match cli.command {
        #[cfg(feature = "train")]
        Command::Train(args) => train::run(*args),
        #[cfg(feature = "train")]
        Command::Export { run, out, format, precision, calibration, recommend } => {
            let recommended = recommend.into();
            export(
                run,
                out,
                chardiff_export::Options { format, precision, recommended, calibration },
            )
        }
        #[cfg(feature = "train")]
        Command::Tune { model, out, recommend } => tune(model, out, recommend.into()),
        #[cfg(feature = "train")]
        Command::Curves { run } => chardiff_train::write_curves(&run)
            .map(|()| {
                eprintln!("wrote {}", run.join(chardiff_train::curves::CURVES_FILE).display())
            })
            .with_context(|| format!("drawing the curves of {}", run.display())),
        #[cfg(feature = "onnx")]
        Command::Convert { model, out } => convert(model, out),
        Command::Sample(args) => run_sample(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Parity(args) => bench::parity(args),
    };
    if let Err(e) = result {
        // `chardiff sample | head -3`: the reader left; that is not a failure.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            return;
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_sample(args: SampleArgs) -> Result<()> {
    let conditional = args.prompt.is_some() || args.infill.is_some();
    let (mut net, config) = args.sampling.load(args.n, conditional || args.length.is_some())?;
    let spec = net.spec().clone();
    if conditional && ConditioningMethod::for_spec(&spec) == ConditioningMethod::Replacement {
        eprintln!(
            "note: this model was trained without conditioning; known characters are imposed by \
             replacement inpainting, the weaker method (seams between known and generated text \
             may not read well)"
        );
    }
    let prompt = args.prompt.unwrap_or_default();
    let texts = if let Some(length) = args.length {
        let bar = progress_bar(length as u64, "bytes");
        let prompts = vec![prompt.as_str(); args.n];
        let texts = generate::generate_long(&mut net, &config, &prompts, length, |done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        texts.into_iter().map(|t| t.text).collect::<Vec<_>>()
    } else {
        let (known, shown) = match &args.infill {
            Some(template) => generate::infill_known(&spec, template)?,
            None if prompt.is_empty() => (vec![None; spec.window], spec.window),
            None => (generate::prompt_known(&spec, &prompt)?, spec.window),
        };
        let known: Vec<Option<u8>> = (0..args.n).flat_map(|_| known.iter().copied()).collect();
        let bar = progress_bar(config.steps as u64, "denoising");
        let texts =
            sample(&mut net, &config, args.n, Some(&known[..]).filter(|_| conditional), |i, _| {
                bar.set_position(i as u64)
            })?;
        bar.finish_and_clear();
        texts
            .into_iter()
            .map(|mut t| {
                t.truncate(shown);
                t
            })
            .collect()
    };
    for text in texts {
        writeln!(std::io::stdout(), "➜ {}", String::from_utf8_lossy(&text))?;
    }
    Ok(())
}

mod bench {
    use super::{serde_name, SamplingFlags};
    use anyhow::Result;
    use chardiff_runtime::bench::{max_x0_difference, peak_rss_bytes, step_latency, StepLatency};
    use chardiff_runtime::sampler::sample;
    use chardiff_runtime::tract::{gemm_peak_gflops, Device, Parallelism};
    use chardiff_runtime::{Denoiser, Precision};
    use serde::Serialize;
    use std::time::Instant;

    #[derive(clap::Args)]
    pub struct BenchArgs {
        #[command(flatten)]
        sampling: SamplingFlags,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        batch: Vec<usize>,
        /// Timed network calls per batch size (after --warmup untimed ones).
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Skip the full sampling run at the recommended steps.
        #[arg(long)]
        no_full: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also run the file with onnxruntime (same batches, same thread count), side by side.
        #[cfg(feature = "ort")]
        #[arg(long)]
        ort: bool,
    }

    #[derive(clap::Args)]
    pub struct ParityArgs {
        #[command(flatten)]
        sampling: SamplingFlags,
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        batch: Vec<usize>,
        /// Largest |x0| difference accepted.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f32,
    }

    /// The --device plan against the CPU plan of the same file.
    pub fn parity(args: ParityArgs) -> Result<()> {
        let first = args.batch.first().copied().unwrap_or(1);
        let (mut device, config) = args.sampling.load(first, false)?;
        let mut cpu = args.sampling.open_on(Device::Cpu)?;
        println!("device plan: {:?}", device.device());
        for (op, n) in device.plan_ops() {
            println!("  {n:>4} x {op}");
        }
        let fallbacks = device.cpu_fallbacks();
        println!(
            "operators falling back to the CPU: {}",
            if fallbacks.is_empty() { "none".to_string() } else { fallbacks.join(", ") }
        );
        let mut ok = true;
        for (seed, &batch) in args.batch.iter().enumerate() {
            let diff = max_x0_difference(&mut cpu, &mut device, batch, seed as u64)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let a = sample(&mut cpu, &config, batch, None, |_, _| {})?;
            let b = sample(&mut device, &config, batch, None, |_, _| {})?;
            ok &= a == b && diff <= args.tolerance;
            // How far apart: a long run can turn a near tie either way (BENCHMARKS.md, "Forms of
            // the graph tract runs faster"), a broken operator changes every sample.
            let changed: Vec<usize> = a
                .iter()
                .zip(&b)
                .map(|(x, y)| {
                    x.iter().zip(y).filter(|(p, q)| p != q).count() + x.len().abs_diff(y.len())
                })
                .collect();
            let samples = changed.iter().filter(|&&c| c > 0).count();
            let text = match samples {
                0 => "identical".to_string(),
                _ => format!(
                    "DIFFERS in {samples} of {batch} samples, {} characters",
                    changed.iter().sum::<usize>()
                ),
            };
            println!(
                "batch {batch:>5}: max |x0 diff| {diff:.2e}; {} steps, seed {}: text {text}",
                config.steps, config.seed
            );
        }
        anyhow::ensure!(ok, "the {:?} plan does not match the CPU plan", device.device());
        println!("parity: ok");
        Ok(())
    }

    #[derive(Serialize)]
    struct Row {
        runtime: &'static str,
        #[serde(flatten)]
        step: StepLatency,
        /// Fixing the batch size in the graph and preparing its plan (tract).
        prepare_ms: Option<f64>,
        /// Seconds for a whole sample at the given steps, and characters per second.
        full_sample_s: Option<f64>,
        chars_per_s: Option<f64>,
        /// Arithmetic rate of the median step, and its share of the GEMM peak of the threads.
        gflops: f64,
        share_of_peak: f64,
    }

    #[derive(Serialize)]
    struct Report {
        model: String,
        /// The file's weights, and what tract computes in (`tract::arithmetic`).
        precision: Precision,
        compute: Precision,
        device: String,
        threads: usize,
        parallelism: Parallelism,
        /// Sequences per network call on each thread (CPU; on a GPU a call takes the batch).
        #[serde(skip_serializing_if = "Option::is_none")]
        call_batch: Option<usize>,
        /// Reading the file into a graph (tract prepares plans per batch size).
        load_ms: f64,
        /// Reading and optimizing the file in onnxruntime.
        #[serde(skip_serializing_if = "Option::is_none")]
        ort_load_ms: Option<f64>,
        steps: usize,
        /// The full sample's settings, "100 ddpm steps, td 2, ..., self-guidance 2.5" (with
        /// self-guidance a step after the first runs the network twice).
        sampling: String,
        /// Floating-point operations of one step per sequence (matrix products).
        flops_per_sequence: u64,
        /// tract's f32 GEMM speed on one thread (1024 x 1024 products, best of 5).
        gemm_peak_gflops: f64,
        rows: Vec<Row>,
        /// Of the whole process (both runtimes when onnxruntime ran too).
        peak_rss_mb: Option<f64>,
    }

    /// What the arithmetic of a step is measured against.
    struct Arithmetic {
        flops_per_sequence: u64,
        /// The GEMM peak of all the threads a call may use.
        peak_gflops: f64,
    }

    /// Step latency and full-sample time per batch size; `prepare` readies a batch size.
    fn measure<D: Denoiser>(
        args: &BenchArgs,
        runtime: &'static str,
        net: &mut D,
        arithmetic: &Arithmetic,
        mut prepare: impl FnMut(&mut D, usize) -> Result<Option<f64>>,
    ) -> Result<Vec<Row>> {
        let config = args.sampling.sampler_config(net.spec(), false);
        let window = net.spec().window;
        let mut rows = Vec::new();
        for &batch in &args.batch {
            let prepare_ms = prepare(net, batch)?;
            let step = step_latency(net, batch, args.warmup, args.iterations)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let full_sample_s = if args.no_full {
                None
            } else {
                let start = Instant::now();
                sample(net, &config, batch, None, |_, _| {})?;
                Some(start.elapsed().as_secs_f64())
            };
            let chars_per_s = full_sample_s.map(|s| (batch * window) as f64 / s);
            let flops = (arithmetic.flops_per_sequence * batch as u64) as f64;
            let gflops = flops / (step.median_ms * 1e-3) / 1e9;
            let share_of_peak = gflops / arithmetic.peak_gflops;
            rows.push(Row {
                runtime,
                step,
                prepare_ms,
                full_sample_s,
                chars_per_s,
                gflops,
                share_of_peak,
            });
        }
        Ok(rows)
    }

    pub fn run(args: BenchArgs) -> Result<()> {
        anyhow::ensure!(args.batch.iter().all(|&b| b > 0), "batch sizes must be at least 1");
        let start = Instant::now();
        let mut net = args.sampling.load_on(args.sampling.device)?;
        let load_ms = start.elapsed().as_secs_f64() * 1e3;
        let gemm_peak_gflops = gemm_peak_gflops(1024, 5)?;
        let arithmetic = Arithmetic {
            flops_per_sequence: net.flops_per_sequence()?,
            peak_gflops: gemm_peak_gflops * net.threads().0 as f64,
        };
        #[cfg_attr(not(feature = "ort"), allow(unused_mut))]
        let mut rows = measure(&args, "tract", &mut net, &arithmetic, |net, batch| {
            let start = Instant::now();
            args.sampling.prepare(net, batch)?;
            Ok(Some(start.elapsed().as_secs_f64() * 1e3))
        })?;
        #[cfg_attr(not(feature = "ort"), allow(unused_mut))]
        let mut ort_load_ms = None;
        #[cfg(feature = "ort")]
        if args.ort {
            use chardiff_runtime::onnxruntime::OrtDenoiser;
            use chardiff_runtime::tract::Format;
            let file = args.sampling.model_bytes()?;
            anyhow::ensure!(
                Format::of(&file) == Format::Onnx,
                "--ort runs ONNX files: {} is an NNEF archive",
                args.sampling.model_name()
            );
            let start = Instant::now();
            let mut ort = OrtDenoiser::from_bytes(&file, net.threads().0)?;
            ort_load_ms = Some(start.elapsed().as_secs_f64() * 1e3);
            rows.extend(measure(&args, "onnxruntime", &mut ort, &arithmetic, |_, _| Ok(None))?);
        }
        let full_sample = args.sampling.sampler_config(net.spec(), false);
        let report = Report {
            model: args.sampling.model_name(),
            precision: net.spec().precision,
            compute: net.compute(),
            device: format!("{:?}", net.device()).to_lowercase(),
            threads: net.threads().0,
            parallelism: net.threads().1,
            call_batch: (net.device() == Device::Cpu).then(|| net.call_size(usize::MAX)),
            load_ms,
            ort_load_ms,
            steps: full_sample.steps,
            sampling: full_sample.to_string(),
            flops_per_sequence: arithmetic.flops_per_sequence,
            gemm_peak_gflops,
            rows,
            peak_rss_mb: peak_rss_bytes().map(|b| b as f64 / 1e6),
        };
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
            return Ok(());
        }
        println!(
            "{} ({} weights, {} arithmetic) on {}, {} thread(s), parallelism {}{}: read in {:.1} \
             ms{}",
            report.model,
            report.precision,
            report.compute,
            report.device,
            report.threads,
            serde_name(report.parallelism),
            report.call_batch.map_or(String::new(), |n| match n {
                1 => ", one sequence per call".into(),
                n => format!(", up to {n} sequences per call"),
            }),
            report.load_ms,
            report.ort_load_ms.map_or(String::new(), |ms| format!(" (onnxruntime: {ms:.1} ms)"))
        );
        println!(
            "one step: {:.1} MFLOP per sequence; tract's one-thread f32 GEMM peak here: {:.1} \
             GFLOP/s (1024^3 product, best of 5); a full sample: {}",
            report.flops_per_sequence as f64 / 1e6,
            report.gemm_peak_gflops,
            report.sampling
        );
        println!(
            "{:>12} {:>6} {:>11} {:>10} {:>10} {:>10} {:>16} {:>10} {:>8} {:>7}",
            "runtime",
            "batch",
            "prepare ms",
            "median ms",
            "p10 ms",
            "p90 ms",
            format!("sample {} st, s", report.steps),
            "chars/s",
            "GFLOP/s",
            "% peak"
        );
        for r in &report.rows {
            let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
            println!(
                "{:>12} {:>6} {:>11} {:>10.2} {:>10.2} {:>10.2} {:>16} {:>10} {:>8.1} {:>6.0}%",
                r.runtime,
                r.step.batch,
                opt(r.prepare_ms, 1),
                r.step.median_ms,
                r.step.p10_ms,
                r.step.p90_ms,
                opt(r.full_sample_s, 2),
                opt(r.chars_per_s, 0),
                r.gflops,
                100.0 * r.share_of_peak
            );
        }
        if let Some(mb) = report.peak_rss_mb {
            println!("peak RSS {mb:.1} MB");
        }
        Ok(())
    }
}

mod eval {
    use super::{enum_arg, progress_bar, SamplingFlags};
    use anyhow::{Context, Result};
    use chardiff_runtime::corpus::{spaced_windows, Corpus, Preprocess};
    use chardiff_runtime::generate;
    use chardiff_runtime::metrics::{quality, seam_quality, vocabulary, Quality};
    use chardiff_runtime::sampler::sample;
    use chardiff_runtime::Denoiser;
    use std::path::PathBuf;

    #[derive(clap::Args)]
    pub struct EvalArgs {
        /// The corpus whose train split is the vocabulary (and whose charset counts as known).
        #[arg(long)]
        corpus: PathBuf,
        /// Cleaning of the corpus: none, or reference.
        #[arg(long, default_value = "none", value_parser = enum_arg::<Preprocess>)]
        preprocess: Preprocess,
        /// Score these samples (one per line; a leading "➜ " is ignored) instead of sampling.
        #[arg(long, conflicts_with = "model")]
        samples: Option<PathBuf>,
        #[command(flatten)]
        sampling: SamplingFlags,
        /// Samples to draw from the model.
        #[arg(short = 'n', long, default_value_t = 256)]
        n: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Measure conditional generation instead, on validation windows: prefix (the first half
        /// known), infill (the middle third generated) or long (--length bytes from a prefix).
        #[arg(long, value_parser = ["prefix", "infill", "long"], conflicts_with = "samples")]
        condition: Option<String>,
        /// Text length for --condition long.
        #[arg(long, default_value_t = 1024)]
        length: usize,
    }

    pub fn run(args: EvalArgs) -> Result<()> {
        if let Some(mode) = &args.condition {
            return seams(&args, mode);
        }
        let (samples, source) = match &args.samples {
            Some(path) => {
                let text = std::fs::read(path)
                    .with_context(|| format!("reading samples {}", path.display()))?;
                let lines: Vec<Vec<u8>> = text
                    .split(|&b| b == b'\n')
                    .map(|l| l.strip_prefix("➜ ".as_bytes()).unwrap_or(l).to_vec())
                    .filter(|l| !l.is_empty())
                    .collect();
                (lines, format!("{}", path.display()))
            }
            None => {
                let (mut net, config) = args.sampling.load(args.n, false)?;
                let bar = progress_bar(config.steps as u64, "sampling");
                let texts =
                    sample(&mut net, &config, args.n, None, |i, _| bar.set_position(i as u64))?;
                bar.finish_and_clear();
                let name = net.spec().provenance.corpus.clone();
                (texts, format!("model trained on {name}, {config}"))
            }
        };
        anyhow::ensure!(!samples.is_empty(), "there are no samples to evaluate");
        let window = samples.iter().map(Vec::len).max().unwrap_or(1);
        let corpus = Corpus::load(&args.corpus, args.preprocess, window)
            .with_context(|| format!("loading corpus {}", args.corpus.display()))?;
        let vocab = vocabulary(&String::from_utf8_lossy(&corpus.train));
        let scored = quality(&samples, &vocab, &corpus.charset);
        // Real text of the same length for comparison: evenly spaced validation windows.
        let reference: Vec<Vec<u8>> = spaced_windows(&corpus.valid, window, samples.len())
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        let real = quality(&reference, &vocab, &corpus.charset);
        if args.json {
            let out = serde_json::json!({ "source": source, "samples": scored, "validation_windows": real });
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!("{source}");
            print_table(&[("samples", &scored), ("validation windows", &real)]);
        }
        Ok(())
    }

    /// Word rates of generated spans and of the words straddling their boundaries.
    fn seams(args: &EvalArgs, mode: &str) -> Result<()> {
        let (mut net, config) = args.sampling.load(args.n, true)?;
        let spec = net.spec().clone();
        let (window, half) = (spec.window, spec.window / 2);
        let corpus = Corpus::load(&args.corpus, args.preprocess, window)
            .with_context(|| format!("loading corpus {}", args.corpus.display()))?;
        let vocab = vocabulary(&String::from_utf8_lossy(&corpus.train));
        let windows = spaced_windows(&corpus.valid, window, args.n);
        let bar = progress_bar(config.steps as u64, "sampling");
        let progress = |i: usize, of: usize| {
            bar.set_length(of as u64);
            bar.set_position(i as u64)
        };
        let texts: Vec<(Vec<u8>, Vec<u8>)> = match mode {
            "long" => {
                let prompts = windows
                    .iter()
                    .map(|w| std::str::from_utf8(&w[..half]))
                    .collect::<Result<Vec<&str>, _>>()
                    .context("a validation prompt splits a UTF-8 character: try another -n")?;
                generate::generate_long(&mut net, &config, &prompts, args.length, progress)?
                    .into_iter()
                    .map(|t| (t.text, t.origins))
                    .collect()
            }
            _ => {
                let known_at = |i: usize| match mode {
                    "prefix" => i < half,
                    _ => i < window / 3 || i >= 2 * window / 3,
                };
                let known: Vec<Option<u8>> = windows
                    .iter()
                    .flat_map(|w| w.iter().enumerate().map(|(i, &b)| known_at(i).then_some(b)))
                    .collect();
                let origins: Vec<u8> = (0..window).map(|i| u8::from(!known_at(i))).collect();
                sample(&mut net, &config, windows.len(), Some(&known), progress)?
                    .into_iter()
                    .map(|t| (t, origins.clone()))
                    .collect()
            }
        };
        bar.finish_and_clear();
        let q = seam_quality(&texts, &vocab);
        // The validation windows themselves, known where the samples were: real text's figures.
        let real: Vec<(Vec<u8>, Vec<u8>)> = windows
            .iter()
            .zip(&texts)
            .map(|(w, (_, origins))| (w.to_vec(), origins[..w.len()].to_vec()))
            .collect();
        let real = seam_quality(&real, &vocab);
        if args.json {
            let out = serde_json::json!({ "condition": mode, "samples": texts.len(), "steps": config.steps, "td": config.td, "sampler": config.rule, "guidance": config.guidance, "warp": config.warp, "self_guidance": config.self_guidance, "self_guidance_on": config.self_guidance_on, "temperature": config.temperature, "refine": config.refine, "quality": q, "validation_windows": real });
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!("{mode}: {} samples, {config}", texts.len());
            println!(
                "generated words {:.1}% of {} (mean length {:.1})   \
                 boundary words {:.1}% of {} (mean length {:.1}; with no seam: {:.1}%)   \
                 generated words beside a boundary {:.1}% of {}   \
                 generated characters' entropy {:.3} bits",
                100.0 * q.generated_word_rate,
                q.generated_words,
                q.generated_mean_length,
                100.0 * q.boundary_word_rate,
                q.boundary_words,
                q.boundary_mean_length,
                100.0 * q.seamless_boundary_word_rate,
                100.0 * q.adjacent_word_rate,
                q.adjacent_words,
                q.generated_char_entropy
            );
            println!(
                "validation windows, same known positions: generated-position words {:.1}%, \
                 boundary words {:.1}% (with no seam: {:.1}%), entropy {:.3} bits",
                100.0 * real.generated_word_rate,
                100.0 * real.boundary_word_rate,
                100.0 * real.seamless_boundary_word_rate,
                real.generated_char_entropy
            );
        }
        Ok(())
    }

    fn print_table(rows: &[(&str, &Quality)]) {
        println!(
            "{:<20} {:>7} {:>10} {:>9} {:>10} {:>8} {:>9} {:>8}",
            "", "n", "word rate", "words", "entropy", "rep-4g", "distinct2", "foreign"
        );
        for (name, q) in rows {
            println!(
                "{:<20} {:>7} {:>9.1}% {:>9} {:>10.3} {:>7.1}% {:>9.3} {:>7.2}%",
                name,
                q.samples,
                100.0 * q.word_rate,
                q.interior_words,
                q.char_entropy,
                100.0 * q.repeated_4gram_rate,
                q.distinct_2,
                100.0 * q.foreign_byte_rate
            );
        }
    }
}

/// A progress bar on a terminal; hidden (indicatif's default) when stderr is not one.
fn progress_bar(len: u64, what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed} < {eta}]")
        .expect("a valid template");
    bar.set_style(style);
    bar.set_message(what);
    bar
}

/// A line for the user: above the progress bar on a terminal, plain stderr in a pipe or a log.
#[cfg(feature = "train")]
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

#[cfg(feature = "train")]
fn export(run: PathBuf, out: PathBuf, options: chardiff_export::Options) -> Result<()> {
    anyhow::ensure!(
        options.calibration.is_none() || options.precision == Precision::Int8,
        "--calibration is for --precision int8 (f32 and f16 need no calibration)"
    );
    let summary = chardiff_export::export_run(&run, &out, options)
        .with_context(|| format!("exporting {}", run.display()))?;
    eprintln!(
        "wrote {} ({:.1} MB, {} parameters, trained {} steps)",
        out.display(),
        summary.bytes as f64 / 1e6,
        summary.parameters,
        summary.training_steps
    );
    Ok(())
}

#[cfg(feature = "train")]
fn tune(model: PathBuf, out: PathBuf, recommended: chardiff_export::Recommendation) -> Result<()> {
    let spec = chardiff_export::retune(&model, &out, &recommended)
        .with_context(|| format!("rewriting the settings of {}", model.display()))?;
    let free = SamplerConfig::recommended(&spec, 0, false);
    eprintln!("wrote {}: recommends {free} for free samples", out.display());
    if spec.conditioning {
        let conditional = SamplerConfig::recommended(&spec, 0, true);
        eprintln!("  and {conditional} for prompts, infills and --length");
    }
    Ok(())
}

#[cfg(feature = "onnx")]
fn convert(model: PathBuf, out: PathBuf) -> Result<()> {
    let onnx = std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
    let nnef = chardiff_runtime::tract::onnx_to_nnef(&onnx)
        .with_context(|| format!("converting {}", model.display()))?;
    chardiff_runtime::files::write_atomic(&out, &nnef)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {} ({:.1} MB)", out.display(), nnef.len() as f64 / 1e6);
    Ok(())
}

#[cfg(feature = "train")]
mod train {
    use super::{enum_arg, progress_bar, say, serde_name};
    use anyhow::{anyhow, bail, Context, Result};
    use chardiff_runtime::{BitCode, Head, Schedule};
    use chardiff_train::corpus::Preprocess;
    use chardiff_train::{
        Activation, AttentionBias, Event, InitialWeights, Loss, ModelConfig, SelfCondUnit,
        TimeSampling, TrainConfig, TrainedModel, Trainer,
    };
    use std::path::PathBuf;

    #[derive(clap::Args)]
    pub struct TrainArgs {
        /// Text file to learn from (UTF-8).
        #[arg(long, required_unless_present = "resume")]
        corpus: Option<PathBuf>,
        /// Run directory: settings, checkpoints, metrics.
        #[arg(long)]
        out: PathBuf,
        /// Continue the run saved in --out (its settings; --steps may extend it).
        #[arg(long)]
        resume: bool,
        /// Start from the weights of an exported f32 model instead of random ones, with a fresh
        /// optimizer and schedule: to train a model longer, or on another corpus with the same
        /// characters. The network, window, bit code, schedule, head, conditioning and loss are
        /// the file's (a flag that contradicts them is refused).
        #[arg(long, value_name = "MODEL.onnx", conflicts_with = "resume")]
        init_from: Option<PathBuf>,
        /// Cleaning: none, or reference (the reference implementation's, for comparable numbers).
        #[arg(long, default_value = "none", value_parser = enum_arg::<Preprocess>)]
        preprocess: Preprocess,
        #[arg(long)]
        steps: Option<u64>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Characters per window [default: 96].
        #[arg(long)]
        window: Option<usize>,
        /// [default: 256]
        #[arg(long)]
        dim: Option<usize>,
        /// Transformer blocks [default: 4]. With --init-from, more than the file's grows it
        /// deeper: the new blocks start as the identity (zero output projections).
        #[arg(long)]
        layers: Option<usize>,
        /// [default: 4]
        #[arg(long)]
        heads: Option<usize>,
        /// MLP width [default: 4 x dim].
        #[arg(long)]
        ffn: Option<usize>,
        /// gelu (tanh approximation) or silu [default: gelu].
        #[arg(long, value_parser = enum_arg::<Activation>)]
        activation: Option<Activation>,
        /// Position bias on attention scores: relative (learned per offset, ALiBi start), full
        /// (learned [heads, L, L]) or none (position embeddings only: the first default model)
        /// [default: relative].
        #[arg(long, value_parser = enum_arg::<AttentionBias>)]
        attention_bias: Option<AttentionBias>,
        /// Output head: softmax (over the corpus charset) or bits [default: softmax].
        #[arg(long, value_parser = enum_arg::<Head>)]
        head: Option<Head>,
        /// mse (x0) or xent (softmax head only) [default: mse].
        #[arg(long, value_parser = enum_arg::<Loss>)]
        loss: Option<Loss>,
        /// binary or gray [default: binary].
        #[arg(long, value_parser = enum_arg::<BitCode>)]
        code: Option<BitCode>,
        /// [default: 1]
        #[arg(long)]
        bit_scale: Option<f32>,
        /// cosine, sqrt or linear [default: cosine].
        #[arg(long, value_parser = enum_arg::<Schedule>)]
        schedule: Option<Schedule>,
        /// Train without self-conditioning.
        #[arg(long)]
        no_self_cond: bool,
        #[arg(long, default_value_t = 0.5)]
        self_cond_rate: f64,
        /// batch or example: what one self-conditioning coin decides.
        #[arg(long, default_value = "batch", value_parser = enum_arg::<SelfCondUnit>)]
        self_cond_unit: SelfCondUnit,
        /// Draw training times t from a logit-normal, t = sigmoid(M + S z) with z ~ N(0, 1),
        /// instead of uniformly (validation stays uniform): --time-logit-normal M,S, e.g. 0,1.
        #[arg(long, value_name = "M,S", value_parser = parse_logit_normal)]
        time_logit_normal: Option<TimeSampling>,
        /// Train without cond/cond_mask inputs (no prompts or infilling then).
        #[arg(long)]
        no_conditioning: bool,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 200)]
        warmup: u64,
        #[arg(long, default_value_t = 0.01)]
        weight_decay: f64,
        #[arg(long, default_value_t = 1.0)]
        clip_norm: f64,
        #[arg(long, default_value_t = 0.999)]
        ema_decay: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 250)]
        eval_every: u64,
        #[arg(long, default_value_t = 250)]
        checkpoint_every: u64,
        /// Sampling steps recommended in the exported model (and used for training samples).
        #[arg(long, default_value_t = 200)]
        sample_steps: usize,
        #[arg(long, default_value_t = 1.0)]
        sample_td: f32,
    }

    fn parse_logit_normal(arg: &str) -> Result<TimeSampling, String> {
        let numbers =
            arg.split(',').map(|x| x.trim().parse::<f64>()).collect::<Result<Vec<_>, _>>();
        match numbers.as_deref() {
            Ok(&[mean, std]) => Ok(TimeSampling::LogitNormal { mean, std }),
            _ => {
                Err(format!("expected the mean and std of logit(t) as M,S (e.g. 0,1), got {arg:?}"))
            }
        }
    }

    /// The network: the flags' for a new model, the starting file's with `--init-from` (where a
    /// network flag may only repeat it).
    fn network(args: &TrainArgs, start: Option<&TrainedModel>) -> Result<ModelConfig> {
        let Some(start) = start else {
            let dim = args.dim.unwrap_or(256);
            return Ok(ModelConfig {
                dim,
                layers: args.layers.unwrap_or(4),
                heads: args.heads.unwrap_or(4),
                ffn: args.ffn.unwrap_or(4 * dim),
                activation: args.activation.unwrap_or(Activation::Gelu),
                attention_bias: args.attention_bias.unwrap_or(AttentionBias::Relative),
            });
        };
        let file = &start.config;
        // More layers than the file's grow it: the new blocks start as the identity.
        let layers = args.layers.unwrap_or(file.layers).max(file.layers);
        let flags = [
            ("dim", args.dim.map(|x| x.to_string()), file.dim.to_string()),
            ("layers", args.layers.map(|x| x.to_string()), layers.to_string()),
            ("heads", args.heads.map(|x| x.to_string()), file.heads.to_string()),
            ("ffn", args.ffn.map(|x| x.to_string()), file.ffn.to_string()),
            ("activation", args.activation.map(serde_name), serde_name(file.activation)),
            (
                "attention-bias",
                args.attention_bias.map(serde_name),
                serde_name(file.attention_bias),
            ),
        ];
        for (flag, given, theirs) in flags {
            if let Some(given) = given.filter(|given| *given != theirs) {
                bail!(
                    "--{flag} {given} contradicts the starting model's network (--{flag} \
                     {theirs}): with --init-from the network is the file's (--layers may add \
                     blocks); leave the flag out"
                );
            }
        }
        Ok(ModelConfig { layers, ..file.clone() })
    }

    /// The run's settings. With `--init-from`, what the file records (window, bit code,
    /// schedule, head, conditioning, loss) stands in for flags left out; a flag that differs
    /// from it is refused when the run starts (`Trainer::create_from`), except the loss.
    fn settings(args: &TrainArgs, start: Option<&TrainedModel>) -> Result<TrainConfig> {
        let spec = start.map(|model| &model.spec);
        let head = args.head.or(spec.map(|s| s.head)).unwrap_or(Head::Softmax);
        let loss = match (args.loss, spec) {
            (Some(loss), _) => loss,
            (None, None) => Loss::Mse,
            (None, Some(spec)) => match &spec.provenance.loss {
                Some(loss) => {
                    enum_arg(loss).map_err(|e| anyhow!("the starting model's loss: {e}"))?
                }
                None if head == Head::Bits => Loss::Mse,
                None => bail!(
                    "the starting model does not record the loss it was trained with (it was \
                     exported before files recorded it): pass --loss mse or --loss xent"
                ),
            },
        };
        let default = TrainConfig::default();
        Ok(TrainConfig {
            corpus: args.corpus.clone().unwrap_or_default(),
            preprocess: args.preprocess,
            window: args.window.or(spec.map(|s| s.window)).unwrap_or(96),
            code: args.code.or(spec.map(|s| s.code)).unwrap_or(BitCode::Binary),
            bit_scale: args.bit_scale.or(spec.map(|s| s.bit_scale)).unwrap_or(1.0),
            schedule: args.schedule.or(spec.map(|s| s.schedule)).unwrap_or(Schedule::Cosine),
            head,
            loss,
            self_conditioning: !args.no_self_cond && spec.is_none_or(|s| s.self_conditioning),
            self_cond_rate: args.self_cond_rate,
            self_cond_unit: args.self_cond_unit,
            time_sampling: args.time_logit_normal.unwrap_or_default(),
            conditioning: !args.no_conditioning && spec.is_none_or(|s| s.conditioning),
            steps: args.steps.unwrap_or(default.steps),
            batch: args.batch,
            lr: args.lr,
            warmup: args.warmup,
            weight_decay: args.weight_decay,
            clip_norm: args.clip_norm,
            ema_decay: args.ema_decay,
            seed: args.seed,
            eval_every: args.eval_every,
            checkpoint_every: args.checkpoint_every,
            sample_steps: args.sample_steps,
            sample_td: args.sample_td,
            ..default
        })
    }

    pub fn run(args: TrainArgs) -> Result<()> {
        let mut trainer = if args.resume {
            Trainer::resume(&args.out, args.steps)
                .with_context(|| format!("resuming {}", args.out.display()))?
        } else {
            let from = match &args.init_from {
                None => None,
                Some(file) => {
                    let (model, sha256) = chardiff_export::read_onnx_model(file)?;
                    let steps = model.spec.provenance.steps;
                    Some((model, InitialWeights { file: file.clone(), sha256, steps }))
                }
            };
            let start = from.as_ref().map(|(model, _)| model);
            let model = network(&args, start)?;
            let config = settings(&args, start)?;
            let started = match from {
                None => Trainer::create(&args.out, config, model),
                Some((from, init)) => Trainer::create_from(
                    &args.out,
                    TrainConfig { init: Some(init), ..config },
                    model,
                    &from,
                ),
            };
            started.with_context(|| format!("starting a run in {}", args.out.display()))?
        };
        let bar = progress_bar(trainer.config.steps, "training");
        bar.set_position(trainer.step());
        let (mut peak, mut speed) = (f64::NAN, String::new());
        trainer.run(|event| match event {
            Event::Started {
                step,
                params,
                charset,
                split: [train, valid, test],
                matmul_peak_gflops,
            } => {
                peak = matmul_peak_gflops;
                say(
                    &bar,
                    format!(
                        "run {}: {params} parameters; corpus {train}/{valid}/{test} bytes \
                         train/valid/test, charset of {charset}; from step {step}; matmul peak \
                         {peak:.0} GFLOP/s (candle, 1024^3)",
                        args.out.display()
                    ),
                )
            }
            Event::Step { step, loss, lr, tokens_per_s, gflops } => {
                bar.set_position(step);
                speed = format!(
                    "{tokens_per_s:.0} tok/s, {gflops:.1} GFLOP/s = {:.0}% of matmul peak",
                    100.0 * gflops / peak
                );
                bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {speed}"));
            }
            Event::Eval(r) => {
                let words = r.quality.as_ref().map_or(String::new(), |q| {
                    format!("  words {:.1}%  entropy {:.2}", 100.0 * q.word_rate, q.char_entropy)
                });
                say(
                    &bar,
                    format!(
                        "step {:>7}  train {:.4}  val {:.4}{words}  {:.0}s  {speed}",
                        r.step, r.train_loss, r.val_loss, r.seconds
                    ),
                );
                for s in &r.samples {
                    say(&bar, format!("  ➜ {s}"));
                }
            }
            Event::Checkpoint { .. } => {}
        })?;
        bar.finish_and_clear();
        eprintln!("done: {} steps in {}", trainer.step(), args.out.display());
        Ok(())
    }
}
