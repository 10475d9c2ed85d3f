//! Medusa drafting: heads written in the Medusa safetensors layout compute what an f64
//! reference of their math says (ResBlocks, then their own or the target's LM head); heads
//! made for another model are refused with a typed error; greedy output with `--spec
//! medusa` (chains and trees) equals plain greedy output token for token, on a tiny random
//! model (engine, and the runtime at batch 1 and 8) and on the default model.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::random_llama::tiny;
use common::runtime::{assert_all_blocks_free, assert_runtime_equals, plain_greedy, shared, tree};
use common::tiny::{Rng, StDtype};
use common::TempDir;
use futures::executor::block_on;
use safetensors::tensor::TensorView;
use specula::actors::{collect, Runtime};
use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BatchMeta};
use specula::engine::{Engine, SpecOptions};
use specula::model::{Llama, Tokenizer};
use specula::request::{GenerateRequest, Prompt};
use specula::spec::medusa::MedusaHeads;
use specula::spec::{DraftLengths, HeadSize, MedusaProposer, SpecError, SpecStats, Speculation};

/// Heads to write: their sizes and layout.
struct HeadsSpec {
    hidden: usize,
    vocab: usize,
    heads: usize,
    layers: usize,
    /// Each head has its own LM head (FasterDecoding's layout); else the target's is shared.
    own_out: bool,
    /// Keys under `medusa_head.` (heads saved inside a model) rather than bare.
    prefixed: bool,
    dtype: StDtype,
}

impl HeadsSpec {
    fn new(hidden: usize, vocab: usize) -> Self {
        HeadsSpec { hidden, vocab, heads: 3, layers: 1, own_out: true, prefixed: true, dtype: StDtype::F32 }
    }

    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let p = if self.prefixed { "medusa_head." } else { "" };
        let mut out = vec![];
        for i in 0..self.heads {
            for l in 0..self.layers {
                out.push((format!("{p}{i}.{l}.linear.weight"), vec![self.hidden, self.hidden]));
                out.push((format!("{p}{i}.{l}.linear.bias"), vec![self.hidden]));
            }
            if self.own_out {
                out.push((format!("{p}{i}.{}.weight", self.layers), vec![self.vocab, self.hidden]));
            }
        }
        out
    }

    /// Writes config.json and medusa_lm_head.safetensors; returns the weights as stored,
    /// by name without the prefix.
    fn write(&self, dir: &Path, seed: u64) -> Weights {
        let mut rng = Rng(seed);
        let mut weights = Weights::new();
        let mut encoded = vec![];
        for (name, shape) in self.shapes() {
            let n: usize = shape.iter().product();
            let std = if shape.len() == 1 { 0.1 } else { 1.0 / (shape[1] as f64).sqrt() };
            let data: Vec<f32> = (0..n).map(|_| self.dtype.round((std * rng.normal()) as f32)).collect();
            let (dt, bytes) = self.dtype.encode(&data);
            encoded.push((name.clone(), shape, dt, bytes));
            weights.insert(name.trim_start_matches("medusa_head.").to_string(), data);
        }
        let views = encoded.iter().map(|(n, s, dt, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()));
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.join("medusa_lm_head.safetensors"), bytes).unwrap();
        let config = serde_json::json!({
            "medusa_num_heads": self.heads, "medusa_num_layers": self.layers, "base_model_name_or_path": "tiny",
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        weights
    }
}

type Weights = std::collections::HashMap<String, Vec<f32>>;

/// `w` `[out, in]` times `x`.
fn matvec(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks(x.len()).map(|row| row.iter().zip(x).map(|(&a, b)| a as f64 * b).sum()).collect()
}

/// Head `i`'s logits in f64: x = h; x += SiLU(W x + b) per layer; then `out` · x.
fn reference(w: &Weights, i: usize, layers: usize, h: &[f64], out: &[f32]) -> Vec<f64> {
    let mut x = h.to_vec();
    for l in 0..layers {
        let y = matvec(&w[&format!("{i}.{l}.linear.weight")], &x);
        let bias = &w[&format!("{i}.{l}.linear.bias")];
        for ((x, y), &b) in x.iter_mut().zip(y).zip(bias) {
            let z = y + b as f64;
            *x += z / (1.0 + (-z).exp());
        }
    }
    matvec(out, &x)
}

/// The tiny target's LM head (tied: its embedding table), `[vocab, hidden]`.
fn target_lm_head(target: &Llama<CpuBackend>, vocab: usize) -> Vec<f32> {
    let b = CpuBackend::new();
    let ids: Vec<u32> = (0..vocab as u32).collect();
    let mut meta = BatchMeta::new(16);
    meta.push_row(&ids, 0, &(0..vocab.div_ceil(16) as u32).collect::<Vec<_>>(), 1);
    b.to_host(&b.embed(target.embed_table(), &meta).unwrap()).unwrap()
}

#[test]
fn heads_compute_what_the_reference_says_in_each_layout() {
    let target = tiny(64, 1, 0.5);
    let b = CpuBackend::new();
    let mut rng = Rng(11);
    let h: Vec<f64> = (0..64).map(|_| rng.normal()).collect();
    let h32: Vec<f32> = h.iter().map(|&x| x as f32).collect();
    let shared_head = target_lm_head(&target, 64);
    let layouts = [
        HeadsSpec::new(64, 64),
        HeadsSpec { prefixed: false, layers: 2, dtype: StDtype::Bf16, ..HeadsSpec::new(64, 64) },
        HeadsSpec { own_out: false, dtype: StDtype::F16, ..HeadsSpec::new(64, 64) },
    ];
    for spec in layouts {
        let dir = TempDir::new("medusa-heads");
        let w = spec.write(dir.path(), 5);
        let heads = MedusaHeads::load(dir.path(), &target.config, &b).expect("the heads load");
        assert_eq!((heads.config.num_heads, heads.config.num_layers), (spec.heads, spec.layers));
        let got = heads.logits(&b, &target, &h32, spec.heads).unwrap();
        for (i, logits) in got.iter().enumerate() {
            let out = w.get(&format!("{i}.{}.weight", spec.layers)).unwrap_or(&shared_head);
            let err = common::relative_error(logits, &reference(&w, i, spec.layers, &h, out));
            assert!(err < 1e-5, "head {i}, own LM head {}, {:?}: relative error {err:e}", spec.own_out, spec.dtype);
        }
    }
}

#[test]
fn heads_made_for_another_model_are_refused_with_both_sizes() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let cases = [(HeadsSpec::new(32, 64), HeadSize::Hidden, 32, 64), (HeadsSpec::new(64, 80), HeadSize::Vocab, 80, 64)];
    for (spec, what, head, want) in cases {
        let dir = TempDir::new("medusa-mismatch");
        spec.write(dir.path(), 3);
        match MedusaProposer::load(CpuBackend::new(), target.clone(), dir.path()) {
            Err(SpecError::HeadMismatch { what: w, head: h, target: t }) => assert_eq!((w, h, t), (what, head, want)),
            Err(e) => panic!("{what}: wrong error {e}"),
            Ok(_) => panic!("{what}: a mismatched head was accepted"),
        }
    }
    let missing = TempDir::new("medusa-missing");
    let err = MedusaProposer::load(CpuBackend::new(), target.clone(), missing.path()).err().expect("no heads there");
    assert!(matches!(err, SpecError::MedusaHead(_)), "{err}");
    // A config without `medusa_num_heads` is refused, not guessed.
    let dir = TempDir::new("medusa-config");
    HeadsSpec::new(64, 64).write(dir.path(), 3);
    std::fs::write(dir.join("config.json"), r#"{"medusa_num_layers": 1}"#).unwrap();
    let err = MedusaProposer::load(CpuBackend::new(), target, dir.path()).err().expect("no head count");
    assert!(matches!(err, SpecError::MedusaHead(_)), "{err}");
}

// Losslessness.

#[test]
fn greedy_medusa_on_a_tiny_random_model_equals_plain_greedy() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None);
    let dir = TempDir::new("medusa-lossless");
    HeadsSpec { heads: 4, ..HeadsSpec::new(64, 64) }.write(dir.path(), 9);
    let reqs = common::token_requests(64, 8, 2, |i| 7 + 4 * i as usize);
    let want = plain_greedy(&engine, &reqs);
    let shapes = [None, tree(1, 1, 1), tree(8, 2, 3), tree(16, 4, 4), tree(32, 8, 6)];
    for (k, shape) in [1, 3, 4, 4, 4].into_iter().zip(shapes) {
        let mut p = MedusaProposer::load(CpuBackend::new(), engine.model.clone(), dir.path()).unwrap();
        let mut stats = SpecStats::default();
        for (i, req) in reqs.iter().enumerate() {
            let spec = SpecOptions { proposer: &mut p, max_draft: k, synthetic_acceptance: None, tree: shape };
            let out = engine.generate_speculative(req, Some(spec), |_, _| {}).unwrap();
            assert_eq!(out.token_ids, want[i], "engine, k={k}, {shape:?}, request {i}");
            stats.merge(&out.speculative.unwrap());
        }
        assert!(stats.steps > 0 && stats.drafted > 0 && !stats.random_heads, "{shape:?}: {stats:?}");
    }
    // Chains also run through the batching runtime, alone and all requests at once.
    let proposer = Box::new(MedusaProposer::load(CpuBackend::new(), target.clone(), dir.path()).unwrap());
    let spec =
        Speculation { proposer, max_draft: 3, synthetic_acceptance: None, lengths: Default::default(), tree: None };
    let h = Runtime::builder().speculation(spec).max_batch(8).build(CpuBackend::new(), target, None::<Tokenizer>);
    let h = h.unwrap();
    let outs = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
    for (i, out) in outs.into_iter().enumerate() {
        assert_eq!(out.unwrap().token_ids, want[i], "runtime batch {}, request {i}", reqs.len());
    }
    let alone = block_on(collect(h.generate(reqs[5].clone()))).unwrap();
    assert_eq!(alone.token_ids, want[5], "runtime batch 1");
    assert!(alone.speculative.unwrap().drafted > 0, "the heads drafted");
    assert_all_blocks_free(&h);
}

#[test]
fn greedy_medusa_trees_through_the_runtime_equal_plain_greedy() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None);
    let dir = TempDir::new("medusa-tree-runtime");
    HeadsSpec { heads: 4, ..HeadsSpec::new(64, 64) }.write(dir.path(), 9);
    let reqs = common::token_requests(64, 8, 2, |i| 7 + 4 * i as usize);
    let want = plain_greedy(&engine, &reqs);
    for (random, shape) in [(false, tree(8, 2, 3)), (false, tree(32, 8, 4)), (true, tree(16, 4, 4))] {
        let proposer = Box::new(match random {
            true => MedusaProposer::random(CpuBackend::new(), target.clone(), 4).unwrap(),
            false => MedusaProposer::load(CpuBackend::new(), target.clone(), dir.path()).unwrap(),
        });
        let (lengths, max_draft) = (DraftLengths::Fixed, 4);
        let spec = Speculation { proposer, max_draft, synthetic_acceptance: None, lengths, tree: shape };
        let stats = assert_runtime_equals(&target, None, spec, &reqs, &want, 5);
        assert_eq!(stats.random_heads, random, "random heads are labelled");
    }
}

fn chat(text: &str, max_tokens: usize) -> GenerateRequest {
    use specula::model::chat::ChatMessage;
    GenerateRequest { max_tokens, ..GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user(text.to_string())])) }
}

#[test]
fn greedy_medusa_on_the_default_model_equals_plain_greedy() {
    let Some(s) = shared() else { return };
    let c = &s.engine.model.config;
    // Heads at the default model's size, sharing its LM head (small enough to write).
    let dir = TempDir::new("medusa-default");
    HeadsSpec { own_out: false, heads: 4, ..HeadsSpec::new(c.hidden_size, c.vocab_size) }.write(dir.path(), 21);
    let prompts = ["Write a short poem about the sea.", "Count from one to twenty in words."];
    for (i, text) in prompts.iter().enumerate() {
        let req = chat(text, 20);
        let want = s.engine.generate(&req, |_, _| {}).unwrap().token_ids;
        for (random_heads, shape) in [(false, tree(16, 4, 4)), (true, None), (true, tree(8, 2, 4))] {
            let model = s.engine.model.clone();
            let mut p = match random_heads {
                true => MedusaProposer::random(CpuBackend::new(), model, 4).unwrap(),
                false => MedusaProposer::load(CpuBackend::new(), model, dir.path()).unwrap(),
            };
            assert_eq!(p.heads().random, random_heads);
            let spec = SpecOptions { proposer: &mut p, max_draft: 4, synthetic_acceptance: None, tree: shape };
            let out = s.engine.generate_speculative(&req, Some(spec), |_, _| {}).unwrap();
            assert_eq!(out.token_ids, want, "prompt {i}, {shape:?}, random {random_heads}");
            let stats = out.speculative.unwrap();
            assert_eq!(stats.random_heads, random_heads, "random heads are labelled");
            assert!(stats.drafted > 0, "{stats:?}");
        }
    }
}
