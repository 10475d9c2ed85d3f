//! The f32 reference backend. Batch-invariant: every token's result is computed by the
//! same sequence of operations whatever else is in the batch, so a row's logits never
//! depend on its neighbours (greedy speculative output then equals plain output exactly).

pub mod collective;
mod kernels;
pub mod kv;

use std::borrow::Cow;
use std::sync::Arc;

use rayon::prelude::*;

use crate::tensor::quant::{ActivationScheme, QuantFormat, QuantWeight};
use crate::tensor::random::normal_values;
use crate::tensor::{AttnShape, Backend, BackendError, BatchMeta, HostTensor, KvDtype, KvLayout, KvStorage, Result};
use crate::tensor::{AttnWindow, RankGroup, RowMeta, TreeMask, NO_BLOCK};
use collective::{CpuGroup, CpuRank};
use kernels::{dot, dot_tile, dot_tile_fp8, dot_tile_quant};
use kv::CpuKv;

/// Activations and most weights are dense f32; quantized matrices (GGML blocks, FP8) stay
/// as stored, and only `matmul` and `embed` read them; a KV cache only `attention` reads.
pub enum CpuTensor {
    Dense(HostTensor),
    Quant(QuantWeight),
    Kv(CpuKv),
}

impl CpuTensor {
    fn dense(&self) -> &HostTensor {
        match self {
            CpuTensor::Dense(t) => t,
            CpuTensor::Quant(_) => panic!("a quantized weight reached an op other than matmul or embed"),
            CpuTensor::Kv(_) => panic!("a KV cache reached an op other than attention"),
        }
    }

    fn dense_mut(&mut self) -> &mut HostTensor {
        match self {
            CpuTensor::Dense(t) => t,
            CpuTensor::Quant(_) => panic!("a quantized weight reached an op other than matmul or embed"),
            CpuTensor::Kv(_) => panic!("a KV cache reached an op other than attention"),
        }
    }

    /// The tensor as a KV cache of `shape`: a dense `[slots, kv_dim]` tensor (one a caller
    /// filled) becomes an f32 cache in place.
    fn kv_mut(&mut self, shape: AttnShape) -> Result<&mut CpuKv> {
        if let CpuTensor::Dense(t) = self {
            let layout = KvLayout {
                num_kv_heads: shape.num_kv_heads,
                head_dim: shape.head_dim,
                storage: KvStorage::F32,
                window: shape.window,
            };
            *self = CpuTensor::Kv(CpuKv::from_f32(std::mem::take(&mut t.data), &layout));
        }
        match self {
            CpuTensor::Kv(kv) => Ok(kv),
            _ => Err(BackendError::Invalid("attention: the cache is not a KV cache tensor".into())),
        }
    }

    /// The KV cache this tensor is, if it is one.
    pub fn kv(&self) -> Option<&CpuKv> {
        match self {
            CpuTensor::Kv(kv) => Some(kv),
            _ => None,
        }
    }

    /// `[rows, cols]` of the tensor seen as a matrix.
    fn dims(&self) -> (usize, usize) {
        match self {
            CpuTensor::Dense(t) => rows(t),
            CpuTensor::Quant(q) => (q.shape()[0], q.shape()[1]),
            CpuTensor::Kv(kv) => (kv.slots(), 0),
        }
    }
}

fn dense(shape: Vec<usize>, data: Vec<f32>) -> CpuTensor {
    CpuTensor::Dense(HostTensor::new(shape, data))
}

/// The CPU backend: the whole model, or one rank of a tensor-parallel group
/// (`CpuBackend::group`) whose `all_reduce` meets the other ranks' threads.
#[derive(Debug, Default, Clone)]
pub struct CpuBackend {
    rank: Option<CpuRank>,
}

/// Output rows handed to one worker; large enough to amortise scheduling.
const ROWS_PER_TASK: usize = 32;

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend { rank: None }
    }

    /// The ranks of a tensor-parallel group of `ranks` (each to run on a thread of its
    /// own), and the group, which stops them all when one fails.
    pub fn group(ranks: usize) -> (Arc<CpuGroup>, Vec<CpuBackend>) {
        let (group, handles) = CpuGroup::new(ranks);
        (group, handles.into_iter().map(|rank| CpuBackend { rank: Some(rank) }).collect())
    }
}

fn rows(t: &HostTensor) -> (usize, usize) {
    let cols = *t.shape.last().unwrap_or(&1);
    (t.numel() / cols.max(1), cols)
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Batch = BatchMeta;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, t: &HostTensor) -> Result<CpuTensor> {
        Ok(CpuTensor::Dense(t.clone()))
    }

    fn upload_quantized(&self, w: &QuantWeight) -> Result<Option<CpuTensor>> {
        Ok(Some(CpuTensor::Quant(w.clone())))
    }

    fn random(&self, shape: &[usize], std: f32, seed: u64) -> Result<CpuTensor> {
        Ok(dense(shape.to_vec(), normal_values(shape.iter().product(), std, seed)))
    }

    /// Every storage: `auto` is the f32 reference, `bf16` and `fp8` are kept as such.
    fn kv_storage(&self, dtype: KvDtype) -> Result<KvStorage> {
        Ok(match dtype {
            KvDtype::Auto => KvStorage::F32,
            KvDtype::Bf16 => KvStorage::Bf16,
            KvDtype::Fp8 => KvStorage::Fp8,
        })
    }

    fn kv_cache(&self, slots: usize, layout: &KvLayout) -> Result<CpuTensor> {
        Ok(CpuTensor::Kv(CpuKv::zeroed(slots, layout)))
    }

    fn prepare(&self, meta: &BatchMeta) -> Result<BatchMeta> {
        Ok(meta.clone())
    }

    fn embed(&self, table: &CpuTensor, batch: &BatchMeta) -> Result<CpuTensor> {
        let (vocab, hidden) = table.dims();
        let mut data = Vec::with_capacity(batch.tokens.len() * hidden);
        for &t in &batch.tokens {
            let t = t as usize;
            if t >= vocab {
                return Err(BackendError::Invalid(format!("token id {t} out of vocabulary ({vocab})")));
            }
            match table {
                CpuTensor::Dense(d) => data.extend_from_slice(&d.data[t * hidden..(t + 1) * hidden]),
                CpuTensor::Quant(q) => data.extend(q.dequantize_row(t)),
                CpuTensor::Kv(_) => return Err(BackendError::Invalid("embed: a KV cache is no table".into())),
            }
        }
        Ok(dense(vec![batch.tokens.len(), hidden], data))
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        let mut out = x.dense().clone();
        let d = rows(&out).1;
        out.data.chunks_mut(d).for_each(|row| normalize(row, &weight.dense().data, eps));
        Ok(CpuTensor::Dense(out))
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        delta: &CpuTensor,
        weight: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        residual.dense_mut().data.iter_mut().zip(&delta.dense().data).for_each(|(r, d)| *r += d);
        self.rms_norm(residual, weight, eps)
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuTensor) -> Result<CpuTensor> {
        if let CpuTensor::Kv(_) = w {
            return Err(BackendError::Invalid("matmul: a KV cache is no weight".into()));
        }
        let x = quantize_input(x.dense(), w);
        let (n, k) = rows(&x);
        let (m, wk) = w.dims();
        if k != wk {
            return Err(BackendError::Invalid(format!("matmul: x has {k} columns, weight {wk}")));
        }
        if n == 0 || m == 0 {
            // Nothing to compute (and the bands below would be split into chunks of 0).
            return Ok(dense(vec![n, m], vec![]));
        }
        let mut out = vec![0f32; n * m];
        // Each task owns a band of output columns (weight rows) for every token; the
        // band is written back after, so tasks never share memory.
        let bands: Vec<Vec<f32>> = (0..m.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .map(|band| {
                let lo = band * ROWS_PER_TASK;
                let hi = (lo + ROWS_PER_TASK).min(m);
                let mut vals = vec![0f32; (hi - lo) * n];
                for r in lo..hi {
                    let dst = &mut vals[(r - lo) * n..(r - lo + 1) * n];
                    let row = match w {
                        CpuTensor::Dense(w) => WeightRow::Dense(&w.data[r * k..(r + 1) * k]),
                        CpuTensor::Quant(QuantWeight::Blocks(b)) => WeightRow::Blocks(b.format, b.row(r)),
                        CpuTensor::Quant(QuantWeight::Fp8(f)) => WeightRow::Fp8(f.row(r), f.scales[r]),
                        CpuTensor::Kv(_) => unreachable!("refused above"),
                    };
                    matvec_row(row, &x.data, k, dst);
                }
                vals
            })
            .collect();
        for (band, vals) in bands.iter().enumerate() {
            let lo = band * ROWS_PER_TASK;
            for (i, chunk) in vals.chunks(n).enumerate() {
                for (t, v) in chunk.iter().enumerate() {
                    out[t * m + lo + i] = *v;
                }
            }
        }
        Ok(dense(vec![n, m], out))
    }

    fn rope(&self, x: &mut CpuTensor, batch: &BatchMeta, inv_freq: &CpuTensor, head_dim: usize) -> Result<()> {
        let (x, inv_freq) = (x.dense_mut(), inv_freq.dense());
        let width = rows(x).1;
        let half = head_dim / 2;
        for (row, &pos) in x.data.chunks_mut(width).zip(&batch.positions) {
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .data
                .iter()
                .map(|&f| {
                    let a = pos as f64 * f as f64;
                    (a.cos() as f32, a.sin() as f32)
                })
                .unzip();
            for head in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        k_cache: &mut CpuTensor,
        v_cache: &mut CpuTensor,
        batch: &BatchMeta,
        shape: AttnShape,
    ) -> Result<CpuTensor> {
        let (q, k, v) = (q.dense(), k.dense(), v.dense());
        let kv_dim = shape.num_kv_heads * shape.head_dim;
        for (cache, new) in [(&mut *k_cache, k), (&mut *v_cache, v)] {
            let cache = cache.kv_mut(shape)?;
            for (i, &slot) in batch.slots.iter().enumerate() {
                if slot as usize >= cache.slots() {
                    return Err(BackendError::Invalid(format!("attention: slot {slot} outside the cache")));
                }
                cache.write(slot as usize, &new.data[i * kv_dim..(i + 1) * kv_dim]);
            }
        }
        let caches = (&*k_cache.kv_mut(shape)?, &*v_cache.kv_mut(shape)?);
        let slots: Vec<Vec<usize>> =
            (0..batch.num_tokens()).map(|t| read_slots(batch, t, shape, caches.0.slots())).collect::<Result<_>>()?;
        let q_dim = shape.num_heads * shape.head_dim;
        let mut out = vec![0f32; batch.num_tokens() * q_dim];
        out.par_chunks_mut(q_dim).zip(&slots).enumerate().for_each(|(t, (dst, slots))| {
            attend_token(&q.data[t * q_dim..(t + 1) * q_dim], caches, slots, shape, dst);
        });
        Ok(dense(vec![batch.num_tokens(), q_dim], out))
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        let (gate, up) = (gate.dense(), up.dense());
        let data = gate.data.iter().zip(&up.data).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
        Ok(dense(gate.shape.clone(), data))
    }

    fn kind(&self) -> &'static str {
        "cpu"
    }

    fn warms_up(&self) -> bool {
        false
    }

    /// Ranks are threads of this process, meeting in `CpuGroup`'s all-reduce.
    fn tensor_parallel(&self, ranks: usize) -> Result<(Arc<dyn RankGroup>, Vec<CpuBackend>)> {
        if ranks == 0 {
            return Err(BackendError::Invalid("tensor parallelism needs at least one rank".into()));
        }
        let (group, backends) = CpuBackend::group(ranks);
        Ok((group, backends))
    }

    fn all_reduce(&self, x: &mut CpuTensor) -> Result<()> {
        match &self.rank {
            None => Ok(()),
            Some(r) => r.group.all_reduce(r.index, &mut x.dense_mut().data),
        }
    }

    fn duplicate(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(CpuTensor::Dense(x.dense().clone()))
    }

    fn gather_logit_rows(&self, x: &CpuTensor, batch: &BatchMeta) -> Result<CpuTensor> {
        let x = x.dense();
        let d = rows(x).1;
        let data = batch
            .logits_for
            .iter()
            .flat_map(|&t| x.data[t as usize * d..(t as usize + 1) * d].iter().copied())
            .collect();
        Ok(dense(vec![batch.logits_for.len(), d], data))
    }

    fn copy_kv(&self, cache: &mut CpuTensor, moves: &[(u32, u32)]) -> Result<()> {
        let CpuTensor::Kv(kv) = cache else {
            return Err(BackendError::Invalid("copy_kv: the cache is not a KV cache tensor".into()));
        };
        let slots = kv.slots() as u32;
        if let Some(&(from, to)) = moves.iter().find(|&&(f, t)| f >= slots || t >= slots) {
            return Err(BackendError::Invalid(format!("copy_kv: slot {from} or {to} outside the cache ({slots})")));
        }
        moves.iter().for_each(|&(from, to)| kv.copy(from as usize, to as usize));
        Ok(())
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        match x {
            CpuTensor::Kv(kv) => Ok(kv.to_f32()),
            x => Ok(x.dense().data.clone()),
        }
    }
}

/// The matmul's input as an FP8 weight's activation scheme has it: each token's row
/// quantized (dynamic per token, or with the static input scale), or `x` itself.
fn quantize_input<'a>(x: &'a HostTensor, w: &CpuTensor) -> Cow<'a, HostTensor> {
    let scheme = match w {
        CpuTensor::Quant(QuantWeight::Fp8(f)) => f.activations,
        _ => ActivationScheme::WeightOnly,
    };
    if scheme == ActivationScheme::WeightOnly {
        return Cow::Borrowed(x);
    }
    let mut q = x.clone();
    let k = rows(x).1.max(1);
    q.data.par_chunks_mut(k).for_each(|row| scheme.apply(row));
    Cow::Owned(q)
}

/// One row of a weight matrix: dense, GGML blocks, or E4M3 codes with the row's scale.
#[derive(Clone, Copy)]
enum WeightRow<'a> {
    Dense(&'a [f32]),
    Blocks(QuantFormat, &'a [u8]),
    Fp8(&'a [u8], f32),
}

impl WeightRow<'_> {
    fn dots<const T: usize>(self, xs: [&[f32]; T]) -> [f32; T] {
        match self {
            WeightRow::Dense(w) => dot_tile(w, xs),
            WeightRow::Blocks(format, row) => dot_tile_quant(format, row, xs),
            // The row's scale applies once to the whole dot: Σ (q·s)·x = s · Σ q·x.
            WeightRow::Fp8(codes, scale) => dot_tile_fp8(codes, xs).map(|d| d * scale),
        }
    }
}

/// `dst[t] = w · x[t]` for every token, four tokens per pass over the weight row.
fn matvec_row(w: WeightRow, x: &[f32], k: usize, dst: &mut [f32]) {
    let tok = |t: usize| &x[t * k..(t + 1) * k];
    let mut t = 0;
    while t + 4 <= dst.len() {
        dst[t..t + 4].copy_from_slice(&w.dots::<4>([tok(t), tok(t + 1), tok(t + 2), tok(t + 3)]));
        t += 4;
    }
    for (t, d) in dst.iter_mut().enumerate().skip(t) {
        *d = w.dots::<1>([tok(t)])[0];
    }
}

fn normalize(row: &mut [f32], weight: &[f32], eps: f32) {
    let mean_sq = dot(row, row) / row.len() as f32;
    let scale = 1.0 / (mean_sq + eps).sqrt();
    row.iter_mut().zip(weight).for_each(|(x, w)| *x = *x * scale * w);
}

/// The cache slots query token `t` reads: its row's positions `0..=position`, or those
/// its window keeps. A position whose block is missing (or outside the cache) is an error.
fn read_slots(batch: &BatchMeta, t: usize, shape: AttnShape, cache_slots: usize) -> Result<Vec<usize>> {
    let row = row_of(batch, t)?;
    let pos = batch.positions[t] as usize;
    let bs = batch.block_size as usize;
    let positions: Box<dyn Iterator<Item = usize>> = match (&row.tree, shape.window) {
        (Some(tree), window) => Box::new(tree_positions(tree, t as u32 - row.start, pos, window).into_iter()),
        (None, None) => Box::new(0..=pos),
        (None, Some(w)) => Box::new((0..w.sinks().min(pos + 1)).chain(w.first_recent(pos).max(w.sinks())..=pos)),
    };
    positions
        .map(|p| {
            let block = row.block_table.get(p / bs).copied().filter(|&b| b != NO_BLOCK);
            let slot = block.map(|b| b as usize * bs + p % bs).filter(|&s| s < cache_slots);
            slot.ok_or_else(|| BackendError::Invalid(format!("attention: position {p} has no block in the cache")))
        })
        .collect()
}

/// The storage positions the `i`-th token of a tree row reads, in position order: the
/// prefix, then its ancestors and itself (each at `pos` less its distance to the token),
/// those the window keeps.
fn tree_positions(tree: &TreeMask, i: u32, pos: usize, window: Option<AttnWindow>) -> Vec<usize> {
    let keep = |p: usize| window.is_none_or(|w| w.attends(pos, p));
    let path = tree.path(tree.first + i);
    let prefix = (0..tree.prefix as usize).filter(|&p| keep(p));
    let depth = path.len();
    let nodes = path.iter().enumerate().filter(|&(d, _)| keep(pos + d + 1 - depth));
    prefix.chain(nodes.map(|(_, &n)| (tree.prefix + n) as usize)).collect()
}

fn row_of(batch: &BatchMeta, t: usize) -> Result<&RowMeta> {
    let t = t as u32;
    let row = batch.rows.iter().find(|r| (r.start..r.start + r.len).contains(&t));
    row.ok_or_else(|| BackendError::Invalid(format!("attention: token {t} is in no row")))
}

/// One query token, all heads: softmax(q·kᵀ/√d)·v over the given cache slots.
fn attend_token(q: &[f32], (kc, vc): (&CpuKv, &CpuKv), slots: &[usize], s: AttnShape, out: &mut [f32]) {
    let hd = s.head_dim;
    let group = s.num_heads / s.num_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0f32; slots.len()];
    let mut scratch = vec![0f32; hd];
    for h in 0..s.num_heads {
        let kv_head = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        for (sc, &slot) in scores.iter_mut().zip(slots) {
            *sc = dot(qh, kc.head(slot, kv_head, &mut scratch)) * scale;
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        let oh = &mut out[h * hd..(h + 1) * hd];
        oh.fill(0.0);
        for (sc, &slot) in scores.iter().zip(slots) {
            let p = sc / sum;
            let vh = vc.head(slot, kv_head, &mut scratch);
            kernels::axpy(p, vh, oh);
        }
    }
}
