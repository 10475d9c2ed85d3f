//! Lookahead decoding (Fu et al., 2024; TensorRT-LLM's `(W, N, G)`), pure: each step's
//! row carries a lookahead branch of Jacobi iterations and up to G candidate n-grams from a
//! pool, and the target's greedy tokens over the row grow the branch and fill the pool.
//!
//! ```text
//!  window (N-1 levels of W guesses; level 0 the oldest), column j, level l at position
//!  p + 1 + l + j (p: the row's last token, the root):
//!     level 2:        c2  ...            each node reads the root, level 0 up to its
//!     level 1:     b1 b2  ...            column, and its own column below it: the path
//!     level 0:  a0 a1 a2  ...            root → a0 → … → a_j → b_j → c_j (a tree)
//!  target's token after c_j → the new top guess of column j;
//!  n-gram of column j: a_j b_j c_j (new c_j) → pool[a_j]
//!  verification: the pool's n-grams after the root, merged into a trie (a tree too)
//! ```
//! Both branches are trees, so the one-request engine (or the runtime's Verifier) verifies
//! them together with the tree mask; any path the target agrees with is accepted (the branch's own guesses too).
//! The pool also starts with the prompt's n-grams (prompt lookup, for free).

use std::collections::{HashMap, VecDeque};

use super::tree::{accept_tree, TreeDraft, TreeShape, MAX_TREE_NODES};

/// The lookahead window `W`, n-gram size `N` and verification set `G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookaheadConfig {
    pub window: usize,
    pub ngram: usize,
    pub guesses: usize,
}

impl Default for LookaheadConfig {
    fn default() -> Self {
        LookaheadConfig { window: 5, ngram: 4, guesses: 5 }
    }
}

impl LookaheadConfig {
    /// The most draft nodes a step carries: the branch and G n-grams of N - 1 tokens.
    pub fn max_nodes(&self) -> usize {
        (self.window + self.guesses) * (self.ngram - 1)
    }

    /// Whether the shape works: W ≥ 1, N ≥ 2, G ≥ 0 and every node fits one tree row.
    pub fn is_valid(&self) -> bool {
        self.window >= 1 && self.ngram >= 2 && self.max_nodes() <= MAX_TREE_NODES
    }

    /// How deep a step's tree goes: the branch's last column, top level.
    pub fn depth(&self) -> usize {
        self.window + self.ngram - 1
    }

    /// The tree each step verifies: every node, one candidate per position, this deep.
    pub fn tree_shape(&self) -> TreeShape {
        TreeShape { nodes: self.max_nodes(), top_k: 1, depth: self.depth() }
    }
}

/// One request's lookahead state.
#[derive(Debug, Clone)]
pub struct Lookahead {
    config: LookaheadConfig,
    /// `levels[l][j]`; fewer than N - 1 levels while warming up.
    levels: Vec<Vec<u32>>,
    /// First token → the N - 1 tokens that followed it, newest first, at most G.
    pool: HashMap<u32, VecDeque<Vec<u32>>>,
    /// The nodes of the last draft's branch, `[level][column]` (1-based node numbers).
    branch: Vec<Vec<usize>>,
    /// Node count of the last draft's verification part (its nodes are 1..=this).
    verify_nodes: usize,
    /// Accepted tokens that came from the pool's n-grams.
    pub pool_accepted: u64,
    rng: u64,
}

impl Lookahead {
    /// A fresh state for a request whose sequence so far is `history` (the pool starts with
    /// its n-grams; level 0 with tokens picked from it).
    pub fn new(config: LookaheadConfig, history: &[u32]) -> Self {
        let mut la = Lookahead {
            config,
            levels: vec![],
            pool: HashMap::new(),
            branch: vec![],
            verify_nodes: 0,
            pool_accepted: 0,
            rng: 0x9E37_79B9_7F4A_7C15 ^ history.len() as u64,
        };
        for gram in history.windows(config.ngram) {
            la.insert(gram);
        }
        let first = (0..config.window).map(|_| la.pick(history)).collect();
        la.levels.push(first);
        la
    }

    /// A token of `history` picked at random (the initial guesses, as the paper's).
    fn pick(&mut self, history: &[u32]) -> u32 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        history.get(self.rng as usize % history.len().max(1)).copied().unwrap_or(0)
    }

    /// Adds an n-gram to the pool: its first token keys the rest.
    fn insert(&mut self, gram: &[u32]) {
        let list = self.pool.entry(gram[0]).or_default();
        let rest = &gram[1..];
        if let Some(at) = list.iter().position(|g| g == rest) {
            list.remove(at);
        }
        list.push_front(rest.to_vec());
        list.truncate(self.config.guesses.max(1));
    }

    /// The step's tree after `last` (the root), no deeper than `depth`: the pool's n-grams
    /// for `last` as a trie, then the lookahead branch when it fits.
    pub fn draft(&mut self, last: u32, depth: usize) -> TreeDraft {
        let mut tree = TreeDraft::default();
        let mut children: HashMap<(u32, u32), u32> = HashMap::new();
        for gram in self.pool.get(&last).into_iter().flatten().take(self.config.guesses) {
            let mut at = 0u32;
            for &t in gram.iter().take(depth) {
                at = *children.entry((at, t)).or_insert_with(|| {
                    tree.tokens.push(t);
                    tree.parents.push(at);
                    tree.tokens.len() as u32
                });
            }
        }
        self.verify_nodes = tree.len();
        self.branch.clear();
        if depth >= self.levels.len() + self.config.window - 1 {
            self.push_branch(&mut tree);
        }
        tree
    }

    /// The window's guesses as nodes: level 0 a chain from the root, each higher level's
    /// node under the one below it in its column.
    fn push_branch(&mut self, tree: &mut TreeDraft) {
        for (l, level) in self.levels.iter().enumerate() {
            let mut nodes = vec![];
            for (j, &t) in level.iter().enumerate() {
                let parent = match (l, j) {
                    (0, 0) => 0,
                    (0, _) => nodes[j - 1],
                    _ => self.branch[l - 1][j],
                };
                tree.tokens.push(t);
                tree.parents.push(parent as u32);
                nodes.push(tree.len());
            }
            self.branch.push(nodes);
        }
    }

    /// Takes the target's greedy token after each node of the last draft (`targets[0]`:
    /// after the root): the top level's outputs become a new level, and once the window is
    /// full each column's n-gram goes to the pool and the oldest level goes.
    /// Anything but the last draft's targets (one per node, and the root's) is ignored.
    pub fn update(&mut self, tree: &TreeDraft, targets: &[u32]) {
        let (branch, verify_nodes) = (std::mem::take(&mut self.branch), std::mem::take(&mut self.verify_nodes));
        let last_node = branch.last().and_then(|top| top.last()).copied().unwrap_or(verify_nodes);
        if targets.len() != tree.len() + 1 || last_node > tree.len() {
            return;
        }
        let accept = accept_tree(tree, targets);
        self.pool_accepted += accept.path.iter().filter(|&&n| n <= verify_nodes).count() as u64;
        let Some(top) = branch.last() else { return };
        let new: Vec<u32> = top.iter().map(|&n| targets[n]).collect();
        if self.levels.len() == self.config.ngram - 1 {
            for j in 0..self.config.window {
                let gram: Vec<u32> = self.levels.iter().map(|l| l[j]).chain([new[j]]).collect();
                self.insert(&gram);
            }
            self.levels.remove(0);
        }
        self.levels.push(new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_branch_is_a_tree_of_diagonals_and_grows_a_level_per_step() {
        let config = LookaheadConfig { window: 3, ngram: 3, guesses: 2 };
        let mut la = Lookahead::new(config, &[7]);
        assert_eq!(la.levels, vec![vec![7, 7, 7]]);
        let t = la.draft(7, 10);
        // No n-grams yet: the branch only, level 0 a chain.
        assert_eq!((t.parents.clone(), la.verify_nodes), (vec![0, 1, 2], 0));
        // Targets of another tree (a step that drafted nothing) change nothing.
        la.update(&TreeDraft::default(), &[1]);
        assert_eq!(la.levels.len(), 1);
        let t = la.draft(7, 10);
        la.update(&t, &[1, 2, 3, 4]);
        assert_eq!(la.levels, vec![vec![7, 7, 7], vec![2, 3, 4]]);
        let t = la.draft(9, 10);
        // Level 1's node j hangs from level 0's node j; depth of (l, j) is 1 + l + j.
        assert_eq!(t.parents, vec![0, 1, 2, 1, 2, 3]);
        assert_eq!((1..=6).map(|i| t.depth(i)).collect::<Vec<_>>(), vec![1, 2, 3, 2, 3, 4]);
        la.update(&t, &[0, 0, 0, 0, 5, 6, 8]);
        // Full window: the columns' n-grams (7 2 5), (7 3 6), (7 4 8) enter the pool.
        assert_eq!(la.levels, vec![vec![2, 3, 4], vec![5, 6, 8]]);
        assert_eq!(la.pool[&7], VecDeque::from(vec![vec![4, 8], vec![3, 6]]));
    }

    #[test]
    fn pool_ngrams_form_a_trie_before_the_branch() {
        let config = LookaheadConfig { window: 2, ngram: 3, guesses: 3 };
        let mut la = Lookahead::new(config, &[1, 2, 3, 1, 2, 4, 1, 5, 6]);
        // Prompt n-grams after 1: (5 6), (2 4), (2 3), newest first, kept to G = 3.
        let t = la.draft(1, 10);
        assert_eq!(&t.tokens[..5], &[5, 6, 2, 4, 3]);
        assert_eq!(&t.parents[..5], &[0, 1, 0, 3, 3]);
        assert_eq!(la.verify_nodes, 5);
        // The target follows 2 then 4: a pool path, two tokens from the pool.
        let mut targets = vec![0; t.len() + 1];
        (targets[0], targets[3], targets[4]) = (2, 4, 9);
        la.update(&t, &targets);
        assert_eq!(la.pool_accepted, 2);
        // Too shallow for the branch: n-grams cut to the depth, no branch.
        let t = la.draft(1, 1);
        assert_eq!(t.tokens, vec![5, 2]);
    }

    #[test]
    fn shapes_are_bounded_by_a_tree_row() {
        assert!(LookaheadConfig::default().is_valid());
        assert!(!LookaheadConfig { window: 15, ngram: 5, guesses: 15 }.is_valid());
        assert!(!LookaheadConfig { window: 4, ngram: 1, guesses: 0 }.is_valid());
    }
}
