//! A step's `BatchMeta` on the device: one u32 buffer, uploaded with one copy.
//!
//! Layout (n tokens, r rows, l logit rows, b = blocks per row, padded):
//! ```text
//! | tokens n | positions n | slots n | token_row n | row_first n | logits_for l | block_tables r × b | tree |
//! ```
//! `tree` (`tree_table`) is there only when a row is a tree row. A captured graph keeps its
//! buffer and gets the next step's values copied into it, so the layout depends only on
//! (n, r, l, b) and the tree table's stride (`tree_stride`): the graph's key.

use std::sync::Arc;

use super::device::DeviceBuf;
use crate::tensor::{BackendError, BatchMeta, Result, RowMeta, TreeMask};

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
    /// The rows that go to the prefill kernel, if any (`prefill.rs`).
    pub(crate) prefill: Option<super::prefill::PrefillPlan>,
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
    /// The tree table (`tree_table`), or 0 (a null pointer) when every row is causal.
    pub fn tree(&self) -> u64 {
        let after_tables = self.block_tables() + 4 * (self.meta.rows.len() * self.max_blocks) as u64;
        if self.meta.has_tree() {
            after_tables
        } else {
            0
        }
    }
}

/// A causal row's token in the tree table (NOT_TREE in kernels/attention.cu).
pub const NOT_TREE: u32 = u32::MAX;

/// The tree table the attention kernel reads (`kv_source` in kernels/attention.cu), for a
/// step with tree rows; None when every row is causal.
///
/// ```text
///  | entry offset per token n | one slot of `tree_stride` entries per token |
///  entry offset: n + t × stride, where token t's entry starts; NOT_TREE for a causal row
///  entry:        prefix | depth 0 | depth 1 | ... | the token's own depth | unused
///  depth d:      the step token holding the ancestor at position prefix + d, or
///                !storage position for a node an earlier step cached (a drafting head's)
/// ```
/// Slots of one size keep the layout fixed for every tree of the same depth bucket, so
/// tree steps replay captured graphs as causal steps do.
pub fn tree_table(meta: &BatchMeta) -> Option<Vec<u32>> {
    let stride = tree_stride(meta);
    if stride == 0 {
        return None;
    }
    let n = meta.tokens.len();
    let mut out = vec![NOT_TREE; n + n * stride];
    for row in &meta.rows {
        let Some(tree) = &row.tree else { continue };
        for i in 0..row.len {
            let t = (row.start + i) as usize;
            let at = n + t * stride;
            out[t] = at as u32;
            out[at] = tree.prefix;
            for (d, node) in tree.path(tree.first + i).into_iter().enumerate() {
                out[at + 1 + d] = match node.checked_sub(tree.first) {
                    Some(j) => row.start + j,
                    None => !(tree.prefix + node),
                };
            }
        }
    }
    Some(out)
}

/// Entries per token in the tree table: the prefix and the longest path of the step,
/// rounded up to a power of two (a few shapes of graphs, not one per depth); 0 without trees.
pub fn tree_stride(meta: &BatchMeta) -> usize {
    let longest = meta
        .rows
        .iter()
        .filter_map(|row| row.tree.as_ref().map(|tree| (row, tree)))
        .flat_map(|(row, tree)| (0..row.len).map(move |i| tree.path(tree.first + i).len()))
        .max();
    longest.map_or(0, |l| (l + 1).next_power_of_two())
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
        match &row.tree {
            None => check_causal(meta, r, row)?,
            Some(tree) => check_tree(meta, r, row, tree)?,
        }
    }
    if token_row.contains(&u32::MAX) || meta.logits_for.iter().any(|&t| t as usize >= n) {
        return Err(BackendError::Invalid("batch: a token belongs to no row, or logits_for is out of range".into()));
    }
    let mut out = Vec::with_capacity(5 * n + meta.logits_for.len() + meta.rows.len() * max_blocks);
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
    out.extend(tree_table(meta).unwrap_or_default());
    Ok(out)
}

/// A causal row: consecutive positions, every one inside its block table.
fn check_causal(meta: &BatchMeta, r: usize, row: &RowMeta) -> Result<()> {
    let (start, end) = (row.start as usize, (row.start + row.len) as usize);
    if (start + 1..end).any(|t| meta.positions[t] != meta.positions[t - 1] + 1) {
        return Err(BackendError::Invalid(format!("batch: row {r}'s positions are not consecutive")));
    }
    for t in start..end {
        let blocks_used = meta.positions[t] as usize / meta.block_size as usize + 1;
        if blocks_used > row.block_table.len() {
            return Err(BackendError::Invalid(format!("batch: token {t} lies past its row's block table")));
        }
    }
    Ok(())
}

/// A tree row: a valid tree holding the row's nodes, each token at its node's logical
/// position (the kernel reads that many path entries), every stored node inside the table.
fn check_tree(meta: &BatchMeta, r: usize, row: &RowMeta, tree: &TreeMask) -> Result<()> {
    let end = tree.first as usize + row.len as usize;
    if !tree.is_valid() || end > tree.parents.len() {
        return Err(BackendError::Invalid(format!("batch: row {r}'s tree is out of order or too short")));
    }
    let stored = tree.prefix as usize + end;
    if stored.div_ceil(meta.block_size as usize) > row.block_table.len() {
        return Err(BackendError::Invalid(format!("batch: row {r}'s tree lies past its block table")));
    }
    for i in 0..row.len {
        let depth = tree.path(tree.first + i).len() as u32 - 1;
        if meta.positions[(row.start + i) as usize] != tree.prefix + depth {
            return Err(BackendError::Invalid(format!("batch: row {r}'s token {i} is not at its node's depth")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::NO_PARENT;

    /// A causal row of 2 tokens, then nodes 4..7 of a drafting head's tree over 6 positions
    /// (nodes 0..4 cached): 0 → 2 → 4, 1 → 3 → {5, 6}.
    fn mixed() -> BatchMeta {
        let mut meta = BatchMeta::new(4);
        meta.push_row(&[1, 2], 3, &[7, 8], 2);
        let tree = TreeMask { prefix: 6, first: 4, parents: vec![NO_PARENT, NO_PARENT, 0, 1, 2, 3, 3] };
        meta.push_tree_row(&[3, 4, 5], tree, &[2, 0, 5, 1], true).unwrap();
        meta
    }

    #[test]
    fn tree_table_maps_each_depth_to_a_step_token_or_a_cached_node() {
        let nt = NOT_TREE;
        // Node 4 (token 2) at depth 2: nodes 0 and 2 cached at storage 6 and 8, itself token 2.
        // Paths of 3 nodes: slots of 4 entries, the causal tokens' unused.
        let mut want = vec![nt, nt, 13, 17, 21];
        want.extend([nt; 8]);
        want.extend([6, !6, !8, 2, 6, !7, !9, 3, 6, !7, !9, 4]);
        assert_eq!(tree_stride(&mixed()), 4);
        assert_eq!(tree_table(&mixed()), Some(want));
        let mut causal = BatchMeta::new(4);
        causal.push_row(&[1, 2], 3, &[7, 8], 2);
        assert_eq!(tree_table(&causal), None);
        assert_eq!(pack(&causal, 3).unwrap().len(), 5 * 2 + 2 + 3);
    }

    #[test]
    fn pack_appends_the_tree_table_and_checks_tree_rows() {
        let meta = mixed();
        let packed = pack(&meta, 4).unwrap();
        assert_eq!(packed[5 * 5 + 5 + 2 * 4..], tree_table(&meta).unwrap()[..]);
        let mut moved = meta.clone();
        moved.positions[3] += 1; // no longer the node's depth
        assert!(pack(&moved, 4).is_err());
        let mut short = meta.clone();
        short.rows[1].block_table.truncate(3); // storage positions 12.. have no block
        assert!(pack(&short, 4).is_err());
        let mut bad = meta;
        bad.rows[1].tree.as_mut().unwrap().parents[5] = 6; // a parent after its child
        assert!(pack(&bad, 4).is_err());
    }

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
