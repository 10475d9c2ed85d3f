//! Tensor parallelism on the GPU: the NCCL path with one rank against the plain path (the
//! same ids and the same logits, bit for bit: one rank's all-reduce leaves its data as it
//! is), and where several GPUs are visible, N ranks against one (the same greedy ids; the
//! sums over ranks add in another order, so the logits may differ in the last bits).

use super::TpRow;
use crate::backend::cuda::CudaBackend;
use crate::harness::tp::{greedy, prompt_ids, Greedy, Split, Stepper, Whole};
use crate::harness::Result;
use crate::model::WeightDtype;

/// The dummy shape every run checks (8 KV heads: up to 8 ranks).
pub const DUMMY: &str = "dummy:llama-3.1-8b";

/// Prompt tokens before the greedy steps.
const PROMPT: usize = 24;

/// The dummy 8B, and `model` unless it is `none`: one rank against the plain path; on the
/// dummy, 2, 4 and 8 ranks (as many as GPUs are visible) against one.
pub fn compare(gpu: &CudaBackend, model: &str, steps: usize) -> Result<Vec<TpRow>> {
    let mut rows = vec![];
    let models: Vec<&str> = std::iter::once(DUMMY).chain((model != "none").then_some(model)).collect();
    for name in models {
        let (plain, one) = one_rank_vs_plain(gpu, name, steps)?;
        rows.push(row(name, "tp1 (nccl) vs plain", &one, &plain, true));
        if name != DUMMY {
            continue;
        }
        let visible = crate::device::gpu_count();
        for ranks in [2, 4, 8].into_iter().filter(|&n| n <= visible) {
            let mut split = Split::load(gpu, name, WeightDtype::Auto, ranks, PROMPT + steps + 1)?;
            let prompt = prompt_ids(PROMPT, split.vocab());
            let many = greedy(&mut split, &prompt, steps, false)?;
            rows.push(row(name, &format!("tp{ranks} vs tp1"), &many, &one, false));
        }
    }
    Ok(rows)
}

/// The plain path's greedy run and one rank's, with their logits; one model loaded at a time.
fn one_rank_vs_plain(gpu: &CudaBackend, name: &str, steps: usize) -> Result<(Greedy, Greedy)> {
    let positions = PROMPT + steps + 1;
    let plain = {
        let mut whole = Whole::load(gpu.sibling()?, name, WeightDtype::Auto, positions)?;
        let prompt = prompt_ids(PROMPT, whole.vocab());
        greedy(&mut whole, &prompt, steps, true)?
    };
    let mut split = Split::load(gpu, name, WeightDtype::Auto, 1, positions)?;
    let prompt = prompt_ids(PROMPT, split.vocab());
    Ok((plain, greedy(&mut split, &prompt, steps, true)?))
}

/// `got` against `want`: the greedy ids, and the logits bit for bit when `bitwise`.
fn row(model: &str, check: &str, got: &Greedy, want: &Greedy, bitwise: bool) -> TpRow {
    let equal = got.ids.iter().zip(&want.ids).take_while(|(a, b)| a == b).count();
    let same_bits =
        |a: &Vec<f32>, b: &Vec<f32>| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    let logits_bitwise = bitwise.then(|| {
        got.logits.len() == want.logits.len() && got.logits.iter().zip(&want.logits).all(|(a, b)| same_bits(a, b))
    });
    TpRow { model: model.into(), check: check.into(), steps: want.ids.len(), equal, logits_bitwise }
}
