//! A tensor-parallel rank's part of a dummy (random) weight, made on the GPU: the whole
//! matrix as `random` makes it, then the rank's rows or columns copied out of it by one
//! strided copy. Every rank count thus cuts the same matrix that one rank holds whole,
//! and a 70B model needs no host-side generation.

use std::ops::Range;

use cudarc::driver::sys;

use super::device::driver_err;
use super::{CudaBackend, CudaTensor, DType};
use crate::tensor::{Backend, BackendError, Result};

impl CudaBackend {
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
