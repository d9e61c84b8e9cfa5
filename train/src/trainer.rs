//! Training: x0-prediction loss with self-conditioning (and span conditioning for conditional
//! models), AdamW with warm-up and cosine decay, EMA, validation, samples and checkpoints.

use crate::candle::{matmul_peak_gflops, CandleDenoiser, CandleOps, Frozen, ParamSource, Params};
use crate::checkpoint::{
    self, Checkpoint, CheckpointError, TrainedModel, ADAM_M, ADAM_V, EMA, PARAMS,
};
use crate::model::{self, ModelConfig};
use crate::optim::{AdamW, AdamWConfig, Ema};
use candle_core::{DType, Device, Tensor, D};
use chardiff_runtime::corpus::{spaced_windows, Corpus, CorpusError, Preprocess};
use chardiff_runtime::files::write_atomic;
use chardiff_runtime::metrics::{quality, vocabulary, Quality};
use chardiff_runtime::sampler::{sample, GuidedOutput, SamplerConfig, StepRule};
use chardiff_runtime::schedule::noised;
use chardiff_runtime::spec::{serde_name, Precision, Provenance, FORMAT_VERSION};
use chardiff_runtime::{BitCode, Charset, Head, ModelSpec, Schedule, BITS};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Loss {
    /// Mean squared error of the x0 prediction (the paper's "simple" loss).
    Mse,
    /// Cross-entropy of the softmax head's logits against the true character.
    Xent,
}

/// Which unit the self-conditioning coin is thrown for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SelfCondUnit {
    Batch,
    Example,
}

/// How training draws the diffusion time t of each example. Validation always draws uniformly,
/// so validation losses compare between runs of any time sampling.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TimeSampling {
    /// t ~ U(0, 1): every noise level weighted equally.
    #[default]
    Uniform,
    /// t = sigmoid(mean + std * N(0, 1)) (as in Stable Diffusion 3): fewer steps spent near
    /// t = 0 (almost clean: nothing to learn) and t = 1 (pure noise: only the unigram prior).
    LogitNormal { mean: f64, std: f64 },
}

impl TimeSampling {
    /// One draw of t in [0, 1); the uniform draw consumes the stream as runs before this option did.
    fn draw(self, rng: &mut impl Rng) -> f32 {
        match self {
            TimeSampling::Uniform => rng.random::<f32>(),
            TimeSampling::LogitNormal { mean, std } => {
                let z: f64 = rng.sample(StandardNormal);
                let t = 1.0 / (1.0 + (-(mean + std * z)).exp());
                (t as f32).min(1.0 - f32::EPSILON)
            }
        }
    }
}

/// Windows per validation batch: the mean over random times t varies a lot between small sets,
/// so the validation set must not shrink with the training batch (32: the default's batch, whose
/// runs keep their validation set).
pub const VALIDATION_BATCH: usize = 32;

/// Everything that decides a run; saved as `train.json` so a resumed run continues the same one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub corpus: PathBuf,
    pub preprocess: Preprocess,
    pub window: usize,
    pub code: BitCode,
    pub bit_scale: f32,
    pub schedule: Schedule,
    pub head: Head,
    pub loss: Loss,
    pub self_conditioning: bool,
    /// Probability that the self-conditioning pass is used.
    pub self_cond_rate: f64,
    pub self_cond_unit: SelfCondUnit,
    /// How training batches draw t (absent in runs made before the option: uniform).
    #[serde(default)]
    pub time_sampling: TimeSampling,
    /// Train with `cond`/`cond_mask` inputs on random prefixes, suffixes and spans.
    pub conditioning: bool,
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup: u64,
    /// Final learning rate as a fraction of `lr` at the end of the cosine decay.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub clip_norm: f64,
    pub ema_decay: f64,
    pub seed: u64,
    pub eval_every: u64,
    pub checkpoint_every: u64,
    /// Validation batches of `VALIDATION_BATCH` windows, whatever the training batch size.
    pub val_batches: usize,
    /// Samples drawn (with the EMA weights) at every evaluation.
    pub eval_samples: usize,
    pub sample_steps: usize,
    pub sample_td: f32,
    /// The model file the run's weights started from (`Trainer::create_from`); None: random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitialWeights>,
}

/// Where a run that did not start from random weights got them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InitialWeights {
    pub file: PathBuf,
    pub sha256: String,
    /// The training steps behind the file (its provenance, which counts those behind its own
    /// starting file): the run's model records them plus its own. Runs from before this field: 0.
    #[serde(default)]
    pub steps: u64,
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            corpus: PathBuf::new(),
            preprocess: Preprocess::None,
            window: 96,
            code: BitCode::Binary,
            bit_scale: 1.0,
            schedule: Schedule::Cosine,
            head: Head::Softmax,
            loss: Loss::Mse,
            self_conditioning: true,
            self_cond_rate: 0.5,
            self_cond_unit: SelfCondUnit::Batch,
            time_sampling: TimeSampling::Uniform,
            conditioning: true,
            steps: 1000,
            batch: 64,
            lr: 1e-3,
            warmup: 100,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            clip_norm: 1.0,
            ema_decay: 0.999,
            seed: 0,
            eval_every: 100,
            checkpoint_every: 100,
            val_batches: 4,
            eval_samples: 2,
            sample_steps: 100,
            sample_td: 1.0,
            init: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self, model: &ModelConfig) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        model.validate().map_err(TrainError::Config)?;
        if self.window == 0 || self.batch == 0 || self.steps == 0 {
            return bad("window, batch and steps must be at least 1".into());
        }
        if self.loss == Loss::Xent && self.head != Head::Softmax {
            return bad("the cross-entropy loss needs the softmax head (--head softmax)".into());
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.lr) || !positive(f64::from(self.bit_scale)) {
            return bad("lr and bit scale must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.self_cond_rate) || !(0.0..1.0).contains(&self.ema_decay) {
            return bad("self-conditioning rate must be in [0, 1] and EMA decay in [0, 1)".into());
        }
        if let TimeSampling::LogitNormal { mean, std } = self.time_sampling {
            if !mean.is_finite() || !positive(std) {
                return bad(
                    "the logit-normal time sampling needs a finite mean and a positive std".into(),
                );
            }
        }
        if self.eval_every == 0 || self.checkpoint_every == 0 || self.val_batches == 0 {
            return bad(
                "eval and checkpoint intervals and validation batches must be at least 1".into()
            );
        }
        Ok(())
    }

    fn learning_rate(&self, step: u64) -> f64 {
        let warm = ((step + 1) as f64 / self.warmup.max(1) as f64).min(1.0);
        let progress = step as f64 / self.steps.max(1) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos());
        self.lr * warm * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training settings: {0}")]
    Config(String),
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{0} already holds a training run: resume it with --resume, or choose another --out")]
    Exists(PathBuf),
    #[error("another `chardiff train` is working in {0}: stop it first (a run started in the background with nohup ignores Ctrl-C and SIGINT; SIGTERM stops it, and --resume continues from its last checkpoint)")]
    Busy(PathBuf),
    #[error("training diverged at step {step}: {what}. The last good checkpoint is kept; lower --lr or raise --warmup and resume")]
    Diverged { step: u64, what: String },
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// What the trainer reports while it runs.
pub enum Event<'a> {
    Started {
        step: u64,
        params: usize,
        charset: usize,
        /// Bytes in the train, valid and test splits.
        split: [usize; 3],
        /// candle's f32 matrix-product speed here (`candle::matmul_peak_gflops`).
        matmul_peak_gflops: f64,
    },
    Step {
        step: u64,
        loss: f64,
        lr: f64,
        tokens_per_s: f64,
        /// Arithmetic rate of the matrix products since this call started
        /// (`ModelConfig::forward_flops`, three passes per step plus the self-conditioning pass
        /// when it runs, on average).
        gflops: f64,
    },
    Eval(&'a EvalRecord),
    Checkpoint {
        step: u64,
    },
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub train_loss: f64,
    pub val_loss: f64,
    pub seconds: f64,
    pub tokens: u64,
    pub samples: Vec<String>,
    /// `metrics::quality` of the samples against the train split (absent without samples).
    pub quality: Option<Quality>,
}

/// One training or validation batch, all as tensors of the working dtype.
pub(crate) struct Batch {
    pub(crate) x0: Tensor,
    pub(crate) x_t: Tensor,
    pub(crate) t: Tensor,
    /// `cond`, `cond_mask` for conditional models.
    pub(crate) condition: Option<(Tensor, Tensor)>,
    /// [B, L, 1]: 1 where the loss counts (the unknown characters).
    weight: Tensor,
    /// [B, L, 1] charset indices of the true characters (cross-entropy).
    targets: Tensor,
    /// [B, 1, 1]: which examples get the self-conditioning pass; None: none do.
    self_cond: Option<Tensor>,
}

pub struct Trainer {
    pub dir: PathBuf,
    pub config: TrainConfig,
    pub model: ModelConfig,
    pub spec: ModelSpec,
    corpus: Corpus,
    dtype: DType,
    params: Params,
    optim: AdamW,
    ema: Ema,
    rng: ChaCha8Rng,
    val: Vec<Batch>,
    /// Words of the train split, for the samples' word rate.
    vocabulary: HashSet<String>,
    seconds: f64,
    /// Held while this trainer works in `dir` (`lock_run`).
    _lock: std::fs::File,
}

impl Trainer {
    /// Starts a new run in `dir`.
    pub fn create(
        dir: &Path,
        config: TrainConfig,
        model: ModelConfig,
    ) -> Result<Trainer, TrainError> {
        Trainer::create_with_dtype(dir, config, model, DType::F32)
    }

    pub fn create_with_dtype(
        dir: &Path,
        config: TrainConfig,
        model: ModelConfig,
        dtype: DType,
    ) -> Result<Trainer, TrainError> {
        Trainer::start(dir, config, model, dtype, None)
    }

    /// Starts a new run in `dir` from the weights of a trained model (a fresh optimizer and
    /// schedule): longer training of a shipped model, or fine-tuning it on another corpus with
    /// the same characters. `model` is the model's network, or that network grown deeper (its
    /// new blocks start as the identity, `starting_params`). `config.init` should name the
    /// model's file.
    pub fn create_from(
        dir: &Path,
        config: TrainConfig,
        model: ModelConfig,
        from: &TrainedModel,
    ) -> Result<Trainer, TrainError> {
        let deeper = ModelConfig { layers: model.layers, ..from.config.clone() };
        if model != deeper || model.layers < from.config.layers {
            return Err(TrainError::Config(format!(
                "a run continues a model with its network, or that network with more layers \
                 ({model:?} from {:?})",
                from.config
            )));
        }
        Trainer::start(dir, config, model, DType::F32, Some(from))
    }

    fn start(
        dir: &Path,
        config: TrainConfig,
        model: ModelConfig,
        dtype: DType,
        from: Option<&TrainedModel>,
    ) -> Result<Trainer, TrainError> {
        config.validate(&model)?;
        if dir.join(checkpoint::CHECKPOINT_FILE).exists() {
            return Err(TrainError::Exists(dir.to_path_buf()));
        }
        let corpus = Corpus::load(&config.corpus, config.preprocess, config.window)?;
        let spec = ModelSpec {
            format_version: FORMAT_VERSION,
            window: config.window,
            bits: BITS,
            bit_scale: config.bit_scale,
            code: config.code,
            charset: corpus.charset.clone(),
            schedule: config.schedule,
            self_conditioning: config.self_conditioning,
            conditioning: config.conditioning,
            head: config.head,
            recommended_steps: config.sample_steps,
            recommended_td: config.sample_td,
            recommended_free_td: None,
            recommended_sampler: StepRule::Ddim,
            recommended_guidance: 1.0,
            recommended_self_guidance: 1.0,
            recommended_temperature: 1.0,
            recommended_refine: 0,
            recommended_self_guidance_on: GuidedOutput::X0,
            recommended_warp: 1.0,
            provenance: Provenance {
                corpus: corpus.name.clone(),
                corpus_sha256: corpus.sha256.clone(),
                steps: 0,
                date: today(),
                loss: Some(serde_name(config.loss)),
            },
            precision: Precision::F32,
        };
        let mut params = Params::initialized(config.seed, dtype, &model, &spec)?;
        if let Some(from) = from {
            params = starting_params(&params, &spec, from)?;
        }
        let optim = AdamW::new(adam_config(&config), &params)?;
        let ema = Ema::new(config.ema_decay, &params)?;
        let lock = lock_run(dir)?;
        checkpoint::write_json(&dir.join(checkpoint::MODEL_FILE), &model)?;
        checkpoint::write_json(&dir.join(checkpoint::TRAIN_FILE), &config)?;
        let calibration = dir.join(crate::calibrate::CALIBRATION_FILE);
        write_atomic(&calibration, &calibration_sample(&corpus.train))
            .map_err(|source| CheckpointError::Io { path: calibration, source })?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut trainer = Trainer {
            dir: dir.to_path_buf(),
            val: Vec::new(),
            vocabulary: HashSet::new(),
            config,
            model,
            spec,
            corpus,
            dtype,
            params,
            optim,
            ema,
            rng,
            seconds: 0.0,
            _lock: lock,
        };
        trainer.val = trainer.validation_batches()?;
        trainer.vocabulary = vocabulary(&String::from_utf8_lossy(&trainer.corpus.train));
        trainer.save()?;
        Ok(trainer)
    }

    /// Continues the run saved in `dir`; `steps` may extend it.
    pub fn resume(dir: &Path, steps: Option<u64>) -> Result<Trainer, TrainError> {
        let mut config: TrainConfig = checkpoint::read_json(dir, checkpoint::TRAIN_FILE)?;
        let model: ModelConfig = checkpoint::read_json(dir, checkpoint::MODEL_FILE)?;
        let spec: ModelSpec = checkpoint::read_json(dir, checkpoint::SPEC_FILE)?;
        let lock = lock_run(dir)?;
        let rescheduled = steps.is_some_and(|steps| steps != config.steps);
        if let Some(steps) = steps {
            config.steps = steps;
        }
        config.validate(&model)?;
        let corpus = Corpus::load(&config.corpus, config.preprocess, config.window)?;
        if corpus.sha256 != spec.provenance.corpus_sha256 {
            return Err(TrainError::Config(format!(
                "the corpus {} has changed since the run started (sha256 differs)",
                config.corpus.display()
            )));
        }
        let saved = Checkpoint::load(dir)?;
        let meta = |key: &str| -> Result<String, TrainError> {
            saved.metadata.get(key).cloned().ok_or_else(|| {
                TrainError::Config(format!("the checkpoint lacks its `{key}` entry"))
            })
        };
        let number = |key: &str| -> Result<u128, TrainError> {
            meta(key)?.parse().map_err(|_| TrainError::Config(format!("bad `{key}` in checkpoint")))
        };
        let params = Params::from_tensors(&saved.group(PARAMS))?;
        let dtype = params.vars().values().next().map_or(DType::F32, |v| v.dtype());
        let mut optim = AdamW::new(adam_config(&config), &params)?;
        optim.step = number("step")? as u64;
        optim.m = saved.group(ADAM_M);
        optim.v = saved.group(ADAM_V);
        let ema = Ema { target: config.ema_decay, weights: saved.group(EMA) };
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_word_pos(number("rng_word_pos")?);
        let seconds = meta("seconds")?.parse().unwrap_or(0.0);
        let mut trainer = Trainer {
            dir: dir.to_path_buf(),
            val: Vec::new(),
            vocabulary: HashSet::new(),
            config,
            model,
            spec,
            corpus,
            dtype,
            params,
            optim,
            ema,
            rng,
            seconds,
            _lock: lock,
        };
        trainer.val = trainer.validation_batches()?;
        trainer.vocabulary = vocabulary(&String::from_utf8_lossy(&trainer.corpus.train));
        if rescheduled {
            // The new length is the run's from now on: a later --resume without --steps keeps it.
            checkpoint::write_json(&dir.join(checkpoint::TRAIN_FILE), &trainer.config)?;
        }
        Ok(trainer)
    }

    pub fn step(&self) -> u64 {
        self.optim.step
    }

    pub fn parameter_count(&self) -> usize {
        self.params.vars().values().map(|v| v.elem_count()).sum()
    }

    /// The EMA weights as a sampler's denoiser.
    pub fn denoiser(&self) -> CandleDenoiser {
        CandleDenoiser {
            spec: self.spec.clone(),
            config: self.model.clone(),
            weights: self.ema.weights.clone(),
        }
    }

    /// Trains until `config.steps`, checkpointing and evaluating on the way.
    pub fn run(&mut self, on_event: impl FnMut(Event<'_>)) -> Result<(), TrainError> {
        self.run_until(self.config.steps, on_event)
    }

    /// Matrix-product FLOPs of one training step on average: forward and backward (three
    /// forward passes' worth) for every sequence, and the self-conditioning pass when it runs.
    fn flops_per_step(&self) -> f64 {
        let (batch, rate) = (self.config.batch, self.config.self_cond_rate);
        let self_cond = match (self.config.self_conditioning, self.config.self_cond_unit) {
            (false, _) => 0.0,
            (true, SelfCondUnit::Batch) => rate,
            (true, SelfCondUnit::Example) => 1.0 - (1.0 - rate).powi(batch as i32),
        };
        let forward = self.model.forward_flops(&self.spec) as f64 * batch as f64;
        forward * (3.0 + self_cond)
    }

    /// Trains until step `stop` (at most `config.steps`) and checkpoints there; the schedule
    /// stays that of the whole run, so stopping and resuming changes nothing.
    pub fn run_until(
        &mut self,
        stop: u64,
        mut on_event: impl FnMut(Event<'_>),
    ) -> Result<(), TrainError> {
        let stop = stop.min(self.config.steps);
        on_event(Event::Started {
            step: self.step(),
            params: self.parameter_count(),
            charset: self.spec.charset.len(),
            split: [self.corpus.train.len(), self.corpus.valid.len(), self.corpus.test.len()],
            matmul_peak_gflops: matmul_peak_gflops(1024, 20)?,
        });
        let tokens_per_step = (self.config.batch * self.config.window) as f64;
        let (mut loss_sum, mut loss_count) = (0.0, 0u64);
        let (mut steps_done, mut seconds) = (0u64, 0.0);
        while self.step() < stop {
            let started = Instant::now();
            let (loss, lr) = self.train_step()?;
            let elapsed = started.elapsed().as_secs_f64();
            (steps_done, seconds) = (steps_done + 1, seconds + elapsed);
            loss_sum += loss;
            loss_count += 1;
            let step = self.step();
            let gflops = self.flops_per_step() * steps_done as f64 / seconds / 1e9;
            let tokens_per_s = tokens_per_step / elapsed;
            on_event(Event::Step { step, loss, lr, tokens_per_s, gflops });
            let last = step == stop;
            if step.is_multiple_of(self.config.eval_every) || last {
                let record = self.evaluate(loss_sum / loss_count as f64)?;
                on_event(Event::Eval(&record));
                (loss_sum, loss_count) = (0.0, 0);
            }
            if step.is_multiple_of(self.config.checkpoint_every) || last {
                self.save()?;
                on_event(Event::Checkpoint { step });
            }
        }
        Ok(())
    }

    /// One optimizer step on a fresh batch (and the EMA update); returns the loss and the
    /// learning rate used. A non-finite loss or gradient stops with `Diverged`, changing nothing.
    pub fn train_step(&mut self) -> Result<(f64, f64), TrainError> {
        // On one of rayon's workers: the step's parallel kernels then run on the thread that
        // issues them and the pool's other worker, instead of waking the pool and putting this
        // thread to sleep for each of them.
        rayon::scope(|_| self.train_step_here())
    }

    fn train_step_here(&mut self) -> Result<(f64, f64), TrainError> {
        let started = Instant::now();
        let step = self.step();
        let batch = self.training_batch()?;
        let loss = batch_loss(&self.spec, &self.model, self.config.loss, &mut self.params, &batch)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let diverged = |what: String| TrainError::Diverged { step: step + 1, what };
        if !value.is_finite() {
            return Err(diverged(format!("loss is {value}")));
        }
        let grads = loss.backward()?;
        let lr = self.config.learning_rate(step);
        self.optim.update(&self.params, &grads, lr).map_err(|e| diverged(e.to_string()))?;
        self.ema.update(self.step(), &self.params)?;
        self.seconds += started.elapsed().as_secs_f64();
        Ok((value, lr))
    }

    /// Validation loss of the EMA weights, a few samples, one line in metrics.jsonl.
    pub fn evaluate(&mut self, train_loss: f64) -> Result<EvalRecord, TrainError> {
        let mut total = 0.0;
        for i in 0..self.val.len() {
            let weights = &mut Frozen(&self.ema.weights);
            let loss =
                batch_loss(&self.spec, &self.model, self.config.loss, weights, &self.val[i])?;
            total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        let mut samples = vec![];
        if self.config.eval_samples > 0 {
            let sampler = SamplerConfig::new(
                self.config.sample_steps,
                self.config.sample_td,
                self.spec.recommended_sampler,
                0,
            );
            let mut net = self.denoiser();
            samples = sample(&mut net, &sampler, self.config.eval_samples, None, |_, _| {})
                .map_err(|e| TrainError::Config(format!("sampling failed: {e}")))?;
        }
        let quality = (!samples.is_empty())
            .then(|| quality(&samples, &self.vocabulary, &self.corpus.charset));
        let samples = samples.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect();
        let record = EvalRecord {
            step: self.step(),
            train_loss,
            val_loss: total / self.val.len() as f64,
            seconds: self.seconds,
            tokens: self.step() * (self.config.batch * self.config.window) as u64,
            samples,
            quality,
        };
        let path = self.dir.join(checkpoint::METRICS_FILE);
        let line = serde_json::to_string(&record).expect("records serialize");
        let io = |source| CheckpointError::Io { path: path.clone(), source };
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
        writeln!(file, "{line}").map_err(io)?;
        crate::curves::write_curves(&self.dir)?;
        Ok(record)
    }

    /// Saves the spec and the full training state.
    pub fn save(&mut self) -> Result<(), TrainError> {
        let before = self.config.init.as_ref().map_or(0, |init| init.steps);
        self.spec.provenance.steps = before + self.step();
        // Runs started before the loss was recorded get it at their next checkpoint.
        self.spec.provenance.loss = Some(serde_name(self.config.loss));
        let mut tensors = std::collections::BTreeMap::new();
        for (name, var) in self.params.vars() {
            tensors.insert(format!("{PARAMS}{name}"), var.as_tensor().clone());
        }
        for (prefix, group) in
            [(EMA, &self.ema.weights), (ADAM_M, &self.optim.m), (ADAM_V, &self.optim.v)]
        {
            for (name, t) in group {
                tensors.insert(format!("{prefix}{name}"), t.clone());
            }
        }
        let metadata = HashMap::from([
            ("step".to_string(), self.step().to_string()),
            ("rng_word_pos".to_string(), self.rng.get_word_pos().to_string()),
            ("seconds".to_string(), self.seconds.to_string()),
        ]);
        Checkpoint { tensors, metadata }.save(&self.dir)?;
        checkpoint::write_json(&self.dir.join(checkpoint::SPEC_FILE), &self.spec)?;
        Ok(())
    }

    fn training_batch(&mut self) -> Result<Batch, TrainError> {
        let text = random_windows(
            &self.corpus.train,
            self.config.window,
            self.config.batch,
            &mut self.rng,
        );
        let self_cond = if !self.spec.self_conditioning {
            vec![false; self.config.batch]
        } else {
            match self.config.self_cond_unit {
                SelfCondUnit::Batch => {
                    vec![self.rng.random_bool(self.config.self_cond_rate); self.config.batch]
                }
                SelfCondUnit::Example => (0..self.config.batch)
                    .map(|_| self.rng.random_bool(self.config.self_cond_rate))
                    .collect(),
            }
        };
        let times = self.config.time_sampling;
        make_batch(&self.spec, &text, &self_cond, times, self.dtype, &mut self.rng)
    }

    /// Fixed validation batches: same windows, times, noise and conditions at every evaluation
    /// and for every training batch size, so runs of different batch sizes compare; self-
    /// conditioned like sampling.
    fn validation_batches(&self) -> Result<Vec<Batch>, TrainError> {
        let mut rng = ChaCha8Rng::seed_from_u64(0x005e_ed0f_7a11);
        let (window, batch) = (self.config.window, VALIDATION_BATCH);
        let self_cond = vec![self.spec.self_conditioning; batch];
        (0..self.config.val_batches)
            .map(|_| {
                let text = random_windows(&self.corpus.valid, window, batch, &mut rng);
                make_batch(
                    &self.spec,
                    &text,
                    &self_cond,
                    TimeSampling::Uniform,
                    self.dtype,
                    &mut rng,
                )
            })
            .collect()
    }
}

/// The training objective on one batch: optional self-conditioning pass (no gradient), then the
/// x0 loss over the unknown characters.
fn batch_loss(
    spec: &ModelSpec,
    model: &ModelConfig,
    loss: Loss,
    params: &mut dyn ParamSource,
    batch: &Batch,
) -> Result<Tensor, TrainError> {
    let b = spec.bit_scale as f64;
    let mut ops = CandleOps::new(params, batch.x0.dtype());
    let zeros = batch.x0.zeros_like()?;
    let inputs = |x_self: Tensor| model::Inputs {
        x_t: batch.x_t.clone(),
        x_self,
        t: batch.t.clone(),
        condition: batch.condition.clone(),
    };
    let x_self = match &batch.self_cond {
        Some(mask) => {
            let first = model::forward(&mut ops, model, spec, inputs(zeros))?;
            first.x0.detach().clamp(-b, b)?.broadcast_mul(mask)?
        }
        None => zeros,
    };
    let out = model::forward(&mut ops, model, spec, inputs(x_self))?;
    let counted = batch.weight.sum_all()?;
    let loss = match (loss, &out.logits) {
        (Loss::Xent, Some(logits)) => {
            let logp = log_softmax(logits)?;
            let picked = logp.gather(&batch.targets, D::Minus1)?;
            (picked.broadcast_mul(&batch.weight)?.sum_all()?.neg()? / counted)?
        }
        _ => {
            let sq = (out.x0 - &batch.x0)?.sqr()?.broadcast_mul(&batch.weight)?.sum_all()?;
            (sq / (counted * spec.bits as f64)?)?
        }
    };
    Ok(loss)
}

/// Differentiable log-softmax over the last axis from basic ops.
fn log_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

fn adam_config(config: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: config.weight_decay,
        clip_norm: config.clip_norm,
    }
}

/// Noises a batch of windows: t drawn by `times`, x_t = sqrt(g) x0 + sqrt(1 - g) eps; for conditional
/// models also draws which characters are known.
pub(crate) fn make_batch(
    spec: &ModelSpec,
    text: &[u8],
    self_cond: &[bool],
    times: TimeSampling,
    dtype: DType,
    rng: &mut ChaCha8Rng,
) -> Result<Batch, TrainError> {
    let (l, k, n) = (spec.window, spec.bits, self_cond.len());
    let x0 = spec.analog_bits().encode(text);
    let t: Vec<f32> = (0..n).map(|_| times.draw(rng)).collect();
    let mut x_t = vec![0.0f32; x0.len()];
    for (i, (x, clean)) in x_t.chunks_exact_mut(l * k).zip(x0.chunks_exact(l * k)).enumerate() {
        let g = spec.schedule.gamma(f64::from(t[i])) as f32;
        for (x, c) in x.iter_mut().zip(clean) {
            *x = noised(*c, rng.sample(StandardNormal), g);
        }
    }
    let known: Vec<f32> = if spec.conditioning {
        (0..n).flat_map(|_| known_positions(l, rng)).map(f32::from).collect()
    } else {
        vec![0.0; n * l]
    };
    let weight: Vec<f32> = known.iter().map(|m| 1.0 - m).collect();
    let targets: Vec<u32> =
        text.iter().map(|&c| spec.charset.index_of(c).map_or(0, |i| i as u32)).collect();
    let dev = &Device::Cpu;
    let tensor = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape, dev)?.to_dtype(dtype);
    let condition = if spec.conditioning {
        let cond: Vec<f32> = x0
            .chunks_exact(k)
            .zip(&known)
            .flat_map(|(bits, &m)| bits.iter().map(move |b| b * m))
            .collect();
        Some((tensor(cond, &[n, l, k])?, tensor(known.clone(), &[n, l, 1])?))
    } else {
        None
    };
    let self_cond = if self_cond.iter().any(|&s| s) {
        Some(tensor(self_cond.iter().map(|&s| f32::from(u8::from(s))).collect(), &[n, 1, 1])?)
    } else {
        None
    };
    Ok(Batch {
        x0: tensor(x0, &[n, l, k])?,
        x_t: tensor(x_t, &[n, l, k])?,
        t: tensor(t, &[n])?,
        condition,
        weight: tensor(weight, &[n, l, 1])?,
        targets: Tensor::from_vec(targets, &[n, l, 1], dev)?,
        self_cond,
    })
}

/// Which characters of one window are given to a conditional model: nothing, a prefix, a
/// suffix, one gap between a known prefix and a known suffix (an `--infill` template's shape,
/// which spans of up to a quarter window seldom make), or 1-5 random spans (known spans, or
/// everything but the spans). Never everything.
pub fn known_positions(l: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut known = vec![0u8; l];
    if l < 2 {
        return known;
    }
    match rng.random_range(0..5) {
        0 => {}
        1 => known[..rng.random_range(1..l)].fill(1),
        2 => known[rng.random_range(1..l)..].fill(1),
        3 if l >= 3 => {
            let len = rng.random_range(1..=l - 2);
            let start = rng.random_range(1..l - len);
            known.fill(1);
            known[start..start + len].fill(0);
        }
        _ => {
            for _ in 0..rng.random_range(1..=5) {
                let len = rng.random_range(1..=(l / 4).max(1));
                let start = rng.random_range(0..=l - len);
                known[start..start + len].fill(1);
            }
            if rng.random_bool(0.5) {
                known.iter_mut().for_each(|m| *m = 1 - *m);
            }
            if known.iter().all(|&m| m == 1) {
                known[rng.random_range(0..l)] = 0;
            }
        }
    }
    known
}

/// The weights of `from` for the network of `fresh`, after checking that `from` reads and writes
/// characters the way this run's spec does.
fn starting_params(
    fresh: &Params,
    spec: &ModelSpec,
    from: &TrainedModel,
) -> Result<Params, TrainError> {
    let other = &from.spec;
    let differs = |what: &str, theirs: String, ours: String| {
        TrainError::Config(format!(
            "the starting model's {what}: {theirs}; this run's: {ours}. A run continues a model \
             only with the same {what}"
        ))
    };
    if other.charset != spec.charset {
        // Bytes of one set and not the other, escaped (a byte may be part of a UTF-8 sequence).
        let only = |a: &Charset, b: &Charset| -> String {
            let bytes = a.bytes().iter().filter(|&&x| !b.contains(x));
            bytes.flat_map(|x| x.escape_ascii()).map(char::from).collect()
        };
        return Err(differs(
            "characters",
            format!("{} byte values", other.charset.len()),
            format!(
                "{} (its corpus lacks \"{}\" and adds \"{}\")",
                spec.charset.len(),
                only(&other.charset, &spec.charset),
                only(&spec.charset, &other.charset)
            ),
        ));
    }
    let pairs = [
        ("window", other.window.to_string(), spec.window.to_string()),
        (
            "bit code",
            format!("{:?} x {}", other.code, other.bit_scale),
            format!("{:?} x {}", spec.code, spec.bit_scale),
        ),
        ("head", format!("{:?}", other.head), format!("{:?}", spec.head)),
        ("schedule", format!("{:?}", other.schedule), format!("{:?}", spec.schedule)),
        (
            "self-conditioning",
            other.self_conditioning.to_string(),
            spec.self_conditioning.to_string(),
        ),
        ("conditioning", other.conditioning.to_string(), spec.conditioning.to_string()),
    ];
    if let Some((what, theirs, ours)) = pairs.into_iter().find(|(_, a, b)| a != b) {
        return Err(differs(what, theirs, ours));
    }
    // Blocks past the starting model's (a run that grows it deeper) start as the identity:
    // zero output projections, so the grown network computes what the file's did, and fresh
    // weights inside, which learn once the projections have grown.
    let grown = |name: &str| {
        let block = name.strip_prefix("blocks.").and_then(|rest| rest.split('.').next());
        block.and_then(|i| i.parse::<usize>().ok()).is_some_and(|i| i >= from.config.layers)
    };
    let weights = fresh
        .vars()
        .iter()
        .map(|(name, var)| match from.weights.get(name) {
            Some(w) if w.dims() == var.dims() => Ok((name.clone(), w.to_dtype(var.dtype())?)),
            None if grown(name) => {
                let w = var.as_tensor();
                let identity = model::writes_residual(name);
                Ok((name.clone(), if identity { w.zeros_like()? } else { w.copy()? }))
            }
            _ => Err(TrainError::Config(format!(
                "the starting model has no weight `{name}` of shape {:?}: it is another network",
                var.dims()
            ))),
        })
        .collect::<Result<BTreeMap<_, _>, TrainError>>()?;
    Ok(Params::from_tensors(&weights)?)
}

/// Creates `dir` and takes its lock file, so that a second trainer in the same run (a resume
/// started while the run still goes) is refused instead of interleaving checkpoints. An OS file
/// lock: it goes with the process, however the process ends, so a killed run leaves none behind.
fn lock_run(dir: &Path) -> Result<std::fs::File, TrainError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(checkpoint::LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(TrainError::Busy(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(source)) => Err(io(&path)(source).into()),
    }
}

/// Today's date (UTC), YYYY-MM-DD, for provenance.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// What int8 export calibrates with by default: 64 KiB of the train split, in 1 KiB pieces
/// spread over all of it (bytes: a piece may cut a UTF-8 sequence).
fn calibration_sample(train: &[u8]) -> Vec<u8> {
    let piece = train.len().min(1024);
    spaced_windows(train, piece, 64).concat()
}

/// `batch` windows of `window` bytes, starts drawn uniformly with replacement, concatenated.
pub fn random_windows(data: &[u8], window: usize, batch: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(window * batch);
    for _ in 0..batch {
        let start = rng.random_range(0..=data.len() - window);
        out.extend_from_slice(&data[start..start + window]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_slices_of_the_data() {
        let data = b"0123456789";
        let w = random_windows(data, 4, 3, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(w.len(), 12);
        for chunk in w.chunks(4) {
            assert!(data.windows(4).any(|x| x == chunk));
        }
    }

    #[test]
    fn known_positions_never_cover_the_whole_window() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut kinds = std::collections::HashSet::new();
        for _ in 0..2000 {
            let k = known_positions(12, &mut rng);
            assert!(k.contains(&0));
            kinds.insert((k[0], k[11], k.iter().filter(|&&m| m == 1).count() == 0));
        }
        assert!(kinds.len() >= 4, "prefixes, suffixes, spans and nothing all occur: {kinds:?}");
        // Infills: one gap of at least half the window with known text on both sides.
        let infills = (0..2000)
            .map(|_| known_positions(12, &mut rng))
            .filter(|k| {
                let gap: Vec<usize> = (0..12).filter(|&i| k[i] == 0).collect();
                gap.len() >= 6
                    && gap[0] > 0
                    && gap[gap.len() - 1] - gap[0] == gap.len() - 1
                    && k[11] == 1
            })
            .count();
        assert!(infills > 100, "long infill gaps are drawn often: {infills} of 2000");
    }

    #[test]
    fn logit_normal_times_gather_around_the_middle() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let draw = |times: TimeSampling, rng: &mut ChaCha8Rng| -> Vec<f32> {
            (0..20_000).map(|_| times.draw(rng)).collect()
        };
        let share = |t: &[f32], lo: f32, hi: f32| {
            t.iter().filter(|&&x| (lo..hi).contains(&x)).count() as f64 / t.len() as f64
        };
        let uniform = draw(TimeSampling::Uniform, &mut rng);
        let centred = draw(TimeSampling::LogitNormal { mean: 0.0, std: 1.0 }, &mut rng);
        let shifted = draw(TimeSampling::LogitNormal { mean: 1.0, std: 1.0 }, &mut rng);
        for t in [&uniform, &centred, &shifted] {
            assert!(t.iter().all(|x| (0.0..1.0).contains(x)));
        }
        // P(|z| < 1) = 0.683 of logit-normal(0, 1) times lie in (sigmoid(-1), sigmoid(1)).
        let (lo, hi) = (0.268_941_4, 0.731_058_6);
        assert!((share(&uniform, lo, hi) - 0.462).abs() < 0.02);
        assert!((share(&centred, lo, hi) - 0.683).abs() < 0.02);
        let median = |t: &[f32]| {
            let mut t = t.to_vec();
            t.sort_by(f32::total_cmp);
            t[t.len() / 2]
        };
        assert!((median(&centred) - 0.5).abs() < 0.02);
        assert!((median(&shifted) - 0.731).abs() < 0.02, "a positive mean moves t toward noise");
    }

    #[test]
    fn runs_saved_before_time_sampling_load_as_uniform() {
        let mut json = serde_json::to_value(TrainConfig::default()).unwrap();
        json.as_object_mut().unwrap().remove("time_sampling");
        let config: TrainConfig = serde_json::from_value(json).unwrap();
        assert_eq!(config.time_sampling, TimeSampling::Uniform);
        let logit = TrainConfig {
            time_sampling: TimeSampling::LogitNormal { mean: 0.5, std: 1.2 },
            ..TrainConfig::default()
        };
        let back: TrainConfig =
            serde_json::from_str(&serde_json::to_string(&logit).unwrap()).unwrap();
        assert_eq!(back, logit);
    }
}
