//! A run stopped and resumed ends bit-identical to an uninterrupted one; a diverging run stops
//! with the step named and its last good checkpoint intact; a second trainer in a working run is
//! refused; every batch size is validated on the same windows.

use chardiff_runtime::Head;
use chardiff_train::checkpoint::Checkpoint;
use chardiff_train::{Activation, AttentionBias, ModelConfig, TrainConfig, TrainError, Trainer};
use std::path::{Path, PathBuf};

fn config(steps: u64) -> TrainConfig {
    TrainConfig {
        corpus: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/garden.txt"),
        window: 16,
        steps,
        batch: 4,
        warmup: 5,
        eval_every: 7,
        checkpoint_every: 5,
        val_batches: 1,
        eval_samples: 0,
        ..TrainConfig::default()
    }
}

fn model() -> ModelConfig {
    ModelConfig {
        dim: 16,
        layers: 1,
        heads: 2,
        ffn: 32,
        activation: Activation::Silu,
        attention_bias: AttentionBias::Relative,
    }
}

fn saved(dir: &Path) -> Checkpoint {
    Checkpoint::load(dir).unwrap()
}

#[test]
fn stopping_and_resuming_is_bit_identical_to_an_uninterrupted_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    Trainer::create(a.path(), config(23), model()).unwrap().run(|_| {}).unwrap();

    let mut first = Trainer::create(b.path(), config(23), model()).unwrap();
    first.run_until(12, |_| {}).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(b.path(), None).unwrap();
    assert_eq!(resumed.step(), 12);
    resumed.run(|_| {}).unwrap();

    let (x, y) = (saved(a.path()), saved(b.path()));
    assert_eq!(x.metadata.get("step"), y.metadata.get("step"));
    assert_eq!(x.metadata.get("rng_word_pos"), y.metadata.get("rng_word_pos"));
    assert_eq!(x.tensors.len(), y.tensors.len());
    for (name, t) in &x.tensors {
        let u = &y.tensors[name];
        let (p, q) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            u.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(p.iter().zip(&q).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} differs");
    }
}

#[test]
fn a_second_trainer_in_the_same_run_is_refused_while_the_first_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Trainer::create(dir.path(), config(23), model()).unwrap();
    first.run_until(3, |_| {}).unwrap();
    let err = Trainer::resume(dir.path(), Some(30)).err().expect("refused while the first runs");
    assert!(err.to_string().contains("another `chardiff train`"), "{err}");
    let settings = std::fs::read_to_string(dir.path().join("train.json")).unwrap();
    assert!(settings.contains("\"steps\": 23"), "nothing rewritten: {settings}");
    drop(first);
    assert_eq!(Trainer::resume(dir.path(), None).unwrap().step(), 3);
}

#[test]
fn divergence_names_the_step_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let wild = TrainConfig {
        lr: 1e9,
        warmup: 1,
        clip_norm: 0.0,
        head: Head::Bits,
        checkpoint_every: 1,
        ..config(500)
    };
    let err = Trainer::create(dir.path(), wild, model()).unwrap().run(|_| {}).unwrap_err();
    let TrainError::Diverged { step, .. } = err else { panic!("expected divergence, got {err}") };
    assert!(err.to_string().contains(&format!("step {step}")));
    let last = saved(dir.path());
    let saved_step: u64 = last.metadata["step"].parse().unwrap();
    assert_eq!(saved_step, step - 1, "the checkpoint is the last good step");
    let resumed = Trainer::resume(dir.path(), None).unwrap();
    assert_eq!(resumed.step(), step - 1);
}

/// Runs of different batch sizes are scored on the same validation windows.
#[test]
fn the_validation_loss_does_not_depend_on_the_training_batch() {
    let val_loss = |batch| {
        let dir = tempfile::tempdir().unwrap();
        let config = TrainConfig { batch, ..config(10) };
        let mut trainer = Trainer::create(dir.path(), config, model()).unwrap();
        trainer.evaluate(0.0).unwrap().val_loss
    };
    assert_eq!(val_loss(4), val_loss(16));
}
