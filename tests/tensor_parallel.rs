//! Tensor parallelism on the CPU: a model split over N rank threads (heads and the MLP's
//! intermediate features, an all-reduce after o and down) against the same model whole.
//! Greedy ids must be equal and logits within 1e-5 of max |logit| (the split only changes
//! the order of the additions in o and down).

mod common;

use std::sync::Arc;

use futures::executor::block_on;
use indicatif::ProgressBar;
use specula::actors::{collect, Executor, ModelExecutor, Runtime, TpExecutor, TpRank};
use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BackendError, BatchMeta};
use specula::core::sampling::{argmax, Sampler, SamplingParams};
use specula::model::safetensors::SafetensorsWeights;
use specula::model::{
    load_model, load_model_shard, KvCache, Llama, LoadError, LoadOptions, ModelConfig, ModelSource, Preset, Shard,
    ShardError, Weights,
};
use specula::request::{GenerateRequest, Prompt};
use specula::tensor::RankGroup;

use common::tiny::{write_hf_dir, StDtype, TinyModel, TinySpec};
use common::TempDir;

const TOL: f64 = 1e-5;
const BLOCK: u32 = 16;
const BLOCKS: usize = 16;

type Group = Arc<dyn RankGroup>;

/// The whole model and its ranks (of `group`) as executors over caches of the same blocks.
fn executors(
    whole: Llama<CpuBackend>,
    (group, ranks): (Group, Vec<(CpuBackend, Llama<CpuBackend>)>),
) -> (ModelExecutor<CpuBackend>, TpExecutor) {
    let b = CpuBackend::new();
    let kv = KvCache::new(&b, &whole.config, BLOCKS, BLOCK as usize).unwrap();
    let whole = ModelExecutor::new(b, Arc::new(whole), kv);
    let parts = ranks
        .into_iter()
        .map(|(backend, model)| {
            let kv = KvCache::new(&backend, &model.config, BLOCKS, BLOCK as usize).unwrap();
            TpRank { backend, model: Arc::new(model), kv }
        })
        .collect();
    (whole, TpExecutor::spawn(group, parts).unwrap())
}

/// Each rank of a CPU group of `ranks` with its part of the model, as `load` gives it.
fn load_ranks(
    ranks: usize,
    load: impl Fn(Shard, &CpuBackend) -> Llama<CpuBackend>,
) -> (Group, Vec<(CpuBackend, Llama<CpuBackend>)>) {
    let (group, backends) = CpuBackend::new().tensor_parallel(ranks).unwrap();
    let parts =
        backends.into_iter().enumerate().map(|(rank, b)| (load(Shard { rank, ranks }, &b), b)).map(|(m, b)| (b, m));
    (group, parts.collect())
}

/// A random tiny SmolLM-shaped model (`seed`) written to a temporary folder, as the whole
/// model and as a group of one rank.
fn whole_and_one_rank(name: &str, seed: u64) -> (ModelExecutor<CpuBackend>, TpExecutor) {
    let dir = TempDir::new(name);
    write_hf_dir(&TinyModel::random(TinySpec::smol(), seed), StDtype::F32, dir.path());
    let config = ModelConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let weights = SafetensorsWeights::open_dir(dir.path()).unwrap();
    let bar = ProgressBar::hidden();
    let whole = Llama::load(config.clone(), Weights::Source(&weights), &CpuBackend::new(), &bar).unwrap();
    let ranks = load_ranks(1, |shard, b| {
        let opts = LoadOptions::default();
        Llama::load_shard(config.clone(), Weights::Source(&weights), &opts, shard, b, &bar).unwrap()
    });
    executors(whole, ranks)
}

/// max |a − b| / max |b|
fn relative(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
    diff / b.iter().fold(0f64, |m, y| m.max(y.abs() as f64))
}

/// Prefills `prompt`, then decodes `steps` greedy tokens on both executors; returns both
/// id sequences and the largest relative logit difference seen at the last position.
fn greedy_both(
    a: &mut impl Executor<BackendError>,
    b: &mut impl Executor<BackendError>,
    prompt: &[u32],
    steps: usize,
    first_block: u32,
) -> (Vec<u32>, Vec<u32>, f64) {
    let table: Vec<u32> = (first_block..first_block + 4).collect();
    let (mut ids_a, mut ids_b, mut worst) = (vec![], vec![], 0f64);
    let (mut tokens, mut cached) = (prompt.to_vec(), 0u32);
    for _ in 0..steps {
        let mut meta = BatchMeta::new(BLOCK);
        meta.push_row(&tokens, cached, &table, 1);
        let (la, lb) = (a.forward(&meta).unwrap(), b.forward(&meta).unwrap());
        worst = worst.max(relative(&lb, &la));
        let (ta, tb) = (argmax(&la), argmax(&lb));
        ids_a.push(ta);
        ids_b.push(tb);
        cached += tokens.len() as u32;
        tokens = vec![ta];
    }
    (ids_a, ids_b, worst)
}

#[test]
fn default_model_on_three_ranks_gives_the_ids_and_logits_of_one() {
    let Some(path) = common::default_model_path() else { return };
    let source = ModelSource::Path(path);
    let loaded = load_model(&source, &CpuBackend::new()).unwrap();
    let tokenizer = loaded.tokenizer.unwrap();
    let ranks = load_ranks(3, |shard, b| load_model_shard(&source, &LoadOptions::default(), shard, b).unwrap().model);
    let (mut whole, mut split) = executors(loaded.model, ranks);
    let prompts = ["The capital of France is", "def fib(n):\n    if n < 2:", "Once upon a time, in a land"];
    let mut worst = 0f64;
    for (i, p) in prompts.iter().enumerate() {
        let ids = tokenizer.encode(p, true);
        let (a, b, w) = greedy_both(&mut whole, &mut split, &ids, 12, 4 * i as u32);
        assert_eq!(a, b, "prompt {i}: greedy ids differ between 1 and 3 ranks");
        worst = worst.max(w);
    }
    eprintln!("default model, 3 ranks: max relative logit difference {worst:.2e}");
    assert!(worst < TOL, "logits differ by {worst:e} of max |logit|");
}

#[test]
fn tiny_random_model_on_two_ranks_gives_the_ids_and_logits_of_one() {
    let spec = TinySpec::smol(); // 4 heads, 2 KV heads, intermediate 96
    let dir = TempDir::new("tp-tiny");
    write_hf_dir(&TinyModel::random(spec, 7), StDtype::F32, dir.path());
    let config = ModelConfig::from_hf_json(&dir.join("config.json")).unwrap();
    let weights = SafetensorsWeights::open_dir(dir.path()).unwrap();
    let b = CpuBackend::new();
    let whole = Llama::load(config.clone(), Weights::Source(&weights), &b, &ProgressBar::hidden()).unwrap();
    let bar = ProgressBar::hidden();
    let ranks = load_ranks(2, |shard, b| {
        let opts = LoadOptions::default();
        Llama::load_shard(config.clone(), Weights::Source(&weights), &opts, shard, b, &bar).unwrap()
    });
    let (mut whole, mut split) = executors(whole, ranks);
    let mut worst = 0f64;
    for (i, prompt) in [[1u32, 45, 300, 87, 259].as_slice(), &[2, 17, 319, 0, 150, 99, 260, 33]].iter().enumerate() {
        let (a, b, w) = greedy_both(&mut whole, &mut split, prompt, 10, 4 * i as u32);
        assert_eq!(a, b, "prompt {i}: greedy ids differ between 1 and 2 ranks");
        worst = worst.max(w);
    }
    eprintln!("tiny model, 2 ranks: max relative logit difference {worst:.2e}");
    assert!(worst < TOL, "logits differ by {worst:e} of max |logit|");
}

#[test]
fn two_ranks_over_three_kv_heads_are_refused_naming_them() {
    let want = ShardError::KvHeads { ranks: 2, kv_heads: 3, heads: 9 };
    let source = ModelSource::Dummy(Preset::SmolLm2_135m);
    let shard = Shard { rank: 0, ranks: 2 };
    match load_model_shard(&source, &LoadOptions::default(), shard, &CpuBackend::new()) {
        Err(LoadError::Shard(e)) => {
            assert_eq!(e, want);
            assert!(e.to_string().contains("3 KV heads"), "{e}");
        }
        other => panic!("expected the KV-heads refusal, got {:?}", other.map(|m| m.name)),
    }
    let Some(path) = common::default_model_path() else { return };
    let err = load_model_shard(&ModelSource::Path(path), &LoadOptions::default(), shard, &CpuBackend::new());
    assert!(matches!(err, Err(LoadError::Shard(e)) if e == want));
}

#[test]
fn runtime_on_three_ranks_at_batch_four_gives_the_greedy_ids_of_one() {
    let Some(path) = common::default_model_path() else { return };
    let source = ModelSource::Path(path);
    let loaded = load_model(&source, &CpuBackend::new()).unwrap();
    let whole = Runtime::builder().max_batch(4).kv_blocks(64).build(CpuBackend::new(), loaded.model, loaded.tokenizer);
    let whole = whole.unwrap();
    let (group, backends) = CpuBackend::new().tensor_parallel(3).unwrap();
    let mut tokenizer = None;
    let ranks = backends
        .into_iter()
        .enumerate()
        .map(|(rank, b)| {
            let m = load_model_shard(&source, &LoadOptions::default(), Shard { rank, ranks: 3 }, &b).unwrap();
            tokenizer = tokenizer.take().or(m.tokenizer);
            (b, Arc::new(m.model))
        })
        .collect();
    let split = Runtime::builder().max_batch(4).kv_blocks(64).build_tensor_parallel(group, ranks, tokenizer).unwrap();
    let prompts = ["The capital of France is", "List three colors:", "1, 2, 3, 4, 5,", "Once upon a time"];
    let reqs: Vec<_> = prompts
        .iter()
        .map(|p| GenerateRequest { max_tokens: 16, ..GenerateRequest::new(Prompt::Text((*p).into())) })
        .collect();
    let run = |h: &specula::actors::RuntimeHandle| {
        block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))))
    };
    for (i, (a, b)) in run(&whole).into_iter().zip(run(&split)).enumerate() {
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.token_ids, b.token_ids, "request {i}: greedy ids differ between 1 and 3 ranks");
        assert!(!a.token_ids.is_empty());
    }
}

#[test]
fn one_rank_gives_the_bits_of_the_whole_model() {
    let (mut whole, mut split) = whole_and_one_rank("tp-one", 11);
    let (a, b, worst) = greedy_both(&mut whole, &mut split, &[3, 141, 59, 265], 8, 0);
    assert_eq!(a, b);
    assert_eq!(worst, 0.0, "a group of one rank must give the whole model's bits");
}

/// `forward_sampled` through the rank threads: the rows (settings, history, uniform) reach
/// rank 0, which samples what the whole model samples with the same draws.
#[test]
fn one_rank_samples_what_the_whole_model_samples() {
    let (mut whole, mut split) = whole_and_one_rank("tp-sampled", 12);
    let params =
        SamplingParams { temperature: 1.5, top_p: 0.95, repetition_penalty: 1.2, seed: Some(9), ..Default::default() };
    // The same seed: the same uniforms on both sides.
    let (mut a, mut b) = (Sampler::new(params.clone()), Sampler::new(params));
    let (mut history, mut tokens, mut cached) = (vec![3u32, 141, 59, 265], vec![3u32, 141, 59, 265], 0u32);
    let table: Vec<u32> = (0..4).collect();
    for step in 0..8 {
        let mut meta = BatchMeta::new(BLOCK);
        meta.push_row(&tokens, cached, &table, 1);
        let ta = whole.forward_sampled(&meta, &[a.row(&history)]).unwrap();
        let tb = split.forward_sampled(&meta, &[b.row(&history)]).unwrap();
        assert_eq!(ta, tb, "step {step}");
        cached += tokens.len() as u32;
        tokens = ta.clone();
        history.extend(ta);
    }
}

#[test]
fn trees_are_refused_on_ranks_that_cannot_move_kv_entries() {
    let (_, tp) = whole_and_one_rank("tp-trees", 11);
    assert!(!tp.copies_slots());
    let info = specula::actors::ModelInfo { vocab: tp.vocab_size(), context: 256, eos: vec![] };
    let config = specula::spec::LookaheadConfig::default();
    let spec = specula::spec::Speculation {
        proposer: Box::new(specula::spec::LookaheadProposer::new(config)),
        max_draft: 4,
        synthetic_acceptance: None,
        lengths: Default::default(),
        tree: Some(config.tree_shape()),
    };
    let built = Runtime::builder().speculation(spec).kv_blocks(BLOCKS).build_with(tp, info, None);
    let err = built.err().expect("refused");
    assert!(matches!(err, specula::actors::RuntimeError::Spec(specula::spec::SpecError::TreeExecutor)), "{err}");
}
