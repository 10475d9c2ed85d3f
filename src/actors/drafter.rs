//! Drafter: owns the proposer (a draft model with its own KV pool, the target's first
//! layers, or n-gram lookup) on its own OS thread (a draft model's CUDA calls block).
//! Receives each step plan from Intake on a crossbeam channel, fills the drafts of the rows
//! that decode, and passes the plan on to the Verifier on another; tells Intake (an actix
//! message) when its pool's use changed.
//!
//! While the Verifier verifies a step, the Drafter drafts the next round of the same rows
//! assuming every draft is accepted ("pre-drafting"): the tokens it proposes after the
//! current draft, the first of which guesses the target's bonus token. When the next plan
//! shows that guess held, those tokens are the next draft, already made; otherwise they are
//! dropped and the proposer rolls back. Rows pre-draft while their drafts are accepted
//! whole. With tree speculation each row gets a tree instead (`tree.rs`), nothing ahead.

mod tree;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use actix::Addr;
use metrics::{counter, gauge};

use super::intake::Intake;
use super::mailbox::{Mailbox, MailboxSender};
use super::messages::{DraftPoolUsage, HiddenStates, TreeVerdicts, VerifyMsg};
use super::metrics as m;
use super::timeline::{Timeline, Work};
use super::verifier::panic_message;
use crate::core::draft_sync::{readmit, resync, Ahead};
use crate::core::kv_manager::KvStats;
use crate::core::scheduler::{RowPlan, SeqParams, StepPlan};
use crate::request::RequestId;
use crate::spec::{Draft, ProposeRequest, Proposer, TreeShape};

struct DraftSeq {
    params: Arc<SeqParams>,
    /// The sequence as the last plan showed it: verified tokens and the row's new ones.
    history: Vec<u32>,
    /// Tokens proposed beyond `history`: this step's draft, then the pre-draft.
    ahead: Draft,
    /// Draft tokens sent with the last plan, and whether the step before it accepted them
    /// all: pre-drafting pays only while whole drafts are accepted.
    sent: usize,
    all_accepted: bool,
}

pub struct Drafter {
    proposer: Box<dyn Proposer>,
    seqs: HashMap<RequestId, DraftSeq>,
    verifier: MailboxSender<VerifyMsg>,
    /// Told of the proposer's KV pool use, for `RuntimeHandle::stats`.
    intake: Addr<Intake>,
    /// The pool's use as last told.
    pool: Option<KvStats>,
    timeline: Option<Arc<Timeline>>,
    /// Drafting failures are counted; the first is also logged as a warning.
    warned: bool,
    /// Set when the proposer panicked: its state is unknown, so it is not used again and
    /// rows go on without drafts (the output is the target's either way).
    broken: bool,
    /// The Verifier's hidden states of verified positions, for a proposer that reads them.
    pub hidden: Option<crossbeam_channel::Receiver<HiddenStates>>,
    /// Tree speculation: the shape of each row's tree (`tree.rs`), and the Verifier's
    /// verdicts on the last step's trees.
    pub tree: Option<TreeShape>,
    pub verdicts: Option<crossbeam_channel::Receiver<TreeVerdicts>>,
}

impl Drafter {
    pub fn new(
        proposer: Box<dyn Proposer>,
        verifier: MailboxSender<VerifyMsg>,
        intake: Addr<Intake>,
        timeline: Option<Arc<Timeline>>,
    ) -> Self {
        let seqs = HashMap::new();
        let (tree, verdicts) = (None, None);
        Drafter {
            proposer,
            seqs,
            verifier,
            intake,
            pool: None,
            timeline,
            warned: false,
            broken: false,
            hidden: None,
            tree,
            verdicts,
        }
    }

    /// Fills the drafts of `plan`'s decoding rows.
    pub fn draft(&mut self, plan: &mut StepPlan) {
        let start = Instant::now();
        // The previous step's hidden states arrived before this plan (sent before its
        // `StepDone`).
        while let Some(msg) = self.hidden.as_ref().and_then(|rx| rx.try_recv().ok()) {
            for row in msg.0 {
                self.proposer.observe(row.id.0, row.start, &row.rows);
            }
        }
        self.take_verdicts();
        for id in &plan.finished {
            self.seqs.remove(id);
            self.proposer.release(id.0);
        }
        for row in &plan.rows {
            self.sync(row);
        }
        if let Some(shape) = self.tree {
            self.draft_trees(plan, shape);
        }
        let chains = self.tree.is_none();
        let wanted: Vec<(RequestId, usize)> =
            plan.rows.iter().filter(|r| chains && r.sample && r.draft_len > 0).map(|r| (r.id, r.draft_len)).collect();
        self.extend(&wanted);
        for row in plan.rows.iter_mut().filter(|r| chains && r.sample && r.draft_len > 0) {
            if let Some(st) = self.seqs.get_mut(&row.id) {
                row.draft = take(&st.ahead, row.draft_len);
                st.sent = row.draft.tokens.len();
            }
        }
        self.publish_pool();
        plan.draft_seconds = start.elapsed().as_secs_f64();
        let drafted: usize = plan.rows.iter().map(|r| r.draft.tokens.len()).sum();
        if drafted > 0 {
            self.record(Work::Draft, plan.step, drafted, start);
        }
    }

    /// Drafts ahead for the rows of `plan` while the Verifier verifies it: the target's next
    /// token plus a next draft as long as this one. Only for rows whose last draft was
    /// accepted whole: elsewhere the guess would most likely be thrown away, and drafting
    /// still takes compute (and memory bandwidth) from the target. One token per row at a
    /// time, stopping as soon as `next_plan_came()`: a pre-draft must never delay the next
    /// plan (what is made by then is kept and the plan's draft goes on from it).
    pub fn pre_draft(&mut self, plan: &StepPlan, next_plan_came: impl Fn() -> bool) {
        // A proposer reading the target's hidden states drafts from verified positions only.
        if self.proposer.wants_hidden() {
            return;
        }
        let start = Instant::now();
        let promising =
            |r: &RowPlan| !r.draft.tokens.is_empty() && self.seqs.get(&r.id).is_some_and(|s| s.all_accepted);
        let mut goals: Vec<(RequestId, usize)> =
            plan.rows.iter().filter(|r| promising(r)).map(|r| (r.id, 2 * r.draft.tokens.len() + 1)).collect();
        let ahead = |d: &Self, id: &RequestId| d.seqs.get(id).map_or(0, |s| s.ahead.tokens.len());
        goals.retain(|(id, goal)| ahead(self, id) < *goal);
        let mut drafted = 0;
        while !goals.is_empty() && !next_plan_came() {
            let next: Vec<(RequestId, usize)> = goals.iter().map(|(id, _)| (*id, ahead(self, id) + 1)).collect();
            self.extend(&next);
            // Rows go on while they grew (a proposer with nothing more, or failing, stops)
            // and are short of their goal.
            let grown: Vec<bool> = next.iter().map(|(id, want)| ahead(self, id) >= *want).collect();
            drafted += grown.iter().filter(|&&g| g).count();
            let mut grown = grown.into_iter();
            goals.retain(|(id, goal)| grown.next() == Some(true) && ahead(self, id) < *goal);
        }
        if drafted > 0 {
            self.publish_pool();
            self.record(Work::PreDraft, plan.step, drafted, start);
        }
    }

    /// Brings a request's history up to `row`, keeping what it proposed before if the
    /// verified sequence followed it (`core::draft_sync`).
    fn sync(&mut self, row: &RowPlan) {
        if let Some((params, prefix)) = &row.fresh {
            let st = self.seqs.entry(row.id).or_insert_with(|| DraftSeq {
                params: params.clone(),
                history: vec![],
                ahead: Draft::default(),
                sent: 0,
                all_accepted: true,
            });
            // (Re-)admitted: only the verified prefix stands.
            self.proposer.rollback(row.id.0, readmit(&st.history, prefix));
            st.history.clone_from(prefix);
            st.ahead = Draft::default();
        }
        let Some(st) = self.seqs.get_mut(&row.id) else { return };
        if st.sent > 0 {
            st.all_accepted = row.computed >= st.history.len() + st.sent;
            st.sent = 0;
        }
        let now = resync(&st.history, &st.ahead.tokens, row.computed, &row.tokens);
        match now.ahead {
            Ahead::Kept { skip } => st.ahead = skip_draft(&st.ahead, skip),
            Ahead::Dropped { rollback_to } => {
                self.proposer.rollback(row.id.0, rollback_to);
                st.ahead = Draft::default();
            }
        }
        st.history = now.history;
    }

    /// Makes sure each request has `len` tokens proposed ahead of its history, drafting for
    /// all of them at once. A request whose drafting fails has nothing ahead this time.
    fn extend(&mut self, wanted: &[(RequestId, usize)]) {
        let mut ids = vec![];
        let mut contexts = vec![];
        for &(id, len) in wanted {
            let Some(st) = self.seqs.get(&id) else { continue };
            if st.ahead.tokens.len() < len {
                ids.push((id, len - st.ahead.tokens.len()));
                contexts.push([st.history.as_slice(), &st.ahead.tokens].concat());
            }
        }
        let reqs: Vec<ProposeRequest> = ids
            .iter()
            .zip(&contexts)
            .map(|(&(id, k), history)| ProposeRequest {
                seq: id.0,
                history,
                k,
                sampling: &self.seqs[&id].params.sampling,
            })
            .collect();
        let results = self.proposer.propose_many(&reqs);
        for (&(id, _), result) in ids.iter().zip(results) {
            let st = self.seqs.get_mut(&id).expect("present above");
            match result {
                Ok(more) => append(&mut st.ahead, more),
                Err(e) => {
                    counter!(m::SPEC_DRAFT_ERRORS).increment(1);
                    if !std::mem::replace(&mut self.warned, true) {
                        tracing::warn!(request = id.0, error = %e, "drafting failed; rows go on without drafts meanwhile");
                    }
                    self.proposer.rollback(id.0, st.history.len());
                    st.ahead = Draft::default();
                }
            }
        }
    }

    /// Tells Intake of the pool's use when it changed.
    fn publish_pool(&mut self) {
        let stats = self.proposer.kv_stats();
        if stats == self.pool {
            return;
        }
        if let Some(s) = stats {
            gauge!(m::KV_BLOCKS_USED, m::POOL_LABEL => m::POOL_DRAFT).set(s.used as f64);
            gauge!(m::KV_BLOCKS_TOTAL, m::POOL_LABEL => m::POOL_DRAFT).set(s.num_blocks as f64);
        }
        self.pool = stats;
        self.intake.do_send(DraftPoolUsage(stats));
    }

    fn record(&self, work: Work, step: u64, tokens: usize, start: Instant) {
        if let Some(t) = &self.timeline {
            t.record(work, step, tokens, start);
        }
    }

    /// Runs drafting work with a panic caught at the thread's boundary: the plan then goes
    /// on without drafts, and the proposer is not used again.
    fn caught(&mut self, plan: &mut StepPlan, work: impl FnOnce(&mut Self, &mut StepPlan)) {
        if self.broken {
            return;
        }
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| work(self, plan))) {
            self.broken = true;
            counter!(m::SPEC_DRAFT_ERRORS).increment(1);
            let why = panic_message(payload.as_ref());
            tracing::error!(%why, "drafting panicked; speculation is off from now on");
            plan.rows.iter_mut().for_each(|r| r.draft = Draft::default());
        }
    }

    /// Serves plans until Intake hangs up or the Verifier is gone.
    pub fn run(mut self, plans: Mailbox<VerifyMsg>) {
        while let Ok(mut plan) = plans.recv() {
            self.caught(&mut plan, |d, plan| d.draft(plan));
            // Trees are drafted from verified positions only.
            let pre = (!plan.rows.is_empty() && !self.broken && self.tree.is_none()).then(|| plan.clone());
            // One plan in flight: the Verifier's mailbox (of two) never makes this wait.
            if self.verifier.send(plan).is_err() {
                break;
            }
            if let Some(mut plan) = pre {
                self.caught(&mut plan, |d, plan| d.pre_draft(plan, || !plans.is_empty()));
            }
        }
    }
}

/// The first `n` tokens of a draft (with their probabilities).
fn take(d: &Draft, n: usize) -> Draft {
    let n = n.min(d.tokens.len());
    Draft { tokens: d.tokens[..n].to_vec(), probs: d.probs.as_ref().map(|p| p[..n].to_vec()) }
}

/// A draft without its first `n` tokens.
fn skip_draft(d: &Draft, n: usize) -> Draft {
    let n = n.min(d.tokens.len());
    Draft { tokens: d.tokens[n..].to_vec(), probs: d.probs.as_ref().map(|p| p[n..].to_vec()) }
}

fn append(d: &mut Draft, more: Draft) {
    if d.tokens.is_empty() {
        *d = more;
        return;
    }
    d.tokens.extend(more.tokens);
    if let (Some(p), Some(q)) = (d.probs.as_mut(), more.probs) {
        p.extend(q);
    }
}
