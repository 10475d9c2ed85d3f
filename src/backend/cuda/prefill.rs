//! Host side of kernels/prefill.cu: tensor-core attention for the long causal rows of a
//! step (prefill chunks), next to the split kernel that keeps every other row.
//!
//! Not yet the default: on an H100 (bench/NOTES.md, run 47) it prefills 21x faster than the
//! split kernel and matches the CPU with bf16 caches, but not with FP8 caches at 8 query
//! heads per KV head. `SPECULA_PREFILL=tiled` turns it on (the parity script does, to
//! compare it with the CPU); otherwise every row keeps the split kernel.
//!
//! Which rows: causal rows of more than `PREFILL_ABOVE` tokens. Decode and verification
//! must stay bit for bit equal to each other, which only the split kernel guarantees (a
//! token's result there depends on its position alone); a verification row holds at most
//! `MAX_DRAFT_LEN + 1` tokens and a captured graph's step at most `MATMUL_MAX_TOKENS`, so
//! neither ever reaches this kernel. A row past `MATMUL_MAX_TOKENS` tokens makes a step on
//! which the bf16 matmul already leaves the batch-invariant kernel for cuBLAS: prefill was
//! not bitwise equal to decode before either. Tree rows always keep the split kernel.
//!
//! A step with long rows runs, per layer:
//! ```text
//!  split + merge  the tokens up to the last one of a short row (none: skipped), a long
//!                 row's among them at a stand-in position 0 (one split each); their
//!                 outputs are overwritten below
//!  kv_store       the long rows' keys (rotated) and values into the cache
//!  prefill        the long rows' tokens, every position read from the cache
//! ```
//! The split kernel also stores each token's key and value, the long rows' rotated at the
//! stand-in position: kv_store runs after it and writes the right ones before anything
//! reads them.

use super::batch::{splits_at, CudaBatch, ATTN_SPLIT};
use super::device::{launch, Device, DeviceBuf};
use super::{CudaBackend, CudaTensor, MATMUL_MAX_TOKENS};
use crate::tensor::{AttnShape, BackendError, BatchMeta, Result};

/// Whether `SPECULA_PREFILL=tiled` asks for the prefill kernel (`split`, unset: not).
pub fn tiled_from_env() -> bool {
    match std::env::var("SPECULA_PREFILL").as_deref() {
        Ok("tiled") => true,
        Ok("split") | Err(_) => false,
        Ok(other) => {
            tracing::warn!("SPECULA_PREFILL={other:?} is neither tiled nor split: using split");
            false
        }
    }
}

impl CudaBackend {
    /// Whether long prefill rows go to the prefill kernel.
    pub fn tiled_prefill(&self) -> bool {
        self.tiled_prefill.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends long prefill rows to the prefill kernel or keeps them on the split kernel
    /// (parity turns it on). Steps already prepared keep their plan.
    pub fn set_tiled_prefill(&self, on: bool) {
        self.tiled_prefill.store(on, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Rows of more tokens than this go to the prefill kernel (see the module's notes).
pub const PREFILL_ABOVE: usize = MATMUL_MAX_TOKENS;
const _: () = assert!(crate::spec::MAX_DRAFT_LEN < PREFILL_ABOVE, "a verification row must keep the split kernel");

/// Query rows (token, query head) per block: PF_ROWS in kernels/prefill.cu.
pub const ROWS: usize = 64;
/// Threads per block: PF_THREADS.
const THREADS: u32 = 128;

/// The long rows of a step and what the split kernel needs without them.
pub struct PrefillPlan {
    /// `| split positions: n | (first token, tokens) per long row |`
    buf: DeviceBuf,
    tokens: usize,
    pub(crate) rows: LongRows,
    /// Splits the other rows' tokens need (the split kernel's grid).
    pub(crate) max_splits: usize,
    /// Tokens the split kernel takes: up to the last one of a row that is not long (the
    /// runtime puts running rows first), 0 when every row is long.
    pub(crate) split_tokens: usize,
}

/// (first token, tokens) of each long row.
type LongRows = Vec<(u32, u32)>;

/// Whether a row goes to the prefill kernel.
fn is_long(row: &crate::tensor::RowMeta) -> bool {
    row.tree.is_none() && row.len as usize > PREFILL_ABOVE
}

/// The split positions (the long rows' tokens at 0) and long rows of `meta`, host side.
pub(crate) fn plan_host(meta: &BatchMeta) -> Option<(Vec<u32>, LongRows)> {
    let rows: LongRows = meta.rows.iter().filter(|r| is_long(r)).map(|r| (r.start, r.len)).collect();
    if rows.is_empty() {
        return None;
    }
    let mut positions = meta.positions.clone();
    for &(start, len) in &rows {
        positions[start as usize..(start + len) as usize].fill(0);
    }
    Some((positions, rows))
}

/// The plan for `meta` on the device, None when no row is long.
pub(crate) fn plan(dev: &Device, meta: &BatchMeta) -> Result<Option<PrefillPlan>> {
    let Some((positions, rows)) = plan_host(meta) else { return Ok(None) };
    let short = || meta.rows.iter().filter(|r| !is_long(r)).flat_map(|r| r.start..r.start + r.len);
    let max_splits = short().map(|t| splits_at(meta.positions[t as usize] as usize, ATTN_SPLIT)).max().unwrap_or(1);
    let split_tokens = short().max().map_or(0, |t| t as usize + 1);
    let mut packed = positions;
    packed.extend(rows.iter().flat_map(|&(s, l)| [s, l]));
    let buf = dev.alloc(4 * packed.len())?;
    dev.htod(buf.ptr(), &packed)?;
    let tokens = meta.tokens.len();
    Ok(Some(PrefillPlan { buf, tokens, rows, max_splits, split_tokens }))
}

impl PrefillPlan {
    /// Per token, the position the split kernel sees: 0 for a long row's.
    pub fn split_positions(&self) -> u64 {
        self.buf.ptr()
    }
    fn rows_ptr(&self) -> u64 {
        self.buf.ptr() + 4 * self.tokens as u64
    }
    /// Blocks per KV head of the prefill kernel: `ROWS / group` tokens a tile.
    fn tiles(&self, group: usize) -> usize {
        let tok = ROWS / group;
        self.rows.iter().map(|r| (r.1 as usize).div_ceil(tok)).sum()
    }
}

/// The name of the prefill kernel for a head size, window and KV storage.
pub fn prefill_name(head_dim: usize, windowed: bool, fp8: bool) -> String {
    let fp8 = if fp8 { "_fp8" } else { "" };
    let win = if windowed { "_win" } else { "" };
    format!("prefill{fp8}{win}_hd{head_dim}")
}

/// Every prefill kernel name, in `prefill_index` order.
pub fn prefill_names() -> Vec<String> {
    (0..8).map(|i| prefill_name(if i & 1 == 0 { 64 } else { 128 }, i & 2 != 0, i & 4 != 0)).collect()
}

pub fn prefill_index(head_dim: usize, windowed: bool, fp8: bool) -> usize {
    usize::from(head_dim == 128) | usize::from(windowed) << 1 | usize::from(fp8) << 2
}

/// Every kv_store kernel name, in `store_index` order.
pub fn store_names() -> Vec<String> {
    (0..4)
        .map(|i| format!("kv_store{}_hd{}", if i & 2 != 0 { "_fp8" } else { "" }, if i & 1 == 0 { 64 } else { 128 }))
        .collect()
}

pub fn store_index(head_dim: usize, fp8: bool) -> usize {
    usize::from(head_dim == 128) | usize::from(fp8) << 1
}

impl CudaBackend {
    /// The long rows' keys and values into the caches, then their attention into `out`
    /// (kernels/prefill.cu). q, k and v are unrotated when `inv_freq` is given.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prefill(
        &self,
        plan: &PrefillPlan,
        (q, k, v): (&CudaTensor, &CudaTensor, &CudaTensor),
        k_cache: &mut CudaTensor,
        v_cache: &mut CudaTensor,
        batch: &CudaBatch,
        s: AttnShape,
        inv_freq: Option<&CudaTensor>,
        out: &CudaTensor,
    ) -> Result<()> {
        let fp8 = k_cache.dtype == super::DType::Fp8;
        let group = s.num_heads / s.num_kv_heads;
        if !matches!(s.head_dim, 64 | 128) || !(1..=ROWS).contains(&group) {
            return Err(BackendError::Invalid(format!("prefill: head_dim {} with {group} query heads", s.head_dim)));
        }
        let freq = inv_freq.map_or(0, |f| f.ptr());
        let long: usize = plan.rows.iter().map(|r| r.1 as usize).sum();
        let (n_rows, kv_heads) = (plan.rows.len() as i32, s.num_kv_heads as i32);
        let store = &self.kernels.kv_store[store_index(s.head_dim, fp8)];
        launch!(self.dev, store, (long as u32, kv_heads as u32, 1), (32, 1, 1);
            k.ptr(), v.ptr(), k_cache.ptr(), v_cache.ptr(), k_cache.scales_ptr(), v_cache.scales_ptr(),
            batch.positions(), batch.slots(), plan.rows_ptr(), n_rows, kv_heads, freq)?;
        let kernel = &self.kernels.prefill[prefill_index(s.head_dim, s.window.is_some(), fp8)];
        launch!(self.dev, kernel, (plan.tiles(group) as u32, kv_heads as u32, 1), (THREADS, 1, 1);
            q.ptr(), k_cache.ptr(), v_cache.ptr(), k_cache.scales_ptr(), v_cache.scales_ptr(),
            batch.positions(), batch.token_row(), batch.block_tables(), batch.max_blocks as i32,
            batch.meta.block_size as i32, plan.rows_ptr(), n_rows, s.num_heads as i32, kv_heads, freq,
            s.window.map_or(0, |w| w.size() as i32), s.window.map_or(0, |w| w.sinks() as i32), out.ptr())
    }
}

#[cfg(test)]
#[path = "prefill_tests.rs"]
mod tests;
