//! Tree attention on the CPU: each token of a tree row attends to the sequence before the
//! tree and to its own ancestors only, as an f64 softmax over exactly those positions says;
//! keys and values land at the nodes' storage slots through a shuffled block table, and a
//! row that extends a tree already cached (as a drafting head does) reads the cached nodes.

mod common;

use common::tiny::Rng;
use specula::backend::cpu::CpuBackend;
use specula::backend::{AttnShape, Backend, BatchMeta};
use specula::tensor::{HostTensor, TreeMask, NO_PARENT};

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = 8;
const BS: u32 = 4;

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// softmax(q·kᵀ/√d)·v in f64 over the given key/value rows, all heads.
fn reference(q: &[f32], keys: &[&[f32]], values: &[&[f32]]) -> Vec<f64> {
    let group = HEADS / KV_HEADS;
    let mut out = vec![0f64; HEADS * HD];
    for h in 0..HEADS {
        let kvh = h / group;
        let qh = &q[h * HD..(h + 1) * HD];
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| {
                qh.iter().zip(&k[kvh * HD..]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / (HD as f64).sqrt()
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = w.iter().sum();
        for (wi, v) in w.iter().zip(values) {
            for d in 0..HD {
                out[h * HD + d] += wi / sum * v[kvh * HD + d] as f64;
            }
        }
    }
    out
}

/// Runs the nodes `first..` of `parents` as one tree row over a cache holding `prefix`
/// positions and the nodes before `first`; checks every token against the reference.
fn check(parents: Vec<u32>, prefix: u32, first: u32, seed: u64) {
    let mut rng = Rng(seed);
    let kv_dim = KV_HEADS * HD;
    let stored = prefix as usize + parents.len();
    let blocks = stored.div_ceil(BS as usize);
    // A shuffled block table: storage position p lives in block table[p / BS].
    let table: Vec<u32> = (0..blocks as u32).map(|b| (b * 5 + 3) % blocks as u32).collect();
    let slot = |p: usize| (table[p / BS as usize] * BS + p as u32 % BS) as usize;
    // Keys and values of every storage position, the cache filled with them (the row's own
    // are written again by the op).
    let (keys, values) = (random(&mut rng, stored * kv_dim), random(&mut rng, stored * kv_dim));
    let mut kc = vec![0f32; blocks * BS as usize * kv_dim];
    let mut vc = kc.clone();
    for p in 0..stored {
        kc[slot(p) * kv_dim..(slot(p) + 1) * kv_dim].copy_from_slice(&keys[p * kv_dim..(p + 1) * kv_dim]);
        vc[slot(p) * kv_dim..(slot(p) + 1) * kv_dim].copy_from_slice(&values[p * kv_dim..(p + 1) * kv_dim]);
    }
    let n = parents.len() - first as usize;
    let tree = TreeMask { prefix, first, parents: parents.clone() };
    let mut meta = BatchMeta::new(BS);
    meta.push_tree_row(&vec![0; n], tree.clone(), &table, true).unwrap();
    let rows = |data: &[f32], w: usize| {
        let lo = (prefix + first) as usize;
        HostTensor::new(vec![n, w], data[lo * w..(lo + n) * w].to_vec())
    };
    let q = random(&mut rng, n * HEADS * HD);
    let b = CpuBackend::new();
    let up = |t: HostTensor| b.upload(&t).unwrap();
    let shape = AttnShape { num_heads: HEADS, num_kv_heads: KV_HEADS, head_dim: HD, window: None };
    let (mut kt, mut vt) = (
        up(HostTensor::new(vec![kc.len() / kv_dim, kv_dim], kc)),
        up(HostTensor::new(vec![vc.len() / kv_dim, kv_dim], vc)),
    );
    let qt = up(HostTensor::new(vec![n, HEADS * HD], q.clone()));
    let out =
        b.attention(&qt, &up(rows(&keys, kv_dim)), &up(rows(&values, kv_dim)), &mut kt, &mut vt, &meta, shape).unwrap();
    let out = b.to_host(&out).unwrap();
    for i in 0..n {
        let node = first + i as u32;
        let path = tree.path(node);
        assert_eq!(meta.positions[i], prefix + path.len() as u32 - 1, "node {node}'s position is its depth");
        let read: Vec<usize> = (0..prefix as usize).chain(path.iter().map(|&a| (prefix + a) as usize)).collect();
        let ks: Vec<&[f32]> = read.iter().map(|&p| &keys[p * kv_dim..(p + 1) * kv_dim]).collect();
        let vs: Vec<&[f32]> = read.iter().map(|&p| &values[p * kv_dim..(p + 1) * kv_dim]).collect();
        let want = reference(&q[i * HEADS * HD..(i + 1) * HEADS * HD], &ks, &vs);
        let got = &out[i * HEADS * HD..(i + 1) * HEADS * HD];
        let err = want.iter().zip(got).map(|(&w, &g)| (w - g as f64).abs()).fold(0.0, f64::max);
        assert!(err < 1e-5, "node {node}: max error {err}");
    }
}

#[test]
fn each_node_reads_the_prefix_and_its_ancestors_only() {
    // 0 → {1, 2}, 1 → 3, 2 → {4, 5}, 4 → 6: the verification row of the last token and six drafts.
    let parents = vec![NO_PARENT, 0, 0, 1, 2, 2, 4];
    check(parents.clone(), 9, 0, 1);
    check(parents, 0, 0, 2);
    // A chain is the causal row.
    check(vec![NO_PARENT, 0, 1, 2], 5, 0, 3);
}

#[test]
fn a_row_extending_a_cached_tree_reads_the_cached_ancestors() {
    // A drafting head's third depth: nodes 0..4 are cached, 4..7 run now; several roots.
    let parents = vec![NO_PARENT, NO_PARENT, 0, 1, 2, 3, 3];
    check(parents, 6, 4, 4);
}

#[test]
fn a_tree_whose_parents_follow_their_children_is_refused() {
    let mut meta = BatchMeta::new(BS);
    let bad = TreeMask { prefix: 2, first: 0, parents: vec![NO_PARENT, 2, 0] };
    assert!(meta.push_tree_row(&[1, 2, 3], bad, &[0, 1], true).is_err());
    let short = TreeMask { prefix: 2, first: 1, parents: vec![NO_PARENT, 0] };
    assert!(meta.push_tree_row(&[1, 2], short, &[0, 1], true).is_err());
    assert!(meta.tokens.is_empty());
}
