//! A tree row's verification in the Verifier: the row's token and its tree of drafts went
//! through the step's one forward (a tree row, each node reading the sequence and its
//! ancestors); here the target's token after each node is chosen, the longest path it
//! follows is accepted, and what the step leaves to do once every row is done is gathered:
//! the accepted path's KV entries moved onto consecutive positions, and the verdict for the
//! Drafter.
//!
//! ```text
//!  storage:  ... p-1 | p: the row's token | p+1 .. p+n: the n draft nodes, in tree order
//!  accepted path a1 < a2 < ... < am:  slot p+a_j → slot p+j  (in order: a_j ≥ j, and a
//!                                     destination is never a later source)
//! ```

use super::{record_acceptance, Scores, Verifier};
use crate::actors::error::ExecutorError;
use crate::actors::executor::Executor;
use crate::actors::messages::{TreeVerdict, TreeVerdicts};
use crate::core::finish::FinishRules;
use crate::core::scheduler::{RowOutcome, RowPlan};
use crate::core::tree::{accept_tree, path_moves, sample_node_targets, TreeDraft};

/// What a step's tree rows leave to do once every row has its outcome.
#[derive(Debug, Default)]
pub(super) struct TreeWork {
    /// KV slot moves that bring each accepted path onto consecutive positions.
    pub moves: Vec<(u32, u32)>,
    /// Each tree row's draft and targets, for the Drafter.
    pub verdicts: Vec<TreeVerdict>,
}

impl<X: Executor<E>, E: Into<ExecutorError>> Verifier<X, E> {
    /// A tree row's result from its scores (a row per node, the root's first), and the rows
    /// of the step's hidden states it verified (the root, then the accepted path).
    pub(super) fn tree_outcome(
        &mut self,
        row: &RowPlan,
        tree: TreeDraft,
        scores: Scores,
        work: &mut TreeWork,
    ) -> (RowOutcome, Vec<usize>) {
        let st = self.seqs.get_mut(&row.id).expect("registered in step");
        let targets = match scores {
            Scores::Ids(ids) => ids.to_vec(),
            Scores::Logits(logits) => sample_node_targets(logits, &tree, &st.history, &mut st.sampler),
        };
        let accept = accept_tree(&tree, &targets);
        let accepted = accept.path.len();
        work.moves.extend(path_moves(&accept, row.computed, &row.block_table, self.block_size as usize));
        // The accepted path is in the cache (once moved); the last token joins the next row.
        st.history.extend_from_slice(&accept.tokens[..accepted]);
        record_acceptance(tree.len(), tree.max_depth(), accepted);
        let p = &st.params;
        let rules = FinishRules { eos: &self.eos, ignore_eos: p.ignore_eos, limits: p.limits };
        let taken = rules.take(st.history.len() - accepted, &accept.tokens);
        let o = RowOutcome {
            id: row.id,
            // Never more than the sequence holds when it ended early.
            computed: 1 + accepted.min(taken.kept),
            new_tokens: accept.tokens[..taken.kept].to_vec(),
            finish: taken.finish,
            drafted: tree.len(),
            accepted,
            depth: tree.max_depth(),
        };
        let verified = std::iter::once(0).chain(accept.path.iter().copied()).take(o.computed).collect();
        work.verdicts.push(TreeVerdict { id: row.id, draft: tree, targets });
        (o, verified)
    }

    /// Hands the step's tree verdicts to the Drafter.
    pub(super) fn send_verdicts(&self, verdicts: Vec<TreeVerdict>) {
        let Some(tx) = &self.trees else { return };
        if verdicts.is_empty() {
            return;
        }
        // The Drafter takes them before the next plan: one step's at most are waiting.
        if tx.try_send(TreeVerdicts(verdicts)).is_err() {
            tracing::warn!("the drafter's tree verdicts channel is full; dropping a step's");
        }
    }
}
