//! A drafting head's two device ops against the CPU's default implementations:
//! `top_log_probs_rows` (the same ids in the same order; log-probabilities within 1e-9,
//! the GPU summing the exponentials in another order) and `embed_concat` (bitwise, the
//! features rounded to bf16 as the GPU stores them).

use rand::Rng;

use super::{bf16_round, f32_tensor, rel_err, Ctx};
use crate::backend::{Backend, BatchMeta, Result};
use crate::harness::parity::OpRow;
use crate::tensor::HostTensor;

/// What f64 sums of up to 128256 terms in two orders may differ by, in log space.
const LOG_PROB: f64 = 1e-9;

/// Rows of random logits, continuous or on a coarse grid (ties everywhere, the k-th place
/// included), for head-sized and larger vocabularies, k from 1 to past the vocabulary.
pub fn top_log_probs(c: &mut Ctx) -> Result<()> {
    for (rows, vocab, k) in [(24, 49152, 4), (5, 49152, 16), (3, 128256, 10), (4, 49152, 1), (2, 10, 16)] {
        for coarse in [false, true] {
            let mut v = c.values(rows * vocab, 10.0);
            if coarse {
                v.iter_mut().for_each(|x| *x = (*x * 2.0).round() / 2.0);
            }
            let t = HostTensor::new(vec![rows, vocab], v);
            let want = c.cpu.top_log_probs_rows(&c.cpu.upload(&t)?, vocab, k)?;
            let got = c.gpu.top_log_probs_rows(&f32_tensor(c.gpu, &t)?, vocab, k)?;
            let ids =
                |r: &[Vec<(u32, f64)>]| r.iter().map(|p| p.iter().map(|e| e.0).collect::<Vec<_>>()).collect::<Vec<_>>();
            let same = ids(&got) == ids(&want);
            let err = got.iter().flatten().zip(want.iter().flatten()).fold(0f64, |m, (g, w)| m.max((g.1 - w.1).abs()));
            let grid = if coarse { ", ties" } else { "" };
            c.rows.push(OpRow {
                op: "top_log_probs_rows (ids equal, |Δ log p|)".into(),
                shape: format!("[{rows}, {vocab}] k={k}{grid}"),
                err: if same { err } else { f64::INFINITY },
                pass: same && err <= LOG_PROB,
            });
        }
    }
    Ok(())
}

/// A head's input rows: embeddings, features (uploaded as weights are, bf16, and as f32
/// activations), the 1 and the padding, against the CPU's host assembly.
pub fn embed_concat(c: &mut Ctx) -> Result<()> {
    let (vocab, hidden, width, n) = (1000, 576, 1216, 9);
    let table = HostTensor::new(vec![vocab, hidden], bf16_round(c.values(vocab * hidden, 1.0)));
    let feats = HostTensor::new(vec![n, hidden], bf16_round(c.values(n * hidden, 3.0)));
    let mut meta = BatchMeta::new(16);
    let tokens: Vec<u32> = (0..n).map(|_| c.rng.random_range(0..vocab as u32)).collect();
    meta.push_row(&tokens, 0, &[0], 1);
    let (tc, tg) = c.both(&table)?;
    let (bc, bg) = (c.cpu.prepare(&meta)?, c.gpu.prepare(&meta)?);
    let want = c.cpu.to_host(&c.cpu.embed_concat(&tc, &bc, &c.cpu.upload(&feats)?, hidden, width)?)?;
    for (label, fg) in [("bf16", c.gpu.upload(&feats)?), ("f32", f32_tensor(c.gpu, &feats)?)] {
        let got = c.gpu.to_host(&c.gpu.embed_concat(&tg, &bg, &fg, hidden, width)?)?;
        let err = rel_err(&got, &want);
        c.rows.push(OpRow {
            op: format!("embed_concat ({label} features, bitwise)"),
            shape: format!("{n} of [{vocab}, {hidden}] → [{n}, {width}]"),
            err,
            pass: got == want,
        });
    }
    Ok(())
}
