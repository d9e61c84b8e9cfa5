//! What every build offers, the edge build (`-p char-diffusion --no-default-features`, NNEF only)
//! included: sampling, bench and eval on the shipped default model, and clear errors for files
//! the build cannot read.

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

#[test]
fn threads_split_the_batch_on_every_build_and_matmuls_where_built_in() {
    let one = ok(&["sample", "-n", "3", "--steps", "3", "--threads", "1"]);
    assert_eq!(ok(&["sample", "-n", "3", "--steps", "3", "--threads", "2"]), one);
    let args = ["sample", "-n", "1", "--steps", "3", "--threads", "2", "--parallelism", "matmul"];
    if cfg!(feature = "matmul-threads") {
        ok(&args);
    } else {
        let out = chardiff(&args);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--features matmul-threads"));
    }
    let out = chardiff(&["sample", "-n", "1", "--threads", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads must be at least 1"));
}

fn models(file: &str) -> String {
    format!("{}/models/{file}", env!("CARGO_MANIFEST_DIR"))
}

#[cfg(feature = "onnx")]
#[test]
fn the_nnef_twin_of_the_default_model_is_current_and_samples_the_same_text() {
    let text =
        |model: &str| ok(&["sample", "--model", model, "-n", "2", "--steps", "8", "--seed", "5"]);
    assert_eq!(
        text(&models("default.onnx")),
        text(&models("default.nnef.tar")),
        "models/default.nnef.tar is stale: run `chardiff convert models/default.onnx --out \
         models/default.nnef.tar`"
    );
    let dir = tempfile::tempdir().unwrap();
    let converted = dir.path().join("default.nnef.tar");
    ok(&["convert", &models("default.onnx"), "--out", converted.to_str().unwrap()]);
    assert_eq!(text(&models("default.onnx")), text(converted.to_str().unwrap()));
}

#[cfg(not(feature = "onnx"))]
#[test]
fn an_nnef_only_build_names_the_option_that_reads_onnx() {
    let out = chardiff(&["sample", "--model", &models("default.onnx"), "-n", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features onnx") && err.contains("chardiff convert"), "{err}");
}

#[cfg(feature = "embed-model")]
#[test]
fn the_embedded_model_is_used_without_a_model_file() {
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        "--batch",
        "1",
        "--iterations",
        "1",
        "--no-full",
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["model"], "default model (embedded)");
}

#[test]
fn files_that_are_no_model_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.nnef.tar");
    let mut tar = vec![0u8; 1024];
    tar[257..262].copy_from_slice(b"ustar");
    std::fs::write(&junk, &tar).unwrap();
    let out = chardiff(&["sample", "--model", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a readable NNEF archive"), "{err}");
}
