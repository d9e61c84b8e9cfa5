//! Corpus text: read, optionally cleaned the way the reference implementation does, and split
//! 90/6/4 into train/valid/test. Training learns from it; `eval` takes its vocabulary from it.

use crate::bits::Charset;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preprocess {
    /// The bytes as they are.
    #[default]
    None,
    /// The reference's cleaning: lines joined by a space, runs of spaces collapsed by one pass of
    /// "   " -> " " and one of "  " -> " ", stripped. Gives numbers comparable to the reference.
    Reference,
}

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("cannot read corpus {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("corpus {0} is empty: give a text file to learn from")]
    Empty(PathBuf),
    #[error("corpus {path} is not UTF-8 text (invalid byte at offset {offset}): convert it to UTF-8 first")]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("corpus {path} is too short: {bytes} bytes after preprocessing, but the validation split (6%) must hold one {window}-character window; give at least {needed} bytes or a smaller --window")]
    TooShort { path: PathBuf, bytes: usize, window: usize, needed: usize },
}

pub struct Corpus {
    /// File name, for provenance.
    pub name: String,
    /// sha256 of the file as read, hex.
    pub sha256: String,
    pub train: Vec<u8>,
    pub valid: Vec<u8>,
    pub test: Vec<u8>,
    /// Every byte value the (preprocessed) corpus uses.
    pub charset: Charset,
}

impl Corpus {
    pub fn load(path: &Path, preprocess: Preprocess, window: usize) -> Result<Corpus, CorpusError> {
        let raw = std::fs::read(path)
            .map_err(|source| CorpusError::Io { path: path.to_path_buf(), source })?;
        let bytes = preprocessed(path, &raw, preprocess)?;
        let n = bytes.len();
        let (train_end, valid_end) = (n * 90 / 100, n * 96 / 100);
        if valid_end - train_end < window {
            return Err(CorpusError::TooShort {
                path: path.to_path_buf(),
                bytes: n,
                window,
                needed: (window * 100).div_ceil(6) + 1,
            });
        }
        Ok(Corpus {
            name: path.file_name().map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
            sha256: sha256_hex(&raw),
            charset: Charset::of(&bytes),
            train: bytes[..train_end].to_vec(),
            valid: bytes[train_end..valid_end].to_vec(),
            test: bytes[valid_end..].to_vec(),
        })
    }
}

/// A text file as training sees it: non-empty UTF-8, cleaned the `preprocess` way.
pub fn read_text(path: &Path, preprocess: Preprocess) -> Result<Vec<u8>, CorpusError> {
    let raw = std::fs::read(path)
        .map_err(|source| CorpusError::Io { path: path.to_path_buf(), source })?;
    preprocessed(path, &raw, preprocess)
}

fn preprocessed(path: &Path, raw: &[u8], preprocess: Preprocess) -> Result<Vec<u8>, CorpusError> {
    if raw.is_empty() {
        return Err(CorpusError::Empty(path.to_path_buf()));
    }
    let text = std::str::from_utf8(raw)
        .map_err(|e| CorpusError::NotUtf8 { path: path.to_path_buf(), offset: e.valid_up_to() })?;
    Ok(match preprocess {
        Preprocess::None => raw.to_vec(),
        Preprocess::Reference => reference_clean(text).into_bytes(),
    })
}

/// `n` windows of `window` bytes at evenly spaced starts: fixed real text to compare samples with.
pub fn spaced_windows(data: &[u8], window: usize, n: usize) -> Vec<&[u8]> {
    (0..n).map(|i| i * (data.len() - window) / n.max(1)).map(|s| &data[s..s + window]).collect()
}

pub fn reference_clean(text: &str) -> String {
    let joined = text.lines().collect::<Vec<_>>().join(" ");
    joined.replace("   ", " ").replace("  ", " ").trim().to_string()
}

/// The SHA-256 of `bytes` in lowercase hex, as model files and run settings record it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_cleaning_matches_the_python_one() {
        // " ".join(lines) then one pass of "   " -> " " and one of "  " -> " ", then strip.
        assert_eq!(reference_clean("a\nb\n\nc  d     e\n"), "a b c d  e");
        assert_eq!(reference_clean("  x\n\n\n\ny "), "x y");
        assert_eq!(reference_clean("p\n\n\n\n\nq"), "p  q"); // one double space survives
    }
}
