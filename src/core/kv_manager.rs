//! Per-request block tables over a `BlockPool`: prefix lookup, growth, commits of verified
//! tokens into the prefix cache, release; and `apply`, which answers a scheduler `Proposal`
//! with a `Fit` (preempting the latest-arrived running requests when blocks run short).
//!
//! ```text
//!  request tokens:  | block 0 (hit) | block 1 (hit) | block 2 (own) | block 3 (own) |
//!                   |###############|###############|#######........|...............|
//!                    ^ cached prefix: computed starts at 32        ^ computed   ^ grown to
//!  committed tokens are hashed block by block:  h0 = H(∅, b0), h1 = H(h0, b1), …
//! ```
//!
//! With an attention window, each ask first gives back the blocks that slid out of it
//! (`BlockPool::slide`): a sequence then holds its sink blocks and the blocks of its last
//! `window` positions, whatever its length. Their entries become `NO_BLOCK`; positions and
//! the hashes of committed blocks keep counting, so a prefix lookup still walks whole
//! chains (and gives back at once what lies outside the window of its own next token).
//!
//! Pure: the KvAllocator actor owns one per model (target, and later draft).

use std::collections::{HashMap, VecDeque};

use super::block_pool::{chain_hash, BlockHash, BlockId, BlockPool, NO_BLOCK};
use super::scheduler::{Fit, Grant, Proposal};
use crate::request::RequestId;
use crate::tensor::AttnWindow;

/// Not enough free blocks; nothing was allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom;

#[derive(Debug, Default)]
struct SeqBlocks {
    blocks: Vec<BlockId>,
    /// Committed tokens of the block being filled (fewer than a block).
    partial: Vec<u32>,
    /// Full committed blocks so far, and the hash of the last one.
    full: usize,
    last_hash: Option<BlockHash>,
}

/// Prefix-cache counters, in tokens (as vLLM reports them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub queries: u64,
    pub hits: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStats {
    pub num_blocks: usize,
    pub used: usize,
    /// The most blocks in use at once so far.
    pub peak_used: usize,
    pub cached: usize,
    pub prefix: PrefixStats,
    /// Blocks given back to the pool because their positions slid out of the window.
    pub window_recycled: u64,
}

impl KvStats {
    /// What a bare pool can say of itself (no prefix lookups, no window).
    pub fn of_pool(pool: &BlockPool) -> Self {
        KvStats {
            num_blocks: pool.num_blocks(),
            used: pool.num_used(),
            cached: pool.num_cached(),
            ..Default::default()
        }
    }
}

#[derive(Debug)]
pub struct KvManager {
    pool: BlockPool,
    seqs: HashMap<RequestId, SeqBlocks>,
    prefix: PrefixStats,
    window: Option<AttnWindow>,
    peak_used: usize,
    recycled: u64,
}

impl KvManager {
    pub fn new(pool: BlockPool) -> Self {
        Self::with_window(pool, None)
    }

    /// A manager whose sequences give back the blocks that slide out of `window`.
    pub fn with_window(pool: BlockPool, window: Option<AttnWindow>) -> Self {
        KvManager { pool, seqs: HashMap::new(), prefix: PrefixStats::default(), window, peak_used: 0, recycled: 0 }
    }

    pub fn window(&self) -> Option<AttnWindow> {
        self.window
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn stats(&self) -> KvStats {
        KvStats {
            peak_used: self.peak_used,
            prefix: self.prefix,
            window_recycled: self.recycled,
            ..KvStats::of_pool(&self.pool)
        }
    }

    pub fn block_table(&self, id: RequestId) -> &[BlockId] {
        self.seqs.get(&id).map_or(&[], |s| &s.blocks)
    }

    /// Blocks a sequence of `tokens` tokens needs.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.pool.block_size())
    }

    /// Pins the longest cached prefix of `tokens` (whole blocks, leaving at least one token
    /// to compute) as the start of `id`'s table; returns its length in tokens.
    pub fn lookup_prefix(&mut self, id: RequestId, tokens: &[u32]) -> usize {
        let bs = self.pool.block_size();
        let seq = self.seqs.entry(id).or_default();
        debug_assert!(seq.blocks.is_empty(), "lookup on a request that holds blocks");
        let mut parent = None;
        for chunk in tokens[..tokens.len().saturating_sub(1)].chunks_exact(bs) {
            let h = chain_hash(parent, chunk);
            let Some(block) = self.pool.lookup(h) else { break };
            self.pool.acquire(block);
            seq.blocks.push(block);
            parent = Some(h);
        }
        seq.full = seq.blocks.len();
        seq.last_hash = parent;
        let cached = seq.full * bs;
        self.slide(id, cached);
        cached
    }

    /// With a window: gives back `id`'s blocks that no query from position `next` on reads.
    pub fn slide(&mut self, id: RequestId, next: usize) {
        let (Some(window), Some(seq)) = (self.window, self.seqs.get_mut(&id)) else { return };
        self.recycled += self.pool.slide(&mut seq.blocks, window, next) as u64;
    }

    /// Grows `id`'s table to hold `total` tokens, all or nothing.
    pub fn grow(&mut self, id: RequestId, total: usize) -> Result<&[BlockId], NoRoom> {
        let need = self.blocks_for(total);
        let seq = self.seqs.entry(id).or_default();
        if need > seq.blocks.len() {
            let new = self.pool.allocate_n(need - seq.blocks.len()).ok_or(NoRoom)?;
            seq.blocks.extend(new);
            self.peak_used = self.peak_used.max(self.pool.num_used());
        }
        Ok(&seq.blocks)
    }

    /// Records verified tokens (continuing the committed ones): each block they fill is
    /// hashed and becomes reusable by later requests with the same prefix.
    pub fn commit(&mut self, id: RequestId, tokens: &[u32]) {
        let bs = self.pool.block_size();
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        for &t in tokens {
            seq.partial.push(t);
            if seq.partial.len() == bs {
                let h = chain_hash(seq.last_hash, &seq.partial);
                match seq.blocks.get(seq.full) {
                    Some(&NO_BLOCK) => {} // slid out of the window already: the chain goes on
                    Some(&block) => self.pool.cache(block, h),
                    None => debug_assert!(false, "committed tokens beyond the allocated blocks"),
                }
                seq.full += 1;
                seq.last_hash = Some(h);
                seq.partial.clear();
            }
        }
    }

    /// Frees `id`'s blocks (committed ones stay findable until evicted).
    pub fn release(&mut self, id: RequestId) {
        if let Some(seq) = self.seqs.remove(&id) {
            self.pool.free_all(&seq.blocks);
        }
    }

    /// Answers a scheduler proposal: commits, releases, then the asks in priority order.
    /// An ask that does not fit preempts the lowest-priority running request not yet served
    /// (possibly itself); a waiting ask that does not fit defers itself and every waiting ask
    /// after it, so that no later arrival overtakes it.
    pub fn apply(&mut self, p: Proposal) -> Fit {
        for (id, tokens) in &p.commits {
            self.commit(*id, tokens);
        }
        for id in &p.releases {
            self.release(*id);
        }
        let mut fit = Fit::default();
        let mut queue: VecDeque<_> = p.asks.into_iter().collect();
        while let Some(ask) = queue.pop_front() {
            if ask.new_tokens == 0 {
                continue; // a running row without budget this step: nothing to grow
            }
            let (computed, cached, new_tokens) = match &ask.lookup {
                Some(tokens) => {
                    let c = self.lookup_prefix(ask.id, tokens);
                    (c, Some(c), ask.new_tokens.min(tokens.len() - c))
                }
                None => {
                    self.slide(ask.id, ask.computed);
                    (ask.computed, None, ask.new_tokens)
                }
            };
            loop {
                if let Ok(table) = self.grow(ask.id, computed + new_tokens) {
                    let block_table = table.to_vec();
                    if let (Some(c), Some(tokens)) = (cached, &ask.lookup) {
                        self.prefix.queries += tokens.len() as u64;
                        self.prefix.hits += c as u64;
                    }
                    fit.granted.push(Grant { id: ask.id, cached, new_tokens, block_table });
                    break;
                }
                if let Some(at) = queue.iter().rposition(|a| a.running) {
                    let victim = queue.remove(at).expect("found");
                    self.release(victim.id);
                    fit.preempted.push(victim.id);
                    continue;
                }
                self.release(ask.id);
                if ask.running {
                    fit.preempted.push(ask.id);
                } else {
                    fit.deferred.push(ask.id);
                    fit.deferred.extend(queue.drain(..).map(|a| a.id));
                }
                break;
            }
        }
        fit
    }

    /// Checks the pool and that the tables account for every used block; for tests.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        let mut refs: HashMap<BlockId, u32> = HashMap::new();
        for s in self.seqs.values() {
            for &b in s.blocks.iter().filter(|&&b| b != NO_BLOCK) {
                *refs.entry(b).or_default() += 1;
            }
        }
        for b in 0..self.pool.num_blocks() as BlockId {
            let want = refs.get(&b).copied().unwrap_or(0);
            if self.pool.refs(b) != want {
                return Err(format!("block {b}: pool says {} refs, tables hold {want}", self.pool.refs(b)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A windowed sequence grows one token at a time far past the pool's size: it holds at
    /// most its sink block and its window's, and a second sequence with the same prompt finds
    /// the committed chain whole and keeps only what its own window reads.
    #[test]
    fn a_windowed_sequence_outgrows_the_pool_and_its_prefix_is_found() {
        let (bs, window) = (4, AttnWindow::new(8, 2).unwrap());
        let mut kv = KvManager::with_window(BlockPool::new(6, bs), Some(window));
        let (a, b) = (RequestId(1), RequestId(2));
        let tokens: Vec<u32> = (0..100).collect();
        for computed in 0..100usize {
            kv.commit(a, &tokens[computed.saturating_sub(1)..computed]);
            kv.slide(a, computed);
            kv.grow(a, computed + 1).expect("the window fits");
            // The sink block, and blocks from position computed - 7 to computed.
            assert!(kv.stats().used <= 1 + 8 / bs + 1, "at {computed}: {:?}", kv.stats());
            kv.check_invariants().unwrap();
        }
        assert!(kv.stats().window_recycled >= 20);
        kv.release(a);
        // Every block was committed before it slid out; the sink block, held to the end, is
        // still cached (the others, freed early, may have been evicted meanwhile).
        let cached = kv.lookup_prefix(b, &tokens[..13]);
        let table = kv.block_table(b).to_vec();
        assert!((4..=12).contains(&cached) && table.len() == cached / bs, "{cached} {table:?}");
        // What its next query (at `cached`) reads is held; what lies before it was given back.
        for (i, &block) in table.iter().enumerate() {
            let reads = i * bs < window.sinks() || (i + 1) * bs > window.first_recent(cached);
            assert_eq!(block != NO_BLOCK, reads, "block {i} of {table:?}");
        }
        kv.release(b);
        assert_eq!(kv.stats().used, 0);
        kv.check_invariants().unwrap();
    }
}
