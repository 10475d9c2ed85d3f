//! The KV cache on the GPU: `[slots, kv_heads * head_dim]` bf16, or FP8 E4M3 codes with
//! `[slots, kv_heads]` scale exponents (one signed byte each, the scale being `2^e`), the
//! CPU's layout and quantization (`crate::backend::cpu::kv`). The attention kernels write
//! and read it; the host reads or fills an FP8 cache's bytes only to compare with the CPU.

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
}
