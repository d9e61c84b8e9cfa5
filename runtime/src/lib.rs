//! chardiff-runtime: what ships to a device. The method's math (analog bits, noise schedules, the
//! sampling loop), the model spec and graph contract, and (features `nnef`, `onnx`) a tract
//! backend that runs exported denoisers.

pub mod bench;
pub mod bits;
pub mod corpus;
pub mod denoiser;
pub mod files;
pub mod generate;
pub mod metrics;
#[cfg(feature = "ort")]
pub mod onnxruntime;
pub mod sampler;
pub mod schedule;
pub mod spec;
#[cfg(feature = "nnef")]
pub mod tract;

pub use bits::{mean_code, AnalogBits, BitCode, Charset, BITS};
pub use denoiser::{BoxError, Condition, DenoiseInput, Denoiser, NO_LOGITS};
pub use sampler::{sample, ConditioningMethod, GuidedOutput, SampleError, SamplerConfig, StepRule};
pub use schedule::Schedule;
pub use spec::{Head, ModelSpec, Precision, Provenance, SpecError};
