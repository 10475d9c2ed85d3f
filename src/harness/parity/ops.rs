//! Each op on both backends with the same random inputs. Weights are rounded to bf16
//! before the CPU sees them, so the comparison measures the kernels, not the storage.

mod draft;
mod fp8_kv;
mod tree;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{OpRow, TOLERANCE};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{AttnPath, CudaBackend};
use crate::backend::{AttnShape, Backend, BatchMeta, Result};
use crate::model::Preset;
use crate::tensor::{AttnWindow, HostTensor, KvStorage, RowMeta, NO_BLOCK};

/// The same values on both sides, only the order of f32 sums differs.
const EXACT: f64 = 1e-4;

/// Where the tensor-core split kernel and the CUDA-core one may differ by more than one
/// bf16 ulp of their (bf16) output: near zero, by 2^-16 of the largest output (q and the
/// weights pass through bf16 hi/lo pairs, ~16 bits, there; f32 here).
const MMA_VS_SIMT_FLOOR: f32 = 1.0 / 65536.0;

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0f64, |m, &w| m.max(w.abs() as f64)).max(1e-30);
    got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs())) / scale
}

fn bf16_round(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect()
}

struct Ctx<'a> {
    cpu: &'a CpuBackend,
    gpu: &'a CudaBackend,
    /// The matmul built with other settings, checked too (by label).
    variants: Vec<(&'static str, CudaBackend)>,
    rng: StdRng,
    rows: Vec<OpRow>,
}

impl Ctx<'_> {
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (self.rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
    }

    fn push(&mut self, op: &str, shape: String, got: &[f32], want: &[f32]) {
        let err = rel_err(got, want);
        self.rows.push(OpRow { op: op.into(), shape, err, pass: err <= TOLERANCE });
    }

    /// An attention output compared whole, and over the tokens of its longest row alone
    /// (the prefill chunk of `attention_meta`, which the GPU runs on its prefill kernel).
    fn push_long(&mut self, op: &str, shape: &str, meta: &BatchMeta, (got, want): (&[f32], &[f32])) {
        self.push(op, shape.to_string(), got, want);
        let width = want.len() / meta.num_tokens().max(1);
        let (long, rows) = long_row(meta, width);
        let mut label = format!("{shape}, its {}-token row after {}", long.len, long.context_len - long.len);
        let (got, want) = (&got[rows.clone()], &want[rows]);
        if rel_err(got, want) > TOLERANCE {
            let gap = |i: usize| (got[i] - want[i]).abs();
            let at = (0..got.len()).max_by(|&a, &b| gap(a).total_cmp(&gap(b))).unwrap_or(0);
            label += &format!(" (worst: its token {}, column {})", at / width, at % width);
        }
        self.push(&format!("{op}, prefill chunk"), label, got, want);
    }

    /// The same host tensor on both backends.
    fn both(&self, t: &HostTensor) -> Result<(<CpuBackend as Backend>::Tensor, <CudaBackend as Backend>::Tensor)> {
        Ok((self.cpu.upload(t)?, self.gpu.upload(t)?))
    }
}

/// The longest row of `meta`, and its elements in an output `width` wide per token.
fn long_row(meta: &BatchMeta, width: usize) -> (&RowMeta, std::ops::Range<usize>) {
    let long = meta.rows.iter().max_by_key(|r| r.len).expect("a row");
    (long, long.start as usize * width..(long.start + long.len) as usize * width)
}

pub fn all(cpu: &CpuBackend, gpu: &CudaBackend, seed: u64) -> Result<Vec<OpRow>> {
    use crate::backend::cuda::MatmulTuning;
    // Other settings change the K split (hence the bits), never the invariance.
    let other = MatmulTuning { warps: 4, warps_per_sm: 4, x_ahead: true, ..MatmulTuning::default() };
    let variants = vec![("4 warps, 1 block/SM, activations ahead", gpu.tuned(other)?)];
    let mut c = Ctx { cpu, gpu, variants, rng: StdRng::seed_from_u64(seed), rows: vec![] };
    // The tiled prefill kernel is not yet the default: its rows (the long chunk of
    // `attention_meta`) are what checks it; shorter rows keep the split kernel either way.
    let tiled_before = gpu.tiled_prefill();
    gpu.set_tiled_prefill(true);
    let done = all_ops(&mut c);
    gpu.set_tiled_prefill(tiled_before);
    done.map(|()| c.rows)
}

fn all_ops(c: &mut Ctx) -> Result<()> {
    for (n, d) in [(7, 576), (3, 4096), (1, 8192)] {
        norms(c, n, d)?;
    }
    for fp8 in [false, true] {
        for (m, k) in [(1536, 576), (576, 1536), (1024, 2048), (4096, 14336), (8192, 4096)] {
            matmul(c, m, k, fp8)?;
        }
        for n in [1, 9, 17, 64] {
            fused(c, n, fp8)?;
        }
    }
    for preset in [Preset::SmolLm2_135m, Preset::Llama31_8b] {
        rope(c, preset)?;
    }
    let window = AttnWindow::new(100, 4).ok();
    for window in [None, window] {
        for shape in [
            AttnShape { num_heads: 9, num_kv_heads: 3, head_dim: 64, window },
            AttnShape { num_heads: 32, num_kv_heads: 8, head_dim: 128, window },
            // Eight query heads per KV head (the 70B's grouping).
            AttnShape { num_heads: 16, num_kv_heads: 2, head_dim: 128, window },
        ] {
            attention(c, shape)?;
            fp8_kv::attention(c, shape)?;
            for storage in [KvStorage::Bf16, KvStorage::Fp8] {
                tree::attention(c, shape, storage)?;
            }
        }
    }
    for storage in [KvStorage::Bf16, KvStorage::Fp8] {
        tree::copy_kv(c, storage)?;
    }
    elementwise(c)?;
    draft::top_log_probs(c)?;
    draft::embed_concat(c)?;
    random(c)?;
    Ok(())
}

fn norms(c: &mut Ctx, n: usize, d: usize) -> Result<()> {
    let x = HostTensor::new(vec![n, d], c.values(n * d, 3.0));
    let delta = HostTensor::new(vec![n, d], c.values(n * d, 1.0));
    let w = HostTensor::new(vec![d], c.values(d, 1.0));
    let (xc, xg) = (c.cpu.upload(&x)?, f32_tensor(c.gpu, &x)?);
    let (dc, dg) = (c.cpu.upload(&delta)?, f32_tensor(c.gpu, &delta)?);
    let (wc, wg) = c.both(&w)?;
    let want = c.cpu.to_host(&c.cpu.rms_norm(&xc, &wc, 1e-5)?)?;
    let got = c.gpu.to_host(&c.gpu.rms_norm(&xg, &wg, 1e-5)?)?;
    c.push("rms_norm", format!("[{n}, {d}]"), &got, &want);
    let (mut rc, mut rg) = (xc, xg);
    let want = c.cpu.to_host(&c.cpu.add_rms_norm(&mut rc, &dc, &wc, 1e-5)?)?;
    let got = c.gpu.to_host(&c.gpu.add_rms_norm(&mut rg, &dg, &wg, 1e-5)?)?;
    c.push("add_rms_norm (normed)", format!("[{n}, {d}]"), &got, &want);
    let (want, got) = (c.cpu.to_host(&rc)?, c.gpu.to_host(&rg)?);
    c.push("add_rms_norm (residual)", format!("[{n}, {d}]"), &got, &want);
    Ok(())
}

/// An f32 activation on the GPU with the host tensor's values.
fn f32_tensor(gpu: &CudaBackend, t: &HostTensor) -> Result<<CudaBackend as Backend>::Tensor> {
    gpu.upload_f32(t)
}

/// Exact value of an E4M3 byte (NaN codes never occur in our weights).
fn e4m3(b: u8) -> f32 {
    let (sign, exp, man) = (if b & 0x80 != 0 { -1.0 } else { 1.0 }, ((b >> 3) & 15) as i32, (b & 7) as f32);
    sign * if exp == 0 { man / 8.0 * 2f32.powi(-6) } else { (1.0 + man / 8.0) * 2f32.powi(exp - 7) }
}

/// A weight `[m, k]` in bf16 or FP8 on the GPU, and its exact f32 values on the CPU.
fn weight(c: &mut Ctx, m: usize, k: usize, fp8: bool) -> Result<Pair> {
    if !fp8 {
        let w = HostTensor::new(vec![m, k], bf16_round(c.values(m * k, 0.05)));
        return c.both(&w);
    }
    let bytes: Vec<u8> = (0..m * k).map(|_| c.rng.random_range(0..0x7fu8) | (c.rng.random::<u8>() & 0x80)).collect();
    let scales: Vec<f32> = (0..m).map(|_| c.rng.random_range(0.5e-3..2e-3)).collect();
    let values = bytes.iter().enumerate().map(|(i, &b)| e4m3(b) * scales[i / k]).collect();
    Ok((c.cpu.upload(&HostTensor::new(vec![m, k], values))?, c.gpu.upload_fp8([m, k], &bytes, &scales)?))
}

/// The tensor-core matmul against the CPU's f32 matmul of the same values (activations
/// rounded to bf16, as the GPU rounds them) for 64 tokens, then batch invariance: every
/// window of 1 to 64 of those tokens gives each token's row bitwise as in the 64.
fn matmul(c: &mut Ctx, m: usize, k: usize, fp8: bool) -> Result<()> {
    let x = HostTensor::new(vec![64, k], bf16_round(c.values(64 * k, 1.0)));
    let (wc, wg) = weight(c, m, k, fp8)?;
    let want = c.cpu.to_host(&c.cpu.matmul(&c.cpu.upload(&x)?, &wc)?)?;
    let gpus: Vec<(&str, &CudaBackend)> =
        [("", c.gpu)].into_iter().chain(c.variants.iter().map(|(l, g)| (*l, g))).collect();
    let mut rows = vec![];
    for (label, gpu) in gpus {
        let kind = format!("{}{label}", if fp8 { "fp8 " } else { "bf16 " });
        let all = gpu.to_host(&gpu.matmul(&f32_tensor(gpu, &x)?, &wg)?)?;
        let err = rel_err(&all, &want);
        let shape = format!("[64,{k}]x[{m},{k}]");
        rows.push(OpRow { op: format!("matmul tensor cores {kind}"), shape, err, pass: err <= EXACT });
        let mut differ = vec![];
        for n in 1..=64 {
            let start = (n * 7) % (65 - n);
            let window = HostTensor::new(vec![n, k], x.data[start * k..(start + n) * k].to_vec());
            let got = gpu.to_host(&gpu.matmul(&f32_tensor(gpu, &window)?, &wg)?)?;
            if got.iter().zip(&all[start * m..]).any(|(a, b)| a.to_bits() != b.to_bits()) {
                differ.push(n);
            }
        }
        rows.push(OpRow {
            op: format!("matmul {kind} batch invariance"),
            shape: format!("n=1..64 vs 64, {} differ {differ:?}", differ.len()),
            err: if differ.is_empty() { 0.0 } else { f64::INFINITY },
            pass: differ.is_empty(),
        });
    }
    c.rows.extend(rows);
    if !fp8 {
        // Prefill: past 64 tokens bf16 goes to cuBLAS.
        let x = HostTensor::new(vec![100, k], bf16_round(c.values(100 * k, 1.0)));
        let want = c.cpu.to_host(&c.cpu.matmul(&c.cpu.upload(&x)?, &wc)?)?;
        let got = c.gpu.to_host(&c.gpu.matmul(&f32_tensor(c.gpu, &x)?, &wg)?)?;
        c.push("matmul cuBLAS bf16", format!("[100,{k}]x[{m},{k}]"), &got, &want);
    }
    Ok(())
}

/// The fused entry points (q/k/v in one launch, gate/up with SwiGLU) against the CPU's
/// unfused default implementations, bf16 and FP8 weights.
fn fused(c: &mut Ctx, n: usize, fp8: bool) -> Result<()> {
    let (h, kv, inter) = (576, 192, 1536);
    let kind = if fp8 { "fp8" } else { "bf16" };
    let x = HostTensor::new(vec![n, h], bf16_round(c.values(n * h, 1.0)));
    let (xc, xg) = (c.cpu.upload(&x)?, f32_tensor(c.gpu, &x)?);
    let mut ws = vec![];
    for m in [h, kv, kv, inter, inter] {
        ws.push(weight(c, m, h, fp8)?);
    }
    let want = c.cpu.matmul_many(&xc, &[&ws[0].0, &ws[1].0, &ws[2].0])?;
    let got = c.gpu.matmul_many(&xg, &[&ws[0].1, &ws[1].1, &ws[2].1])?;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let (w, g) = (c.cpu.to_host(w)?, c.gpu.to_host(g)?);
        let err = rel_err(&g, &w);
        c.rows.push(OpRow {
            op: format!("matmul_many {kind} (q/k/v {i})"),
            shape: format!("[{n},{h}]"),
            err,
            pass: err <= EXACT,
        });
    }
    // The GPU writes SwiGLU's product in bf16 (the down projection's input).
    let want = bf16_round(c.cpu.to_host(&c.cpu.swiglu(&xc, &ws[3].0, &ws[4].0)?)?);
    let got = c.gpu.to_host(&c.gpu.swiglu(&xg, &ws[3].1, &ws[4].1)?)?;
    c.push(&format!("swiglu {kind} (gate/up + silu)"), format!("[{n},{h}]x2[{inter},{h}]"), &got, &want);
    if n > 1 {
        let one = f32_tensor(c.gpu, &HostTensor::new(vec![1, h], x.data[(n - 1) * h..].to_vec()))?;
        let alone = c.gpu.to_host(&c.gpu.swiglu(&one, &ws[3].1, &ws[4].1)?)?;
        let same = alone.iter().zip(&got[(n - 1) * inter..]).all(|(a, b)| a.to_bits() == b.to_bits());
        c.rows.push(OpRow {
            op: format!("swiglu {kind} batch invariance"),
            shape: format!("{n} tokens vs 1"),
            err: if same { 0.0 } else { f64::INFINITY },
            pass: same,
        });
    }
    Ok(())
}

type Pair = (<CpuBackend as Backend>::Tensor, <CudaBackend as Backend>::Tensor);

fn rope(c: &mut Ctx, preset: Preset) -> Result<()> {
    let cfg = preset.config();
    let (n, width) = (6, cfg.q_dim());
    let mut meta = BatchMeta::new(16);
    let start = if cfg.rope_scaling.is_some() { 100_000 } else { 7_000 };
    let table: Vec<u32> = (0..(start as usize + n).div_ceil(16) as u32).collect();
    meta.push_row(&vec![1; n], start, &table, 1);
    let x = HostTensor::new(vec![n, width], c.values(n * width, 2.0));
    let f = HostTensor::new(vec![cfg.head_dim / 2], cfg.rope_inv_freq());
    let (mut xc, mut xg) = (c.cpu.upload(&x)?, f32_tensor(c.gpu, &x)?);
    let (fc, fg) = c.both(&f)?;
    c.cpu.rope(&mut xc, &c.cpu.prepare(&meta)?, &fc, cfg.head_dim)?;
    c.gpu.rope(&mut xg, &c.gpu.prepare(&meta)?, &fg, cfg.head_dim)?;
    let (want, got) = (c.cpu.to_host(&xc)?, c.gpu.to_host(&xg)?);
    c.push("rope (llama3 scaling)", format!("[{n}, {width}] pos {start}+"), &got, &want);
    Ok(())
}

/// Four rows: a decode token deep in a scrambled block table, a 300-token prefill chunk
/// after 700 cached positions (the GPU's prefill kernel), a verification row of 5 tokens and
/// a 40-token prefill from position 0 (the split kernel's, as the decode); and the cache's
/// slots.
fn attention_meta(c: &mut Ctx, s: AttnShape) -> (BatchMeta, usize) {
    let (bs, blocks) = (16u32, 128usize);
    let mut perm: Vec<u32> = (0..blocks as u32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, c.rng.random_range(0..=i));
    }
    let mut meta = BatchMeta::new(bs);
    meta.push_row(&[3], 299, &perm[0..19], 1);
    // Before rows that take the split kernel: it sees this one's tokens at a stand-in position.
    meta.push_row(&[10; 300], 700, &perm[60..123], 1);
    meta.push_row(&[4, 5, 6, 7, 8], 590, &perm[19..57], 5);
    meta.push_row(&[9; 40], 0, &perm[57..60], 1);
    if let Some(w) = s.window {
        // Blocks that slid out of each row's window are back in the pool: never read.
        for row in &mut meta.rows {
            let first = w.first_recent((row.context_len - row.len) as usize) / bs as usize;
            row.block_table.iter_mut().take(first).skip(w.sinks().div_ceil(bs as usize)).for_each(|b| *b = NO_BLOCK);
        }
    }
    (meta, blocks * bs as usize)
}

/// Attention over a bf16 cache (the rows of `attention_meta`).
fn attention(c: &mut Ctx, s: AttnShape) -> Result<()> {
    let kv_dim = s.num_kv_heads * s.head_dim;
    let (meta, slots) = attention_meta(c, s);
    let n = meta.num_tokens();
    let q = HostTensor::new(vec![n, s.num_heads * s.head_dim], c.values(n * s.num_heads * s.head_dim, 2.0));
    let k = HostTensor::new(vec![n, kv_dim], bf16_round(c.values(n * kv_dim, 2.0)));
    let v = HostTensor::new(vec![n, kv_dim], bf16_round(c.values(n * kv_dim, 2.0)));
    let kc = HostTensor::new(vec![slots, kv_dim], bf16_round(c.values(slots * kv_dim, 2.0)));
    let vc = HostTensor::new(vec![slots, kv_dim], bf16_round(c.values(slots * kv_dim, 2.0)));
    let (mut kcc, mut kcg) = c.both(&kc)?;
    let (mut vcc, mut vcg) = c.both(&vc)?;
    let (qc, qg) = (c.cpu.upload(&q)?, f32_tensor(c.gpu, &q)?);
    let (kc_, kg) = (c.cpu.upload(&k)?, f32_tensor(c.gpu, &k)?);
    let (vc_, vg) = (c.cpu.upload(&v)?, f32_tensor(c.gpu, &v)?);
    let want = c.cpu.attention(&qc, &kc_, &vc_, &mut kcc, &mut vcc, &c.cpu.prepare(&meta)?, s)?;
    let got = c.gpu.attention(&qg, &kg, &vg, &mut kcg, &mut vcg, &c.gpu.prepare(&meta)?, s)?;
    let window = s.window.map_or(String::new(), |w| format!(" window {}+{}", w.size(), w.sinks()));
    let shape = format!("{}h/{}kv/{} x{n}{window}", s.num_heads, s.num_kv_heads, s.head_dim);
    let (want, got) = (c.cpu.to_host(&want)?, c.gpu.to_host(&got)?);
    c.push_long("attention (decode+verify+prefill)", &shape, &meta, (&got, &want));
    let (want, got) = (c.cpu.to_host(&kcc)?, c.gpu.to_host(&kcg)?);
    c.push("attention KV write", shape.clone(), &got, &want);
    // RoPE inside the attention kernel against rope, then attention, on the CPU.
    let preset = if s.head_dim == 64 { Preset::SmolLm2_135m } else { Preset::Llama31_8b };
    let f = HostTensor::new(vec![s.head_dim / 2], preset.config().rope_inv_freq());
    let (fc, fg) = c.both(&f)?;
    let (mut qc, mut qg) = (c.cpu.upload(&q)?, f32_tensor(c.gpu, &q)?);
    let (mut kc_, mut kg) = (c.cpu.upload(&k)?, f32_tensor(c.gpu, &k)?);
    let want = c.cpu.rope_attention(&mut qc, &mut kc_, &vc_, &mut kcc, &mut vcc, &c.cpu.prepare(&meta)?, &fc, s)?;
    let got = c.gpu.rope_attention(&mut qg, &mut kg, &vg, &mut kcg, &mut vcg, &c.gpu.prepare(&meta)?, &fg, s)?;
    let (want, got) = (c.cpu.to_host(&want)?, c.gpu.to_host(&got)?);
    c.push_long("rope_attention (rope inside)", &shape, &meta, (&got, &want));
    let rope_want = want;
    let (want, got) = (c.cpu.to_host(&kcc)?, c.gpu.to_host(&kcg)?);
    c.push("rope_attention KV write", shape.clone(), &got, &want);
    let gpu = c.gpu;
    let bg = gpu.prepare(&meta)?;
    let (_, prefill) = long_row(&meta, s.num_heads * s.head_dim);
    mma_vs_simt(c, "rope_attention", &shape, (&rope_want, prefill), |g| {
        let (mut q, mut k) = (f32_tensor(g, &q)?, f32_tensor(g, &k)?);
        g.to_host(&g.rope_attention(&mut q, &mut k, &vg, &mut kcg, &mut vcg, &bg, &fg, s)?)
    })
}

/// Runs `step` with the tensor-core and then the CUDA-core split kernel; pushes the first
/// against the CPU's output `want` (the parity tolerance) outside the elements `prefill`
/// (a prefill chunk, which the prefill kernel runs either way), and how many elements of
/// the two kernels' bf16 outputs are further apart than one bf16 ulp (none may be). The
/// backend's path is restored. The step may store its keys and values in the caches twice:
/// both kernels store the same bits.
fn mma_vs_simt(
    c: &mut Ctx,
    op: &str,
    shape: &str,
    (want, prefill): (&[f32], std::ops::Range<usize>),
    mut step: impl FnMut(&CudaBackend) -> Result<Vec<f32>>,
) -> Result<()> {
    let gpu = c.gpu;
    let before = gpu.attention_path();
    gpu.set_attention_path(AttnPath::Mma);
    let mma = step(gpu);
    gpu.set_attention_path(AttnPath::Simt);
    let simt = step(gpu);
    gpu.set_attention_path(before);
    let (mma, simt) = (mma?, simt?);
    let outside = |v: &[f32]| -> Vec<f32> { [&v[..prefill.start], &v[prefill.end..]].concat() };
    c.push(&format!("{op} mma"), format!("{shape}, its split-kernel rows"), &outside(&mma), &outside(want));
    let top = simt.iter().fold(0f32, |m, v| m.max(v.abs()));
    let apart = super::ulps::beyond_one_bf16_ulp(&mma, &simt, top * MMA_VS_SIMT_FLOOR);
    c.rows.push(OpRow {
        op: format!("{op} mma vs simt"),
        shape: format!("{shape}, {} beyond 1 bf16 ulp", apart.map_or("all".into(), |n| n.to_string())),
        err: rel_err(&mma, &simt),
        pass: apart == Some(0),
    });
    Ok(())
}

fn elementwise(c: &mut Ctx) -> Result<()> {
    let (n, d) = (5, 8192);
    let g = HostTensor::new(vec![n, d], c.values(n * d, 6.0));
    let u = HostTensor::new(vec![n, d], c.values(n * d, 2.0));
    let (gc, gg) = (c.cpu.upload(&g)?, f32_tensor(c.gpu, &g)?);
    let (uc, ug) = (c.cpu.upload(&u)?, f32_tensor(c.gpu, &u)?);
    let want = c.cpu.to_host(&c.cpu.silu_mul(&gc, &uc)?)?;
    let got = c.gpu.to_host(&c.gpu.silu_mul(&gg, &ug)?)?;
    c.push("silu_mul", format!("[{n}, {d}]"), &got, &want);

    let (vocab, hidden) = (1000, 576);
    let table = HostTensor::new(vec![vocab, hidden], bf16_round(c.values(vocab * hidden, 1.0)));
    let mut meta = BatchMeta::new(16);
    let tokens: Vec<u32> = (0..9).map(|_| c.rng.random_range(0..vocab as u32)).collect();
    meta.push_row(&tokens, 0, &[0], 3);
    let (tc, tg) = c.both(&table)?;
    let (bc, bg) = (c.cpu.prepare(&meta)?, c.gpu.prepare(&meta)?);
    let (ec, eg) = (c.cpu.embed(&tc, &bc)?, c.gpu.embed(&tg, &bg)?);
    c.push("embed", format!("9 of [{vocab}, {hidden}]"), &c.gpu.to_host(&eg)?, &c.cpu.to_host(&ec)?);
    let want = c.cpu.to_host(&c.cpu.gather_logit_rows(&ec, &bc)?)?;
    let got = c.gpu.to_host(&c.gpu.gather_logit_rows(&eg, &bg)?)?;
    c.push("gather_logit_rows", "3 of 9 rows".into(), &got, &want);

    let v = 128256;
    let logits = HostTensor::new(vec![3, v], c.values(3 * v, 10.0));
    let lg = f32_tensor(c.gpu, &logits)?;
    let want: Vec<f32> = logits.data.chunks(v).map(|r| crate::core::sampling::argmax(r) as f32).collect();
    let got: Vec<f32> = c.gpu.argmax_rows(&lg, v)?.into_iter().map(|i| i as f32).collect();
    let same = got == want;
    c.rows.push(OpRow {
        op: "argmax_rows (ids equal)".into(),
        shape: format!("[3, {v}]"),
        err: if same { 0.0 } else { 1.0 },
        pass: same,
    });
    Ok(())
}

/// The dummy-weight generator: no CPU twin (a different generator), so check its moments.
fn random(c: &mut Ctx) -> Result<()> {
    let n = 1 << 22;
    let t = c.gpu.random(&[1024, n / 1024], 0.02, c.rng.random())?;
    let v = c.gpu.to_host(&t)?;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
    let zeros = v.iter().filter(|&&x| x == 0.0).count();
    let err = ((std - 0.02).abs() / 0.02).max(mean.abs() / 0.02);
    c.rows.push(OpRow {
        op: "random (std vs 0.02)".into(),
        shape: format!("[{n}] {zeros} zeros"),
        err,
        pass: err < TOLERANCE && zeros < n / 1000,
    });
    Ok(())
}
