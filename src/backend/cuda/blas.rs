//! cuBLAS for the GEMMs of bf16 prefill (more tokens than the tensor-core matmul takes at once).

use std::sync::Mutex;

use cudarc::cublas::{result, sys};
use cudarc::driver::CudaStream;

use crate::tensor::{BackendError, Result};

pub struct Blas {
    handle: Mutex<Handle>,
}

struct Handle(sys::cublasHandle_t);
// SAFETY: the handle is only used under the mutex, one call at a time.
unsafe impl Send for Handle {}

impl Blas {
    pub fn new(stream: &CudaStream) -> Result<Self> {
        let err = |e: result::CublasError| BackendError::Device(format!("cuBLAS: {e:?}"));
        let handle = result::create_handle().map_err(err)?;
        // SAFETY: a fresh handle and our live stream.
        unsafe { result::set_stream(handle, stream.cu_stream() as _) }.map_err(err)?;
        Ok(Blas { handle: Mutex::new(Handle(handle)) })
    }

    /// `out[n, m] = x[n, k] · w[m, k]ᵀ` with x and w bf16, out f32, f32 accumulation.
    /// Row-major out is column-major outᵀ = w · xᵀ: w read as a k×m column-major matrix,
    /// transposed; x as k×n, as is.
    pub fn gemm_bf16_f32(&self, x: u64, w: u64, out: u64, n: usize, k: usize, m: usize) -> Result<()> {
        let handle = self.handle.lock().expect("cublas lock");
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: pointers hold n·k, m·k bf16 and n·m f32 values (checked by the caller).
        unsafe {
            result::gemm_ex(
                handle.0,
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const _,
                out as *mut _,
                sys::cudaDataType::CUDA_R_32F,
                m as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| BackendError::Device(format!("cublasGemmEx: {e:?}")))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle.get_mut().expect("cublas lock").0) };
    }
}
