//! What every build offers, the edge build (`--no-default-features`) included: sampling, bench
//! and eval on the shipped default model.

use std::process::{Command, Output};

fn chardiff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chardiff")).args(args).output().expect("the binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = chardiff(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_shipped_model_samples_with_and_without_a_prompt() {
    let text = ok(&["sample", "-n", "2", "--steps", "10"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l.starts_with("➜ ")));
    let text = ok(&["sample", "-n", "1", "--steps", "10", "--prompt", "Prince Andrew"]);
    assert!(text.starts_with("➜ Prince Andrew"), "{text}");
}

#[test]
fn bench_and_eval_run_on_the_shipped_model() {
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        "--batch",
        "1,2",
        "--iterations",
        "2",
        "--no-full",
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["rows"].as_array().unwrap().len(), 2);
    assert!(report["rows"][0]["median_ms"].as_f64().unwrap() > 0.0);
    let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/garden.txt");
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "eval", "--corpus", corpus, "-n", "2", "--steps", "5", "--json",
    ]))
    .unwrap();
    assert_eq!(report["samples"]["samples"], 2);
}

#[test]
fn the_device_option_is_checked() {
    let out = chardiff(&["sample", "-n", "1", "--steps", "2", "--device", "auto"]);
    assert!(
        out.status.success(),
        "auto always finds a device: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !cfg!(feature = "cuda") {
        let out = chardiff(&["sample", "-n", "1", "--steps", "2", "--device", "cuda"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--features cuda"));
    }
}
