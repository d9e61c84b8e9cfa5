//! Test helpers: a spec and a denoiser whose behaviour is known exactly.
#![allow(dead_code)]

use chardiff_runtime::spec::{Provenance, FORMAT_VERSION};
use chardiff_runtime::*;

pub fn spec(window: usize, conditioning: bool, head: Head) -> ModelSpec {
    ModelSpec {
        format_version: FORMAT_VERSION,
        window,
        bits: BITS,
        bit_scale: 1.0,
        code: BitCode::Gray,
        charset: Charset::of(b"abcdefghijklmnopqrstuvwxyz ,._"),
        schedule: Schedule::Cosine,
        self_conditioning: true,
        conditioning,
        head,
        recommended_steps: 50,
        recommended_td: 1.0,
        recommended_free_td: None,
        recommended_sampler: StepRule::Ddim,
        recommended_guidance: 1.0,
        recommended_self_guidance: 1.0,
        recommended_temperature: 1.0,
        recommended_refine: 0,
        recommended_self_guidance_on: GuidedOutput::X0,
        recommended_warp: 1.0,
        provenance: Provenance {
            corpus: "test".into(),
            corpus_sha256: String::new(),
            steps: 0,
            date: String::new(),
            loss: None,
        },
        precision: Precision::F32,
    }
}

/// Always predicts the analog bits of one text: a perfect denoiser for a one-point data set.
/// Records every x_t and t it is called with.
pub struct Oracle {
    pub spec: ModelSpec,
    pub x0: Vec<f32>,
    pub seen: Vec<(Vec<f32>, f32)>,
}

impl Oracle {
    pub fn new(spec: ModelSpec, text: &[u8]) -> Oracle {
        let x0 = spec.analog_bits().encode(text);
        Oracle { spec, x0, seen: vec![] }
    }
}

impl Denoiser for Oracle {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn denoise(&mut self, input: &DenoiseInput<'_>, x0: &mut [f32]) -> Result<(), BoxError> {
        assert_eq!(input.condition.is_some(), self.spec.conditioning);
        self.seen.push((input.x_t.to_vec(), input.t[0]));
        for chunk in x0.chunks_exact_mut(self.x0.len()) {
            chunk.copy_from_slice(&self.x0);
        }
        Ok(())
    }
}
