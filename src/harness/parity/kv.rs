//! The default model on the GPU with an FP8 KV cache against the same model with the bf16
//! cache: greedy tokens (the bf16 run's fed to both) and the top-1 agreement per step, and
//! verification against decoding over the FP8 cache (bitwise, as with bf16).

use super::forward::{prompt_ids, rel_err, verify_differs, BLOCK};
use super::KvRow;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BatchMeta};
use crate::core::sampling::argmax;
use crate::harness::{model_source, Result};
use crate::model::{load_model_with, ForwardStep, KvCache, LoadOptions, LoadedModel};
use crate::tensor::{KvDtype, KvOptions};

pub fn compare(gpu: &CudaBackend, model: &str, steps: usize) -> Result<Vec<KvRow>> {
    let lg = load_model_with(&model_source(model)?, &LoadOptions::default(), gpu)?;
    let prompts = prompt_ids(&lg)?;
    prompts.into_iter().map(|(name, ids)| compare_prompt(gpu, &lg, name, &ids, steps)).collect()
}

fn cache(
    gpu: &CudaBackend,
    lg: &LoadedModel<CudaBackend>,
    blocks: usize,
    dtype: KvDtype,
) -> Result<KvCache<CudaBackend>> {
    let options = KvOptions { dtype, window: None };
    Ok(KvCache::with_options(gpu, &lg.model.config, blocks, BLOCK as usize, options)?)
}

/// One prompt: prefill into both caches, then `steps` greedy steps through the captured
/// graphs, each fed the bf16 run's token.
fn compare_prompt(
    gpu: &CudaBackend,
    lg: &LoadedModel<CudaBackend>,
    name: &str,
    ids: &[u32],
    steps: usize,
) -> Result<KvRow> {
    let blocks = (ids.len() + steps + 8).div_ceil(BLOCK as usize);
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let (mut kb, mut kf) = (cache(gpu, lg, blocks, KvDtype::Bf16)?, cache(gpu, lg, blocks, KvDtype::Fp8)?);
    let mut meta = BatchMeta::new(BLOCK);
    meta.push_row(ids, 0, &table, 1);
    let mut lb = gpu.to_host(&lg.model.forward(gpu, &mut kb, &meta)?)?;
    let mut lf = gpu.to_host(&lg.model.forward(gpu, &mut kf, &meta)?)?;
    let mut row = KvRow {
        prompt: name.into(),
        steps,
        equal: 0,
        first_diff: None,
        margin: None,
        top1: 0,
        max_logit_err: 0.0,
        verify_differs: vec![],
    };
    let (mut fed, mut fp8_logits) = (vec![], vec![]);
    let n = lg.model.num_layers();
    for step in 0..steps {
        let (tb, tf) = (argmax(&lb), argmax(&lf));
        row.max_logit_err = row.max_logit_err.max(rel_err(&lf, &lb));
        row.top1 += usize::from(tb == tf);
        if tb != tf && row.first_diff.is_none() {
            row.first_diff = Some(step);
            row.margin = Some(lb[tb as usize] - lb[tf as usize]);
        }
        if row.first_diff.is_none() {
            row.equal += 1;
        }
        let mut meta = BatchMeta::new(BLOCK);
        meta.push_row(&[tb], (ids.len() + step) as u32, &table, 1);
        lb = gpu.to_host(&gpu.forward_step(&lg.model, &mut kb, &meta, n)?)?;
        lf = gpu.to_host(&gpu.forward_step(&lg.model, &mut kf, &meta, n)?)?;
        fed.push(tb);
        fp8_logits.push(lf.clone());
    }
    row.verify_differs = verify_differs(gpu, lg, &mut kf, &table, ids.len(), &fed, &fp8_logits)?;
    Ok(row)
}
