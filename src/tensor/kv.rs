//! What a KV cache stores and which cached positions attention reads: the element type
//! (`KvDtype` as asked, `KvStorage` as a backend keeps it) and the attention window
//! (`AttnWindow`: StreamingLLM's sink tokens plus the most recent tokens).

use std::fmt;

/// The KV cache's element type as asked (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvDtype {
    /// The backend's own: f32 on the CPU, bf16 on a GPU.
    #[default]
    Auto,
    Bf16,
    /// E4M3 codes with a power-of-two scale per token and KV head (`KvStorage::Fp8`).
    Fp8,
}

/// How a backend keeps cached keys and values.
///
/// FP8 stores each token's keys (and values) of one KV head as E4M3 codes with one scale,
/// `2^e` with `e` in one signed byte: the smallest power of two that brings the head's
/// largest magnitude under 448. Per token and head rather than per tensor or per head,
/// because a scale fixed at a first write would make a token's cached value depend on what
/// was written before it (another request, another batch), which breaks batch invariance,
/// prefix reuse and lossless speculation; a scale computed from the token's own values is
/// the same whenever and with whatever the token is computed. A power of two, because E4M3
/// is a floating-point format: the scale only places its range, and a power of two does
/// that at the cost of at most one binade of headroom, multiplies exactly, and fits in one
/// byte (a head of 64 values takes 65 bytes instead of bf16's 128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvStorage {
    F32,
    Bf16,
    Fp8,
}

impl KvStorage {
    /// Bytes one token's keys (or values) of one KV head take, scale included.
    pub fn bytes_per_head(self, head_dim: usize) -> usize {
        match self {
            KvStorage::F32 => 4 * head_dim,
            KvStorage::Bf16 => 2 * head_dim,
            KvStorage::Fp8 => head_dim + 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvStorage::F32 => "f32",
            KvStorage::Bf16 => "bf16",
            KvStorage::Fp8 => "fp8_e4m3",
        }
    }
}

impl fmt::Display for KvStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A window that is no window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("the attention window must hold at least one token")]
    Zero,
    #[error("the attention window ({size} tokens) must be at least the sink tokens ({sinks})")]
    SmallerThanSinks { size: usize, sinks: usize },
}

/// Each query attends to the first `sinks` positions of its sequence and to the last `size`
/// positions up to itself (TensorRT-LLM's max attention window, with StreamingLLM's
/// attention sinks; Mistral's `sliding_window` with no sinks). Positions keep counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnWindow {
    size: usize,
    sinks: usize,
}

impl AttnWindow {
    pub fn new(size: usize, sinks: usize) -> Result<Self, WindowError> {
        if size == 0 {
            return Err(WindowError::Zero);
        }
        if size < sinks {
            return Err(WindowError::SmallerThanSinks { size, sinks });
        }
        Ok(AttnWindow { size, sinks })
    }

    pub fn size(self) -> usize {
        self.size
    }

    pub fn sinks(self) -> usize {
        self.sinks
    }

    /// Whether a query at position `query` reads the key at `key` (`key <= query`).
    pub fn attends(self, query: usize, key: usize) -> bool {
        key < self.sinks || query - key < self.size
    }

    /// The first position past the sinks that a query at `query` still reads.
    pub fn first_recent(self, query: usize) -> usize {
        (query + 1).saturating_sub(self.size)
    }
}

/// How a KV cache is configured: what its elements are and which positions attention reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvOptions {
    pub dtype: KvDtype,
    pub window: Option<AttnWindow>,
}

/// One layer's cache as a backend allocates it: `[slots, num_kv_heads * head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub storage: KvStorage,
    pub window: Option<AttnWindow>,
}

impl KvLayout {
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_smaller_than_their_sinks_or_empty_are_refused() {
        assert_eq!(AttnWindow::new(0, 0), Err(WindowError::Zero));
        assert_eq!(AttnWindow::new(3, 4), Err(WindowError::SmallerThanSinks { size: 3, sinks: 4 }));
        let w = AttnWindow::new(4, 2).unwrap();
        let read: Vec<usize> = (0..=10).filter(|&k| w.attends(10, k)).collect();
        assert_eq!(read, vec![0, 1, 7, 8, 9, 10]);
        assert_eq!((w.first_recent(10), w.first_recent(2)), (7, 0));
    }

    #[test]
    fn bytes_per_head_count_the_fp8_scale() {
        assert_eq!([KvStorage::F32, KvStorage::Bf16, KvStorage::Fp8].map(|s| s.bytes_per_head(64)), [256, 128, 65]);
    }
}
