//! The EAGLE head's step through its CUDA graph: a step of one shape run twice with other
//! features (the second replays the graph, its features refilled) must give the bits of
//! the same step captured anew on a fresh cache, and differ from the first step's.

use std::path::Path;

use super::OpRow;
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, BatchMeta};
use crate::engine::EngineError;
use crate::harness::{model_source, Result};
use crate::model::{load_model, KvCache};
use crate::spec::eagle::{EagleHead, DEFAULT_HEAD};
use crate::spec::SpecError;
use crate::tensor::random::normal_values;

/// The row; none where the default head is not there or was made for another model.
pub fn replay(gpu: &CudaBackend, model: &str) -> Result<Vec<OpRow>> {
    let dir = Path::new(DEFAULT_HEAD);
    if !dir.join("config.json").is_file() {
        return Ok(vec![]);
    }
    let b = gpu.sibling()?;
    let target = load_model(&model_source(model)?, &b)?.model;
    let head = match EagleHead::load(dir, &target.config, &b) {
        Ok(head) => head,
        Err(SpecError::HeadMismatch { .. }) => return Ok(vec![]),
        Err(e) => return Err(EngineError::from(e).into()),
    };
    let h = head.config.hidden_size;
    let mut meta = BatchMeta::new(16);
    meta.push_row(&[5, 17, 300], 0, &[0, 1], 2);
    let step = |kv: &mut KvCache<CudaBackend>, seed: u64| -> Result<Vec<f32>> {
        let (mut out, logits) = head.step(&b, &target, kv, &meta, &normal_values(3 * h, 1.0, seed))?;
        out.extend(b.to_host(&logits)?);
        Ok(out)
    };
    let mut kv = head.kv_cache(&b, 4, 16)?;
    let first = step(&mut kv, 1)?;
    let replayed = step(&mut kv, 2)?;
    let fresh = step(&mut head.kv_cache(&b, 4, 16)?, 2)?;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let same = bits(&replayed) == bits(&fresh);
    let moved = bits(&first) != bits(&replayed);
    let err = replayed.iter().zip(&fresh).fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
    Ok(vec![OpRow {
        op: "eagle head step replayed (features refilled) vs captured anew".into(),
        shape: format!("3 tokens, 2 logit rows, features differ from the first step: {moved}"),
        err: if same { 0.0 } else { err.max(f64::MIN_POSITIVE) },
        pass: same && moved,
    }])
}
