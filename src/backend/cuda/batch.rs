//! A step's `BatchMeta` on the device: one u32 buffer, uploaded with one copy.
//!
//! Layout (n tokens, r rows, l logit rows, b = blocks per row, padded):
//! ```text
//! | tokens n | positions n | slots n | token_row n | row_first n | logits_for l | block_tables r × b |
//! ```
//! A captured graph keeps its buffer and gets the next step's values copied into it, so
//! the layout depends only on (n, r, l, b): the graph's key.

use std::sync::Arc;

use super::device::DeviceBuf;
use crate::tensor::{BackendError, BatchMeta, Result};

/// The shortest attention split.
/// Short splits put more blocks in flight at short contexts, where a decode step's
/// attention is latency-bound (bench/NOTES.md, run 8: 16 beat 32 and 64).
pub const ATTN_SPLIT: usize = 16;

pub struct CudaBatch {
    pub(crate) meta: BatchMeta,
    pub(crate) buf: Arc<DeviceBuf>,
    pub(crate) max_blocks: usize,
    /// Attention splits launched per token: enough for the longest context `max_blocks`
    /// allows; a token uses only the splits its own position needs.
    pub(crate) max_splits: usize,
    /// The shortest attention split (see `split_len`).
    pub(crate) min_split: usize,
}

impl CudaBatch {
    pub fn num_tokens(&self) -> usize {
        self.meta.tokens.len()
    }
    pub fn tokens(&self) -> u64 {
        self.buf.ptr()
    }
    pub fn positions(&self) -> u64 {
        self.buf.ptr() + 4 * self.num_tokens() as u64
    }
    pub fn slots(&self) -> u64 {
        self.buf.ptr() + 8 * self.num_tokens() as u64
    }
    pub fn token_row(&self) -> u64 {
        self.buf.ptr() + 12 * self.num_tokens() as u64
    }
    /// Per token, the index of its row's first token in this step.
    pub fn row_first(&self) -> u64 {
        self.buf.ptr() + 16 * self.num_tokens() as u64
    }
    pub fn logits_for(&self) -> u64 {
        self.buf.ptr() + 20 * self.num_tokens() as u64
    }
    pub fn block_tables(&self) -> u64 {
        self.logits_for() + 4 * self.meta.logits_for.len() as u64
    }
}

/// Blocks per row the batch needs.
pub fn blocks_needed(meta: &BatchMeta) -> usize {
    meta.rows.iter().map(|r| r.block_table.len()).max().unwrap_or(0).max(1)
}

/// Splits per token while splits are short (below `LONG_SPLIT` positions); as SHORT_SPLITS
/// in kernels/attention.cu.
pub const SHORT_SPLITS: usize = 64;
/// The split length from which long contexts get more splits rather than longer ones.
pub const LONG_SPLIT: usize = 256;
/// The most splits any token's attention uses; must match MAX_SPLITS in kernels/attention.cu.
pub const MAX_SPLITS: usize = 256;

/// Positions per attention split for a token at `pos`, as `split_len` in kernels/attention.cu.
pub fn split_len(pos: usize, min_split: usize) -> usize {
    let mut len = min_split.max(1);
    while pos + 1 > len * SHORT_SPLITS && len < LONG_SPLIT {
        len *= 2;
    }
    while pos + 1 > len * MAX_SPLITS {
        len *= 2;
    }
    len
}

/// Splits a token at `pos` uses.
pub fn splits_at(pos: usize, min_split: usize) -> usize {
    (pos + 1).div_ceil(split_len(pos, min_split))
}

pub fn packed_len(meta: &BatchMeta, max_blocks: usize) -> usize {
    5 * meta.tokens.len() + meta.logits_for.len() + meta.rows.len() * max_blocks
}

/// The buffer's contents; checks what the kernels would otherwise read out of bounds.
pub fn pack(meta: &BatchMeta, max_blocks: usize) -> Result<Vec<u32>> {
    let n = meta.tokens.len();
    if meta.positions.len() != n || meta.slots.len() != n {
        return Err(BackendError::Invalid("batch: tokens, positions and slots differ in length".into()));
    }
    let (mut token_row, mut row_first) = (vec![u32::MAX; n], vec![0u32; n]);
    for (r, row) in meta.rows.iter().enumerate() {
        let (start, end) = (row.start as usize, (row.start + row.len) as usize);
        if end > n || row.block_table.len() > max_blocks {
            return Err(BackendError::Invalid(format!("batch: row {r} out of bounds")));
        }
        token_row[start..end].iter_mut().for_each(|t| *t = r as u32);
        row_first[start..end].iter_mut().for_each(|t| *t = start as u32);
        if (start + 1..end).any(|t| meta.positions[t] != meta.positions[t - 1] + 1) {
            return Err(BackendError::Invalid(format!("batch: row {r}'s positions are not consecutive")));
        }
        for t in start..end {
            let blocks_used = meta.positions[t] as usize / meta.block_size as usize + 1;
            if blocks_used > row.block_table.len() {
                return Err(BackendError::Invalid(format!("batch: token {t} lies past its row's block table")));
            }
        }
    }
    if token_row.contains(&u32::MAX) || meta.logits_for.iter().any(|&t| t as usize >= n) {
        return Err(BackendError::Invalid("batch: a token belongs to no row, or logits_for is out of range".into()));
    }
    let mut out = Vec::with_capacity(packed_len(meta, max_blocks));
    out.extend(&meta.tokens);
    out.extend(&meta.positions);
    out.extend(&meta.slots);
    out.extend(&token_row);
    out.extend(&row_first);
    out.extend(&meta.logits_for);
    for row in &meta.rows {
        out.extend(&row.block_table);
        out.extend(std::iter::repeat_n(0, max_blocks - row.block_table.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_grow_with_the_context_up_to_the_cap() {
        assert_eq!((split_len(0, 16), splits_at(0, 16)), (16, 1));
        assert_eq!((split_len(1023, 16), splits_at(1023, 16)), (16, 64));
        assert_eq!((split_len(1024, 16), splits_at(1024, 16)), (32, 33));
        assert_eq!((split_len(3999, 16), splits_at(3999, 16)), (64, 63));
        // Past 16k positions, more splits of 256 rather than longer ones, up to 256 splits.
        assert_eq!((split_len(16_383, 16), splits_at(16_383, 16)), (256, 64));
        assert_eq!((split_len(32_767, 16), splits_at(32_767, 16)), (256, 128));
        assert_eq!((split_len(131_071, 16), splits_at(131_071, 16)), (512, 256));
        assert!((0..200_000).step_by(7).all(|p| splits_at(p, 8) <= MAX_SPLITS));
    }
}
