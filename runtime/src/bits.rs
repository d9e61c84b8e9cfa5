//! Text as analog bits: every byte becomes `BITS` real numbers in {-b, +b} (MSB first), under a
//! binary or Gray code, and the corpus charset that a softmax head (and its decoding) is restricted to.

use serde::{Deserialize, Serialize};

/// Bits per character: the model works on UTF-8 bytes.
pub const BITS: usize = 8;

/// How a byte is written as bits before mapping {0, 1} -> {-b, +b}.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BitCode {
    Binary,
    /// Neighbouring byte values differ in one bit.
    Gray,
}

impl BitCode {
    pub fn encode(self, byte: u8) -> u8 {
        match self {
            BitCode::Binary => byte,
            BitCode::Gray => byte ^ (byte >> 1),
        }
    }

    pub fn decode(self, word: u8) -> u8 {
        match self {
            BitCode::Binary => word,
            BitCode::Gray => {
                let (mut byte, mut shift) = (word, word >> 1);
                while shift != 0 {
                    byte ^= shift;
                    shift >>= 1;
                }
                byte
            }
        }
    }
}

/// The map between bytes and analog bit vectors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnalogBits {
    pub code: BitCode,
    /// b: a 1 bit becomes +b, a 0 bit -b.
    pub scale: f32,
}

impl AnalogBits {
    /// Writes the `BITS` analog bits of `byte` into `out`.
    pub fn encode_byte(&self, byte: u8, out: &mut [f32]) {
        let word = self.code.encode(byte);
        for (i, x) in out[..BITS].iter_mut().enumerate() {
            let bit = (word >> (BITS - 1 - i)) & 1;
            *x = if bit == 1 { self.scale } else { -self.scale };
        }
    }

    /// `bytes.len() * BITS` analog bits.
    pub fn encode(&self, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0.0; bytes.len() * BITS];
        for (byte, chunk) in bytes.iter().zip(out.chunks_exact_mut(BITS)) {
            self.encode_byte(*byte, chunk);
        }
        out
    }

    /// Threshold decoding: a bit is 1 when strictly positive.
    pub fn decode(&self, x: &[f32]) -> Vec<u8> {
        x.chunks_exact(BITS)
            .map(|chunk| {
                let word = chunk.iter().fold(0u8, |w, &v| (w << 1) | u8::from(v > 0.0));
                self.code.decode(word)
            })
            .collect()
    }

    /// Decoding restricted to a charset: the byte whose analog code is nearest to each vector.
    /// Over all 256 bytes this equals threshold decoding.
    pub fn decode_nearest(&self, x: &[f32], charset: &Charset) -> Vec<u8> {
        let codes = self.codes(charset);
        x.chunks_exact(BITS)
            .map(|chunk| {
                let score = |code: &[f32]| chunk.iter().zip(code).map(|(a, b)| a * b).sum::<f32>();
                let best = codes
                    .chunks_exact(BITS)
                    .enumerate()
                    .max_by(|(_, a), (_, b)| score(a).total_cmp(&score(b)))
                    .map_or(0, |(i, _)| i);
                charset.bytes()[best]
            })
            .collect()
    }

    /// The analog codes of the charset's bytes, row-major [charset.len(), BITS]: the constant
    /// matrix of the softmax-factorized head.
    pub fn codes(&self, charset: &Charset) -> Vec<f32> {
        self.encode(charset.bytes())
    }
}

/// The softmax head's x0: at each position, the mean of the charset's `codes` ([V, BITS], from
/// `AnalogBits::codes`) under softmax(logits / temperature), for `logits` [n, V] into `x0`
/// [n, BITS]. At temperature 1 it is what the exported graph's head computes (tested against
/// it); below 1 each distribution is sharper, and x0 nearer the code of its likeliest character.
pub fn mean_code(codes: &[f32], logits: &[f32], temperature: f32, x0: &mut [f32]) {
    let v = codes.len() / BITS;
    let mut weights = [0.0f32; 256];
    for (logits, x) in logits.chunks_exact(v).zip(x0.chunks_exact_mut(BITS)) {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights = &mut weights[..v];
        for (w, &l) in weights.iter_mut().zip(logits) {
            *w = ((l - max) / temperature).exp();
        }
        let total: f32 = weights.iter().sum();
        x.fill(0.0);
        for (&w, code) in weights.iter().zip(codes.chunks_exact(BITS)) {
            for (x, &c) in x.iter_mut().zip(code) {
                *x += w / total * c;
            }
        }
    }
}

/// The sorted set of byte values a corpus uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct Charset(Vec<u8>);

impl Charset {
    pub fn of(text: &[u8]) -> Charset {
        let mut seen = [false; 256];
        for &b in text {
            seen[b as usize] = true;
        }
        Charset((0..=255u8).filter(|&b| seen[b as usize]).collect())
    }

    pub fn all_bytes() -> Charset {
        Charset((0..=255u8).collect())
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn index_of(&self, byte: u8) -> Option<usize> {
        self.0.binary_search(&byte).ok()
    }

    pub fn contains(&self, byte: u8) -> bool {
        self.index_of(byte).is_some()
    }
}

impl TryFrom<Vec<u8>> for Charset {
    type Error = String;

    fn try_from(mut bytes: Vec<u8>) -> Result<Self, String> {
        let n = bytes.len();
        bytes.sort_unstable();
        bytes.dedup();
        if bytes.len() != n || n == 0 {
            return Err("a charset is a non-empty list of distinct bytes".into());
        }
        Ok(Charset(bytes))
    }
}

impl From<Charset> for Vec<u8> {
    fn from(c: Charset) -> Vec<u8> {
        c.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_softmax_mean_code_sharpens_toward_the_likeliest_character() {
        let bits = AnalogBits { code: BitCode::Gray, scale: 1.0 };
        let charset = Charset::of(b"abc");
        let codes = bits.codes(&charset);
        let mut x0 = [0.0f32; BITS];
        // Equal logits: the plain mean of the codes, whatever the temperature.
        let mean: Vec<f32> =
            (0..BITS).map(|i| (codes[i] + codes[BITS + i] + codes[16 + i]) / 3.0).collect();
        for temperature in [1.0, 0.3] {
            mean_code(&codes, &[2.0; 3], temperature, &mut x0);
            assert!(x0.iter().zip(&mean).all(|(a, b)| (a - b).abs() < 1e-6), "{x0:?}");
        }
        // At temperature 1 the softmax weights themselves: p = softmax([0, ln 3, 0]) = (.2, .6, .2).
        mean_code(&codes, &[0.0, 3f32.ln(), 0.0], 1.0, &mut x0);
        for i in 0..BITS {
            let expected = 0.2 * codes[i] + 0.6 * codes[BITS + i] + 0.2 * codes[16 + i];
            assert!((x0[i] - expected).abs() < 1e-6);
        }
        // Cooler: nearer b's code; at a tiny temperature, b's code.
        let distance =
            |x: &[f32]| x.iter().zip(&codes[BITS..16]).map(|(a, b)| (a - b).abs()).sum::<f32>();
        let warm = distance(&x0);
        mean_code(&codes, &[0.0, 3f32.ln(), 0.0], 0.5, &mut x0);
        assert!(distance(&x0) < warm);
        mean_code(&codes, &[0.0, 3f32.ln(), 0.0], 1e-3, &mut x0);
        assert!(distance(&x0) < 1e-6, "{x0:?}");
    }

    #[test]
    fn every_byte_round_trips_under_both_codes() {
        let all: Vec<u8> = (0..=255).collect();
        for code in [BitCode::Binary, BitCode::Gray] {
            let bits = AnalogBits { code, scale: 0.7 };
            let x = bits.encode(&all);
            assert!(x.iter().all(|v| v.abs() == 0.7));
            assert_eq!(bits.decode(&x), all);
            assert_eq!(bits.decode_nearest(&x, &Charset::all_bytes()), all);
        }
    }

    #[test]
    fn binary_is_msb_first_and_gray_neighbours_differ_in_one_bit() {
        let bits = AnalogBits { code: BitCode::Binary, scale: 1.0 };
        assert_eq!(bits.encode(b"A"), [-1., 1., -1., -1., -1., -1., -1., 1.]);
        for b in 0..255u8 {
            let diff = BitCode::Gray.encode(b) ^ BitCode::Gray.encode(b + 1);
            assert_eq!(diff.count_ones(), 1);
        }
    }

    #[test]
    fn nearest_decoding_stays_in_the_charset() {
        let charset = Charset::of(b"ab");
        let bits = AnalogBits { code: BitCode::Binary, scale: 1.0 };
        let mut x = bits.encode(b"c"); // 'c' = 'a' with one more bit: nearest is 'a' or 'b'
        x[7] *= 0.5;
        let decoded = bits.decode_nearest(&x, &charset);
        assert!(charset.contains(decoded[0]));
        assert_eq!(bits.decode(&x), b"c");
    }

    #[test]
    fn charset_is_sorted_and_refuses_duplicates() {
        assert_eq!(Charset::of(b"cabba").bytes(), b"abc");
        assert!(Charset::try_from(vec![1, 1]).is_err());
        assert!(Charset::try_from(vec![]).is_err());
    }
}
