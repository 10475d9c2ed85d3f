//! Verifier: owns the target model, its KV cache and each request's sampler, on its own OS
//! thread (blocking compute never stalls the async actors). Receives step plans, runs one
//! forward per plan, samples, and sends the tokens to the Streamer and the outcome to Intake.
//!
//! With plain decoding every sampling row yields one token. With speculation a decoding row
//! carries the Drafter's `k` drafts after its token: the forward computes `k + 1` logits for
//! it and `spec::verify` accepts a prefix of the drafts plus the target's own next token.
//! Rejected drafts' KV entries stay in the cache unreferenced (`computed` does not cover
//! them) and are overwritten by the next step.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use tokio::sync::mpsc;

use metrics::counter;

use super::messages::{StepDone, StepFailure, StreamMsg, VerifyMsg};
use super::metrics as m;
use super::timeline::{Timeline, Work};
use crate::backend::{Backend, BatchMeta};
use crate::core::sampling::{argmax, Sampler};
use crate::core::scheduler::{RowOutcome, RowPlan, SeqParams, StepPlan};
use crate::model::{KvCache, Llama};
use crate::request::{FinishReason, RequestId};
use crate::spec;

/// What runs a step's forward: the model (any backend) or, for benchmarks of the runtime
/// itself, nothing at all.
pub trait Executor: Send + 'static {
    fn vocab_size(&self) -> usize;
    /// After a failed step (an error, or a panic caught at the Verifier's boundary): whether
    /// this executor can run further steps. The failed step's rows are dropped and their KV
    /// blocks released, so nothing the step wrote is read again; what is left to check is
    /// the executor itself (a GPU with a sticky error cannot go on). Kept by default.
    fn recover(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Logits `[meta.logits_for.len(), vocab]`, row-major.
    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, String>;
    /// The greedy id of each of those rows instead (from a GPU, only ids cross to the host).
    fn forward_ids(&mut self, meta: &BatchMeta) -> Result<Vec<u32>, String> {
        let vocab = self.vocab_size();
        Ok(self.forward(meta)?.chunks(vocab).map(argmax).collect())
    }
}

/// The target model with its paged KV cache (block ids are the KvAllocator's).
pub struct ModelExecutor<B: Backend> {
    pub backend: B,
    pub model: Arc<Llama<B>>,
    pub kv: KvCache<B>,
}

impl<B: Backend> Executor for ModelExecutor<B> {
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    fn recover(&mut self) -> Result<(), String> {
        self.backend.healthy().map_err(|e| format!("the device cannot go on: {e}"))
    }

    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, String> {
        // `forward_step`: a GPU replays the graph it captured for a step of this shape.
        let layers = self.model.num_layers();
        let logits = self.backend.forward_step(&self.model, &mut self.kv, meta, layers).map_err(|e| e.to_string())?;
        self.backend.to_host(&logits).map_err(|e| e.to_string())
    }

    fn forward_ids(&mut self, meta: &BatchMeta) -> Result<Vec<u32>, String> {
        let layers = self.model.num_layers();
        let logits = self.backend.forward_step(&self.model, &mut self.kv, meta, layers).map_err(|e| e.to_string())?;
        self.backend.argmax_rows(&logits, self.model.config.vocab_size).map_err(|e| e.to_string())
    }
}

/// No model: logits that make token `(last input + 1) % vocab` the greedy choice. Measures
/// what the runtime costs per step (scheduling, messages, sampling a tiny vocabulary).
pub struct NoopExecutor {
    pub vocab: usize,
}

impl Executor for NoopExecutor {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, String> {
        let mut out = vec![0f32; meta.logits_for.len() * self.vocab];
        for (row, &t) in meta.logits_for.iter().enumerate() {
            let next = (meta.tokens[t as usize] as usize + 1) % self.vocab;
            out[row * self.vocab + next] = 1.0;
        }
        Ok(out)
    }
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

pub struct Verifier<E: Executor> {
    exec: E,
    /// Steps failed since the last one that ran.
    failed_in_a_row: u32,
    block_size: u32,
    eos: Vec<u32>,
    seqs: HashMap<RequestId, SeqState>,
    streamer: mpsc::Sender<StreamMsg>,
    intake: mpsc::Sender<StepDone>,
    /// Benchmarks only: accept each draft token with this probability.
    pub synthetic_acceptance: Option<f64>,
    pub timeline: Option<Arc<Timeline>>,
}

impl<E: Executor> Verifier<E> {
    pub fn new(
        exec: E,
        block_size: usize,
        eos: Vec<u32>,
        streamer: mpsc::Sender<StreamMsg>,
        intake: mpsc::Sender<StepDone>,
    ) -> Self {
        Verifier {
            exec,
            failed_in_a_row: 0,
            block_size: block_size as u32,
            eos,
            seqs: HashMap::new(),
            streamer,
            intake,
            synthetic_acceptance: None,
            timeline: None,
        }
    }

    /// Runs one plan: the forward over every row's tokens and drafts, then per sampling row
    /// the accepted drafts and the target's own token, and the stop checks.
    pub fn step(&mut self, plan: &StepPlan) -> Result<Vec<RowOutcome>, String> {
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
            let st = self.seqs.get_mut(&row.id).ok_or_else(|| format!("row for unknown request {:?}", row.id))?;
            st.history.truncate(row.computed);
            st.history.extend_from_slice(&row.tokens);
            let tokens: Vec<u32> = row.tokens.iter().chain(&row.draft.tokens).copied().collect();
            meta.push_row(&tokens, row.computed as u32, &row.block_table, row.want_logits());
        }
        if plan.rows.is_empty() {
            return Ok(vec![]);
        }
        // When every sampling row is greedy without penalties, ids decide everything.
        let greedy = |r: &RowPlan| self.seqs.get(&r.id).is_some_and(|s| spec::ids_suffice(&s.sampler));
        let ids_only = plan.rows.iter().filter(|r| r.sample).all(greedy);
        let (ids, logits) =
            if ids_only { (self.exec.forward_ids(&meta)?, vec![]) } else { (vec![], self.exec.forward(&meta)?) };
        let vocab = self.exec.vocab_size();
        let mut offset = 0;
        let mut out = Vec::with_capacity(plan.rows.len());
        for row in &plan.rows {
            let n = row.want_logits();
            let scores = match ids_only {
                true => Scores::Ids(ids.get(offset..offset + n).ok_or("the forward returned too few ids")?),
                false => Scores::Logits(
                    logits.get(offset * vocab..(offset + n) * vocab).ok_or("the forward returned too few logits")?,
                ),
            };
            offset += n;
            out.push(self.outcome(row, scores));
        }
        Ok(out)
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
        record_acceptance(drafted, o.accepted);
        let p = &st.params;
        let mut len = st.history.len() - o.accepted;
        for t in tokens {
            len += 1;
            if !p.ignore_eos && self.eos.contains(&t) {
                o.finish = Some(FinishReason::Stop);
                break;
            }
            o.new_tokens.push(t);
            if p.limits.reached(len) {
                o.finish = Some(FinishReason::Length);
                break;
            }
        }
        // The cache keeps the accepted drafts, but never more than the sequence holds when
        // it ended early (an end-of-sequence token among them).
        o.computed += o.accepted.min(o.new_tokens.len());
        o
    }

    /// Runs a plan with whatever goes wrong inside it caught: an error or a panic fails the
    /// step (and the plan's rows), never the thread.
    fn step_caught(&mut self, plan: &StepPlan) -> Result<Vec<RowOutcome>, StepFailure> {
        let (message, panicked) = match catch_unwind(AssertUnwindSafe(|| self.step(plan))) {
            Ok(Ok(outcomes)) => {
                // A plan of departures only ran nothing: it proves nothing either way.
                if !plan.rows.is_empty() {
                    self.failed_in_a_row = 0;
                }
                return Ok(outcomes);
            }
            Ok(Err(e)) => (e, false),
            Err(payload) => (format!("panicked: {}", panic_message(payload.as_ref())), true),
        };
        // The rows fail: their state here is dropped (Intake releases their blocks).
        for row in &plan.rows {
            self.seqs.remove(&row.id);
        }
        self.failed_in_a_row += 1;
        let fatal = if self.failed_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW {
            Some(format!("{} steps failed in a row, the last one: {message}", self.failed_in_a_row))
        } else {
            self.exec.recover().err()
        };
        Err(StepFailure { message, panicked, fatal })
    }

    /// Serves plans until Intake hangs up, or until a failure leaves the executor unable to
    /// go on. A send that fails means the receiver is gone (shutting down): the loop ends
    /// and the thread with it.
    pub fn run(mut self, mut rx: mpsc::Receiver<VerifyMsg>) {
        while let Some(plan) = rx.blocking_recv() {
            let start = std::time::Instant::now();
            let result = self.step_caught(&plan);
            let fatal = result.as_ref().err().is_some_and(|f| f.fatal.is_some());
            if let Some(t) = &self.timeline {
                t.record(Work::Verify, plan.step, start);
            }
            let seconds = start.elapsed().as_secs_f64();
            if let Ok(outcomes) = &result {
                let said: Vec<RowOutcome> =
                    outcomes.iter().filter(|o| !o.new_tokens.is_empty() || o.finish.is_some()).cloned().collect();
                if !said.is_empty() && self.streamer.blocking_send(StreamMsg::Step(said)).is_err() {
                    break;
                }
            }
            metrics::counter!(super::metrics::STEPS).increment(1);
            let done = StepDone {
                step: plan.step,
                result,
                tokens: plan.num_tokens(),
                decode_only: plan.rows.iter().all(|r| r.tokens.len() == 1),
                seconds,
                drafted: plan.rows.iter().map(|r| r.draft.tokens.len()).sum(),
                draft_seconds: plan.draft_seconds,
            };
            if self.intake.blocking_send(done).is_err() || fatal {
                break;
            }
        }
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

/// Server-wide speculation counters.
fn record_acceptance(drafted: usize, accepted: usize) {
    if drafted == 0 {
        return;
    }
    counter!(m::SPEC_DRAFTS).increment(1);
    counter!(m::SPEC_DRAFT_TOKENS).increment(drafted as u64);
    counter!(m::SPEC_ACCEPTED_TOKENS).increment(accepted as u64);
    for i in 0..drafted {
        let position = (i + 1).to_string();
        counter!(m::SPEC_DRAFTED_BY_POSITION, m::POSITION_LABEL => position.clone()).increment(1);
        if i < accepted {
            counter!(m::SPEC_ACCEPTED_BY_POSITION, m::POSITION_LABEL => position).increment(1);
        }
    }
}
