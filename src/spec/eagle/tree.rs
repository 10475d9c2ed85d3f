//! EAGLE-2 drafting: the head grows a tree one depth per forward, expanding the `top_k`
//! candidates of highest cumulative probability at each depth into their `top_k` likeliest
//! children; the tree kept is the `nodes` candidates of highest cumulative probability.
//!
//! ```text
//!  head cache:  target entries 0 .. prefix-1 | run nodes prefix+0, prefix+1, ...  (scratch)
//!  depth 1:     the first row's distribution → top_k children of the root
//!  depth d+1:   the top_k depth-d candidates run as one tree row (each reads the prefix
//!               and its run ancestors) → top_k children each
//! ```
//! A run node reads its parent's predicted feature (the root's children: the first row's);
//! the drafted entries are scratch, as in chain drafting.

use std::collections::HashMap;

use super::{EagleProposer, Row};
use crate::backend::{Backend, BackendError, BatchMeta};
use crate::core::tree::{best, expand, select_tree, Candidate, TreeDraft, TreeShape};
use crate::spec::{ProposeRequest, SeqId};
use crate::tensor::{TreeMask, NO_PARENT};

/// A tree growing in the head: the candidates so far, and the head's own tree of the
/// candidates it ran.
struct Growing {
    cands: Vec<Candidate>,
    /// Predicted feature of each candidate run (what its children's entries read).
    features: HashMap<usize, Vec<f32>>,
    /// The head node of each candidate run.
    nodes: HashMap<usize, u32>,
    /// The head's tree: each run node's parent node.
    mask: TreeMask,
}

impl<B: Backend> EagleProposer<B> {
    /// A tree of up to `shape.nodes` drafts continuing `history`, `shape.depth` deep at
    /// most (greedy drafting: the head's probabilities at temperature 1 rank candidates);
    /// empty when the head has no features to draft from.
    pub(super) fn draft_tree(
        &mut self,
        seq: SeqId,
        history: &[u32],
        shape: TreeShape,
    ) -> Result<TreeDraft, BackendError> {
        let sampling = crate::core::sampling::SamplingParams::default();
        let scratch = shape.top_k * shape.depth.saturating_sub(1);
        let req = ProposeRequest { seq, history, k: scratch.max(1), sampling: &sampling };
        let Some(first) = self.first_row(0, &req)? else { return Ok(TreeDraft::default()) };
        let prefix = (history.len() - 1 - self.seqs[&seq].base) as u32;
        let (root_feature, probs) = self.run_first(seq, &first, shape.top_k)?;
        let mut g = Growing {
            cands: vec![],
            features: HashMap::new(),
            nodes: HashMap::new(),
            mask: TreeMask { prefix, first: 0, parents: vec![] },
        };
        let mut level = expand(&mut g.cands, None, &probs);
        for _ in 1..shape.depth {
            let run = best(&g.cands, level, shape.top_k);
            let (feats, probs) = self.run_level(seq, &mut g, &run, &root_feature, shape.top_k)?;
            level = vec![];
            for ((&c, f), p) in run.iter().zip(feats).zip(probs) {
                g.features.insert(c, f);
                level.extend(expand(&mut g.cands, Some(c), &p));
            }
        }
        let st = self.seqs.get_mut(&seq).expect("first_row found the sequence");
        st.cached = history.len() - 1;
        Ok(select_tree(&g.cands, shape.nodes))
    }

    /// The first row: catches the head up and predicts the root's feature and distribution.
    fn run_first(&mut self, seq: SeqId, row: &Row, k: usize) -> Result<(Vec<f32>, TopTokens), BackendError> {
        let mut meta = BatchMeta::new(self.kv.block_size as u32);
        meta.push_row(&row.tokens, row.pos as u32, &self.seqs[&seq].blocks, 1);
        let (mut feats, mut probs) = self.head_forward(&meta, &row.features, k)?;
        Ok((feats.pop().unwrap_or_default(), probs.pop().unwrap_or_default()))
    }

    /// Runs the candidates `run` (one depth) as one tree row.
    fn run_level(
        &mut self,
        seq: SeqId,
        g: &mut Growing,
        run: &[usize],
        root_feature: &[f32],
        k: usize,
    ) -> Result<HeadOut, BackendError> {
        g.mask.first = g.mask.parents.len() as u32;
        let mut features = Vec::with_capacity(run.len() * self.hidden());
        for &c in run {
            let parent = g.cands[c].parent;
            g.mask.parents.push(parent.map_or(NO_PARENT, |p| g.nodes[&p]));
            g.nodes.insert(c, g.mask.parents.len() as u32 - 1);
            features.extend_from_slice(parent.map_or(root_feature, |p| &g.features[&p]));
        }
        let tokens: Vec<u32> = run.iter().map(|&c| g.cands[c].token).collect();
        let mut meta = BatchMeta::new(self.kv.block_size as u32);
        meta.push_tree_row(&tokens, g.mask.clone(), &self.seqs[&seq].blocks, true)?;
        self.head_forward(&meta, &features, k)
    }

    /// One head forward: each logit row's predicted feature and its `k` likeliest tokens
    /// with their log-probabilities.
    fn head_forward(&mut self, meta: &BatchMeta, features: &[f32], k: usize) -> Result<HeadOut, BackendError> {
        let (out, logits) = self.head.step(&self.backend, &self.target, &mut self.kv, meta, features)?;
        let tops = logits.top_log_probs(&self.backend, k)?;
        Ok((out.chunks(self.hidden()).map(<[f32]>::to_vec).collect(), tops))
    }
}

/// A row's likeliest tokens with their log-probabilities.
type TopTokens = crate::tensor::TopLogProbs;

/// Predicted features, and each row's likeliest tokens.
type HeadOut = (Vec<Vec<f32>>, Vec<TopTokens>);
