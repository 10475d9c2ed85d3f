//! Host side of kernels/attention.cu and attention_mma.cu: paged attention as split and
//! merge kernels, over a bf16 or an FP8 KV cache; long prefill rows go to
//! kernels/prefill.cu (`prefill.rs`).

use std::sync::atomic::Ordering;

use super::batch::CudaBatch;
use super::device::launch;
use super::kernels::AttnKernel;
use super::{CudaBackend, CudaTensor, DType};
use crate::tensor::{AttnShape, BackendError, Result};

/// Thread groups per head in the merge kernel; as MERGE_GROUPS in kernels/attention.cu.
const MERGE_GROUPS: usize = 4;

/// Which split kernel attention runs: one position at a time on CUDA cores
/// (`kernels/attention.cu`, the default, measured) or tiles of 16 positions on tensor cores
/// (`attention_mma.cu`, with `SPECULA_ATTENTION=mma`): measured faster at long contexts
/// (bench/NOTES.md, run 47), it becomes the default once the default model's parity
/// (verification = decoding bitwise, speculative = plain) has passed with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnPath {
    Mma,
    Simt,
}

impl AttnPath {
    pub const ENV: &'static str = "SPECULA_ATTENTION";

    /// From `SPECULA_ATTENTION` (`mma` or `simt`); unset: `Simt`; anything else: `Simt`
    /// with a warning.
    pub fn from_env() -> Self {
        match std::env::var(Self::ENV).as_deref() {
            Ok("mma") => AttnPath::Mma,
            Ok("simt") | Err(_) => AttnPath::Simt,
            Ok(other) => {
                tracing::warn!("{}={other:?} is neither mma nor simt: using simt", Self::ENV);
                AttnPath::Simt
            }
        }
    }
}

impl CudaBackend {
    /// Attention through the split kernel `attention_path` picks and the merge kernel; with
    /// `inv_freq`, the split kernel applies RoPE to q and the step's keys as it loads them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        k_cache: &mut CudaTensor,
        v_cache: &mut CudaTensor,
        batch: &CudaBatch,
        s: AttnShape,
        inv_freq: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        let (n, kv_dim) = (batch.num_tokens(), s.num_kv_heads * s.head_dim);
        if k.dims() != (n, kv_dim) || v.dims() != (n, kv_dim) {
            return Err(BackendError::Invalid(format!(
                "attention: k/v are {:?}/{:?}, expected [{n}, {kv_dim}]",
                k.shape, v.shape
            )));
        }
        if !s.num_heads.is_multiple_of(s.num_kv_heads) {
            return Err(BackendError::Invalid("attention: query heads must be a multiple of the KV heads".into()));
        }
        let fp8 = k_cache.dtype == DType::Fp8;
        let group = s.num_heads / s.num_kv_heads;
        let mma = self.attention_path() == AttnPath::Mma;
        let kernel = AttnKernel::for_shape(s.head_dim, group, s.window.is_some(), fp8, mma).ok_or_else(|| {
            BackendError::Invalid(format!(
                "attention: head_dim {} with {group} query heads per KV head not supported (64 or 128; up to 8)",
                s.head_dim
            ))
        })?;
        let split = self.kernels.attn_split(kernel);
        for cache in [&*k_cache, &*v_cache] {
            Self::expect_kv(cache, if fp8 { DType::Fp8 } else { DType::Bf16 }, kv_dim)?;
        }
        Self::expect(k, DType::F32, "attention k")?;
        Self::expect(v, DType::F32, "attention v")?;
        Self::expect(q, DType::F32, "attention q")?;
        // Long causal rows go to the prefill kernel (prefill.rs): the split kernel takes the m
        // tokens up to the last short row's end, a long row's among them at a stand-in
        // position, and prefill overwrites their outputs.
        let (positions, splits, m) = match &batch.prefill {
            Some(p) => (p.split_positions(), p.max_splits, p.split_tokens),
            None => (batch.positions(), batch.max_splits, n),
        };
        let out = self.alloc(vec![n, s.num_heads * s.head_dim], DType::Bf16)?; // o's input
        if m > 0 {
            let partial = self.alloc(vec![m, s.num_heads, splits, s.head_dim + 2], DType::F32)?;
            // Also stores this step's keys and values in the caches (see kernels/attention.cu).
            launch!(self.dev, split, (s.num_kv_heads as u32, m as u32, splits as u32), (128, 1, 1);
                q.ptr(), k.ptr(), v.ptr(), k_cache.ptr(), v_cache.ptr(), k_cache.scales_ptr(), v_cache.scales_ptr(),
                positions, batch.slots(),
                batch.token_row(), batch.row_first(), batch.tree(), batch.block_tables(), batch.max_blocks as i32,
                batch.meta.block_size as i32, s.num_heads as i32, s.num_kv_heads as i32, splits as i32, partial.ptr(),
                inv_freq.map_or(0, |f| f.ptr()), batch.min_split as i32,
                s.window.map_or(0, |w| w.size() as i32), s.window.map_or(0, |w| w.sinks() as i32))?;
            let merge_block = (s.head_dim * MERGE_GROUPS) as u32;
            launch!(self.dev, &self.kernels.attn_merge, (s.num_heads as u32, m as u32, 1), (merge_block, 1, 1);
                partial.ptr(), positions, out.ptr(), s.num_heads as i32, s.head_dim as i32, splits as i32,
                batch.min_split as i32)?;
        }
        if let Some(plan) = &batch.prefill {
            self.prefill(plan, (q, k, v), k_cache, v_cache, batch, s, inv_freq, &out)?;
        }
        Ok(out)
    }
}

impl CudaBackend {
    /// The split kernel `attend` launches.
    pub fn attention_path(&self) -> AttnPath {
        if self.attn_simt.load(Ordering::Relaxed) {
            AttnPath::Simt
        } else {
            AttnPath::Mma
        }
    }

    /// Switches the split kernel (parity compares both on the same inputs). Steps already
    /// captured in CUDA graphs keep the kernel they were captured with.
    pub fn set_attention_path(&self, path: AttnPath) {
        self.attn_simt.store(path == AttnPath::Simt, Ordering::Relaxed);
    }

    /// A KV cache of `dtype` whose rows are `kv_dim` wide; an FP8 one with its exponents.
    fn expect_kv(cache: &CudaTensor, dtype: DType, kv_dim: usize) -> Result<()> {
        Self::expect(cache, dtype, "KV cache")?;
        if cache.dims().1 != kv_dim || (dtype == DType::Fp8) != cache.scales.is_some() {
            return Err(BackendError::Invalid(format!(
                "KV cache: {:?} is not a cache of rows {kv_dim} wide",
                cache.shape
            )));
        }
        Ok(())
    }
}
