//! What the parity suite found, and its tables.

use std::fmt;

use super::chi_square::{ChiSquare, ALPHA};
use super::TOLERANCE;

/// One op (or one property of an op, such as batch invariance) at one shape.
pub struct OpRow {
    pub op: String,
    pub shape: String,
    /// max |gpu - cpu| / max |cpu| (0 or infinity for a bitwise property).
    pub err: f64,
    pub pass: bool,
}

/// The model on both backends for one prompt, in one weight precision.
pub struct ForwardRow {
    pub prompt: String,
    /// The weights both backends loaded: `bf16` (the file's own precision) or `fp8`.
    pub dtype: &'static str,
    pub steps: usize,
    pub equal: usize,
    pub first_diff: Option<usize>,
    /// CPU logit of its own choice minus its logit of the GPU's choice, at the first difference.
    pub margin: Option<f32>,
    pub max_logit_err: f64,
    /// Draft lengths k (1..=16) whose verification forward over k + 1 tokens did not
    /// give the bits of the k + 1 decode steps it repeats.
    pub verify_differs: Vec<usize>,
    /// FP8 only: whether the GPU's next token after the prompt is the f32 CPU model's,
    /// and KL(f32 || fp8) of those next-token distributions.
    pub fp8_vs_f32: Option<(bool, f64)>,
}

/// The model on the GPU with an FP8 KV cache against the bf16 cache, for one prompt.
pub struct KvRow {
    pub prompt: String,
    pub steps: usize,
    /// Greedy tokens equal before the first difference.
    pub equal: usize,
    pub first_diff: Option<usize>,
    /// bf16 logit of its own choice minus its logit of the FP8 run's choice, at the first difference.
    pub margin: Option<f32>,
    /// Steps whose top-1 token agrees (the bf16 run's tokens fed to both).
    pub top1: usize,
    /// max |fp8 - bf16| / max |bf16| of the logits.
    pub max_logit_err: f64,
    /// As `ForwardRow::verify_differs`, over the FP8 cache.
    pub verify_differs: Vec<usize>,
}

/// Greedy speculative decoding against plain greedy decoding, both on the GPU.
pub struct SpeculativeRow {
    pub prompt: &'static str,
    pub proposer: String,
    pub equal: usize,
    pub total: usize,
    pub first_diff: Option<usize>,
    pub drafted: u64,
    pub accepted: u64,
}

impl SpeculativeRow {
    pub fn pass(&self) -> bool {
        self.first_diff.is_none()
    }
}

/// A tensor-parallel run against another run of the same model on the GPU: the NCCL path
/// with one rank against the plain path (ids and logits, bit for bit), or N ranks against
/// one (ids).
pub struct TpRow {
    pub model: String,
    /// What is compared, e.g. `tp1 (nccl) vs plain`.
    pub check: String,
    pub steps: usize,
    /// Greedy ids equal before the first difference.
    pub equal: usize,
    /// Whether every step's logits were the same bits (`None`: not compared).
    pub logits_bitwise: Option<bool>,
}

impl TpRow {
    pub fn pass(&self) -> bool {
        self.equal == self.steps && self.logits_bitwise != Some(false)
    }
}

/// Many rows of one logits row sampled on the GPU with one setting, each with its own uniform.
pub struct SamplingRow {
    pub setting: String,
    /// `spread` or `ties` (logits on a few levels, so that cuts fall inside ties).
    pub logits: &'static str,
    pub vocab: usize,
    pub draws: usize,
    /// Draws equal to the CPU sampler's with the same uniform.
    pub same: usize,
    /// The histogram against the CPU's distribution (`None` for greedy rows: `same` decides).
    pub chi: Option<ChiSquare>,
}

impl SamplingRow {
    /// The histogram passes its test, and at most one draw in a thousand differs from the
    /// CPU's (a uniform within rounding of a boundary); greedy rows must all be equal.
    pub fn pass(&self) -> bool {
        self.chi.is_none_or(|c| c.pass()) && (self.draws - self.same) <= self.draws / 1000
    }
}

/// One step's sampling of `rows` rows: on the GPU (`sample_rows`, the best of 5) and by
/// the host path (logits copied, each row sampled by the CPU).
#[derive(Debug, Clone, Copy)]
pub struct SamplingTiming {
    pub rows: usize,
    pub vocab: usize,
    pub gpu_ms: f64,
    pub host_ms: f64,
}

pub struct ParityReport {
    /// Seed of the random op inputs.
    pub seed: u64,
    /// The model of the forward and speculative comparisons (`none`: not run).
    pub model: String,
    /// Greedy tokens compared per prompt.
    pub tokens: usize,
    pub ops: Vec<OpRow>,
    /// Sampling on the GPU against the CPU sampler.
    pub sampling: Vec<SamplingRow>,
    pub sampling_timing: Option<SamplingTiming>,
    pub forward: Vec<ForwardRow>,
    /// The FP8 KV cache against bf16, on the GPU.
    pub kv_fp8: Vec<KvRow>,
    pub speculative: Vec<SpeculativeRow>,
    pub tensor_parallel: Vec<TpRow>,
}

/// The checks that must hold: ops within tolerance, speculative output equal to plain
/// output, verification equal to decoding bit for bit.
#[derive(Debug, thiserror::Error)]
#[error(
    "{ops} ops outside tolerance; {sampling} sampling rows off the CPU's distribution; {speculative} speculative outputs differ from plain decoding; \
     {invariance} prompts whose verification differs from decoding; {tensor_parallel} tensor-parallel runs differ"
)]
pub struct ParityFailures {
    pub ops: usize,
    pub sampling: usize,
    pub speculative: usize,
    pub invariance: usize,
    pub tensor_parallel: usize,
}

impl ParityReport {
    /// Fails when any check that must hold did not.
    pub fn check(&self) -> Result<(), ParityFailures> {
        let failures = ParityFailures {
            ops: self.ops.iter().filter(|r| !r.pass).count(),
            sampling: self.sampling.iter().filter(|r| !r.pass()).count(),
            speculative: self.speculative.iter().filter(|s| !s.pass()).count(),
            invariance: self.forward.iter().filter(|f| !f.verify_differs.is_empty()).count()
                + self.kv_fp8.iter().filter(|k| !k.verify_differs.is_empty()).count(),
            tensor_parallel: self.tensor_parallel.iter().filter(|t| !t.pass()).count(),
        };
        let total = failures.ops + failures.sampling + failures.speculative;
        if total + failures.invariance + failures.tensor_parallel > 0 {
            return Err(failures);
        }
        Ok(())
    }

    /// Prompts whose greedy tokens on the GPU parted from the CPU's (or with the FP8 KV cache
    /// from the bf16 cache's): allowed (a near-tie can go either way), so not a failure; the
    /// margin at the first difference tells.
    pub fn diverged(&self) -> usize {
        self.forward.iter().filter(|f| f.equal < f.steps).count()
            + self.kv_fp8.iter().filter(|k| k.equal < k.steps).count()
    }

    /// A word for the reader when prompts diverged.
    pub fn note(&self) -> Option<String> {
        let n = self.diverged();
        (n > 0).then(|| {
            format!("note: {n} prompts diverged; see the margin at the first difference (a near-tie is < ~0.05)")
        })
    }
}

/// The tables: ops, then the forward and speculative comparisons where they ran.
impl fmt::Display for ParityReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "\n== kernel parity (tolerance {:.0e}, max |gpu - cpu| / max |cpu|) ==", TOLERANCE)?;
        writeln!(f, "{:<34} {:<22} {:>10}", "op", "shape", "rel err")?;
        for r in &self.ops {
            writeln!(f, "{:<34} {:<22} {:>10.2e}  {}", r.op, r.shape, r.err, if r.pass { "pass" } else { "FAIL" })?;
        }
        if !self.sampling.is_empty() {
            self.fmt_sampling(f)?;
        }
        if !self.forward.is_empty() {
            self.fmt_forward(f)?;
        }
        if !self.kv_fp8.is_empty() {
            self.fmt_kv_fp8(f)?;
        }
        if !self.speculative.is_empty() {
            self.fmt_speculative(f)?;
        }
        if !self.tensor_parallel.is_empty() {
            self.fmt_tensor_parallel(f)?;
        }
        Ok(())
    }
}

impl ParityReport {
    fn fmt_sampling(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(
            f,
            "\n== sampling on the GPU vs the CPU sampler (chi-square of the histogram against the CPU's distribution, fails at p < {ALPHA:.0e}; same uniform, same token) =="
        )?;
        writeln!(
            f,
            "{:<36} {:<7} {:>7} {:>6} {:>9} {:>4} {:>9} {:>13}",
            "setting", "logits", "vocab", "draws", "chi2", "dof", "critical", "same token"
        )?;
        for r in &self.sampling {
            let (stat, dof, crit) = r.chi.map_or(("-".into(), "-".into(), "-".into()), |c| {
                let stat = match c.impossible {
                    0 => format!("{:.1}", c.statistic),
                    n => format!("{n} EXCL"),
                };
                (stat, c.dof.to_string(), format!("{:.1}", c.critical))
            });
            writeln!(
                f,
                "{:<36} {:<7} {:>7} {:>6} {:>9} {:>4} {:>9} {:>7}/{:<5}  {}",
                r.setting,
                r.logits,
                r.vocab,
                r.draws,
                stat,
                dof,
                crit,
                r.same,
                r.draws,
                if r.pass() { "pass" } else { "FAIL" }
            )?;
        }
        if let Some(t) = self.sampling_timing {
            writeln!(
                f,
                "one step of {} rows × {}, every setting on: {:.2} ms on the GPU, {:.1} ms copying the logits and sampling on the host",
                t.rows, t.vocab, t.gpu_ms, t.host_ms
            )?;
        }
        Ok(())
    }

    fn fmt_forward(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "\n== forward parity: {} (greedy, CPU tokens fed to both; verify = k+1 tokens vs k+1 decode steps, k = 1..16) ==", self.model)?;
        writeln!(
            f,
            "{:<10} {:<5} {:>8} {:>13} {:>11} {:>11} {:>16} {:>22}",
            "prompt",
            "dtype",
            "equal",
            "first differ",
            "cpu margin",
            "logits err",
            "verify==decode",
            "fp8 vs f32: top1, KL"
        )?;
        for r in &self.forward {
            writeln!(
                f,
                "{:<10} {:<5} {:>5}/{:<2} {:>13} {:>11} {:>11.2e} {:>16} {:>22}",
                r.prompt,
                r.dtype,
                r.equal,
                r.steps,
                r.first_diff.map_or("-".into(), |s| s.to_string()),
                r.margin.map_or("-".into(), |m| format!("{m:.4}")),
                r.max_logit_err,
                if r.verify_differs.is_empty() {
                    "bitwise".to_string()
                } else {
                    format!("DIFFERS {:?}", r.verify_differs)
                },
                r.fp8_vs_f32
                    .map_or("-".into(), |(same, kl)| format!("{}, {kl:.2e}", if same { "same" } else { "DIFFERENT" }))
            )?;
        }
        Ok(())
    }

    fn fmt_kv_fp8(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(
            f,
            "\n== fp8 KV cache vs bf16 KV cache on the GPU: {} (greedy, bf16 tokens fed to both) ==",
            self.model
        )?;
        writeln!(
            f,
            "{:<10} {:>8} {:>13} {:>12} {:>8} {:>11} {:>16}",
            "prompt", "equal", "first differ", "bf16 margin", "top-1", "logits err", "verify==decode"
        )?;
        for r in &self.kv_fp8 {
            writeln!(
                f,
                "{:<10} {:>5}/{:<2} {:>13} {:>12} {:>5}/{:<2} {:>11.2e} {:>16}",
                r.prompt,
                r.equal,
                r.steps,
                r.first_diff.map_or("-".into(), |s| s.to_string()),
                r.margin.map_or("-".into(), |m| format!("{m:.4}")),
                r.top1,
                r.steps,
                r.max_logit_err,
                if r.verify_differs.is_empty() {
                    "bitwise".to_string()
                } else {
                    format!("DIFFERS {:?}", r.verify_differs)
                },
            )?;
        }
        let (agree, total) = self.kv_fp8.iter().fold((0, 0), |(a, t), r| (a + r.top1, t + r.steps));
        writeln!(f, "top-1 agreement over the prompts: {agree}/{total}")
    }

    fn fmt_tensor_parallel(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "\n== tensor parallelism on the GPU (greedy, decode steps through CUDA graphs) ==")?;
        writeln!(f, "{:<22} {:<26} {:>9} {:>10}", "model", "check", "ids", "logits")?;
        for t in &self.tensor_parallel {
            let logits = match t.logits_bitwise {
                None => "-",
                Some(true) => "bitwise",
                Some(false) => "DIFFER",
            };
            let verdict = if t.pass() { "pass" } else { "FAIL" };
            writeln!(f, "{:<22} {:<26} {:>5}/{:<3} {:>10}  {verdict}", t.model, t.check, t.equal, t.steps, logits)?;
        }
        Ok(())
    }

    fn fmt_speculative(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(f, "\n== speculative vs plain greedy, both on the GPU (engine loop, {} tokens) ==", self.tokens)?;
        writeln!(
            f,
            "{:<10} {:<24} {:>9} {:>13} {:>9} {:>9}",
            "prompt", "proposer", "equal", "first differ", "drafted", "accepted"
        )?;
        for s in &self.speculative {
            writeln!(
                f,
                "{:<10} {:<24} {:>5}/{:<3} {:>13} {:>9} {:>9}  {}",
                s.prompt,
                s.proposer,
                s.equal,
                s.total,
                s.first_diff.map_or("-".into(), |d| d.to_string()),
                s.drafted,
                s.accepted,
                if s.pass() { "pass" } else { "FAIL" }
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ParityReport {
        let op = |op: &str, err: f64, pass: bool| OpRow { op: op.into(), shape: "[7, 576]".into(), err, pass };
        ParityReport {
            seed: 1,
            model: "default".into(),
            tokens: 64,
            ops: vec![op("rms_norm", 1.5e-3, true), op("silu_mul", 2e-2, false)],
            sampling: vec![
                SamplingRow {
                    setting: "top-k 20".into(),
                    logits: "ties",
                    vocab: 2048,
                    draws: 20_000,
                    same: 19_999,
                    chi: Some(ChiSquare { statistic: 17.25, dof: 19, critical: 52.1, impossible: 0 }),
                },
                SamplingRow { setting: "greedy".into(), logits: "spread", vocab: 2048, draws: 16, same: 15, chi: None },
            ],
            sampling_timing: Some(SamplingTiming { rows: 64, vocab: 128_256, gpu_ms: 0.412, host_ms: 905.3 }),
            forward: vec![ForwardRow {
                prompt: "france".into(),
                dtype: "fp8",
                steps: 64,
                equal: 12,
                first_diff: Some(12),
                margin: Some(0.03125),
                max_logit_err: 4.2e-3,
                verify_differs: vec![],
                fp8_vs_f32: Some((true, 1.4e-2)),
            }],
            kv_fp8: vec![KvRow {
                prompt: "chat".into(),
                steps: 64,
                equal: 40,
                first_diff: Some(40),
                margin: Some(0.0625),
                top1: 62,
                max_logit_err: 3.1e-2,
                verify_differs: vec![],
            }],
            speculative: vec![SpeculativeRow {
                prompt: "fib",
                proposer: "ngram k<=8".into(),
                equal: 64,
                total: 64,
                first_diff: None,
                drafted: 90,
                accepted: 40,
            }],
            tensor_parallel: vec![TpRow {
                model: "dummy:llama-3.1-8b".into(),
                check: "tp1 (nccl) vs plain".into(),
                steps: 32,
                equal: 32,
                logits_bitwise: Some(false),
            }],
        }
    }

    #[test]
    fn tables_and_verdict() {
        let r = report();
        let text = r.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "== kernel parity (tolerance 1e-2, max |gpu - cpu| / max |cpu|) ==");
        assert_eq!(lines[3], "rms_norm                           [7, 576]                  1.50e-3  pass");
        assert_eq!(lines[4], "silu_mul                           [7, 576]                  2.00e-2  FAIL");
        assert!(text.contains(
            "france     fp8      12/64            12      0.0312     4.20e-3          bitwise          same, 1.40e-2\n"
        ));
        assert!(
            text.contains("fib        ngram k<=8                  64/64              -        90        40  pass\n")
        );
        assert!(text.contains("chat          40/64            40       0.0625    62/64     3.10e-2          bitwise\n"));
        assert!(text.contains("top-1 agreement over the prompts: 62/64\n"));
        assert!(text.contains("dummy:llama-3.1-8b     tp1 (nccl) vs plain           32/32      DIFFER  FAIL\n"));
        assert!(text.contains(
            "top-k 20                             ties       2048  20000      17.2   19      52.1   19999/20000  pass\n"
        ));
        assert!(text.contains("greedy                               spread     2048     16         -    -         -      15/16     FAIL\n"));
        assert!(text.contains("one step of 64 rows × 128256, every setting on: 0.41 ms on the GPU, 905.3 ms"));
        let failures = r.check().unwrap_err();
        assert_eq!((failures.ops, failures.sampling, failures.speculative), (1, 1, 0));
        assert_eq!((failures.invariance, failures.tensor_parallel), (0, 1));
        assert_eq!(r.diverged(), 2);
        assert!(r.note().unwrap().starts_with("note: 2 prompts diverged"));
    }
}
