//! Which GPU holds what. A backend on a given GPU (`on_gpu`). A tensor-parallel rank's
//! part of a dummy (random) weight is made on its GPU: the whole matrix as `random` makes
//! it, then the rank's rows or columns copied out of it by one strided copy, so every rank
//! count cuts the same matrix that one rank holds whole, and a 70B model needs no
//! host-side generation. And a tensor of another GPU is copied here whole
//! (`copy_from_gpu`).

use std::ops::Range;

use cudarc::driver::sys;

use super::device::driver_err;
use super::{CudaBackend, CudaTensor, DType};
use crate::tensor::{Backend, BackendError, Result};

impl CudaBackend {
    /// A backend on GPU `ordinal`: a sibling of this one on its own GPU, else a backend
    /// with that GPU's context and kernels.
    pub(super) fn on_gpu(&self, ordinal: usize) -> Result<Self> {
        let visible = crate::device::gpu_count();
        if ordinal >= visible {
            return Err(BackendError::NoSuchGpu { ordinal, visible });
        }
        if ordinal == self.dev.ctx.ordinal() {
            return self.sibling();
        }
        Self::new(ordinal)
    }

    /// Rows `rows` and columns `cols` of the `[shape[0], shape[1]]` matrix `random(shape,
    /// std, seed)` makes.
    pub(super) fn random_cut(
        &self,
        shape: [usize; 2],
        std: f32,
        seed: u64,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<CudaTensor> {
        if rows.end > shape[0] || cols.end > shape[1] || rows.start > rows.end || cols.start > cols.end {
            let msg = format!("cut {rows:?} x {cols:?} out of a {shape:?} matrix");
            return Err(BackendError::Invalid(msg));
        }
        let whole = self.random(&shape, std, seed)?;
        let size = DType::Bf16.size();
        let out = self.alloc(vec![rows.len(), cols.len()], DType::Bf16)?;
        if out.numel() == 0 {
            return Ok(out);
        }
        // SAFETY: zeroed is a valid bit pattern for this plain C struct; fields set below.
        let mut copy: sys::CUDA_MEMCPY2D = unsafe { std::mem::zeroed() };
        copy.srcMemoryType = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
        copy.srcDevice = whole.ptr();
        copy.srcXInBytes = cols.start * size;
        copy.srcY = rows.start;
        copy.srcPitch = shape[1] * size;
        copy.dstMemoryType = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
        copy.dstDevice = out.ptr();
        copy.dstPitch = cols.len() * size;
        copy.WidthInBytes = cols.len() * size;
        copy.Height = rows.len();
        self.dev.bind()?;
        // SAFETY: both regions lie inside their allocations (checked above); `whole` is
        // freed in stream order after the copy.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, self.dev.stream.cu_stream()) }
            .result()
            .map_err(driver_err("strided copy"))?;
        Ok(out)
    }
}

impl CudaBackend {
    /// A copy of `t`, a tensor of `from` (any GPU), on this backend's GPU: the weights an
    /// EAGLE head on another GPU reads of its target (embedding, LM head).
    pub(super) fn copy_from_gpu(&self, t: &CudaTensor, from: &CudaBackend) -> Result<CudaTensor> {
        // Everything queued on `from`'s GPU (the target's loading, on any of its streams)
        // is done before the copy reads it.
        from.dev.ctx.synchronize().map_err(driver_err("synchronizing the source GPU"))?;
        let buf = self.peer_copy(t.ptr(), t.buf.bytes(), from)?;
        let mut out = CudaTensor::new(buf, t.shape.clone(), t.dtype);
        if let Some(scales) = &t.scales {
            out.scales = Some(std::sync::Arc::new(self.peer_copy(scales.ptr(), scales.bytes(), from)?));
        }
        Ok(out)
    }

    /// `bytes` bytes at `src` in `from`'s context, copied into a fresh buffer here (through
    /// NVLink or PCIe; the driver stages it when the GPUs cannot reach each other).
    fn peer_copy(&self, src: u64, bytes: usize, from: &CudaBackend) -> Result<super::device::DeviceBuf> {
        let dst = self.dev.alloc(bytes)?;
        if bytes == 0 {
            return Ok(dst);
        }
        self.dev.bind()?;
        let (dst_ctx, src_ctx) = (self.dev.ctx.cu_ctx(), from.dev.ctx.cu_ctx());
        // SAFETY: both allocations hold `bytes` bytes; the source is not written meanwhile
        // (weights), and the copy is ordered before this backend's later work.
        unsafe { sys::cuMemcpyPeerAsync(dst.ptr(), dst_ctx, src, src_ctx, bytes, self.dev.stream.cu_stream()) }
            .result()
            .map_err(driver_err("copy between GPUs"))?;
        Ok(dst)
    }
}
