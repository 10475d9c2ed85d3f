//! The index maps kernels/prefill.cu relies on, emulated on the host: the mma fragment
//! layouts of the PTX ISA (written down independently here), ldmatrix over the swizzled
//! tiles, the banks ldmatrix touches, and which tokens each block takes.

use super::*;
use crate::tensor::{TreeMask, NO_PARENT};

/// `tile_offset` in kernels/prefill.cu: byte offset of 16-byte chunk c of key row `key`.
fn tile_offset(hd: usize, key: usize, c: usize) -> usize {
    (key * (hd / 8) + (c ^ (key & 7))) * 16
}

/// `find_tile` in kernels/prefill.cu.
fn find_tile(rows: &[(u32, u32)], tok: usize, mut tile: usize) -> Option<(usize, usize)> {
    for &(start, len) in rows {
        let tiles = (len as usize).div_ceil(tok);
        if tile < tiles {
            return Some((start as usize + tile * tok, tok.min(len as usize - tile * tok)));
        }
        tile -= tiles;
    }
    None
}

// PTX ISA, mma.m16n8k16 with .bf16 (gid = lane / 4, tig = lane % 4): element e (0..8) of A,
// (0..4) of B and C, as (row, column).
fn a_elem(lane: usize, e: usize) -> (usize, usize) {
    let (gid, tig) = (lane / 4, lane % 4);
    let row = if e < 2 || (4..6).contains(&e) { gid } else { gid + 8 };
    (row, tig * 2 + (e & 1) + if e >= 4 { 8 } else { 0 })
}
fn b_elem(lane: usize, e: usize) -> (usize, usize) {
    (lane % 4 * 2 + (e & 1) + if e >= 2 { 8 } else { 0 }, lane / 4)
}
fn c_elem(lane: usize, e: usize) -> (usize, usize) {
    (lane / 4 + if e >= 2 { 8 } else { 0 }, lane % 4 * 2 + (e & 1))
}

/// D += A B over one warp's fragments: a[lane][reg] holds (lo, hi) values, as do b.
fn mma(d: &mut [[f64; 4]; 32], a: &[[(f64, f64); 4]; 32], b: &[[(f64, f64); 2]; 32]) {
    let (mut am, mut bm) = ([[0f64; 16]; 16], [[0f64; 8]; 16]);
    for lane in 0..32 {
        for e in 0..8 {
            let (r, c) = a_elem(lane, e);
            let v = a[lane][e / 2];
            am[r][c] = if e % 2 == 0 { v.0 } else { v.1 };
        }
        for e in 0..4 {
            let (r, c) = b_elem(lane, e);
            let v = b[lane][e / 2];
            bm[r][c] = if e % 2 == 0 { v.0 } else { v.1 };
        }
    }
    for (lane, dl) in d.iter_mut().enumerate() {
        for (e, x) in dl.iter_mut().enumerate() {
            let (r, c) = c_elem(lane, e);
            *x += (0..16).map(|k| am[r][k] * bm[k][c]).sum::<f64>();
        }
    }
}

/// ldmatrix .x4 (optionally .trans) over `smem` (one value per 2 bytes, keyed by byte
/// offset / 2): lane l gives the address of row l % 8 of matrix l / 8; register i of lane l
/// gets row l / 4, columns 2(l % 4)..+1 of matrix i (.trans: rows 2(l % 4)..+1, column l / 4).
fn ldmatrix(smem: &[f64], addr: impl Fn(usize) -> usize, trans: bool) -> [[(f64, f64); 4]; 32] {
    let at = |m: usize, r: usize, c: usize| smem[addr(8 * m + r) / 2 + c];
    let mut out = [[(0.0, 0.0); 4]; 32];
    for (l, regs) in out.iter_mut().enumerate() {
        for (m, reg) in regs.iter_mut().enumerate() {
            let (r, c) = (l / 4, 2 * (l % 4));
            *reg = if trans { (at(m, c, r), at(m, c + 1, r)) } else { (at(m, r, c), at(m, r, c + 1)) };
        }
    }
    out
}

/// A [PF_KEYS][hd] tile stored as the kernel stores it (swizzled chunks).
fn swizzled(hd: usize, value: impl Fn(usize, usize) -> f64) -> Vec<f64> {
    let mut smem = vec![f64::NAN; 64 * hd];
    for key in 0..64 {
        for d in 0..hd {
            smem[tile_offset(hd, key, d / 8) / 2 + d % 8] = value(key, d);
        }
    }
    smem
}

fn qv(r: usize, d: usize) -> f64 {
    ((r * 31 + d * 7) % 23) as f64 - 11.0
}
fn kv(key: usize, d: usize) -> f64 {
    ((key * 13 + d * 5) % 19) as f64 - 9.0
}
fn vv(key: usize, d: usize) -> f64 {
    ((key * 3 + d * 11) % 17) as f64 - 8.0
}

/// One warp's S = Q K^T and O = S V for a whole tile, through the fragments, ldmatrix and
/// register choices of `WarpRows::scores` and `add_tile`, against the plain products.
#[test]
fn the_warp_computes_q_kt_and_p_v_through_its_fragments() {
    for hd in [64, 128] {
        let (ks, vs) = (swizzled(hd, kv), swizzled(hd, vv));
        // load_q: qh[s][h + 2c] = rows gid + 8h, dimensions 16s + 8c + 2tig..+1.
        let q: Vec<[[(f64, f64); 4]; 32]> = (0..hd / 16)
            .map(|s| {
                std::array::from_fn(|lane| {
                    std::array::from_fn(|reg| {
                        let (h, c) = (reg % 2, reg / 2);
                        let (r, d) = (lane / 4 + 8 * h, 16 * s + 8 * c + 2 * (lane % 4));
                        (qv(r, d), qv(r, d + 1))
                    })
                })
            })
            .collect();
        let mut s = vec![[[0f64; 4]; 32]; 8];
        for (j, sj) in s.iter_mut().enumerate() {
            for sp in 0..hd / 32 {
                let b = ldmatrix(&ks, |l| tile_offset(hd, 8 * j + l % 8, 4 * sp + l / 8), false);
                let pick = |x: usize, y: usize| std::array::from_fn(|l| [b[l][x], b[l][y]]);
                mma(sj, &q[2 * sp], &pick(0, 1));
                mma(sj, &q[2 * sp + 1], &pick(2, 3));
            }
        }
        for (j, sj) in s.iter().enumerate() {
            for (lane, sl) in sj.iter().enumerate() {
                for (e, &got) in sl.iter().enumerate() {
                    let (r, c) = c_elem(lane, e);
                    let want: f64 = (0..hd).map(|d| qv(r, d) * kv(8 * j + c, d)).sum();
                    assert_eq!(got, want, "S hd {hd} lane {lane} tile {j} elem {e}");
                }
            }
        }
        // P = S (as values), as the A fragment of keys 16kk..: tiles 2kk and 2kk+1.
        let mut o = vec![[[0f64; 4]; 32]; hd / 8];
        for kk in 0..4 {
            let p: [[(f64, f64); 4]; 32] = std::array::from_fn(|l| {
                let (a, b) = (&s[2 * kk][l], &s[2 * kk + 1][l]);
                [(a[0], a[1]), (a[2], a[3]), (b[0], b[1]), (b[2], b[3])]
            });
            for dp in 0..hd / 16 {
                let b = ldmatrix(&vs, |l| tile_offset(hd, 16 * kk + l % 8 + 8 * ((l / 8) % 2), 2 * dp + l / 16), true);
                let pick = |x: usize, y: usize| std::array::from_fn(|l| [b[l][x], b[l][y]]);
                mma(&mut o[2 * dp], &p, &pick(0, 1));
                mma(&mut o[2 * dp + 1], &p, &pick(2, 3));
            }
        }
        for (dt, od) in o.iter().enumerate() {
            for (lane, ol) in od.iter().enumerate() {
                for (e, &got) in ol.iter().enumerate() {
                    let (r, c) = c_elem(lane, e);
                    let sc = |key: usize| (0..hd).map(|d| qv(r, d) * kv(key, d)).sum::<f64>();
                    let want: f64 = (0..64).map(|key| sc(key) * vv(key, 8 * dt + c)).sum();
                    assert_eq!(got, want, "O hd {hd} lane {lane} dims {dt} elem {e}");
                }
            }
        }
    }
}

/// The 8 row addresses of each ldmatrix matrix fall in 8 different 16-byte bank groups.
#[test]
fn ldmatrix_reads_are_free_of_bank_conflicts() {
    let distinct = |offsets: Vec<usize>| {
        let mut groups: Vec<usize> = offsets.iter().map(|o| o / 16 % 8).collect();
        groups.sort();
        groups.dedup();
        groups.len() == 8
    };
    for hd in [64, 128] {
        for m in 0..4 {
            for j in 0..8 {
                for sp in 0..hd / 32 {
                    let l = |r: usize| 8 * m + r;
                    assert!(distinct((0..8).map(|r| tile_offset(hd, 8 * j + l(r) % 8, 4 * sp + l(r) / 8)).collect()));
                }
            }
            for kk in 0..4 {
                for dp in 0..hd / 16 {
                    let at = |l: usize| tile_offset(hd, 16 * kk + l % 8 + 8 * ((l / 8) % 2), 2 * dp + l / 16);
                    assert!(distinct((0..8).map(|r| at(8 * m + r)).collect()));
                }
            }
        }
    }
}

fn mixed_meta() -> BatchMeta {
    let mut meta = BatchMeta::new(16);
    let table: Vec<u32> = (0..80).collect();
    meta.push_row(&[1], 299, &table, 1);
    meta.push_row(&[2; 300], 700, &table, 1);
    meta.push_row(&[3; 64], 10, &table, 1); // MATMUL_MAX_TOKENS tokens: the split kernel's
    meta.push_row(&[4; 65], 0, &table, 1);
    let tree = TreeMask { prefix: 6, first: 0, parents: vec![NO_PARENT; 70] };
    meta.push_tree_row(&[5; 70], tree, &table, true).unwrap();
    meta
}

#[test]
fn long_causal_rows_go_to_prefill_and_their_split_positions_are_zero() {
    let meta = mixed_meta();
    let (positions, rows) = plan_host(&meta).unwrap();
    assert_eq!(rows, vec![(1, 300), (365, 65)]);
    let short = meta.rows.iter().filter(|r| !is_long(r)).map(|r| r.start + r.len);
    assert_eq!(short.max(), Some(500)); // the tree row's end: split_tokens
    for (t, (&p, &real)) in positions.iter().zip(&meta.positions).enumerate() {
        let long = (1..301).contains(&t) || (365..430).contains(&t);
        assert_eq!(p, if long { 0 } else { real }, "token {t}");
    }
    let mut short = BatchMeta::new(16);
    short.push_row(&[1; 64], 0, &[0, 1, 2, 3], 1);
    assert!(plan_host(&short).is_none());
}

/// Every long-row token lies in exactly one tile, each tile within one row, for every group.
#[test]
fn tiles_cover_every_long_token_once() {
    let rows = plan_host(&mixed_meta()).unwrap().1;
    for group in 1..=8 {
        let tok = ROWS / group;
        let mut seen = vec![0; 430];
        let tiles: usize = rows.iter().map(|r| (r.1 as usize).div_ceil(tok)).sum();
        for tile in 0..tiles {
            let (t0, count) = find_tile(&rows, tok, tile).unwrap();
            assert!(count >= 1 && count <= tok && count * group <= ROWS);
            assert!(rows.iter().any(|&(s, l)| t0 >= s as usize && t0 + count <= (s + l) as usize));
            seen[t0..t0 + count].iter_mut().for_each(|x| *x += 1);
        }
        assert!(find_tile(&rows, tok, tiles).is_none());
        let want: Vec<i32> = (0..430).map(|t| i32::from((1..301).contains(&t) || (365..430).contains(&t))).collect();
        assert_eq!(seen, want, "group {group}");
    }
}

#[test]
fn kernel_names_follow_their_indices() {
    for hd in [64, 128] {
        for fp8 in [false, true] {
            assert_eq!(
                store_names()[store_index(hd, fp8)],
                format!("kv_store{}_hd{hd}", if fp8 { "_fp8" } else { "" })
            );
            for win in [false, true] {
                assert_eq!(prefill_names()[prefill_index(hd, win, fp8)], prefill_name(hd, win, fp8));
            }
        }
    }
}

/// With a window: every key a query of the block reads is loaded (its tile visited), and
/// every position loaded lies in a block the row still holds (NO_BLOCK is never read).
/// `loadable` and `wanted` as `PrefillTile` has them; freed blocks as `attention_meta`
/// in the parity harness frees them (those wholly before the row's first query's window,
/// past the sinks' blocks).
#[test]
fn windowed_blocks_read_what_their_queries_see_and_only_held_blocks() {
    use crate::tensor::AttnWindow;
    let bs = 16;
    for (size, sinks) in [(100, 4), (64, 0), (1, 1), (200, 16), (37, 5)] {
        let w = AttnWindow::new(size, sinks).unwrap();
        for first in [0, 50, 700, 1000] {
            for (p0, p1) in [(first, first + 63), (first + 64, first + 90), (first + 3, first + 3)] {
                let loadable = |p: usize| p <= p1 && (p < sinks || p as i64 > p0 as i64 - size as i64);
                let wanted = |kt: usize| kt * 64 < sinks || (kt * 64 + 63) as i64 > p0 as i64 - size as i64;
                let freed = |p: usize| {
                    let b = p / bs;
                    b >= sinks.div_ceil(bs) && (b + 1) * bs <= w.first_recent(first)
                };
                for pos in p0..=p1 {
                    for key in (0..=pos).filter(|&k| w.attends(pos, k)) {
                        assert!(loadable(key) && wanted(key / 64), "window {size}+{sinks}, query {pos}, key {key}");
                    }
                }
                assert!((0..=p1).filter(|&p| loadable(p)).all(|p| !freed(p)), "window {size}+{sinks}, from {p0}");
            }
        }
    }
}

/// The values `WarpRows` computes for one query row, in the kernel's order and precision:
/// tiles of 64 keys from 0 (those `wanted`), scores from bf16 hi + lo halves of q in f32,
/// times the key's scale and 1/sqrt(hd) log2(e), masked; the running max in log2 units
/// (0 while nothing is seen), P times the value's scale split into hi + lo.
struct Case<'a> {
    hd: usize,
    keys: &'a [Vec<f32>],
    values: &'a [Vec<f32>],
    /// Per position: the key's and the value's scale (FP8: a power of two; bf16: 1).
    scales: &'a [(f32, f32)],
    window: Option<(usize, usize)>,
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn split(x: f32) -> (f32, f32) {
    let hi = bf16(x);
    (hi, bf16(x - hi))
}

impl Case<'_> {
    fn sees(&self, pos: usize, p: usize) -> bool {
        p <= pos && self.window.is_none_or(|(size, sinks)| p < sinks || pos - p < size)
    }

    fn kernel_row(&self, q: &[f32], pos: usize, p0: usize) -> Vec<f32> {
        let scale2 = std::f32::consts::LOG2_E / (self.hd as f32).sqrt();
        let (mut m, mut l, mut o) = (f32::NEG_INFINITY, 0f32, vec![0f32; self.hd]);
        let wanted = |kt: usize| self.window.is_none_or(|(size, sinks)| kt * 64 < sinks || kt * 64 + 63 + size > p0);
        for kt in (0..=pos / 64).filter(|&kt| wanted(kt)) {
            let keys = kt * 64..(kt * 64 + 64).min(self.keys.len());
            let s: Vec<f32> = keys
                .clone()
                .map(|p| {
                    let dot = |part: fn(f32) -> f32| (0..self.hd).map(|d| part(q[d]) * self.keys[p][d]).sum::<f32>();
                    let raw = dot(|x| split(x).0) + dot(|x| split(x).1);
                    if self.sees(pos, p) {
                        raw * self.scales[p].0 * scale2
                    } else {
                        f32::NEG_INFINITY
                    }
                })
                .collect();
            let mn = s.iter().fold(m, |a, &b| a.max(b));
            let base = if mn == f32::NEG_INFINITY { 0.0 } else { mn };
            let corr = (m - base).exp2();
            m = mn;
            l *= corr;
            o.iter_mut().for_each(|x| *x *= corr);
            for (p, &sp) in keys.zip(&s) {
                let e = (sp - base).exp2();
                l += e;
                let (hi, lo) = split(e * self.scales[p].1);
                for (d, x) in o.iter_mut().enumerate() {
                    *x += hi * self.values[p][d] + lo * self.values[p][d];
                }
            }
        }
        o.iter().map(|x| x / l).collect()
    }

    /// Softmax attention in f64, as written in any textbook.
    fn reference_row(&self, q: &[f32], pos: usize) -> Vec<f64> {
        let seen: Vec<usize> = (0..=pos).filter(|&p| self.sees(pos, p)).collect();
        let score = |p: usize| {
            let dot: f64 = (0..self.hd).map(|d| q[d] as f64 * self.keys[p][d] as f64).sum();
            dot * self.scales[p].0 as f64 / (self.hd as f64).sqrt()
        };
        let mx = seen.iter().map(|&p| score(p)).fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = seen.iter().map(|&p| (score(p) - mx).exp()).collect();
        let sum: f64 = w.iter().sum();
        (0..self.hd)
            .map(|d| {
                seen.iter().zip(&w).map(|(&p, &w)| w * (self.scales[p].1 * self.values[p][d]) as f64).sum::<f64>() / sum
            })
            .collect()
    }
}

/// The kernel's arithmetic (hi + lo halves, exp2, running max, masked tiles skipped or
/// scored as nothing) against f64 softmax attention: far inside the parity tolerance
/// (1e-2 of the largest output), with bf16 and FP8-like caches, with and without a window.
#[test]
fn the_kernel_arithmetic_matches_f64_attention() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (hd, fp8, window) in
        [(64, false, None), (128, true, None), (128, false, Some((100, 4))), (64, true, Some((70, 0)))]
    {
        let n = 400;
        let mut values = |scale: f32| -> Vec<Vec<f32>> {
            (0..n).map(|_| (0..hd).map(|_| bf16((rng.random::<f32>() * 2.0 - 1.0) * scale)).collect()).collect()
        };
        let (keys, vals) = (values(2.0), values(2.0));
        let scales: Vec<(f32, f32)> = (0..n)
            .map(|_| {
                if fp8 {
                    (2f32.powi(rng.random_range(-3..3)), 2f32.powi(rng.random_range(-3..3)))
                } else {
                    (1.0, 1.0)
                }
            })
            .collect();
        let case = Case { hd, keys: &keys, values: &vals, scales: &scales, window };
        let (p0, rows) = (330, 330..n); // a block whose first query sits at 330
        let mut worst = 0f64;
        for pos in rows {
            let q: Vec<f32> = (0..hd).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 3.0).collect();
            let (got, want) = (case.kernel_row(&q, pos, p0), case.reference_row(&q, pos));
            let top = want.iter().fold(0f64, |a, &b| a.max(b.abs()));
            worst = worst.max(got.iter().zip(&want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max) / top);
        }
        assert!(worst < 1e-4, "hd {hd} fp8 {fp8} window {window:?}: {worst:e}");
    }
}
