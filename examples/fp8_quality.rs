//! FP8 quality on the default model: `cargo run --release --example fp8_quality`.
//!
//! Loads SmolLM2-135M-Instruct twice on the CPU: as stored (Q4_1 blocks, computed in f32)
//! and with `--dtype fp8` (every projection requantized to E4M3, one scale per output
//! channel, activations unquantized; the tied embedding/head stays Q4_1). On each golden
//! prompt (`tests/golden/smollm2.json`) it compares the two models' logits at the prompt's
//! last position, and at every position of the reference's greedy continuation fed back
//! in: top-1 agreement and mean KL(f32 ‖ fp8), in nats. Then each prompt's greedy
//! continuation under FP8, and how many of its tokens equal the f32 model's.

use std::path::Path;

use serde::Deserialize;
use specula::backend::cpu::CpuBackend;
use specula::backend::{Backend, BatchMeta};
use specula::cli::default_model_path;
use specula::engine::Engine;
use specula::model::{load_model_with, KvCache, Llama, LoadOptions, ModelSource, WeightDtype};
use specula::request::{GenerateRequest, Prompt};

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

/// Logits at positions `from..` of `tokens`, one prefill.
fn logits(model: &Llama<CpuBackend>, tokens: &[u32], from: usize) -> Vec<Vec<f32>> {
    let b = CpuBackend::new();
    let block = specula::prompt::BLOCK_SIZE;
    let blocks = tokens.len().div_ceil(block);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut kv = KvCache::new(&b, &model.config, blocks, block).expect("kv cache");
    let mut meta = BatchMeta::new(block as u32);
    meta.push_row(tokens, 0, &table, tokens.len() - from);
    let out = b.to_host(&model.forward(&b, &mut kv, &meta).expect("forward")).expect("to host");
    out.chunks(model.config.vocab_size).map(<[f32]>::to_vec).collect()
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let log_sum = x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - max - log_sum).collect()
}

/// KL(p ‖ q) of the softmaxes of two logit rows.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
}

fn argmax(x: &[f32]) -> usize {
    specula::core::sampling::argmax(x) as usize
}

/// Top-1 agreement and mean KL over matching rows.
fn compare(f32_rows: &[Vec<f32>], fp8_rows: &[Vec<f32>]) -> (usize, f64) {
    let agree = f32_rows.iter().zip(fp8_rows).filter(|(a, b)| argmax(a) == argmax(b)).count();
    let kl_sum: f64 = f32_rows.iter().zip(fp8_rows).map(|(a, b)| kl(a, b)).sum();
    (agree, kl_sum / f32_rows.len() as f64)
}

fn load(dtype: WeightDtype) -> Result<Engine<CpuBackend>, Box<dyn std::error::Error>> {
    let path = default_model_path()?;
    let backend = CpuBackend::new();
    let loaded = load_model_with(&ModelSource::Path(path), &LoadOptions::dtype(dtype), &backend)?;
    Ok(Engine::new(backend, loaded.model, loaded.tokenizer))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let golden_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/smollm2.json");
    let golden: Golden = serde_json::from_str(&std::fs::read_to_string(golden_file)?)?;
    let (plain, fp8) = (load(WeightDtype::Auto)?, load(WeightDtype::Fp8)?);

    let row = |name: &str, last: String, last_kl: f64, cont: String, cont_kl: f64| {
        println!("{name:<12} {last:>10} {last_kl:>10.2e} {cont:>19} {cont_kl:>21.2e}");
    };
    println!(
        "{:<12} {:>10} {:>10} {:>19} {:>21}",
        "prompt", "last top-1", "last KL", "continuation top-1", "continuation mean KL"
    );
    let (mut last, mut all) = ((0, 0.0), (0, 0, 0.0));
    for case in &golden.cases {
        let tokens: Vec<u32> =
            case.prompt_ids.iter().chain(&case.greedy_ids[..case.greedy_ids.len() - 1]).copied().collect();
        let from = case.prompt_ids.len() - 1;
        let (a, b) = (logits(&plain.model, &tokens, from), logits(&fp8.model, &tokens, from));
        let (agree_last, kl_last) = compare(&a[..1], &b[..1]);
        let (agree, kl_mean) = compare(&a, &b);
        let same = if agree_last == 1 { "same" } else { "different" };
        row(&case.name, same.into(), kl_last, format!("{agree}/{}", a.len()), kl_mean);
        last = (last.0 + agree_last, last.1 + kl_last);
        all = (all.0 + agree, all.1 + a.len(), all.2 + kl_mean * a.len() as f64);
    }
    let n = golden.cases.len();
    row("all", format!("{}/{n}", last.0), last.1 / n as f64, format!("{}/{}", all.0, all.1), all.2 / all.1 as f64);

    println!("\ngreedy continuations with --dtype fp8 (tokens equal to the f32 model's before the first difference):");
    for case in &golden.cases {
        let mut req = GenerateRequest::new(Prompt::Tokens(case.prompt_ids.clone()));
        req.max_tokens = case.greedy_ids.len();
        req.ignore_eos = true;
        let (f, q) = (plain.generate(&req, |_, _| {})?, fp8.generate(&req, |_, _| {})?);
        let same = f.token_ids.iter().zip(&q.token_ids).take_while(|(a, b)| a == b).count();
        println!("{} ({same}/{} equal): {:?}", case.name, q.token_ids.len(), q.text);
    }
    Ok(())
}
