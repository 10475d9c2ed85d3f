//! The runtime's errors: why it could not start (`RuntimeError`, `ConfigError`), why a step
//! failed (`StepError`), and why the runtime can serve no more (`DownReason`). A request's
//! own refusals and failures are `RequestError` (`src/request.rs`): these become its
//! `StepFailed` / `Unavailable` text at that boundary.

use std::fmt;
use std::sync::Arc;

use crate::backend::BackendError;
use crate::request::RequestId;
use crate::spec::SpecError;

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid runtime configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("could not start the runtime: {0}")]
    Start(#[from] std::io::Error),
}

/// A `RuntimeConfig` field, as errors name it (a command line maps it to its own flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigField {
    MaxBatch,
    StepTokens,
    Mailbox,
    KvBlocks,
    GpuMemoryFraction,
}

impl ConfigField {
    pub fn name(self) -> &'static str {
        match self {
            ConfigField::MaxBatch => "max_batch",
            ConfigField::StepTokens => "step_tokens",
            ConfigField::Mailbox => "mailbox",
            ConfigField::KvBlocks => "kv_blocks",
            ConfigField::GpuMemoryFraction => "gpu_memory_fraction",
        }
    }
}

impl fmt::Display for ConfigField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `RuntimeConfig` the runtime cannot start with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} must be positive")]
    NotPositive(ConfigField),
    /// `build_with` needs the block count of the executor's own cache.
    #[error("kv_blocks must be set to the blocks the executor's KV cache holds")]
    KvBlocksUnset,
    #[error("gpu_memory_fraction {0} is not in (0, 1]")]
    GpuMemoryFraction(f64),
    #[error(
        "no device memory left for the KV cache: {:.1} GiB of {:.1} GiB already in use, gpu_memory_fraction is {fraction}",
        gib(*used), gib(*total)
    )]
    NoMemoryForKv { used: usize, total: usize, fraction: f64 },
    /// The pool could not hold even one sequence's attention window (its sink blocks, the
    /// window's and a step's).
    #[error("the KV pool holds {tokens} tokens, but one sequence's attention window needs {needed}")]
    PoolSmallerThanWindow { tokens: usize, needed: usize },
}

impl ConfigError {
    /// The field to change.
    pub fn field(&self) -> ConfigField {
        match self {
            ConfigError::NotPositive(field) => *field,
            ConfigError::KvBlocksUnset | ConfigError::PoolSmallerThanWindow { .. } => ConfigField::KvBlocks,
            ConfigError::GpuMemoryFraction(_) | ConfigError::NoMemoryForKv { .. } => ConfigField::GpuMemoryFraction,
        }
    }
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// How an executor's forward failed: a backend error from the model, or the text of an
/// executor that reports failures as text (test doubles, benchmarks).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecutorError {
    /// Shared: the same failure fails each of the step's requests.
    #[error(transparent)]
    Backend(Arc<BackendError>),
    #[error("{0}")]
    Message(String),
}

impl From<BackendError> for ExecutorError {
    fn from(e: BackendError) -> Self {
        ExecutorError::Backend(Arc::new(e))
    }
}

impl From<String> for ExecutorError {
    fn from(message: String) -> Self {
        ExecutorError::Message(message)
    }
}

/// What a forward returned too little of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardOutput {
    Ids,
    Logits,
}

/// Why a step failed. Only the step's requests fail; `DownReason` says when the runtime
/// cannot go on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    #[error("row for unknown request {0:?}")]
    UnknownRequest(RequestId),
    #[error("the forward returned too few {}", match .0 { ForwardOutput::Ids => "ids", ForwardOutput::Logits => "logits" })]
    ShortOutput(ForwardOutput),
    /// A panic caught at the Verifier's thread boundary.
    #[error("panicked: {0}")]
    Panicked(String),
}

/// Why the runtime can serve no more: every request fails and later ones are refused with
/// `Unavailable` (its text), which `RuntimeHandle::health` reports too.
#[derive(Debug, thiserror::Error)]
pub enum DownReason {
    #[error("{count} steps failed in a row, the last one: {last}")]
    FailedInARow { count: u32, last: StepError },
    /// The executor said it cannot run another step (a GPU with a sticky error).
    #[error("{0}")]
    Unrecoverable(ExecutorError),
    #[error("the model executor stopped")]
    ExecutorStopped,
    #[error("the KV allocator stopped")]
    KvAllocatorStopped,
}

/// Why the KvAllocator could not answer: its pure core panicked. It restarts with an empty
/// pool (actix supervision), so every request holding blocks fails.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KvError {
    #[error("the KV allocator failed ({0}) and started again with an empty pool")]
    Restarted(String),
}
