//! Tree rows on both backends (tree speculation): one step holding a causal decode row, a
//! verification tree over a cached prefix and a drafting head's next depth (ancestors
//! partly cached by an earlier step), over bf16 and FP8 caches, without and with RoPE
//! inside the kernel; then the accepted path moved by `copy_kv` and decoded again must give
//! the tree's bits (batch invariance); and `copy_kv` itself against the CPU's.

use rand::Rng;

use super::fp8_kv::{self, Part};
use super::{bf16_round, f32_tensor, Ctx};
use crate::backend::cpu::kv::CpuKv;
use crate::backend::cpu::CpuTensor;
use crate::backend::cuda::CudaBackend;
use crate::backend::{AttnShape, Backend, BatchMeta, Result};
use crate::harness::parity::OpRow;
use crate::model::Preset;
use crate::tensor::{HostTensor, KvLayout, KvStorage, TreeMask, NO_BLOCK, NO_PARENT};

type GpuTensor = <CudaBackend as Backend>::Tensor;

const BS: u32 = 16;
/// The verification tree: the last token and 7 drafts (0 → {1, 2}, 1 → 3, 2 → {4, 5},
/// 4 → 6, 3 → 7), over a prefix of `VERIFY_PREFIX` positions.
const VERIFY: [u32; 8] = [NO_PARENT, 0, 0, 1, 2, 2, 4, 3];
const VERIFY_PREFIX: u32 = 150;
/// A drafting head's third depth: nodes 0..4 cached, 4..7 run in this step.
const EXTEND: [u32; 7] = [NO_PARENT, NO_PARENT, 0, 1, 2, 3, 3];
const EXTEND_PREFIX: u32 = 130;
/// The verification row's node whose path the invariance check accepts (0 → 1 → 3 → 7).
const ACCEPTED: u32 = 7;

/// The three rows and the cache's slots; with a window, the blocks no token of a row reads
/// are back in the pool (`NO_BLOCK`).
fn tree_meta(c: &mut Ctx, s: AttnShape) -> Result<(BatchMeta, usize)> {
    let blocks = 64usize;
    let mut perm: Vec<u32> = (0..blocks as u32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, c.rng.random_range(0..=i));
    }
    let mut meta = BatchMeta::new(BS);
    meta.push_row(&[3], 299, &perm[0..19], 1);
    let verify = TreeMask { prefix: VERIFY_PREFIX, first: 0, parents: VERIFY.to_vec() };
    meta.push_tree_row(&[4, 5, 6, 7, 8, 9, 10, 11], verify, &perm[19..29], true)?;
    let extend = TreeMask { prefix: EXTEND_PREFIX, first: 4, parents: EXTEND.to_vec() };
    meta.push_tree_row(&[12, 13, 14], extend, &perm[29..38], true)?;
    if let Some(w) = s.window {
        for row in &mut meta.rows {
            let lowest = meta.positions[row.start as usize..(row.start + row.len) as usize].iter().min();
            let first = w.first_recent(lowest.copied().unwrap_or(0) as usize) / BS as usize;
            row.block_table.iter_mut().take(first).skip(w.sinks().div_ceil(BS as usize)).for_each(|b| *b = NO_BLOCK);
        }
    }
    Ok((meta, blocks * BS as usize))
}

/// A cache of `slots` random entries on both backends, bf16 or FP8: the same values (or bytes).
fn caches(c: &mut Ctx, layout: &KvLayout, slots: usize, part: Part) -> Result<(CpuTensor, GpuTensor)> {
    if layout.storage == KvStorage::Fp8 {
        return fp8_kv::cache(c, layout, slots, part);
    }
    let kv_dim = layout.kv_dim();
    let values = bf16_round(c.values(slots * kv_dim, 2.0));
    let mut kv = CpuKv::zeroed(slots, layout);
    values.chunks(kv_dim).enumerate().for_each(|(slot, row)| kv.write(slot, row));
    let gpu = c.gpu.upload(&HostTensor::new(vec![slots, kv_dim], values))?;
    Ok((CpuTensor::Kv(kv), gpu))
}

/// The step's inputs: q, k, v (k and v as the cache's own tests draw them).
fn inputs(c: &mut Ctx, s: AttnShape, n: usize, storage: KvStorage) -> [HostTensor; 3] {
    let (q_dim, kv_dim) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
    let q = HostTensor::new(vec![n, q_dim], c.values(n * q_dim, 2.0));
    let mut kv = |part| match storage {
        KvStorage::Fp8 => fp8_kv::rows(c, n, s.num_kv_heads, s.head_dim, part),
        _ => bf16_round(c.values(n * kv_dim, 2.0)),
    };
    let (k, v) = (kv(Part::Keys), kv(Part::Values));
    [q, HostTensor::new(vec![n, kv_dim], k), HostTensor::new(vec![n, kv_dim], v)]
}

/// The rows of `tree_meta` over a `storage` cache, without and with RoPE inside; then the
/// accepted path's invariance on the GPU.
pub(super) fn attention(c: &mut Ctx, s: AttnShape, storage: KvStorage) -> Result<()> {
    let layout = KvLayout { num_kv_heads: s.num_kv_heads, head_dim: s.head_dim, storage, window: s.window };
    let (meta, slots) = tree_meta(c, s)?;
    let n = meta.num_tokens();
    let [q, k, v] = inputs(c, s, n, storage);
    let (mut kcc, mut kcg) = caches(c, &layout, slots, Part::Keys)?;
    let (mut vcc, mut vcg) = caches(c, &layout, slots, Part::Values)?;
    let (cpu, gpu) = (c.cpu, c.gpu);
    let up = |t: &HostTensor| -> Result<_> { Ok((cpu.upload(t)?, f32_tensor(gpu, t)?)) };
    let ((qc, qg), (kc, kg), (vc, vg)) = (up(&q)?, up(&k)?, up(&v)?);
    let (bc, bg) = (cpu.prepare(&meta)?, gpu.prepare(&meta)?);
    let kind = if storage == KvStorage::Fp8 { "fp8" } else { "bf16" };
    let window = s.window.map_or(String::new(), |w| format!(" window {}+{}", w.size(), w.sinks()));
    let shape = format!("{}h/{}kv/{} x{n}{window}", s.num_heads, s.num_kv_heads, s.head_dim);
    let want = cpu.to_host(&cpu.attention(&qc, &kc, &vc, &mut kcc, &mut vcc, &bc, s)?)?;
    let got = gpu.to_host(&gpu.attention(&qg, &kg, &vg, &mut kcg, &mut vcg, &bg, s)?)?;
    c.push(&format!("attention tree {kind} KV"), shape.clone(), &got, &want);
    let preset = if s.head_dim == 64 { Preset::SmolLm2_135m } else { Preset::Llama31_8b };
    let f = HostTensor::new(vec![s.head_dim / 2], preset.config().rope_inv_freq());
    let (fc, fg) = c.both(&f)?;
    let ((mut qc, mut qg), (mut kc, mut kg)) = (up(&q)?, up(&k)?);
    let want = cpu.to_host(&cpu.rope_attention(&mut qc, &mut kc, &vc, &mut kcc, &mut vcc, &bc, &fc, s)?)?;
    let tree = gpu.to_host(&gpu.rope_attention(&mut qg, &mut kg, &vg, &mut kcg, &mut vcg, &bg, &fg, s)?)?;
    c.push(&format!("rope_attention tree {kind} KV"), shape.clone(), &tree, &want);
    if storage == KvStorage::Fp8 {
        fp8_kv::compare_bytes(c, "tree fp8 KV write (bytes)", &shape, &[(&kcc, &kcg), (&vcc, &vcg)], true)?;
    } else {
        let (want, got) = (cpu.to_host(&kcc)?, gpu.to_host(&kcg)?);
        c.push("tree bf16 KV write", shape.clone(), &got, &want);
    }
    super::mma_vs_simt(c, &format!("rope_attention tree {kind} KV"), &shape, (&want, 0..0), |g| {
        let (mut q, mut k) = (f32_tensor(g, &q)?, f32_tensor(g, &k)?);
        g.to_host(&g.rope_attention(&mut q, &mut k, &vg, &mut kcg, &mut vcg, &bg, &fg, s)?)
    })?;
    let step = Step { meta: &meta, q: &q, k: &k, v: &v, inv_freq: &fg };
    let same = accepted_path_decodes_alike(c.gpu, &step, [&mut kcg, &mut vcg], &tree, s)?;
    c.rows.push(OpRow {
        op: format!("tree {kind} KV: accepted == decode"),
        shape: format!("{shape}, node {ACCEPTED} moved by copy_kv"),
        err: if same { 0.0 } else { f64::INFINITY },
        pass: same,
    });
    Ok(())
}

/// What the tree step ran with (RoPE inside).
struct Step<'a> {
    meta: &'a BatchMeta,
    q: &'a HostTensor,
    k: &'a HostTensor,
    v: &'a HostTensor,
    inv_freq: &'a GpuTensor,
}

/// Accepts the verification row's path to `ACCEPTED` as the engine does (`copy_kv` brings
/// it onto consecutive positions), then decodes that node alone at its position: its
/// attention must be the tree step's `tree` row, bit for bit.
fn accepted_path_decodes_alike(
    gpu: &CudaBackend,
    step: &Step,
    [kc, vc]: [&mut GpuTensor; 2],
    tree: &[f32],
    s: AttnShape,
) -> Result<bool> {
    let row = &step.meta.rows[1];
    let mask = row.tree.as_ref().expect("the verification row is a tree row");
    let slot = |p: u32| row.block_table[(p / BS) as usize] * BS + p % BS;
    let path = mask.path(ACCEPTED);
    let moves: Vec<(u32, u32)> = path
        .iter()
        .enumerate()
        .filter(|&(j, &a)| a != j as u32)
        .map(|(j, &a)| (slot(mask.prefix + a), slot(mask.prefix + j as u32)))
        .collect();
    gpu.copy_kv(kc, &moves)?;
    gpu.copy_kv(vc, &moves)?;
    let t = (row.start + ACCEPTED - mask.first) as usize;
    let mut decode = BatchMeta::new(BS);
    decode.push_row(&[step.meta.tokens[t]], mask.prefix + path.len() as u32 - 1, &row.block_table, 1);
    let one = |x: &HostTensor| {
        let w = x.shape[1];
        f32_tensor(gpu, &HostTensor::new(vec![1, w], x.data[t * w..(t + 1) * w].to_vec()))
    };
    let (mut q, mut k, v) = (one(step.q)?, one(step.k)?, one(step.v)?);
    let out = gpu.rope_attention(&mut q, &mut k, &v, kc, vc, &gpu.prepare(&decode)?, step.inv_freq, s)?;
    let q_dim = s.num_heads * s.head_dim;
    let want = &tree[t * q_dim..(t + 1) * q_dim];
    Ok(gpu.to_host(&out)?.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()))
}

/// `copy_kv` on both backends over caches of random entries, with moves that read what an
/// earlier move wrote (5 → 2 then 2 → 7; 12 → 13 then 13 → 14) and a move onto itself: the
/// caches after must be equal, bit for bit.
pub(super) fn copy_kv(c: &mut Ctx, storage: KvStorage) -> Result<()> {
    let layout = KvLayout { num_kv_heads: 8, head_dim: 128, storage, window: None };
    let moves = [(5, 2), (2, 7), (9, 9), (7, 1), (12, 13), (13, 14), (40, 3)];
    let (mut cpu_cache, mut gpu_cache) = caches(c, &layout, 48, Part::Values)?;
    c.cpu.copy_kv(&mut cpu_cache, &moves)?;
    c.gpu.copy_kv(&mut gpu_cache, &moves)?;
    let shape = format!("48 slots x {}, {} moves", layout.kv_dim(), moves.len());
    if storage == KvStorage::Fp8 {
        return fp8_kv::compare_bytes(c, "copy_kv fp8 (bytes)", &shape, &[(&cpu_cache, &gpu_cache)], false);
    }
    let (want, got) = (c.cpu.to_host(&cpu_cache)?, c.gpu.to_host(&gpu_cache)?);
    let same = want.len() == got.len() && want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
    c.rows.push(OpRow {
        op: "copy_kv bf16 (bitwise)".into(),
        shape,
        err: if same { 0.0 } else { f64::INFINITY },
        pass: same,
    });
    Ok(())
}
