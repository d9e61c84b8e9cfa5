//! The sampling loop against denoisers whose behaviour is known exactly.

use chardiff_runtime::sampler::{
    gaussian, sample, step_time, GuidedOutput, SamplerConfig, StepRule,
};
use chardiff_runtime::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

mod common;
use common::{spec, Oracle};

fn config(steps: usize, td: f32, rule: StepRule) -> SamplerConfig {
    SamplerConfig::new(steps, td, rule, 7)
}

#[test]
fn ddim_with_a_perfect_denoiser_returns_the_data_and_keeps_the_initial_noise() {
    let text = b"the quick brown fox.";
    let mut net = Oracle::new(spec(text.len(), false, Head::Bits), text);
    let out = sample(&mut net, &config(20, 0.0, StepRule::Ddim), 1, None, |_, _| {}).unwrap();
    assert_eq!(out, vec![text.to_vec()]);

    // Each DDIM step re-noises the exact x0 with the noise it implied: the initial draw.
    let eps = gaussian(&mut ChaCha8Rng::seed_from_u64(7), net.x0.len());
    let g = |t: f32| Schedule::Cosine.gamma(f64::from(t)) as f32;
    for (x_t, t) in &net.seen {
        for ((x, e), x0) in x_t.iter().zip(&eps).zip(&net.x0) {
            let expected = g(*t).sqrt() * x0 + (1.0 - g(*t)).sqrt() * e;
            assert!((x - expected).abs() < 1e-4, "t = {t}: {x} vs {expected}");
        }
    }
}

#[test]
fn ddpm_with_a_perfect_denoiser_returns_the_data() {
    let text = b"hello, world.";
    let mut net = Oracle::new(spec(text.len(), false, Head::Softmax), text);
    let out = sample(&mut net, &config(30, 1.0, StepRule::Ddpm), 3, None, |_, _| {}).unwrap();
    assert_eq!(out, vec![text.to_vec(); 3]);
}

#[test]
fn td_changes_the_trajectory() {
    let text = b"some text";
    let run = |td: f32| {
        let mut net = Oracle::new(spec(text.len(), false, Head::Bits), text);
        sample(&mut net, &config(10, td, StepRule::Ddim), 1, None, |_, _| {}).unwrap();
        net.seen
    };
    let (plain, shifted) = (run(0.0), run(2.0));
    assert_eq!(plain[0], shifted[0], "the first call sees the same pure noise at t = 1");
    // The network is told the same times, but the states differ: td moved them ahead.
    assert_eq!(plain[1].1, shifted[1].1);
    assert_ne!(plain[1].0, shifted[1].0);
}

#[test]
fn warp_spaces_the_times_and_one_is_even() {
    for i in 0..=100 {
        let u = i as f32 / 100.0;
        assert_eq!(step_time(u, 1.0), 1.0 - u, "warp 1 is the plain loop, bit for bit");
    }
    let warped: Vec<f32> = (0..=100).map(|i| step_time(i as f32 / 100.0, 0.6)).collect();
    assert_eq!((warped[0], warped[50], warped[100]), (1.0, 0.5, 0.0));
    assert!(warped.windows(2).all(|w| w[1] < w[0]), "times fall at every step");
    let middle = warped.iter().filter(|t| (0.35..0.65).contains(*t)).count();
    assert!((45..=50).contains(&middle), "{middle} of 101 times between 0.35 and 0.65");
    assert_eq!(step_time(1.5, 0.6), 0.0, "steps past the end (td) land on t = 0");

    // The sampler tells the network the warped times and still lands on the data.
    let text = b"warped steps";
    let mut net = Oracle::new(spec(text.len(), false, Head::Bits), text);
    let warp = SamplerConfig { warp: 0.6, ..config(10, 0.0, StepRule::Ddim) };
    assert_eq!(sample(&mut net, &warp, 1, None, |_, _| {}).unwrap(), vec![text.to_vec()]);
    let told: Vec<f32> = net.seen.iter().map(|(_, t)| *t).collect();
    let expected: Vec<f32> = (0..10).map(|i| step_time(i as f32 / 10.0, 0.6)).collect();
    assert_eq!(told, expected);
}

#[test]
fn same_seed_same_samples_other_seed_other_noise() {
    let text = b"abc";
    let go = |seed| {
        let mut net = Oracle::new(spec(3, false, Head::Bits), text);
        let c = SamplerConfig { seed, ..config(5, 1.0, StepRule::Ddpm) };
        sample(&mut net, &c, 2, None, |_, _| {}).unwrap();
        net.seen
    };
    assert_eq!(go(1), go(1));
    assert_ne!(go(1)[0].0, go(2)[0].0);
}

#[test]
fn known_characters_come_back_exactly_with_both_methods() {
    let text = b"zzzzzzzz";
    for conditioning in [false, true] {
        let mut net = Oracle::new(spec(8, conditioning, Head::Bits), text);
        let known: Vec<Option<u8>> =
            b"ab......".iter().map(|&b| (b != b'.').then_some(b)).collect();
        let out = sample(&mut net, &config(5, 0.0, StepRule::Ddim), 1, Some(&known), |_, _| {});
        assert_eq!(out.unwrap()[0], b"abzzzzzz");
    }
}

#[test]
fn bad_settings_and_unfit_known_characters_are_refused() {
    let mut net = Oracle::new(spec(4, false, Head::Bits), b"abcd");
    let bad = |net: &mut Oracle, c: SamplerConfig, n, known: Option<&[Option<u8>]>| {
        sample(net, &c, n, known, |_, _| {}).unwrap_err().to_string()
    };
    assert!(bad(&mut net, config(0, 0.0, StepRule::Ddim), 1, None).contains("steps"));
    assert!(bad(&mut net, config(5, -1.0, StepRule::Ddim), 1, None).contains("td"));
    let unwarped = SamplerConfig { warp: 0.0, ..config(5, 0.0, StepRule::Ddim) };
    assert!(bad(&mut net, unwarped, 1, None).contains("warp must be > 0"));
    assert!(bad(&mut net, config(5, 0.0, StepRule::Ddim), 0, None).contains("at least 1"));
    let short = [Some(b'a')];
    assert!(bad(&mut net, config(5, 0.0, StepRule::Ddim), 1, Some(&short)).contains("slots"));
    let foreign = [Some(b'A'), None, None, None];
    assert!(bad(&mut net, config(5, 0.0, StepRule::Ddim), 1, Some(&foreign)).contains("charset"));
}

#[test]
fn progress_reports_every_step() {
    let mut net = Oracle::new(spec(2, false, Head::Bits), b"ab");
    let mut calls = vec![];
    sample(&mut net, &config(4, 0.0, StepRule::Ddim), 1, None, |i, n| calls.push((i, n))).unwrap();
    assert_eq!(calls, [(1, 4), (2, 4), (3, 4), (4, 4)]);
}

/// Predicts one text for rows with something known and another for rows with nothing known;
/// records each call's batch size and self-conditioning input.
struct TwoMinds {
    spec: ModelSpec,
    known_rows: Vec<f32>,
    free_rows: Vec<f32>,
    calls: Vec<(usize, Vec<f32>)>,
}

impl Denoiser for TwoMinds {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError> {
        self.calls.push((input.batch, input.x_self.to_vec()));
        let mask = input.condition.expect("a conditional model").mask;
        let rows = x0.chunks_exact_mut(self.known_rows.len());
        for (row, mask) in rows.zip(mask.chunks_exact(self.spec.window)) {
            let knows = mask.contains(&1.0);
            row.copy_from_slice(if knows { &self.known_rows } else { &self.free_rows });
        }
        Ok(())
    }
}

#[test]
fn guidance_extrapolates_from_the_unconditional_x0_in_one_doubled_call() {
    let spec = spec(4, true, Head::Bits);
    let (a, b) = (spec.analog_bits().encode(b"abcd"), spec.analog_bits().encode(b"abzz"));
    let mut net = TwoMinds { spec, known_rows: a.clone(), free_rows: b.clone(), calls: vec![] };
    let known = [Some(b'a'), None, None, None];
    let guided = SamplerConfig { guidance: 0.5, ..config(3, 0.0, StepRule::Ddim) };
    let out = sample(&mut net, &guided, 1, Some(&known), |_, _| {}).unwrap();
    assert_eq!(out[0][0], b'a', "the known character comes back");
    assert!(net.calls.iter().all(|(batch, _)| *batch == 2), "conditional and free rows together");
    // The second call's self-conditioning input is the first step's guided x0, twice.
    let midway: Vec<f32> = b.iter().zip(&a).map(|(u, c)| u + 0.5 * (c - u)).collect();
    assert_eq!(net.calls[1].1, [&midway[..], &midway[..]].concat());

    // Nothing known: nothing to guide by, one plain call per step.
    net.calls.clear();
    let out = sample(&mut net, &guided, 1, None, |_, _| {}).unwrap();
    assert_eq!(out[0], b"abzz");
    assert!(net.calls.iter().all(|(batch, _)| *batch == 1));
}

#[test]
fn guidance_must_be_a_non_negative_number() {
    let mut net = Oracle::new(spec(4, true, Head::Bits), b"abcd");
    for guidance in [-1.0, f32::NAN] {
        let c = SamplerConfig { guidance, ..config(5, 0.0, StepRule::Ddim) };
        let err = sample(&mut net, &c, 1, None, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("guidance"), "{err}");
    }
    let mut unconditional = Oracle::new(spec(4, false, Head::Bits), b"abcd");
    let c = SamplerConfig { guidance: 2.0, ..config(5, 0.0, StepRule::Ddim) };
    let err = sample(&mut unconditional, &c, 1, None, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("trained with conditioning"), "{err}");
}

/// Predicts one text while it sees no previous estimate (x_self all zeros) and another once it
/// does; records each call's self-conditioning input.
struct Hindsight {
    spec: ModelSpec,
    blind: Vec<f32>,
    seeing: Vec<f32>,
    calls: Vec<Vec<f32>>,
}

impl Denoiser for Hindsight {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError> {
        self.calls.push(input.x_self.to_vec());
        let sees = input.x_self.iter().any(|&v| v != 0.0);
        x0.copy_from_slice(if sees { &self.seeing } else { &self.blind });
        Ok(())
    }
}

#[test]
fn self_guidance_extrapolates_from_the_blind_x0_with_a_second_call() {
    let spec = spec(4, false, Head::Bits);
    let (blind, seeing) = (spec.analog_bits().encode(b"abcd"), spec.analog_bits().encode(b"abzz"));
    let mut net = Hindsight { spec, blind: blind.clone(), seeing: seeing.clone(), calls: vec![] };
    let plain = sample(&mut net, &config(3, 0.0, StepRule::Ddim), 1, None, |_, _| {}).unwrap();
    assert_eq!((plain[0].as_slice(), net.calls.len()), (&b"abzz"[..], 3), "one call a step");

    net.calls.clear();
    let guided = SamplerConfig { self_guidance: 0.5, ..config(3, 0.0, StepRule::Ddim) };
    sample(&mut net, &guided, 1, None, |_, _| {}).unwrap();
    // The first step has no estimate to see (one call), the others do not see it, then do (two).
    let zeros = vec![0.0; blind.len()];
    assert_eq!(net.calls.len(), 5);
    assert_eq!(net.calls[0], zeros);
    assert_eq!((&net.calls[1], &net.calls[2]), (&zeros, &blind));
    // The third step sees the second's guided x0.
    let midway: Vec<f32> = blind.iter().zip(&seeing).map(|(b, s)| b + 0.5 * (s - b)).collect();
    assert_eq!((&net.calls[3], &net.calls[4]), (&zeros, &midway));

    // With known characters it is off: one call a step.
    net.spec.conditioning = true;
    net.calls.clear();
    let known = [Some(b'a'), None, None, None];
    sample(&mut net, &guided, 1, Some(&known), |_, _| {}).unwrap();
    assert_eq!(net.calls.len(), 3);
}

#[test]
fn refinements_see_the_estimate_just_made_and_the_blind_pass_runs_once_a_step() {
    let spec = spec(4, false, Head::Bits);
    let (blind, seeing) = (spec.analog_bits().encode(b"abcd"), spec.analog_bits().encode(b"abzz"));
    let mut net = Hindsight { spec, blind: blind.clone(), seeing: seeing.clone(), calls: vec![] };
    let zeros = vec![0.0; blind.len()];

    // One refinement, no self-guidance: two calls a step, the second seeing the first's x0.
    let refined = SamplerConfig { refine: 1, ..config(2, 0.0, StepRule::Ddim) };
    let out = sample(&mut net, &refined, 1, None, |_, _| {}).unwrap();
    assert_eq!(out[0], b"abzz");
    assert_eq!(net.calls, [zeros.clone(), blind.clone(), seeing.clone(), seeing.clone()]);

    // With self-guidance the blind pass runs once a step, and each refinement sees the guided
    // estimate.
    net.calls.clear();
    let guided = SamplerConfig { self_guidance: 0.5, ..refined.clone() };
    sample(&mut net, &guided, 1, None, |_, _| {}).unwrap();
    let midway: Vec<f32> = blind.iter().zip(&seeing).map(|(b, s)| b + 0.5 * (s - b)).collect();
    assert_eq!(net.calls, [zeros.clone(), blind.clone(), zeros.clone(), seeing.clone(), midway]);

    // With known characters they are off: one call a step.
    net.spec.conditioning = true;
    net.calls.clear();
    let known = [Some(b'a'), None, None, None];
    sample(&mut net, &refined, 1, Some(&known), |_, _| {}).unwrap();
    assert_eq!(net.calls.len(), 2);

    // Without self-conditioning the network would see the same inputs again.
    net.spec.self_conditioning = false;
    let err = sample(&mut net, &refined, 1, None, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("refinements need a model trained with self-conditioning"), "{err}");
}

/// A softmax head with one set of logits while it sees no previous estimate and another once it
/// does; records each call's self-conditioning input and which output was asked for.
struct HindsightLogits {
    spec: ModelSpec,
    blind: Vec<f32>,
    seeing: Vec<f32>,
    calls: Vec<(&'static str, Vec<f32>)>,
}

impl Denoiser for HindsightLogits {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError> {
        self.calls.push(("x0", input.x_self.to_vec()));
        let codes = self.spec.analog_bits().codes(&self.spec.charset);
        mean_code(&codes, &self.blind, 1.0, x0);
        Ok(())
    }

    fn logits(&mut self, input: &DenoiseInput<'_>, logits: &mut [f32]) -> Result<(), BoxError> {
        self.calls.push(("logits", input.x_self.to_vec()));
        let sees = input.x_self.iter().any(|&v| v != 0.0);
        logits.copy_from_slice(if sees { &self.seeing } else { &self.blind });
        Ok(())
    }
}

#[test]
fn a_softmax_heads_temperature_and_self_guidance_act_on_its_logits() {
    let spec = spec(3, true, Head::Softmax);
    let v = spec.charset.bytes().len();
    let blind: Vec<f32> = (0..3 * v).map(|i| (i % 7) as f32 * 0.5).collect();
    let seeing: Vec<f32> = (0..3 * v).map(|i| (i % 5) as f32 * 0.8).collect();
    let codes = spec.analog_bits().codes(&spec.charset);
    let mean = |logits: &[f32], temperature| {
        let mut x0 = vec![0.0; 3 * BITS];
        mean_code(&codes, logits, temperature, &mut x0);
        x0
    };
    let clamped = |x0: Vec<f32>| x0.iter().map(|v| v.clamp(-1.0, 1.0)).collect::<Vec<_>>();
    let x0_of = |logits: &[f32], temperature| clamped(mean(logits, temperature)); // as sampled
    let mut net = HindsightLogits {
        spec: spec.clone(),
        blind: blind.clone(),
        seeing: seeing.clone(),
        calls: vec![],
    };

    // A temperature alone: one call for the logits a step; the next step sees their x0.
    let cool = SamplerConfig { temperature: 0.5, ..config(3, 0.0, StepRule::Ddim) };
    sample(&mut net, &cool, 1, None, |_, _| {}).unwrap();
    let names: Vec<_> = net.calls.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["logits"; 3]);
    assert_eq!(net.calls[1].1, x0_of(&blind, 0.5));
    assert_eq!(net.calls[2].1, x0_of(&seeing, 0.5));

    // Self-guidance on the logits extrapolates them, then the temperature applies.
    net.calls.clear();
    let on_logits = GuidedOutput::Logits;
    let guided = SamplerConfig { self_guidance: 2.0, self_guidance_on: on_logits, ..cool.clone() };
    sample(&mut net, &guided, 1, None, |_, _| {}).unwrap();
    assert_eq!(net.calls.len(), 5);
    let zeros = vec![0.0; 3 * BITS];
    assert_eq!((&net.calls[1].1, &net.calls[3].1), (&zeros, &zeros), "the blind passes");
    let extrapolated: Vec<f32> =
        blind.iter().zip(&seeing).map(|(b, s)| b + 2.0 * (s - b)).collect();
    assert_eq!(net.calls[4].1, x0_of(&extrapolated, 0.5));

    // A refinement sees its step's guided estimate; the blind pass runs once a step.
    net.calls.clear();
    let refined = SamplerConfig { refine: 1, ..guided.clone() };
    sample(&mut net, &refined, 1, None, |_, _| {}).unwrap();
    assert_eq!(net.calls.len(), 8);
    assert_eq!(net.calls[1].1, x0_of(&blind, 0.5));
    assert_eq!((&net.calls[2].1, &net.calls[4].1), (&zeros, &x0_of(&extrapolated, 0.5)));

    // On x0 the temperature applies to each pass, then x0 is extrapolated.
    net.calls.clear();
    let on_x0 = SamplerConfig { self_guidance_on: GuidedOutput::X0, ..guided.clone() };
    sample(&mut net, &on_x0, 1, None, |_, _| {}).unwrap();
    let (b, s) = (mean(&blind, 0.5), mean(&seeing, 0.5));
    let x0: Vec<f32> = b.iter().zip(&s).map(|(b, s)| b + 2.0 * (s - b)).collect();
    assert_eq!(net.calls[4].1, clamped(x0));

    // With known characters neither applies: the graph's x0, one call a step.
    net.calls.clear();
    let known = [Some(b'a'), None, None];
    sample(&mut net, &guided, 1, Some(&known), |_, _| {}).unwrap();
    assert!(net.calls.iter().all(|(name, _)| *name == "x0") && net.calls.len() == 3);

    // A bit head has no distribution to reshape; a denoiser without logits says so.
    let mut bits = Oracle::new(common::spec(3, false, Head::Bits), b"abc");
    let err = sample(&mut bits, &cool, 1, None, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("softmax head"), "{err}");
    let mut no_logits = Oracle::new(common::spec(3, false, Head::Softmax), b"abc");
    let err = sample(&mut no_logits, &cool, 1, None, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("gives no logits"), "{err}");
    let bits_on_logits = SamplerConfig { temperature: 1.0, ..guided.clone() };
    let err = sample(&mut bits, &bits_on_logits, 1, None, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("self-guidance on the logits needs a model with a softmax head"), "{err}");
    for bad in [0.0, -1.0, f32::NAN] {
        let c = SamplerConfig { temperature: bad, ..config(3, 0.0, StepRule::Ddim) };
        let err = sample(&mut net, &c, 1, None, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("temperature must be > 0"), "{err}");
    }
}

#[test]
fn self_guidance_needs_a_self_conditioned_model_and_a_non_negative_weight() {
    let mut net = Oracle::new(spec(4, false, Head::Bits), b"abcd");
    for weight in [-1.0, f32::INFINITY] {
        let c = SamplerConfig { self_guidance: weight, ..config(5, 0.0, StepRule::Ddim) };
        let err = sample(&mut net, &c, 1, None, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("self-guidance must be >= 0"), "{err}");
    }
    net.spec.self_conditioning = false;
    let c = SamplerConfig { self_guidance: 2.0, ..config(5, 0.0, StepRule::Ddim) };
    let err = sample(&mut net, &c, 1, None, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("trained with self-conditioning"), "{err}");
    assert!(sample(&mut net, &config(5, 0.0, StepRule::Ddim), 1, None, |_, _| {}).is_ok());
}

#[test]
fn recommended_settings_depend_on_whether_characters_are_known() {
    let spec = ModelSpec {
        recommended_td: 2.0,
        recommended_free_td: Some(3.5),
        recommended_guidance: 5.0,
        recommended_self_guidance: 2.5,
        recommended_temperature: 0.6,
        recommended_refine: 2,
        ..spec(8, true, Head::Softmax)
    };
    // Free samples: their own td, self-guidance, temperature, and no classifier-free guidance
    // (nothing known).
    let free = SamplerConfig::recommended(&spec, 7, false);
    assert_eq!((free.td, free.guidance, free.self_guidance, free.seed), (3.5, 1.0, 2.5, 7));
    assert_eq!((free.temperature, free.refine), (0.6, 2));
    // With known characters: the shared td, guidance, and no self-guidance, temperature or
    // refinements.
    let known = SamplerConfig::recommended(&spec, 7, true);
    assert_eq!((known.td, known.guidance, known.self_guidance), (2.0, 5.0, 1.0));
    assert_eq!((known.temperature, known.refine), (1.0, 0));
    let one_td = ModelSpec { recommended_free_td: None, ..spec };
    assert_eq!(SamplerConfig::recommended(&one_td, 7, false).td, 2.0);
}
