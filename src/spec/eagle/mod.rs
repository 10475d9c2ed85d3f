//! EAGLE drafting: a one-layer head reads the target's own hidden states and drafts a
//! chain of tokens, each step on the feature it predicted the step before.
//!
//! ```text
//!  sequence:         x_0 x_1 ... x_{n-2} x_{n-1} | d_1 d_2 ... d_k   (x_{n-1}: the target's
//!  target features:  f_0 f_1 ... f_{n-2}         |                    newest token, not run yet)
//!  head entries:     (x_1,f_0) ... (x_{n-1},f_{n-2}) → f̂_{n-1} → d_1
//!                    (d_1, f̂_{n-1}) → f̂_n → d_2,  ...
//! ```
//! Entries that read the target's features stay in the head's KV cache; drafted entries
//! are scratch, recomputed from the target's features once it has verified them. The
//! target's features come from `Proposer::observe` (verified positions only), so a rejected
//! draft never leaves anything behind.

mod eagle3;
mod head;
mod heads;
mod tree;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::SeedableRng;

pub use eagle3::{is_eagle3, Eagle3Head};
pub use head::{check_sizes, EagleHead, DEFAULT_HEAD};
pub use heads::{Head, HeadLogits};

use super::{pick_draft_token, propose_one, Draft, ProposeRequest, Proposer, SeqId, SpecError, TreeDraft, TreeShape};
use crate::backend::{Backend, BackendError, BatchMeta};
use crate::core::block_pool::BlockPool;
use crate::core::kv_manager::KvStats;
use crate::core::sampling::SamplingParams;
use crate::model::{KvCache, Llama};

/// A size a head must share with its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadSize {
    Hidden,
    Vocab,
}

impl std::fmt::Display for HeadSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeadSize::Hidden => "hidden size",
            HeadSize::Vocab => "vocabulary size",
        })
    }
}

/// What the head holds of one sequence.
struct HeadSeq {
    /// The sequence position of `features`' first row. The head's cache starts there: the
    /// entry of position p sits at head position p - base (RoPE sees only differences).
    base: usize,
    /// The target's features at positions `base..`, `[n, width]` (`Head::feature_width`).
    features: Vec<f32>,
    /// Entries `base..cached` are in the head's cache, computed from the target's features.
    cached: usize,
    blocks: Vec<u32>,
}

impl HeadSeq {
    /// Positions below this have a target feature.
    fn known(&self, hidden: usize) -> usize {
        self.base + self.features.len() / hidden
    }

    /// Features from `start` on: contiguous ones extend, others restart the head's cache.
    fn observe(&mut self, start: usize, rows: &[f32], hidden: usize) {
        if start < self.base || start > self.known(hidden) {
            (self.base, self.cached) = (start, start);
            self.features.clear();
        }
        self.features.truncate((start - self.base) * hidden);
        self.cached = self.cached.min(start);
        self.features.extend_from_slice(rows);
    }

    /// Only the first `valid` tokens stand: entry p read token p + 1.
    fn rollback(&mut self, valid: usize, hidden: usize) {
        if valid < self.base {
            (self.base, self.cached) = (valid, valid);
        }
        self.features.truncate((valid - self.base) * hidden);
        self.cached = self.cached.min(valid.saturating_sub(1)).max(self.base);
    }
}

/// One row of a head step: entries from head position `pos`.
struct Row {
    req: usize,
    pos: usize,
    tokens: Vec<u32>,
    features: Vec<f32>,
}

pub struct EagleProposer<B: Backend> {
    backend: B,
    target: Arc<Llama<B>>,
    head: Head<B>,
    kv: KvCache<B>,
    pool: BlockPool,
    seqs: HashMap<SeqId, HeadSeq>,
    rng: StdRng,
}

impl<B: Backend> EagleProposer<B> {
    /// A proposer drafting with `head` (EAGLE-1 or EAGLE-3) for `target`, the head's cache
    /// `num_blocks` blocks of `block_size` entries.
    pub fn new(
        backend: B,
        target: Arc<Llama<B>>,
        head: impl Into<Head<B>>,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, SpecError> {
        let head = head.into();
        head.check(&target.config)?;
        let kv = head.kv_cache(&backend, num_blocks, block_size)?;
        let (pool, seqs, rng) =
            (BlockPool::new(num_blocks, block_size), HashMap::new(), StdRng::seed_from_u64(0xea91e));
        Ok(EagleProposer { backend, target, head, kv, pool, seqs, rng })
    }

    /// Loads the head in `dir` (config.json and model.safetensors) for `target`: EAGLE-3
    /// when its files say so (`is_eagle3`), else EAGLE-1.
    pub fn load(
        backend: B,
        target: Arc<Llama<B>>,
        dir: &Path,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, SpecError> {
        let head = Head::load(dir, &target.config, &backend)?;
        Self::new(backend, target, head, num_blocks, block_size)
    }

    fn hidden(&self) -> usize {
        self.head.config().hidden_size
    }

    /// Values per position of the target's features (3 hidden for EAGLE-3).
    fn width(&self) -> usize {
        self.head.feature_width()
    }

    /// The row that catches the head up on `r`'s target features and drafts its first
    /// token, with blocks for `r.k` drafts; None when the features do not reach the
    /// newest token (nothing to draft from).
    fn first_row(&mut self, i: usize, r: &ProposeRequest) -> Result<Option<Row>, BackendError> {
        let (h, n) = (self.width(), r.history.len());
        let Some(st) = self.seqs.get_mut(&r.seq) else { return Ok(None) };
        if r.k == 0 || n < 2 || st.base > n - 2 || st.known(h) < n - 1 {
            return Ok(None);
        }
        // At least the last entry runs again: its output gives the first draft.
        st.cached = st.cached.min(n - 2);
        let bs = self.kv.block_size;
        let need = (n - 1 - st.base + r.k).div_ceil(bs);
        if need > st.blocks.len() {
            let more = self.pool.allocate_n(need - st.blocks.len());
            st.blocks.extend(more.ok_or_else(|| BackendError::Invalid("the EAGLE head's KV cache is full".into()))?);
        }
        let (from, to) = (st.cached - st.base, n - 1 - st.base);
        let features = st.features[from * h..to * h].to_vec();
        Ok(Some(Row { req: i, pos: from, tokens: r.history[st.cached + 1..].to_vec(), features }))
    }

    /// One head forward over `rows`: each row's predicted feature and drafted token.
    fn step(
        &mut self,
        reqs: &[ProposeRequest],
        rows: &[Row],
        drafts: &mut [Draft],
    ) -> Result<Vec<(Vec<f32>, u32)>, BackendError> {
        let mut meta = BatchMeta::new(self.kv.block_size as u32);
        let mut features = Vec::with_capacity(rows.iter().map(|r| r.features.len()).sum());
        for r in rows {
            meta.push_row(&r.tokens, r.pos as u32, &self.seqs[&reqs[r.req].seq].blocks, 1);
            features.extend_from_slice(&r.features);
        }
        let (out, logits) = self.head.step(&self.backend, &self.target, &mut self.kv, &meta, &features)?;
        let picked = self.pick(reqs, rows, &logits, drafts)?;
        Ok(out.chunks(self.hidden()).map(<[f32]>::to_vec).zip(picked).collect())
    }

    /// Each row's next token: greedy, or sampled with the request's own parameters (the
    /// distribution joins the draft's probabilities).
    fn pick(
        &mut self,
        reqs: &[ProposeRequest],
        rows: &[Row],
        logits: &HeadLogits<B>,
        drafts: &mut [Draft],
    ) -> Result<Vec<u32>, BackendError> {
        let vocab = self.target.config.vocab_size;
        if rows.iter().all(|r| reqs[r.req].sampling.is_greedy()) {
            return logits.argmax(&self.backend);
        }
        let host = logits.host_rows(&self.backend)?;
        let mut picked = Vec::with_capacity(rows.len());
        for (r, row) in rows.iter().zip(host.chunks(vocab)) {
            let (req, draft) = (&reqs[r.req], &mut drafts[r.req]);
            let context = [req.history, &draft.tokens].concat();
            picked.push(pick_draft_token(draft, row, &context, req.sampling, &mut self.rng));
        }
        Ok(picked)
    }

    /// Drafts the chains of `rows` (first rows made) to their requests' lengths.
    fn draft_chains(
        &mut self,
        reqs: &[ProposeRequest],
        mut rows: Vec<Row>,
        drafts: &mut [Draft],
    ) -> Result<(), BackendError> {
        while !rows.is_empty() {
            let out = self.step(reqs, &rows, drafts)?;
            let mut next = vec![];
            for (row, (feature, token)) in rows.into_iter().zip(out) {
                drafts[row.req].tokens.push(token);
                if drafts[row.req].tokens.len() < reqs[row.req].k {
                    let pos = row.pos + row.tokens.len();
                    next.push(Row { req: row.req, pos, tokens: vec![token], features: feature });
                }
            }
            rows = next;
        }
        Ok(())
    }
}

impl<B: Backend> Proposer for EagleProposer<B> {
    fn propose(
        &mut self,
        seq: SeqId,
        history: &[u32],
        k: usize,
        sampling: &SamplingParams,
    ) -> Result<Draft, BackendError> {
        propose_one(self, ProposeRequest { seq, history, k, sampling })
    }

    /// All sequences advance together, one head forward per draft position.
    fn propose_many(&mut self, reqs: &[ProposeRequest]) -> Vec<Result<Draft, BackendError>> {
        let mut drafts: Vec<Draft> = reqs.iter().map(ProposeRequest::empty_draft).collect();
        let mut out: Vec<Option<BackendError>> = reqs.iter().map(|_| None).collect();
        let mut rows = vec![];
        for (i, r) in reqs.iter().enumerate() {
            match self.first_row(i, r) {
                Ok(row) => rows.extend(row),
                Err(e) => out[i] = Some(e),
            }
        }
        let running: Vec<usize> = rows.iter().map(|r| r.req).collect();
        let result = self.draft_chains(reqs, rows, &mut drafts);
        for &i in &running {
            let st = self.seqs.get_mut(&reqs[i].seq).expect("rows come from known sequences");
            match &result {
                // The target-feature entries are in the cache now; the drafted ones are scratch.
                Ok(()) => st.cached = reqs[i].history.len() - 1,
                Err(e) => out[i] = Some(BackendError::Invalid(e.to_string())),
            }
        }
        drafts.into_iter().zip(out).map(|(d, e)| e.map_or(Ok(d), Err)).collect()
    }

    fn rollback(&mut self, seq: SeqId, valid: usize) {
        let h = self.width();
        if let Some(s) = self.seqs.get_mut(&seq) {
            s.rollback(valid, h);
        }
    }

    fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.pool.free_all(&s.blocks);
        }
    }

    fn kv_stats(&self) -> Option<KvStats> {
        Some(KvStats::of_pool(&self.pool))
    }

    fn wants_hidden(&self) -> bool {
        true
    }

    fn hidden_kind(&self) -> crate::model::HiddenKind {
        self.head.hidden_kind()
    }

    fn drafts_trees(&self) -> bool {
        true
    }

    fn propose_tree(&mut self, seq: SeqId, history: &[u32], shape: TreeShape) -> Result<TreeDraft, BackendError> {
        self.draft_tree(seq, history, shape)
    }

    fn observe(&mut self, seq: SeqId, start: usize, hidden: &[f32]) {
        let h = self.width();
        let st =
            self.seqs.entry(seq).or_insert(HeadSeq { base: start, features: vec![], cached: start, blocks: vec![] });
        st.observe(start, hidden, h);
    }
}
