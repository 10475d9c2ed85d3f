//! What one forward step is, built on the host: the query tokens of every row, where their
//! keys and values go in the paged KV cache, and which rows want logits.

use super::BackendError;

/// A block-table entry whose block went back to the pool: its positions slid out of the
/// attention window, and no query reads them again.
pub const NO_BLOCK: u32 = u32::MAX;

/// One query token's row (a sequence) in a forward step.
///
/// The row's tokens are `tokens[start..start + len]` of the batch; they sit at positions
/// `context_len - len .. context_len` of the sequence, whose KV lives in the blocks of
/// `block_table` (position p in slot `block_table[p / block_size] * block_size + p % block_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowMeta {
    pub start: u32,
    pub len: u32,
    pub context_len: u32,
    pub block_table: Vec<u32>,
    /// A tree row (tree verification, tree drafting): which cached positions each of its
    /// tokens reads instead of all those before it. None: a causal row.
    pub tree: Option<TreeMask>,
}

/// The attention mask of a tree row.
///
/// ```text
///  storage positions:  0 .. prefix-1 | prefix+0  prefix+1  prefix+2 ... (one per node)
///  node j reads:        all of these  | its ancestors' slots and its own, root first
///  node j's position:   prefix + (its number of ancestors)     (RoPE, window)
/// ```
/// Nodes are numbered in storage order; a parent comes before its children. The row's
/// tokens are the nodes `first..first + len` (earlier nodes are already cached: a drafting
/// head extends its tree one depth per step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeMask {
    /// Positions every node reads: the sequence before the tree.
    pub prefix: u32,
    /// The node of the row's first token.
    pub first: u32,
    /// Each node's parent, or `NO_PARENT` for a node hanging from the prefix.
    pub parents: Vec<u32>,
}

/// A tree node whose parent is the prefix itself.
pub const NO_PARENT: u32 = u32::MAX;

impl TreeMask {
    /// `node`'s ancestors and itself, root first.
    pub fn path(&self, node: u32) -> Vec<u32> {
        let mut path = vec![node];
        let mut at = node;
        while let Some(&p) = self.parents.get(at as usize).filter(|&&p| p != NO_PARENT && p < at) {
            path.push(p);
            at = p;
        }
        path.reverse();
        path
    }

    /// Whether every parent comes before its child (what `path` and the backends rely on).
    pub fn is_valid(&self) -> bool {
        self.parents.iter().enumerate().all(|(j, &p)| p == NO_PARENT || (p as usize) < j)
    }
}

/// Everything a forward step needs besides weights and the KV cache, built on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchMeta {
    /// All query tokens, row after row.
    pub tokens: Vec<u32>,
    /// Position of each token in its sequence.
    pub positions: Vec<u32>,
    /// KV cache slot each token's key and value are written to.
    pub slots: Vec<u32>,
    pub rows: Vec<RowMeta>,
    /// Indices into `tokens` whose logits the step returns, in order.
    pub logits_for: Vec<u32>,
    pub block_size: u32,
}

impl BatchMeta {
    /// Whether a row is a tree row (tree speculation).
    pub fn has_tree(&self) -> bool {
        self.rows.iter().any(|r| r.tree.is_some())
    }

    /// Adds a row of `tokens` that continue a sequence already holding `cached` tokens.
    /// `want_logits` is how many of the row's last tokens need logits (1 to decode,
    /// k + 1 to verify k drafts, 0 for a prefill chunk that is not the last).
    pub fn push_row(&mut self, tokens: &[u32], cached: u32, block_table: &[u32], want_logits: usize) {
        let start = self.tokens.len() as u32;
        let bs = self.block_size;
        for (i, &t) in tokens.iter().enumerate() {
            let pos = cached + i as u32;
            self.tokens.push(t);
            self.positions.push(pos);
            self.slots.push(block_table[(pos / bs) as usize] * bs + pos % bs);
        }
        let len = tokens.len() as u32;
        let first_logit = start + len - want_logits.min(tokens.len()) as u32;
        self.logits_for.extend(first_logit..start + len);
        self.rows.push(RowMeta {
            start,
            len,
            context_len: cached + len,
            block_table: block_table.to_vec(),
            tree: None,
        });
    }

    /// Adds a tree row: nodes `tree.first..` of `tree`, one per token, each written at
    /// storage position `prefix + node` and placed at `prefix + depth`. Every node wants
    /// logits when `logits` is set. A tree whose parents do not precede their children, or
    /// too short for the row, is refused.
    pub fn push_tree_row(
        &mut self,
        tokens: &[u32],
        tree: TreeMask,
        block_table: &[u32],
        logits: bool,
    ) -> Result<(), BackendError> {
        let end = tree.first as usize + tokens.len();
        if !tree.is_valid() || end > tree.parents.len() {
            let n = tree.parents.len();
            return Err(BackendError::Invalid(format!(
                "a tree row of {end} nodes over a tree of {n}, or out of order"
            )));
        }
        let start = self.tokens.len() as u32;
        let bs = self.block_size;
        for (i, &t) in tokens.iter().enumerate() {
            let node = tree.first + i as u32;
            let stored = tree.prefix + node;
            self.tokens.push(t);
            self.positions.push(tree.prefix + tree.path(node).len() as u32 - 1);
            self.slots.push(block_table[(stored / bs) as usize] * bs + stored % bs);
        }
        let len = tokens.len() as u32;
        if logits {
            self.logits_for.extend(start..start + len);
        }
        let context_len = tree.prefix + end as u32;
        self.rows.push(RowMeta { start, len, context_len, block_table: block_table.to_vec(), tree: Some(tree) });
        Ok(())
    }

    pub fn new(block_size: u32) -> Self {
        BatchMeta { block_size, ..Default::default() }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}
