//! What the benchmark measured: JSON through serde, the tables through `Display`.
//!
//! The serialized structs list their fields in alphabetical order: the JSON's keys come out
//! in the order they always had (sorted), so files of earlier runs compare line by line.

use std::fmt;

use serde::Serialize;

use super::EAGER;

#[derive(Serialize)]
pub struct BenchReport {
    /// Device-to-device copy, read + write: the ceiling's denominator.
    pub copy_bandwidth_bytes_per_s: f64,
    pub decode: Vec<DecodeRow>,
    pub device: String,
    /// Per op and token count (not in the JSON).
    #[serde(skip)]
    pub kernels: Vec<KernelRow>,
    pub overlap: Option<Overlap>,
    /// `None` when not run (`--spec-tokens 0` or a single model).
    pub speculative: Option<SpecReport>,
    /// The first model's verification steps against its decode step.
    pub verify: Vec<VerifyRow>,
    pub weight_dtype: &'static str,
}

/// Batch-1 greedy decode of one model, in every variant.
#[derive(Serialize)]
pub struct DecodeRow {
    /// Weight bytes / copy bandwidth, in tokens per second.
    pub ceiling_tok_s: f64,
    pub model: String,
    /// In the order of [`VARIANTS`](super::VARIANTS).
    pub tok_s: Vec<VariantRate>,
    pub weight_bytes: f64,
    pub weight_dtype: &'static str,
}

#[derive(Serialize)]
pub struct VariantRate {
    pub tok_s: f64,
    pub variant: &'static str,
}

/// One verification step over k + 1 tokens against one decode step.
#[derive(Serialize)]
pub struct VerifyRow {
    pub decode_ms: f64,
    pub k: usize,
    pub ms: f64,
    pub ratio: f64,
    pub variant: &'static str,
}

/// End-to-end decoding in the engine's loop, plain and speculative.
#[derive(Serialize)]
pub struct SpecReport {
    /// (accepted, drafted) in the greedy run with the draft's real acceptance.
    pub greedy_accepted_drafted: (u64, u64),
    /// Greedy speculative (the draft's real acceptance) against plain: equal leading
    /// tokens of all.
    pub greedy_equal: (usize, usize),
    pub plain_tok_s: f64,
    /// Synthetic acceptance, one row per longest draft.
    pub rows: Vec<SpecRow>,
    pub synthetic_acceptance: f64,
    pub tokens: usize,
    #[serde(skip)]
    pub target: String,
    #[serde(skip)]
    pub draft: String,
}

#[derive(Serialize)]
pub struct SpecRow {
    pub acceptance: f64,
    pub max_draft: usize,
    pub steps: u64,
    pub tok_s: f64,
    pub tokens_per_step: f64,
}

/// One target step and `steps` draft steps on two streams, in ms from the target's start.
#[derive(Serialize)]
pub struct Overlap {
    pub concurrent_ms: f64,
    pub draft: (f64, f64),
    pub draft_alone_ms: f64,
    pub overlap_ms: f64,
    #[serde(skip)]
    pub steps: usize,
    pub target: (f64, f64),
    pub target_alone_ms: f64,
}

/// One projection of one layer alone, at one token count.
pub struct KernelRow {
    pub model: &'static str,
    pub kind: &'static str,
    pub op: &'static str,
    pub n: usize,
    pub us: f64,
    pub bytes: f64,
}

/// Per op: the fraction of the copy bandwidth its weight stream reached at each token
/// count, and its time at the most tokens over its time at one.
pub struct KernelTable<'a> {
    pub rows: &'a [KernelRow],
    pub bandwidth: f64,
}

impl fmt::Display for KernelTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let rows = self.rows;
        writeln!(f, "\n== one layer's matmuls alone: weight bytes / time as a fraction of the copy bandwidth (CUDA events around 10 calls back to back, median of 5; bf16 activations) ==")?;
        let ns: Vec<usize> = rows
            .iter()
            .filter(|r| r.model == rows[0].model && r.op == rows[0].op && r.kind == rows[0].kind)
            .map(|r| r.n)
            .collect();
        write!(f, "{:<22} {:>8}", "op", "us n=1")?;
        for n in &ns {
            write!(f, " {:>6}", format!("n={n}"))?;
        }
        writeln!(f, " {:>9}", "t(64)/t(1)")?;
        for chunk in rows.chunks(ns.len() * 4) {
            for op in ["q+k+v", "o", "gate+up", "down"] {
                let r: Vec<&KernelRow> = chunk.iter().filter(|r| r.op == op).collect();
                write!(f, "{:<22} {:>8.1}", format!("{} {} {}", r[0].model, r[0].kind, op), r[0].us)?;
                for k in &r {
                    write!(f, " {:>5.1}%", 100.0 * k.bytes / (k.us * 1e-6) / self.bandwidth)?;
                }
                writeln!(f, " {:>9.2}", r[r.len() - 1].us / r[0].us)?;
            }
        }
        Ok(())
    }
}

impl BenchReport {
    /// The tables of everything measured before the end-to-end speculation.
    pub fn measured(&self) -> impl fmt::Display + '_ {
        Section(self, Self::fmt_measured)
    }

    /// The end-to-end speculation, or that it did not run.
    pub fn speculation(&self) -> impl fmt::Display + '_ {
        Section(self, Self::fmt_speculation)
    }

    fn fmt_measured(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", KernelTable { rows: &self.kernels, bandwidth: self.copy_bandwidth_bytes_per_s })?;
        self.fmt_decode(f)?;
        if !self.verify.is_empty() {
            writeln!(f, "\n== verification step vs decode step ({}, graphs, median of 30) ==", self.decode[0].model)?;
            writeln!(f, "{:<40} {:<6} {:>8} {:>12} {:>12}", "variant", "k", "tokens", "ms", "x decode")?;
            for VerifyRow { variant, k, ms, ratio, decode_ms } in &self.verify {
                writeln!(f, "{variant:<40} {k:<6} {:>8} {ms:>12.3} {ratio:>12.2}   (decode {decode_ms:.3} ms)", k + 1)?;
            }
        }
        if let Some(o) = &self.overlap {
            writeln!(f, "\n== draft/target overlap (event timeline, ms from the target's start) ==")?;
            writeln!(f, "target one step       [{:>8.3}, {:>8.3}]", o.target.0, o.target.1)?;
            writeln!(f, "draft {} steps         [{:>8.3}, {:>8.3}]", o.steps, o.draft.0, o.draft.1)?;
            writeln!(
                f,
                "overlapped {:.3} ms; concurrent wall {:.3} ms vs serial {:.3} ms (target alone {:.3} + draft alone {:.3})",
                o.overlap_ms,
                o.concurrent_ms,
                o.target_alone_ms + o.draft_alone_ms,
                o.target_alone_ms,
                o.draft_alone_ms
            )?;
        }
        Ok(())
    }

    fn fmt_decode(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(
            f,
            "\n== batch-1 greedy decode (dummy weights, {}; ceiling = weight bytes / copy bandwidth {:.2} TB/s) ==",
            self.weight_dtype,
            self.copy_bandwidth_bytes_per_s / 1e12
        )?;
        writeln!(
            f,
            "{:<24} {:<40} {:>9} {:>9} {:>9}",
            "model (GB, ceiling)", "variant", "tok/s", "fraction", "vs eager"
        )?;
        for DecodeRow { model: name, weight_bytes: bytes, tok_s: best, ceiling_tok_s: ceiling, .. } in &self.decode {
            for VariantRate { variant, tok_s } in best {
                writeln!(
                    f,
                    "{:<24} {:<40} {tok_s:>9.1} {:>8.1}% {:>8.3}x",
                    format!("{} ({:.2}, {ceiling:.0})", name.trim_start_matches("dummy:"), bytes / 1e9),
                    variant,
                    100.0 * tok_s / ceiling,
                    tok_s / best[EAGER].tok_s
                )?;
            }
        }
        Ok(())
    }

    fn fmt_speculation(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let Some(sp) = &self.speculative else {
            return writeln!(f, "\nend-to-end speculative tok/s: not run");
        };
        writeln!(
            f,
            "\n== end-to-end greedy decode, {} tokens: {} target, {} drafting (own stream), \
             synthetic acceptance {} (engine loop: graphs, only ids to the host) ==",
            sp.tokens, sp.target, sp.draft, sp.synthetic_acceptance
        )?;
        writeln!(f, "without speculation   {:>8.1} tok/s", sp.plain_tok_s)?;
        for r in &sp.rows {
            writeln!(
                f,
                "with speculation k<={:<2} {:>7.1} tok/s  ({:.2}x; {} verify steps, {:.2} tokens per step, acceptance {:.2})",
                r.max_draft,
                r.tok_s,
                r.tok_s / sp.plain_tok_s,
                r.steps,
                r.tokens_per_step,
                r.acceptance
            )?;
        }
        let (equal, total) = sp.greedy_equal;
        writeln!(
            f,
            "greedy speculative (real acceptance, {} of {} drafts) vs plain: {equal}/{total} tokens equal  {}",
            sp.greedy_accepted_drafted.0,
            sp.greedy_accepted_drafted.1,
            if equal == total { "pass" } else { "FAIL" }
        )
    }
}

/// The tables in the order `run` prints them.
impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.fmt_measured(f)?;
        self.fmt_speculation(f)
    }
}

/// A part of a report, displayed by one of its methods.
struct Section<'a>(&'a BenchReport, fn(&BenchReport, &mut fmt::Formatter) -> fmt::Result);

impl fmt::Display for Section<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        (self.1)(self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The JSON that `bench/gpu.sh` and the notes read: the same keys, nesting and order as
    /// the object this file replaced, which was built with `json!` field by field.
    #[test]
    fn json_keeps_its_fields() {
        let report = BenchReport {
            copy_bandwidth_bytes_per_s: 4.1e12,
            decode: vec![DecodeRow {
                ceiling_tok_s: 255.5,
                model: "dummy:llama-3.1-8b".into(),
                tok_s: vec![
                    VariantRate { tok_s: 230.25, variant: "graphs (default)" },
                    VariantRate { tok_s: 120.0, variant: "eager" },
                ],
                weight_bytes: 16.06e9,
                weight_dtype: "bf16",
            }],
            device: "gpu".into(),
            kernels: vec![],
            overlap: Some(Overlap {
                concurrent_ms: 7.5,
                draft: (0.01, 3.0),
                draft_alone_ms: 3.5,
                overlap_ms: 2.9,
                steps: 8,
                target: (0.0, 6.0),
                target_alone_ms: 6.25,
            }),
            speculative: Some(SpecReport {
                greedy_accepted_drafted: (3, 40),
                greedy_equal: (256, 256),
                plain_tok_s: 230.0,
                rows: vec![SpecRow { acceptance: 0.8, max_draft: 8, steps: 60, tok_s: 500.5, tokens_per_step: 4.25 }],
                synthetic_acceptance: 0.8,
                tokens: 256,
                target: "dummy:llama-3.1-8b".into(),
                draft: "dummy:llama-3.2-1b".into(),
            }),
            verify: vec![VerifyRow { decode_ms: 4.0, k: 4, ms: 5.0, ratio: 1.25, variant: "graphs (default)" }],
            weight_dtype: "bf16",
        };
        let d = &report.decode[0];
        let sp = report.speculative.as_ref().unwrap();
        let o = report.overlap.as_ref().unwrap();
        let before = json!({
            "device": report.device,
            "weight_dtype": report.weight_dtype,
            "copy_bandwidth_bytes_per_s": report.copy_bandwidth_bytes_per_s,
            "decode": [json!({"model": d.model, "weight_dtype": d.weight_dtype, "weight_bytes": d.weight_bytes, "ceiling_tok_s": d.ceiling_tok_s, "tok_s": d.tok_s.iter().map(|v| json!({"variant": v.variant, "tok_s": v.tok_s})).collect::<Vec<_>>()})],
            "verify": report.verify.iter().map(|v| json!({"variant": v.variant, "k": v.k, "ms": v.ms, "ratio": v.ratio, "decode_ms": v.decode_ms})).collect::<Vec<_>>(),
            "speculative": json!({"greedy_equal": sp.greedy_equal, "greedy_accepted_drafted": sp.greedy_accepted_drafted, "plain_tok_s": sp.plain_tok_s, "synthetic_acceptance": sp.synthetic_acceptance, "tokens": sp.tokens, "rows": sp.rows.iter().map(|r| json!({"max_draft": r.max_draft, "tok_s": r.tok_s, "steps": r.steps, "tokens_per_step": r.tokens_per_step, "acceptance": r.acceptance})).collect::<Vec<_>>()}),
            "overlap": json!({"target": o.target, "draft": o.draft, "overlap_ms": o.overlap_ms, "concurrent_ms": o.concurrent_ms, "target_alone_ms": o.target_alone_ms, "draft_alone_ms": o.draft_alone_ms}),
        });
        assert_eq!(serde_json::to_string_pretty(&report).unwrap(), serde_json::to_string_pretty(&before).unwrap());
        let none = BenchReport { overlap: None, speculative: None, ..report };
        let text = serde_json::to_string(&none).unwrap();
        assert!(text.contains(r#""overlap":null"#) && text.contains(r#""speculative":null"#));
    }

    #[test]
    fn kernel_table() {
        let mut rows = vec![];
        for (n, us) in [(1, 10.0), (64, 40.0)] {
            for op in ["q+k+v", "o", "gate+up", "down"] {
                rows.push(KernelRow { model: "8B", kind: "bf16", op, n, us, bytes: 4e7 });
            }
        }
        let text = KernelTable { rows: &rows, bandwidth: 8e12 }.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7);
        assert_eq!(lines[2], "op                       us n=1    n=1   n=64 t(64)/t(1)");
        assert_eq!(lines[3], "8B bf16 q+k+v              10.0  50.0%  12.5%      4.00");
    }
}
