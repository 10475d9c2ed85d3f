//! The CUDA backend's tensor: a device buffer with a shape and an element type.

use std::sync::Arc;

use super::device::DeviceBuf;

/// Weights are bf16 or FP8 E4M3 (what a decode step must stream); the residual stream, the
/// matmul outputs and attention's inputs are f32; what feeds a matmul (normed rows, the
/// attention output, the SwiGLU product) is bf16, the tensor cores' input; 1-D weights
/// (norms, RoPE frequencies) stay f32 because they are tiny and RoPE needs the precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    /// E4M3: a weight with one f32 scale per row (`CudaTensor::scales`), in kernels/matmul.cu's
    /// layout, or a KV cache with one signed-byte scale exponent per token and KV head (`kv.rs`).
    Fp8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
            DType::Fp8 => 1,
        }
    }
}

/// Clones share the buffer (the graph path hands out its fixed output buffer this way).
#[derive(Clone)]
pub struct CudaTensor {
    pub(crate) buf: Arc<DeviceBuf>,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// FP8 weights: one f32 per row, the row's scale times 2^120 (see kernels/matmul.cu); an
    /// FP8 KV cache: `[slots, kv_heads]` scale exponents, one i8 each.
    pub(crate) scales: Option<Arc<DeviceBuf>>,
}

impl CudaTensor {
    pub(crate) fn new(buf: DeviceBuf, shape: Vec<usize>, dtype: DType) -> Self {
        CudaTensor { buf: Arc::new(buf), shape, dtype, scales: None }
    }

    /// FP8 weights or KV cache: the E4M3 bytes and their scales.
    pub(crate) fn fp8(buf: DeviceBuf, scales: DeviceBuf, shape: Vec<usize>) -> Self {
        CudaTensor { scales: Some(Arc::new(scales)), ..Self::new(buf, shape, DType::Fp8) }
    }

    /// The per-row scales' address (0 for other types).
    pub fn scales_ptr(&self) -> u64 {
        self.scales.as_ref().map_or(0, |s| s.ptr())
    }

    pub fn ptr(&self) -> u64 {
        self.buf.ptr()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `[rows, cols]` of the tensor seen as a matrix (the last dimension is the row).
    pub fn dims(&self) -> (usize, usize) {
        let cols = *self.shape.last().unwrap_or(&1);
        (self.numel() / cols.max(1), cols)
    }

    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}
