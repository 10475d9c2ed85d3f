//! Verifier: owns the target model, its KV cache and each request's sampler, on its own OS
//! thread (a blocking forward or CUDA call never stalls the actix actors). Receives step
//! plans on a crossbeam channel, runs one forward per plan, samples, applies the token
//! finish rules (`core::finish`), and sends the outcome (tokens included) to Intake, which
//! passes the tokens on to the Streamer: one message back per step, so one wake of the
//! actors' thread.
//!
//! With plain decoding every sampling row yields one token, chosen where the logits are
//! (`Mode`: only ids come back from a GPU). With speculation a decoding row
//! carries the Drafter's `k` drafts after its token: the forward computes `k + 1` logits for
//! it and `spec::verify` accepts a prefix of the drafts plus the target's own next token.
//! Rejected drafts' KV entries stay in the cache unreferenced (`computed` does not cover
//! them) and are overwritten by the next step. A row whose drafts are a tree (`tree.rs`) is
//! a tree row of the same forward; its accepted path's entries are moved after every row.

mod tree;

use std::collections::HashMap;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::Addr;
use metrics::counter;

use super::error::{DownReason, ExecutorError, ForwardOutput, StepError};
use super::executor::Executor;
use super::intake::Intake;
use super::mailbox::Mailbox;
use super::messages::{ExecutorStopped, HiddenStates, RowHidden, StepDone, StepFailure, TreeVerdicts, VerifyMsg};
use super::metrics as m;
use super::timeline::{Timeline, Work};
use crate::backend::BatchMeta;
use crate::core::finish::FinishRules;
use crate::core::sampling::{RowSampling, Sampler};
use crate::core::scheduler::{RowOutcome, RowPlan, SeqParams, StepPlan};
use crate::request::RequestId;
use crate::spec;

/// What a step's forward returns: greedy ids (every sampling row greedy without penalties),
/// sampled ids (every sampling row without drafts or greedy without penalties: sampled on
/// the device), or logits on the host. Verifying sampled drafts (rejection sampling against
/// the draft's probabilities) needs the target's distributions, so stays on the host.
enum Mode {
    Ids,
    Sampled,
    Logits,
}

/// What the forward returned for one row: its logits, or (all rows greedy) its greedy ids.
enum Scores<'a> {
    Logits(&'a [f32]),
    Ids(&'a [u32]),
}

struct SeqState {
    params: Arc<SeqParams>,
    sampler: Sampler,
    /// The sequence up to the row being computed (for repetition penalties).
    history: Vec<u32>,
}

/// Failed steps in a row after which the executor is not trusted with another: the
/// runtime goes down rather than fail every request it is given.
pub const MAX_FAILED_STEPS_IN_A_ROW: u32 = 3;

/// `X` runs the forwards; `E` is how they fail.
pub struct Verifier<X, E> {
    exec: X,
    /// Steps failed since the last one that ran.
    failed_in_a_row: u32,
    block_size: u32,
    eos: Vec<u32>,
    seqs: HashMap<RequestId, SeqState>,
    intake: Addr<Intake>,
    /// Benchmarks only: accept each draft token with this probability.
    pub synthetic_acceptance: Option<f64>,
    pub timeline: Option<Arc<Timeline>>,
    /// Where the hidden states of verified positions go, for a proposer that reads them.
    pub hidden: Option<crossbeam_channel::Sender<HiddenStates>>,
    /// Where tree rows' verdicts go, with tree speculation.
    pub trees: Option<crossbeam_channel::Sender<TreeVerdicts>>,
    error: PhantomData<fn() -> E>,
}

impl<X: Executor<E>, E: Into<ExecutorError>> Verifier<X, E> {
    pub fn new(exec: X, block_size: usize, eos: Vec<u32>, intake: Addr<Intake>) -> Self {
        Verifier {
            exec,
            failed_in_a_row: 0,
            block_size: block_size as u32,
            eos,
            seqs: HashMap::new(),
            intake,
            synthetic_acceptance: None,
            timeline: None,
            hidden: None,
            trees: None,
            error: PhantomData,
        }
    }

    /// Runs one plan: the forward over every row's tokens and drafts, then per sampling row
    /// the accepted drafts and the target's own token, and the finish rules.
    pub fn step(&mut self, plan: &StepPlan) -> Result<Vec<RowOutcome>, StepError> {
        let meta = self.batch(plan)?;
        if plan.rows.is_empty() {
            return Ok(vec![]);
        }
        let failed = |e: E| StepError::Executor(e.into());
        let (ids, logits) = match self.sampling_mode(plan) {
            Mode::Ids => (self.exec.forward_ids(&meta).map_err(failed)?, vec![]),
            Mode::Sampled => (self.forward_sampled(plan, &meta).map_err(failed)?, vec![]),
            Mode::Logits => (vec![], self.exec.forward(&meta).map_err(failed)?),
        };
        let ids_only = logits.is_empty();
        let vocab = self.exec.vocab_size();
        let mut offset = 0;
        let mut out = Vec::with_capacity(plan.rows.len());
        // Per row, which of its positions the step verified; what tree rows leave to do.
        let (mut verified, mut trees) = (Vec::with_capacity(plan.rows.len()), tree::TreeWork::default());
        for row in &plan.rows {
            let n = row.want_logits();
            let scores = match ids_only {
                true => Scores::Ids(ids.get(offset..offset + n).ok_or(StepError::ShortOutput(ForwardOutput::Ids))?),
                false => Scores::Logits(
                    logits
                        .get(offset * vocab..(offset + n) * vocab)
                        .ok_or(StepError::ShortOutput(ForwardOutput::Logits))?,
                ),
            };
            offset += n;
            let (o, kept) = match row.tree() {
                Some(t) => self.tree_outcome(row, t, scores, &mut trees),
                None => {
                    let o = self.outcome(row, scores);
                    let kept = (0..o.computed).collect();
                    (o, kept)
                }
            };
            out.push(o);
            verified.push(kept);
        }
        self.exec.copy_slots(&trees.moves).map_err(failed)?;
        self.send_hidden(plan, &meta, &verified);
        self.send_verdicts(trees.verdicts);
        Ok(out)
    }

    /// What the step's forward must return for its sampling rows.
    fn sampling_mode(&self, plan: &StepPlan) -> Mode {
        let ids_suffice = |r: &RowPlan| self.seqs.get(&r.id).is_some_and(|s| spec::ids_suffice(&s.sampler));
        let mut sampling = plan.rows.iter().filter(|r| r.sample);
        if sampling.clone().all(ids_suffice) {
            Mode::Ids
        } else if sampling.all(|r| r.draft.tokens.is_empty() || ids_suffice(r)) {
            Mode::Sampled
        } else {
            Mode::Logits
        }
    }

    /// The forward with every logits row sampled where the logits are (`Mode::Sampled`):
    /// a row without drafts as its request samples, each row of a greedy draft's by argmax.
    fn forward_sampled(&mut self, plan: &StepPlan, meta: &BatchMeta) -> Result<Vec<u32>, E> {
        // Each request's draw first (its RNG moves); then its settings are lent to the forward.
        let mut uniforms = HashMap::new();
        for row in plan.rows.iter().filter(|r| r.sample && r.draft.tokens.is_empty()) {
            if let Some(st) = self.seqs.get_mut(&row.id) {
                uniforms.insert(row.id, st.sampler.next_uniform());
            }
        }
        let mut rows = Vec::with_capacity(meta.logits_for.len());
        for row in &plan.rows {
            match (self.seqs.get(&row.id), uniforms.get(&row.id)) {
                (Some(st), Some(&uniform)) => {
                    rows.push(RowSampling { params: &st.sampler.params, history: &st.history, uniform })
                }
                _ => rows.extend(std::iter::repeat_n(RowSampling::greedy(), row.want_logits())),
            }
        }
        self.exec.forward_sampled(meta, &rows)
    }

    /// Passes the hidden states of each row's verified positions (its tokens and accepted
    /// drafts: `verified`, the row's query tokens that hold) to the Drafter; those of
    /// rejected drafts are dropped here.
    fn send_hidden(&mut self, plan: &StepPlan, meta: &BatchMeta, verified: &[Vec<usize>]) {
        let Some(tx) = &self.hidden else { return };
        let Some(all) = self.exec.take_hidden() else { return };
        let width = all.len() / meta.num_tokens().max(1);
        let rows = plan.rows.iter().zip(&meta.rows).zip(verified).map(|((row, m), kept)| {
            let at = |i: usize| (m.start as usize + i) * width;
            let rows = kept.iter().flat_map(|&i| all[at(i)..at(i) + width].iter().copied()).collect();
            RowHidden { id: row.id, start: row.computed, rows }
        });
        // The Drafter takes them before the next plan: the channel never holds more than a
        // step's. Were it full, drafting would restart from later positions, nothing worse.
        if tx.try_send(HiddenStates(rows.collect())).is_err() {
            tracing::warn!("the drafter's hidden states channel is full; dropping a step's");
        }
    }

    /// The step's batch, with each row's sequence state brought up to the plan.
    fn batch(&mut self, plan: &StepPlan) -> Result<BatchMeta, StepError> {
        for id in &plan.finished {
            self.seqs.remove(id);
        }
        let mut meta = BatchMeta::new(self.block_size);
        for row in &plan.rows {
            if let Some((params, prefix)) = &row.fresh {
                let st = self.seqs.entry(row.id).or_insert_with(|| SeqState {
                    params: params.clone(),
                    sampler: Sampler::new(params.sampling.clone()),
                    history: vec![],
                });
                st.history.clone_from(prefix);
            }
            let st = self.seqs.get_mut(&row.id).ok_or(StepError::UnknownRequest(row.id))?;
            st.history.truncate(row.computed);
            st.history.extend_from_slice(&row.tokens);
            let tokens: Vec<u32> = row.tokens.iter().chain(&row.draft.tokens).copied().collect();
            match row.tree() {
                Some(t) => meta
                    .push_tree_row(&tokens, t.mask(row.computed as u32), &row.block_table, true)
                    .map_err(|e| StepError::Executor(e.into()))?,
                None => meta.push_row(&tokens, row.computed as u32, &row.block_table, row.want_logits()),
            }
        }
        Ok(meta)
    }

    /// A row's result from its scores (`k + 1` rows for `k` drafts; none for a prefill chunk).
    fn outcome(&mut self, row: &RowPlan, scores: Scores) -> RowOutcome {
        let drafted = row.draft.tokens.len();
        let mut o = RowOutcome {
            id: row.id,
            computed: row.tokens.len(),
            new_tokens: vec![],
            finish: None,
            drafted,
            accepted: 0,
            depth: drafted,
        };
        if !row.sample {
            return o;
        }
        let st = self.seqs.get_mut(&row.id).expect("registered in step");
        let synthetic = self.synthetic_acceptance;
        let tokens = match scores {
            Scores::Ids(ids) if drafted == 0 => vec![ids[0]],
            Scores::Ids(ids) => spec::verify_ids(&row.draft, ids, &mut st.sampler, synthetic),
            Scores::Logits(logits) if drafted == 0 => vec![st.sampler.sample(logits, &st.history)],
            Scores::Logits(logits) => {
                let vocab = logits.len() / (drafted + 1);
                spec::verify(&row.draft, logits, vocab, &st.history, &mut st.sampler, synthetic)
            }
        };
        o.accepted = tokens.len() - 1;
        // Accepted drafts are in the cache now; the last token joins the next step's row.
        st.history.extend_from_slice(&tokens[..o.accepted]);
        record_acceptance(drafted, drafted, o.accepted);
        let p = &st.params;
        let rules = FinishRules { eos: &self.eos, ignore_eos: p.ignore_eos, limits: p.limits };
        let taken = rules.take(st.history.len() - o.accepted, &tokens);
        o.new_tokens = tokens[..taken.kept].to_vec();
        o.finish = taken.finish;
        // The cache keeps the accepted drafts, but never more than the sequence holds when
        // it ended early (an end-of-sequence token among them).
        o.computed += o.accepted.min(o.new_tokens.len());
        o
    }

    /// Runs a plan with whatever goes wrong inside it caught: an error or a panic fails the
    /// step (and the plan's rows), never the thread.
    fn step_caught(&mut self, plan: &StepPlan) -> Result<Vec<RowOutcome>, StepFailure> {
        let error = match catch_unwind(AssertUnwindSafe(|| self.step(plan))) {
            Ok(Ok(outcomes)) => {
                // A plan of departures only ran nothing: it proves nothing either way.
                if !plan.rows.is_empty() {
                    self.failed_in_a_row = 0;
                }
                return Ok(outcomes);
            }
            Ok(Err(e)) => e,
            Err(payload) => StepError::Panicked(panic_message(payload.as_ref())),
        };
        // The rows fail: their state here is dropped (Intake releases their blocks).
        for row in &plan.rows {
            self.seqs.remove(&row.id);
        }
        self.failed_in_a_row += 1;
        let fatal = if self.failed_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW {
            Some(DownReason::FailedInARow { count: self.failed_in_a_row, last: error.clone() })
        } else {
            self.exec.recover().err().map(|e| DownReason::Unrecoverable(e.into()))
        };
        Err(StepFailure { error, fatal })
    }

    /// Serves plans until Intake hangs up, or until a failure leaves the executor unable to
    /// go on; Intake hears of the thread's end from `StopNotice`.
    pub fn run(mut self, plans: Mailbox<VerifyMsg>) {
        let _notice = StopNotice(self.intake.clone());
        while let Ok(plan) = plans.recv() {
            let start = std::time::Instant::now();
            let result = self.step_caught(&plan);
            let fatal = result.as_ref().err().is_some_and(|f| f.fatal.is_some());
            if let Some(t) = &self.timeline {
                t.record(Work::Verify, plan.step, plan.num_tokens(), start);
            }
            let seconds = start.elapsed().as_secs_f64();
            counter!(m::STEPS).increment(1);
            let done = StepDone {
                step: plan.step,
                result,
                tokens: plan.num_tokens(),
                decode_only: plan.rows.iter().all(|r| r.tokens.len() == 1),
                seconds,
                drafted: plan.rows.iter().map(|r| r.draft.tokens.len()).sum(),
                draft_seconds: plan.draft_seconds,
            };
            // One step in flight: at most one `StepDone` is ever on its way.
            self.intake.do_send(done);
            if fatal || !self.intake.connected() {
                break;
            }
        }
    }
}

/// Tells Intake when the Verifier's thread ends, however it ends: a step in flight then
/// fails instead of hanging.
struct StopNotice(Addr<Intake>);

impl Drop for StopNotice {
    fn drop(&mut self) {
        self.0.do_send(ExecutorStopped);
    }
}

/// What a caught panic said.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(no message)".into(),
    }
}

/// Server-wide speculation counters, for `drafted` drafts reaching `depth` deep (a chain:
/// as deep as it is long) of which a path of `accepted` held; positions are depths.
fn record_acceptance(drafted: usize, depth: usize, accepted: usize) {
    if drafted == 0 {
        return;
    }
    counter!(m::SPEC_DRAFTS).increment(1);
    counter!(m::SPEC_DRAFT_TOKENS).increment(drafted as u64);
    counter!(m::SPEC_ACCEPTED_TOKENS).increment(accepted as u64);
    for i in 0..depth {
        let position = (i + 1).to_string();
        counter!(m::SPEC_DRAFTED_BY_POSITION, m::POSITION_LABEL => position.clone()).increment(1);
        if i < accepted {
            counter!(m::SPEC_ACCEPTED_BY_POSITION, m::POSITION_LABEL => position).increment(1);
        }
    }
}
