//! What one forward step is, built on the host: the query tokens of every row, where their
//! keys and values go in the paged KV cache, and which rows want logits.

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
        self.rows.push(RowMeta { start, len, context_len: cached + len, block_table: block_table.to_vec() });
    }

    pub fn new(block_size: u32) -> Self {
        BatchMeta { block_size, ..Default::default() }
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}
