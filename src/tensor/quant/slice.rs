//! Cutting a quantized matrix into the parts one tensor-parallel rank holds: a band of rows
//! (column-parallel projections) or of columns (row-parallel ones), kept quantized.

use std::ops::Range;

use super::{BlockWeight, Fp8Weight, QuantWeight, BLOCK};

impl QuantWeight {
    /// Rows `rows` of the matrix (each row keeps its blocks or its scale).
    pub fn slice_rows(&self, rows: Range<usize>) -> QuantWeight {
        match self {
            QuantWeight::Blocks(b) => QuantWeight::Blocks(b.slice_rows(rows)),
            QuantWeight::Fp8(f) => QuantWeight::Fp8(f.slice_rows(rows)),
        }
    }

    /// Columns `cols` of every row, where the storage can be cut there: GGML blocks only
    /// at block boundaries (`None` elsewhere: the caller dequantizes instead).
    pub fn slice_cols(&self, cols: Range<usize>) -> Option<QuantWeight> {
        match self {
            QuantWeight::Blocks(b) => b.slice_cols(cols).map(QuantWeight::Blocks),
            QuantWeight::Fp8(f) => Some(QuantWeight::Fp8(f.slice_cols(cols))),
        }
    }
}

impl BlockWeight {
    fn slice_rows(&self, rows: Range<usize>) -> BlockWeight {
        let n = self.row_bytes();
        let blocks = self.blocks[rows.start * n..rows.end * n].to_vec();
        BlockWeight { format: self.format, shape: [rows.len(), self.shape[1]], blocks }
    }

    fn slice_cols(&self, cols: Range<usize>) -> Option<BlockWeight> {
        if !cols.start.is_multiple_of(BLOCK) || !cols.end.is_multiple_of(BLOCK) {
            return None;
        }
        let bb = self.format.block_bytes();
        let bytes = cols.start / BLOCK * bb..cols.end / BLOCK * bb;
        let blocks = (0..self.shape[0]).flat_map(|r| self.row(r)[bytes.clone()].iter().copied()).collect();
        Some(BlockWeight { format: self.format, shape: [self.shape[0], cols.len()], blocks })
    }
}

impl Fp8Weight {
    fn slice_rows(&self, rows: Range<usize>) -> Fp8Weight {
        let k = self.shape[1];
        let codes = self.codes[rows.start * k..rows.end * k].to_vec();
        let scales = self.scales[rows.clone()].to_vec();
        Fp8Weight { shape: [rows.len(), k], codes, scales, ..self.clone() }
    }

    /// Each row keeps its scale: `s · Σ q·x` splits into `s · Σ` over the column bands.
    fn slice_cols(&self, cols: Range<usize>) -> Fp8Weight {
        let k = self.shape[1];
        let codes = (0..self.shape[0]).flat_map(|r| self.codes[r * k..(r + 1) * k][cols.clone()].iter().copied());
        Fp8Weight { shape: [self.shape[0], cols.len()], codes: codes.collect(), ..self.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::super::QuantFormat;
    use super::*;

    fn weight(rows: usize, cols: usize) -> QuantWeight {
        let format = QuantFormat::Q8_0;
        let blocks_per_row = cols / BLOCK;
        let mut blocks = Vec::new();
        for i in 0..rows * blocks_per_row {
            blocks.extend_from_slice(&half::f16::from_f32(0.5 + i as f32).to_le_bytes());
            blocks.extend((0..BLOCK).map(|j| (j as i8 - 16 + i as i8) as u8));
        }
        QuantWeight::Blocks(BlockWeight { format, shape: [rows, cols], blocks })
    }

    #[test]
    fn slices_dequantize_to_the_same_values_as_the_whole() {
        let (rows, cols) = (4, 4 * BLOCK);
        let w = weight(rows, cols);
        let full = w.to_f32();
        let by_rows = w.slice_rows(1..3).to_f32();
        assert_eq!(by_rows, full[cols..3 * cols]);
        let by_cols = w.slice_cols(BLOCK..3 * BLOCK).expect("block aligned").to_f32();
        let want: Vec<f32> = (0..rows).flat_map(|r| full[r * cols + BLOCK..r * cols + 3 * BLOCK].to_vec()).collect();
        assert_eq!(by_cols, want);
        assert!(w.slice_cols(1..BLOCK + 1).is_none(), "a cut inside a block is refused");
    }
}
