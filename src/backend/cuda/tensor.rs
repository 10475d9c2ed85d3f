//! The CUDA backend's tensor: a device buffer with a shape and an element type.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::device::DeviceBuf;

/// Weights are bf16 (half the bytes a decode step must stream); activations are f32,
/// which keeps every op within rounding of the f32 CPU reference; 1-D weights (norms,
/// RoPE frequencies) stay f32 because they are tiny and RoPE needs the precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// Clones share the buffer (the graph path hands out its fixed output buffer this way).
#[derive(Clone)]
pub struct CudaTensor {
    pub(crate) buf: Arc<DeviceBuf>,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Set on what `matmul_add_rms_norm` returns: this is the residual stream itself, and
    /// its value is `rms_norm(self) * weight`, applied by the GEMVs as they load it (no
    /// launch of its own); every other op materialises it first (`CudaBackend::dense`).
    pub(crate) norm: Option<PendingNorm>,
    id: u64,
}

/// An RMSNorm not yet applied: the norm's weight (f32 `[width]`) and epsilon.
#[derive(Clone)]
pub struct PendingNorm {
    pub(crate) weight: Arc<DeviceBuf>,
    pub(crate) eps: f32,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl CudaTensor {
    pub(crate) fn new(buf: DeviceBuf, shape: Vec<usize>, dtype: DType) -> Self {
        CudaTensor { buf: Arc::new(buf), shape, dtype, norm: None, id: NEXT_ID.fetch_add(1, Ordering::Relaxed) }
    }

    /// This tensor (sharing its buffer) with `norm` pending on it.
    pub(crate) fn with_norm(&self, norm: PendingNorm) -> Self {
        CudaTensor { norm: Some(norm), ..self.clone() }
    }

    /// Never reused within a process: graphs use it to know which KV cache they captured.
    pub fn id(&self) -> u64 {
        self.id
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
