//! A pool of fixed-size KV blocks: O(1) allocation and free, reference counts, and prefix
//! reuse through chained hashes of full blocks of committed tokens (vLLM v1's block pool).
//!
//! Free blocks sit in one intrusive doubly-linked list in least-recently-freed order.
//! A free block may still hold a cached prefix (its hash stays in `cached`): a prefix hit
//! takes it out of the list again, and allocation evicts from the head of the list, so the
//! list is at the same time the free list and the LRU of cached free blocks.
//!
//! ```text
//!  free list:  head → [b7 #h3] ⇄ [b2] ⇄ [b9 #h1] ⇄ … ⇄ [b4 #h8] ← tail
//!              allocate() pops here (evicting #h3)      free() appends here
//!  cached:     #h1 → b9, #h3 → b7, #h8 → b4, #h5 → b0 (in use, refs 2)
//! ```
//!
//! Pure: no threads, no model. The `KvManager` (per-request block tables) is built on it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::tensor::AttnWindow;
pub use crate::tensor::NO_BLOCK;

pub type BlockId = u32;

/// The identity of a full block's content and of everything before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

/// The hash of a full block of `tokens` following the block whose hash is `parent`.
pub fn chain_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    // SipHash with fixed zero keys: stable for the life of the process, which is all a
    // cache in memory needs.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    parent.map(|p| p.0).hash(&mut h);
    tokens.hash(&mut h);
    BlockHash(h.finish())
}

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct BlockMeta {
    refs: u32,
    /// Set once the block is full of committed tokens and registered in `cached`.
    hash: Option<BlockHash>,
    /// Neighbours in the free list (meaningful only while `refs == 0`).
    prev: u32,
    next: u32,
}

#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<BlockMeta>,
    head: u32,
    tail: u32,
    num_free: usize,
    cached: HashMap<BlockHash, BlockId>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0 && num_blocks < NIL as usize);
        let mut pool = BlockPool {
            block_size,
            blocks: vec![BlockMeta { refs: 0, hash: None, prev: NIL, next: NIL }; num_blocks],
            head: NIL,
            tail: NIL,
            num_free: 0,
            cached: HashMap::new(),
        };
        for id in 0..num_blocks as u32 {
            pool.push_back(id);
        }
        pool
    }

    /// How many blocks of `block_size` tokens fit in `bytes`, at `bytes_per_token`.
    pub fn blocks_for_budget(bytes: usize, bytes_per_token: usize, block_size: usize) -> usize {
        bytes / (bytes_per_token * block_size).max(1)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    pub fn num_free(&self) -> usize {
        self.num_free
    }
    pub fn num_used(&self) -> usize {
        self.blocks.len() - self.num_free
    }
    /// Blocks holding a reusable prefix (in use or free).
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }
    pub fn refs(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].refs
    }

    /// Takes the least recently freed block (evicting its cached prefix, if any).
    pub fn allocate(&mut self) -> Option<BlockId> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.unlink(id);
        let b = &mut self.blocks[id as usize];
        b.refs = 1;
        if let Some(h) = b.hash.take() {
            self.cached.remove(&h);
        }
        Some(id)
    }

    /// `n` blocks, or none at all when fewer are free.
    pub fn allocate_n(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_free {
            return None;
        }
        Some((0..n).map(|_| self.allocate().expect("counted free")).collect())
    }

    /// Drops one reference; at zero the block joins the tail of the free list, its cached
    /// prefix (if any) still findable until the block is allocated again.
    pub fn free(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        assert!(b.refs > 0, "block {id} freed twice");
        b.refs -= 1;
        if b.refs == 0 {
            self.push_back(id);
        }
    }

    /// Frees a sequence's blocks last first, so that its tail is evicted before its prefix;
    /// `NO_BLOCK` entries (blocks an attention window gave back already) are skipped.
    pub fn free_all(&mut self, ids: &[BlockId]) {
        ids.iter().rev().filter(|&&id| id != NO_BLOCK).for_each(|&id| self.free(id));
    }

    /// Gives back the blocks of `table` whose every position slid out of `window` for
    /// queries at `next` and after (blocks holding a sink token stay), leaving `NO_BLOCK`
    /// in their entries; returns how many it freed.
    ///
    /// ```text
    ///  window 8, sinks 2, block 4, next query at 17 (reads 0, 1 and 10..=17):
    ///  table:  [b0 sinks] [b1 4..8] [b2 8..12] [b3 12..16] [b4 16..]
    ///          kept        freed     kept (10, 11)  kept      kept
    /// ```
    pub fn slide(&mut self, table: &mut [BlockId], window: AttnWindow, next: usize) -> usize {
        let bs = self.block_size;
        let (first, end) = (window.sinks().div_ceil(bs), window.first_recent(next) / bs);
        let mut freed = 0;
        for entry in table.iter_mut().take(end).skip(first) {
            if *entry != NO_BLOCK {
                self.free(*entry);
                *entry = NO_BLOCK;
                freed += 1;
            }
        }
        freed
    }

    /// The block caching `hash`, if any (no side effect).
    pub fn lookup(&self, hash: BlockHash) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    /// One more reference to a block found by `lookup` (taking it off the free list).
    pub fn acquire(&mut self, id: BlockId) {
        if self.blocks[id as usize].refs == 0 {
            self.unlink(id);
        }
        self.blocks[id as usize].refs += 1;
    }

    /// Registers a full block of committed tokens under `hash`. A block already cached, or a
    /// hash already held by another block (the same prefix computed twice), is left alone.
    pub fn cache(&mut self, id: BlockId, hash: BlockHash) {
        let b = &mut self.blocks[id as usize];
        if b.hash.is_some() || self.cached.contains_key(&hash) {
            return;
        }
        b.hash = Some(hash);
        self.cached.insert(hash, id);
    }

    fn push_back(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        b.prev = self.tail;
        b.next = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.blocks[self.tail as usize].next = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    fn unlink(&mut self, id: u32) {
        let (prev, next) = (self.blocks[id as usize].prev, self.blocks[id as usize].next);
        match prev {
            NIL => self.head = next,
            p => self.blocks[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.blocks[n as usize].prev = prev,
        }
        self.blocks[id as usize].prev = NIL;
        self.blocks[id as usize].next = NIL;
        self.num_free -= 1;
    }

    /// Checks every structural invariant; for tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = vec![false; self.blocks.len()];
        let (mut id, mut prev, mut n) = (self.head, NIL, 0);
        while id != NIL {
            let b = &self.blocks[id as usize];
            if seen[id as usize] {
                return Err(format!("block {id} twice in the free list"));
            }
            seen[id as usize] = true;
            if b.refs != 0 {
                return Err(format!("block {id} in the free list with {} refs", b.refs));
            }
            if b.prev != prev {
                return Err(format!("block {id}: broken back link"));
            }
            prev = id;
            id = b.next;
            n += 1;
        }
        if prev != self.tail {
            return Err("tail is not the last free block".into());
        }
        if n != self.num_free {
            return Err(format!("free list holds {n} blocks, counter says {}", self.num_free));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            if b.refs == 0 && !seen[i] {
                return Err(format!("block {i} has no refs but is not free"));
            }
            if let Some(h) = b.hash {
                if self.cached.get(&h) != Some(&(i as u32)) {
                    return Err(format!("block {i} has a hash the index does not map to it"));
                }
            }
        }
        for (h, &id) in &self.cached {
            if self.blocks[id as usize].hash != Some(*h) {
                return Err(format!("index maps a hash to block {id}, which does not hold it"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocates_in_lru_order_and_evicts_cached_blocks() {
        let mut p = BlockPool::new(3, 4);
        let a = p.allocate_n(3).unwrap();
        assert_eq!(a, vec![0, 1, 2]);
        assert!(p.allocate().is_none());
        let h = chain_hash(None, &[1, 2, 3, 4]);
        p.cache(1, h);
        p.free_all(&a); // freed last first: 2, 1, 0
        assert_eq!(p.num_free(), 3);
        assert_eq!(p.lookup(h), Some(1));
        // A hit takes the cached block back out of the free list.
        p.acquire(1);
        assert_eq!((p.refs(1), p.num_free()), (1, 2));
        p.free(1);
        // Allocation now evicts in order 2, 0, 1: the cached block goes last.
        assert_eq!(p.allocate_n(2).unwrap(), vec![2, 0]);
        assert_eq!(p.lookup(h), Some(1));
        assert_eq!(p.allocate(), Some(1));
        assert_eq!(p.lookup(h), None);
        p.check_invariants().unwrap();
    }

    #[test]
    fn all_or_nothing_and_budget_sizing() {
        let mut p = BlockPool::new(2, 16);
        assert!(p.allocate_n(3).is_none());
        assert_eq!(p.num_free(), 2);
        assert_eq!(BlockPool::blocks_for_budget(1 << 20, 1024, 16), 64);
    }

    #[test]
    fn a_window_frees_whole_blocks_behind_it_and_keeps_the_sinks() {
        let mut p = BlockPool::new(8, 4);
        let mut table = p.allocate_n(5).unwrap();
        let w = AttnWindow::new(8, 2).unwrap();
        assert_eq!(p.slide(&mut table, w, 11), 0); // reads 0, 1 and 4..=11
        assert_eq!(p.slide(&mut table, w, 17), 1); // reads 0, 1 and 10..=17
        assert_eq!(table, vec![0, NO_BLOCK, 2, 3, 4]);
        assert_eq!(p.slide(&mut table, w, 24), 2);
        assert_eq!(table, vec![0, NO_BLOCK, NO_BLOCK, NO_BLOCK, 4]);
        assert_eq!(p.num_free(), 6);
        p.free_all(&table);
        assert_eq!(p.num_free(), 8);
        p.check_invariants().unwrap();
    }

    #[test]
    fn chained_hashes_depend_on_the_prefix() {
        let a = chain_hash(None, &[1, 2]);
        assert_eq!(a, chain_hash(None, &[1, 2]));
        assert_ne!(chain_hash(Some(a), &[3, 4]), chain_hash(None, &[3, 4]));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc,
        Free(usize),
        Cache(usize, u8),
        Hit(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Alloc),
            3 => any::<usize>().prop_map(Op::Free),
            2 => (any::<usize>(), any::<u8>()).prop_map(|(i, h)| Op::Cache(i, h)),
            2 => any::<u8>().prop_map(Op::Hit),
        ]
    }

    proptest! {
        /// Random allocations, frees, cache registrations and prefix hits keep the pool
        /// consistent, and freeing every reference leaves every block free.
        #[test]
        fn pool_invariants_hold(ops in proptest::collection::vec(op(), 1..200), n in 1usize..12) {
            let mut p = BlockPool::new(n, 4);
            let mut held: Vec<BlockId> = vec![]; // one entry per reference we hold
            for op in ops {
                match op {
                    Op::Alloc => if let Some(id) = p.allocate() { held.push(id) } else { prop_assert_eq!(p.num_free(), 0) },
                    Op::Free(i) if !held.is_empty() => { let id = held.swap_remove(i % held.len()); p.free(id) }
                    Op::Cache(i, h) if !held.is_empty() => p.cache(held[i % held.len()], BlockHash(h as u64)),
                    Op::Hit(h) => if let Some(id) = p.lookup(BlockHash(h as u64)) { p.acquire(id); held.push(id) },
                    _ => {}
                }
                p.check_invariants().map_err(TestCaseError::fail)?;
                prop_assert_eq!(p.num_used(), { let mut u = held.clone(); u.sort(); u.dedup(); u.len() });
            }
            for id in held.drain(..) { p.free(id) }
            prop_assert_eq!(p.num_free(), n);
            p.check_invariants().map_err(TestCaseError::fail)?;
        }
    }
}
