//! Tree speculation inside the actor runtime, with an oracle that knows each request's plain
//! greedy continuation and hides it in a tree: at each depth a wrong sibling comes first and
//! the right token second, so every accepted path skips nodes and its KV entries must move
//! (`copy_slots`) for later tokens to come out right. Greedy output equals plain greedy
//! output token for token at batch sizes 1 and 8, with rejections inside the path, with a
//! pool so small that requests are preempted, and with cancellations; every block ends free.

mod common;

use std::sync::Arc;

use common::random_llama::tiny;
use common::runtime::assert_all_blocks_free;
use futures::executor::block_on;
use futures::StreamExt;
use specula::actors::{collect, Event, Runtime, RuntimeHandle};
use specula::backend::cpu::CpuBackend;
use specula::backend::BackendError;
use specula::core::sampling::SamplingParams;
use specula::engine::Engine;
use specula::model::{Llama, Tokenizer};
use specula::request::GenerateRequest;
use specula::spec::{Draft, DraftLengths, Proposer, SeqId, SpecStats, Speculation, TreeDraft, TreeShape};
use specula::tensor::{AttnWindow, KvOptions};

const VOCAB: u32 = 64;

/// Drafts each request's true continuation as a tree: per depth a wrong child, then the
/// right one (the next depth hangs under it); past `hold` right tokens, both are wrong.
struct Oracle {
    /// Each request's whole greedy sequence: prompt, then its plain greedy output.
    sequences: Vec<Vec<u32>>,
    hold: usize,
}

impl Oracle {
    /// What comes after `history` in the sequence it starts.
    fn next(&self, history: &[u32]) -> Option<&[u32]> {
        let seq = self.sequences.iter().find(|s| s.len() >= history.len() && s.starts_with(history))?;
        Some(&seq[history.len()..])
    }
}

impl Proposer for Oracle {
    fn propose(&mut self, _: SeqId, _: &[u32], _: usize, _: &SamplingParams) -> Result<Draft, BackendError> {
        Ok(Draft::default())
    }

    fn drafts_trees(&self) -> bool {
        true
    }

    fn propose_tree(&mut self, _: SeqId, history: &[u32], shape: TreeShape) -> Result<TreeDraft, BackendError> {
        let Some(next) = self.next(history) else { return Ok(TreeDraft::default()) };
        let mut tree = TreeDraft::default();
        let mut at = 0;
        for (d, &right) in next.iter().enumerate().take(shape.depth.min(shape.nodes / 2)) {
            let kept = if d < self.hold { right } else { (right + 2) % VOCAB };
            for t in [(right + 1) % VOCAB, kept] {
                tree.tokens.push(t);
                tree.parents.push(at);
            }
            at = tree.len() as u32;
        }
        Ok(tree)
    }
}

fn requests() -> Vec<GenerateRequest> {
    common::token_requests(VOCAB, 8, 2, |i| 9 + 3 * i as usize)
}

/// The plain greedy sequences (prompt and output) of `reqs`.
fn greedy(model: Llama<CpuBackend>, reqs: &[GenerateRequest]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    greedy_with(model, reqs, KvOptions::default())
}

/// The same with the KV cache as `kv` says (an attention window).
fn greedy_with(model: Llama<CpuBackend>, reqs: &[GenerateRequest], kv: KvOptions) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let engine = Engine::new(CpuBackend::new(), model, None).with_kv(kv);
    let outs = common::runtime::plain_greedy(&engine, reqs);
    let prompt = |r: &GenerateRequest| match &r.prompt {
        specula::request::Prompt::Tokens(t) => t.clone(),
        other => panic!("token prompts only: {other:?}"),
    };
    let seqs = reqs.iter().zip(&outs).map(|(r, o)| [prompt(r), o.clone()].concat()).collect();
    (outs, seqs)
}

fn oracle_runtime(
    target: &Arc<Llama<CpuBackend>>,
    seqs: &[Vec<u32>],
    hold: usize,
    lengths: DraftLengths,
    kv_blocks: Option<usize>,
    kv: KvOptions,
) -> RuntimeHandle {
    let proposer = Box::new(Oracle { sequences: seqs.to_vec(), hold });
    let tree = Some(TreeShape { nodes: 10, top_k: 2, depth: 5 });
    let spec = Speculation { proposer, max_draft: 5, synthetic_acceptance: None, lengths, tree };
    let mut b = Runtime::builder().speculation(spec).max_batch(8).kv_cache(kv);
    if let Some(n) = kv_blocks {
        b = b.kv_blocks(n);
    }
    b.build(CpuBackend::new(), target.clone(), None::<Tokenizer>).unwrap()
}

#[test]
fn accepted_paths_that_skip_nodes_keep_greedy_output_exact() {
    let target = Arc::new(tiny(VOCAB as usize, 3, 0.5));
    let reqs = requests();
    let (want, seqs) = greedy(tiny(VOCAB as usize, 3, 0.5), &reqs);
    // Adaptive lengths turn trees on and off by what steps cost: the output stays exact.
    for (hold, lengths) in [(5, DraftLengths::Fixed), (2, DraftLengths::Fixed), (5, DraftLengths::Adaptive)] {
        let h = oracle_runtime(&target, &seqs, hold, lengths, None, KvOptions::default());
        let outs = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
        let mut total = SpecStats::default();
        for (i, out) in outs.into_iter().enumerate() {
            let out = out.unwrap();
            assert_eq!(out.token_ids, want[i], "batch 8, hold {hold}, request {i}");
            total.merge(&out.speculative.unwrap());
        }
        // Each step accepts `hold` drafts (fewer near the end, where the room left shrinks
        // the tree) and adds the target's own token.
        let (mean, most) = (total.mean_accepted_length, 1.0 + hold as f64);
        let fixed = lengths == DraftLengths::Fixed;
        assert!(mean <= most && (mean > most * 0.7 || !fixed), "hold {hold}, {lengths:?}: {total:?}");
        let out = block_on(collect(h.generate(reqs[6].clone()))).unwrap();
        assert_eq!(out.token_ids, want[6], "batch 1, hold {hold}");
        assert_all_blocks_free(&h);
    }
}

#[test]
fn preemption_and_cancellation_with_trees_free_every_block() {
    let target = Arc::new(tiny(VOCAB as usize, 3, 0.5));
    let reqs = requests();
    let (want, seqs) = greedy(tiny(VOCAB as usize, 3, 0.5), &reqs);
    // 12 blocks of 16 cannot hold 8 rows each reserving 11 positions past their sequence.
    let h = oracle_runtime(&target, &seqs, 3, DraftLengths::Fixed, Some(12), KvOptions::default());
    let cancel_after = |i: usize| [(1usize, 0usize), (4, 2)].iter().find(|c| c.0 == i).map(|c| c.1);
    let runs = reqs.iter().enumerate().map(|(i, r)| {
        let mut events = h.generate(r.clone());
        async move {
            let Some(n) = cancel_after(i) else { return Some(collect(events).await.unwrap()) };
            let mut seen = 0;
            while let Some(ev) = events.next().await {
                if matches!(ev, Event::Token { .. }) {
                    seen += 1;
                    if seen > n {
                        return None;
                    }
                }
            }
            None
        }
    });
    let outs = block_on(futures::future::join_all(runs));
    for (i, out) in outs.into_iter().enumerate() {
        if let Some(out) = out {
            assert_eq!(out.token_ids, want[i], "request {i}");
        }
    }
    let st = block_on(h.stats()).unwrap();
    assert!(st.preemptions > 0, "the small pool should preempt: {st:?}");
    assert_all_blocks_free(&h);
}

#[test]
fn under_an_attention_window_trees_keep_greedy_output_exact() {
    let target = Arc::new(tiny(VOCAB as usize, 3, 0.5));
    let reqs = requests();
    // 16 positions (2 of them sinks): the longest sequences slide well past it.
    let kv = KvOptions { window: Some(AttnWindow::new(16, 2).unwrap()), ..Default::default() };
    let (want, seqs) = greedy_with(tiny(VOCAB as usize, 3, 0.5), &reqs, kv);
    let h = oracle_runtime(&target, &seqs, 3, DraftLengths::Fixed, None, kv);
    let outs = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
    for (i, out) in outs.into_iter().enumerate() {
        assert_eq!(out.unwrap().token_ids, want[i], "request {i}");
    }
    assert_all_blocks_free(&h);
}
