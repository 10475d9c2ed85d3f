//! One layer's KV cache on the CPU, `[slots, kv_heads * head_dim]`, in the storage asked:
//! f32 (the reference), bf16, or FP8 E4M3 with a power-of-two scale per token and KV head
//! (`KvStorage` says why). Writes quantize; attention reads one head at a time, dequantized.

use half::bf16;

use crate::tensor::quant::e4m3;
use crate::tensor::{KvLayout, KvStorage};

#[derive(Debug, Clone)]
enum Data {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    /// Codes `[slots, kv_dim]`, and `[slots, kv_heads]` scale exponents.
    Fp8 {
        codes: Vec<u8>,
        exps: Vec<i8>,
    },
}

#[derive(Debug, Clone)]
pub struct CpuKv {
    heads: usize,
    head_dim: usize,
    data: Data,
}

impl CpuKv {
    pub fn zeroed(slots: usize, layout: &KvLayout) -> Self {
        let n = slots * layout.kv_dim();
        let data = match layout.storage {
            KvStorage::F32 => Data::F32(vec![0.0; n]),
            KvStorage::Bf16 => Data::Bf16(vec![bf16::ZERO; n]),
            KvStorage::Fp8 => Data::Fp8 { codes: vec![0; n], exps: vec![0; slots * layout.num_kv_heads] },
        };
        CpuKv { heads: layout.num_kv_heads, head_dim: layout.head_dim, data }
    }

    /// An f32 cache holding `data`, `[slots, kv_dim]`.
    pub fn from_f32(data: Vec<f32>, layout: &KvLayout) -> Self {
        CpuKv { heads: layout.num_kv_heads, head_dim: layout.head_dim, data: Data::F32(data) }
    }

    /// Every slot's values, dequantized: `[slots, kv_dim]`.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.slots() * self.heads * self.head_dim);
        let mut scratch = vec![0f32; self.head_dim];
        for slot in 0..self.slots() {
            for h in 0..self.heads {
                out.extend_from_slice(self.head(slot, h, &mut scratch));
            }
        }
        out
    }

    pub fn slots(&self) -> usize {
        let n = match &self.data {
            Data::F32(d) => d.len(),
            Data::Bf16(d) => d.len(),
            Data::Fp8 { codes, .. } => codes.len(),
        };
        n / (self.heads * self.head_dim).max(1)
    }

    /// An FP8 cache's codes `[slots, kv_dim]` and scale exponents `[slots, kv_heads]`, as
    /// stored (None for another storage).
    pub fn fp8_bytes(&self) -> Option<(&[u8], &[i8])> {
        match &self.data {
            Data::Fp8 { codes, exps } => Some((codes, exps)),
            _ => None,
        }
    }

    /// Stores one token's keys (or values) of every KV head at `slot`.
    pub fn write(&mut self, slot: usize, row: &[f32]) {
        let kv_dim = self.heads * self.head_dim;
        let at = slot * kv_dim..(slot + 1) * kv_dim;
        match &mut self.data {
            Data::F32(d) => d[at].copy_from_slice(row),
            Data::Bf16(d) => d[at].iter_mut().zip(row).for_each(|(o, &x)| *o = bf16::from_f32(x)),
            Data::Fp8 { codes, exps } => {
                let hd = self.head_dim;
                for (h, (dst, src)) in codes[at].chunks_mut(hd).zip(row.chunks(hd)).enumerate() {
                    exps[slot * self.heads + h] = quantize_head(src, dst);
                }
            }
        }
    }

    /// Copies the stored entry at slot `from` to slot `to`, as stored (no rounding again).
    pub fn copy(&mut self, from: usize, to: usize) {
        let kv_dim = self.heads * self.head_dim;
        let (src, dst) = (from * kv_dim, to * kv_dim);
        match &mut self.data {
            Data::F32(d) => d.copy_within(src..src + kv_dim, dst),
            Data::Bf16(d) => d.copy_within(src..src + kv_dim, dst),
            Data::Fp8 { codes, exps } => {
                codes.copy_within(src..src + kv_dim, dst);
                exps.copy_within(from * self.heads..(from + 1) * self.heads, to * self.heads);
            }
        }
    }

    /// The keys (or values) of KV head `head` at `slot`: borrowed where stored as f32, else
    /// dequantized into `scratch`.
    pub fn head<'a>(&'a self, slot: usize, head: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        let hd = self.head_dim;
        let at = (slot * self.heads + head) * hd;
        match &self.data {
            Data::F32(d) => &d[at..at + hd],
            Data::Bf16(d) => {
                scratch.iter_mut().zip(&d[at..at + hd]).for_each(|(o, x)| *o = x.to_f32());
                scratch
            }
            Data::Fp8 { codes, exps } => {
                let scale = exp2(exps[slot * self.heads + head]);
                scratch.iter_mut().zip(&codes[at..at + hd]).for_each(|(o, &c)| *o = e4m3::to_f32(c) * scale);
                scratch
            }
        }
    }
}

/// The largest magnitude an E4M3 code holds.
const E4M3_MAX: f64 = e4m3::MAX as f64;

/// Quantizes one head's values into `codes`; returns the scale's exponent `e`: the smallest
/// with `amax ≤ 448 · 2^e` (0 for an all-zero head), at least -127.
pub fn quantize_head(values: &[f32], codes: &mut [u8]) -> i8 {
    let amax = values.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let e = scale_exponent(amax);
    let scale = 2f64.powi(e as i32);
    // Division by a power of two is exact: the code is the one nearest the true value.
    codes.iter_mut().zip(values).for_each(|(c, &x)| *c = e4m3::from_f64(x as f64 / scale));
    e
}

fn scale_exponent(amax: f64) -> i8 {
    if amax == 0.0 || !amax.is_finite() {
        return 0;
    }
    let mut e = (amax / E4M3_MAX).log2().ceil() as i32;
    // `log2` may be off by one at the edges; settle it with exact comparisons.
    while amax > E4M3_MAX * 2f64.powi(e) {
        e += 1;
    }
    while amax <= E4M3_MAX * 2f64.powi(e - 1) {
        e -= 1;
    }
    e.clamp(-127, 127) as i8
}

fn exp2(e: i8) -> f32 {
    2f64.powi(e as i32) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_is_the_smallest_power_of_two_that_fits() {
        assert_eq!(scale_exponent(448.0), 0);
        assert_eq!(scale_exponent(448.5), 1);
        assert_eq!(scale_exponent(224.0), -1);
        assert_eq!(scale_exponent(1.0), -8); // 448 · 2⁻⁸ = 1.75
        assert_eq!(scale_exponent(0.0), 0);
        let mut codes = [0u8; 3];
        let e = quantize_head(&[1.0, -0.5, 0.0], &mut codes);
        assert_eq!(e, -8);
        assert_eq!(codes.map(|c| e4m3::to_f32(c) * exp2(e)), [1.0, -0.5, 0.0]);
    }

    /// `kv_scale_exp` in kernels/attention.cu: from frexp's (mantissa in [0.5, 1), exponent),
    /// `ex - 9`, plus one when the mantissa is above 0.875 (448 = 0.875 · 2^9).
    fn kernel_scale_exp(amax: f32) -> i8 {
        if !(amax > 0.0 && amax.is_finite()) {
            return 0;
        }
        let (bits, subnormal) = (amax.to_bits(), amax < f32::MIN_POSITIVE);
        let (mant, ex) = if subnormal {
            let lead = 31 - bits.leading_zeros() as i32; // the value is bits · 2^-149
            (bits as f64 / 2f64.powi(lead + 1), lead - 148)
        } else {
            let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
            (m as f64, ((bits >> 23) & 0xff) as i32 - 126)
        };
        (ex - 9 + i32::from(mant > 0.875)).clamp(-127, 127) as i8
    }

    #[test]
    fn the_kernels_exponent_formula_is_the_cpus() {
        let edges = [448.0, 448.5, 224.0, 1.0, 1.75, 1.7500001, 3.5, 1e-40, f32::MIN_POSITIVE, 1e-45, f32::MAX];
        let mut bits = 0x0000_0001u32;
        let samples = edges.into_iter().chain(std::iter::from_fn(|| {
            bits = bits.wrapping_mul(2_654_435_761).wrapping_add(12_345);
            Some(f32::from_bits(bits & 0x7fff_ffff))
        }));
        for amax in samples.take(200_000).filter(|a| a.is_finite()) {
            assert_eq!(kernel_scale_exp(amax), scale_exponent(amax as f64), "amax {amax:e}");
        }
    }
}
