//! The CPU's all-reduce: the ranks of a tensor-parallel group are threads of one process,
//! meeting at a barrier. Each rank copies its partial sum into its own slot; after the
//! barrier every rank adds all slots in rank order (so every rank holds the same bits, and
//! they do not depend on which thread came first); a second barrier keeps the slots until
//! all have read them.

use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};

use crate::tensor::{BackendError, RankGroup, Result};

/// What the ranks of one group share.
#[derive(Debug)]
pub struct CpuGroup {
    slots: Vec<RwLock<Vec<f32>>>,
    barrier: AbortableBarrier,
}

/// One rank's place in a group (held by its `CpuBackend`).
#[derive(Debug, Clone)]
pub struct CpuRank {
    pub(super) group: Arc<CpuGroup>,
    pub(super) index: usize,
}

impl CpuGroup {
    /// A group of `ranks` ranks, and each rank's handle on it, in rank order.
    pub fn new(ranks: usize) -> (Arc<CpuGroup>, Vec<CpuRank>) {
        let slots = (0..ranks).map(|_| RwLock::new(Vec::new())).collect();
        let group = Arc::new(CpuGroup { slots, barrier: AbortableBarrier::new(ranks) });
        let handles = (0..ranks).map(|index| CpuRank { group: group.clone(), index }).collect();
        (group, handles)
    }

    /// `data` becomes the sum of every rank's `data`, added in rank order.
    pub(super) fn all_reduce(&self, rank: usize, data: &mut [f32]) -> Result<()> {
        {
            let mut slot = self.slots[rank].write().unwrap_or_else(PoisonError::into_inner);
            slot.clear();
            slot.extend_from_slice(data);
        }
        self.barrier.wait()?;
        let summed = self.sum_into(data);
        if summed.is_err() {
            self.barrier.abort();
        }
        self.barrier.wait()?;
        summed
    }

    fn sum_into(&self, data: &mut [f32]) -> Result<()> {
        let slots: Vec<_> = self.slots.iter().map(|s| s.read().unwrap_or_else(PoisonError::into_inner)).collect();
        if let Some(s) = slots.iter().find(|s| s.len() != data.len()) {
            let msg = format!("all-reduce: ranks hold {} and {} values", s.len(), data.len());
            return Err(BackendError::Invalid(msg));
        }
        for (i, v) in data.iter_mut().enumerate() {
            *v = slots.iter().skip(1).fold(slots[0][i], |acc, s| acc + s[i]);
        }
        Ok(())
    }
}

impl RankGroup for CpuGroup {
    fn abort(&self) {
        self.barrier.abort();
    }

    fn reset(&self) {
        self.barrier.reset();
    }
}

/// A reusable barrier that a failing rank can open for everyone: waits then fail, so that
/// no rank blocks for one that left the step.
#[derive(Debug)]
struct AbortableBarrier {
    ranks: usize,
    state: Mutex<BarrierState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
    aborted: bool,
}

impl AbortableBarrier {
    fn new(ranks: usize) -> Self {
        AbortableBarrier { ranks, state: Mutex::new(BarrierState::default()), wake: Condvar::new() }
    }

    fn wait(&self) -> Result<()> {
        let aborted = || BackendError::Device("a tensor-parallel rank left the step".into());
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.aborted {
            return Err(aborted());
        }
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.ranks {
            s.arrived = 0;
            s.generation += 1;
            self.wake.notify_all();
            return Ok(());
        }
        while s.generation == generation && !s.aborted {
            s = self.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        if s.generation == generation {
            return Err(aborted());
        }
        Ok(())
    }

    fn abort(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).aborted = true;
        self.wake.notify_all();
    }

    /// Only while no rank waits (between steps).
    fn reset(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.aborted = false;
        s.arrived = 0;
        s.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_the_sum_in_rank_order() {
        let (_group, ranks) = CpuGroup::new(3);
        let out: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut data = vec![r.index as f32 + 0.5, 1e8, -(r.index as f32)];
                        r.group.all_reduce(r.index, &mut data).unwrap();
                        data
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = [0.5f32 + 1.5 + 2.5, (1e8f32 + 1e8) + 1e8, -3.0];
        assert!(out.iter().all(|o| o == &want));
    }

    #[test]
    fn an_aborted_group_fails_the_waiting_ranks_and_recovers_after_reset() {
        let (group, ranks) = CpuGroup::new(2);
        let r0 = ranks[0].clone();
        let waiting = std::thread::spawn(move || r0.group.all_reduce(0, &mut [1.0]));
        std::thread::sleep(std::time::Duration::from_millis(20));
        group.abort();
        assert!(waiting.join().unwrap().is_err());
        group.reset();
        std::thread::scope(|s| {
            let a = s.spawn(|| ranks[0].group.all_reduce(0, &mut [1.0]));
            let mut b = [2.0];
            ranks[1].group.all_reduce(1, &mut b).unwrap();
            a.join().unwrap().unwrap();
            assert_eq!(b, [3.0]);
        });
    }
}
