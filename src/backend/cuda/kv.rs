//! The KV cache on the GPU: `[slots, kv_heads * head_dim]` bf16, or FP8 E4M3 codes with
//! `[slots, kv_heads]` scale exponents (one signed byte each, the scale being `2^e`), the
//! CPU's layout and quantization (`crate::backend::cpu::kv`). The attention kernels write
//! and read it; kernels/kv.cu moves entries between slots (tree speculation); the host reads
//! or fills an FP8 cache's bytes only to compare with the CPU.

use super::device::launch;
use super::{CudaBackend, CudaTensor, DType};
use crate::tensor::{BackendError, KvFeature, KvLayout, KvStorage, Result};

impl CudaBackend {
    /// A zeroed cache of `slots` tokens (an FP8 one's exponents zero too: scale 1).
    pub(super) fn alloc_kv(&self, slots: usize, layout: &KvLayout) -> Result<CudaTensor> {
        let shape = vec![slots, layout.kv_dim()];
        match layout.storage {
            KvStorage::Bf16 => {
                let out = self.alloc(shape, DType::Bf16)?;
                self.dev.memset_zero(out.ptr(), out.bytes())?;
                Ok(out)
            }
            KvStorage::Fp8 => {
                let codes = self.dev.alloc(slots * layout.kv_dim())?;
                let exps = self.dev.alloc(slots * layout.num_kv_heads)?;
                self.dev.memset_zero(codes.ptr(), codes.bytes())?;
                self.dev.memset_zero(exps.ptr(), exps.bytes())?;
                Ok(CudaTensor::fp8(codes, exps, shape))
            }
            storage => Err(BackendError::Unsupported { backend: "cuda", feature: KvFeature::Storage(storage) }),
        }
    }

    /// An FP8 cache holding these codes `[slots, kv_dim]` and exponents `[slots, kv_heads]`.
    pub fn upload_kv_fp8(&self, layout: &KvLayout, codes: &[u8], exps: &[i8]) -> Result<CudaTensor> {
        let slots = codes.len() / layout.kv_dim().max(1);
        if codes.len() != slots * layout.kv_dim() || exps.len() != slots * layout.num_kv_heads {
            return Err(BackendError::Invalid(format!(
                "FP8 KV cache: {} codes and {} exponents for rows of {} values, {} heads",
                codes.len(),
                exps.len(),
                layout.kv_dim(),
                layout.num_kv_heads
            )));
        }
        let cache = self.alloc_kv(slots, &KvLayout { storage: KvStorage::Fp8, ..*layout })?;
        self.dev.htod(cache.ptr(), codes)?;
        self.dev.htod(cache.scales_ptr(), exps)?;
        Ok(cache)
    }

    /// An FP8 cache's codes and scale exponents, as stored.
    pub fn kv_fp8_bytes(&self, cache: &CudaTensor) -> Result<(Vec<u8>, Vec<i8>)> {
        let Some(exps) = &cache.scales else {
            return Err(BackendError::Invalid("kv_fp8_bytes: not an FP8 KV cache".into()));
        };
        let codes = self.dev.dtoh::<u8>(cache.ptr(), cache.numel())?;
        Ok((codes, self.dev.dtoh::<i8>(exps.ptr(), exps.bytes())?))
    }

    /// Copies each entry (a row of bf16 values, or of FP8 codes and the row's scale
    /// exponents) from slot `from` to slot `to`, pair by pair in order, as the CPU does: one
    /// block runs the moves one after the other (kernels/kv.cu).
    pub(super) fn move_kv(&self, cache: &mut CudaTensor, moves: &[(u32, u32)]) -> Result<()> {
        let (slots, kv_dim) = cache.dims();
        let (row_bytes, heads) = match (cache.dtype, &cache.scales) {
            (DType::Bf16, None) => (2 * kv_dim, 0),
            (DType::Fp8, Some(exps)) => (kv_dim, exps.bytes() / slots.max(1)),
            _ => return Err(BackendError::Invalid("copy_kv: the cache is not a KV cache tensor".into())),
        };
        if let Some(&(from, to)) = moves.iter().find(|&&(f, t)| f as usize >= slots || t as usize >= slots) {
            return Err(BackendError::Invalid(format!("copy_kv: slot {from} or {to} outside the cache ({slots})")));
        }
        if moves.is_empty() {
            return Ok(());
        }
        let pairs: Vec<u32> = moves.iter().flat_map(|&(from, to)| [from, to]).collect();
        let buf = self.dev.alloc(4 * pairs.len())?;
        self.dev.htod(buf.ptr(), &pairs)?;
        // `buf` is freed in stream order, after the kernel has read it.
        launch!(self.dev, &self.kernels.kv_copy, (1, 1, 1), (256, 1, 1);
            cache.ptr(), cache.scales_ptr(), buf.ptr(), moves.len() as i32, row_bytes as i32, heads as i32)
    }
}
