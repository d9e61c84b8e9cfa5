//! Prompts, infill templates and sliding-window generation.

use chardiff_runtime::generate::{
    generate_long, infill_known, prompt_known, GenerateError, LongText,
};
use chardiff_runtime::sampler::{sample, SamplerConfig, StepRule};
use chardiff_runtime::*;

mod common;
use common::spec;

/// A conditional denoiser that continues a periodic text from the last known byte before each
/// position (from the period's start when none is known), so the right output is known for every
/// condition.
struct Cycle {
    spec: ModelSpec,
    period: &'static [u8],
}

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz";

impl Denoiser for Cycle {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError> {
        let c = input.condition.expect("a conditional model always gets a condition");
        let (l, k, bits) = (self.spec.window, self.spec.bits, self.spec.analog_bits());
        let n = self.period.len();
        for b in 0..input.batch {
            // (position, index in the period) of the last known byte
            let mut last = (0, 0);
            for j in 0..l {
                let at = (b * l + j) * k;
                let byte = if c.mask[b * l + j] > 0.5 {
                    let byte = bits.decode(&c.cond[at..at + k])[0];
                    // (a byte outside the period, like an infill's literal `_`, is skipped)
                    if let Some(i) = self.period.iter().position(|&x| x == byte) {
                        last = (j, i);
                    }
                    byte
                } else {
                    self.period[(last.1 + j - last.0) % n]
                };
                bits.encode_byte(byte, &mut x0[at..at + k]);
            }
        }
        Ok(())
    }
}

fn alphabet(window: usize) -> Cycle {
    Cycle { spec: spec(window, true, Head::Bits), period: ALPHABET }
}

fn config() -> SamplerConfig {
    SamplerConfig::new(4, 0.0, StepRule::Ddim, 1)
}

#[test]
fn a_prompt_is_continued() {
    let mut net = alphabet(10);
    let known = prompt_known(&net.spec, "xy").unwrap();
    let out = sample(&mut net, &config(), 1, Some(&known), |_, _| {}).unwrap();
    assert_eq!(out[0], b"xyzabcdefg");
}

#[test]
fn long_text_slides_seamlessly_across_windows() {
    let mut net = alphabet(8);
    let text = |out: Vec<LongText>| out.into_iter().map(|t| t.text).collect::<Vec<_>>();
    let out = generate_long(&mut net, &config(), &["abc", "abc"], 60, |_, _| {}).unwrap();
    let expected: Vec<u8> = (0..60).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(text(out), vec![expected.clone(), expected]);
    let mixed = generate_long(&mut net, &config(), &["xy", "f"], 10, |_, _| {}).unwrap();
    assert_eq!(text(mixed), [b"xyzabcdefg".to_vec(), b"fghijklmno".to_vec()]);
    let short = generate_long(&mut net, &config(), &[""], 5, |_, _| {}).unwrap();
    assert_eq!(short[0].text, b"abcde");
    // Without separators no word can be given back: windows of 8 add 4 fresh bytes each.
    let origins: Vec<u8> =
        (0..16).map(|i| if i < 3 { 0 } else { 1 + (i as u8).saturating_sub(4) / 4 }).collect();
    let one = generate_long(&mut net, &config(), &["abc"], 16, |_, _| {}).unwrap();
    assert_eq!(one[0].origins, origins);
}

#[test]
fn long_text_seams_fall_between_words() {
    let mut net = Cycle { spec: spec(8, true, Head::Bits), period: b"ab " };
    let mut seen = vec![];
    let out =
        generate_long(&mut net, &config(), &["a"], 40, |done, of| seen.push((done, of))).unwrap();
    let (text, origins) = (&out[0].text, &out[0].origins);
    let expected: Vec<u8> = (0..40).map(|i| b"ab "[i % 3]).collect();
    assert_eq!(text, &expected);
    assert_eq!(origins[0], 0);
    // Window 0 wrote "ab ab ab", then gave back the cut "ab": every later pass starts a word.
    assert_eq!(&origins[..8], &[0, 1, 1, 1, 1, 1, 2, 2]);
    for i in 2..40 {
        if origins[i] != origins[i - 1] {
            assert_eq!(text[i - 1], b' ', "a seam inside a word at byte {i}: {origins:?}");
        }
    }
    assert!(seen.windows(2).all(|p| p[0].0 <= p[1].0) && seen.last() == Some(&(40, 40)));
}

#[test]
fn infill_templates_fill_each_gap_and_keep_the_rest() {
    let mut net = alphabet(16);
    let (known, len) = infill_known(&net.spec, "ab__ef\\_x_").unwrap();
    assert_eq!(len, 9);
    let out = sample(&mut net, &config(), 1, Some(&known), |_, _| {}).unwrap();
    assert_eq!(&out[0][..len], b"abcdef_xy");
}

#[test]
fn bad_prompts_and_templates_say_what_fits() {
    let s = spec(8, true, Head::Bits);
    let err = |e: GenerateError| e.to_string();
    assert!(err(prompt_known(&s, "abcdefgh").unwrap_err()).contains("at most 7 bytes"));
    assert!(err(prompt_known(&s, "aBc").unwrap_err()).contains("'B'"));
    assert!(err(infill_known(&s, "abc").unwrap_err()).contains("no gap"));
    assert!(err(infill_known(&s, "a\\_b").unwrap_err()).contains("no gap"));
    assert!(err(infill_known(&s, "abcdefgh_").unwrap_err())
        .contains("longer than the model's window of 8"));
    assert!(err(infill_known(&s, "a_\\").unwrap_err()).contains("lone"));
    assert!(err(infill_known(&s, "Q_").unwrap_err()).contains("'Q'"));
    let mut net = Cycle { spec: s, period: ALPHABET };
    assert!(err(generate_long(&mut net, &config(), &["abc"], 3, |_, _| {}).unwrap_err())
        .contains("nothing to generate"));
}
