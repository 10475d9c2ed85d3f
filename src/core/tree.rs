//! Tree speculation's pure parts: a tree of draft tokens, how the EAGLE-2 way of growing it
//! picks nodes (the highest cumulative draft probability up to a node budget), and acceptance
//! of its longest root-to-leaf path that the target's own choices follow.
//!
//! ```text
//!  node 0: the row's last token (verified, not a draft)      0
//!  nodes 1..=n: drafts, each after its parent               / \
//!  target[i]: the target's token after node i              1   2      path 0 → 2 → 4:
//!                                                         /   / \     tokens[2], tokens[4],
//!                                                        3   4   5    then target[4]
//! ```

use super::sampling::Sampler;
use crate::tensor::{TreeMask, NO_PARENT};

/// How a tree grows: at most `nodes` drafts, `depth` deep, the `top_k` likeliest children
/// of the `top_k` best nodes of each depth considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeShape {
    pub nodes: usize,
    pub top_k: usize,
    pub depth: usize,
}

/// The most draft nodes a tree may have (a verification row is one more).
pub const MAX_TREE_NODES: usize = 64;
/// The most children considered per node.
pub const MAX_TREE_TOP_K: usize = 16;

/// Draft tokens as a tree: node i (1-based) is `tokens[i - 1]`, after node `parents[i - 1]`
/// (0 is the row's last token). Parents come before their children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeDraft {
    pub tokens: Vec<u32>,
    pub parents: Vec<u32>,
}

impl TreeDraft {
    /// Draft nodes (the root not counted).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Node `i`'s depth: the root's is 0, its children's 1.
    pub fn depth(&self, i: usize) -> usize {
        let mut d = 0;
        let mut at = i;
        while at != 0 {
            at = self.parents[at - 1] as usize;
            d += 1;
        }
        d
    }

    /// The deepest node's depth.
    pub fn max_depth(&self) -> usize {
        (1..=self.len()).map(|i| self.depth(i)).max().unwrap_or(0)
    }

    /// Whether every parent is an earlier node.
    pub fn is_valid(&self) -> bool {
        self.tokens.len() == self.parents.len() && self.parents.iter().enumerate().all(|(j, &p)| (p as usize) <= j)
    }

    /// The verification row's mask: the root (the last token) at storage position
    /// `prefix`, node i at `prefix + i`.
    pub fn mask(&self, prefix: u32) -> TreeMask {
        let parents = std::iter::once(NO_PARENT).chain(self.parents.iter().copied()).collect();
        TreeMask { prefix, first: 0, parents }
    }

    /// The row's tokens: the last token, then every draft node.
    pub fn row(&self, last: u32) -> Vec<u32> {
        std::iter::once(last).chain(self.tokens.iter().copied()).collect()
    }

    /// The tokens from the root (excluded) down to node `i` (included).
    pub fn path_tokens(&self, i: usize) -> Vec<u32> {
        let mut out = vec![];
        let mut at = i;
        while at != 0 {
            out.push(self.tokens[at - 1]);
            at = self.parents[at - 1] as usize;
        }
        out.reverse();
        out
    }
}

/// What the target kept of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeAccept {
    /// The accepted nodes, root's child first (node indices, 1-based).
    pub path: Vec<usize>,
    /// The tokens to append: the accepted drafts, then the target's own token.
    pub tokens: Vec<u32>,
}

/// Verification of a tree: from the root, follow the child whose token is the target's
/// choice after its parent (`target[i]`: after node i, `draft.len() + 1` of them; its argmax,
/// or its sample in that node's context), then add the target's own token. Siblings carry
/// different tokens, so the path is unique; were two equal, the first is taken.
pub fn accept_tree(draft: &TreeDraft, target: &[u32]) -> TreeAccept {
    assert_eq!(target.len(), draft.len() + 1, "n nodes need n + 1 target predictions");
    let (mut path, mut tokens, mut at) = (vec![], vec![], 0usize);
    loop {
        let want = target[at];
        tokens.push(want);
        let child = (1..=draft.len()).find(|&c| draft.parents[c - 1] as usize == at && draft.tokens[c - 1] == want);
        match child {
            Some(c) => {
                path.push(c);
                at = c;
            }
            None => return TreeAccept { path, tokens },
        }
    }
}

/// The target's token after each node (a logits row per node, the root's first), sampled
/// in the node's own context: the sequence `history`, then the node's path. Lossless for
/// drafts chosen without randomness: the token emitted after a node is the target's own
/// sample there, and the walk (`accept_tree`) goes on only into the child drafted with it;
/// every node gets an independent draw, the unused ones are discarded.
pub fn sample_node_targets(logits: &[f32], tree: &TreeDraft, history: &[u32], sampler: &mut Sampler) -> Vec<u32> {
    let vocab = logits.len() / (tree.len() + 1);
    let mut context = history.to_vec();
    let rows = logits.chunks(vocab).enumerate();
    rows.map(|(i, row)| {
        context.truncate(history.len());
        context.extend(tree.path_tokens(i));
        sampler.sample(row, &context)
    })
    .collect()
}

/// Slot moves that bring the accepted path (the root at position `p`, node j stored at
/// `p + j`) onto positions `p + 1, p + 2, ...`, through the row's block `table`.
pub fn path_moves(accept: &TreeAccept, p: usize, table: &[u32], block_size: usize) -> Vec<(u32, u32)> {
    let slot = |pos: usize| table[pos / block_size] * block_size as u32 + (pos % block_size) as u32;
    let moves = accept.path.iter().enumerate().filter(|&(j, &a)| a != j + 1);
    moves.map(|(j, &a)| (slot(p + a), slot(p + j + 1))).collect()
}

/// A candidate node while a tree grows: its token, its parent (a candidate index, or None
/// for the root's children) and the log of its cumulative draft probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub token: u32,
    pub parent: Option<usize>,
    pub score: f64,
}

/// Adds `parent`'s children `top` (tokens with their log-probabilities; parent None: the
/// root's) to `cands`; returns their indices.
pub fn expand(cands: &mut Vec<Candidate>, parent: Option<usize>, top: &[(u32, f64)]) -> Vec<usize> {
    let base = parent.map_or(0.0, |p| cands[p].score);
    let start = cands.len();
    cands.extend(top.iter().map(|&(token, logp)| Candidate { token, parent, score: base + logp }));
    (start..cands.len()).collect()
}

/// The `k` candidates of `ids` of highest score (ties to the earlier), in candidate order
/// (parents first).
pub fn best(cands: &[Candidate], ids: impl IntoIterator<Item = usize>, k: usize) -> Vec<usize> {
    let mut best: Vec<usize> = ids.into_iter().collect();
    best.sort_by(|&a, &b| cands[b].score.total_cmp(&cands[a].score).then(a.cmp(&b)));
    best.truncate(k);
    best.sort_unstable();
    best
}

/// The `budget` candidates of highest score, as a `TreeDraft` in candidate order (parents
/// first). A child's score is never above its parent's, and ties keep the earlier
/// candidate, so every parent of a node kept is kept.
pub fn select_tree(cands: &[Candidate], budget: usize) -> TreeDraft {
    let kept = best(cands, 0..cands.len(), budget);
    // Node of each kept candidate: its place in `kept`, plus 1 for the root.
    let node = |c: usize| kept.binary_search(&c).map(|i| i as u32 + 1);
    let mut draft = TreeDraft::default();
    for &c in &kept {
        let parent = match cands[c].parent {
            None => Ok(0),
            Some(p) => node(p),
        };
        // A parent cut by the budget (only through NaN scores) drops its subtree.
        let Ok(parent) = parent else { continue };
        draft.tokens.push(cands[c].token);
        draft.parents.push(parent);
    }
    draft
}

/// The `k` largest entries of `values` (probabilities, logits) with their index, largest first, ties to the
/// lower index.
pub fn top_k(probs: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &p) in probs.iter().enumerate() {
        if best.len() == k && best.last().is_none_or(|&(_, q)| p <= q) {
            continue;
        }
        let at = best.partition_point(|&(_, q)| q >= p);
        best.insert(at, (i as u32, p));
        best.truncate(k);
    }
    best
}

/// The `k` largest logits' tokens with their log-softmax (temperature 1).
pub fn top_log_probs(logits: &[f32], k: usize) -> Vec<(u32, f64)> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    top_k(logits, k).into_iter().map(|(t, l)| (t, l as f64 - lse)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree of the module's diagram, tokens 10 + node.
    fn diagram() -> TreeDraft {
        TreeDraft { tokens: vec![11, 12, 13, 14, 15], parents: vec![0, 0, 1, 2, 2] }
    }

    #[test]
    fn moves_bring_the_path_onto_consecutive_slots_across_blocks() {
        // Root at position 6 of blocks [3, 9] of 4 slots: positions 6, 7 in block 3, 8.. in 9.
        let accept = TreeAccept { path: vec![2, 3, 5], tokens: vec![0; 4] };
        // Node 2 (position 8 → slot 36) to position 7 (slot 15), node 3 (9 → 37) to 8
        // (36), node 5 (11 → 39) to 9 (37).
        assert_eq!(path_moves(&accept, 6, &[0, 3, 9], 4), vec![(36, 15), (37, 36), (39, 37)]);
        // A path that is already consecutive moves nothing.
        let chain = TreeAccept { path: vec![1, 2], tokens: vec![0; 3] };
        assert!(path_moves(&chain, 6, &[0, 3, 9], 4).is_empty());
    }

    #[test]
    fn greedy_follows_the_matching_child_then_adds_the_targets_token() {
        let d = diagram();
        assert!(d.is_valid());
        assert_eq!((d.max_depth(), d.depth(4), d.path_tokens(4)), (2, 2, vec![12, 14]));
        // target after node: 0 → 12, 2 → 14, 4 → 99.
        let target = [12, 0, 14, 0, 99, 0];
        assert_eq!(accept_tree(&d, &target), TreeAccept { path: vec![2, 4], tokens: vec![12, 14, 99] });
        // The root's choice matches no child: no draft held.
        let none = [7, 0, 0, 0, 0, 0];
        assert_eq!(accept_tree(&d, &none), TreeAccept { path: vec![], tokens: vec![7] });
        // A chain is a tree: the same as chain acceptance.
        let chain = TreeDraft { tokens: vec![5, 6, 7], parents: vec![0, 1, 2] };
        let t = [5, 6, 8, 9];
        assert_eq!(accept_tree(&chain, &t).tokens, crate::core::spec::accept_greedy(&chain.tokens, &t));
    }

    #[test]
    fn selection_keeps_the_best_scores_and_their_parents() {
        let c = |token, parent, p: f64| Candidate { token, parent, score: p.ln() };
        let cands = [
            c(1, None, 0.6),
            c(2, None, 0.3),
            c(3, Some(0), 0.5),  // 0.6 · 0.83
            c(4, Some(0), 0.05), // cut
            c(5, Some(1), 0.25), // 0.3 · 0.83
            c(6, Some(2), 0.4),
        ];
        let d = select_tree(&cands, 5);
        assert_eq!(d, TreeDraft { tokens: vec![1, 2, 3, 5, 6], parents: vec![0, 0, 1, 2, 3] });
        assert_eq!(d.mask(7).parents, vec![NO_PARENT, 0, 0, 1, 2, 3]);
    }

    #[test]
    fn top_k_is_the_sorted_largest() {
        let p = [0.1, 0.4, 0.05, 0.4, 0.3];
        assert_eq!(top_k(&p, 3), vec![(1, 0.4), (3, 0.4), (4, 0.3)]);
        assert_eq!(top_k(&p, 0), vec![]);
        assert_eq!(top_k(&p, 9).len(), 5);
    }
}
