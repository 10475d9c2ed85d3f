//! KvAllocator: owns the target's block pool and every request's block table. Receives
//! `KvMsg`, calls the pure `KvManager`, replies. (A draft model's pool belongs to its
//! proposer, in the Drafter: its blocks follow the drafts, which the Drafter alone sees.)

use metrics::{counter, gauge};
use tokio::sync::mpsc;

use super::messages::{KvMsg, KvPoolStats};
use super::metrics as m;
use crate::core::kv_manager::KvManager;

pub struct KvAllocator {
    target: KvManager,
}

impl KvAllocator {
    pub fn new(target: KvManager) -> Self {
        gauge!(m::KV_BLOCKS_TOTAL, m::POOL_LABEL => m::POOL_TARGET).set(target.pool().num_blocks() as f64);
        KvAllocator { target }
    }

    fn stats(&self) -> KvPoolStats {
        KvPoolStats { target: self.target.stats(), draft: None }
    }

    pub fn handle(&mut self, msg: KvMsg) {
        match msg {
            KvMsg::Apply { proposal, reply } => {
                let before = self.target.stats().prefix;
                let fit = self.target.apply(proposal);
                let after = self.target.stats();
                counter!(m::PREFIX_CACHE_QUERIES).increment(after.prefix.queries - before.queries);
                counter!(m::PREFIX_CACHE_HITS).increment(after.prefix.hits - before.hits);
                counter!(m::PREEMPTIONS).increment(fit.preempted.len() as u64);
                gauge!(m::KV_BLOCKS_USED, m::POOL_LABEL => m::POOL_TARGET).set(after.used as f64);
                // The caller may be gone (shutting down): nothing to do then.
                let _ = reply.send(fit);
            }
            KvMsg::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
        }
    }

    /// Serves until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<KvMsg>) {
        while let Some(msg) = rx.recv().await {
            self.handle(msg);
        }
    }
}
