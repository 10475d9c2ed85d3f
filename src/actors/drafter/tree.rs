//! Tree speculation in the Drafter: each decoding row that may draft gets a tree from the
//! proposer (`Proposer::propose_tree`), as deep as the shape says and with no more nodes
//! than the row reserved; nothing is drafted ahead (a tree is grown from verified positions
//! only). The Verifier's verdict on each tree comes back before the next plan: the accepted
//! path becomes the tokens ahead of the request's history, which `sync` then finds
//! verified, exactly as an accepted chain.
//!
//! ```text
//!  plan N:    history h (ends with the row's token)  → tree T drafted after it
//!  verdict:   T's targets → accepted path a1..am     → ahead = tokens of a1..am
//!  plan N+1:  computed = |h| + m, new token t        → history h a1..am t, proposer rolled
//!                                                       back to |h| + m
//! ```

use metrics::counter;

use super::Drafter;
use crate::actors::messages::TreeVerdicts;
use crate::actors::metrics as m;
use crate::core::scheduler::StepPlan;
use crate::core::tree::accept_tree;
use crate::request::RequestId;
use crate::spec::{Draft, TreeShape};

impl Drafter {
    /// Takes the Verifier's verdicts on the last step's trees: the proposer learns from
    /// every node, and each accepted path is put ahead of its request's history.
    pub(super) fn take_verdicts(&mut self) {
        while let Some(TreeVerdicts(verdicts)) = self.verdicts.as_ref().and_then(|rx| rx.try_recv().ok()) {
            for v in verdicts {
                self.proposer.tree_verified(v.id.0, &v.draft, &v.targets);
                let Some(st) = self.seqs.get_mut(&v.id) else { continue };
                let accept = accept_tree(&v.draft, &v.targets);
                st.ahead = Draft { tokens: accept.tokens[..accept.path.len()].to_vec(), probs: None };
            }
        }
    }

    /// Fills a tree for each of `plan`'s rows that may draft: at most `shape.nodes` and
    /// the row's reserved positions, as deep as `shape.depth`. A proposer with nothing to
    /// draft from, or a tree that does not fit, leaves the row plain.
    pub(super) fn draft_trees(&mut self, plan: &mut StepPlan, shape: TreeShape) {
        for row in plan.rows.iter_mut().filter(|r| r.sample && r.draft_len > 0 && r.tokens.len() == 1) {
            let Some(st) = self.seqs.get(&row.id) else { continue };
            let nodes = shape.nodes.min(row.draft_len);
            let want = TreeShape { nodes, depth: shape.depth.min(nodes), ..shape };
            match self.proposer.propose_tree(row.id.0, &st.history, want) {
                // A proposer with its own shape (lookahead) may grow more than was reserved.
                Ok(t) if !t.is_empty() && t.len() <= row.draft_len && t.is_valid() => {
                    row.draft = Draft { tokens: t.tokens, probs: None };
                    row.parents = Some(t.parents);
                }
                Ok(_) => {}
                Err(e) => self.tree_failed(row.id, st.history.len(), &e),
            }
        }
    }

    /// A tree that could not be drafted: counted, logged once; the proposer forgets what
    /// it held past the history, and the row goes on without drafts.
    fn tree_failed(&mut self, id: RequestId, history: usize, e: &dyn std::error::Error) {
        counter!(m::SPEC_DRAFT_ERRORS).increment(1);
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(request = id.0, error = %e, "drafting a tree failed; rows go on without drafts meanwhile");
        }
        self.proposer.rollback(id.0, history);
    }
}
