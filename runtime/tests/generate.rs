//! Prompts, infill templates and sliding-window generation.

use chardiff_runtime::generate::{generate_long, infill_known, prompt_known, GenerateError};
use chardiff_runtime::sampler::{sample, SamplerConfig, StepRule};
use chardiff_runtime::*;

mod common;
use common::spec;

/// A conditional denoiser that continues the alphabet from the last known character before each
/// position (from 'a' when none is known), so the right output is known for every condition.
struct Alphabet {
    spec: ModelSpec,
}

impl Denoiser for Alphabet {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError> {
        let c = input.condition.expect("a conditional model always gets a condition");
        let (l, k, bits) = (self.spec.window, self.spec.bits, self.spec.analog_bits());
        for b in 0..input.batch {
            let mut last: Option<(usize, u8)> = None;
            for j in 0..l {
                let at = (b * l + j) * k;
                let byte = if c.mask[b * l + j] > 0.5 {
                    let byte = bits.decode(&c.cond[at..at + k])[0];
                    last = Some((j, byte));
                    byte
                } else {
                    let (p, from) = last.unwrap_or((0, b'a'));
                    b'a' + ((from - b'a') as usize + j - p) as u8 % 26
                };
                bits.encode_byte(byte, &mut x0[at..at + k]);
            }
        }
        Ok(())
    }
}

fn config() -> SamplerConfig {
    SamplerConfig { steps: 4, td: 0.0, rule: StepRule::Ddim, seed: 1 }
}

#[test]
fn a_prompt_is_continued() {
    let mut net = Alphabet { spec: spec(10, true, Head::Bits) };
    let known = prompt_known(&net.spec, "xy").unwrap();
    let out = sample(&mut net, &config(), 1, Some(&known), |_, _| {}).unwrap();
    assert_eq!(out[0], b"xyzabcdefg");
}

#[test]
fn long_text_slides_seamlessly_across_windows() {
    let mut net = Alphabet { spec: spec(8, true, Head::Bits) };
    let out = generate_long(&mut net, &config(), &["abc", "abc"], 60, |_, _| {}).unwrap();
    let expected: Vec<u8> = (0..60).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(out, vec![expected.clone(), expected]);
    let mixed = generate_long(&mut net, &config(), &["xy", "f"], 10, |_, _| {}).unwrap();
    assert_eq!(mixed, [b"xyzabcdefg".to_vec(), b"fghijklmno".to_vec()]);
    let short = generate_long(&mut net, &config(), &[""], 5, |_, _| {}).unwrap();
    assert_eq!(short[0], b"abcde");
}

#[test]
fn infill_templates_fill_each_gap_and_keep_the_rest() {
    let mut net = Alphabet { spec: spec(16, true, Head::Bits) };
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
    let mut net = Alphabet { spec: s };
    assert!(err(generate_long(&mut net, &config(), &["abc"], 3, |_, _| {}).unwrap_err())
        .contains("nothing to generate"));
}

#[test]
fn long_origins_follow_the_windows() {
    use chardiff_runtime::generate::{long_origins, long_windows};
    // window 8: 4 fresh bytes per window after the first.
    assert_eq!(long_windows(8, 16), 3);
    assert_eq!(long_origins(8, 3, 16), [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]);
}
