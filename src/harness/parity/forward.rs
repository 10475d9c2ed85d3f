//! The default model on both backends in one process: greedy tokens and logits.

use super::ForwardRow;
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BatchMeta};
use crate::harness::{model_source, Result};
use crate::model::chat::ChatMessage;
use crate::model::{load_model_with, ForwardStep, KvCache, LoadOptions, LoadedModel, WeightDtype};
use crate::request::Prompt;

/// The runtime's block size, as `BatchMeta` takes it.
pub const BLOCK: u32 = crate::prompt::BLOCK_SIZE as u32;

/// Both backends with the file's weights, then both with FP8 weights quantized at load.
pub fn compare(cpu: &CpuBackend, gpu: &CudaBackend, model: &str, steps: usize) -> Result<Vec<ForwardRow>> {
    let source = model_source(model)?;
    let f32_model = load_model_with(&source, &LoadOptions::default(), cpu)?;
    let mut out = vec![];
    for dtype in [WeightDtype::Auto, WeightDtype::Fp8] {
        let lc = load_model_with(&source, &LoadOptions::dtype(dtype), cpu)?;
        let lg = load_model_with(&source, &LoadOptions::dtype(dtype), gpu)?;
        let reference = (dtype == WeightDtype::Fp8).then_some(&f32_model);
        out.extend(compare_loaded(Models { cpu, gpu, lc: &lc, lg: &lg }, reference, steps)?);
    }
    Ok(out)
}

fn compare_loaded(
    models: Models,
    f32_reference: Option<&LoadedModel<CpuBackend>>,
    steps: usize,
) -> Result<Vec<ForwardRow>> {
    let prompts = prompt_ids(models.lc)?;
    prompts.into_iter().map(|(name, ids)| compare_prompt(models, f32_reference, name, &ids, steps)).collect()
}

/// The model on both backends, with its weights in the same precision.
#[derive(Clone, Copy)]
struct Models<'a> {
    cpu: &'a CpuBackend,
    gpu: &'a CudaBackend,
    lc: &'a LoadedModel<CpuBackend>,
    lg: &'a LoadedModel<CudaBackend>,
}

/// One prompt: its prefill on both backends, then `steps` greedy steps, each fed the CPU's
/// token, then the last k + 1 of them again as one verification row on the GPU.
fn compare_prompt(
    models: Models,
    f32_reference: Option<&LoadedModel<CpuBackend>>,
    name: &str,
    ids: &[u32],
    steps: usize,
) -> Result<ForwardRow> {
    let Models { cpu, gpu, lc, lg } = models;
    let blocks = (ids.len() + steps + 8).div_ceil(BLOCK as usize);
    let table: Vec<u32> = (0..blocks as u32).rev().collect(); // scrambled on purpose
    let mut kc = KvCache::new(cpu, &lc.model.config, blocks, BLOCK as usize)?;
    let mut kg = KvCache::new(gpu, &lg.model.config, blocks, BLOCK as usize)?;
    let mut meta = BatchMeta::new(BLOCK);
    meta.push_row(ids, 0, &table, 1);
    let mut lcpu = cpu.to_host(&lc.model.forward(cpu, &mut kc, &meta)?)?;
    let mut lgpu = gpu.to_host(&lg.model.forward(gpu, &mut kg, &meta)?)?;
    let fp8_vs_f32 = match f32_reference {
        Some(r) => Some(fp8_vs_f32(cpu, r, blocks, &meta, &lgpu)?),
        None => None,
    };
    let mut o = ForwardRow {
        prompt: name.into(),
        dtype: if f32_reference.is_some() { "fp8" } else { "bf16" },
        steps,
        equal: 0,
        first_diff: None,
        margin: None,
        max_logit_err: 0.0,
        verify_differs: vec![],
        fp8_vs_f32,
    };
    let (mut fed, mut decode_logits) = (vec![], vec![]);
    for step in 0..steps {
        let (tc, tg) = (crate::core::sampling::argmax(&lcpu), crate::core::sampling::argmax(&lgpu));
        o.max_logit_err = o.max_logit_err.max(rel_err(&lgpu, &lcpu));
        if tc == tg && o.first_diff.is_none() {
            o.equal += 1;
        } else if o.first_diff.is_none() {
            o.first_diff = Some(step);
            o.margin = Some(lcpu[tc as usize] - lcpu[tg as usize]);
        }
        // Teacher-forced with the CPU's token: the two stay comparable after a tie.
        let pos = (ids.len() + step) as u32;
        let mut meta = BatchMeta::new(BLOCK);
        meta.push_row(&[tc], pos, &table, 1);
        lcpu = cpu.to_host(&lc.model.forward(cpu, &mut kc, &meta)?)?;
        let n = lg.model.num_layers();
        lgpu = gpu.to_host(&gpu.forward_step(&lg.model, &mut kg, &meta, n)?)?;
        fed.push(tc);
        decode_logits.push(lgpu.clone());
    }
    o.verify_differs = verify_differs(gpu, lg, &mut kg, &table, ids.len(), &fed, &decode_logits)?;
    Ok(o)
}

/// The GPU's next token after the prompt against the f32 CPU model's, and KL(f32 || fp8)
/// of the two next-token distributions.
fn fp8_vs_f32(
    cpu: &CpuBackend,
    r: &LoadedModel<CpuBackend>,
    blocks: usize,
    meta: &BatchMeta,
    lgpu: &[f32],
) -> Result<(bool, f64)> {
    let mut kr = KvCache::new(cpu, &r.model.config, blocks, BLOCK as usize)?;
    let want = cpu.to_host(&r.model.forward(cpu, &mut kr, meta)?)?;
    let same = crate::core::sampling::argmax(&want) == crate::core::sampling::argmax(lgpu);
    Ok((same, kl(&want, lgpu)))
}

/// Re-runs the last k + 1 decode steps as one verification row (same tokens, same
/// positions): batch invariance says the logits are the same bits, for every k. Returns
/// the k whose logits differ.
pub fn verify_differs(
    gpu: &CudaBackend,
    lg: &LoadedModel<CudaBackend>,
    kg: &mut KvCache<CudaBackend>,
    table: &[u32],
    prompt_len: usize,
    fed: &[u32],
    decode_logits: &[Vec<f32>],
) -> Result<Vec<usize>> {
    let (steps, vocab) = (fed.len(), lg.model.config.vocab_size);
    let mut differs = vec![];
    for k in (1..=16).filter(|&k| k < steps) {
        let first = steps - (k + 1);
        let mut meta = BatchMeta::new(BLOCK);
        meta.push_row(&fed[first..], (prompt_len + first) as u32, table, k + 1);
        let n = lg.model.num_layers();
        let v = gpu.to_host(&gpu.forward_step(&lg.model, kg, &meta, n)?)?;
        let same = v
            .chunks(vocab)
            .enumerate()
            .all(|(i, row)| row.iter().zip(&decode_logits[first + i]).all(|(a, b)| a.to_bits() == b.to_bits()));
        if !same {
            differs.push(k);
        }
    }
    Ok(differs)
}

/// The golden prompts: plain text, code, and a chat turn (the model's template).
pub fn prompts() -> Vec<(&'static str, Prompt)> {
    vec![
        ("france", Prompt::Text("The capital of France is".into())),
        ("fib", Prompt::Text("def fibonacci(n):".into())),
        ("chat", Prompt::Chat(vec![ChatMessage::user("What is speculative decoding? Explain briefly.")])),
    ]
}

/// `prompts()` as `loaded`'s token ids.
pub fn prompt_ids<B: Backend>(loaded: &LoadedModel<B>) -> Result<Vec<(&'static str, Vec<u32>)>> {
    let config = &loaded.model.config;
    let lengths =
        crate::core::lengths::Lengths { context: config.max_position_embeddings, kv_tokens: usize::MAX, held: None };
    let tokenize = |prompt: &Prompt| {
        crate::prompt::tokenize_prompt(loaded.tokenizer.as_ref(), prompt, config.vocab_size, &lengths)
    };
    prompts().iter().map(|(name, prompt)| Ok((*name, tokenize(prompt)?))).collect()
}

pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, &w| m.max(w.abs() as f64)).max(1e-30);
    got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs())) / scale
}

/// KL(softmax(p) || softmax(q)) of two logit rows, in nats.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |x: &[f32]| -> Vec<f64> {
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
        x.iter().map(|&v| v as f64 - lse).collect()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}
