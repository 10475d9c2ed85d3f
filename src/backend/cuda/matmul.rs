//! The host side of kernels/matmul.cu: the tensor-core matmul that serves every step of 1 to
//! 64 tokens (decode, verification, small batches), and the split of K chosen per weight
//! shape. Longer steps (prefill) stream the weights once per 64 tokens, or go to cuBLAS
//! when the weights are bf16.

use super::device::{launch, Device, DeviceBuf};
use super::kernels::Kernels;
use super::{CudaBackend, CudaTensor, DType};
use crate::backend::{BackendError, Result};

/// Most tokens one launch of the tensor-core matmul takes (8 mma column tiles of 8).
pub const MATMUL_MAX_TOKENS: usize = 64;

/// The knobs of the tensor-core matmul that trade registers, occupancy and memory access
/// patterns; the kernel's `MM_*` macros and the host's grid must agree, so both come from
/// here. Changing them changes the K split, hence the bits, but never batch invariance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulTuning {
    /// Warps per block (MM_WARPS).
    pub warps: usize,
    /// k-blocks of weights in flight per warp (MM_UNROLL).
    pub unroll: usize,
    /// 16-row units per warp for steps of up to 8 tokens (MM_SMALL_UNITS).
    pub small_units: usize,
    /// Weight loads ask L2 for the whole 256-byte segment (MM_L2_256).
    pub l2_256: bool,
    /// The next k-block's activations are loaded before this one's mma (MM_X_AHEAD).
    pub x_ahead: bool,
    /// Warps per SM the K split fills: the decode kernels' blocks are sized so that
    /// `warps_per_sm / warps` of them fit on an SM at once (MM_MIN_BLOCKS).
    pub warps_per_sm: usize,
}

/// The best of the settings measured on an H200 (bench/NOTES.md, runs 24–26).
impl Default for MatmulTuning {
    fn default() -> Self {
        MatmulTuning { warps: 8, unroll: 4, small_units: 2, l2_256: true, x_ahead: false, warps_per_sm: 16 }
    }
}

impl MatmulTuning {
    /// The NVRTC options that build kernels/matmul.cu for these settings.
    pub fn defines(&self) -> Vec<String> {
        vec![
            format!("-DMM_WARPS={}", self.warps),
            format!("-DMM_UNROLL={}", self.unroll),
            format!("-DMM_SMALL_UNITS={}", self.small_units),
            format!("-DMM_L2_256={}", self.l2_256 as u8),
            format!("-DMM_X_AHEAD={}", self.x_ahead as u8),
            format!("-DMM_MIN_BLOCKS={}", self.blocks_per_sm()),
        ]
    }

    /// Blocks of the decode kernels resident on one SM: the slots a split launch fills.
    pub fn blocks_per_sm(&self) -> usize {
        (self.warps_per_sm / self.warps).max(1)
    }
}

/// Fewest bytes of each row a K slice keeps.
const MIN_SLICE_BYTES: usize = 256;
const MAX_SLICES: usize = 32;
/// Ticket counters in the workspace: one per row block of a split launch.
const TICKETS: usize = 8192;

/// What the kernel does with each result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// `y = W x`
    Store,
    /// `y += W x` (a residual add)
    Add,
    /// Two weights, gate and up: `y = silu(gate x) * (up x)`, bf16.
    SwiGlu,
}

/// Where split-K blocks leave their partial sums; one per backend (per stream), allocated
/// once so that captured graphs keep its address.
pub struct SplitWorkspace {
    partial: DeviceBuf,
    /// Floats `partial` holds.
    capacity: usize,
    tickets: DeviceBuf,
    sms: usize,
}

impl SplitWorkspace {
    pub fn new(dev: &Device, sms: usize, tuning: &MatmulTuning) -> Result<Self> {
        // A split launch has at most one decode-sized block per slot and slice, each with at
        // most warps x 16 rows x the units per warp (two weights' worth with SwiGLU).
        let rows_per_block = tuning.warps * 16 * tuning.small_units.max(2);
        let capacity = sms * tuning.blocks_per_sm() * rows_per_block * MATMUL_MAX_TOKENS;
        let partial = dev.alloc(4 * capacity)?;
        let tickets = dev.alloc(4 * TICKETS)?;
        dev.memset_zero(tickets.ptr(), tickets.bytes())?;
        Ok(SplitWorkspace { partial, capacity, tickets, sms })
    }
}

/// The K slices for a launch of `row_blocks` blocks (their size at one token) over rows of
/// `row_bytes` bytes: as many as fill the GPU's `slots` (SMs x resident blocks) without a
/// second wave, so that every SM streams the same share of the weights; never fewer than
/// 256 bytes of each row per slice. A function of the weights' shape only, so every token
/// count sums in the same order.
pub fn k_slices(row_blocks: usize, row_bytes: usize, slots: usize) -> usize {
    (slots / row_blocks.max(1)).min(MAX_SLICES).min(row_bytes / MIN_SLICE_BYTES).max(1)
}

/// Units of 16 rows each warp takes (R in kernels/matmul.cu, by kernel).
fn units_per_warp(group: usize, epi: Epilogue, tuning: &MatmulTuning) -> usize {
    if epi == Epilogue::SwiGlu || group > 0 {
        1
    } else {
        tuning.small_units
    }
}

/// Whether an FP8 matrix `[rows, cols]` can be stored as FP8 for the tensor-core matmul.
pub fn fp8_fits([rows, cols]: [usize; 2]) -> bool {
    rows.is_multiple_of(16) && cols.is_multiple_of(64)
}

/// Whether `w` can go through the tensor-core matmul with input width `k`.
pub fn fits(w: &CudaTensor, k: usize) -> bool {
    let (m, wk) = w.dims();
    let kblock = if w.dtype == DType::Fp8 { 64 } else { 32 };
    wk == k && m.is_multiple_of(16) && k.is_multiple_of(kblock) && matches!(w.dtype, DType::Bf16 | DType::Fp8)
}

impl CudaBackend {
    /// `outs[i] = x · ws[i]ᵀ` (`Add`: `+=`) for up to three weights of one type sharing `x`,
    /// or `outs[0] = silu(x · ws[0]ᵀ) * (x · ws[1]ᵀ)` (`SwiGlu`), any number of tokens: one
    /// launch per 64. Every weight must `fits`.
    pub(super) fn tc_matmul(
        &self,
        x: &CudaTensor,
        ws: &[&CudaTensor],
        outs: &[&CudaTensor],
        epi: Epilogue,
    ) -> Result<()> {
        let (n, k) = x.dims();
        let fp8 = ws[0].dtype == DType::Fp8;
        if ws.len() > 3 || ws.iter().any(|w| !fits(w, k) || (w.dtype == DType::Fp8) != fp8) {
            return Err(BackendError::Invalid(format!("tensor-core matmul: unsupported weights for input width {k}")));
        }
        let x = self.bf16_input(x)?;
        let ms: Vec<usize> = ws.iter().map(|w| w.dims().0).collect();
        let total_rows: usize = if epi == Epilogue::SwiGlu { 2 * ms[0] } else { ms.iter().sum() };
        let row_bytes = k * if fp8 { 1 } else { 2 };
        let ws_ = &self.split;
        let tuning = &self.tuning;
        let units = if epi == Epilogue::SwiGlu { ms[0] / 16 } else { total_rows / 16 };
        let decode_blocks = units.div_ceil(tuning.warps * units_per_warp(0, epi, tuning));
        let slices = k_slices(decode_blocks, row_bytes, ws_.sms * tuning.blocks_per_sm());
        let (out_elem, kernels) = (if epi == Epilogue::SwiGlu { 2 } else { 4 }, &self.kernels);
        let mut t = 0;
        while t < n {
            let chunk = (n - t).min(MATMUL_MAX_TOKENS);
            let group = token_group(chunk);
            let blocks = units.div_ceil(tuning.warps * units_per_warp(group, epi, tuning));
            if slices > 1 && (blocks > TICKETS || slices * chunk * total_rows > ws_.capacity) {
                return Err(BackendError::Invalid("tensor-core matmul: split workspace too small".into()));
            }
            let f = kernel(kernels, fp8, epi, group);
            let w = |i: usize| ws.get(i).map_or(0, |w| w.ptr());
            let s = |i: usize| ws.get(i).map_or(0, |w| w.scales_ptr());
            let y = |i: usize| outs.get(i).map_or(0, |o| o.ptr() + (t * o.dims().1 * out_elem) as u64);
            let m = |i: usize| ms.get(i).map_or(0, |&m| m as i32);
            let xp = x.ptr() + (t * k * 2) as u64;
            launch!(self.dev, f, (blocks as u32, slices as u32, 1), ((tuning.warps * 32) as u32, 1, 1);
                w(0), w(1), w(2), s(0), s(1), s(2), y(0), y(1), y(2), m(0), m(1), m(2), k as i32, xp,
                chunk as i32, (epi == Epilogue::Add) as i32, ws_.partial.ptr(), ws_.tickets.ptr())?;
            t += chunk;
        }
        Ok(())
    }

    /// `x` as bf16 (the tensor cores' input): itself, or converted from f32.
    pub(super) fn bf16_input<'a>(&self, x: &'a CudaTensor) -> Result<std::borrow::Cow<'a, CudaTensor>> {
        match x.dtype {
            DType::Bf16 => Ok(std::borrow::Cow::Borrowed(x)),
            DType::F32 => Ok(std::borrow::Cow::Owned(self.to_bf16(x)?)),
            DType::Fp8 => Err(BackendError::Invalid("matmul input: FP8 activations are not supported".into())),
        }
    }
}

/// Which of a family's kernels serves `tokens` (1 to 64): 8, 16, 32 or 64 tokens at most.
pub fn token_group(tokens: usize) -> usize {
    match tokens {
        0..=8 => 0,
        9..=16 => 1,
        17..=32 => 2,
        _ => 3,
    }
}

fn kernel(k: &Kernels, fp8: bool, epi: Epilogue, group: usize) -> &cudarc::driver::CudaFunction {
    match (fp8, epi == Epilogue::SwiGlu) {
        (false, false) => &k.mm_bf16[group],
        (true, false) => &k.mm_fp8[group],
        (false, true) => &k.swiglu_bf16[group],
        (true, true) => &k.swiglu_fp8[group],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_splits_fill_the_gpu_in_one_wave_and_keep_whole_kblocks() {
        // 8B shapes on 132 SMs x 2 blocks: q/k/v (24 blocks) and o (16) split, gate/up (112
        // SwiGLU blocks) in two, none past the 264 slots.
        assert_eq!(k_slices(24, 8192, 264), 11);
        assert_eq!(k_slices(16, 8192, 264), 16);
        assert_eq!(k_slices(112, 8192, 264), 2);
        assert_eq!(k_slices(300, 8192, 264), 1);
        // Short rows keep at least 256 bytes per slice.
        assert_eq!(k_slices(4, 1152, 264), 4);
        assert_eq!(k_slices(4, 192, 264), 1);
    }

    #[test]
    fn token_groups_cover_one_to_sixty_four() {
        let groups: Vec<usize> = [1, 8, 9, 16, 17, 32, 33, 64].map(token_group).to_vec();
        assert_eq!(groups, vec![0, 0, 1, 1, 2, 2, 3, 3]);
    }
}
