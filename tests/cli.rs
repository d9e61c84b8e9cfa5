//! The `chardiff` binary: train -> export -> sample through the CLI, and a clear error (exit 1,
//! no panic) for every bad input a user can give.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn chardiff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chardiff")).args(args).output().expect("the binary runs")
}

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/garden.txt")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs and expects failure with a message containing `needle` (and no panic).
fn fails_with(args: &[&str], needle: &str) {
    let out = chardiff(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 1: our errors; 2: clap's usage errors. A panic would be 101.
    assert!(matches!(out.status.code(), Some(1 | 2)), "{args:?} should fail cleanly: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected `{needle}` in: {stderr}");
}

const TINY: &[&str] = &[
    "--window",
    "24",
    "--dim",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--batch",
    "8",
    "--eval-every",
    "20",
    "--checkpoint-every",
    "20",
    "--sample-steps",
    "8",
];

#[test]
fn train_export_sample_and_resume_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let c = corpus();
    let mut args = vec!["train", "--corpus", s(&c), "--out", s(&run), "--steps", "40"];
    args.extend_from_slice(TINY);
    let out = chardiff(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("val"), "evaluations are reported: {log}");
    let curves = std::fs::read_to_string(run.join("curves.svg")).expect("the run draws its curves");
    assert!(curves.contains("<svg") && curves.contains("validation (EMA weights)"));

    // Same directory again: refused, nothing overwritten.
    fails_with(&args, "already holds a training run");
    let resumed = chardiff(&["train", "--out", s(&run), "--resume", "--steps", "60"]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("from step 40"));
    let settings = std::fs::read_to_string(run.join("train.json")).unwrap();
    assert!(settings.contains("\"steps\": 60"), "the new length is kept: {settings}");

    let model = dir.path().join("m.onnx");
    let out = chardiff(&["export", s(&run), "--out", s(&model)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A new run from the exported file takes its network and settings from it: no flags to
    // repeat, and one that contradicts the file is refused.
    let longer = dir.path().join("longer");
    let mut args = vec!["train", "--corpus", s(&c), "--out", s(&longer), "--init-from", s(&model)];
    args.extend_from_slice(&["--steps", "4", "--batch", "8", "--eval-every", "2"]);
    let out = chardiff(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let network = std::fs::read_to_string(longer.join("model.json")).unwrap();
    assert_eq!(network, std::fs::read_to_string(run.join("model.json")).unwrap());
    let settings = std::fs::read_to_string(longer.join("train.json")).unwrap();
    assert!(settings.contains("\"window\": 24") && settings.contains("\"loss\": \"mse\""));
    let deeper = dir.path().join("deeper");
    let args = ["train", "--corpus", s(&c), "--out", s(&deeper), "--init-from", s(&model)];
    let out = chardiff(&[&args[..], &["--layers", "2", "--steps", "2", "--batch", "8"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let network = std::fs::read_to_string(deeper.join("model.json")).unwrap();
    assert!(network.contains("\"layers\": 2"), "grown deeper: {network}");
    let again = dir.path().join("again");
    let args = ["train", "--corpus", s(&c), "--out", s(&again), "--init-from", s(&model)];
    fails_with(&[&args[..], &["--dim", "64"]].concat(), "--dim 64 contradicts");
    fails_with(&[&args[..], &["--window", "32"]].concat(), "only with the same window");
    fails_with(&[&args[..], &["--schedule", "sqrt"]].concat(), "only with the same schedule");
    // Files from before the loss was recorded need --loss: the same file with the field's name
    // changed in place (same length, so the protobuf stays valid; unknown names are ignored).
    let bytes = std::fs::read(&model).unwrap();
    let key = br#""loss":"mse""#;
    let at = bytes.windows(key.len()).position(|w| w == key).expect("the loss recorded");
    let mut older = bytes.clone();
    older[at..at + key.len()].copy_from_slice(br#""lost":"mse""#);
    let older_file = dir.path().join("older.onnx");
    std::fs::write(&older_file, older).unwrap();
    let args = ["train", "--corpus", s(&c), "--out", s(&again), "--init-from", s(&older_file)];
    fails_with(&args, "pass --loss mse or --loss xent");
    let out = chardiff(&[&args[..], &["--loss", "mse", "--steps", "1", "--batch", "8"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Another corpus's characters are refused, and a refused run leaves nothing behind.
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default.onnx");
    let other = dir.path().join("other");
    let args = ["train", "--corpus", s(&c), "--out", s(&other), "--init-from", s(&shipped)];
    fails_with(&args, "the same characters");
    assert!(!other.exists(), "a refused run leaves nothing behind");

    let out =
        chardiff(&["sample", "--model", s(&model), "-n", "3", "--steps", "10", "--seed", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    for line in lines {
        let sample = line.strip_prefix("➜ ").expect("reference-style prefix");
        assert_eq!(sample.len(), 24, "one window of text: {sample:?}");
    }
    let again =
        chardiff(&["sample", "--model", s(&model), "-n", "3", "--steps", "10", "--seed", "1"]);
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text, "same seed, same text");

    // Conditional generation measured on the corpus's validation windows, beside the windows
    // themselves (real text's boundary words are its control for the seamless rate).
    let args = ["eval", "--corpus", s(&c), "--model", s(&model), "--condition", "prefix"];
    let out = chardiff(&[&args[..], &["-n", "4", "--steps", "4", "--json"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["samples"], 4);
    for q in [&report["quality"], &report["validation_windows"]] {
        let seamless = q["seamless_boundary_word_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&seamless), "{q}");
    }

    // The NNEF archive of the same run samples the same text.
    let nnef = dir.path().join("m.nnef.tar");
    let out = chardiff(&["export", s(&run), "--out", s(&nnef), "--format", "nnef"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = chardiff(&["sample", "--model", s(&nnef), "-n", "3", "--steps", "10", "--seed", "1"]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), text, "NNEF and ONNX, same text");

    // int8: calibrated on the sample of the corpus the run kept; an f32 file asked to be int8,
    // and int8 NNEF, are refused.
    // The sample is bytes of the train split: a piece may end inside a UTF-8 sequence.
    let mut sample = std::fs::read(run.join("calibration.txt")).expect("a calibration sample");
    sample.insert(0, 0xc3);
    std::fs::write(run.join("calibration.txt"), &sample).unwrap();
    let int8 = dir.path().join("m.int8.onnx");
    let out = chardiff(&["export", s(&run), "--out", s(&int8), "--precision", "int8"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Either arithmetic, each saying what it does; f32 from the widened weights by default.
    let widened = "int8 weights, computing in f32";
    for (compute, says) in [
        (&["--compute", "int8"][..], "computing in int8"),
        (&["--compute", "f32"], widened),
        (&[], widened),
    ] {
        let args = ["sample", "--model", s(&int8), "-n", "3", "--steps", "10"];
        let out = chardiff(&[&args[..], compute].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.contains(says), "{stderr}");
        assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 3);
    }
    let args = ["bench", "--model", s(&int8), "--compute", "f32", "--batch", "1", "--no-full"];
    let bench = chardiff(&[&args[..], &["--iterations", "2", "--json"]].concat());
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    assert_eq!((&report["precision"], &report["compute"]), (&"int8".into(), &"f32".into()));
    fails_with(
        &["sample", "--model", s(&model), "--precision", "int8"],
        "stores f32 weights, not int8",
    );
    fails_with(&["sample", "--model", s(&model), "--compute", "int8"], "stores f32 weights");
    fails_with(&["sample", "--model", s(&int8), "--compute", "f16"], "does not apply");
    fails_with(
        &["export", s(&run), "--out", s(&nnef), "--format", "nnef", "--precision", "int8"],
        "keep int8 models as ONNX",
    );
    fails_with(
        &["export", s(&run), "--out", s(&int8), "--calibration", s(&c)],
        "--calibration is for --precision int8",
    );
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "the garden").unwrap();
    fails_with(
        &["export", s(&run), "--out", s(&int8), "--precision", "int8", "--calibration", s(&short)],
        "calibration needs at least 24",
    );
    // Unreadable run settings are named, not taken for a run that predates them.
    let settings = std::fs::read(run.join("train.json")).unwrap();
    std::fs::write(run.join("train.json"), "{").unwrap();
    fails_with(
        &["export", s(&run), "--out", s(&int8), "--precision", "int8"],
        "train.json is invalid",
    );
    std::fs::write(run.join("train.json"), settings).unwrap();

    // Sampling settings measured after training become the file's recommendation.
    let tuned = dir.path().join("tuned.onnx");
    let tune = [
        "--steps",
        "7",
        "--td",
        "0",
        "--sampler",
        "ddpm",
        "--guidance",
        "2",
        "--warp",
        "0.6",
        "--self-guidance",
        "2",
        "--temperature",
        "0.7",
        "--self-guidance-on",
        "logits",
        "--refine",
        "1",
    ];
    // Free samples with their own td.
    let free_td = ["--free-td", "1"];
    let export = [&["export", s(&run), "--out", s(&tuned)][..], &tune, &free_td].concat();
    let out = chardiff(&export);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bench = chardiff(&["bench", "--model", s(&tuned), "--batch", "1", "--no-full", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    assert_eq!(report["steps"], 7);
    let sampling = report["sampling"].as_str().unwrap();
    assert_eq!(
        sampling,
        "7 ddpm steps, td 1, warp 0.6, self-guidance 2 on the logits, temperature 0.7, 1 refinement"
    );
    let recommended = chardiff(&["sample", "--model", s(&tuned), "-n", "2", "--prompt", "the"]);
    let explicit = chardiff(
        &[&["sample", "--model", s(&model), "-n", "2", "--prompt", "the"][..], &tune].concat(),
    );
    assert!(recommended.status.success(), "{}", String::from_utf8_lossy(&recommended.stderr));
    assert_eq!(
        recommended.stdout, explicit.stdout,
        "the file's steps, td, step rule, guidance and warp are used"
    );
    let free = |model: &Path, flags: &[&str]| {
        let out = chardiff(&[&["sample", "--model", s(model), "-n", "2"][..], flags].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let mut free_explicit = tune;
    free_explicit[3] = "1"; // --td
    assert_eq!(
        free(&tuned, &[]),
        free(&model, &free_explicit),
        "and its self-guidance, temperature, refinements and td"
    );
    assert_ne!(free(&tuned, &[]), free(&model, &tune));
    assert_ne!(free(&model, &[]), free(&model, &tune));
    // The same settings written into an exported file afterwards.
    let retuned = dir.path().join("retuned.onnx");
    let retune = [&["tune", s(&model), "--out", s(&retuned)][..], &tune, &free_td].concat();
    let out = chardiff(&retune);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let free_settings =
        "td 1, warp 0.6, self-guidance 2 on the logits, temperature 0.7, 1 refinement for free samples";
    assert!(stderr.contains(free_settings), "{stderr}");
    assert!(stderr.contains("td 0, warp 0.6, guidance 2 for prompts"), "{stderr}");
    let from_retuned = chardiff(&["sample", "--model", s(&retuned), "-n", "2", "--prompt", "the"]);
    assert_eq!(from_retuned.stdout, explicit.stdout, "tune records the settings, nothing else");
    assert_eq!(free(&retuned, &[]), free(&tuned, &[]));
    fails_with(&["tune", s(&model), "--out", s(&retuned), "--warp", "0"], "warp must be > 0");
    fails_with(&["tune", s(&model), "--out", s(&retuned), "--free-td=-1"], "td must be >= 0");
    fails_with(
        &["tune", s(&model), "--out", s(&retuned), "--self-guidance=-1"],
        "self-guidance must be >= 0",
    );
    fails_with(&["tune", s(&model), "--out", s(&retuned), "--temperature=-1"], "must be > 0");
    fails_with(&["sample", "--temperature", "0"], "temperature must be > 0");
    fails_with(&["sample", "--self-guidance-on", "bits"], "unknown variant `bits`");
    fails_with(&["tune", s(&short), "--out", s(&retuned)], "is not an ONNX file");
    fails_with(
        &["export", s(&run), "--out", s(&tuned), "--steps", "0"],
        "recommended steps must be > 0",
    );
}

#[test]
fn bad_corpora_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let train = |corpus: &Path| {
        let mut a = vec![
            "train".to_string(),
            "--corpus".into(),
            s(corpus).into(),
            "--out".into(),
            s(&out).into(),
        ];
        a.extend(TINY.iter().map(|x| x.to_string()));
        a
    };
    let run = |args: Vec<String>, needle: &str| {
        fails_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), needle)
    };
    run(train(&dir.path().join("nope.txt")), "cannot read corpus");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    run(train(&empty), "is empty");
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "far too short for a window").unwrap();
    run(train(&short), "too short");
    let binary = dir.path().join("binary.txt");
    std::fs::write(
        &binary,
        [b'a'; 100].iter().chain(&[0xff, 0xfe]).chain(&[b'b'; 900]).copied().collect::<Vec<u8>>(),
    )
    .unwrap();
    run(train(&binary), "not UTF-8 text (invalid byte at offset 100)");
    assert!(!out.join("checkpoint.safetensors").exists());
    fails_with(
        &["train", "--out", s(&dir.path().join("none")), "--resume"],
        "train.json is missing",
    );
}

#[test]
fn bad_models_and_run_directories_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.onnx");
    fails_with(&["sample", "--model", s(&missing)], "cannot read model file");
    let corrupt = dir.path().join("corrupt.onnx");
    std::fs::write(&corrupt, b"\x08\x07this is not protobuf at all\xff\xff\xff").unwrap();
    fails_with(&["sample", "--model", s(&corrupt)], "not an ONNX model");

    // A valid ONNX file from elsewhere: no chardiff metadata.
    let foreign = dir.path().join("foreign.onnx");
    let mut g = chardiff_export::graph::GraphBuilder::default();
    let x = g.input("x", &[chardiff_export::graph::Dim::Fixed(2)]);
    let y = g.node("Relu", &[&x], vec![]);
    g.output("y", &y, &[chardiff_export::graph::Dim::Fixed(2)]);
    std::fs::write(&foreign, prost::Message::encode_to_vec(&g.finish("foreign", vec![]))).unwrap();
    fails_with(&["sample", "--model", s(&foreign)], "no chardiff metadata");

    let empty_run = dir.path().join("run");
    std::fs::create_dir(&empty_run).unwrap();
    fails_with(
        &["export", s(&empty_run), "--out", s(&dir.path().join("x.onnx"))],
        "spec.json is missing",
    );
    assert!(!dir.path().join("x.onnx").exists());
}

#[test]
fn bad_flags_are_refused() {
    fails_with(&["sample", "--sampler", "euler", "--model", "x"], "unknown variant");
    let dir = tempfile::tempdir().unwrap();
    let (c, d) = (corpus(), dir.path().join("run"));
    let args = ["train", "--corpus", s(&c), "--out", s(&d), "--dim", "30", "--heads", "4"];
    fails_with(&args, "multiple of heads");
}
