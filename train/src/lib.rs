//! chardiff-train: trains Transformer denoisers for character-level bit diffusion with candle.
//! The method's math (bits, schedules, the sampling loop) comes from chardiff-runtime, so
//! training-time samples use the very loop that runs on a device.

pub mod calibrate;
pub mod candle;
pub mod checkpoint;
pub mod curves;
mod fused;
pub mod model;
pub mod optim;
pub mod trainer;

pub use chardiff_runtime::corpus;

pub use checkpoint::TrainedModel;
pub use curves::write_curves;
pub use model::{Activation, AttentionBias, ModelConfig};
pub use trainer::{
    Event, InitialWeights, Loss, SelfCondUnit, TimeSampling, TrainConfig, TrainError, Trainer,
};
