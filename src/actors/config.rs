//! How the runtime is sized, and the KV pool's share of a device's memory.

use super::error::{ConfigError, ConfigField};
use crate::backend::Backend;
use crate::tensor::{AttnWindow, KvOptions, KvStorage};

pub use crate::prompt::BLOCK_SIZE;

/// How the runtime is sized. Defaults suit the CPU backend and the default model.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Most requests in one step.
    pub max_batch: usize,
    /// Most query tokens in one step (longer prompts are prefilled in chunks).
    pub step_tokens: usize,
    /// Most requests waiting for admission before new ones are refused as overloaded.
    pub max_waiting: usize,
    pub block_size: usize,
    /// The KV pool: an exact block count (wins if set); else on a GPU what
    /// `gpu_memory_fraction` of its memory leaves free once the model is loaded, counted in
    /// the storage's bytes per token (an FP8 head's scale included); else (CPU) a budget of
    /// `kv_bytes`.
    pub kv_bytes: usize,
    pub kv_blocks: Option<usize>,
    pub gpu_memory_fraction: f64,
    /// Capacity of the actors' mailboxes.
    pub mailbox: usize,
    /// The KV cache's element type and attention window (none: the model's own
    /// `sliding_window`, if its configuration has one).
    pub kv: KvOptions,
}

/// What the runtime's KV pool is, as `RuntimeStats` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvCacheInfo {
    /// How each key and value is stored (None: an executor that did not say).
    pub storage: Option<KvStorage>,
    /// Bytes one token takes across layers, keys and values (scales included).
    pub bytes_per_token: usize,
    /// Tokens the whole pool holds.
    pub tokens: usize,
    pub window: Option<AttnWindow>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_batch: 32,
            step_tokens: 512,
            max_waiting: 1024,
            block_size: BLOCK_SIZE,
            kv_bytes: 512 << 20,
            kv_blocks: None,
            gpu_memory_fraction: 0.90,
            mailbox: 64,
            kv: KvOptions::default(),
        }
    }
}

impl RuntimeConfig {
    /// The KV pool's blocks, once every size the runtime needs is known to be usable.
    pub fn checked_blocks(&self) -> Result<usize, ConfigError> {
        let blocks = self.kv_blocks.ok_or(ConfigError::KvBlocksUnset)?;
        let sizes = [
            (self.max_batch, ConfigField::MaxBatch),
            (self.step_tokens, ConfigField::StepTokens),
            (self.mailbox, ConfigField::Mailbox),
            (blocks, ConfigField::KvBlocks),
        ];
        match sizes.into_iter().find(|&(n, _)| n == 0) {
            Some((_, field)) => Err(ConfigError::NotPositive(field)),
            None => Ok(blocks),
        }
    }

    /// Tokens one sequence holds in the pool at most, when its window bounds that.
    pub fn held_tokens(&self) -> Option<usize> {
        self.kv.window.map(|w| crate::core::lengths::window_held(w, self.block_size, self.step_tokens))
    }

    /// Checks that the pool can hold one sequence's window (with a window).
    pub fn check_window_fits(&self, blocks: usize) -> Result<(), ConfigError> {
        match self.held_tokens() {
            Some(held) if held > blocks * self.block_size => {
                Err(ConfigError::PoolSmallerThanWindow { tokens: blocks * self.block_size, needed: held })
            }
            _ => Ok(()),
        }
    }
}

/// Device memory kept out of the KV pool for what steps allocate later: activations and the
/// CUDA graphs captured per step shape (each with an arena of its own).
const STEP_MEMORY_RESERVE: usize = 6 << 30;

/// Bytes for the KV pool: on a device with memory of its own, what `gpu_memory_fraction` of
/// it leaves after everything already there (weights, a draft model and its pool,
/// workspaces) and a reserve for the steps; elsewhere `kv_bytes`.
pub fn kv_budget<B: Backend>(c: &RuntimeConfig, backend: &B) -> Result<usize, super::RuntimeError> {
    let Some(mem) = backend.memory()? else { return Ok(c.kv_bytes) };
    let fraction = c.gpu_memory_fraction;
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(ConfigError::GpuMemoryFraction(fraction).into());
    }
    let allowed = (fraction * mem.total as f64) as usize;
    let used = mem.total - mem.free + STEP_MEMORY_RESERVE;
    let budget = allowed.checked_sub(used).filter(|&b| b > 0);
    Ok(budget.ok_or(ConfigError::NoMemoryForKv { used, total: mem.total, fraction })?)
}
