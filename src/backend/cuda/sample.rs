//! Sampling on the GPU (kernels/sample.cu): each row's settings and previous tokens go to
//! the device, one token id per row comes back.

use super::device::launch;
use super::{CudaBackend, CudaTensor, DType};
use crate::core::sampling::RowSampling;
use crate::tensor::{check_sample_rows, BackendError, Result};

/// One row's settings as `sample_rows` in kernels/sample.cu reads them.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RowParams {
    temperature: f32,
    top_p: f32,
    min_p: f32,
    penalty: f32,
    top_k: u32,
    hist_start: u32,
    hist_len: u32,
    pad: u32,
    uniform: f64,
}

const _: () = assert!(std::mem::size_of::<RowParams>() == 40);

/// Each row's settings, and the previous tokens of the rows with a repetition penalty
/// (the only ones that read them), end to end.
fn pack(rows: &[RowSampling]) -> Result<(Vec<RowParams>, Vec<u32>)> {
    let mut history = Vec::new();
    let params = rows
        .iter()
        .map(|r| {
            let p = r.params;
            let start = history.len();
            history.extend_from_slice(r.read_history());
            let too_long = || BackendError::Invalid(format!("sample_rows: {} previous tokens", history.len()));
            Ok(RowParams {
                temperature: p.temperature,
                top_p: p.top_p,
                min_p: p.min_p,
                penalty: p.repetition_penalty,
                top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
                hist_start: u32::try_from(start).map_err(|_| too_long())?,
                hist_len: u32::try_from(history.len() - start).map_err(|_| too_long())?,
                pad: 0,
                uniform: r.uniform,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((params, history))
}

impl CudaBackend {
    /// `Backend::sample_rows` on the device: one block per row, with a `[rows, vocab]`
    /// scratch buffer for the penalized logits and then the probabilities.
    pub(super) fn sample_on_device(&self, logits: &CudaTensor, vocab: usize, rows: &[RowSampling]) -> Result<Vec<u32>> {
        Self::expect(logits, DType::F32, "sample_rows logits")?;
        check_sample_rows(logits.numel(), vocab, rows.len())?;
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let vocab_arg = i32::try_from(vocab).map_err(|_| BackendError::Invalid(format!("vocab {vocab}")))?;
        let (params, history) = pack(rows)?;
        let pbuf = self.dev.alloc(std::mem::size_of_val(params.as_slice()))?;
        self.dev.htod(pbuf.ptr(), &params)?;
        let hbuf = self.dev.alloc(4 * history.len().max(1))?;
        self.dev.htod(hbuf.ptr(), &history)?;
        let work = self.dev.alloc(4 * logits.numel())?;
        let ids = self.dev.alloc(4 * rows.len())?;
        launch!(self.dev, &self.kernels.sample_rows, (rows.len() as u32, 1, 1), (1024, 1, 1);
            logits.ptr(), work.ptr(), pbuf.ptr(), hbuf.ptr(), ids.ptr(), vocab_arg)?;
        self.dev.dtoh::<u32>(ids.ptr(), rows.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::sampling::SamplingParams;

    #[test]
    fn only_penalized_rows_send_their_history() {
        let plain = SamplingParams { temperature: 1.0, ..Default::default() };
        let penalized = SamplingParams { repetition_penalty: 1.3, ..plain.clone() };
        let rows = [
            RowSampling { params: &penalized, history: &[4, 5], uniform: 0.5 },
            RowSampling { params: &plain, history: &[1, 2, 3], uniform: 0.25 },
            RowSampling { params: &penalized, history: &[7], uniform: 0.75 },
        ];
        let (params, history) = pack(&rows).unwrap();
        assert_eq!(history, [4, 5, 7]);
        let spans: Vec<(u32, u32)> = params.iter().map(|p| (p.hist_start, p.hist_len)).collect();
        assert_eq!(spans, [(0, 2), (2, 0), (2, 1)]);
        assert_eq!(params[1].uniform, 0.25);
    }
}
