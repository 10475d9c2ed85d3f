//! The scheduler driven with the pure `KvManager` and a pretend model.

use super::*;
use crate::core::block_pool::BlockPool;
use crate::core::kv_manager::KvManager;
use proptest::prelude::*;

/// A pretend model: every row computes all its tokens; a sampling row emits a token that
/// depends only on the request and position; requests stop after `max_tokens`.
struct Sim {
    sched: Scheduler,
    kv: KvManager,
    out: HashMap<RequestId, Vec<u32>>,
    done: Vec<RequestId>,
    steps: Vec<StepPlan>,
}

fn token(id: RequestId, pos: usize) -> u32 {
    (id.0 as u32 * 31 + pos as u32 * 7) % 50
}

fn params(prompt_len: usize, max_tokens: usize) -> Arc<SeqParams> {
    Arc::new(SeqParams {
        sampling: SamplingParams::default(),
        limits: SeqLimits { prompt_len, max_tokens, max_len: 1 << 20 },
        ignore_eos: true,
    })
}

impl Sim {
    fn new(cfg: SchedulerConfig, blocks: usize) -> Self {
        Sim {
            sched: Scheduler::new(cfg),
            kv: KvManager::new(BlockPool::new(blocks, cfg.block_size)),
            out: HashMap::new(),
            done: vec![],
            steps: vec![],
        }
    }

    fn add(&mut self, id: u64, prompt: Vec<u32>, max_tokens: usize) {
        let p = params(prompt.len(), max_tokens);
        self.sched.add(RequestId(id), prompt, p).unwrap();
        self.out.insert(RequestId(id), vec![]);
    }

    fn step(&mut self) -> StepPlan {
        let fit = self.kv.apply(self.sched.propose());
        let plan = self.sched.plan(fit);
        let outcomes: Vec<RowOutcome> = plan
            .rows
            .iter()
            .map(|r| {
                let mut o = RowOutcome {
                    id: r.id,
                    computed: r.tokens.len(),
                    new_tokens: vec![],
                    finish: None,
                    drafted: 0,
                    accepted: 0,
                    depth: 0,
                };
                if r.sample {
                    let out = self.out.get_mut(&r.id).unwrap();
                    let pos = r.computed + r.tokens.len();
                    let t = token(r.id, pos);
                    out.push(t);
                    o.new_tokens.push(t);
                    if out.len() >= self.max_tokens(r.id) {
                        o.finish = Some(FinishReason::Length);
                    }
                }
                o
            })
            .collect();
        for (id, _) in self.sched.update(&outcomes) {
            self.done.push(id);
        }
        self.sched.check_invariants().unwrap();
        self.kv.check_invariants().unwrap();
        self.steps.push(plan.clone());
        plan
    }

    fn max_tokens(&self, id: RequestId) -> usize {
        // Encoded in the id for the simulation: id % 7 + 1.
        (id.0 % 7 + 1) as usize
    }

    fn run(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            if self.sched.is_idle() {
                return;
            }
            self.step();
        }
        panic!("did not finish in {max_steps} steps");
    }
}

fn cfg(max_batch: usize, step_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_batch,
        step_tokens,
        max_waiting: 64,
        block_size: 4,
        max_draft: 0,
        lengths: Default::default(),
        warm_ups: true,
        tree_nodes: None,
    }
}

#[test]
fn warm_up_steps_do_not_count_in_what_drafting_delivers() {
    let mut s = Scheduler::new(SchedulerConfig { max_draft: 8, ..cfg(8, 512) });
    let step = |tokens, seconds, drafted, delivered| StepTiming {
        tokens,
        seconds,
        drafted,
        draft_seconds: 0.0,
        rows: 8,
        delivered,
    };
    // The first plain step of 8 rows captures a graph: a hundred times slower than the rest.
    s.record_step(step(8, 1.0, 0, 8));
    for _ in 0..5 {
        s.record_step(step(8, 0.0095, 0, 8));
        s.record_step(step(72, 0.030, 64, 20));
    }
    assert!(!s.guard.allows(8, StepKind::Decode), "plain steps deliver 842 tok/s, drafting ones 667");
}

#[test]
fn without_warm_ups_the_first_steps_already_count_in_what_drafting_delivers() {
    let step = |tokens, seconds, drafted, delivered| StepTiming {
        tokens,
        seconds,
        drafted,
        draft_seconds: 0.045,
        rows: 8,
        delivered,
    };
    // A CPU at batch 8: a plain step, then one verifying 4 drafts a row (each the first of
    // its size).
    let run = |warm_ups| {
        let mut s = Scheduler::new(SchedulerConfig { max_draft: 4, warm_ups, ..cfg(8, 512) });
        s.record_step(step(8, 0.070, 0, 8));
        s.record_step(step(40, 0.370, 32, 12));
        s.guard.allows(8, StepKind::Decode)
    };
    assert!(!run(false), "the CPU has no warm-ups: drafting delivered 29 tok/s against 114");
    assert!(run(true), "a GPU's first steps of a size capture graphs: they say nothing");
}

#[test]
fn a_step_with_a_prompt_chunk_drafts_only_where_drafting_is_known_to_pay() {
    let mut sim = Sim::new(SchedulerConfig { max_draft: 4, ..cfg(8, 512) }, 64);
    // Request 6 (7 tokens) decodes from step 2 on; request 13 arrives meanwhile.
    sim.add(6, vec![1, 2, 3], 7);
    sim.step();
    sim.add(13, vec![4, 5, 6, 7], 7);
    let draft_lens = |plan: &StepPlan| plan.rows.iter().map(|r| (r.id.0, r.draft_len)).collect::<Vec<_>>();
    // Step 2 carries 13's prompt: nothing is known of drafting at this batch size, and this
    // step would not tell (its time is mostly the prompt's), so 6 does not draft.
    assert_eq!(draft_lens(&sim.step()), [(6, 0), (13, 0)]);
    // Decoding steps only from then on: every other one drafts while costs are unknown.
    let later: Vec<_> = (0..2).map(|_| draft_lens(&sim.step())).collect();
    assert!(later.iter().any(|lens| lens.iter().all(|&(_, k)| k > 0)), "{later:?}");
}

#[test]
fn a_tree_row_reserves_its_nodes_within_the_sequences_room() {
    let tree = SchedulerConfig { max_draft: 3, lengths: DraftLengths::Fixed, tree_nodes: Some(6), ..cfg(4, 64) };
    let mut s = Sim::new(tree, 64);
    // Id 6 stops after 7 tokens by the sim's rule; its limits end the sequence at 12.
    s.add(6, vec![1, 2], 10);
    // The prompt, then decoding rows of one token and six node positions, until the room
    // left before the end (one short of it) cuts the tree.
    let asked: Vec<(usize, usize)> =
        (0..7).map(|_| s.step()).map(|p| (p.rows[0].tokens.len(), p.rows[0].draft_len)).collect();
    assert_eq!(asked, vec![(2, 0), (1, 6), (1, 6), (1, 6), (1, 5), (1, 4), (1, 3)]);
    s.run(2);
    assert_eq!((s.done.clone(), s.kv.pool().num_used()), (vec![RequestId(6)], 0));
}

#[test]
fn prefill_is_chunked_under_the_token_budget() {
    let mut s = Sim::new(cfg(4, 4), 16);
    s.add(6, (0..10).collect(), 1); // id 6: max_tokens 7 by the sim's rule
    let lens: Vec<(usize, usize, bool)> =
        (0..4).map(|_| s.step()).map(|p| (p.rows[0].computed, p.rows[0].tokens.len(), p.rows[0].sample)).collect();
    assert_eq!(lens, vec![(0, 4, false), (4, 4, false), (8, 2, true), (10, 1, true)]);
}

#[test]
fn a_new_request_joins_the_running_batch_and_finishes_first() {
    let mut s = Sim::new(cfg(4, 16), 64);
    s.add(6, (0..20).collect(), 7); // long: 20-token prompt in chunks of 16, 7 tokens
    s.step();
    s.add(7, vec![1, 2, 3], 1); // id 7 → max_tokens 1
    let plan = s.step();
    assert_eq!(plan.rows.iter().map(|r| r.id.0).collect::<Vec<_>>(), vec![6, 7]);
    s.run(100);
    assert_eq!(s.done, vec![RequestId(7), RequestId(6)]);
    assert_eq!(s.kv.pool().num_used(), 0);
}

#[test]
fn batch_size_is_capped_and_admission_is_fcfs() {
    let mut s = Sim::new(cfg(2, 64), 64);
    for id in 0..5 {
        s.add(id, vec![1, 2], 3);
    }
    let plan = s.step();
    assert_eq!(plan.rows.iter().map(|r| r.id.0).collect::<Vec<_>>(), vec![0, 1]);
    s.run(200);
    assert!(s.steps.iter().all(|p| p.rows.len() <= 2));
    let mut first_seen = vec![];
    for p in &s.steps {
        for r in &p.rows {
            if !first_seen.contains(&r.id.0) {
                first_seen.push(r.id.0);
            }
        }
    }
    assert_eq!(first_seen, vec![0, 1, 2, 3, 4]);
}

#[test]
fn short_of_blocks_the_latest_request_is_preempted_and_recomputed() {
    // 6 blocks of 4 tokens; two requests of 8 prompt + 6 output tokens need 4 blocks each.
    let mut s = Sim::new(cfg(4, 64), 6);
    s.add(5, (0..8).collect(), 6); // id 5: max 6
    s.add(12, (10..18).collect(), 6); // id 12: max 6
    s.run(200);
    assert!(s.sched.num_preemptions() > 0);
    assert_eq!(s.kv.pool().num_used(), 0);
    for id in [5u64, 12] {
        let want: Vec<u32> = (0..6).map(|i| token(RequestId(id), 8 + i)).collect();
        assert_eq!(s.out[&RequestId(id)], want, "request {id}");
    }
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let mut s = Sim::new(cfg(4, 64), 32);
    let prefix: Vec<u32> = (0..10).collect();
    s.add(0, [prefix.clone(), vec![40, 41]].concat(), 1);
    s.run(10);
    s.add(7, [prefix, vec![42, 43, 44]].concat(), 1);
    let plan = s.step();
    // 10 shared tokens = 2 full blocks of 4 cached; the row starts at 8.
    assert_eq!((plan.rows[0].computed, plan.rows[0].tokens.len()), (8, 5));
    assert_eq!(s.kv.stats().prefix.hits, 8);
}

#[derive(Debug, Clone)]
enum Op {
    Add(u8, u8),
    Step,
    Abort(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1u8..30, 0u8..4).prop_map(|(len, prefix)| Op::Add(len, prefix)),
        5 => Just(Op::Step),
        1 => any::<u8>().prop_map(Op::Abort),
    ]
}

proptest! {
    /// Random arrivals, steps and cancellations under a small pool: the queues and block
    /// tables stay consistent, every request that is not cancelled produces exactly its
    /// expected tokens, and at the end every block is free.
    #[test]
    fn scheduler_and_pool_invariants_hold(
        ops in proptest::collection::vec(op(), 1..120),
        blocks in 10usize..24,
        max_batch in 1usize..6,
        step_tokens in 1usize..24,
    ) {
        let mut s = Sim::new(cfg(max_batch, step_tokens), blocks);
        let mut next = 0u64;
        let mut aborted = vec![];
        let shared: Vec<u32> = (100..140).collect();
        for op in ops {
            match op {
                Op::Add(len, prefix) => {
                    // Prompts of up to 30 tokens plus up to 7 outputs fit in 10 blocks of 4.
                    let prompt: Vec<u32> = shared[..prefix as usize * 4].iter().copied()
                        .chain((0..len as u32).map(|t| t + next as u32))
                        .take(30).collect();
                    s.add(next, prompt, 0);
                    next += 1;
                }
                Op::Step => { s.step(); }
                Op::Abort(i) if next > 0 => {
                    let id = RequestId(i as u64 % next);
                    if s.sched.abort(id) { aborted.push(id) }
                }
                _ => {}
            }
        }
        s.run(5000);
        prop_assert_eq!(s.kv.pool().num_used(), 0);
        s.kv.check_invariants().map_err(TestCaseError::fail)?;
        for id in (0..next).map(RequestId) {
            if aborted.contains(&id) { continue }
            prop_assert!(s.done.contains(&id), "request {:?} never finished", id);
            prop_assert_eq!(s.out[&id].len(), s.max_tokens(id));
        }
    }
}
