//! Sending a run's requests under its load: C clients in a closed loop, or Poisson arrivals
//! at a rate (optionally capped in flight). Everything runs on one thread's event loop.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use futures::future::join_all;
use indicatif::ProgressBar;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;

use super::args::Load;
use super::client::{Completed, Door, Failure};
use super::dataset::WorkItem;

/// Every request's outcome (in the order they ended) and the run's wall time.
pub struct RunOutcome {
    pub results: Vec<Result<Completed, Failure>>,
    /// From the first request sent to the last one's end.
    pub duration: Duration,
}

/// Sends every item under `load`, ticking `progress` as requests end.
pub async fn run(
    door: &Door,
    items: &[WorkItem],
    load: Load,
    max_concurrency: Option<usize>,
    seed: u64,
    progress: &ProgressBar,
) -> RunOutcome {
    let results = RefCell::new(Vec::with_capacity(items.len()));
    let record = |result| {
        results.borrow_mut().push(result);
        progress.inc(1);
    };
    let start = Instant::now();
    match load {
        Load::Concurrency(clients) => closed_loop(door, items, clients, &record).await,
        Load::RequestRate(rate) => {
            open_loop(door, items, &arrival_times(items.len(), rate, seed), max_concurrency, &record).await
        }
        Load::AllAtOnce => open_loop(door, items, &vec![Duration::ZERO; items.len()], max_concurrency, &record).await,
    }
    RunOutcome { results: results.into_inner(), duration: start.elapsed() }
}

/// `clients` loops, each sending the next item as soon as its previous request ended.
async fn closed_loop(door: &Door, items: &[WorkItem], clients: usize, record: &dyn Fn(Result<Completed, Failure>)) {
    let next = Cell::new(0);
    let client = || async {
        while next.get() < items.len() {
            let item = &items[next.get()];
            next.set(next.get() + 1);
            record(door.send(item).await);
        }
    };
    join_all((0..clients.min(items.len())).map(|_| client())).await;
}

/// Each item sent at its arrival time (offsets from now), waiting for a slot when at most
/// `max_concurrency` may be in flight.
async fn open_loop(
    door: &Door,
    items: &[WorkItem],
    arrivals: &[Duration],
    max_concurrency: Option<usize>,
    record: &dyn Fn(Result<Completed, Failure>),
) {
    let slots = Semaphore::new(max_concurrency.unwrap_or(Semaphore::MAX_PERMITS));
    let start = tokio::time::Instant::now();
    let request = |item, at| {
        let slots = &slots;
        async move {
            tokio::time::sleep_until(start + at).await;
            let _slot = slots.acquire().await;
            record(door.send(item).await);
        }
    };
    join_all(items.iter().zip(arrivals).map(|(item, &at)| request(item, at))).await;
}

/// Arrival times of a Poisson process at `rate` per second, the first at 0, seeded.
pub fn arrival_times(n: usize, rate: f64, seed: u64) -> Vec<Duration> {
    // Not the dataset's stream: the same seed must not tie arrivals to prompt lengths.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_a771_7a15);
    let mut at = 0.0;
    (0..n)
        .map(|i| {
            if i > 0 {
                at += -(1.0 - rng.random::<f64>()).ln() / rate;
            }
            Duration::from_secs_f64(at)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_poisson_at_the_rate_and_seeded() {
        let times = arrival_times(4000, 8.0, 3);
        assert_eq!(times[0], Duration::ZERO);
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        let mean_gap = times[3999].as_secs_f64() / 3999.0;
        assert!((mean_gap - 0.125).abs() < 0.01, "{mean_gap}");
        assert_eq!(times, arrival_times(4000, 8.0, 3));
        assert_ne!(times, arrival_times(4000, 8.0, 4));
    }
}
