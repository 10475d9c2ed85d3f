//! The figures of a sweep: per run, latency distributions, throughput, failures and
//! speculation; serialized as the `--json` file, displayed as the tables on stdout.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::args::{Api, DatasetSource, Load};
use super::client::{Completed, Failure, SpecCounts};
use super::load::RunOutcome;

/// Everything `--json` writes: the configuration and one entry per run of the sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServeBenchReport {
    /// The configuration's name (`--label`), the plot's legend.
    pub label: String,
    pub config: BenchConfig,
    pub runs: Vec<RunReport>,
}

/// What was measured, how (the options that shape the workload).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchConfig {
    pub url: String,
    pub api: Api,
    pub model: Option<String>,
    pub dataset: DatasetSource,
    /// `random-ids`: the ids were drawn below this.
    #[serde(default)]
    pub vocab: Option<usize>,
    pub input_len: usize,
    pub input_std: f64,
    pub output_len: Option<usize>,
    pub output_std: f64,
    pub num_requests: usize,
    /// `--requests-per-client`: a run of C clients sent K x C requests (at least
    /// `num_requests`).
    #[serde(default)]
    pub requests_per_client: Option<usize>,
    pub seed: u64,
    pub temperature: f64,
    pub ignore_eos: bool,
    pub max_concurrency: Option<usize>,
    pub warmup: usize,
    pub timeout_s: f64,
}

/// One run: `num_requests` requests under one load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub load: Load,
    pub completed: usize,
    pub failed: usize,
    pub failures: Vec<FailureCount>,
    /// From the first request sent to the last one's end.
    pub duration_s: f64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Output tokens of completed requests per second.
    pub output_throughput: f64,
    /// Prompt and output tokens of completed requests per second.
    pub total_throughput: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub mean_input_tokens: f64,
    pub mean_output_tokens: f64,
    /// Time to first token (`null` when no request completed).
    pub ttft_ms: Option<Summary>,
    /// Time per output token after the first, per request: (e2e − ttft) / (output − 1).
    pub tpot_ms: Option<Summary>,
    /// Between consecutive chunks of tokens, over all requests.
    pub itl_ms: Option<Summary>,
    /// End-to-end request latency.
    pub e2e_ms: Option<Summary>,
    /// When the server speculated.
    pub speculative: Option<SpecSummary>,
}

/// Failed requests of one kind (`http 503`, `server overloaded`, `timeout`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureCount {
    pub kind: String,
    pub count: usize,
    /// The first such failure's message.
    pub example: String,
}

/// Mean and percentiles (linear interpolation between the closest ranks), in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Summary {
    /// `None` without values.
    pub fn of(mut values: Vec<f64>) -> Option<Summary> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let rank = q * (values.len() - 1) as f64;
            let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
            values[low] + (values[high] - values[low]) * (rank - low as f64)
        };
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        Some(Summary { mean, p50: at(0.50), p90: at(0.90), p99: at(0.99) })
    }
}

/// Speculative decoding over a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpecSummary {
    pub source: SpecSource,
    /// Verification steps that carried drafts.
    pub steps: u64,
    pub drafted: u64,
    pub accepted: u64,
    /// accepted / drafted.
    pub acceptance_rate: f64,
    /// Tokens produced per verification step: (accepted + steps) / steps.
    pub tokens_per_step: f64,
    /// The server forced acceptance (`--synthetic-acceptance`): not the model's own.
    pub synthetic: bool,
}

/// Where the speculation figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecSource {
    /// Each request's own statistics (the WebSocket's `done` frames), summed.
    PerRequest,
    /// Specula's `/metrics` counters before and after the run (server-wide: any other
    /// traffic counts too).
    ServerMetrics,
}

impl SpecSummary {
    fn new(source: SpecSource, c: SpecCounts) -> Option<Self> {
        (c.steps > 0).then(|| SpecSummary {
            source,
            steps: c.steps,
            drafted: c.drafted,
            accepted: c.accepted,
            acceptance_rate: c.accepted as f64 / c.drafted.max(1) as f64,
            tokens_per_step: (c.accepted + c.steps) as f64 / c.steps as f64,
            synthetic: c.synthetic,
        })
    }
}

impl RunReport {
    /// The figures of a run; `server_spec` is what `/metrics` counted during it, used when
    /// the requests themselves carried no speculation statistics.
    pub fn new(load: Load, outcome: RunOutcome, server_spec: Option<SpecCounts>) -> Self {
        let (done, failures): (Vec<_>, Vec<_>) = outcome.results.into_iter().partition(Result::is_ok);
        let done: Vec<Completed> = done.into_iter().flatten().collect();
        let failures: Vec<Failure> = failures.into_iter().filter_map(Result::err).collect();
        let secs = outcome.duration.as_secs_f64().max(f64::MIN_POSITIVE);
        let total_input_tokens = done.iter().map(|c| c.prompt_tokens.unwrap_or(0)).sum();
        let total_output_tokens = done.iter().map(|c| c.output_tokens).sum();
        let per_request = |total: usize| if done.is_empty() { 0.0 } else { total as f64 / done.len() as f64 };
        let ms = |d: &std::time::Duration| d.as_secs_f64() * 1e3;
        let tpot = done.iter().filter(|c| c.output_tokens > 1);
        RunReport {
            load,
            completed: done.len(),
            failed: failures.len(),
            failures: count_failures(&failures),
            duration_s: secs,
            request_throughput: done.len() as f64 / secs,
            output_throughput: total_output_tokens as f64 / secs,
            total_throughput: (total_input_tokens + total_output_tokens) as f64 / secs,
            total_input_tokens,
            total_output_tokens,
            mean_input_tokens: per_request(total_input_tokens),
            mean_output_tokens: per_request(total_output_tokens),
            ttft_ms: Summary::of(done.iter().map(|c| ms(&c.ttft)).collect()),
            tpot_ms: Summary::of(tpot.map(|c| ms(&(c.e2e - c.ttft)) / (c.output_tokens - 1) as f64).collect()),
            itl_ms: Summary::of(done.iter().flat_map(|c| c.itl.iter().map(ms)).collect()),
            e2e_ms: Summary::of(done.iter().map(|c| ms(&c.e2e)).collect()),
            speculative: speculation(&done, server_spec),
        }
    }
}

fn count_failures(failures: &[Failure]) -> Vec<FailureCount> {
    let mut counts: BTreeMap<String, FailureCount> = BTreeMap::new();
    for f in failures {
        let kind = f.kind();
        counts.entry(kind.clone()).or_insert(FailureCount { kind, count: 0, example: f.to_string() }).count += 1;
    }
    counts.into_values().collect()
}

fn speculation(done: &[Completed], server_spec: Option<SpecCounts>) -> Option<SpecSummary> {
    let mut sum = SpecCounts::default();
    for c in done.iter().filter_map(|c| c.speculative) {
        sum.steps += c.steps;
        sum.drafted += c.drafted;
        sum.accepted += c.accepted;
        sum.synthetic |= c.synthetic;
    }
    SpecSummary::new(SpecSource::PerRequest, sum)
        .or_else(|| server_spec.and_then(|c| SpecSummary::new(SpecSource::ServerMetrics, c)))
}

/// An earlier `--json` report, to draw beside this one (`--compare`).
pub fn read_report(path: &PathBuf) -> Result<ServeBenchReport, super::BenchError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| super::BenchError::Read { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|source| super::BenchError::NotAReport { path: path.clone(), source })
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:>10.2} {:>10.2} {:>10.2} {:>10.2}", self.mean, self.p50, self.p90, self.p99)
    }
}

impl fmt::Display for SpecSummary {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let source = match self.source {
            SpecSource::PerRequest => "per request",
            SpecSource::ServerMetrics => "server /metrics",
        };
        let synthetic = if self.synthetic { ", acceptance forced by the server" } else { "" };
        write!(
            f,
            "speculative   {:.2} tokens/step, {:.1}% of {} drafts accepted ({} accepted, {} steps; {source}{synthetic})",
            self.tokens_per_step,
            100.0 * self.acceptance_rate,
            self.drafted,
            self.accepted,
            self.steps
        )
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let r = self;
        writeln!(f, "requests      {} completed, {} failed, in {:.2} s", r.completed, r.failed, r.duration_s)?;
        writeln!(
            f,
            "throughput    {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s",
            r.request_throughput, r.output_throughput, r.total_throughput
        )?;
        writeln!(f, "tokens        {:.1} in, {:.1} out per request", r.mean_input_tokens, r.mean_output_tokens)?;
        writeln!(f, "latency (ms)  {:>10} {:>10} {:>10} {:>10}", "mean", "p50", "p90", "p99")?;
        for (name, summary) in [("TTFT", r.ttft_ms), ("TPOT", r.tpot_ms), ("ITL", r.itl_ms), ("E2E", r.e2e_ms)] {
            match summary {
                Some(s) => writeln!(f, "  {name:<12}{s}")?,
                None => writeln!(f, "  {name:<12}{:>10}", "-")?,
            }
        }
        if let Some(s) = &r.speculative {
            writeln!(f, "{s}")?;
        }
        for failure in &r.failures {
            writeln!(f, "failed        {} x{} (first: {})", failure.kind, failure.count, failure.example)?;
        }
        Ok(())
    }
}

impl fmt::Display for ServeBenchReport {
    /// The sweep at a glance: one line per run, with the speculation's columns when the
    /// server speculated.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let width = self.label.chars().count().max(5);
        let speculated = self.runs.iter().any(|r| r.speculative.is_some());
        write!(
            f,
            "{:<width$}  {:<16} {:>8} {:>10} {:>12} {:>9} {:>10} {:>9} {:>7}",
            "label", "load", "req/s", "out tok/s", "total tok/s", "TTFT p50", "TPOT mean", "E2E p50", "failed"
        )?;
        if speculated {
            write!(f, " {:>8} {:>8}", "accepted", "tok/step")?;
        }
        writeln!(f)?;
        let ms = |s: Option<Summary>, pick: fn(&Summary) -> f64| s.map_or("-".into(), |s| format!("{:.1}", pick(&s)));
        for r in &self.runs {
            write!(
                f,
                "{:<width$}  {:<16} {:>8.2} {:>10.1} {:>12.1} {:>9} {:>10} {:>9} {:>7}",
                self.label,
                r.load.to_string(),
                r.request_throughput,
                r.output_throughput,
                r.total_throughput,
                ms(r.ttft_ms, |s| s.p50),
                ms(r.tpot_ms, |s| s.mean),
                ms(r.e2e_ms, |s| s.p50),
                r.failed
            )?;
            match (&r.speculative, speculated) {
                (Some(s), _) => write!(f, " {:>7.1}% {:>8.2}", 100.0 * s.acceptance_rate, s.tokens_per_step)?,
                (None, true) => write!(f, " {:>8} {:>8}", "-", "-")?,
                (None, false) => {}
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn completed(ttft_ms: u64, e2e_ms: u64, tokens: usize, spec: Option<SpecCounts>) -> Completed {
        Completed {
            ttft: Duration::from_millis(ttft_ms),
            e2e: Duration::from_millis(e2e_ms),
            itl: vec![Duration::from_millis(10); tokens - 1],
            prompt_tokens: Some(16),
            output_tokens: tokens,
            speculative: spec,
        }
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let s = Summary::of((1..=101).map(f64::from).collect()).unwrap();
        assert_eq!((s.mean, s.p50, s.p90, s.p99), (51.0, 51.0, 91.0, 100.0));
        let s = Summary::of(vec![4.0, 1.0]).unwrap();
        assert_eq!((s.p50, s.p90), (2.5, 3.7));
        assert_eq!(Summary::of(vec![]), None);
    }

    #[test]
    fn a_run_counts_tokens_rates_failures_and_speculation() {
        let spec = SpecCounts { steps: 2, drafted: 8, accepted: 6, synthetic: false };
        let results = vec![
            Ok(completed(100, 1000, 10, Some(spec))),
            Ok(completed(200, 2000, 10, Some(spec))),
            Err(Failure::Http { status: 503, message: "too many requests waiting".into() }),
            Err(Failure::Http { status: 503, message: "again".into() }),
            Err(Failure::Timeout(Duration::from_secs(1))),
        ];
        let r = RunReport::new(Load::Concurrency(2), RunOutcome { results, duration: Duration::from_secs(4) }, None);
        assert_eq!((r.completed, r.failed), (2, 3));
        assert_eq!((r.request_throughput, r.output_throughput, r.total_throughput), (0.5, 5.0, 13.0));
        assert_eq!(r.tpot_ms.unwrap().p50, 150.0); // (900 / 9 + 1800 / 9) / 2
        assert_eq!(r.itl_ms.unwrap().mean, 10.0);
        let kinds: Vec<_> = r.failures.iter().map(|f| (f.kind.as_str(), f.count)).collect();
        assert_eq!(kinds, [("http 503", 2), ("timeout", 1)]);
        assert_eq!(r.failures[0].example, "HTTP 503: too many requests waiting");
        let s = r.speculative.unwrap();
        assert_eq!((s.source, s.steps, s.acceptance_rate, s.tokens_per_step), (SpecSource::PerRequest, 4, 0.75, 4.0));
        // Without per-request statistics, the server's counters stand in.
        let results = vec![Ok(completed(100, 1000, 10, None))];
        let r = RunReport::new(Load::AllAtOnce, RunOutcome { results, duration: Duration::from_secs(1) }, Some(spec));
        assert_eq!(r.speculative.unwrap().source, SpecSource::ServerMetrics);
        assert!(r.to_string().contains("4.00 tokens/step, 75.0% of 8 drafts accepted (6 accepted, 2 steps"), "{r}");
    }
}
