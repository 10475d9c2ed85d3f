//! The small set of ops the Llama forward is written over. Each backend implements them
//! once: `backend::cpu` (f32 reference, batch-invariant) and `backend::cuda` (behind the
//! `cuda` feature). The trait knows tensors and ops, never a model.

use super::quant::QuantWeight;
use super::{AttnWindow, BatchMeta, HostTensor, KvDtype, KvLayout, KvStorage};
use crate::core::sampling::RowSampling;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("out of device memory allocating {bytes} bytes")]
    OutOfMemory { bytes: usize },
    #[error("device error: {0}")]
    Device(String),
    #[error("kernel compilation failed for {kernel}: {log}")]
    Compile { kernel: String, log: String },
    #[error("invalid op input: {0}")]
    Invalid(String),
    /// A feature this backend does not implement, refused when it is configured.
    #[error("the {backend} backend does not support {feature}")]
    Unsupported { backend: &'static str, feature: KvFeature },
    /// Tensor parallelism on a backend without an all-reduce across ranks, refused when it
    /// is configured.
    #[error("the {backend} backend cannot split a model over {ranks} ranks: it has no all-reduce across ranks")]
    NoTensorParallel { backend: &'static str, ranks: usize },
    /// More tensor-parallel ranks (one per GPU) than GPUs visible.
    #[error("tensor parallelism over {ranks} ranks needs {ranks} GPUs (one per rank), but {visible} are visible")]
    TooFewGpus { ranks: usize, visible: usize },
    /// A GPU asked for by number (`--draft-device`) that the driver does not show.
    #[error("GPU {ordinal} is not visible: {visible} GPUs are (numbered from 0)")]
    NoSuchGpu { ordinal: usize, visible: usize },
    /// A device asked for by number on a backend that has no numbered devices (the CPU).
    #[error("the {backend} backend has no numbered devices: a device number (--draft-device) needs the CUDA backend")]
    NoDevices { backend: &'static str },
    /// NCCL (the all-reduce across GPUs) could not be loaded; it is loaded only when a
    /// tensor-parallel group is made.
    #[error("NCCL could not be loaded: looked for {searched:?} on the library path. The nvidia-nccl-cu13 wheel ships only libnccl.so.2: link it as libnccl.so in a folder on LD_LIBRARY_PATH (bench/tp_gpu.sh does)")]
    NcclMissing { searched: Vec<String> },
    /// An NCCL call failed (`code`: NCCL's result code).
    #[error("NCCL {call} failed: {code}")]
    Nccl { call: &'static str, code: String },
}

/// KV-cache features a backend may lack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvFeature {
    Storage(KvStorage),
    Dtype(KvDtype),
    /// Rows whose tokens read a tree of cached positions (`TreeMask`), and moving cached
    /// entries (`Backend::copy_kv`): tree speculation.
    TreeAttention,
}

impl std::fmt::Display for KvFeature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvFeature::Storage(s) => write!(f, "a {s} KV cache"),
            KvFeature::Dtype(d) => write!(f, "--kv-cache-dtype {d:?}"),
            KvFeature::TreeAttention => f.write_str("tree attention (tree speculation)"),
        }
    }
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Names a computation that `Backend::replayable_step` may replay: steps with the same key
/// (and the same shape) run the same ops on the same buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepKey {
    /// The computation (a model and how many of its layers run).
    pub computation: u64,
    /// The KV cache it reads and writes, by an id never reused within a process.
    pub kv_cache: u64,
}

/// A device's memory in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: usize,
    pub total: usize,
}

/// Attention geometry of one layer, and the positions each query reads (all of them
/// causally, or a window's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<AttnWindow>,
}

/// The ranks of a tensor-parallel group seen as one, beside each rank's `all_reduce`: when
/// one rank's step fails, the others must not wait for it.
pub trait RankGroup: Send + Sync {
    /// Makes every all-reduce in progress, or to come, fail until `reset`.
    fn abort(&self);
    /// Ready for the next step; only called while no rank is inside one.
    fn reset(&self);
}

/// The ops of one Llama forward. Activations are 2-D `[tokens, features]` row-major.
pub trait Backend: Send + Sync + 'static {
    /// A tensor on the device: weights (stored as the backend likes), activations, KV cache.
    type Tensor: Send + Sync;
    /// A `BatchMeta` moved to the device once per step.
    type Batch;

    fn name(&self) -> String;

    /// Stores a weight (the CPU keeps f32; CUDA converts to bf16).
    fn upload(&self, t: &HostTensor) -> Result<Self::Tensor>;
    /// Stores a quantized matrix as is, if this backend's matmul computes on it; `None`
    /// makes the loader dequantize and call `upload` instead. An FP8 matrix
    /// (`QuantWeight::Fp8`) brings its E4M3 codes row-major `[rows, cols]`, one f32 scale
    /// per row and the scheme its matmul applies to the input activations.
    fn upload_quantized(&self, _w: &QuantWeight) -> Result<Option<Self::Tensor>> {
        Ok(None)
    }
    /// Random normal weights with standard deviation `std` (the dummy load format), made
    /// where they will live so that large shapes need no host memory.
    fn random(&self, shape: &[usize], std: f32, seed: u64) -> Result<Self::Tensor>;
    /// Rows `part[0]` and columns `part[1]` of the matrix `random(shape, std, seed)` makes
    /// (a tensor-parallel rank's cut of a dummy weight), made where it will live. `None`
    /// makes the loader generate the whole matrix on the host and cut it there.
    fn random_part(
        &self,
        _shape: [usize; 2],
        _std: f32,
        _seed: u64,
        _part: [std::ops::Range<usize>; 2],
    ) -> Result<Option<Self::Tensor>> {
        Ok(None)
    }
    /// A random `[rows, cols]` matrix as `random` makes it, stored as FP8 (E4M3, one scale
    /// per row, activations unquantized): the dummy load format with `--dtype fp8`. `None`
    /// makes the loader generate the values on the host, quantize them there and call
    /// `upload_quantized`.
    fn random_fp8(&self, _shape: [usize; 2], _std: f32, _seed: u64) -> Result<Option<Self::Tensor>> {
        Ok(None)
    }
    /// How this backend stores a KV cache of `dtype` (what the KV pool is sized in), or
    /// `Unsupported`.
    fn kv_storage(&self, dtype: KvDtype) -> Result<KvStorage>;
    /// The device's own memory, free and total, where it has one (a GPU; `None` on the CPU).
    fn memory(&self) -> Result<Option<DeviceMemory>> {
        Ok(None)
    }
    /// A zeroed KV cache tensor for one layer: `[slots, kv_dim]` stored as `layout` says;
    /// a storage or window the backend's attention cannot read is refused here.
    fn kv_cache(&self, slots: usize, layout: &KvLayout) -> Result<Self::Tensor>;
    fn prepare(&self, meta: &BatchMeta) -> Result<Self::Batch>;

    /// Rows of `table` for the batch's tokens: `[tokens, hidden]`.
    fn embed(&self, table: &Self::Tensor, batch: &Self::Batch) -> Result<Self::Tensor>;
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// `residual += delta`, then returns `rms_norm(residual)`: the seam between sub-layers.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        delta: &Self::Tensor,
        weight: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// `x · wᵀ`: x is `[n, k]`, w is `[m, k]` (the checkpoint's layout), result `[n, m]`.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Tensor) -> Result<Self::Tensor>;
    /// Rotates each head of `x` (`[tokens, heads * head_dim]`) by its token's position,
    /// pairing dimension i with i + head_dim/2 (the Hugging Face layout).
    fn rope(&self, x: &mut Self::Tensor, batch: &Self::Batch, inv_freq: &Self::Tensor, head_dim: usize) -> Result<()>;
    /// Writes `k`, `v` into the cache at the batch's slots, then attends each query token
    /// causally to its row's cached positions `0..=position` (those of `shape.window` when
    /// there is one); a tree row's token reads its prefix and its ancestors (`TreeMask`).
    /// Returns `[tokens, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        k_cache: &mut Self::Tensor,
        v_cache: &mut Self::Tensor,
        batch: &Self::Batch,
        shape: AttnShape,
    ) -> Result<Self::Tensor>;
    /// `x · wᵢᵀ` for each weight: several projections of one input (q, k and v). Backends
    /// that do them in one pass over the weights override this.
    fn matmul_many(&self, x: &Self::Tensor, ws: &[&Self::Tensor]) -> Result<Vec<Self::Tensor>> {
        ws.iter().map(|w| self.matmul(x, w)).collect()
    }
    /// The MLP's first half, `silu(x · w_gateᵀ) * (x · w_upᵀ)`; fused where that pays.
    fn swiglu(&self, x: &Self::Tensor, w_gate: &Self::Tensor, w_up: &Self::Tensor) -> Result<Self::Tensor> {
        self.silu_mul(&self.matmul(x, w_gate)?, &self.matmul(x, w_up)?)
    }
    /// `rope` on q and k, then `attention`: one launch where the backend rotates q and k as
    /// its attention kernel loads them. `q` and `k` are scratch afterwards (rotated or not).
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &self,
        q: &mut Self::Tensor,
        k: &mut Self::Tensor,
        v: &Self::Tensor,
        k_cache: &mut Self::Tensor,
        v_cache: &mut Self::Tensor,
        batch: &Self::Batch,
        inv_freq: &Self::Tensor,
        shape: AttnShape,
    ) -> Result<Self::Tensor> {
        self.rope(q, batch, inv_freq, shape.head_dim)?;
        self.rope(k, batch, inv_freq, shape.head_dim)?;
        self.attention(q, k, v, k_cache, v_cache, batch, shape)
    }
    /// `silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// Sums `x` over the ranks of the tensor-parallel group this backend is one rank of,
    /// leaving the same sum on every rank (added in rank order, so the bits do not depend
    /// on timing). A backend that holds the whole model is a group of one: nothing to do.
    fn all_reduce(&self, _x: &mut Self::Tensor) -> Result<()> {
        Ok(())
    }
    /// `ranks` backends on this device forming one tensor-parallel group (rank order), and
    /// the group. A backend provides this and `all_reduce`; the rest of tensor parallelism
    /// (the cut, the rank threads) is shared. Refused by default.
    fn tensor_parallel(&self, ranks: usize) -> Result<(std::sync::Arc<dyn RankGroup>, Vec<Self>)>
    where
        Self: Sized,
    {
        Err(BackendError::NoTensorParallel { backend: self.kind(), ranks })
    }
    /// A backend like this one on device `ordinal` of the same kind (a GPU), with its own
    /// stream: a draft model on another GPU. Refused by backends without numbered devices.
    fn on_device(&self, _ordinal: usize) -> Result<Self>
    where
        Self: Sized,
    {
        Err(BackendError::NoDevices { backend: self.kind() })
    }
    /// A copy of `t`, a tensor of `from` (another device of this kind, or the same), on
    /// this backend's device. Refused by backends without numbered devices.
    fn copy_from(&self, _t: &Self::Tensor, _from: &Self) -> Result<Self::Tensor>
    where
        Self: Sized,
    {
        Err(BackendError::NoDevices { backend: self.kind() })
    }
    /// The number of the device this backend runs on, where devices are numbered (GPUs).
    fn device_ordinal(&self) -> Option<usize> {
        None
    }
    /// The backend's kind, as errors name it.
    fn kind(&self) -> &'static str {
        "this"
    }
    /// Whether the first step of a new shape runs slower than the later ones (a GPU
    /// captures its graph, allocates buffers): the runtime then learns step costs from the
    /// second step of each size on. The CPU runs every step alike.
    fn warms_up(&self) -> bool {
        true
    }

    /// A copy of an activation (same shape and type) that later in-place ops on `x` leave
    /// alone: the residual stream kept at a layer for an EAGLE-3 head.
    fn duplicate(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// The rows of `x` named by the batch's `logits_for`.
    fn gather_logit_rows(&self, x: &Self::Tensor, batch: &Self::Batch) -> Result<Self::Tensor>;
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// Copies cached entries (keys or values of one layer) from slot `from` to slot `to`,
    /// pair by pair in order: a verified tree path moved to consecutive positions.
    /// A backend without tree attention refuses it (`KvFeature::TreeAttention`).
    fn copy_kv(&self, cache: &mut Self::Tensor, moves: &[(u32, u32)]) -> Result<()>;
    /// Whether the device can run further work after a step failed (a CUDA context with a
    /// sticky error cannot). The CPU always can.
    fn healthy(&self) -> Result<()> {
        Ok(())
    }

    /// Runs `step`, one forward computation over `meta` (the model's side of it, in ops):
    /// where a backend may record the work `step` queues and replay it for later steps with
    /// the same key and shape (CUDA graphs for decode-sized steps). The result may live in
    /// a buffer that the next step of the same key and shape reuses: read it before then.
    /// `step` returns its outputs (the logits, and for a drafting head the hidden states).
    fn replayable_step(
        &self,
        _key: StepKey,
        _meta: &BatchMeta,
        step: impl FnOnce() -> Result<Vec<Self::Tensor>>,
    ) -> Result<Vec<Self::Tensor>>
    where
        Self: Sized,
    {
        step()
    }

    /// `replayable_step` for a step that also reads `inputs`, host tensors whose values
    /// change from step to step (a drafting head's features): `step` gets them on the
    /// device as activations (f32), in buffers that a replay refills. Their shapes are part
    /// of the key.
    fn replayable_step_with(
        &self,
        _key: StepKey,
        _meta: &BatchMeta,
        inputs: &[&HostTensor],
        step: impl FnOnce(&[Self::Tensor]) -> Result<Vec<Self::Tensor>>,
    ) -> Result<Vec<Self::Tensor>>
    where
        Self: Sized,
    {
        let inputs = inputs.iter().map(|t| self.upload(t)).collect::<Result<Vec<_>>>()?;
        step(&inputs)
    }

    /// Greedy ids of each `vocab`-wide row of `logits`: the first maximum, as
    /// `core::sampling::argmax`. GPU backends compute it on the device so that only the
    /// ids cross to the host.
    fn argmax_rows(&self, logits: &Self::Tensor, vocab: usize) -> Result<Vec<u32>> {
        let host = self.to_host(logits)?;
        Ok(host.chunks(vocab.max(1)).map(crate::core::sampling::argmax).collect())
    }

    /// The `k` largest logits of each `vocab`-wide row of `logits` with their log-softmax
    /// (temperature 1), largest first, ties to the lower id: `core::tree::top_log_probs` per
    /// row (what a draft tree expands). GPU backends compute it on the device so that only
    /// the `k` pairs of each row cross to the host.
    fn top_log_probs_rows(&self, logits: &Self::Tensor, vocab: usize, k: usize) -> Result<Vec<TopLogProbs>> {
        let host = self.to_host(logits)?;
        check_rows("top_log_probs_rows", host.len(), vocab)?;
        Ok(host.chunks(vocab).map(|row| crate::core::tree::top_log_probs(row, k)).collect())
    }

    /// A drafting head's input: for each token of the batch, its row of `table` (`hidden`
    /// wide), then its row of `features` (`[tokens, hidden]`), then a 1 (the head's bias
    /// as a weight column), then zeros up to `width` columns (a width the backend's matmul
    /// takes whole). GPU backends assemble it on the device.
    fn embed_concat(
        &self,
        table: &Self::Tensor,
        batch: &Self::Batch,
        features: &Self::Tensor,
        hidden: usize,
        width: usize,
    ) -> Result<Self::Tensor> {
        let emb = self.to_host(&self.embed(table, batch)?)?;
        let feats = self.to_host(features)?;
        check_concat(emb.len(), feats.len(), hidden, width)?;
        let n = emb.len() / hidden.max(1);
        let mut input = Vec::with_capacity(n * width);
        for (e, f) in emb.chunks(hidden).zip(feats.chunks(hidden)) {
            input.extend_from_slice(e);
            input.extend_from_slice(f);
            input.push(1.0);
            input.resize(input.len() + width - 2 * hidden - 1, 0.0);
        }
        self.upload(&HostTensor::new(vec![n, width], input))
    }

    /// One token per `vocab`-wide row of `logits`, each row sampled as its `RowSampling`
    /// says (`core::sampling::sample_row`: the same distribution, the same use of the row's
    /// uniform). GPU backends sample on the device so that only the ids cross to the host.
    fn sample_rows(&self, logits: &Self::Tensor, vocab: usize, rows: &[RowSampling]) -> Result<Vec<u32>> {
        let host = self.to_host(logits)?;
        check_sample_rows(host.len(), vocab, rows.len())?;
        Ok(host.chunks(vocab).zip(rows).map(|(l, r)| crate::core::sampling::sample_row(l, r)).collect())
    }
}

/// A row's likeliest tokens with their log-probabilities, likeliest first.
pub type TopLogProbs = Vec<(u32, f64)>;

/// `values` must be whole rows of `vocab`.
pub fn check_rows(op: &str, values: usize, vocab: usize) -> Result<()> {
    if vocab == 0 || !values.is_multiple_of(vocab) {
        return Err(BackendError::Invalid(format!("{op}: {values} logits are not rows of {vocab}")));
    }
    Ok(())
}

/// `Backend::embed_concat`: as many feature values as embedding values, rows of `hidden`,
/// and room for both and the 1 in `width`.
pub fn check_concat(embedded: usize, features: usize, hidden: usize, width: usize) -> Result<()> {
    if hidden == 0 || embedded != features || !embedded.is_multiple_of(hidden) || width < 2 * hidden + 1 {
        return Err(BackendError::Invalid(format!(
            "embed_concat: {embedded} embedding and {features} feature values in rows of {hidden}, {width} wide"
        )));
    }
    Ok(())
}

/// `Backend::sample_rows` needs one row of `vocab` logits per `RowSampling`.
pub fn check_sample_rows(logits: usize, vocab: usize, rows: usize) -> Result<()> {
    if vocab == 0 || logits != vocab * rows {
        return Err(BackendError::Invalid(format!("sample_rows: {logits} logits for {rows} rows of {vocab}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::core::sampling::{Sampler, SamplingParams};
    use crate::tensor::HostTensor;

    /// The default `sample_rows` picks what each request's own sampler picks, draw for draw.
    #[test]
    fn sample_rows_is_each_samplers_choice() {
        let cpu = CpuBackend::new();
        let logits: Vec<f32> = (0..3 * 50).map(|i| ((i * 37) % 23) as f32 * 0.3).collect();
        let t = cpu.upload(&HostTensor::new(vec![3, 50], logits.clone())).unwrap();
        let params = [
            SamplingParams { temperature: 0.9, top_k: 10, seed: Some(5), ..Default::default() },
            SamplingParams {
                temperature: 1.2,
                top_p: 0.8,
                repetition_penalty: 1.4,
                seed: Some(6),
                ..Default::default()
            },
            SamplingParams { repetition_penalty: 2.0, ..Default::default() },
        ];
        let history = [3u32, 7, 7, 20];
        for _ in 0..20 {
            let (mut a, mut b): (Vec<Sampler>, Vec<Sampler>) =
                params.iter().map(|p| (Sampler::new(p.clone()), Sampler::new(p.clone()))).unzip();
            let want: Vec<u32> = a.iter_mut().zip(logits.chunks(50)).map(|(s, l)| s.sample(l, &history)).collect();
            let rows: Vec<RowSampling> = b.iter_mut().map(|s| s.row(&history)).collect();
            assert_eq!(cpu.sample_rows(&t, 50, &rows).unwrap(), want);
        }
        let one = [RowSampling::greedy()];
        assert!(matches!(cpu.sample_rows(&t, 50, &one), Err(BackendError::Invalid(_))));
    }

    /// The k best of a row by sorting every (logit, id) pair, with its log-softmax in f64.
    fn sorted_top(row: &[f32], k: usize) -> Vec<(u32, f64)> {
        let lse = row.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        let mut ids: Vec<u32> = (0..row.len() as u32).collect();
        ids.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        ids.into_iter().take(k).map(|i| (i, row[i as usize] as f64 - lse)).collect()
    }

    /// The default `top_log_probs_rows`: each row's k largest logits, ties to the lower id,
    /// with their log-probabilities; rows that do not divide are refused.
    #[test]
    fn top_log_probs_rows_are_the_sorted_best_with_their_log_softmax() {
        let cpu = CpuBackend::new();
        // Few distinct values, so that ties cross the k-th place.
        let logits: Vec<f32> = (0..4 * 40).map(|i| ((i * 29) % 11) as f32 * 0.5 - 2.0).collect();
        let t = cpu.upload(&HostTensor::new(vec![4, 40], logits.clone())).unwrap();
        for k in [0, 1, 3, 7, 40, 50] {
            let got = cpu.top_log_probs_rows(&t, 40, k).unwrap();
            assert_eq!(got.len(), 4);
            for (row, g) in logits.chunks(40).zip(&got) {
                let want = sorted_top(row, k);
                assert_eq!(g.iter().map(|p| p.0).collect::<Vec<_>>(), want.iter().map(|p| p.0).collect::<Vec<_>>());
                assert!(g.iter().zip(&want).all(|(a, b)| (a.1 - b.1).abs() < 1e-9), "{g:?} vs {want:?}");
            }
        }
        assert!(matches!(cpu.top_log_probs_rows(&t, 30, 2), Err(BackendError::Invalid(_))));
        assert!(matches!(cpu.top_log_probs_rows(&t, 0, 2), Err(BackendError::Invalid(_))));
    }

    /// The default `embed_concat`: embedding, feature, 1, zeros; mismatched sizes refused.
    #[test]
    fn embed_concat_rows_are_embedding_feature_one_and_padding() {
        let cpu = CpuBackend::new();
        let (vocab, h, width) = (5, 3, 10);
        let table: Vec<f32> = (0..vocab * h).map(|i| i as f32).collect();
        let table = cpu.upload(&HostTensor::new(vec![vocab, h], table)).unwrap();
        let mut meta = BatchMeta::new(4);
        meta.push_row(&[4, 1], 0, &[0], 1);
        let batch = cpu.prepare(&meta).unwrap();
        let feats = cpu.upload(&HostTensor::new(vec![2, h], vec![-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])).unwrap();
        let got = cpu.to_host(&cpu.embed_concat(&table, &batch, &feats, h, width).unwrap()).unwrap();
        let want = [
            [12.0, 13.0, 14.0, -1.0, -2.0, -3.0, 1.0, 0.0, 0.0, 0.0],
            [3.0, 4.0, 5.0, -4.0, -5.0, -6.0, 1.0, 0.0, 0.0, 0.0],
        ];
        assert_eq!(got, want.concat());
        assert!(matches!(cpu.embed_concat(&table, &batch, &feats, h, 6), Err(BackendError::Invalid(_))));
        let short = cpu.upload(&HostTensor::new(vec![1, h], vec![0.0; h])).unwrap();
        assert!(matches!(cpu.embed_concat(&table, &batch, &short, h, width), Err(BackendError::Invalid(_))));
    }
}
