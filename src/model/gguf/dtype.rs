//! ggml tensor types: their storage sizes, and dequantization to f32 for the ones we load
//! (the block formats are described in `tensor::quant`).

use half::{bf16, f16};

use crate::tensor::quant::QuantFormat;
use rayon::prelude::*;

/// The ggml types a GGUF file may declare, with the ids the format assigns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    /// A type we can size (so the file can be checked) but not dequantize.
    Other {
        id: u32,
        name: &'static str,
        block: u64,
        bytes: u64,
    },
}

/// (id, name, values per block, bytes per block) for the types we know but do not load.
const OTHER_TYPES: &[(u32, &str, u64, u64)] = &[
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

const QK: u64 = 32;

impl GgmlType {
    /// The type with ggml id `id`, or `None` for an id this reader does not know.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            30 => GgmlType::Bf16,
            8 => GgmlType::Q8_0,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            _ => {
                let &(id, name, block, bytes) = OTHER_TYPES.iter().find(|t| t.0 == id)?;
                GgmlType::Other { id, name, block, bytes }
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Bf16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Other { name, .. } => name,
        }
    }

    /// (values per block, bytes per block).
    pub fn block(&self) -> (u64, u64) {
        match *self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q8_0 => (QK, 34),
            GgmlType::Q4_0 => (QK, 18),
            GgmlType::Q4_1 => (QK, 20),
            GgmlType::Other { block, bytes, .. } => (block, bytes),
        }
    }

    /// Bytes a tensor of these GGUF dims takes, or a message when the innermost dimension
    /// is not a whole number of blocks.
    pub fn data_size(&self, dims: &[u64]) -> Result<u64, String> {
        let (block, bytes) = self.block();
        let inner = dims.first().copied().unwrap_or(1);
        if inner % block != 0 {
            return Err(format!(
                "innermost dimension {inner} is not a multiple of the {} block size {block}",
                self.name()
            ));
        }
        dims.iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| (n / block).checked_mul(bytes))
            .ok_or_else(|| format!("dimensions {dims:?} overflow"))
    }

    /// The block format the CPU backend can compute on directly, if this is one.
    pub fn quant_format(&self) -> Option<QuantFormat> {
        match self {
            GgmlType::Q8_0 => Some(QuantFormat::Q8_0),
            GgmlType::Q4_0 => Some(QuantFormat::Q4_0),
            GgmlType::Q4_1 => Some(QuantFormat::Q4_1),
            _ => None,
        }
    }

    /// Dequantizes `bytes` (exactly `data_size` of them) to f32, as ggml's `dequantize_row_*`
    /// does. Returns `None` for the types we do not load.
    pub fn dequantize(&self, bytes: &[u8]) -> Option<Vec<f32>> {
        let (block, size) = self.block();
        let mut out = vec![0f32; bytes.len() / size as usize * block as usize];
        // Parallel over chunks of many blocks; each value is computed independently.
        let blocks_per_task = 1024;
        let kernel: fn(&[u8], &mut [f32]) = match self {
            GgmlType::F32 => |b, o| {
                o.iter_mut().zip(b.chunks_exact(4)).for_each(|(o, b)| *o = f32::from_le_bytes(b.try_into().unwrap()))
            },
            GgmlType::F16 => |b, o| {
                o.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, b)| *o = f16::from_le_bytes([b[0], b[1]]).to_f32())
            },
            GgmlType::Bf16 => |b, o| {
                o.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, b)| *o = bf16::from_le_bytes([b[0], b[1]]).to_f32())
            },
            GgmlType::Q8_0 => |b, o| dequantize_blocks(QuantFormat::Q8_0, b, o),
            GgmlType::Q4_0 => |b, o| dequantize_blocks(QuantFormat::Q4_0, b, o),
            GgmlType::Q4_1 => |b, o| dequantize_blocks(QuantFormat::Q4_1, b, o),
            GgmlType::Other { .. } => return None,
        };
        out.par_chunks_mut(blocks_per_task * block as usize)
            .zip(bytes.par_chunks(blocks_per_task * size as usize))
            .for_each(|(o, b)| kernel(b, o));
        Some(out)
    }
}

fn dequantize_blocks(format: QuantFormat, bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(format.block_bytes())) {
        o.copy_from_slice(&format.dequantize_block(b));
    }
}
