//! What a drafting head needs beside the model's ops: its input rows assembled on the
//! device (kernels/embed.cu `embed_concat_rows`), and each row's likeliest tokens with
//! their log-probabilities (kernels/topk.cu), so that only k pairs per row come back.

use super::device::launch;
use super::{CudaBackend, CudaBatch, CudaTensor, DType};
use crate::core::tree::top_log_probs;
use crate::tensor::{check_concat, check_rows, BackendError, Result, TopLogProbs};

/// The most tokens per row kernels/topk.cu returns (`TOPK_MAX`); more go through the host.
const TOPK_MAX: usize = 16;

impl CudaBackend {
    /// `Backend::top_log_probs_rows`: one block per row; back come, per row, its
    /// log-sum-exp and its k (id, logit) pairs.
    pub(super) fn top_log_probs_on_device(
        &self,
        logits: &CudaTensor,
        vocab: usize,
        k: usize,
    ) -> Result<Vec<TopLogProbs>> {
        Self::expect(logits, DType::F32, "top_log_probs_rows logits")?;
        check_rows("top_log_probs_rows", logits.numel(), vocab)?;
        let rows = logits.numel() / vocab;
        if rows == 0 || k == 0 {
            return Ok(vec![vec![]; rows]);
        }
        let vocab_arg = i32::try_from(vocab).map_err(|_| BackendError::Invalid(format!("vocab {vocab}")))?;
        if k > TOPK_MAX {
            let host = self.dev.dtoh::<f32>(logits.ptr(), logits.numel())?;
            return Ok(host.chunks(vocab).map(|row| top_log_probs(row, k)).collect());
        }
        let stride = 2 + 2 * k;
        let out = self.dev.alloc(4 * rows * stride)?;
        launch!(self.dev, &self.kernels.top_log_probs_rows, (rows as u32, 1, 1), (512, 1, 1);
            logits.ptr(), out.ptr(), vocab_arg, k as i32)?;
        let words = self.dev.dtoh::<u32>(out.ptr(), rows * stride)?;
        Ok(words.chunks(stride).map(|w| unpack(w, k, vocab)).collect())
    }

    /// `Backend::embed_concat`: one launch, bf16 rows (the fc matmul's input).
    pub(super) fn embed_concat_on_device(
        &self,
        table: &CudaTensor,
        batch: &CudaBatch,
        features: &CudaTensor,
        hidden: usize,
        width: usize,
    ) -> Result<CudaTensor> {
        Self::expect(table, DType::Bf16, "embed table")?;
        let n = batch.num_tokens();
        check_concat(n * table.dims().1, features.numel(), hidden, width)?;
        if table.dims().1 != hidden {
            return Err(BackendError::Invalid(format!("embed_concat: table rows of {}, not {hidden}", table.dims().1)));
        }
        let vocab = table.dims().0;
        if let Some(&t) = batch.meta.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(BackendError::Invalid(format!("token id {t} out of vocabulary ({vocab})")));
        }
        let features = self.bf16_input(features)?;
        let out = self.alloc(vec![n, width], DType::Bf16)?;
        if n > 0 {
            launch!(self.dev, &self.kernels.embed_concat_rows, (n as u32, 1, 1), (256, 1, 1);
                table.ptr(), batch.tokens(), features.ptr(), out.ptr(), hidden as i32, width as i32)?;
        }
        Ok(out)
    }
}

/// One row of `top_log_probs_rows`' output: the log-sum-exp (an f64, low word first),
/// `k` ids, `k` logits' bits; the first `min(k, vocab)` entries are real.
fn unpack(words: &[u32], k: usize, vocab: usize) -> TopLogProbs {
    let lse = f64::from_bits(words[0] as u64 | (words[1] as u64) << 32);
    let (ids, logits) = words[2..].split_at(k);
    ids.iter().zip(logits).take(k.min(vocab)).map(|(&id, &l)| (id, f32::from_bits(l) as f64 - lse)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_unpacks_to_its_pairs_minus_the_log_sum_exp() {
        let lse = 2.5f64;
        let bits = lse.to_bits();
        let mut words = vec![bits as u32, (bits >> 32) as u32, 7, 3, u32::MAX];
        words.extend([1.5f32, 0.5, f32::NEG_INFINITY].map(f32::to_bits));
        assert_eq!(unpack(&words, 3, 2), vec![(7, -1.0), (3, -2.0)]);
        assert_eq!(unpack(&words, 3, 100).len(), 3);
    }
}
