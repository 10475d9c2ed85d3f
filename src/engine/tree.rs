//! A tree verification step: the last token and a tree of drafts in one forward, each
//! draft reading the sequence and its ancestors only; the accepted path's keys and values
//! then move onto consecutive positions.
//!
//! ```text
//!  storage:  ... p-1 | p: last token | p+1 .. p+n: the n draft nodes, in tree order
//!  accepted path a1 < a2 < ... < am:  slot p+a_j → slot p+j  (in order: a_j ≥ j, and a
//!                                     destination is never a later source)
//! ```

use std::time::Instant;

use super::{reserve, Engine, EngineError, Sequence, SpecOptions, Speculating, SEQ};
use crate::backend::{Backend, BatchMeta};
use crate::core::sampling::Sampler;
use crate::core::tree::{accept_tree, path_moves, sample_node_targets, TreeDraft, TreeShape};
use crate::prompt::BLOCK_SIZE;
use crate::spec::{ids_suffice, SpecError};

impl<B: Backend> Engine<B> {
    /// One step with a tree of drafts; returns the accepted drafts and the target's token.
    pub(super) fn tree_step(
        &self,
        seq: &mut Sequence<B>,
        s: &mut SpecOptions,
        shape: TreeShape,
        state: &mut Speculating,
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, EngineError> {
        let history = &seq.history;
        let p = history.len() - 1;
        // Drafts up to the end of the sequence (the finish rules drop what lies past it).
        let depth = shape.depth.min(seq.limits.max_len.saturating_sub(history.len()));
        let draft = match depth {
            0 => TreeDraft::default(),
            _ => {
                let start = Instant::now();
                let d = s.proposer.propose_tree(SEQ, history, TreeShape { depth, ..shape })?;
                state.cost.record_draft(d.len(), start.elapsed().as_secs_f64());
                d
            }
        };
        let row = draft.row(history[p]);
        let table = reserve(&mut seq.blocks, p, row.len())?;
        let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
        meta.push_tree_row(&row, draft.mask(p as u32), &table, true)?;
        let step_start = Instant::now();
        let (out, hidden) = self.forward(&mut seq.kv, &meta, super::wanted(&*s.proposer))?;
        let targets = self.tree_targets(&out, &draft, history, sampler)?;
        let accept = accept_tree(&draft, &targets);
        s.proposer.tree_verified(SEQ, &draft, &targets);
        state.cost.record_step(row.len(), step_start.elapsed().as_secs_f64());
        seq.kv.copy_slots(&self.backend, &path_moves(&accept, p, &table, BLOCK_SIZE))?;
        if let Some(hidden) = hidden {
            // The positions verified: the last token and the accepted path.
            let width = hidden.len() / row.len();
            let rows = std::iter::once(0).chain(accept.path.iter().copied());
            let verified: Vec<f32> = rows.flat_map(|i| hidden[i * width..(i + 1) * width].iter().copied()).collect();
            s.proposer.observe(SEQ, p, &verified);
        }
        state.stats.record_tree(draft.len(), draft.max_depth(), accept.path.len());
        s.proposer.rollback(SEQ, history.len() + accept.tokens.len());
        Ok(accept.tokens)
    }

    /// The target's token after each node: its argmax when ids suffice, else the
    /// request's sampler in the node's own context (`core::tree::sample_node_targets`,
    /// which says why that is lossless).
    fn tree_targets(
        &self,
        out: &B::Tensor,
        draft: &TreeDraft,
        history: &[u32],
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, EngineError> {
        let vocab = self.model.config.vocab_size;
        if ids_suffice(sampler) {
            return Ok(self.backend.argmax_rows(out, vocab)?);
        }
        Ok(sample_node_targets(&self.backend.to_host(out)?, draft, history, sampler))
    }
}

/// Refuses what tree speculation cannot do: proposers without trees, synthetic acceptance.
pub(super) fn check_tree(s: &SpecOptions) -> Result<(), SpecError> {
    if !s.proposer.drafts_trees() {
        return Err(SpecError::TreeProposer);
    }
    match s.synthetic_acceptance {
        Some(_) => Err(SpecError::TreeSynthetic),
        None => Ok(()),
    }
}
