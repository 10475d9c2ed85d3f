//! KvAllocator: an actix actor owning the target's block pool and every request's block
//! table. Each handler calls the pure `KvManager` and replies. (A draft model's pool belongs
//! to its proposer, in the Drafter: its blocks follow the drafts, which the Drafter alone
//! sees.)
//!
//! Supervised: a panic in the pure core leaves the tables in an unknown state, so the
//! handler answers `KvError::Restarted` and stops the actor; its `Supervisor` starts it
//! again (same address, same mailbox) from an empty pool, and Intake fails every request
//! that held blocks. The runtime serves on.

use std::panic::{catch_unwind, AssertUnwindSafe};

use actix::{Actor, ActorContext, Context, Handler, MessageResult, Supervised};
use metrics::{counter, gauge};

use super::error::KvError;
use super::messages::{Apply, GetKvStats};
use super::metrics as m;
use super::verifier::panic_message;
use super::Running;
use crate::core::block_pool::BlockPool;
use crate::core::kv_manager::KvManager;
use crate::core::scheduler::Fit;

pub struct KvAllocator {
    target: KvManager,
    _running: Running,
}

impl KvAllocator {
    pub fn new(target: KvManager, running: Running) -> Self {
        gauge!(m::KV_BLOCKS_TOTAL, m::POOL_LABEL => m::POOL_TARGET).set(target.pool().num_blocks() as f64);
        KvAllocator { target, _running: running }
    }
}

impl Actor for KvAllocator {
    type Context = Context<Self>;
}

impl Supervised for KvAllocator {
    fn restarting(&mut self, _: &mut Context<Self>) {
        let pool = self.target.pool();
        let pool = BlockPool::new(pool.num_blocks(), pool.block_size());
        self.target = KvManager::with_window(pool, self.target.window());
        gauge!(m::KV_BLOCKS_USED, m::POOL_LABEL => m::POOL_TARGET).set(0.0);
    }
}

impl Handler<Apply> for KvAllocator {
    type Result = Result<Fit, KvError>;

    fn handle(&mut self, Apply(proposal): Apply, ctx: &mut Context<Self>) -> Self::Result {
        let stats = self.target.stats();
        let (before, recycled) = (stats.prefix, stats.window_recycled);
        let fit = catch_unwind(AssertUnwindSafe(|| self.target.apply(proposal))).map_err(|payload| {
            let why = panic_message(payload.as_ref());
            tracing::error!(%why, "the KV allocator panicked; it starts again with an empty pool");
            ctx.stop(); // the supervisor restarts it
            KvError::Restarted(why)
        })?;
        let after = self.target.stats();
        counter!(m::PREFIX_CACHE_QUERIES).increment(after.prefix.queries - before.queries);
        counter!(m::PREFIX_CACHE_HITS).increment(after.prefix.hits - before.hits);
        counter!(m::PREEMPTIONS).increment(fit.preempted.len() as u64);
        counter!(m::KV_WINDOW_RECYCLED).increment(after.window_recycled - recycled);
        gauge!(m::KV_BLOCKS_USED, m::POOL_LABEL => m::POOL_TARGET).set(after.used as f64);
        Ok(fit)
    }
}

impl Handler<GetKvStats> for KvAllocator {
    type Result = MessageResult<GetKvStats>;

    fn handle(&mut self, _: GetKvStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.target.stats())
    }
}
