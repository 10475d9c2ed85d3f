//! GGML block quantization formats (from GGUF files), kept as stored so that a backend can
//! compute on them directly (the CPU's matmul does: a quarter of the bytes to read per token).
//!
//! Every format packs 32 consecutive values of a row into one block:
//! - Q8_0: f16 scale d, 32 × i8 q;            value = q · d
//! - Q4_0: f16 scale d, 16 bytes of nibbles;  value = (q − 8) · d
//! - Q4_1: f16 scale d, f16 min m, 16 bytes;  value = q · d + m
//!
//! Nibbles: byte j holds element j in its low half and element j + 16 in its high half.

use half::f16;

pub const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantFormat {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl QuantFormat {
    pub fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q8_0 => 2 + 32,
            QuantFormat::Q4_0 => 2 + 16,
            QuantFormat::Q4_1 => 2 + 2 + 16,
        }
    }

    /// The 32 values of one block.
    pub fn dequantize_block(self, b: &[u8]) -> [f32; BLOCK] {
        let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
        match self {
            QuantFormat::Q8_0 => std::array::from_fn(|i| b[2 + i] as i8 as f32 * d),
            QuantFormat::Q4_0 => std::array::from_fn(|i| (nibble(&b[2..], i) as i32 - 8) as f32 * d),
            QuantFormat::Q4_1 => {
                let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                std::array::from_fn(|i| nibble(&b[4..], i) as f32 * d + m)
            }
        }
    }

    pub fn dequantize(self, bytes: &[u8]) -> Vec<f32> {
        bytes.chunks_exact(self.block_bytes()).flat_map(|b| self.dequantize_block(b)).collect()
    }
}

fn nibble(q: &[u8], i: usize) -> u8 {
    if i < 16 {
        q[i] & 0x0F
    } else {
        q[i - 16] >> 4
    }
}

/// A matrix `[rows, cols]` of quantized blocks, row-major; `cols` is a multiple of 32.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockWeight {
    pub format: QuantFormat,
    pub shape: [usize; 2],
    pub blocks: Vec<u8>,
}

impl BlockWeight {
    pub fn row_bytes(&self) -> usize {
        self.shape[1] / BLOCK * self.format.block_bytes()
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.blocks[r * n..(r + 1) * n]
    }

    /// Reorders whole rows: row `i` of the result is row `from[i]` of `self`.
    pub fn permute_rows(&self, from: &[usize]) -> BlockWeight {
        let blocks = from.iter().flat_map(|&r| self.row(r).iter().copied()).collect();
        BlockWeight { blocks, ..self.clone() }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.format.dequantize(&self.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_blocks_dequantize_exactly() {
        let d = f16::from_f32(0.5).to_le_bytes();
        let m = f16::from_f32(-1.0).to_le_bytes();
        let mut q8 = d.to_vec();
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        assert_eq!(QuantFormat::Q8_0.dequantize(&q8)[0], -8.0);
        assert_eq!(QuantFormat::Q8_0.dequantize(&q8)[31], 7.5);
        let mut q4 = d.to_vec();
        q4.extend((0..16).map(|j| (j as u8) | (15 - j as u8) << 4));
        let v = QuantFormat::Q4_0.dequantize(&q4);
        assert_eq!((v[0], v[15], v[16], v[31]), (-4.0, 3.5, 3.5, -4.0));
        let mut q41 = [d, m].concat();
        q41.extend((0..16).map(|j| (j as u8) | (15 - j as u8) << 4));
        let v = QuantFormat::Q4_1.dequantize(&q41);
        assert_eq!((v[0], v[1], v[16]), (-1.0, -0.5, 6.5));
    }
}
