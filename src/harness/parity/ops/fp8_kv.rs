//! Attention over an FP8 KV cache on both backends: the CPU fills the cache (its writes
//! quantize), the GPU gets the same bytes; the outputs must agree as with bf16, and the
//! codes and scales the step writes must be the CPU's, bit for bit.

use rand::Rng;

use super::{attention_meta, f32_tensor, Ctx};
use crate::backend::cpu::kv::CpuKv;
use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::backend::cuda::CudaBackend;
use crate::backend::{AttnShape, Backend, Result};
use crate::harness::parity::OpRow;
use crate::model::Preset;
use crate::tensor::{HostTensor, KvLayout, KvStorage};

/// Which half of the cache a row is drawn for.
#[derive(Clone, Copy)]
pub(super) enum Part {
    Keys,
    Values,
}

impl Part {
    /// The exponents of a head's scale, and of its edge value 448 · 2^e. Values span
    /// 2^-12..2^12. Keys stay at most 4 in magnitude, so that scores stay within tens as a
    /// model's do: keys in the thousands put the softmax on a knife-edge where a score's f32
    /// rounding moves the output (f32 attention is then up to 1.4e-3 from f64 on these rows,
    /// the tiled kernel's arithmetic emulated up to 8.5e-4), and the row would measure the
    /// data, not the kernel.
    fn exponents(self) -> (std::ops::RangeInclusive<i32>, std::ops::Range<i32>) {
        match self {
            Part::Keys => (-12..=2, -12..-6),
            Part::Values => (-12..=12, -12..12),
        }
    }
}

/// Rows of one token's keys (or values): each head scaled by its own power of two (so the
/// scales differ from head to head; `Part::exponents`), some heads all zero, some with a
/// largest magnitude of exactly 448 · 2^e (the edge of a scale).
pub(super) fn rows(c: &mut Ctx, n: usize, heads: usize, head_dim: usize, part: Part) -> Vec<f32> {
    let (scales, edges) = part.exponents();
    let mut out = c.values(n * heads * head_dim, 1.0);
    for head in out.chunks_mut(head_dim) {
        match c.rng.random_range(0..16) {
            0 => head.fill(0.0),
            1 => head[c.rng.random_range(0..head_dim)] = -448.0 * 2f32.powi(c.rng.random_range(edges.clone())),
            _ => {
                let scale = 2f32.powi(c.rng.random_range(scales.clone()));
                head.iter_mut().for_each(|x| *x *= scale);
            }
        }
    }
    out
}

/// An FP8 cache of `slots` random tokens on the CPU, and one with the same bytes on the GPU.
pub(super) fn cache(
    c: &mut Ctx,
    layout: &KvLayout,
    slots: usize,
    part: Part,
) -> Result<(CpuTensor, <CudaBackend as Backend>::Tensor)> {
    let mut kv = CpuKv::zeroed(slots, layout);
    let values = rows(c, slots, layout.num_kv_heads, layout.head_dim, part);
    for (slot, row) in values.chunks(layout.kv_dim()).enumerate() {
        kv.write(slot, row);
    }
    let (codes, exps) = kv.fp8_bytes().expect("an FP8 cache");
    let gpu = c.gpu.upload_kv_fp8(layout, codes, exps)?;
    Ok((CpuTensor::Kv(kv), gpu))
}

/// Both caches' codes and exponents compared: a row for the bytes that differ (none may).
/// With RoPE inside, the keys are rotated by each backend's own sin and cos first, so a
/// code may land one step away where a rotated value sits on a rounding boundary; that
/// is reported, and allowed for one code in a thousand.
pub(super) fn compare_bytes(
    c: &mut Ctx,
    op: &str,
    shape: &str,
    caches: &[(&CpuTensor, &<CudaBackend as Backend>::Tensor)],
    rotated: bool,
) -> Result<()> {
    let (mut codes_differ, mut far, mut exps_differ, mut total) = (0usize, 0usize, 0usize, 0usize);
    for &(cpu, gpu) in caches {
        let (want_codes, want_exps) = cpu.kv().and_then(CpuKv::fp8_bytes).expect("an FP8 cache");
        let (codes, exps) = c.gpu.kv_fp8_bytes(gpu)?;
        total += codes.len();
        for (&a, &b) in codes.iter().zip(want_codes) {
            if a != b {
                codes_differ += 1;
                far += usize::from((a ^ b) & 0x80 != 0 || a.abs_diff(b) > 1);
            }
        }
        exps_differ += exps.iter().zip(want_exps).filter(|(a, b)| a != b).count();
        exps_differ += usize::from(codes.len() != want_codes.len() || exps.len() != want_exps.len());
    }
    let allowed = if rotated { total / 1000 } else { 0 };
    let pass = far == 0 && exps_differ == 0 && codes_differ <= allowed;
    c.rows.push(OpRow {
        op: op.into(),
        shape: format!("{shape}, {codes_differ} codes (1 step) / {exps_differ} scales differ"),
        err: codes_differ as f64 / total.max(1) as f64,
        pass,
    });
    Ok(())
}

/// The rows of `attention_meta` over FP8 caches: attention, then RoPE inside it.
pub(super) fn attention(c: &mut Ctx, s: AttnShape) -> Result<()> {
    let layout =
        KvLayout { num_kv_heads: s.num_kv_heads, head_dim: s.head_dim, storage: KvStorage::Fp8, window: s.window };
    let (meta, slots) = attention_meta(c, s);
    let n = meta.num_tokens();
    let (kv_dim, q_dim) = (layout.kv_dim(), s.num_heads * s.head_dim);
    let q = HostTensor::new(vec![n, q_dim], c.values(n * q_dim, 2.0));
    let k = HostTensor::new(vec![n, kv_dim], rows(c, n, s.num_kv_heads, s.head_dim, Part::Keys));
    let v = HostTensor::new(vec![n, kv_dim], rows(c, n, s.num_kv_heads, s.head_dim, Part::Values));
    let (mut kcc, mut kcg) = cache(c, &layout, slots, Part::Keys)?;
    let (mut vcc, mut vcg) = cache(c, &layout, slots, Part::Values)?;
    let (cpu, gpu): (&CpuBackend, &CudaBackend) = (c.cpu, c.gpu);
    let up = |t: &HostTensor| -> Result<_> { Ok((cpu.upload(t)?, f32_tensor(gpu, t)?)) };
    let ((qc, qg), (kc, kg), (vc, vg)) = (up(&q)?, up(&k)?, up(&v)?);
    let (bc, bg) = (cpu.prepare(&meta)?, gpu.prepare(&meta)?);
    let want = cpu.to_host(&cpu.attention(&qc, &kc, &vc, &mut kcc, &mut vcc, &bc, s)?)?;
    let got = gpu.to_host(&gpu.attention(&qg, &kg, &vg, &mut kcg, &mut vcg, &bg, s)?)?;
    let window = s.window.map_or(String::new(), |w| format!(" window {}+{}", w.size(), w.sinks()));
    let shape = format!("{}h/{}kv/{} x{n}{window}", s.num_heads, s.num_kv_heads, s.head_dim);
    c.push_long("attention fp8 KV (decode+verify+prefill)", &shape, &meta, (&got, &want));
    compare_bytes(c, "attention fp8 KV write (bytes)", &shape, &[(&kcc, &kcg), (&vcc, &vcg)], false)?;
    let preset = if s.head_dim == 64 { Preset::SmolLm2_135m } else { Preset::Llama31_8b };
    let f = HostTensor::new(vec![s.head_dim / 2], preset.config().rope_inv_freq());
    let (fc, fg) = c.both(&f)?;
    let ((mut qc, mut qg), (mut kc, mut kg)) = (up(&q)?, up(&k)?);
    let want = cpu.to_host(&cpu.rope_attention(&mut qc, &mut kc, &vc, &mut kcc, &mut vcc, &bc, &fc, s)?)?;
    let got = gpu.to_host(&gpu.rope_attention(&mut qg, &mut kg, &vg, &mut kcg, &mut vcg, &bg, &fg, s)?)?;
    c.push_long("rope_attention fp8 KV (rope inside)", &shape, &meta, (&got, &want));
    compare_bytes(c, "rope_attention fp8 KV write (bytes)", &shape, &[(&kcc, &kcg), (&vcc, &vcg)], true)?;
    let (_, prefill) = super::long_row(&meta, q_dim);
    super::mma_vs_simt(c, "rope_attention fp8 KV", &shape, (&want, prefill), |g| {
        let (mut q, mut k) = (f32_tensor(g, &q)?, f32_tensor(g, &k)?);
        g.to_host(&g.rope_attention(&mut q, &mut k, &vg, &mut kcg, &mut vcg, &bg, &fg, s)?)
    })
}
