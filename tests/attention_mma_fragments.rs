//! The index arithmetic of kernels/attention_mma.cu against an emulator of the warp-level
//! instructions it relies on (mma.m16n8k16, ldmatrix .x4 with and without .trans,
//! movmatrix), written from the PTX ISA's fragment layouts. Values are small integers moved
//! as 16-bit elements, so every product is exact: a wrong lane mapping shows as a wrong sum.
//! The kernel's formulas are restated here (marked "kernel:"); keep them in step.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WARP: usize = 32;

/// A register: two 16-bit elements, the lower index in the lower half.
type Reg = [u16; 2];

/// kernel: MmaLayout::swz, byte offset of 16-byte chunk c of row r of a bf16 tile.
fn swz(hd: usize, r: usize, c: usize) -> usize {
    r * hd * 2 + ((c ^ (r & 7)) << 4)
}

/// A [16][hd] tile of 16-bit elements stored as the kernel stores it (swizzled chunks).
fn store_tile(hd: usize, m: &[Vec<u16>]) -> Vec<u16> {
    let mut smem = vec![0u16; 16 * hd];
    for (r, row) in m.iter().enumerate() {
        for (d, &x) in row.iter().enumerate() {
            smem[(swz(hd, r, d / 8) + (d % 8) * 2) / 2] = x;
        }
    }
    smem
}

/// ldmatrix.x4 (.trans): lanes 8i..8i+7 give the rows of matrix i; register i of lane l holds
/// row l / 4, columns 2 (l % 4) and + 1 of matrix i (of its transpose with .trans).
fn ldmatrix_x4(smem: &[u16], addr: &[usize; WARP], trans: bool) -> Vec<[Reg; 4]> {
    let elem = |i: usize, row: usize, col: usize| smem[addr[8 * i + row] / 2 + col];
    (0..WARP)
        .map(|l| {
            std::array::from_fn(|i| {
                let (r, c) = (l / 4, 2 * (l % 4));
                if trans {
                    [elem(i, c, r), elem(i, c + 1, r)]
                } else {
                    [elem(i, r, c), elem(i, r, c + 1)]
                }
            })
        })
        .collect()
}

/// movmatrix.m8n8.trans.b16: lane l holds row l / 4, columns 2 (l % 4), + 1, before and after.
fn movmatrix(x: &[Reg]) -> Vec<Reg> {
    let m = |r: usize, c: usize| x[4 * r + c / 2][c % 2];
    (0..WARP).map(|l| [m(2 * (l % 4), l / 4), m(2 * (l % 4) + 1, l / 4)]).collect()
}

/// mma.m16n8k16.row.col: A 16x16 (a0: row g, cols 2t, 2t+1; a1: row g+8; a2: cols +8; a3:
/// both), B 16x8 (b0: rows 2t, 2t+1, col g; b1: rows +8), C 16x8 (c0, c1: row g, cols 2t,
/// 2t+1; c2, c3: row g+8), with g = lane / 4, t = lane % 4.
fn mma(c: &mut [[i64; 4]], a: &[[Reg; 4]], b: &[[Reg; 2]]) {
    let (mut am, mut bm) = ([[0i64; 16]; 16], [[0i64; 8]; 16]);
    for l in 0..WARP {
        let (g, t) = (l / 4, l % 4);
        for (i, (dr, dc)) in [(0, 0), (8, 0), (0, 8), (8, 8)].into_iter().enumerate() {
            for e in 0..2 {
                am[g + dr][2 * t + e + dc] = a[l][i][e] as i64;
            }
        }
        for (i, dr) in [0, 8].into_iter().enumerate() {
            for e in 0..2 {
                bm[2 * t + e + dr][g] = b[l][i][e] as i64;
            }
        }
    }
    for (l, cl) in c.iter_mut().enumerate() {
        let (g, t) = (l / 4, l % 4);
        for (i, slot) in cl.iter_mut().enumerate() {
            let (row, col) = (g + 8 * (i / 2), 2 * t + i % 2);
            *slot += (0..16).map(|k| am[row][k] * bm[k][col]).sum::<i64>();
        }
    }
}

fn random(rng: &mut StdRng, rows: usize, cols: usize) -> Vec<Vec<u16>> {
    (0..rows).map(|_| (0..cols).map(|_| rng.random_range(0..16)).collect()).collect()
}

/// S^T = K . Q^T with the kernel's K addresses and Q fragments (tile_scores, load_q).
#[test]
fn scores_fragments() {
    let mut rng = StdRng::seed_from_u64(1);
    for hd in [64, 128] {
        let (k, q) = (random(&mut rng, 16, hd), random(&mut rng, 8, hd));
        let smem = store_tile(hd, &k);
        let mut c = vec![[0i64; 4]; WARP];
        for kk in 0..hd / 16 {
            // kernel: row lane % 16, chunk 2kk + lane / 16.
            let addr = std::array::from_fn(|l| swz(hd, l % 16, 2 * kk + l / 16));
            let a = ldmatrix_x4(&smem, &addr, false);
            // kernel (load_q): head lane / 4, dims 16kk + 2 (lane % 4) (+1) and + 8 (+9).
            let b: Vec<[Reg; 2]> = (0..WARP)
                .map(|l| {
                    let (h, d) = (l / 4, 16 * kk + 2 * (l % 4));
                    [[q[h][d], q[h][d + 1]], [q[h][d + 8], q[h][d + 9]]]
                })
                .collect();
            mma(&mut c, &a, &b);
        }
        for (l, cl) in c.iter().enumerate() {
            for (i, &got) in cl.iter().enumerate() {
                // kernel (scale_scores, MmaSoftmax): position lane / 4 (+8), head 2 (lane % 4) + i % 2.
                let (p, h) = (l / 4 + 8 * (i / 2), 2 * (l % 4) + i % 2);
                let want: i64 = (0..hd).map(|d| k[p][d] as i64 * q[h][d] as i64).sum();
                assert_eq!(got, want, "hd {hd} lane {l} c{i}");
            }
        }
    }
}

/// O^T += V^T . P^T with the kernel's V addresses and P^T built from the scores' C
/// fragment by movmatrix (tile_outputs, probs_fragment), read back as stage_state does.
#[test]
fn outputs_fragments() {
    let mut rng = StdRng::seed_from_u64(2);
    for hd in [64, 128] {
        let (v, p) = (random(&mut rng, 16, hd), random(&mut rng, 16, 8));
        let smem = store_tile(hd, &v);
        // The probabilities in the scores' C layout, packed in pairs of heads per row half.
        let half = |dr: usize| -> Vec<Reg> {
            (0..WARP).map(|l| [p[l / 4 + dr][2 * (l % 4)], p[l / 4 + dr][2 * (l % 4) + 1]]).collect()
        };
        let (b0, b1) = (movmatrix(&half(0)), movmatrix(&half(8)));
        let b: Vec<[Reg; 2]> = (0..WARP).map(|l| [b0[l], b1[l]]).collect();
        for mt in 0..hd / 16 {
            // kernel: row lane % 8 + 8 (lane / 16), chunk 2mt + (lane / 8) % 2.
            let addr = std::array::from_fn(|l| swz(hd, l % 8 + 8 * (l / 16), 2 * mt + (l / 8) % 2));
            let a = ldmatrix_x4(&smem, &addr, true);
            let mut o = vec![[0i64; 4]; WARP];
            mma(&mut o, &a, &b);
            for (l, ol) in o.iter().enumerate() {
                for (i, &got) in ol.iter().enumerate() {
                    // kernel (stage_state): dim 16mt + lane / 4 (+8 for i >= 2), head 2 (lane % 4) + i % 2.
                    let (d, h) = (16 * mt + l / 4 + 8 * (i / 2), 2 * (l % 4) + i % 2);
                    let want: i64 = (0..16).map(|r| v[r][d] as i64 * p[r][h] as i64).sum();
                    assert_eq!(got, want, "hd {hd} m-tile {mt} lane {l} c{i}");
                }
            }
        }
    }
}

/// The 8 rows of each ldmatrix matrix fall in 8 different 16-byte bank groups.
#[test]
fn ldmatrix_rows_avoid_bank_conflicts() {
    for hd in [64, 128] {
        for step in 0..hd / 16 {
            let k = |l: usize| swz(hd, l % 16, 2 * step + l / 16);
            let v = |l: usize| swz(hd, l % 8 + 8 * (l / 16), 2 * step + (l / 8) % 2);
            for addr in [&k as &dyn Fn(usize) -> usize, &v] {
                for m in 0..4 {
                    let mut groups: Vec<usize> = (0..8).map(|i| addr(8 * m + i) / 16 % 8).collect();
                    groups.sort();
                    groups.dedup();
                    assert_eq!(groups.len(), 8, "hd {hd} step {step} matrix {m}");
                }
            }
        }
    }
}

/// The lanes' copies of a slot (MmaView::issue), their writes of one row (own_row) and the
/// FP8 conversion (codes_to_tile) each cover every byte exactly once.
#[test]
fn slot_coverage() {
    for hd in [64, 128] {
        for elem in [1, 2] {
            let chunks = hd * elem / 16;
            let rpi = WARP / chunks; // kernel: rows per pass
            let mut seen = vec![0; 16 * chunks];
            for i in 0..16 / rpi {
                for l in 0..WARP {
                    seen[(i * rpi + l / chunks) * chunks + l % chunks] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "issue hd {hd} elem {elem}");
            let pl = hd / WARP;
            let mut row = vec![0; hd];
            (0..WARP).for_each(|l| (0..pl).for_each(|i| row[l * pl + i] += 1));
            assert!(row.iter().all(|&n| n == 1));
        }
        let nc = hd / 32; // kernel: 16-code chunks per half row
        let mut seen = vec![0; 16 * hd / 16];
        for l in 0..WARP {
            for i in 0..nc {
                let (r, h) = (l / 2, l % 2);
                seen[r * hd / 16 + h * nc + (i + r) % nc] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "codes_to_tile hd {hd}");
    }
}

/// An E4M3 code's value, from its fields.
fn e4m3(code: u8) -> f32 {
    let (sign, exp, man) = (code >> 7, (code >> 3) & 15, code & 7);
    let mag =
        if exp == 0 { man as f32 / 8.0 * 2f32.powi(-6) } else { (1.0 + man as f32 / 8.0) * 2f32.powi(exp as i32 - 7) };
    if sign == 1 {
        -mag
    } else {
        mag
    }
}

/// kernel: e4m3x2_bf16x2, from the f16 the hardware gives (exact), to the same value in bf16.
#[test]
fn e4m3_to_bf16_is_exact() {
    for code in 0..=255u8 {
        if code & 0x7f == 0x7f {
            continue; // NaN: never stored (the encoder saturates)
        }
        let h = half::f16::from_f32(e4m3(code)).to_bits() as u32;
        let b = (h & 0x8000) | ((h >> 3) & 0x0fff);
        let scaled = half::bf16::from_bits(b as u16).to_f32() * half::bf16::from_bits(0x7780).to_f32();
        assert_eq!(scaled, e4m3(code), "code {code:#x}");
    }
}
