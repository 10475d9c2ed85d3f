//! A record of when the Drafter and the Verifier worked, step by step: the evidence that
//! drafting overlaps verification. Off unless a `Timeline` is given to the runtime builder.

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// The Drafter drafting a step's rows (the Verifier waits for these).
    Draft,
    /// The Drafter drafting the next round while the Verifier verifies this one.
    PreDraft,
    /// The Verifier's forward and acceptance.
    Verify,
}

/// One interval of work, in microseconds since the timeline began.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Span {
    pub work: Work,
    pub step: u64,
    /// Query tokens of a verification; draft tokens asked of drafting.
    pub tokens: usize,
    pub start_us: f64,
    pub end_us: f64,
}

#[derive(Debug)]
pub struct Timeline {
    origin: Instant,
    spans: Mutex<Vec<Span>>,
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline { origin: Instant::now(), spans: Mutex::new(vec![]) }
    }
}

impl Timeline {
    /// Records `work` over `tokens` tokens for `step` from `start` until now.
    pub fn record(&self, work: Work, step: u64, tokens: usize, start: Instant) {
        let us = |t: Instant| t.saturating_duration_since(self.origin).as_secs_f64() * 1e6;
        let span = Span { work, step, tokens, start_us: us(start), end_us: us(Instant::now()) };
        if let Ok(mut spans) = self.spans.lock() {
            spans.push(span);
        }
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// What the spans show about concurrency.
    pub fn summary(&self) -> Overlap {
        overlap(&self.spans())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Overlap {
    pub draft_ms: f64,
    pub pre_draft_ms: f64,
    pub verify_ms: f64,
    /// Time during which the Drafter and the Verifier were both at work.
    pub overlapped_ms: f64,
}

/// Sums each kind of work and the time Drafter spans (of either kind) intersect Verify
/// spans. Spans of one actor never intersect each other (one thread each).
pub fn overlap(spans: &[Span]) -> Overlap {
    // Folds from +0.0: an empty `sum` of floats is -0.0.
    let total = |w: Work| spans.iter().filter(|s| s.work == w).fold(0.0, |t, s| t + s.end_us - s.start_us) / 1e3;
    let verify: Vec<&Span> = spans.iter().filter(|s| s.work == Work::Verify).collect();
    let overlapped_us: f64 = spans
        .iter()
        .filter(|s| s.work != Work::Verify)
        .flat_map(|d| verify.iter().map(move |v| (d.end_us.min(v.end_us) - d.start_us.max(v.start_us)).max(0.0)))
        .fold(0.0, |t, o| t + o);
    Overlap {
        draft_ms: total(Work::Draft),
        pre_draft_ms: total(Work::PreDraft),
        verify_ms: total(Work::Verify),
        overlapped_ms: overlapped_us / 1e3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_counts_only_drafter_time_inside_verification() {
        let span = |work, start_us, end_us| Span { work, step: 0, tokens: 1, start_us, end_us };
        let spans = [
            span(Work::Draft, 0.0, 1000.0),
            span(Work::Verify, 1000.0, 5000.0),
            span(Work::PreDraft, 1500.0, 3000.0),
            span(Work::Draft, 4500.0, 6000.0),
        ];
        let o = overlap(&spans);
        assert_eq!((o.draft_ms, o.pre_draft_ms, o.verify_ms), (2.5, 1.5, 4.0));
        assert_eq!(o.overlapped_ms, 2.0);
    }
}
