//! THE denoising loop (Analog Bits, Algorithm 2 with asymmetric time intervals), generic over the
//! network: pure noise in, the decoded last x0 prediction out.

use crate::bits::mean_code;
use crate::denoiser::{BoxError, Condition, DenoiseInput, Denoiser};
use crate::schedule::noised;
use crate::spec::{Head, ModelSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepRule {
    /// Deterministic given the initial noise.
    #[default]
    Ddim,
    /// Ancestral: fresh noise at every step.
    Ddpm,
}

/// The network output self-guidance extrapolates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuidedOutput {
    /// The x0 estimate (any head; the only formula before 2026-12-04).
    #[default]
    X0,
    /// A softmax head's logits over the charset; x0 then follows at the temperature. With a
    /// temperature below 1 it keeps the entropy nearer real text's (BENCHMARKS.md).
    Logits,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    pub steps: usize,
    /// Asymmetric time delta in steps: the network is told a time td/T noisier than the state.
    pub td: f32,
    pub rule: StepRule,
    pub seed: u64,
    /// Classifier-free guidance weight for models trained with conditioning: each step's x0 is
    /// x0(uncond) + w (x0(cond) - x0(uncond)). 1 is plain conditioning; above 1 costs a second
    /// pass of the network per step (batched with the first) and leans harder on the known text.
    pub guidance: f32,
    /// How the steps' times are spaced (`step_time`): 1 evenly; below 1 more of them at middle
    /// noise levels, where the network does its work, and fewer near t = 0 and t = 1.
    pub warp: f32,
    /// Self-guidance weight for self-conditioned models: the network's output is
    /// blind + w (seeing - blind), seeing or not the previous step's x0 (which output:
    /// `self_guidance_on`). 1 is plain self-conditioning; above 1 costs a second pass of the
    /// network per step and leans harder on what the sampler has already worked out. Free
    /// samples only: on top of classifier-free guidance it made the words at a prompt's end far
    /// less real (BENCHMARKS.md), so with known characters it is off, as classifier-free
    /// guidance is without them.
    pub self_guidance: f32,
    /// What self-guidance extrapolates: x0, or a softmax head's logits.
    pub self_guidance_on: GuidedOutput,
    /// Softmax head only: x0 is the mean code under softmax(logits / temperature)
    /// (`bits::mean_code`). 1 is the network's own estimate; below 1 each position's
    /// distribution is sharper. Free samples only, like self-guidance (not measured with known
    /// characters, whose classifier-free guidance extrapolates x0).
    pub temperature: f32,
    /// Refinements for self-conditioned models: after each step's estimate, the network sees the
    /// same x_t again, self-conditioned on that estimate instead of the previous step's, this
    /// many times (one more pass each; the blind pass of self-guidance does not see x_self, so
    /// it runs once). Training conditions on an estimate made at the same x_t; more passes at
    /// the same step count buy the words that more steps buy, and lose the same variety
    /// (BENCHMARKS.md). Free samples only, like self-guidance.
    pub refine: usize,
}

impl SamplerConfig {
    /// Plain conditioning (guidance 1).
    pub fn new(steps: usize, td: f32, rule: StepRule, seed: u64) -> SamplerConfig {
        SamplerConfig {
            steps,
            td,
            rule,
            seed,
            guidance: 1.0,
            warp: 1.0,
            self_guidance: 1.0,
            self_guidance_on: GuidedOutput::X0,
            temperature: 1.0,
            refine: 0,
        }
    }

    /// The settings `spec` recommends for free samples or, when `conditional`, for samples with
    /// known characters.
    pub fn recommended(spec: &ModelSpec, seed: u64, conditional: bool) -> SamplerConfig {
        let free_td = spec.recommended_free_td.unwrap_or(spec.recommended_td);
        SamplerConfig {
            steps: spec.recommended_steps,
            td: if conditional { spec.recommended_td } else { free_td },
            rule: spec.recommended_sampler,
            seed,
            guidance: spec.recommended_guidance,
            warp: spec.recommended_warp,
            self_guidance: spec.recommended_self_guidance,
            self_guidance_on: spec.recommended_self_guidance_on,
            temperature: spec.recommended_temperature,
            refine: spec.recommended_refine,
        }
        .for_task(conditional)
    }

    /// These settings as `sample` runs them: classifier-free guidance steers only samples with
    /// known characters and self-guidance, temperature and refinements only free ones, so each
    /// reads 1 (refinements 0) where it does nothing.
    pub fn for_task(self, conditional: bool) -> SamplerConfig {
        SamplerConfig {
            guidance: if conditional { self.guidance } else { 1.0 },
            self_guidance: if conditional { 1.0 } else { self.self_guidance },
            temperature: if conditional { 1.0 } else { self.temperature },
            refine: if conditional { 0 } else { self.refine },
            ..self
        }
    }
}

/// The time of the sampling loop after `fraction` of its steps (0: t = 1, pure noise; 1: t = 0):
/// logit(t) = warp * logit(1 - fraction). Warp 1 spaces the times evenly; below 1 they crowd
/// around t = 1/2 (0.6: 47% of the steps between t = 0.35 and 0.65 instead of 30%, 2.5% below
/// t = 0.1 instead of 10%). Almost clean windows (small t) decode right without the network
/// and pure noise holds only the character frequencies, so those steps teach the state little.
pub fn step_time(fraction: f32, warp: f32) -> f32 {
    let u = fraction.clamp(0.0, 1.0);
    if warp == 1.0 || u == 0.0 || u == 1.0 {
        return 1.0 - u;
    }
    1.0 / (1.0 + (u / (1.0 - u)).powf(warp))
}

/// Its name in files and on the command line (the serde name).
impl std::fmt::Display for StepRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        f.write_str(name.as_str().ok_or(std::fmt::Error)?)
    }
}

/// "50 ddim steps, td 1", for reports.
impl std::fmt::Display for SamplerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} steps, td {}", self.steps, self.rule, self.td)?;
        if self.warp != 1.0 {
            write!(f, ", warp {}", self.warp)?;
        }
        if self.guidance != 1.0 {
            write!(f, ", guidance {}", self.guidance)?;
        }
        if self.self_guidance != 1.0 {
            write!(f, ", self-guidance {}", self.self_guidance)?;
            if self.self_guidance_on == GuidedOutput::Logits {
                write!(f, " on the logits")?;
            }
        }
        if self.temperature != 1.0 {
            write!(f, ", temperature {}", self.temperature)?;
        }
        match self.refine {
            0 => {}
            1 => write!(f, ", 1 refinement")?,
            n => write!(f, ", {n} refinements")?,
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("invalid sampler settings: {0}")]
    Config(String),
    #[error("the known characters do not fit: {0}")]
    Known(String),
    #[error("the denoiser failed: {0}")]
    Denoiser(#[source] BoxError),
}

/// How known characters steer sampling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditioningMethod {
    /// The model was trained with `cond`/`cond_mask` inputs.
    Trained,
    /// Known positions of x_t are overwritten with freshly noised known bits at every step: works
    /// with any model, but the seams between known and generated text are weaker.
    Replacement,
}

impl ConditioningMethod {
    pub fn for_spec(spec: &ModelSpec) -> ConditioningMethod {
        if spec.conditioning {
            ConditioningMethod::Trained
        } else {
            ConditioningMethod::Replacement
        }
    }
}

/// Samples `n` windows. `known`, when given, holds n * L entries: `Some(byte)` where the text is
/// fixed. Returns one byte string of L bytes per sequence; known bytes come back exactly.
pub fn sample<D: Denoiser + ?Sized>(
    net: &mut D,
    config: &SamplerConfig,
    n: usize,
    known: Option<&[Option<u8>]>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<u8>>, SampleError> {
    let spec = net.spec().clone();
    check(config, &spec, n, known)?;
    let (steps, size) = (config.steps as f32, n * spec.values_per_sequence());
    let gamma = |t: f32| spec.schedule.gamma(f64::from(t)) as f32;
    let method = ConditioningMethod::for_spec(&spec);
    // A conditional model always gets `cond` inputs: all-unknown when nothing is known.
    let unconditional;
    let known = match (known, method) {
        (None, ConditioningMethod::Trained) => {
            unconditional = vec![None; n * spec.window];
            Some(&unconditional[..])
        }
        _ => known,
    }
    .map(|k| KnownBits::new(&spec, k));
    // Guidance needs something known (with nothing known both passes would be the same);
    // self-guidance is for free samples only (see `SamplerConfig::self_guidance`).
    let config = &config.clone().for_task(known.as_ref().is_some_and(KnownBits::any));
    let guidance = known
        .as_ref()
        .filter(|_| config.guidance != 1.0 && method == ConditioningMethod::Trained)
        .map(|k| Guidance::new(k, config.guidance));
    let mut estimator = Estimator::new(&spec, config, n, guidance);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);

    let mut x_t = gaussian(&mut rng, size);
    let mut x_pred = vec![0.0f32; size];
    let mut x0 = vec![0.0f32; size];
    let no_self_cond = vec![0.0f32; size];
    let mut t_batch = vec![0.0f32; n];
    let mut t_state = 1.0f32; // the noise level x_t really has
    for step in 0..config.steps {
        let t_now = step_time(step as f32 / steps, config.warp);
        let t_next = step_time((step as f32 + 1.0 + config.td) / steps, config.warp);
        if let (Some(k), ConditioningMethod::Replacement) = (&known, method) {
            k.replace(&mut x_t, gamma(t_state), &mut rng);
        }
        t_batch.fill(t_now);
        let input = DenoiseInput {
            batch: n,
            x_t: &x_t,
            x_self: if spec.self_conditioning { &x_pred } else { &no_self_cond },
            t: &t_batch,
            condition: known
                .as_ref()
                .filter(|_| method == ConditioningMethod::Trained)
                .map(|k| Condition { cond: &k.bits, mask: &k.mask }),
        };
        // At the first step there is no previous x0 yet: a blind pass would be the seeing one.
        let blind = (step > 0).then_some(DenoiseInput { x_self: &no_self_cond, ..input });
        estimator.estimate(net, &input, blind.as_ref(), &mut x0)?;
        std::mem::swap(&mut x_pred, &mut x0);
        let (g_now, g_next) = (gamma(t_now), gamma(t_next));
        match config.rule {
            StepRule::Ddim => ddim_step(&mut x_t, &x_pred, g_now, g_next),
            StepRule::Ddpm => ddpm_step(&mut x_t, &x_pred, g_now, g_next, &mut rng),
        }
        t_state = t_next;
        progress(step + 1, config.steps);
    }

    let mut texts: Vec<Vec<u8>> =
        x_pred.chunks_exact(spec.values_per_sequence()).map(|x| spec.decode(x)).collect();
    if let Some(k) = &known {
        k.restore(&mut texts);
    }
    Ok(texts)
}

/// A step's x0 from the network, as the config says (classifier-free guidance for known
/// characters; for free samples self-guidance, the temperature and refinements), clamped to
/// the bits' range.
struct Estimator<'c> {
    config: &'c SamplerConfig,
    bit_scale: f32,
    guidance: Option<Guidance>,
    /// A softmax head's estimate goes through its logits when they are reshaped (`check` made
    /// sure that the head is one).
    logits: Option<Logits>,
    x0_blind: Vec<f32>,
    x_refined: Vec<f32>,
}

impl<'c> Estimator<'c> {
    fn new(
        spec: &ModelSpec,
        config: &'c SamplerConfig,
        n: usize,
        guidance: Option<Guidance>,
    ) -> Estimator<'c> {
        let size = n * spec.values_per_sequence();
        let guided = config.self_guidance != 1.0;
        let on_logits = guided && config.self_guidance_on == GuidedOutput::Logits;
        Estimator {
            config,
            bit_scale: spec.bit_scale,
            guidance,
            logits: (on_logits || config.temperature != 1.0).then(|| Logits::new(spec, n, guided)),
            x0_blind: vec![0.0; if guided { size } else { 0 }],
            x_refined: vec![0.0; if config.refine > 0 { size } else { 0 }],
        }
    }

    /// x0 for `input`, whose x_self is the previous step's estimate; `blind` is the same input
    /// without it, for self-guidance (none at the first step).
    fn estimate<D: Denoiser + ?Sized>(
        &mut self,
        net: &mut D,
        input: &DenoiseInput<'_>,
        blind: Option<&DenoiseInput<'_>>,
        x0: &mut [f32],
    ) -> Result<(), SampleError> {
        let config = self.config;
        let blind = blind.filter(|_| config.self_guidance != 1.0);
        let w = blind.map(|_| config.self_guidance);
        if let Some(blind) = blind {
            // It does not see x_self: once a step, whatever the refinements.
            match &mut self.logits {
                Some(logits) => logits.blind(net, blind, config, &mut self.x0_blind)?,
                None => estimate(net, &mut self.guidance, blind, &mut self.x0_blind)?,
            }
        }
        for pass in 0..=config.refine {
            let seeing = match pass {
                0 => *input,
                _ => DenoiseInput { x_self: &self.x_refined, ..*input },
            };
            match &mut self.logits {
                Some(logits) => logits.seeing(net, &seeing, config, w, x0, &self.x0_blind)?,
                None => {
                    estimate(net, &mut self.guidance, &seeing, x0)?;
                    if let Some(w) = w {
                        extrapolate(x0, &self.x0_blind, w);
                    }
                }
            }
            let b = self.bit_scale;
            x0.iter_mut().for_each(|v| *v = v.clamp(-b, b));
            if pass < config.refine {
                self.x_refined.copy_from_slice(x0);
            }
        }
        Ok(())
    }
}

/// The network's x0 estimate, with classifier-free guidance when it is on.
fn estimate<D: Denoiser + ?Sized>(
    net: &mut D,
    guidance: &mut Option<Guidance>,
    input: &DenoiseInput<'_>,
    x0: &mut [f32],
) -> Result<(), SampleError> {
    match guidance {
        Some(guidance) => guidance.denoise(net, input, x0),
        None => net.denoise(input, x0),
    }
    .map_err(SampleError::Denoiser)
}

/// A softmax head's logits for the whole batch (and those of the blind pass for self-guidance),
/// and the charset's codes that turn them into x0.
struct Logits {
    seeing: Vec<f32>,
    blind: Vec<f32>,
    codes: Vec<f32>,
}

impl Logits {
    fn new(spec: &ModelSpec, n: usize, guided: bool) -> Logits {
        let size = n * spec.window * spec.charset.bytes().len();
        Logits {
            seeing: vec![0.0; size],
            blind: vec![0.0; if guided { size } else { 0 }],
            codes: spec.analog_bits().codes(&spec.charset),
        }
    }

    /// Self-guidance's blind pass: its logits, and on x0 its estimate at the config's
    /// temperature.
    fn blind<D: Denoiser + ?Sized>(
        &mut self,
        net: &mut D,
        blind: &DenoiseInput<'_>,
        config: &SamplerConfig,
        x0_blind: &mut [f32],
    ) -> Result<(), SampleError> {
        net.logits(blind, &mut self.blind).map_err(SampleError::Denoiser)?;
        if config.self_guidance_on == GuidedOutput::X0 {
            mean_code(&self.codes, &self.blind, config.temperature, x0_blind);
        }
        Ok(())
    }

    /// x0 from the seeing pass's logits at the config's temperature, self-guided with weight
    /// `w` from the last `blind` pass when given. Free samples only: classifier-free guidance
    /// extrapolates the graph's x0 (`estimate`).
    fn seeing<D: Denoiser + ?Sized>(
        &mut self,
        net: &mut D,
        input: &DenoiseInput<'_>,
        config: &SamplerConfig,
        w: Option<f32>,
        x0: &mut [f32],
        x0_blind: &[f32],
    ) -> Result<(), SampleError> {
        net.logits(input, &mut self.seeing).map_err(SampleError::Denoiser)?;
        let on_logits = config.self_guidance_on == GuidedOutput::Logits;
        if let (Some(w), true) = (w, on_logits) {
            extrapolate(&mut self.seeing, &self.blind, w);
        }
        mean_code(&self.codes, &self.seeing, config.temperature, x0);
        if let (Some(w), false) = (w, on_logits) {
            extrapolate(x0, x0_blind, w);
        }
        Ok(())
    }
}

/// Guidance's one formula: `x = base + w (x - base)`, from the weaker estimate through the
/// stronger one (w = 1 keeps the stronger, w > 1 goes past it).
pub fn extrapolate(x: &mut [f32], base: &[f32], w: f32) {
    for (x, &base) in x.iter_mut().zip(base) {
        *x = base + w * (*x - base);
    }
}

/// x_{t_next} from the x0 estimate and the noise it implies.
pub fn ddim_step(x_t: &mut [f32], x_pred: &[f32], g_now: f32, g_next: f32) {
    let (s_now, n_now) = (g_now.sqrt(), (1.0 - g_now).sqrt());
    let (s_next, n_next) = (g_next.sqrt(), (1.0 - g_next).sqrt());
    for (x, &x0) in x_t.iter_mut().zip(x_pred) {
        let eps = (*x - s_now * x0) / n_now;
        *x = s_next * x0 + n_next * eps;
    }
}

/// One ancestral step from g_now to g_next.
pub fn ddpm_step(x_t: &mut [f32], x_pred: &[f32], g_now: f32, g_next: f32, rng: &mut impl Rng) {
    let alpha = g_now / g_next;
    let sigma = (1.0 - alpha).sqrt();
    let (s_now, n_now) = (g_now.sqrt(), (1.0 - g_now).sqrt());
    for (x, &x0) in x_t.iter_mut().zip(x_pred) {
        let eps = (*x - s_now * x0) / n_now;
        let z: f32 = rng.sample(StandardNormal);
        *x = (*x - (1.0 - alpha) / n_now * eps) / alpha.sqrt() + sigma * z;
    }
}

pub fn gaussian(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.sample(StandardNormal)).collect()
}

fn check(
    config: &SamplerConfig,
    spec: &ModelSpec,
    n: usize,
    known: Option<&[Option<u8>]>,
) -> Result<(), SampleError> {
    if config.steps == 0 {
        return Err(SampleError::Config("steps must be at least 1".into()));
    }
    if let Some(problem) = td_problem(config.td) {
        return Err(SampleError::Config(problem));
    }
    if let Some(problem) = guidance_problem(config.guidance, spec.conditioning) {
        return Err(SampleError::Config(problem));
    }
    if let Some(problem) = warp_problem(config.warp) {
        return Err(SampleError::Config(problem));
    }
    if let Some(problem) = self_guidance_problem(config.self_guidance, spec.self_conditioning) {
        return Err(SampleError::Config(problem));
    }
    if let Some(problem) = refine_problem(config.refine, spec.self_conditioning) {
        return Err(SampleError::Config(problem));
    }
    if let Some(problem) = temperature_problem(config.temperature, spec.head) {
        return Err(SampleError::Config(problem));
    }
    if let Some(problem) = guided_output_problem(config.self_guidance_on, spec.head) {
        return Err(SampleError::Config(problem));
    }
    if n == 0 {
        return Err(SampleError::Config("the number of samples must be at least 1".into()));
    }
    if let Some(k) = known {
        if k.len() != n * spec.window {
            return Err(SampleError::Known(format!(
                "{} known-character slots given for {n} windows of {} characters",
                k.len(),
                spec.window
            )));
        }
        if let Some(byte) = k.iter().flatten().find(|&&b| !spec.charset.contains(b)) {
            return Err(SampleError::Known(format!(
                "byte {byte:#04x} ({:?}) is not in the model's charset",
                char::from(*byte)
            )));
        }
    }
    Ok(())
}

/// Why a guidance weight cannot steer a model (trained with conditioning or not), if it cannot:
/// for the sampler's settings and for a file's recommendation alike.
pub fn guidance_problem(weight: f32, conditioning: bool) -> Option<String> {
    weight_problem(
        "guidance",
        weight,
        conditioning,
        "conditioning; this one conditions by replacement",
    )
}

/// Why a self-guidance weight cannot steer a model (self-conditioned or not), if it cannot.
pub fn self_guidance_problem(weight: f32, self_conditioning: bool) -> Option<String> {
    weight_problem("self-guidance", weight, self_conditioning, "self-conditioning")
}

/// Why refinements cannot be run on a model (self-conditioned or not), if they cannot: without
/// self-conditioning the network would see the same inputs again.
pub fn refine_problem(refine: usize, self_conditioning: bool) -> Option<String> {
    (refine > 0 && !self_conditioning)
        .then(|| "refinements need a model trained with self-conditioning".into())
}

/// Why a temperature cannot reshape a model's estimate, if it cannot: it is > 0, and other
/// than 1 only for a softmax head (a bit head has no distribution to reshape).
pub fn temperature_problem(temperature: f32, head: Head) -> Option<String> {
    if !(temperature.is_finite() && temperature > 0.0) {
        Some(format!("temperature must be > 0, got {temperature}"))
    } else if temperature != 1.0 && head != Head::Softmax {
        Some("temperature needs a model with a softmax head (this one regresses bits)".into())
    } else {
        None
    }
}

/// Why self-guidance cannot extrapolate that output of a model, if it cannot: only a softmax
/// head has logits.
pub fn guided_output_problem(on: GuidedOutput, head: Head) -> Option<String> {
    (on == GuidedOutput::Logits && head != Head::Softmax).then(|| {
        "self-guidance on the logits needs a model with a softmax head (this one regresses bits)"
            .into()
    })
}

/// Both guidances' rule: a weight is >= 0, and other than 1 only where the model was trained
/// with what it extrapolates from.
fn weight_problem(setting: &str, weight: f32, trained: bool, needs: &str) -> Option<String> {
    if !(weight.is_finite() && weight >= 0.0) {
        Some(format!("{setting} must be >= 0, got {weight}"))
    } else if weight != 1.0 && !trained {
        Some(format!("{setting} needs a model trained with {needs}"))
    } else {
        None
    }
}

/// Why a time delta is not one, if it is not.
pub fn td_problem(td: f32) -> Option<String> {
    (!(td.is_finite() && td >= 0.0)).then(|| format!("td must be >= 0, got {td}"))
}

/// Why a time warp is not one, if it is not.
pub fn warp_problem(warp: f32) -> Option<String> {
    (!(warp.is_finite() && warp > 0.0)).then(|| format!("warp must be > 0, got {warp}"))
}

/// Known characters as analog bits and a mask, the form the network and the sampler use.
struct KnownBits {
    known: Vec<Option<u8>>,
    /// [n, L, K]: analog bits where known, 0 elsewhere.
    bits: Vec<f32>,
    /// [n, L, 1]
    mask: Vec<f32>,
}

impl KnownBits {
    fn new(spec: &ModelSpec, known: &[Option<u8>]) -> KnownBits {
        let (analog, k) = (spec.analog_bits(), spec.bits);
        let mut bits = vec![0.0; known.len() * k];
        for (byte, chunk) in known.iter().zip(bits.chunks_exact_mut(k)) {
            if let Some(byte) = byte {
                analog.encode_byte(*byte, chunk);
            }
        }
        let mask = known.iter().map(|b| if b.is_some() { 1.0 } else { 0.0 }).collect();
        KnownBits { known: known.to_vec(), bits, mask }
    }

    /// Replacement conditioning: known positions of x_t become sqrt(g) x0 + sqrt(1 - g) z.
    fn replace(&self, x_t: &mut [f32], g: f32, rng: &mut impl Rng) {
        let k = self.bits.len() / self.known.len();
        let chunks = x_t.chunks_exact_mut(k).zip(self.bits.chunks_exact(k));
        for ((x, bits), known) in chunks.zip(&self.known) {
            if known.is_some() {
                for (x, b) in x.iter_mut().zip(bits) {
                    *x = noised(*b, rng.sample(StandardNormal), g);
                }
            }
        }
    }

    fn any(&self) -> bool {
        self.known.iter().any(Option::is_some)
    }

    fn restore(&self, texts: &mut [Vec<u8>]) {
        let window = self.known.len() / texts.len();
        for (text, known) in texts.iter_mut().zip(self.known.chunks_exact(window)) {
            for (byte, k) in text.iter_mut().zip(known) {
                if let Some(k) = k {
                    *byte = *k;
                }
            }
        }
    }
}

/// Classifier-free guidance (Ho & Salimans) for a model trained with conditioning: every call runs
/// the batch twice in one pass of the network, once with its condition and once with none, and
/// extrapolates from the unconditional x0 toward the conditional one.
struct Guidance {
    weight: f32,
    /// [2n, L, K] and [2n, L, 1]: the condition, then nothing known.
    cond: Vec<f32>,
    mask: Vec<f32>,
    /// The doubled inputs and output, reused every step.
    x_t: Vec<f32>,
    x_self: Vec<f32>,
    t: Vec<f32>,
    x0: Vec<f32>,
}

impl Guidance {
    fn new(known: &KnownBits, weight: f32) -> Guidance {
        let then_unknown = |v: &[f32]| [v, &vec![0.0; v.len()]].concat();
        Guidance {
            weight,
            cond: then_unknown(&known.bits),
            mask: then_unknown(&known.mask),
            x_t: vec![],
            x_self: vec![],
            t: vec![],
            x0: vec![],
        }
    }

    fn denoise<D: Denoiser + ?Sized>(
        &mut self,
        net: &mut D,
        input: &DenoiseInput<'_>,
        x0: &mut [f32],
    ) -> Result<(), BoxError> {
        let twice = |buf: &mut Vec<f32>, v: &[f32]| {
            buf.clear();
            buf.extend_from_slice(v);
            buf.extend_from_slice(v);
        };
        twice(&mut self.x_t, input.x_t);
        twice(&mut self.x_self, input.x_self);
        twice(&mut self.t, input.t);
        self.x0.resize(2 * x0.len(), 0.0);
        let doubled = DenoiseInput {
            batch: 2 * input.batch,
            x_t: &self.x_t,
            x_self: &self.x_self,
            t: &self.t,
            condition: Some(Condition { cond: &self.cond, mask: &self.mask }),
        };
        net.denoise(&doubled, &mut self.x0)?;
        let (conditional, unconditional) = self.x0.split_at(x0.len());
        x0.copy_from_slice(conditional);
        extrapolate(x0, unconditional, self.weight);
        Ok(())
    }
}
