//! The CPU's inner loops: dot products with a fixed summation order.
//!
//! Batch invariance rests here: every output value is one `dot` whose order of
//! additions depends only on the vector length, never on how many tokens share the
//! weight load (`dot_tile` runs the same per-token sequence of fused multiply-adds).

use crate::tensor::quant::{e4m3, QuantFormat, BLOCK};

/// Dots of one weight row `w` with up to `T` activation rows at once (the weight is read once).
pub fn dot_tile<const T: usize>(w: &[f32], xs: [&[f32]; T]) -> [f32; T] {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); slices are bounds-checked inside.
        return unsafe { avx::dot_tile::<T>(w, xs) };
    }
    std::array::from_fn(|t| scalar_dot(w, xs[t]))
}

/// Dots of one quantized weight row with up to `T` activation rows: each block is
/// dequantized once into registers and used for every token.
pub fn dot_tile_quant<const T: usize>(format: QuantFormat, row: &[u8], xs: [&[f32]; T]) -> [f32; T] {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2, FMA and F16C are present (checked above); lengths are asserted inside.
        return unsafe { avx::dot_tile_quant::<T>(format, row, xs) };
    }
    let mut acc = [0f32; T];
    for (b, block) in row.chunks_exact(format.block_bytes()).enumerate() {
        let w = format.dequantize_block(block);
        for t in 0..T {
            acc[t] += scalar_dot(&w, &xs[t][b * BLOCK..(b + 1) * BLOCK]);
        }
    }
    acc
}

/// Dots of one row of E4M3 codes (their values, unscaled) with up to `T` activation rows,
/// in `dot_tile`'s order of additions.
pub fn dot_tile_fp8<const T: usize>(codes: &[u8], xs: [&[f32]; T]) -> [f32; T] {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: AVX2, FMA and F16C are present (checked above); lengths are asserted inside.
        return unsafe { avx::dot_tile_fp8::<T>(codes, xs) };
    }
    let w: Vec<f32> = codes.iter().map(|&c| e4m3::to_f32(c)).collect();
    std::array::from_fn(|t| scalar_dot(&w, xs[t]))
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_tile::<1>(a, [b])[0]
}

/// `y[i] = a * x[i] + y[i]`, fused, for every i: the same bits with or without SIMD.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); the lengths are equal.
        return unsafe { avx::axpy(a, x, y) };
    }
    y.iter_mut().zip(x).for_each(|(y, x)| *y = a.mul_add(*x, *y));
}

#[cfg(target_arch = "x86_64")]
fn simd_available() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    })
}

/// Same association as the SIMD path: four 8-lane accumulators over blocks of 32,
/// one accumulator for the remaining blocks of 8, then the scalar tail.
fn scalar_dot(w: &[f32], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len());
    let mut acc = [[0f32; 8]; 4];
    let mut i = 0;
    while i + 32 <= w.len() {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, a) in lanes.iter_mut().enumerate() {
                *a = w[i + 8 * j + l].mul_add(x[i + 8 * j + l], *a);
            }
        }
        i += 32;
    }
    while i + 8 <= w.len() {
        for (l, a) in acc[0].iter_mut().enumerate() {
            *a = w[i + l].mul_add(x[i + l], *a);
        }
        i += 8;
    }
    let lanes: [f32; 8] = std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
    let mut sum = horizontal(lanes);
    while i < w.len() {
        sum = w[i].mul_add(x[i], sum);
        i += 1;
    }
    sum
}

/// Sums 8 lanes pairwise, in the order the AVX reduction uses.
fn horizontal(l: [f32; 8]) -> f32 {
    let h: [f32; 4] = std::array::from_fn(|i| l[i] + l[i + 4]);
    let q = [h[0] + h[2], h[1] + h[3]];
    q[0] + q[1]
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use crate::tensor::quant::{e4m3, QuantFormat, BLOCK};

    /// The 32 values of a quantized block as four vectors of 8. (No closures here: they
    /// would not inherit the target features, and every intrinsic would become a call.)
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dequantize(format: QuantFormat, b: *const u8) -> [__m256; 4] {
        let scales = _mm_cvtph_ps(_mm_cvtsi32_si128((b as *const i32).read_unaligned()));
        let d = _mm256_set1_ps(_mm_cvtss_f32(scales));
        let (ints, offset) = match format {
            QuantFormat::Q8_0 => {
                let q = b.add(2);
                let ints = [
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(q as *const __m128i)),
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(8) as *const __m128i)),
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(16) as *const __m128i)),
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(24) as *const __m128i)),
                ];
                (ints, _mm256_setzero_ps())
            }
            QuantFormat::Q4_0 => (nibbles(b.add(2)), _mm256_mul_ps(d, _mm256_set1_ps(-8.0))),
            QuantFormat::Q4_1 => {
                let m = _mm256_set1_ps(_mm_cvtss_f32(_mm_shuffle_ps(scales, scales, 1)));
                (nibbles(b.add(4)), m)
            }
        };
        [
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints[0]), d, offset),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints[1]), d, offset),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints[2]), d, offset),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints[3]), d, offset),
        ]
    }

    /// 16 bytes of nibbles as 32 integers: low halves are elements 0..16, high halves 16..32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn nibbles(q: *const u8) -> [__m256i; 4] {
        let bytes = _mm_loadu_si128(q as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(bytes, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        [
            _mm256_cvtepu8_epi32(lo),
            _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
            _mm256_cvtepu8_epi32(hi),
            _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
        ]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_tile_quant<const T: usize>(format: QuantFormat, row: &[u8], xs: [&[f32]; T]) -> [f32; T] {
        let bb = format.block_bytes();
        let blocks = row.len() / bb;
        for x in &xs {
            assert_eq!(x.len(), blocks * BLOCK);
        }
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        for b in 0..blocks {
            let w = dequantize(format, row.as_ptr().add(b * bb));
            for t in 0..T {
                let xp = xs[t].as_ptr().add(b * BLOCK);
                for j in 0..4 {
                    acc[t][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xp.add(8 * j)), acc[t][j]);
                }
            }
        }
        let mut out = [0f32; T];
        for t in 0..T {
            out[t] = reduce(&acc[t]);
        }
        out
    }

    /// Eight E4M3 codes as f32. Shifting the code's low 7 bits left by 7 makes an f16 with
    /// the same exponent and mantissa fields, worth the E4M3 value times 2⁻⁸ (the biases
    /// are 15 and 7; subnormals line up too), so F16C converts it and × 256 is exact. The
    /// two NaN codes would read 480: they get an f16 NaN exponent instead.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn decode_e4m3(p: *const u8) -> __m256 {
        let w = _mm_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
        let magnitude = _mm_and_si128(w, _mm_set1_epi16(0x7f));
        let sign = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8);
        let h = _mm_or_si128(sign, _mm_slli_epi16(magnitude, 7));
        let nan = _mm_cmpeq_epi16(magnitude, _mm_set1_epi16(0x7f));
        let h = _mm_or_si128(h, _mm_and_si128(nan, _mm_set1_epi16(0x7e00)));
        _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0))
    }

    /// `dot_tile` with the weights decoded from E4M3 codes as they are loaded.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_tile_fp8<const T: usize>(codes: &[u8], xs: [&[f32]; T]) -> [f32; T] {
        let n = codes.len();
        for x in &xs {
            assert_eq!(x.len(), n);
        }
        let cp = codes.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        let mut i = 0;
        while i + 32 <= n {
            let wv = [
                decode_e4m3(cp.add(i)),
                decode_e4m3(cp.add(i + 8)),
                decode_e4m3(cp.add(i + 16)),
                decode_e4m3(cp.add(i + 24)),
            ];
            for t in 0..T {
                let xp = xs[t].as_ptr().add(i);
                for j in 0..4 {
                    acc[t][j] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xp.add(8 * j)), acc[t][j]);
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            let wv = decode_e4m3(cp.add(i));
            for t in 0..T {
                acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t].as_ptr().add(i)), acc[t][0]);
            }
            i += 8;
        }
        let mut out = [0f32; T];
        for t in 0..T {
            let mut sum = reduce(&acc[t]);
            for k in i..n {
                sum = e4m3::to_f32(codes[k]).mul_add(xs[t][k], sum);
            }
            out[t] = sum;
        }
        out
    }

    /// `axpy`: 8 lanes at a time, then the scalar tail (both fused).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let (n, av) = (x.len(), _mm256_set1_ps(a));
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(yp.add(i), _mm256_fmadd_ps(av, _mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i))));
            i += 8;
        }
        for k in i..n {
            y[k] = a.mul_add(x[k], y[k]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce(a: &[__m256; 4]) -> f32 {
        let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_tile<const T: usize>(w: &[f32], xs: [&[f32]; T]) -> [f32; T] {
        let n = w.len();
        for x in &xs {
            assert_eq!(x.len(), n);
        }
        let wp = w.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        let mut i = 0;
        while i + 32 <= n {
            let wv = [
                _mm256_loadu_ps(wp.add(i)),
                _mm256_loadu_ps(wp.add(i + 8)),
                _mm256_loadu_ps(wp.add(i + 16)),
                _mm256_loadu_ps(wp.add(i + 24)),
            ];
            for t in 0..T {
                let xp = xs[t].as_ptr().add(i);
                for j in 0..4 {
                    acc[t][j] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xp.add(8 * j)), acc[t][j]);
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            let wv = _mm256_loadu_ps(wp.add(i));
            for t in 0..T {
                acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[t].as_ptr().add(i)), acc[t][0]);
            }
            i += 8;
        }
        let mut out = [0f32; T];
        for t in 0..T {
            let mut sum = reduce(&acc[t]);
            for k in i..n {
                sum = w[k].mul_add(xs[t][k], sum);
            }
            out[t] = sum;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn simd_and_scalar_agree_bit_for_bit() {
        for n in [1, 7, 8, 31, 32, 33, 64, 100, 576, 1537] {
            let (w, x) = (data(n, 1), data(n, 2));
            assert_eq!(dot(&w, &x).to_bits(), scalar_dot(&w, &x).to_bits(), "n = {n}");
        }
    }

    #[test]
    fn axpy_is_a_fused_multiply_add_per_element() {
        for n in [1, 7, 8, 9, 64, 67] {
            let (x, y0) = (data(n, 4), data(n, 5));
            let mut y = y0.clone();
            axpy(0.37, &x, &mut y);
            for i in 0..n {
                assert_eq!(y[i].to_bits(), 0.37f32.mul_add(x[i], y0[i]).to_bits(), "n = {n}, i = {i}");
            }
        }
    }

    #[test]
    fn tiles_give_the_same_bits_as_single_dots() {
        let n = 200;
        let w = data(n, 3);
        let xs: Vec<Vec<f32>> = (0..4).map(|s| data(n, 10 + s)).collect();
        let tile = dot_tile::<4>(&w, [&xs[0], &xs[1], &xs[2], &xs[3]]);
        for t in 0..4 {
            assert_eq!(tile[t].to_bits(), dot(&w, &xs[t]).to_bits());
        }
    }

    #[test]
    fn quantized_dots_match_dequantized_weights() {
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1] {
            let blocks = 5;
            let row: Vec<u8> = (0..blocks * format.block_bytes())
                .map(|i| {
                    if i % format.block_bytes() < 4 {
                        [0x00, 0x2c, 0x00, 0xb8][i % format.block_bytes()]
                    } else {
                        (i * 37 % 256) as u8
                    }
                })
                .collect();
            let w = format.dequantize(&row);
            let xs: Vec<Vec<f32>> = (0..3).map(|s| data(blocks * BLOCK, 20 + s)).collect();
            let got = dot_tile_quant::<3>(format, &row, [&xs[0], &xs[1], &xs[2]]);
            for t in 0..3 {
                let exact: f64 = w.iter().zip(&xs[t]).map(|(a, b)| *a as f64 * *b as f64).sum();
                assert!(
                    (got[t] as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                    "{format:?}: {} vs {exact}",
                    got[t]
                );
                assert_eq!(got[t].to_bits(), dot_tile_quant::<1>(format, &row, [&xs[t]])[0].to_bits());
            }
        }
    }

    #[test]
    fn fp8_dots_are_the_dots_of_the_decoded_codes() {
        for n in [1, 8, 31, 32, 33, 77, 256] {
            // Every code but the NaNs, in a scrambled order.
            let codes: Vec<u8> =
                (0..n).map(|i| (i * 113 % 256) as u8).map(|c| if c & 0x7f == 0x7f { 0 } else { c }).collect();
            let w: Vec<f32> = codes.iter().map(|&c| e4m3::to_f32(c)).collect();
            let xs: Vec<Vec<f32>> = (0..3).map(|s| data(n, 30 + s)).collect();
            let got = dot_tile_fp8::<3>(&codes, [&xs[0], &xs[1], &xs[2]]);
            for t in 0..3 {
                assert_eq!(got[t].to_bits(), scalar_dot(&w, &xs[t]).to_bits(), "n = {n}");
                assert_eq!(got[t].to_bits(), dot_tile_fp8::<1>(&codes, [&xs[t]])[0].to_bits());
            }
        }
    }

    #[test]
    fn fp8_decoding_matches_the_table_for_every_code() {
        // Code c alone at position c (every lane of every vector), the rest zero.
        let x = vec![1f32; 256];
        for c in 0..=255u8 {
            let mut codes = vec![0u8; 256];
            codes[c as usize] = c;
            let got = dot_tile_fp8::<1>(&codes, [&x])[0];
            let want = e4m3::to_f32(c);
            assert!(got == want || (got.is_nan() && want.is_nan()), "code {c:#04x}: {got} vs {want}");
        }
    }

    #[test]
    fn dot_matches_f64() {
        let (w, x) = (data(1000, 4), data(1000, 5));
        let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((dot(&w, &x) as f64 - exact).abs() < 1e-3);
    }
}
