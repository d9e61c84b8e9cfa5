//! Conditional generation on top of the sampler: continue a prompt, fill the gaps of a template,
//! and write text longer than one window by sliding (each window conditioned on the tail of the
//! previous one).

use crate::denoiser::Denoiser;
use crate::metrics::is_word_byte;
use crate::sampler::{sample, SampleError, SamplerConfig};
use crate::spec::ModelSpec;

/// The character of an infill template that marks one character to generate.
pub const GAP: char = '_';
/// Escapes a literal `_` (as `\_`) or `\` (as `\\`) in a template.
pub const ESCAPE: char = '\\';

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is {len} bytes, but the model's window is {window} characters: a prompt may be at most {max} bytes so that something is left to generate")]
    PromptTooLong { len: usize, window: usize, max: usize },
    #[error("the infill template is {len} bytes, longer than the model's window of {window}")]
    TemplateTooLong { len: usize, window: usize },
    #[error("the infill template has no gap: mark each character to generate with `_` (write `\\_` for a literal underscore)")]
    NoGap,
    #[error("the infill template ends in a lone `\\`: write `\\\\` for a literal backslash")]
    DanglingEscape,
    #[error("{what} contains {ch:?}, which the model never saw in training (its charset has {size} characters)")]
    Foreign { what: &'static str, ch: char, size: usize },
    #[error("a length of {length} leaves nothing to generate after a prompt of {prompt} bytes")]
    Length { length: usize, prompt: usize },
    #[error(transparent)]
    Sample(#[from] SampleError),
}

/// Known characters of one window for a prompt: the prompt's bytes, then unknowns.
pub fn prompt_known(spec: &ModelSpec, prompt: &str) -> Result<Vec<Option<u8>>, GenerateError> {
    let (len, window) = (prompt.len(), spec.window);
    if len >= window {
        return Err(GenerateError::PromptTooLong { len, window, max: window - 1 });
    }
    check_charset(spec, prompt, "the prompt")?;
    let mut known: Vec<Option<u8>> = prompt.bytes().map(Some).collect();
    known.resize(window, None);
    Ok(known)
}

/// Parses an infill template (`_` = generate one character; `\_`, `\\` = literal) into the known
/// characters of one window (unknown after the template's end), and the template's length.
pub fn infill_known(
    spec: &ModelSpec,
    template: &str,
) -> Result<(Vec<Option<u8>>, usize), GenerateError> {
    let mut known = Vec::new();
    let mut chars = template.chars();
    let mut literal = String::new();
    while let Some(c) = chars.next() {
        let c = match c {
            ESCAPE => chars.next().ok_or(GenerateError::DanglingEscape)?,
            GAP => {
                known.push(None);
                continue;
            }
            c => c,
        };
        literal.push(c);
        let mut buf = [0u8; 4];
        known.extend(c.encode_utf8(&mut buf).bytes().map(Some));
    }
    if known.iter().all(Option::is_some) {
        return Err(GenerateError::NoGap);
    }
    if known.len() > spec.window {
        return Err(GenerateError::TemplateTooLong { len: known.len(), window: spec.window });
    }
    check_charset(spec, &literal, "the infill template")?;
    let len = known.len();
    known.resize(spec.window, None);
    Ok((known, len))
}

fn check_charset(spec: &ModelSpec, text: &str, what: &'static str) -> Result<(), GenerateError> {
    let mut buf = [0u8; 4];
    for ch in text.chars() {
        if !ch.encode_utf8(&mut buf).bytes().all(|b| spec.charset.contains(b)) {
            return Err(GenerateError::Foreign { what, ch, size: spec.charset.len() });
        }
    }
    Ok(())
}

/// A text of `generate_long` and, per byte, the pass that wrote it: 0 for the prompt, w + 1 for
/// window w.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LongText {
    pub text: Vec<u8>,
    pub origins: Vec<u8>,
}

/// One text of `length` bytes per prompt, the prompt included: the first window continues the
/// prompt (which may be empty), each further window keeps the last `long_overlap` bytes of the
/// text so far as its known prefix and generates the rest. All texts are sampled together as
/// one batch; `progress` gets the bytes written so far (the shortest text's) and `length`.
///
/// Seams fall between words: before the next window, a text gives back the word that the
/// previous window's right edge cut (at most `long_redo` bytes after its last separator), so the
/// next window writes that word whole with its left context known, instead of completing a word
/// whose start was written without seeing the rest.
pub fn generate_long<D: Denoiser + ?Sized>(
    net: &mut D,
    config: &SamplerConfig,
    prompts: &[&str],
    length: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<LongText>, GenerateError> {
    let n = prompts.len();
    if let Some(long) = prompts.iter().find(|p| p.len() >= length) {
        return Err(GenerateError::Length { length, prompt: long.len() });
    }
    let spec = net.spec().clone();
    let window = spec.window;
    let mut first = Vec::with_capacity(n * window);
    for prompt in prompts {
        first.extend(prompt_known(&spec, prompt)?);
    }
    let (overlap, redo) = (long_overlap(window), long_redo(window));
    let fresh = window - overlap;
    let mut texts: Vec<LongText> = prompts
        .iter()
        .map(|p| LongText { text: p.as_bytes().to_vec(), origins: vec![0; p.len()] })
        .collect();
    let shortest = |texts: &[LongText]| texts.iter().map(|t| t.text.len()).min().unwrap_or(length);
    let (mut w, mut shown) = (0, 0);
    while shortest(&texts) < length {
        let known: Vec<Option<u8>> = if w == 0 {
            first.clone()
        } else {
            texts
                .iter()
                .flat_map(|t| {
                    let tail = &t.text[t.text.len() - overlap..];
                    tail.iter().map(|&b| Some(b)).chain(std::iter::repeat_n(None, fresh))
                })
                .collect()
        };
        // A different seed per window: the same noise in every window would echo itself.
        let cfg = SamplerConfig { seed: config.seed.wrapping_add(w as u64), ..config.clone() };
        let done = shortest(&texts);
        let out = sample(net, &cfg, n, Some(&known), |i, steps| {
            // Given-back words can take the estimate back a little: the bar never goes back.
            shown = (done + fresh * i / steps.max(1)).min(length).max(shown);
            progress(shown, length)
        })?;
        for ((t, prompt), window_text) in texts.iter_mut().zip(prompts).zip(out) {
            if t.text.len() >= length {
                continue;
            }
            let new = if w == 0 { &window_text[prompt.len()..] } else { &window_text[overlap..] };
            t.text.extend_from_slice(new);
            t.origins.resize(t.text.len(), (w + 1).min(255) as u8);
            // Give back the word the window's edge cut, unless it is the end or too long.
            if t.text.len() < length {
                let from = t.text.len().saturating_sub(redo + 1).max(prompt.len());
                if let Some(sep) = t.text[from..].iter().rposition(|&b| !is_word_byte(b)) {
                    t.text.truncate(from + sep + 1);
                    t.origins.truncate(from + sep + 1);
                }
            }
        }
        w += 1;
    }
    for t in &mut texts {
        t.text.truncate(length);
        t.origins.truncate(length);
    }
    progress(length, length);
    Ok(texts)
}

/// Bytes of the previous text each further window of `generate_long` keeps as known prefix.
pub fn long_overlap(window: usize) -> usize {
    window / 2
}

/// The most bytes `generate_long` gives back at a window's edge to move a seam between words:
/// half of each window's fresh bytes, so every window still adds at least the other half.
pub fn long_redo(window: usize) -> usize {
    (window - long_overlap(window)) / 2
}
