//! FP8 weights on the GPU: uploaded from a checkpoint's codes and scales, or made on the GPU
//! for dummy weights (kernels/fp8.cu), in the form kernels/matmul.cu reads.

use super::device::launch;
use super::{CudaBackend, CudaTensor};
use crate::tensor::{Backend, BackendError, Result};

impl CudaBackend {
    /// FP8 E4M3 weights `[rows, cols]`, row-major as in a checkpoint, with one scale per row
    /// (value = e4m3(byte) × scale). Needs `cols` a multiple of 64 and `rows` of 16.
    pub fn upload_fp8(&self, shape: [usize; 2], bytes: &[u8], scales: &[f32]) -> Result<CudaTensor> {
        let [rows, cols] = shape;
        if bytes.len() != rows * cols || scales.len() != rows || cols % 64 != 0 || rows % 16 != 0 {
            return Err(BackendError::Invalid(format!(
                "FP8 weight {shape:?}: {} bytes, {} scales (need rows ÷ 16, columns ÷ 64)",
                bytes.len(),
                scales.len()
            )));
        }
        let data = self.dev.alloc(bytes.len())?;
        self.dev.htod(data.ptr(), bytes)?;
        // Stored times 2^56: kernels/matmul.cu multiplies by the other 2^56 of its 2^112.
        let scaled: Vec<f32> = scales.iter().map(|&s| s * 2f32.powi(56)).collect();
        let sc = self.dev.alloc(4 * rows)?;
        self.dev.htod(sc.ptr(), &scaled)?;
        Ok(CudaTensor::fp8(data, sc, vec![rows, cols]))
    }

    /// Random FP8 weights: normal values of standard deviation `std` (as `random`),
    /// quantized per row on the GPU (scale = the row's largest magnitude / 448).
    pub fn random_fp8_matrix(&self, [rows, cols]: [usize; 2], std: f32, seed: u64) -> Result<CudaTensor> {
        let dense = self.random(&[rows, cols], std, seed)?;
        let (data, sc) = (self.dev.alloc(rows * cols)?, self.dev.alloc(4 * rows)?);
        launch!(self.dev, &self.kernels.quantize_rows_fp8, (rows as u32, 1, 1), (256, 1, 1);
            dense.ptr(), data.ptr(), sc.ptr(), cols as i32)?;
        Ok(CudaTensor::fp8(data, sc, vec![rows, cols]))
    }
}
