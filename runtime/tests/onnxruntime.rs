//! onnxruntime (feature `ort`, library from ORT_DYLIB_PATH) runs the shipped model like tract:
//! the same x0 to float precision and the same text for the same seed, also through the softmax
//! head's logits.
#![cfg(feature = "ort")]

use chardiff_runtime::bench::max_x0_difference;
use chardiff_runtime::onnxruntime::OrtDenoiser;
use chardiff_runtime::sampler::{sample, SamplerConfig, StepRule};
use chardiff_runtime::tract::TractDenoiser;
use chardiff_runtime::Denoiser;

fn shipped_model() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/default.onnx");
    std::fs::read(path).expect("the shipped model")
}

#[test]
fn onnxruntime_and_tract_agree_on_the_shipped_model() {
    let file = shipped_model();
    let mut ort = OrtDenoiser::from_bytes(&file, 1).expect("set ORT_DYLIB_PATH (see .ci/run)");
    let mut tract = TractDenoiser::from_bytes(&file).unwrap();
    assert_eq!(ort.spec(), tract.spec());
    for batch in [1, 3] {
        let diff = max_x0_difference(&mut tract, &mut ort, batch, batch as u64).unwrap();
        eprintln!("batch {batch}: max |x0 diff| {diff:.2e}");
        assert!(diff <= 1e-4, "batch {batch}: {diff}");
    }
    let config = SamplerConfig::new(20, 1.0, StepRule::Ddim, 3);
    let a = sample(&mut tract, &config, 2, None, |_, _| {}).unwrap();
    let b = sample(&mut ort, &config, 2, None, |_, _| {}).unwrap();
    assert_eq!(a, b);
    // The file's recommendation for free samples, through the softmax head's logits.
    let recommended = SamplerConfig::recommended(tract.spec(), 3, false);
    assert!(recommended.temperature != 1.0 && recommended.self_guidance != 1.0);
    let recommended = SamplerConfig { steps: 20, ..recommended };
    let a = sample(&mut tract, &recommended, 2, None, |_, _| {}).unwrap();
    let b = sample(&mut ort, &recommended, 2, None, |_, _| {}).unwrap();
    assert_eq!(a, b);
}
