//! Which requests run in the next forward step, and how many tokens each brings.
//!
//! One counter per request, `computed` (tokens whose KV is in the cache): a prefill chunk,
//! a decode step and (later) a verification of k drafts are all "feed tokens
//! `computed..computed + n`". No prefill and decode phases; in-flight batching falls out:
//! a new request joins the running rows at the next step, a finished one leaves them.
//!
//! A step is planned in three pure moves (vLLM v1's `schedule` / `update_from_output`, with
//! the KV answer in between as a value):
//!
//! ```text
//!  Scheduler::propose() ──Proposal{commits, releases, asks}──▶ KvManager::apply()
//!        ▲                                                          │
//!        │                      Fit{granted, preempted, deferred} ◀─┘
//!  Scheduler::plan(fit) ──StepPlan──▶ model ──RowOutcome*──▶ Scheduler::update()
//! ```
//!
//! Policy: FCFS. Running rows keep arrival order; waiting requests are admitted in arrival
//! order and never overtake one another; when KV blocks run short the latest-arrived running
//! request is preempted (its blocks freed, recomputed later — mostly from the prefix cache)
//! and goes back to the front of the queue. The oldest request always makes progress, so
//! nothing starves.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::core::lengths::{row_tokens, SeqLimits};
use crate::core::sampling::SamplingParams;
use crate::core::spec::{AcceptanceTracker, Draft, DraftLengths};
use crate::core::spec_guard::{SpecGuard, StepKind};
use crate::core::step_cost::StepCost;
use crate::core::tree::TreeDraft;
use crate::request::{FinishReason, RequestId};

/// What a decoding step took and gave (`Scheduler::record_step`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTiming {
    /// Query tokens in the forward, and its seconds.
    pub tokens: usize,
    pub seconds: f64,
    /// Draft tokens the step carried, and the seconds of drafting it waited for.
    pub drafted: usize,
    pub draft_seconds: f64,
    /// Rows, and the new tokens they got.
    pub rows: usize,
    pub delivered: usize,
}

/// What the model side needs to know about a request (sampling, when to stop).
#[derive(Debug, Clone, PartialEq)]
pub struct SeqParams {
    pub sampling: SamplingParams,
    /// Prompt length, output limit and the length the sequence never grows past.
    pub limits: SeqLimits,
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most requests in one step.
    pub max_batch: usize,
    /// Most query tokens in one step (chunked prefill splits longer prompts).
    pub step_tokens: usize,
    /// Most requests waiting for admission; beyond it `add` refuses (overload).
    pub max_waiting: usize,
    pub block_size: usize,
    /// Most draft tokens a decoding row carries (0: no speculation). Each request's actual
    /// length adapts to its acceptance and to the batch size, unless `lengths` is fixed.
    pub max_draft: usize,
    pub lengths: DraftLengths,
    /// The first step of each size is slower than the later ones (a GPU captures its
    /// graph): leave it out of the step costs and of what drafting delivers.
    pub warm_ups: bool,
    /// Tree speculation: a decoding row that drafts reserves this many tree nodes, as deep
    /// as `max_draft`; the length policy (fed each tree's depth and accepted path, costing
    /// every node: `AcceptanceTracker::tree_depth`) only turns a row's tree on or off.
    /// None: chains.
    pub tree_nodes: Option<usize>,
}

/// One request's wish for the next step, in priority order.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    pub id: RequestId,
    /// Tokens already in the KV cache.
    pub computed: usize,
    /// Tokens the row would compute.
    pub new_tokens: usize,
    /// The whole sequence so far, for a request being (re)admitted: the KV side looks up
    /// its cached prefix first.
    pub lookup: Option<Vec<u32>>,
    /// A running request holds blocks and may be preempted to make room for an earlier one.
    pub running: bool,
}

/// What the scheduler hands the KV side for one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Proposal {
    /// Newly verified tokens per request, in order, to hash into the prefix cache.
    pub commits: Vec<(RequestId, Vec<u32>)>,
    /// Requests that left (finished, cancelled): their blocks go back to the pool.
    pub releases: Vec<RequestId>,
    pub asks: Vec<Ask>,
}

/// A granted ask.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub id: RequestId,
    /// For an ask with `lookup`: the tokens found in the prefix cache (the new `computed`).
    pub cached: Option<usize>,
    /// Tokens the row computes (at most the asked number).
    pub new_tokens: usize,
    pub block_table: Vec<u32>,
}

/// The KV side's answer: "doesn't fit" is a value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fit {
    pub granted: Vec<Grant>,
    /// Running requests whose blocks were freed to make room.
    pub preempted: Vec<RequestId>,
    /// Waiting requests that did not fit this time.
    pub deferred: Vec<RequestId>,
}

/// One row of a forward step: feed `tokens` at positions `computed..`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPlan {
    pub id: RequestId,
    pub computed: usize,
    pub tokens: Vec<u32>,
    /// KV positions reserved after `tokens` for speculative drafts (0 with plain decoding).
    pub draft_len: usize,
    /// The drafts themselves, filled by the Drafter (at most `draft_len`): the row is then
    /// verified at `draft.tokens.len() + 1` positions.
    pub draft: Draft,
    /// When the drafts are a tree: each one's parent (0: the row's token, i: draft i,
    /// 1-based; parents first). None: a chain.
    pub parents: Option<Vec<u32>>,
    pub block_table: Vec<u32>,
    /// The row reaches the end of the sequence: sample the next token from its logits.
    pub sample: bool,
    /// First row since (re)admission: the sequence before `computed` (the model side's
    /// history for penalties) and the request's parameters.
    pub fresh: Option<(Arc<SeqParams>, Vec<u32>)>,
}

impl RowPlan {
    /// Positions whose logits the row needs: 0 for a prefill chunk, k + 1 to verify k drafts.
    pub fn want_logits(&self) -> usize {
        if self.sample {
            self.draft.tokens.len() + 1
        } else {
            0
        }
    }

    /// The drafts as a tree, when they are one: a decoding row's (one token, then the
    /// tree after it) whose parents come before their children. Anything else is verified
    /// as a chain, which keeps the output the target's.
    pub fn tree(&self) -> Option<TreeDraft> {
        let parents = self.parents.clone().filter(|_| self.sample && self.tokens.len() == 1)?;
        Some(TreeDraft { tokens: self.draft.tokens.clone(), parents }).filter(TreeDraft::is_valid)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepPlan {
    pub step: u64,
    pub rows: Vec<RowPlan>,
    /// Requests that left since the last step: the model side drops their state.
    pub finished: Vec<RequestId>,
    /// Seconds the Drafter spent drafting this plan's rows (the Verifier waited for them).
    pub draft_seconds: f64,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.rows.iter().map(|r| r.tokens.len() + r.draft.tokens.len()).sum()
    }
}

/// What one row's step produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RowOutcome {
    pub id: RequestId,
    /// Tokens whose KV the step wrote and which stay (rejected drafts excluded).
    pub computed: usize,
    /// Tokens appended to the sequence (sampled / accepted; an end-of-sequence token excluded).
    pub new_tokens: Vec<u32>,
    pub finish: Option<FinishReason>,
    /// Draft tokens verified in this step, and how many of them were accepted.
    pub drafted: usize,
    pub accepted: usize,
    /// How deep the drafts went: `drafted` for a chain, the deepest node's depth for a tree.
    pub depth: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Running,
}

#[derive(Debug)]
struct Seq {
    arrival: u64,
    tokens: Vec<u32>,
    computed: usize,
    /// Tokens already sent to the KV side as committed.
    committed: usize,
    state: State,
    fresh: bool,
    params: Arc<SeqParams>,
    acceptance: AcceptanceTracker,
}

impl Seq {
    /// Whether the row is decoding: its last token, past the prompt, is its only uncomputed
    /// one (only then can it carry drafts).
    fn decoding(&self) -> bool {
        self.tokens.len() - self.computed == 1 && self.tokens.len() > self.params.limits.prompt_len
    }
}

/// Draft positions to reserve for a running row: only when it is decoding (its last token
/// is its only uncomputed one), never past its length limit (`SeqLimits::draft_room`). A
/// tree row that drafts reserves all its nodes.
fn draft_len(
    seq: &mut Seq,
    cfg: &SchedulerConfig,
    max_draft: usize,
    batch: usize,
    cost: &StepCost,
    step: u64,
) -> usize {
    if max_draft == 0 || !seq.decoding() {
        return 0;
    }
    let wanted = match (cfg.lengths, cfg.tree_nodes) {
        (DraftLengths::Fixed, None) => max_draft,
        (DraftLengths::Fixed, Some(nodes)) => nodes,
        (DraftLengths::Adaptive, None) => seq.acceptance.draft_len(max_draft, batch, cost, step),
        (DraftLengths::Adaptive, Some(nodes)) => match seq.acceptance.tree_depth(max_draft, nodes, batch, cost, step) {
            0 => 0,
            _ => nodes,
        },
    };
    wanted.min(seq.params.limits.draft_room(seq.tokens.len()))
}

/// The queue is full: the caller gets an overload error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull(pub usize);

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    seqs: HashMap<RequestId, Seq>,
    /// Sorted by arrival.
    waiting: VecDeque<RequestId>,
    /// Sorted by arrival.
    running: Vec<RequestId>,
    next_arrival: u64,
    step: u64,
    commits: Vec<(RequestId, Vec<u32>)>,
    releases: Vec<RequestId>,
    finished: Vec<RequestId>,
    preemptions: u64,
    /// What steps and drafts cost, for choosing draft lengths.
    cost: StepCost,
    /// What steps with and without drafts deliver, for holding drafting off where it loses.
    guard: SpecGuard,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        assert!(cfg.max_batch > 0 && cfg.step_tokens > 0);
        Scheduler {
            cfg,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: vec![],
            next_arrival: 0,
            step: 0,
            commits: vec![],
            releases: vec![],
            finished: vec![],
            preemptions: 0,
            cost: StepCost::new(cfg.warm_ups),
            guard: SpecGuard::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }
    /// `(fixed, per_token)` seconds per step, once measured.
    pub fn step_cost(&self) -> Option<(f64, f64)> {
        self.cost.fit()
    }
    /// Every request known, running first.
    pub fn ids(&self) -> Vec<RequestId> {
        self.running.iter().chain(&self.waiting).copied().collect()
    }
    pub fn contains(&self, id: RequestId) -> bool {
        self.seqs.contains_key(&id)
    }
    /// Nothing to run and nothing to tell the KV or model side.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty() && self.commits.is_empty() && self.releases.is_empty() && self.finished.is_empty()
    }
    /// Something to send the KV side even if no row runs (blocks to free).
    pub fn has_kv_work(&self) -> bool {
        !self.commits.is_empty() || !self.releases.is_empty()
    }

    /// Queues a request (prompt tokens, parameters). Refused when the queue is full.
    pub fn add(&mut self, id: RequestId, prompt: Vec<u32>, params: Arc<SeqParams>) -> Result<(), QueueFull> {
        assert!(!prompt.is_empty(), "an empty prompt has nothing to compute");
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(QueueFull(self.waiting.len()));
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.seqs.insert(
            id,
            Seq {
                arrival,
                tokens: prompt,
                computed: 0,
                committed: 0,
                state: State::Waiting,
                fresh: true,
                params,
                acceptance: AcceptanceTracker::default(),
            },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    /// Removes a request (cancelled, or stopped by a stop string). Its blocks are released at
    /// the next proposal. Returns whether it was known.
    pub fn abort(&mut self, id: RequestId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else { return false };
        match seq.state {
            State::Waiting => self.waiting.retain(|&w| w != id),
            State::Running => {
                self.running.retain(|&r| r != id);
                self.leave(id, seq);
            }
        }
        true
    }

    fn leave(&mut self, id: RequestId, seq: Seq) {
        if seq.computed > seq.committed {
            self.commits.push((id, seq.tokens[seq.committed..seq.computed].to_vec()));
        }
        self.releases.push(id);
        self.finished.push(id);
    }

    /// The next step's wishes, most important first: running rows (a decode token, or the
    /// next prefill chunk), then waiting requests while the batch and token budget allow.
    pub fn propose(&mut self) -> Proposal {
        let mut budget = self.cfg.step_tokens;
        let mut asks = vec![];
        let mut commits = std::mem::take(&mut self.commits);
        let batch = self.running.len();
        let adaptive = self.cfg.max_draft > 0 && self.cfg.lengths == DraftLengths::Adaptive;
        // The guard counts the steps it holds plain: asked only when a row could draft.
        let could_draft = adaptive && self.running.iter().any(|id| self.seqs[id].decoding());
        let held_off = could_draft && !self.guard.allows(batch, self.step_kind());
        let max_draft = if held_off { 0 } else { self.cfg.max_draft };
        for &id in &self.running {
            let seq = self.seqs.get_mut(&id).expect("running seq");
            if seq.computed > seq.committed {
                commits.push((id, seq.tokens[seq.committed..seq.computed].to_vec()));
                seq.committed = seq.computed;
            }
            // A row left without budget still asks (for nothing): it holds blocks, so it
            // stays a preemption candidate for the rows before it.
            let drafts = draft_len(seq, &self.cfg, max_draft, batch, &self.cost, self.step);
            let n = row_tokens(seq.tokens.len() - seq.computed, drafts, budget);
            budget -= n;
            asks.push(Ask { id, computed: seq.computed, new_tokens: n, lookup: None, running: true });
        }
        for (admitted, &id) in self.waiting.iter().enumerate() {
            if budget == 0 || self.running.len() + admitted >= self.cfg.max_batch {
                break;
            }
            let seq = &self.seqs[&id];
            let n = row_tokens(seq.tokens.len(), 0, budget);
            budget -= n;
            asks.push(Ask { id, computed: 0, new_tokens: n, lookup: Some(seq.tokens.clone()), running: false });
        }
        Proposal { commits, releases: std::mem::take(&mut self.releases), asks }
    }

    /// Whether the next step will carry a prompt chunk: a running row still prefilling, or a
    /// waiting request that may be admitted.
    fn step_kind(&self) -> StepKind {
        let admitting = !self.waiting.is_empty() && self.running.len() < self.cfg.max_batch;
        if admitting || !self.running.iter().all(|id| self.seqs[id].decoding()) {
            StepKind::Mixed
        } else {
            StepKind::Decode
        }
    }

    /// Turns the KV side's answer into the step to run.
    pub fn plan(&mut self, fit: Fit) -> StepPlan {
        for &id in &fit.preempted {
            let seq = self.seqs.get_mut(&id).expect("preempted seq");
            debug_assert_eq!(seq.state, State::Running);
            seq.state = State::Waiting;
            seq.computed = 0;
            seq.committed = 0;
            seq.fresh = true;
            self.preemptions += 1;
            self.running.retain(|&r| r != id);
            let arrival = seq.arrival;
            let at = self.waiting.partition_point(|w| self.seqs[w].arrival < arrival);
            self.waiting.insert(at, id);
        }
        let mut rows = Vec::with_capacity(fit.granted.len());
        for g in fit.granted {
            let seq = self.seqs.get_mut(&g.id).expect("granted seq");
            if let Some(cached) = g.cached {
                seq.computed = cached;
                seq.committed = cached;
            }
            if seq.state == State::Waiting {
                seq.state = State::Running;
                self.waiting.retain(|&w| w != g.id);
                let arrival = seq.arrival;
                let at = self.running.partition_point(|r| self.seqs[r].arrival < arrival);
                self.running.insert(at, g.id);
            }
            let seq = self.seqs.get_mut(&g.id).expect("granted seq");
            let (from, to) = (seq.computed, seq.computed + g.new_tokens);
            debug_assert!(g.new_tokens > 0);
            // Positions past the known tokens were asked for drafts.
            let (to, draft_len) = (to.min(seq.tokens.len()), to.saturating_sub(seq.tokens.len()));
            let fresh = seq.fresh.then(|| (seq.params.clone(), seq.tokens[..from].to_vec()));
            seq.fresh = false;
            rows.push(RowPlan {
                id: g.id,
                computed: from,
                tokens: seq.tokens[from..to].to_vec(),
                draft_len,
                draft: Draft::default(),
                parents: None,
                block_table: g.block_table,
                sample: to == seq.tokens.len(),
                fresh,
            });
        }
        self.step += 1;
        StepPlan { step: self.step, rows, finished: std::mem::take(&mut self.finished), draft_seconds: 0.0 }
    }

    /// A decoding step's forward over `tokens` query tokens took `seconds`, after
    /// `draft_seconds` of drafting `drafted` tokens, and delivered `delivered` new tokens
    /// over `rows` rows. A warm-up step (the first of its size: a GPU captures its graph)
    /// or a stall says nothing about what drafting delivers, and is left out of that too.
    pub fn record_step(&mut self, s: StepTiming) {
        self.cost.record_draft(s.drafted, s.draft_seconds);
        if self.cost.record_step(s.tokens, s.seconds) {
            self.guard.record(s.rows, s.drafted > 0, s.delivered, s.seconds + s.draft_seconds);
        }
    }

    /// Applies a step's results; returns the requests that finished.
    pub fn update(&mut self, outcomes: &[RowOutcome]) -> Vec<(RequestId, FinishReason)> {
        let mut done = vec![];
        for o in outcomes {
            let Some(seq) = self.seqs.get_mut(&o.id) else { continue }; // aborted meanwhile
            if seq.state != State::Running {
                continue;
            }
            seq.tokens.extend_from_slice(&o.new_tokens);
            debug_assert!(seq.computed + o.computed <= seq.tokens.len());
            // Never count KV past the sequence, whatever the model side reports.
            seq.computed = (seq.computed + o.computed).min(seq.tokens.len());
            // A tree counts as a chain of its depth holding its accepted path.
            seq.acceptance.record(o.depth, o.accepted);
            if let Some(reason) = o.finish {
                let seq = self.seqs.remove(&o.id).expect("present");
                self.running.retain(|&r| r != o.id);
                self.leave(o.id, seq);
                done.push((o.id, reason));
            }
        }
        done
    }

    /// Checks the queue invariants; for tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let arrivals =
            |ids: &mut dyn Iterator<Item = &RequestId>| ids.map(|i| self.seqs[i].arrival).collect::<Vec<_>>();
        let w = arrivals(&mut self.waiting.iter());
        let r = arrivals(&mut self.running.iter());
        if !w.windows(2).all(|p| p[0] < p[1]) || !r.windows(2).all(|p| p[0] < p[1]) {
            return Err("queues out of arrival order".into());
        }
        if self.waiting.len() + self.running.len() != self.seqs.len() {
            return Err("a request is in no queue or in two".into());
        }
        if self.running.len() > self.cfg.max_batch {
            return Err("running more than max_batch".into());
        }
        for (id, s) in &self.seqs {
            let in_w = self.waiting.contains(id);
            if (s.state == State::Waiting) != in_w {
                return Err(format!("request {id:?} state disagrees with its queue"));
            }
            if s.computed > s.tokens.len() || s.committed > s.computed {
                return Err(format!(
                    "request {id:?}: committed {} computed {} len {}",
                    s.committed,
                    s.computed,
                    s.tokens.len()
                ));
            }
            if s.state == State::Waiting && s.computed != 0 {
                return Err(format!("waiting request {id:?} has computed tokens"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
