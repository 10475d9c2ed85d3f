//! EAGLE drafting: the head computes what an f64 reference of its math says (as
//! `scripts/eagle/common.py` runs it); greedy output with `--spec eagle` equals plain greedy
//! output token for token, at batch 1 and 8, on a tiny random model with a tiny random head
//! and on the default model with the checked-in head; sampled output follows the target's
//! distribution; heads are loaded in each supported layout, and a head made for another
//! model is refused with a typed error.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::random_llama::tiny;
use common::reference::{matvec_f32 as matvec, rope_theta};
use common::runtime::{assert_all_blocks_free, assert_runtime_equals, plain_greedy, shared, tree};
use common::sampling::{assert_follows, nth_token_distribution, third_token_counts};
use common::tiny::{Rng, StDtype};
use common::TempDir;
use futures::executor::block_on;
use safetensors::tensor::TensorView;
use specula::actors::{collect, Runtime, RuntimeError};
use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BatchMeta};
use specula::core::sampling::SamplingParams;
use specula::engine::{Engine, EngineError, SpecOptions};
use specula::model::{Llama, Tokenizer};
use specula::request::{GenerateRequest, Prompt};
use specula::spec::eagle::{EagleHead, DEFAULT_HEAD};
use specula::spec::{DraftLengths, EagleProposer, HeadSize, SpecError, Speculation, TreeShape};

// A tiny head, written as the EAGLE-1 safetensors layout.

/// The head's shape beside the tiny target's (hidden 64, 4 heads of 16, 2 KV heads).
struct HeadSpec {
    hidden: usize,
    vocab: usize,
    bias: bool,
    dtype: StDtype,
    /// Standard deviation of the matrices, times 1/sqrt(fan-in).
    scale: f64,
}

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTER: usize = 96;
const THETA: f64 = 10000.0;
const EPS: f64 = 1e-5;

impl HeadSpec {
    fn new(vocab: usize) -> Self {
        HeadSpec { hidden: 64, vocab, bias: true, dtype: StDtype::F32, scale: 1.0 }
    }

    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv) = (self.hidden, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        let p = |s: &str| format!("layers.0.{s}.weight");
        let mut out = vec![
            ("fc.weight".to_string(), vec![h, 2 * h]),
            (p("self_attn.q_proj"), vec![q, h]),
            (p("self_attn.k_proj"), vec![kv, h]),
            (p("self_attn.v_proj"), vec![kv, h]),
            (p("self_attn.o_proj"), vec![h, q]),
            (p("post_attention_layernorm"), vec![h]),
            (p("mlp.gate_proj"), vec![INTER, h]),
            (p("mlp.up_proj"), vec![INTER, h]),
            (p("mlp.down_proj"), vec![h, INTER]),
        ];
        if self.bias {
            out.push(("fc.bias".to_string(), vec![h]));
        }
        out
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["EagleLlamaForCausalLM"], "model_type": "llama", "eagle_version": 1,
            "hidden_size": self.hidden, "intermediate_size": INTER, "num_hidden_layers": 1,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "rope_theta": THETA, "rms_norm_eps": EPS, "vocab_size": self.vocab, "torch_dtype": "float32",
        })
    }

    /// Writes the head into `dir`; returns its weights as stored (rounded to the dtype).
    fn write(&self, dir: &Path, seed: u64) -> Weights {
        let mut rng = Rng(seed);
        let mut weights = Weights::new();
        for (name, shape) in self.shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = match shape.len() {
                1 if name.ends_with("bias") => (0..n).map(|_| (0.1 * rng.normal()) as f32).collect(),
                1 => (0..n).map(|_| (1.0 + 0.2 * rng.normal()) as f32).collect(),
                _ => {
                    let std = self.scale / (shape[1] as f64).sqrt();
                    (0..n).map(|_| (std * rng.normal()) as f32).collect()
                }
            };
            weights.insert(name, data.iter().map(|&x| self.dtype.round(x)).collect());
        }
        let encoded: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = self
            .shapes()
            .into_iter()
            .map(|(name, shape)| {
                let (dt, bytes) = self.dtype.encode(&weights[&name]);
                (name, shape, dt, bytes)
            })
            .collect();
        let views = encoded.iter().map(|(n, s, dt, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()));
        std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
        std::fs::write(dir.join("config.json"), self.config().to_string()).unwrap();
        weights
    }
}

type Weights = std::collections::HashMap<String, Vec<f32>>;

fn proposer(target: &Arc<Llama<CpuBackend>>, dir: &Path) -> EagleProposer<CpuBackend> {
    EagleProposer::load(CpuBackend::new(), target.clone(), dir, 64, 16).expect("the head loads")
}

// The f64 reference of the head (scripts/eagle/common.py: EagleHead.forward_cached).

fn rope(x: &mut [f64], pos: usize) {
    rope_theta(x, HEAD_DIM, THETA, pos);
}

/// The head's output at every entry of one sequence (entry i at position i), causal.
fn reference(w: &Weights, h: usize, emb: &[Vec<f64>], feats: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let p = |s: &str| &w[&format!("layers.0.{s}.weight")];
    let zeros = vec![0f32; h];
    let bias = w.get("fc.bias").unwrap_or(&zeros);
    let mut xs = vec![];
    let (mut keys, mut values, mut queries) = (vec![], vec![], vec![]);
    for (i, (e, f)) in emb.iter().zip(feats).enumerate() {
        let input: Vec<f64> = e.iter().chain(f).copied().collect();
        let x: Vec<f64> = matvec(&w["fc.weight"], &input).iter().zip(bias).map(|(a, &b)| a + b as f64).collect();
        let (mut q, mut k) = (matvec(p("self_attn.q_proj"), &x), matvec(p("self_attn.k_proj"), &x));
        rope(&mut q, i);
        rope(&mut k, i);
        queries.push(q);
        keys.push(k);
        values.push(matvec(p("self_attn.v_proj"), &x));
        xs.push(x);
    }
    let mut out = vec![];
    for (i, mut x) in xs.into_iter().enumerate() {
        let mut attn = vec![0f64; HEADS * HEAD_DIM];
        for hq in 0..HEADS {
            let kvh = hq / (HEADS / KV_HEADS);
            let q = &queries[i][hq * HEAD_DIM..(hq + 1) * HEAD_DIM];
            let kv = |t: &Vec<f64>| t[kvh * HEAD_DIM..(kvh + 1) * HEAD_DIM].to_vec();
            let scores: Vec<f64> = (0..=i)
                .map(|j| q.iter().zip(kv(&keys[j])).map(|(a, b)| a * b).sum::<f64>() / (HEAD_DIM as f64).sqrt())
                .collect();
            let m = scores.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            for (j, s) in scores.iter().enumerate() {
                for (d, v) in kv(&values[j]).iter().enumerate() {
                    attn[hq * HEAD_DIM + d] += (s - m).exp() / z * v;
                }
            }
        }
        x.iter_mut().zip(matvec(p("self_attn.o_proj"), &attn)).for_each(|(a, b)| *a += b);
        let rms = (x.iter().map(|v| v * v).sum::<f64>() / h as f64 + EPS).sqrt();
        let n: Vec<f64> = x.iter().zip(p("post_attention_layernorm")).map(|(v, &g)| v / rms * g as f64).collect();
        let (g, u) = (matvec(p("mlp.gate_proj"), &n), matvec(p("mlp.up_proj"), &n));
        let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        x.iter_mut().zip(matvec(p("mlp.down_proj"), &act)).for_each(|(a, b)| *a += b);
        out.push(x);
    }
    out
}

#[test]
fn the_head_computes_what_the_reference_says_in_each_layout() {
    let target = tiny(64, 1, 0.5);
    let b = CpuBackend::new();
    let tokens: Vec<u32> = vec![3, 17, 42, 8, 8, 61, 0, 29, 33];
    let mut meta = BatchMeta::new(4);
    meta.push_row(&tokens, 0, &[2, 0, 1], tokens.len());
    let emb: Vec<Vec<f64>> = b
        .to_host(&b.embed(target.embed_table(), &meta).unwrap())
        .unwrap()
        .chunks(64)
        .map(|r| r.iter().map(|&x| x as f64).collect())
        .collect();
    let mut rng = Rng(7);
    let feats: Vec<Vec<f64>> = tokens.iter().map(|_| (0..64).map(|_| rng.normal()).collect()).collect();
    let flat: Vec<f32> = feats.iter().flatten().map(|&x| x as f32).collect();
    for (bias, dtype) in [(true, StDtype::F32), (false, StDtype::F16), (true, StDtype::Bf16)] {
        let dir = TempDir::new("eagle-head");
        let spec = HeadSpec { bias, dtype, ..HeadSpec::new(64) };
        let weights = spec.write(dir.path(), 5);
        let head = EagleHead::load(dir.path(), &target.config, &b).expect("the head loads");
        let mut kv = head.kv_cache(&b, 4, 4).unwrap();
        let (got, logits) = head.step(&b, &target, &mut kv, &meta, &flat).unwrap();
        let want = reference(&weights, 64, &emb, &feats);
        let want_flat: Vec<f64> = want.concat();
        let err = common::relative_error(&got, &want_flat);
        assert!(err < 1e-5, "bias {bias}, {dtype:?}: relative error {err:e}");
        // The draft logits are the target's LM head over the prediction.
        let logits = b.to_host(&logits).unwrap();
        assert_eq!(logits.len(), tokens.len() * 64);
    }
}

#[test]
fn a_head_made_for_another_model_is_refused_with_both_sizes() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let cases = [
        (HeadSpec { hidden: 32, ..HeadSpec::new(64) }, HeadSize::Hidden, 32, 64),
        (HeadSpec::new(80), HeadSize::Vocab, 80, 64),
    ];
    for (spec, what, head, want) in cases {
        let dir = TempDir::new("eagle-mismatch");
        spec.write(dir.path(), 3);
        match EagleProposer::load(CpuBackend::new(), target.clone(), dir.path(), 16, 16) {
            Err(SpecError::HeadMismatch { what: w, head: h, target: t }) => {
                assert_eq!((w, h, t), (what, head, want));
            }
            Err(e) => panic!("{what}: wrong error {e}"),
            Ok(_) => panic!("{what}: a mismatched head was accepted"),
        }
    }
    let missing = TempDir::new("eagle-missing");
    let err = EagleProposer::load(CpuBackend::new(), target, missing.path(), 16, 16).err().expect("no head there");
    assert!(matches!(err, SpecError::EagleHead(_)), "{err}");
}

// Losslessness.

fn requests() -> Vec<GenerateRequest> {
    common::token_requests(64, 8, 2, |i| 7 + 3 * i as usize)
}

#[test]
fn greedy_eagle_on_a_tiny_random_model_equals_plain_greedy() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None);
    let dir = TempDir::new("eagle-lossless");
    HeadSpec::new(64).write(dir.path(), 9);
    let reqs = requests();
    let want = plain_greedy(&engine, &reqs);
    for k in [1, 3, 6] {
        let mut p = proposer(&engine.model, dir.path());
        for (i, req) in reqs.iter().enumerate() {
            let spec = SpecOptions { proposer: &mut p, max_draft: k, synthetic_acceptance: None, tree: None };
            let out = engine.generate_speculative(req, Some(spec), |_, _| {}).unwrap();
            assert_eq!(out.token_ids, want[i], "engine, k={k}, request {i}");
        }
        let spec = Speculation {
            proposer: Box::new(proposer(&target, dir.path())),
            max_draft: k,
            synthetic_acceptance: None,
            lengths: Default::default(),
            tree: None,
        };
        assert_runtime_equals(&target, None, spec, &reqs, &want, 5);
    }
}

#[test]
fn greedy_tree_eagle_on_a_tiny_random_model_equals_plain_greedy() {
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None);
    let dir = TempDir::new("eagle-tree-lossless");
    HeadSpec::new(64).write(dir.path(), 9);
    let reqs = requests();
    let want = plain_greedy(&engine, &reqs);
    for shape in [tree(1, 1, 1), tree(8, 2, 3), tree(16, 4, 6), tree(32, 8, 5)] {
        let mut p = proposer(&engine.model, dir.path());
        let mut stats = specula::spec::SpecStats::default();
        for (i, req) in reqs.iter().enumerate() {
            let spec = SpecOptions { proposer: &mut p, max_draft: 4, synthetic_acceptance: None, tree: shape };
            let out = engine.generate_speculative(req, Some(spec), |_, _| {}).unwrap();
            assert_eq!(out.token_ids, want[i], "engine, {shape:?}, request {i}");
            stats.merge(&out.speculative.unwrap());
        }
        assert!(stats.steps > 0 && stats.drafted > 0, "{shape:?}: {stats:?}");
    }
}

/// Tree speculation as the runtime runs it: `reqs` through a runtime drafting trees of
/// `shape` with a fresh proposer, against `want`.
fn runtime_tree_spec(
    target: &Arc<Llama<CpuBackend>>,
    dir: &Path,
    shape: TreeShape,
    lengths: DraftLengths,
) -> Speculation {
    let proposer = Box::new(proposer(target, dir));
    Speculation { proposer, max_draft: shape.depth, synthetic_acceptance: None, lengths, tree: Some(shape) }
}

#[test]
fn greedy_tree_eagle_through_the_runtime_equals_plain_greedy() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None);
    let dir = TempDir::new("eagle-tree-runtime");
    HeadSpec::new(64).write(dir.path(), 9);
    let reqs = requests();
    let want = plain_greedy(&engine, &reqs);
    for (shape, lengths) in [
        (tree(1, 1, 1), DraftLengths::Fixed),
        (tree(8, 2, 3), DraftLengths::Fixed),
        (tree(16, 4, 6), DraftLengths::Fixed),
        (tree(32, 8, 5), DraftLengths::Adaptive),
    ] {
        let spec = runtime_tree_spec(&target, dir.path(), shape.unwrap(), lengths);
        let stats = assert_runtime_equals(&target, None, spec, &reqs, &want, 5);
        // Acceptance per position is per depth: never deeper than the tree.
        assert!(stats.acceptance_per_position.len() <= shape.unwrap().depth, "{shape:?}: {stats:?}");
    }
}

#[test]
fn sampled_and_penalised_tree_rows_share_steps_with_greedy_ones() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None);
    let dir = TempDir::new("eagle-tree-mixed");
    HeadSpec::new(64).write(dir.path(), 9);
    let mut reqs = requests();
    // Rows 0 and 1 sample; row 2 is greedy with a repetition penalty (its targets are
    // chosen on the host, in each node's context); the others are plain greedy.
    for (i, r) in reqs.iter_mut().enumerate().take(3) {
        r.sampling = match i {
            2 => SamplingParams { repetition_penalty: 1.3, ..Default::default() },
            _ => SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(i as u64), ..Default::default() },
        };
    }
    let want = plain_greedy(&engine, &reqs);
    let spec = runtime_tree_spec(&target, dir.path(), TreeShape { nodes: 12, top_k: 3, depth: 4 }, DraftLengths::Fixed);
    let h = Runtime::builder().speculation(spec).max_batch(8).build(CpuBackend::new(), target, None::<Tokenizer>);
    let h = h.unwrap();
    let outs = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
    for (i, out) in outs.into_iter().enumerate() {
        let out = out.unwrap();
        assert!(out.speculative.as_ref().unwrap().drafted > 0, "request {i} drafted trees");
        match i {
            0 | 1 => assert_eq!(out.token_ids.len(), reqs[i].max_tokens, "sampled request {i} completes"),
            _ => assert_eq!(out.token_ids, want[i], "greedy request {i}"),
        }
    }
    assert_all_blocks_free(&h);
}

#[test]
fn the_runtime_refuses_trees_it_cannot_draft() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let proposer = Box::new(specula::spec::NgramProposer::default());
    let spec = Speculation {
        proposer,
        max_draft: 3,
        synthetic_acceptance: None,
        lengths: Default::default(),
        tree: tree(8, 2, 3),
    };
    let err = Runtime::builder().speculation(spec).build(CpuBackend::new(), target.clone(), None::<Tokenizer>);
    assert!(matches!(err, Err(RuntimeError::Spec(SpecError::TreeProposer))), "{:?}", err.err());
    let dir = TempDir::new("eagle-tree-refused");
    HeadSpec::new(64).write(dir.path(), 9);
    let mut spec =
        runtime_tree_spec(&target, dir.path(), TreeShape { nodes: 8, top_k: 2, depth: 3 }, DraftLengths::Fixed);
    spec.synthetic_acceptance = Some(0.5);
    let err = Runtime::builder().speculation(spec).build(CpuBackend::new(), target, None::<Tokenizer>);
    assert!(matches!(err, Err(RuntimeError::Spec(SpecError::TreeSynthetic))), "{:?}", err.err());
}

#[test]
fn a_tree_refuses_proposers_without_trees() {
    let engine = Engine::new(CpuBackend::new(), tiny(64, 1, 0.5), None);
    let mut ngram = specula::spec::NgramProposer::default();
    let spec = SpecOptions { proposer: &mut ngram, max_draft: 3, synthetic_acceptance: None, tree: tree(8, 2, 3) };
    let err = engine.generate_speculative(&requests()[1], Some(spec), |_, _| {}).unwrap_err();
    assert!(matches!(err, EngineError::Spec(SpecError::TreeProposer)), "{err}");
}

#[test]
fn greedy_tree_eagle_on_the_default_model_equals_plain_greedy_and_accepts_more() {
    let Some(s) = shared() else { return };
    let head = Path::new(DEFAULT_HEAD);
    let reqs: Vec<GenerateRequest> = PROMPTS.iter().map(|p| chat(p, 32)).collect();
    let mut p = EagleProposer::load(CpuBackend::new(), s.engine.model.clone(), head, 64, 16).unwrap();
    let (mut chain, mut treed) = (specula::spec::SpecStats::default(), specula::spec::SpecStats::default());
    for (i, req) in reqs.iter().enumerate().skip(3).take(3) {
        let want = s.engine.generate(req, |_, _| {}).unwrap().token_ids;
        let spec = SpecOptions { proposer: &mut p, max_draft: 5, synthetic_acceptance: None, tree: tree(24, 4, 5) };
        let out = s.engine.generate_speculative(req, Some(spec), |_, _| {}).unwrap();
        assert_eq!(out.token_ids, want, "tree, request {i}");
        treed.merge(&out.speculative.unwrap());
        let spec = SpecOptions { proposer: &mut p, max_draft: 5, synthetic_acceptance: None, tree: None };
        chain.merge(&s.engine.generate_speculative(req, Some(spec), |_, _| {}).unwrap().speculative.unwrap());
    }
    // Several candidates per depth hold more often than one.
    let (t, c) = (treed.mean_accepted_length, chain.mean_accepted_length);
    eprintln!("tokens per step: tree {t:.2} ({treed:?}), chain {c:.2}");
    assert!(t > c, "tree {t:.2} vs chain {c:.2}");
}

const PROMPTS: [&str; 8] = [
    "What are the main differences between tea and coffee?",
    "How do I pack a suitcase for a week-long trip?",
    "Write a JavaScript function that reverses a string.",
    "Write a short poem about the sea.",
    "Explain to a five-year-old why the sky is blue.",
    "I feel nervous before exams. Any advice?",
    "Describe a reusable water bottle for an online shop.",
    "A car travels 120 km in 1.5 hours. What is its average speed?",
];

fn chat(text: &str, max_tokens: usize) -> GenerateRequest {
    use specula::model::chat::ChatMessage;
    GenerateRequest { max_tokens, ..GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user(text.to_string())])) }
}

#[test]
fn greedy_eagle_on_the_default_model_with_its_head_equals_plain_greedy() {
    let Some(s) = shared() else { return };
    let head = Path::new(DEFAULT_HEAD);
    let reqs: Vec<GenerateRequest> = PROMPTS.iter().map(|p| chat(p, 24)).collect();
    let want = plain_greedy(&s.engine, &reqs);
    let mut p = EagleProposer::load(CpuBackend::new(), s.engine.model.clone(), head, 64, 16).unwrap();
    let mut stats = specula::spec::SpecStats::default();
    for (i, req) in reqs.iter().enumerate().take(3) {
        let spec = SpecOptions { proposer: &mut p, max_draft: 4, synthetic_acceptance: None, tree: None };
        let out = s.engine.generate_speculative(req, Some(spec), |_, _| {}).unwrap();
        assert_eq!(out.token_ids, want[i], "engine, request {i}");
        stats.merge(&out.speculative.unwrap());
    }
    // The head's first draft holds about 40% of the time on such prompts; a head that read
    // the wrong features (or none) would almost never be right among 49152 tokens.
    let first = stats.acceptance_per_position[0];
    assert!(first > 0.2, "the trained head's first draft should often hold: {first:.2} ({stats:?})");
    let proposer = Box::new(EagleProposer::load(CpuBackend::new(), s.model.clone(), head, 256, 16).unwrap());
    // Fixed lengths: drafting may not pay on a CPU, and this checks that its drafts are used.
    let spec =
        Speculation { proposer, max_draft: 4, synthetic_acceptance: None, lengths: DraftLengths::Fixed, tree: None };
    let h = Runtime::builder()
        .speculation(spec)
        .max_batch(8)
        .build(CpuBackend::new(), s.model.clone(), Some(s.tokenizer.clone()))
        .unwrap();
    let outs = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
    for (i, out) in outs.into_iter().enumerate() {
        let out = out.unwrap();
        assert_eq!(out.token_ids, want[i], "runtime batch 8, request {i}");
        assert!(out.speculative.is_some());
    }
    let alone = block_on(collect(h.generate(reqs[0].clone()))).unwrap();
    assert_eq!(alone.token_ids, want[0], "runtime batch 1");
    let st = alone.speculative.unwrap();
    assert!(st.accepted > 0, "{st:?}");
    assert_all_blocks_free(&h);
}

#[test]
fn greedy_tree_eagle_on_the_default_model_through_the_runtime_equals_plain_greedy() {
    let Some(s) = shared() else { return };
    let head = Path::new(DEFAULT_HEAD);
    let reqs: Vec<GenerateRequest> = PROMPTS.iter().map(|p| chat(p, 24)).collect();
    let want = plain_greedy(&s.engine, &reqs);
    let proposer = Box::new(EagleProposer::load(CpuBackend::new(), s.model.clone(), head, 256, 16).unwrap());
    let shape = TreeShape { nodes: 16, top_k: 4, depth: 4 };
    // Fixed lengths: drafting may not pay on a CPU, and this checks that the trees are used.
    let (lengths, tree) = (DraftLengths::Fixed, Some(shape));
    let spec = Speculation { proposer, max_draft: 4, synthetic_acceptance: None, lengths, tree };
    let st = assert_runtime_equals(&s.model, Some(s.tokenizer.clone()), spec, &reqs, &want, 0);
    // The trained head's trees hold often: more than one token per step on these prompts.
    assert!(st.accepted > 0 && st.mean_accepted_length > 1.2, "{st:?}");
}

// Sampling.

/// Samples the third token of a fixed prompt 20,000 times (seeds 0..) with the head drafting
/// chains, or trees of `shape`, and checks it against the target's exact distribution.
fn sampled_eagle_follows_the_target(label: &str, shape: Option<TreeShape>) {
    let vocab = 48;
    let engine = Engine::new(CpuBackend::new(), tiny(vocab, 11, 0.7), None);
    let dir = TempDir::new("eagle-sampled");
    // Small weights: a flat draft distribution, so drafts are both accepted and rejected.
    HeadSpec { scale: 0.3, ..HeadSpec::new(vocab) }.write(dir.path(), 4);
    let prompt = vec![3u32, 9, 27];
    let params = SamplingParams { temperature: 1.0, top_p: 0.9, ..Default::default() };
    let expected = nth_token_distribution(&engine.model, &prompt, &params, 3);
    let mut p = proposer(&engine.model, dir.path());
    let (counts, drafts) = third_token_counts(&engine, &mut p, shape, &prompt, &params);
    assert_follows(label, &counts, &expected, drafts);
}

#[test]
fn sampled_eagle_follows_the_target_distribution() {
    sampled_eagle_follows_the_target("eagle chain", None);
}

#[test]
fn sampled_tree_eagle_follows_the_target_distribution() {
    sampled_eagle_follows_the_target("eagle tree 8/2", tree(8, 2, 3));
}
