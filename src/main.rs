//! `chardiff`: train, export and sample character-level bit-diffusion language models.
//! Thin: parse flags, call the crates, report errors with context.

use anyhow::{Context, Result};
use chardiff_runtime::sampler::{sample, SamplerConfig, StepRule};
use chardiff_runtime::tract::TractDenoiser;
use chardiff_runtime::Denoiser;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

// Tensor code allocates and frees large buffers at every op; glibc returns them to the OS and
// page-faults them back in (~15% of a training step measured), mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The model `chardiff sample` uses when no --model is given.
const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/default.onnx");

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
    /// Export a training run to one self-describing ONNX file.
    #[cfg(feature = "train")]
    Export {
        /// The run directory written by `chardiff train`.
        run: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Sample text from an exported model (tract).
    Sample(SampleArgs),
}

#[derive(clap::Args)]
struct SampleArgs {
    /// The exported model [default: the shipped models/default.onnx].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Number of samples.
    #[arg(short = 'n', long, default_value_t = 8)]
    n: usize,
    /// Denoising steps [default: the model's recommendation].
    #[arg(long)]
    steps: Option<usize>,
    /// Asymmetric time delta in steps [default: the model's recommendation].
    #[arg(long)]
    td: Option<f32>,
    /// Step rule: ddim or ddpm.
    #[arg(long, default_value = "ddim", value_parser = enum_arg::<StepRule>)]
    sampler: StepRule,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Parses a lower-case enum value with the type's own serde names, so CLI and files agree.
fn enum_arg<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_lowercase())).map_err(|e| e.to_string())
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        #[cfg(feature = "train")]
        Command::Train(args) => train::run(*args),
        #[cfg(feature = "train")]
        Command::Export { run, out } => export(run, out),
        Command::Sample(args) => run_sample(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_sample(args: SampleArgs) -> Result<()> {
    let path = args.model.unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL));
    let mut net =
        TractDenoiser::load(&path).with_context(|| format!("loading model {}", path.display()))?;
    let spec = net.spec().clone();
    let config = SamplerConfig {
        steps: args.steps.unwrap_or(spec.recommended_steps),
        td: args.td.unwrap_or(spec.recommended_td),
        rule: args.sampler,
        seed: args.seed,
    };
    let bar = progress_bar(config.steps as u64, "denoising");
    let texts = sample(&mut net, &config, args.n, None, |i, _| {
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();
    for text in texts {
        println!("➜ {}", String::from_utf8_lossy(&text));
    }
    Ok(())
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
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

#[cfg(feature = "train")]
fn export(run: PathBuf, out: PathBuf) -> Result<()> {
    let summary = chardiff_export::export_run(&run, &out)
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
mod train {
    use super::{enum_arg, progress_bar, say};
    use anyhow::{Context, Result};
    use chardiff_runtime::{BitCode, Head, Schedule};
    use chardiff_train::corpus::Preprocess;
    use chardiff_train::{
        Activation, Event, Loss, ModelConfig, SelfCondUnit, TrainConfig, Trainer,
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
        /// Cleaning: none, or reference (the reference implementation's, for comparable numbers).
        #[arg(long, default_value = "none", value_parser = enum_arg::<Preprocess>)]
        preprocess: Preprocess,
        #[arg(long)]
        steps: Option<u64>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Characters per window.
        #[arg(long, default_value_t = 96)]
        window: usize,
        #[arg(long, default_value_t = 256)]
        dim: usize,
        #[arg(long, default_value_t = 4)]
        layers: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        /// MLP width [default: 4 x dim].
        #[arg(long)]
        ffn: Option<usize>,
        /// gelu (tanh approximation) or silu.
        #[arg(long, default_value = "gelu", value_parser = enum_arg::<Activation>)]
        activation: Activation,
        /// Output head: softmax (over the corpus charset) or bits.
        #[arg(long, default_value = "softmax", value_parser = enum_arg::<Head>)]
        head: Head,
        /// mse (x0) or xent (softmax head only).
        #[arg(long, default_value = "mse", value_parser = enum_arg::<Loss>)]
        loss: Loss,
        /// binary or gray.
        #[arg(long, default_value = "binary", value_parser = enum_arg::<BitCode>)]
        code: BitCode,
        #[arg(long, default_value_t = 1.0)]
        bit_scale: f32,
        /// cosine, sqrt or linear.
        #[arg(long, default_value = "cosine", value_parser = enum_arg::<Schedule>)]
        schedule: Schedule,
        /// Train without self-conditioning.
        #[arg(long)]
        no_self_cond: bool,
        #[arg(long, default_value_t = 0.5)]
        self_cond_rate: f64,
        /// batch or example: what one self-conditioning coin decides.
        #[arg(long, default_value = "batch", value_parser = enum_arg::<SelfCondUnit>)]
        self_cond_unit: SelfCondUnit,
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

    pub fn run(args: TrainArgs) -> Result<()> {
        let mut trainer = if args.resume {
            Trainer::resume(&args.out, args.steps)
                .with_context(|| format!("resuming {}", args.out.display()))?
        } else {
            let model = ModelConfig {
                dim: args.dim,
                layers: args.layers,
                heads: args.heads,
                ffn: args.ffn.unwrap_or(4 * args.dim),
                activation: args.activation,
            };
            let config = TrainConfig {
                corpus: args.corpus.clone().unwrap_or_default(),
                preprocess: args.preprocess,
                window: args.window,
                code: args.code,
                bit_scale: args.bit_scale,
                schedule: args.schedule,
                head: args.head,
                loss: args.loss,
                self_conditioning: !args.no_self_cond,
                self_cond_rate: args.self_cond_rate,
                self_cond_unit: args.self_cond_unit,
                conditioning: !args.no_conditioning,
                steps: args.steps.unwrap_or(TrainConfig::default().steps),
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
                ..TrainConfig::default()
            };
            Trainer::create(&args.out, config, model)
                .with_context(|| format!("starting a run in {}", args.out.display()))?
        };
        let bar = progress_bar(trainer.config.steps, "training");
        bar.set_position(trainer.step());
        trainer.run(|event| match event {
            Event::Started { step, params, charset, split: [train, valid, test] } => say(
                &bar,
                format!(
                    "run {}: {params} parameters; corpus {train}/{valid}/{test} bytes \
                     train/valid/test, charset of {charset}; from step {step}",
                    args.out.display()
                ),
            ),
            Event::Step {
                step,
                loss,
                lr,
                tokens_per_s,
            } => {
                bar.set_position(step);
                bar.set_message(format!(
                    "loss {loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
                ));
            }
            Event::Eval(r) => {
                say(
                    &bar,
                    format!(
                        "step {:>7}  train {:.4}  val {:.4}  {:.0}s",
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
