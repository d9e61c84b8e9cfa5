//! Model-free sample quality, the way the reference's figures were measured: the share of interior
//! words found in the training text's vocabulary, character entropy, repetition and diversity.

use crate::bits::Charset;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// Lower-cased words of a text: maximal runs of alphabetic characters.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphabetic()).filter(|w| !w.is_empty()).map(str::to_lowercase)
}

/// Whether a byte of UTF-8 text belongs to a word: ASCII letters, and every byte of a multi-byte
/// character (continuation and lead bytes), so accented words stay whole.
pub fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphabetic() || b >= 0x80
}

/// The set of lower-cased words of a text (e.g. a corpus' train split).
pub fn vocabulary(text: &str) -> HashSet<String> {
    words(text).collect()
}

/// Tokens of a window without its first and last one, which the window's edges may have cut.
pub fn interior_words(sample: &str) -> Vec<String> {
    let all: Vec<String> = words(sample).collect();
    if all.len() <= 2 {
        return vec![];
    }
    all[1..all.len() - 1].to_vec()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub samples: usize,
    /// Share of interior words found in the vocabulary (0..1).
    pub word_rate: f64,
    pub interior_words: usize,
    /// Shannon entropy of the characters of all samples together, bits.
    pub char_entropy: f64,
    /// Share of word 4-grams that repeat an earlier 4-gram of the same sample.
    pub repeated_4gram_rate: f64,
    /// Distinct word bigrams over all bigrams, across samples.
    pub distinct_2: f64,
    /// Share of bytes that do not occur in the corpus at all.
    pub foreign_byte_rate: f64,
}

/// Measures samples (one window each) against a corpus vocabulary and charset.
pub fn quality(samples: &[Vec<u8>], vocabulary: &HashSet<String>, charset: &Charset) -> Quality {
    let texts: Vec<String> =
        samples.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    let interior: Vec<String> = texts.iter().flat_map(|t| interior_words(t)).collect();
    let found = interior.iter().filter(|w| vocabulary.contains(*w)).count();

    let (mut repeated, mut fourgrams, mut bigrams, mut total_bigrams) = (0, 0, HashSet::new(), 0);
    for text in &texts {
        let w: Vec<String> = words(text).collect();
        let mut seen = HashSet::new();
        for gram in w.windows(4) {
            fourgrams += 1;
            if !seen.insert(gram) {
                repeated += 1;
            }
        }
        for pair in w.windows(2) {
            total_bigrams += 1;
            bigrams.insert(pair.to_vec());
        }
    }
    let bytes: usize = samples.iter().map(Vec::len).sum();
    let foreign = samples.iter().flatten().filter(|&&b| !charset.contains(b)).count();
    Quality {
        samples: samples.len(),
        word_rate: ratio(found, interior.len()),
        interior_words: interior.len(),
        char_entropy: char_entropy(texts.iter().flat_map(|t| t.chars())),
        repeated_4gram_rate: ratio(repeated, fourgrams),
        distinct_2: ratio(bigrams.len(), total_bigrams),
        foreign_byte_rate: ratio(foreign, bytes),
    }
}

/// Shannon entropy of a character distribution, in bits.
pub fn char_entropy(chars: impl Iterator<Item = char>) -> f64 {
    let mut counts: HashMap<char, usize> = HashMap::new();
    let mut n = 0usize;
    for c in chars {
        *counts.entry(c).or_default() += 1;
        n += 1;
    }
    counts.values().map(|&c| c as f64 / n as f64).map(|p| -p * p.log2()).sum()
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interior_words_drop_the_edges_and_lowercase() {
        assert_eq!(interior_words("ing The cat, sat on th"), ["the", "cat", "sat", "on"]);
        assert!(interior_words("two words").is_empty());
        assert_eq!(words("Ça va? Très-bien").collect::<Vec<_>>(), ["ça", "va", "très", "bien"]);
    }

    #[test]
    fn quality_of_hand_made_samples() {
        let vocab = vocabulary("the cat sat on the mat and the dog");
        let charset = Charset::of(b"the cat sat on mat and dog xq");
        let samples = vec![
            b"xx the cat sat on the mat yy".to_vec(), // interior: the cat sat on the mat: 6/6
            b"a qqq the zzz b".to_vec(),              // interior: qqq the zzz: 1/3
        ];
        let q = quality(&samples, &vocab, &charset);
        assert_eq!(q.interior_words, 9);
        assert!((q.word_rate - 7.0 / 9.0).abs() < 1e-12);
        assert_eq!(q.repeated_4gram_rate, 0.0);
        assert!(q.foreign_byte_rate > 0.0); // 'y', 'b' are not in the charset
        let rep = quality(&[b"a b c d a b c d a b c d".to_vec()], &vocab, &charset);
        // 9 four-grams, 5 of them repeats of an earlier one.
        assert!((rep.repeated_4gram_rate - 5.0 / 9.0).abs() < 1e-12);
        assert!((rep.distinct_2 - 4.0 / 11.0).abs() < 1e-12);
    }

    #[test]
    fn entropy_of_known_distributions() {
        assert_eq!(char_entropy("aaaa".chars()), 0.0);
        assert!((char_entropy("abab".chars()) - 1.0).abs() < 1e-12);
        assert!((char_entropy("abcd".chars()) - 2.0).abs() < 1e-12);
    }
}

/// Word rates of text generated beside other text: words wholly inside one generated span, and
/// words that straddle a boundary (known|generated, or two generation passes). `origins` gives,
/// per byte, 0 for a known byte and k >= 1 for a byte generated by pass k. Words cut by the
/// text's ends and words wholly known are not counted.
///
/// A boundary (a gap between two bytes) cuts a word of n letters at any of its n - 1 inner gaps,
/// so boundary words are longer than generated ones on average, and long words are harder to get
/// right: the fair comparison for the boundary rate is the rate of generated words weighted by
/// n - 1, the rate boundary words would have if the boundary changed nothing (the average over
/// every place a boundary could be put in the generated text; real text's boundary words meet
/// it, its plain interior rate does not).
///
/// Generated words that touch a boundary without straddling it (it falls on the separator next
/// to them: a prompt ending in a space, or `generate_long`'s seams, which are placed between
/// words) are counted among the generated words and also apart, as words at a boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeamQuality {
    pub generated_words: usize,
    pub generated_word_rate: f64,
    /// Generated words weighted by their inner gaps (length - 1): what `boundary_word_rate`
    /// would be if the boundary changed nothing.
    pub seamless_boundary_word_rate: f64,
    pub generated_mean_length: f64,
    pub boundary_words: usize,
    pub boundary_word_rate: f64,
    pub boundary_mean_length: f64,
    /// Generated words next to a boundary that falls on a separator beside them.
    pub adjacent_words: usize,
    pub adjacent_word_rate: f64,
    /// Character entropy of the generated bytes, bits: what leaning on the known text (guidance)
    /// costs in diversity shows here.
    pub generated_char_entropy: f64,
}

pub fn seam_quality(texts: &[(Vec<u8>, Vec<u8>)], vocabulary: &HashSet<String>) -> SeamQuality {
    let (mut inside, mut inside_found, mut seam, mut seam_found) = (0, 0, 0, 0);
    let (mut adjacent, mut adjacent_found) = (0, 0);
    // Bytes of generated words, inner gaps of generated words (all, and of found words), bytes
    // of boundary words.
    let (mut inside_bytes, mut seam_bytes) = (0, 0);
    let (mut inside_gaps, mut inside_found_gaps) = (0, 0);
    for (text, origins) in texts {
        let mut start = 0;
        while start < text.len() {
            if !is_word_byte(text[start]) {
                start += 1;
                continue;
            }
            let end = (start..text.len()).find(|&i| !is_word_byte(text[i])).unwrap_or(text.len());
            let cut = start == 0 || end == text.len();
            let span = &origins[start..end];
            if !cut && span.iter().any(|&o| o != 0) {
                let word = String::from_utf8_lossy(&text[start..end]).to_lowercase();
                let found = usize::from(vocabulary.contains(&word));
                let len = end - start;
                if span.iter().all(|&o| o == span[0]) {
                    (inside, inside_found) = (inside + 1, inside_found + found);
                    inside_bytes += len;
                    (inside_gaps, inside_found_gaps) =
                        (inside_gaps + len - 1, inside_found_gaps + found * (len - 1));
                    // The separators on either side (the word is not cut, so both exist).
                    if origins[start - 1] != span[0] || origins[end] != span[0] {
                        (adjacent, adjacent_found) = (adjacent + 1, adjacent_found + found);
                    }
                } else {
                    (seam, seam_found, seam_bytes) =
                        (seam + 1, seam_found + found, seam_bytes + len);
                }
            }
            start = end;
        }
    }
    SeamQuality {
        generated_words: inside,
        generated_word_rate: ratio(inside_found, inside),
        seamless_boundary_word_rate: ratio(inside_found_gaps, inside_gaps),
        generated_mean_length: ratio(inside_bytes, inside),
        boundary_words: seam,
        boundary_word_rate: ratio(seam_found, seam),
        boundary_mean_length: ratio(seam_bytes, seam),
        adjacent_words: adjacent,
        adjacent_word_rate: ratio(adjacent_found, adjacent),
        generated_char_entropy: char_entropy(texts.iter().flat_map(|(text, origins)| {
            text.iter().zip(origins).filter(|(_, &o)| o != 0).map(|(&b, _)| char::from(b))
        })),
    }
}

#[cfg(test)]
mod seam_tests {
    use super::*;

    #[test]
    fn words_are_sorted_into_generated_and_boundary() {
        let vocab = vocabulary("the cat sat on a mat");
        //            known: "xx the c", generated: "at sat zz on yy"
        let text = b"xx the cat sat zz on yy".to_vec();
        let origins: Vec<u8> = (0..text.len()).map(|i| u8::from(i >= 8)).collect();
        let q = seam_quality(&[(text, origins)], &vocab);
        // boundary: "cat" (found); generated: "sat", "zz", "on" (2 of 3); "xx", "yy" are cut,
        // "the" is wholly known.
        assert_eq!((q.boundary_words, q.boundary_word_rate), (1, 1.0));
        assert_eq!(q.generated_words, 3);
        assert!((q.generated_word_rate - 2.0 / 3.0).abs() < 1e-12);
        // "sat" and "on" found, "zz" not: 3 of 4 inner gaps; lengths 7 / 3 and 3.
        assert!((q.seamless_boundary_word_rate - 3.0 / 4.0).abs() < 1e-12);
        assert!((q.generated_mean_length - 7.0 / 3.0).abs() < 1e-12);
        assert_eq!(q.boundary_mean_length, 3.0);
        assert_eq!(q.adjacent_words, 0);
        let generated = "at sat zz on yy".chars();
        assert!((q.generated_char_entropy - char_entropy(generated)).abs() < 1e-12);
    }

    #[test]
    fn the_seamless_rate_is_the_boundary_rate_of_a_boundary_put_anywhere() {
        let vocab = vocabulary("the cat sat on a mat");
        let text = b"xx a catalog on the mat zz sat the matt, a cat yy".to_vec();
        let everywhere: Vec<(Vec<u8>, Vec<u8>)> = (1..text.len())
            .map(|h| (text.clone(), (0..text.len()).map(|i| u8::from(i >= h)).collect()))
            .collect();
        let boundaries = seam_quality(&everywhere, &vocab);
        let generated = seam_quality(&[(text.clone(), vec![1; text.len()])], &vocab);
        assert!(boundaries.boundary_words > 0);
        let (seam, seamless) =
            (boundaries.boundary_word_rate, generated.seamless_boundary_word_rate);
        assert!((seam - seamless).abs() < 1e-12, "{seam} vs {seamless}");
        // The plain rate counts short words as much as long ones, and the one-letter "a" too,
        // which no boundary cuts.
        assert!(generated.generated_word_rate > seamless);
    }

    #[test]
    fn words_beside_a_boundary_on_a_separator_are_counted_apart() {
        let vocab = vocabulary("the cat sat on a mat");
        // two passes meeting on the space after "cat": "xx the cat " | "sat zz on yy"
        let text = b"xx the cat sat zz on yy".to_vec();
        let origins: Vec<u8> = (0..text.len()).map(|i| 1 + u8::from(i >= 11)).collect();
        let q = seam_quality(&[(text, origins)], &vocab);
        // no word straddles; "sat" starts at the boundary; "the", "cat", "zz", "on" are inside.
        assert_eq!(q.boundary_words, 0);
        assert_eq!((q.generated_words, q.adjacent_words, q.adjacent_word_rate), (5, 1, 1.0));
    }
}
