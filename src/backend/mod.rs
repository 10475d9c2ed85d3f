//! The backends, each implementing the op trait (`tensor::Backend`) once: `cpu` (f32
//! reference, batch-invariant) and `cuda` (behind the `cuda` feature). The trait and its
//! types are re-exported here, where a caller choosing a backend looks for them.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use crate::tensor::{AttnShape, Backend, BackendError, BatchMeta, DeviceMemory, Result, RowMeta, StepKey};
