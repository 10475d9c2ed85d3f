//! Whether a draft model on its own stream overlaps the target's work: a timeline from
//! CUDA events on both streams.

use std::time::Instant;

use cudarc::driver::CudaEvent;

use super::decode::Run;
use super::Overlap;
use crate::backend::cuda::CudaTensor;
use crate::backend::BatchMeta;
use crate::harness::tp::greedy_ids;
use crate::harness::Result;
use crate::model::ForwardStep;
use crate::prompt::BLOCK_SIZE;

/// One target step queued on its stream, then `steps` draft steps on the draft's
/// stream (each waits for its own id only). CUDA events on both streams give the timeline.
pub fn overlap(target: &mut Run, draft: &mut Run, steps: usize) -> Result<Overlap> {
    let (tg, dg) = (target.gpu, draft.gpu);
    let target_step = |t: &mut Run| -> Result<CudaTensor> {
        let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
        meta.push_row(&[5], t.tokens.len() as u32, &t.table, 1);
        let n = t.model.num_layers();
        Ok(tg.forward_step(&t.model, &mut t.kv, &meta, n)?)
    };
    let draft_steps = |d: &mut Run| -> Result<()> {
        for i in 0..steps {
            let mut meta = BatchMeta::new(BLOCK_SIZE as u32);
            meta.push_row(&[7], (d.tokens.len() + i) as u32, &d.table, 1);
            greedy_ids(dg, &d.model, &mut d.kv, &meta)?;
        }
        Ok(())
    };
    // Warm up (captures), then each alone.
    target_step(target)?;
    tg.synchronize()?;
    draft_steps(draft)?;
    let t0 = Instant::now();
    target_step(target)?;
    tg.synchronize()?;
    let target_alone_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t0 = Instant::now();
    draft_steps(draft)?;
    let draft_alone_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Together: the target's step is queued (no sync), then the draft loop runs.
    let origin = tg.record()?;
    dg.wait(&origin)?; // both start after the origin mark: a shared time base
    let t0 = Instant::now();
    let target_start = tg.record()?;
    target_step(target)?;
    let target_end = tg.record()?;
    let draft_start = dg.record()?;
    draft_steps(draft)?;
    let draft_end = dg.record()?;
    tg.synchronize()?;
    dg.synchronize()?;
    let concurrent_ms = t0.elapsed().as_secs_f64() * 1e3;
    let at = |e: &CudaEvent| -> Result<f64> { Ok(target_start.elapsed_ms(e)? as f64) };
    let target_span: (f64, f64) = (0.0, at(&target_end)?);
    let draft_span = (at(&draft_start)?, at(&draft_end)?);
    let overlap_ms = (target_span.1.min(draft_span.1) - target_span.0.max(draft_span.0)).max(0.0);
    Ok(Overlap {
        concurrent_ms,
        draft: draft_span,
        draft_alone_ms,
        overlap_ms,
        steps,
        target: target_span,
        target_alone_ms,
    })
}
