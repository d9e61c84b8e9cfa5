//! `ModelSpec`: everything a sampler needs to know about a denoiser besides its weights. It travels
//! as `spec.json` in a checkpoint directory and as `chardiff.*` metadata_props in an exported ONNX file.

use crate::bits::{AnalogBits, BitCode, Charset, BITS};
use crate::sampler::{
    guidance_problem, guided_output_problem, refine_problem, self_guidance_problem, td_problem,
    temperature_problem, warp_problem, GuidedOutput, StepRule,
};
use crate::schedule::Schedule;
use serde::{Deserialize, Serialize};

/// Bumped whenever the graph contract or the meaning of a spec field changes.
pub const FORMAT_VERSION: u32 = 1;

/// Prefix of every metadata key this project writes into an ONNX file.
pub const METADATA_PREFIX: &str = "chardiff.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    /// The network regresses the analog bits directly.
    Bits,
    /// The network outputs logits over the charset; x0 = softmax(logits) @ codes.
    Softmax,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub corpus: String,
    pub corpus_sha256: String,
    /// Training steps, counting those behind the file a run started from (`train --init-from`;
    /// files trained that way before 2026-12-03 count their last run's only).
    pub steps: u64,
    pub date: String,
    /// The training loss (`mse` or `xent`), which a run starting from the file keeps (`train
    /// --init-from`); files from before this field: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub format_version: u32,
    /// L: characters per window.
    pub window: usize,
    /// K: analog bits per character.
    pub bits: usize,
    pub bit_scale: f32,
    pub code: BitCode,
    pub charset: Charset,
    pub schedule: Schedule,
    pub self_conditioning: bool,
    /// Whether the graph takes `cond` and `cond_mask` (trained conditional generation).
    pub conditioning: bool,
    pub head: Head,
    pub recommended_steps: usize,
    /// Asymmetric time delta, in sampling steps (for free samples too unless
    /// `recommended_free_td` says otherwise).
    pub recommended_td: f32,
    /// Asymmetric time delta for free samples (files without it: `recommended_td`). td buys
    /// words with duller text, and free samples (self-guided) and samples with known characters
    /// (guided) trade the two differently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_free_td: Option<f32>,
    /// The step rule to sample with (files from before this field: ddim).
    #[serde(default)]
    pub recommended_sampler: StepRule,
    /// Classifier-free guidance weight for conditional sampling (files from before this field: 1,
    /// plain conditioning).
    #[serde(default = "one")]
    pub recommended_guidance: f32,
    /// Spacing of the sampling steps' times, `sampler::step_time` (files from before this field:
    /// 1, evenly spaced).
    #[serde(default = "one")]
    pub recommended_warp: f32,
    /// Self-guidance weight, `SamplerConfig::self_guidance` (files from before this field: 1,
    /// plain self-conditioning).
    #[serde(default = "one")]
    pub recommended_self_guidance: f32,
    /// What self-guidance extrapolates, `SamplerConfig::self_guidance_on` (files from before
    /// this field: x0, the only formula then, which their weight was measured with).
    #[serde(default)]
    pub recommended_self_guidance_on: GuidedOutput,
    /// Softmax temperature for free samples, `SamplerConfig::temperature` (files from before
    /// this field: 1, the network's own estimate).
    #[serde(default = "one")]
    pub recommended_temperature: f32,
    /// Refinements for free samples, `SamplerConfig::refine` (files from before this field: 0).
    #[serde(default)]
    pub recommended_refine: usize,
    pub provenance: Provenance,
    /// How the file stores the network's weights (files from before f16 export: f32).
    #[serde(default)]
    pub precision: Precision,
}

/// The weight or warp that changes nothing: what files from before a setting was recorded mean.
fn one() -> f32 {
    1.0
}

/// Storage precision of a model file's weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// Half the file; computed in f32 (weights widened at load) unless the CPU has native fp16.
    F16,
    /// Weight matrices in int8 (per output column scales), the activations multiplied by them
    /// quantized to u8 with calibrated constant scales: the matrix products run on int8 kernels,
    /// everything else in f32. tract's sampler widens the weights to f32 at load unless asked
    /// for int8 arithmetic (a third of the file at f32 speed; `tract::arithmetic`).
    Int8,
}

/// Its name in files and on the command line.
impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_name(self))
    }
}

/// The serde name of a unit variant (`Precision::Int8` -> "int8"): the one spelling of a setting
/// in files, on the command line and in reports. Empty for values that are not a plain name.
pub fn serde_name(value: impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("the model carries no chardiff metadata (no `{METADATA_PREFIX}format_version` key): it was not exported by `chardiff export`")]
    Missing,
    #[error("model format version {found} is not supported by this build (it reads version {FORMAT_VERSION}): re-export the checkpoint with this version of chardiff")]
    Version { found: u32 },
    #[error("the model's chardiff metadata is invalid: {0}")]
    Invalid(String),
}

impl ModelSpec {
    pub fn analog_bits(&self) -> AnalogBits {
        AnalogBits { code: self.code, scale: self.bit_scale }
    }

    /// Bytes of one window's worth of analog bits, as a flat [L, K] length.
    pub fn values_per_sequence(&self) -> usize {
        self.window * self.bits
    }

    /// Decodes the final x0 prediction: a softmax head only ever means bytes of its charset.
    pub fn decode(&self, x0: &[f32]) -> Vec<u8> {
        match self.head {
            Head::Bits => self.analog_bits().decode(x0),
            Head::Softmax => self.analog_bits().decode_nearest(x0, &self.charset),
        }
    }

    /// Checks the invariants a sampler relies on.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.format_version != FORMAT_VERSION {
            return Err(SpecError::Version { found: self.format_version });
        }
        let invalid = |m: &str| Err(SpecError::Invalid(m.into()));
        if self.bits != BITS {
            return invalid(&format!(
                "bits is {}, this build handles {BITS} bits per byte",
                self.bits
            ));
        }
        if self.window == 0 {
            return invalid("window is 0");
        }
        if !(self.bit_scale.is_finite() && self.bit_scale > 0.0) {
            return invalid("bit_scale must be a positive number");
        }
        if self.recommended_steps == 0 {
            return invalid("recommended steps must be > 0");
        }
        for td in std::iter::once(self.recommended_td).chain(self.recommended_free_td) {
            if let Some(problem) = td_problem(td) {
                return invalid(&format!("recommended {problem}"));
            }
        }
        if let Some(problem) = guidance_problem(self.recommended_guidance, self.conditioning) {
            return invalid(&format!("recommended {problem}"));
        }
        if let Some(problem) = warp_problem(self.recommended_warp) {
            return invalid(&format!("recommended {problem}"));
        }
        let self_guidance =
            self_guidance_problem(self.recommended_self_guidance, self.self_conditioning);
        if let Some(problem) = self_guidance {
            return invalid(&format!("recommended {problem}"));
        }
        if let Some(problem) = temperature_problem(self.recommended_temperature, self.head) {
            return invalid(&format!("recommended {problem}"));
        }
        if let Some(problem) = refine_problem(self.recommended_refine, self.self_conditioning) {
            return invalid(&format!("recommended {problem}"));
        }
        if let Some(problem) = guided_output_problem(self.recommended_self_guidance_on, self.head) {
            return invalid(&format!("recommended {problem}"));
        }
        Ok(())
    }

    /// The spec as ONNX metadata_props: one `chardiff.<field>` key per field, its value in JSON.
    pub fn to_metadata(&self) -> Vec<(String, String)> {
        let value = serde_json::to_value(self).expect("a spec always serializes");
        let serde_json::Value::Object(fields) = value else { unreachable!("a spec is a struct") };
        fields.into_iter().map(|(k, v)| (format!("{METADATA_PREFIX}{k}"), v.to_string())).collect()
    }

    /// Reads the spec back from metadata_props; keys without the prefix are ignored.
    pub fn from_metadata<'a>(
        props: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<ModelSpec, SpecError> {
        let mut fields = serde_json::Map::new();
        for (key, value) in props {
            if let Some(field) = key.strip_prefix(METADATA_PREFIX) {
                let value = serde_json::from_str(value)
                    .map_err(|e| SpecError::Invalid(format!("key {key}: {e}")))?;
                fields.insert(field.to_string(), value);
            }
        }
        let version = fields.get("format_version").ok_or(SpecError::Missing)?;
        let found = version.as_u64().ok_or_else(|| SpecError::Invalid("format_version".into()))?;
        if found != u64::from(FORMAT_VERSION) {
            return Err(SpecError::Version { found: found as u32 });
        }
        let spec: ModelSpec = serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| SpecError::Invalid(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn example_spec() -> ModelSpec {
        ModelSpec {
            format_version: FORMAT_VERSION,
            window: 16,
            bits: BITS,
            bit_scale: 1.0,
            code: BitCode::Gray,
            charset: Charset::of(b"hello world"),
            schedule: Schedule::Cosine,
            self_conditioning: true,
            conditioning: true,
            head: Head::Softmax,
            recommended_steps: 100,
            recommended_td: 1.0,
            recommended_free_td: Some(3.0),
            recommended_sampler: StepRule::Ddpm,
            recommended_guidance: 2.5,
            recommended_warp: 0.6,
            recommended_self_guidance: 2.5,
            recommended_self_guidance_on: GuidedOutput::Logits,
            recommended_temperature: 0.6,
            recommended_refine: 1,
            provenance: Provenance {
                corpus: "test.txt".into(),
                corpus_sha256: "00".into(),
                steps: 5,
                date: "2026-11-28".into(),
                loss: Some("xent".into()),
            },
            precision: Precision::F32,
        }
    }

    #[test]
    fn metadata_round_trips() {
        let spec = example_spec();
        let meta = spec.to_metadata();
        assert!(meta.iter().all(|(k, _)| k.starts_with(METADATA_PREFIX)));
        let back =
            ModelSpec::from_metadata(meta.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert_eq!(back, spec);
        // Files from before the step rule, guidance, warp, self-guidance (and what it
        // extrapolates), the free samples' td and temperature were recorded: DDIM, plain
        // conditioning, evenly spaced steps, plain self-conditioning on x0, one td, the network's
        // own estimate.
        let newer = [
            "recommended_free_td",
            "recommended_sampler",
            "recommended_guidance",
            "recommended_warp",
            "recommended_self_guidance",
            "recommended_temperature",
            "recommended_self_guidance_on",
            "recommended_refine",
        ];
        let older = meta.iter().filter(|(k, _)| !newer.iter().any(|n| k.ends_with(n)));
        let back = ModelSpec::from_metadata(older.map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert_eq!(back.recommended_sampler, StepRule::Ddim);
        assert_eq!(back.recommended_guidance, 1.0);
        assert_eq!(back.recommended_warp, 1.0);
        assert_eq!(back.recommended_self_guidance, 1.0);
        assert_eq!(back.recommended_temperature, 1.0);
        assert_eq!(back.recommended_self_guidance_on, GuidedOutput::X0);
        assert_eq!(back.recommended_refine, 0);
        assert_eq!(back.recommended_free_td, None);
        let unwarped = ModelSpec { recommended_warp: 0.0, ..spec };
        assert!(unwarped.validate().unwrap_err().to_string().contains("warp must be > 0"));
        for td in [-1.0, f32::NAN] {
            let free = ModelSpec { recommended_free_td: Some(td), ..example_spec() };
            let conditional = ModelSpec { recommended_td: td, ..example_spec() };
            for backwards in [free, conditional] {
                let error = backwards.validate().unwrap_err().to_string();
                assert!(error.contains("recommended td must be >= 0"), "{error}");
            }
        }
    }

    #[test]
    fn guidance_is_a_non_negative_weight_for_conditional_models_only() {
        let guided = |conditioning, recommended_guidance| {
            ModelSpec { conditioning, recommended_guidance, ..example_spec() }.validate()
        };
        assert!(guided(true, 2.5).is_ok() && guided(false, 1.0).is_ok());
        assert!(guided(true, -1.0).is_err() && guided(true, f32::INFINITY).is_err());
        let err = guided(false, 2.5).unwrap_err().to_string();
        assert!(err.contains("conditioning"), "{err}");
    }

    #[test]
    fn self_guidance_is_a_non_negative_weight_for_self_conditioned_models_only() {
        let guided = |self_conditioning, recommended_self_guidance| {
            let spec = ModelSpec { recommended_refine: 0, ..example_spec() };
            ModelSpec { self_conditioning, recommended_self_guidance, ..spec }.validate()
        };
        assert!(
            guided(true, 2.5).is_ok() && guided(true, 0.0).is_ok() && guided(false, 1.0).is_ok()
        );
        assert!(guided(true, -1.0).is_err() && guided(true, f32::NAN).is_err());
        let err = guided(false, 2.5).unwrap_err().to_string();
        assert!(err.contains("self-conditioning"), "{err}");
    }

    #[test]
    fn refinements_are_for_self_conditioned_models_only() {
        let refined = |self_conditioning, recommended_refine| {
            let spec = ModelSpec { recommended_self_guidance: 1.0, ..example_spec() };
            ModelSpec { self_conditioning, recommended_refine, ..spec }.validate()
        };
        assert!(refined(true, 2).is_ok() && refined(false, 0).is_ok());
        let err = refined(false, 1).unwrap_err().to_string();
        assert!(err.contains("refinements need a model trained with self-conditioning"), "{err}");
    }

    #[test]
    fn temperature_is_positive_and_for_softmax_heads_only() {
        let at = |head, recommended_temperature| {
            let on = GuidedOutput::X0;
            let spec = ModelSpec { head, recommended_temperature, ..example_spec() };
            ModelSpec { recommended_self_guidance_on: on, ..spec }.validate()
        };
        assert!(at(Head::Softmax, 0.6).is_ok() && at(Head::Bits, 1.0).is_ok());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let err = at(Head::Softmax, bad).unwrap_err().to_string();
            assert!(err.contains("temperature must be > 0"), "{err}");
        }
        let err = at(Head::Bits, 0.6).unwrap_err().to_string();
        assert!(err.contains("softmax head"), "{err}");
        let on_logits = ModelSpec {
            head: Head::Bits,
            recommended_temperature: 1.0,
            recommended_self_guidance_on: GuidedOutput::Logits,
            ..example_spec()
        };
        let err = on_logits.validate().unwrap_err().to_string();
        assert!(err.contains("self-guidance on the logits needs a model with a softmax head"));
    }

    #[test]
    fn foreign_or_future_metadata_is_refused() {
        let none = ModelSpec::from_metadata([("producer", "someone")]);
        assert!(matches!(none, Err(SpecError::Missing)));
        let future = ModelSpec::from_metadata([("chardiff.format_version", "99")]);
        assert!(matches!(future, Err(SpecError::Version { found: 99 })));
        let partial = ModelSpec::from_metadata([("chardiff.format_version", "1")]);
        assert!(matches!(partial, Err(SpecError::Invalid(_))));
    }
}
