//! EAGLE-3 drafting: the target keeps the residual stream entering three of its layers in
//! the same forward (checked against properties of the plain forward); a tiny EAGLE-3 head
//! written in each public layout computes what an f64 reference of its math says; greedy
//! output with it equals plain greedy output token for token (engine chain and tree,
//! runtime at batch 1 and 8); sampled output follows the target's distribution although
//! the head drafts over a reduced vocabulary; heads made for another model are refused
//! with typed errors.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use common::random_llama::{tiny, tiny_config, tiny_with};
use common::reference::{matvec_f32 as matvec, rope_theta};
use common::runtime::{assert_runtime_equals, plain_greedy, tree};
use common::sampling::{assert_follows, nth_token_distribution, third_token_counts};
use common::tiny::Rng;
use common::TempDir;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BatchMeta};
use specula::core::sampling::SamplingParams;
use specula::engine::{Engine, SpecOptions};
use specula::model::{HiddenKind, KvCache, Llama};
use specula::request::GenerateRequest;
use specula::spec::eagle::Eagle3Head;
use specula::spec::{EagleProposer, HeadSize, SpecError, Speculation, TreeShape};

const H: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTER: usize = 96;
const THETA: f64 = 10000.0;
const EPS: f64 = 1e-5;

// The target side.

fn rms(x: &[f32]) -> Vec<f64> {
    let r = (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64 + EPS).sqrt();
    x.iter().map(|&v| v as f64 / r).collect()
}

#[test]
fn the_target_keeps_the_residual_stream_entering_the_layers_asked_for() {
    // Norm weights are all ones in this model and the embedding is its LM head.
    let model = tiny(64, 1, 0.5);
    let b = CpuBackend::new();
    let tokens: Vec<u32> = vec![5, 9, 33, 2, 61, 17];
    let mut meta = BatchMeta::new(4);
    meta.push_row(&tokens, 0, &[1, 0], tokens.len());
    let fresh = || KvCache::new(&b, &model.config, 2, 4).unwrap();
    let (_, parts) = model.forward_hidden(&b, &mut fresh(), &meta, HiddenKind::Layers([2, 0, 1])).unwrap();
    let parts: Vec<Vec<f32>> = parts.iter().map(|p| b.to_host(p).unwrap()).collect();
    // Entering layer 0: the embeddings, bit for bit.
    assert_eq!(parts[1], b.to_host(&b.embed(model.embed_table(), &meta).unwrap()).unwrap());
    // After the last layer: normed, what the LM head reads.
    let (_, last) = model.forward_hidden(&b, &mut fresh(), &meta, HiddenKind::Last).unwrap();
    let want: Vec<f64> = parts[0].chunks(H).flat_map(rms).collect();
    assert!(common::relative_error(&b.to_host(&last[0]).unwrap(), &want) < 1e-5);
    // Entering layer 1: normed and projected, the one-layer early exit's logits.
    let early = b.to_host(&model.forward_layers(&b, &mut fresh(), &meta, 1).unwrap()).unwrap();
    let table = b.to_host(model.embed_table()).unwrap();
    let want: Vec<f64> = parts[2]
        .chunks(H)
        .flat_map(|x| {
            let n = rms(x);
            table.chunks(H).map(move |e| e.iter().zip(&n).map(|(&a, b)| a as f64 * b).sum::<f64>()).collect::<Vec<_>>()
        })
        .collect();
    assert!(common::relative_error(&early, &want) < 1e-5);
    // Side by side on the host, row by row, in the order asked for.
    let host = specula::model::hidden_to_host(&b, &[parts_of(&b, &parts[0]), parts_of(&b, &parts[1])], H).unwrap();
    assert_eq!(&host[..H], &parts[0][..H]);
    assert_eq!(&host[H..2 * H], &parts[1][..H]);
    assert_eq!(&host[2 * H..3 * H], &parts[0][H..2 * H]);
}

fn parts_of(b: &CpuBackend, data: &[f32]) -> <CpuBackend as Backend>::Tensor {
    b.upload(&specula::tensor::HostTensor::new(vec![data.len() / H, H], data.to_vec())).unwrap()
}

// A tiny head, written in each public layout.

/// How the checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    /// SafeAILab/EAGLE and SpecForge: `midlayer.*`, bare `fc`, `norm`, `embed_tokens`.
    Official,
    /// vLLM / speculators: `layers.0.*`, bare.
    Vllm,
    /// `model.layers.0.*`, `model.fc`, `model.norm`, `model.embed_tokens`.
    Prefixed,
    /// vLLM's speculators: `layers.0.*`, `fc.bias`, `norm_before_residual`, the Llama part
    /// of the config in `transformer_layer_config` as a difference from `LlamaConfig`.
    Speculators,
}

/// Which target layers the config names.
#[derive(Debug, Clone)]
enum Aux {
    /// None: layers 2, L/2, L − 3.
    Default,
    /// `eagle_aux_hidden_state_layer_ids`: inputs of these layers.
    Top(Vec<i64>),
    /// `eagle_config.eagle_aux_hidden_state_layer_ids`: outputs of these layers.
    Nested(Vec<i64>),
}

struct Head3Spec {
    layout: Layout,
    aux: Aux,
    hidden: usize,
    vocab: usize,
    /// Target ids of the draft vocabulary, ascending; `None`: the whole vocabulary, no d2t.
    draft_ids: Option<Vec<u32>>,
    own_embed: bool,
    scale: f64,
}

impl Head3Spec {
    fn new(layout: Layout, aux: Aux, vocab: usize) -> Self {
        // Every third id is missing from the draft vocabulary.
        let draft_ids = Some((0..vocab as u32).filter(|i| i % 3 != 1).collect());
        Head3Spec { layout, aux, hidden: H, vocab, draft_ids, own_embed: false, scale: 1.0 }
    }

    fn draft_vocab(&self) -> usize {
        self.draft_ids.as_ref().map_or(self.vocab, Vec::len)
    }

    /// Canonical names (`layer.*` for the decoder layer) and shapes.
    fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv) = (self.hidden, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        let mut out: Vec<(String, Vec<usize>)> = [
            ("fc.weight", vec![h, 3 * h]),
            ("layer.input_layernorm.weight", vec![h]),
            ("layer.hidden_norm.weight", vec![h]),
            ("layer.self_attn.q_proj.weight", vec![q, 2 * h]),
            ("layer.self_attn.k_proj.weight", vec![kv, 2 * h]),
            ("layer.self_attn.v_proj.weight", vec![kv, 2 * h]),
            ("layer.self_attn.o_proj.weight", vec![h, q]),
            ("layer.post_attention_layernorm.weight", vec![h]),
            ("layer.mlp.gate_proj.weight", vec![INTER, h]),
            ("layer.mlp.up_proj.weight", vec![INTER, h]),
            ("layer.mlp.down_proj.weight", vec![h, INTER]),
            ("norm.weight", vec![h]),
            ("lm_head.weight", vec![self.draft_vocab(), h]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
        if self.own_embed {
            out.push(("embed_tokens.weight".into(), vec![self.vocab, h]));
        }
        if self.layout == Layout::Speculators {
            out.push(("fc.bias".into(), vec![h]));
        }
        out
    }

    /// The name `canonical` has in this layout.
    fn stored_name(&self, canonical: &str) -> String {
        let (layer, top) = match self.layout {
            Layout::Official => ("midlayer.", ""),
            Layout::Vllm | Layout::Speculators => ("layers.0.", ""),
            Layout::Prefixed => ("model.layers.0.", "model."),
        };
        match canonical.strip_prefix("layer.") {
            Some(rest) => format!("{layer}{rest}"),
            None if canonical == "lm_head.weight" => canonical.to_string(),
            None => format!("{top}{canonical}"),
        }
    }

    fn config(&self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": INTER, "num_hidden_layers": 1,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "rope_theta": THETA, "rms_norm_eps": EPS, "vocab_size": self.vocab,
            "draft_vocab_size": self.draft_vocab(), "torch_dtype": "float32",
        });
        if self.layout == Layout::Speculators {
            // rope_theta and max_position_embeddings are LlamaConfig's defaults: left out.
            let layer = serde_json::json!({
                "model_type": "llama", "hidden_size": self.hidden, "intermediate_size": INTER,
                "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
                "head_dim": HEAD_DIM, "rms_norm_eps": EPS, "vocab_size": self.vocab,
            });
            c = serde_json::json!({
                "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
                "transformer_layer_config": layer, "draft_vocab_size": self.draft_vocab(),
                "norm_before_residual": true,
            });
        }
        match &self.aux {
            Aux::Default => {}
            Aux::Top(ids) => c["eagle_aux_hidden_state_layer_ids"] = serde_json::json!(ids),
            Aux::Nested(ids) => {
                c["eagle_config"] =
                    serde_json::json!({"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": true})
            }
        }
        c
    }

    /// Writes the head into `dir`; returns its weights by canonical name.
    fn write(&self, dir: &Path, seed: u64) -> Weights {
        let mut rng = Rng(seed);
        let mut weights = Weights::new();
        for (name, shape) in self.shapes() {
            let n: usize = shape.iter().product();
            let std = if shape.len() == 1 { 0.2 } else { self.scale / (shape[1] as f64).sqrt() };
            let mean = if shape.len() == 1 && !name.ends_with("bias") { 1.0 } else { 0.0 };
            weights.insert(name, (0..n).map(|_| (mean + std * rng.normal()) as f32).collect());
        }
        let mut tensors: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = self
            .shapes()
            .into_iter()
            .map(|(name, shape)| {
                let bytes = weights[&name].iter().flat_map(|x| x.to_le_bytes()).collect();
                (self.stored_name(&name), shape, Dtype::F32, bytes)
            })
            .collect();
        if let Some(ids) = &self.draft_ids {
            let d2t = ids.iter().enumerate().flat_map(|(i, &t)| (t as i64 - i as i64).to_le_bytes()).collect();
            tensors.push(("d2t".into(), vec![ids.len()], Dtype::I64, d2t));
            let t2d = (0..self.vocab as u32).map(|t| ids.contains(&t) as u8).collect();
            tensors.push(("t2d".into(), vec![self.vocab], Dtype::BOOL, t2d));
        }
        let views = tensors.iter().map(|(n, s, dt, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()));
        std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
        std::fs::write(dir.join("config.json"), self.config().to_string()).unwrap();
        weights
    }
}

type Weights = HashMap<String, Vec<f32>>;

// The f64 reference of the head, from its definition (vLLM's llama_eagle3.py, EAGLE's cnets.py).

/// What an entry reads: the target's fused features (3 hidden) or the head's own output.
enum Input {
    Fused(Vec<f64>),
    Own(Vec<f64>),
}

fn norm(x: &[f64], w: &[f32]) -> Vec<f64> {
    let r = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + EPS).sqrt();
    x.iter().zip(w).map(|(v, &g)| v / r * g as f64).collect()
}

fn rope(x: &mut [f64], pos: usize) {
    rope_theta(x, HEAD_DIM, THETA, pos);
}

fn attend(q: &[f64], keys: &[Vec<f64>], values: &[Vec<f64>]) -> Vec<f64> {
    let mut out = vec![0f64; HEADS * HEAD_DIM];
    for hq in 0..HEADS {
        let kvh = hq / (HEADS / KV_HEADS);
        let part = |t: &Vec<f64>| t[kvh * HEAD_DIM..(kvh + 1) * HEAD_DIM].to_vec();
        let qh = &q[hq * HEAD_DIM..(hq + 1) * HEAD_DIM];
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| qh.iter().zip(part(k)).map(|(a, b)| a * b).sum::<f64>() / (HEAD_DIM as f64).sqrt())
            .collect();
        let m = scores.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        for (s, v) in scores.iter().zip(values) {
            for (d, x) in part(v).iter().enumerate() {
                out[hq * HEAD_DIM + d] += (s - m).exp() / z * x;
            }
        }
    }
    out
}

/// Each entry's output (before `norm`) and logits over the draft vocabulary; entry i at
/// position i, causal.
fn reference(w: &Weights, emb: &[Vec<f64>], inputs: &[Input]) -> Vec<(Vec<f64>, Vec<f64>)> {
    let l = |s: &str| &w[&format!("layer.{s}.weight")];
    // The speculators' heads: a bias on fc, the residual taken after hidden_norm.
    let speculators = w.contains_key("fc.bias");
    let (mut keys, mut values, mut out) = (vec![], vec![], vec![]);
    for (i, (e, input)) in emb.iter().zip(inputs).enumerate() {
        let g = match input {
            Input::Fused(f) => {
                let zeros = vec![0f32; H];
                let bias = w.get("fc.bias").unwrap_or(&zeros);
                matvec(&w["fc.weight"], f).iter().zip(bias).map(|(a, &b)| a + b as f64).collect()
            }
            Input::Own(g) => g.clone(),
        };
        let gn = norm(&g, l("hidden_norm"));
        let u: Vec<f64> = norm(e, l("input_layernorm")).into_iter().chain(gn.iter().copied()).collect();
        let g = if speculators { gn } else { g };
        let (mut q, mut k) = (matvec(l("self_attn.q_proj"), &u), matvec(l("self_attn.k_proj"), &u));
        rope(&mut q, i);
        rope(&mut k, i);
        keys.push(k);
        values.push(matvec(l("self_attn.v_proj"), &u));
        let attn = attend(&q, &keys, &values);
        let mut x: Vec<f64> = g.iter().zip(matvec(l("self_attn.o_proj"), &attn)).map(|(a, b)| a + b).collect();
        let n = norm(&x, l("post_attention_layernorm"));
        let (gate, up) = (matvec(l("mlp.gate_proj"), &n), matvec(l("mlp.up_proj"), &n));
        let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        x.iter_mut().zip(matvec(l("mlp.down_proj"), &act)).for_each(|(a, b)| *a += b);
        let logits = matvec(&w["lm_head.weight"], &norm(&x, &w["norm.weight"]));
        out.push((x, logits));
    }
    out
}

#[test]
fn the_head_computes_what_the_reference_says_in_each_layout() {
    let target = tiny(64, 1, 0.5);
    let b = CpuBackend::new();
    let tokens: Vec<u32> = vec![3, 17, 42, 8, 8, 61, 0, 29, 33];
    let n = tokens.len() - 1;
    let mut rng = Rng(7);
    let fused: Vec<Vec<f64>> = (0..n).map(|_| (0..3 * H).map(|_| rng.normal()).collect()).collect();
    let flat: Vec<f32> = fused.iter().flatten().map(|&x| x as f32).collect();
    let layouts =
        [(Layout::Official, true), (Layout::Vllm, false), (Layout::Prefixed, true), (Layout::Speculators, true)];
    for (layout, own_embed) in layouts {
        let dir = TempDir::new("eagle3-head");
        let spec = Head3Spec { own_embed, ..Head3Spec::new(layout, Aux::Top(vec![0, 1, 2]), 64) };
        let w = spec.write(dir.path(), 5);
        let head = Eagle3Head::load(dir.path(), &target.config, &b).expect("the head loads");
        let table = if own_embed { w["embed_tokens.weight"].clone() } else { b.to_host(target.embed_table()).unwrap() };
        let emb: Vec<Vec<f64>> =
            tokens.iter().map(|&t| table[t as usize * H..][..H].iter().map(|&x| x as f64).collect()).collect();
        // Target entries in one step, then one drafted entry reading the last one's output.
        let mut kv = head.kv_cache(&b, 4, 4).unwrap();
        let mut meta = BatchMeta::new(4);
        meta.push_row(&tokens[..n], 0, &[2, 0, 1], n);
        let (got, logits) = head.step(&b, &target, &mut kv, &meta, &flat).unwrap();
        let own = got[(n - 1) * H..].to_vec();
        let mut meta = BatchMeta::new(4);
        meta.push_row(&tokens[n..], n as u32, &[2, 0, 1], 1);
        let (got2, logits2) = head.step(&b, &target, &mut kv, &meta, &own).unwrap();
        let mut inputs: Vec<Input> = fused.iter().cloned().map(Input::Fused).collect();
        inputs.push(Input::Own(own.iter().map(|&x| x as f64).collect()));
        let want = reference(&w, &emb, &inputs);
        let outs: Vec<f64> = want.iter().flat_map(|(x, _)| x.clone()).collect();
        let lgs: Vec<f64> = want.iter().flat_map(|(_, l)| l.clone()).collect();
        let got_all: Vec<f32> = got.iter().chain(&got2).copied().collect();
        let got_logits: Vec<f32> =
            b.to_host(&logits).unwrap().into_iter().chain(b.to_host(&logits2).unwrap()).collect();
        assert_eq!(got_logits.len(), tokens.len() * spec.draft_vocab(), "{layout:?}: logits over the draft vocabulary");
        let (e1, e2) = (common::relative_error(&got_all, &outs), common::relative_error(&got_logits, &lgs));
        assert!(e1 < 1e-5 && e2 < 1e-5, "{layout:?}: relative errors {e1:e} (outputs), {e2:e} (logits)");
    }
}

// Refusals.

fn load(target: &Arc<Llama<CpuBackend>>, dir: &Path) -> Result<EagleProposer<CpuBackend>, SpecError> {
    EagleProposer::load(CpuBackend::new(), target.clone(), dir, 64, 16)
}

#[test]
fn a_head_made_for_another_model_or_in_an_unknown_layout_is_refused() {
    let target = Arc::new(tiny(64, 1, 0.5));
    let top = || Aux::Top(vec![0, 1, 2]);
    let mut beyond = Head3Spec::new(Layout::Vllm, top(), 64);
    beyond.draft_ids = Some((10..60).collect());
    beyond.draft_ids.as_mut().unwrap().push(70);
    let cases = [
        (Head3Spec { hidden: 32, ..Head3Spec::new(Layout::Official, top(), 64) }, HeadSize::Hidden, 32, 64),
        (Head3Spec { draft_ids: None, ..Head3Spec::new(Layout::Official, top(), 80) }, HeadSize::Vocab, 80, 64),
        (beyond, HeadSize::Vocab, 71, 64),
    ];
    for (spec, what, head, want) in cases {
        let dir = TempDir::new("eagle3-mismatch");
        spec.write(dir.path(), 3);
        match load(&target, dir.path()) {
            Err(SpecError::HeadMismatch { what: w, head: h, target: t }) => assert_eq!((w, h, t), (what, head, want)),
            Err(e) => panic!("{what}: wrong error {e}"),
            Ok(_) => panic!("{what}: a mismatched head was accepted"),
        }
    }
    // The default layers (2, L/2, L − 3) do not exist in a two-layer target; nor layer 3.
    for aux in [Aux::Default, Aux::Top(vec![0, 1, 3]), Aux::Nested(vec![0, 1, 2])] {
        let dir = TempDir::new("eagle3-aux");
        Head3Spec::new(Layout::Official, aux.clone(), 64).write(dir.path(), 3);
        let err = load(&target, dir.path()).err().expect("refused");
        assert!(matches!(err, SpecError::AuxLayers { layers: 2, .. }), "{aux:?}: {err}");
    }
    // An unknown layout: the tensor it lacks is named.
    let dir = TempDir::new("eagle3-layout");
    Head3Spec::new(Layout::Official, top(), 64).write(dir.path(), 3);
    let mut bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    // Renamed in the header, same length: `decoderx.*`.
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for i in 8..header - 9 {
        if &bytes[i..i + 9] == b"midlayer." {
            bytes[i..i + 9].copy_from_slice(b"decoderx.");
        }
    }
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let err = load(&target, dir.path()).err().expect("refused").to_string();
    assert!(err.contains("midlayer.input_layernorm.weight") && err.contains("not found"), "{err}");
}

// Losslessness.

/// A 6-layer target: the default layers 2, 3 and 3 exist.
fn deep_target(vocab: usize, seed: u64, std: f32) -> Llama<CpuBackend> {
    tiny_with(specula::model::ModelConfig { num_layers: 6, ..tiny_config(vocab) }, seed, std)
}

fn requests() -> Vec<GenerateRequest> {
    common::token_requests(64, 8, 2, |i| 7 + 3 * i as usize)
}

#[test]
fn the_aux_layers_follow_each_frameworks_convention() {
    let target = deep_target(64, 1, 0.5);
    let cases = [
        // 2, L/2, L − 3 of L = 6.
        (Aux::Default, [2, 3, 3]),
        // vLLM: the layers whose input is kept.
        (Aux::Top(vec![1, 6, 4]), [1, 6, 4]),
        // SGLang, SpecForge, TensorRT-LLM: the layers whose output is kept.
        (Aux::Nested(vec![0, 2, 5]), [1, 3, 6]),
    ];
    for (aux, want) in cases {
        let dir = TempDir::new("eagle3-aux-ids");
        Head3Spec::new(Layout::Official, aux.clone(), 64).write(dir.path(), 2);
        let head = Eagle3Head::load(dir.path(), &target.config, &CpuBackend::new()).unwrap();
        assert_eq!(head.aux, want, "{aux:?}");
        assert_eq!(head.hidden_kind(), HiddenKind::Layers(want));
    }
}

#[test]
fn greedy_eagle3_equals_plain_greedy_in_the_engine_chain_and_tree() {
    let engine = Engine::new(CpuBackend::new(), deep_target(64, 1, 0.5), None);
    let reqs = requests();
    let want = plain_greedy(&engine, &reqs);
    let heads = [
        Head3Spec::new(Layout::Official, Aux::Default, 64),
        Head3Spec { draft_ids: None, ..Head3Spec::new(Layout::Vllm, Aux::Top(vec![1, 6, 4]), 64) },
        Head3Spec { own_embed: true, ..Head3Spec::new(Layout::Prefixed, Aux::Nested(vec![0, 2, 5]), 64) },
        Head3Spec::new(Layout::Speculators, Aux::Top(vec![2, 3, 3]), 64),
    ];
    for head in heads {
        let dir = TempDir::new("eagle3-lossless");
        head.write(dir.path(), 9);
        let mut p = load(&engine.model, dir.path()).expect("the head loads");
        let mut drafted = 0;
        for (k, shape) in [(1, None), (4, None), (4, tree(8, 2, 3)), (5, tree(24, 4, 5))] {
            for (i, req) in reqs.iter().enumerate() {
                let opts = SpecOptions { proposer: &mut p, max_draft: k, synthetic_acceptance: None, tree: shape };
                let out = engine.generate_speculative(req, Some(opts), |_, _| {}).unwrap();
                assert_eq!(out.token_ids, want[i], "{:?}, k={k}, {shape:?}, request {i}", head.layout);
                drafted += out.speculative.unwrap().drafted;
            }
        }
        assert!(drafted > 0, "{:?}: the head drafted", head.layout);
    }
}

#[test]
fn greedy_eagle3_equals_plain_greedy_in_the_runtime_at_batch_1_and_8() {
    let target = Arc::new(deep_target(64, 1, 0.5));
    let engine = Engine::new(CpuBackend::new(), deep_target(64, 1, 0.5), None);
    let reqs = requests();
    let want = plain_greedy(&engine, &reqs);
    let dir = TempDir::new("eagle3-runtime");
    Head3Spec::new(Layout::Official, Aux::Default, 64).write(dir.path(), 9);
    for k in [1, 3, 6] {
        let spec = Speculation {
            proposer: Box::new(load(&target, dir.path()).unwrap()),
            max_draft: k,
            synthetic_acceptance: None,
            lengths: Default::default(),
            tree: None,
        };
        assert_runtime_equals(&target, None, spec, &reqs, &want, 5);
    }
}

// Sampling.

/// Samples the third token of a fixed prompt 20,000 times (seeds 0..) with an EAGLE-3 head
/// drafting over two thirds of the vocabulary, and checks it against the target's exact
/// distribution: tokens the head cannot draft come from the residual distribution.
fn sampled_eagle3_follows_the_target(label: &str, shape: Option<TreeShape>) {
    let vocab = 48;
    let engine = Engine::new(CpuBackend::new(), deep_target(vocab, 11, 0.7), None);
    let dir = TempDir::new("eagle3-sampled");
    // Small weights: a flat draft distribution, so drafts are both accepted and rejected.
    Head3Spec { scale: 0.3, ..Head3Spec::new(Layout::Vllm, Aux::Default, vocab) }.write(dir.path(), 4);
    let prompt = vec![3u32, 9, 27];
    let params = SamplingParams { temperature: 1.0, top_p: 0.9, ..Default::default() };
    let expected = nth_token_distribution(&engine.model, &prompt, &params, 3);
    let mut p = load(&engine.model, dir.path()).unwrap();
    let (counts, drafts) = third_token_counts(&engine, &mut p, shape, &prompt, &params);
    assert_follows(label, &counts, &expected, drafts);
}

#[test]
fn sampled_eagle3_follows_the_target_distribution() {
    sampled_eagle3_follows_the_target("eagle3 chain", None);
}

#[test]
fn sampled_tree_eagle3_follows_the_target_distribution() {
    sampled_eagle3_follows_the_target("eagle3 tree 8/2", tree(8, 2, 3));
}
