//! Quantized weight matrices, kept as stored so that a backend's matmul computes on them
//! directly: GGML blocks (GGUF files) and FP8 E4M3 with per-row scales (FP8 checkpoints, or
//! any checkpoint loaded with `--dtype fp8`).

pub mod e4m3;
mod fp8;
mod ggml;
mod slice;

pub use fp8::{quantize as quantize_e4m3, ActivationScheme, Fp8Weight, ScaleGranularity};
pub use ggml::{BlockWeight, QuantFormat, BLOCK};

/// A quantized matrix `[rows, cols]` in the checkpoint's layout (rows are outputs).
#[derive(Debug, Clone, PartialEq)]
pub enum QuantWeight {
    /// GGML blocks of 32 values along each row.
    Blocks(BlockWeight),
    /// E4M3 codes with one f32 scale per row and an activation scheme.
    Fp8(Fp8Weight),
}

impl QuantWeight {
    pub fn shape(&self) -> [usize; 2] {
        match self {
            QuantWeight::Blocks(b) => b.shape,
            QuantWeight::Fp8(f) => f.shape,
        }
    }

    /// Row `r`, dequantized.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        match self {
            QuantWeight::Blocks(b) => b.format.dequantize(b.row(r)),
            QuantWeight::Fp8(f) => f.dequantize_row(r),
        }
    }

    /// The whole matrix, dequantized, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            QuantWeight::Blocks(b) => b.to_f32(),
            QuantWeight::Fp8(f) => f.to_f32(),
        }
    }

    /// Reorders whole rows: row `i` of the result is row `from[i]` of `self`.
    pub fn permute_rows(&self, from: &[usize]) -> QuantWeight {
        match self {
            QuantWeight::Blocks(b) => QuantWeight::Blocks(b.permute_rows(from)),
            QuantWeight::Fp8(f) => QuantWeight::Fp8(f.permute_rows(from)),
        }
    }
}
