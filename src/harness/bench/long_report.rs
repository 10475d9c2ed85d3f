//! What the long-context benchmark measured (`specula bench --context N,...`): batch-1
//! decode at long contexts against the bytes a step must read, and how many requests the
//! runtime's KV pool holds, per KV cache storage.

use std::fmt;

use serde::Serialize;

#[derive(Serialize)]
pub struct LongContextReport {
    /// Device-to-device copy, read + write: the ceiling's denominator.
    pub copy_bandwidth_bytes_per_s: f64,
    pub device: String,
    /// Requests of `request_tokens` the pool holds at once, per storage.
    pub fits: Vec<PoolFit>,
    pub model: String,
    pub request_tokens: usize,
    pub rows: Vec<ContextRow>,
    /// With `--prefill`: the prompt's prefill, per storage.
    pub prefill: Vec<PrefillRow>,
    pub weight_dtype: &'static str,
}

/// Batch-1 prefill of a prompt from position 0, in chunks, over one KV storage.
#[derive(Serialize)]
pub struct PrefillRow {
    pub chunk: usize,
    pub kv_dtype: &'static str,
    pub seconds: f64,
    pub tokens: usize,
}

impl PrefillRow {
    pub fn tok_s(&self) -> f64 {
        self.tokens as f64 / self.seconds
    }
}

/// Batch-1 greedy decode at one context length over one KV storage.
#[derive(Serialize)]
pub struct ContextRow {
    /// (weight bytes + KV bytes) / copy bandwidth, in tokens per second.
    pub ceiling_tok_s: f64,
    /// Cached positions every timed step attends to (about; the steps add a few).
    pub context: usize,
    /// KV bytes one step reads: every cached position's keys and values, all layers.
    pub kv_bytes: f64,
    pub kv_dtype: &'static str,
    pub tok_s: f64,
    pub weight_bytes: f64,
}

impl ContextRow {
    pub fn fraction(&self) -> f64 {
        self.tok_s / self.ceiling_tok_s
    }
}

/// The KV pool the runtime would size on this device after loading the model (its default
/// configuration: `gpu_memory_fraction` of the memory, less a reserve for the steps).
#[derive(Serialize)]
pub struct PoolFit {
    pub bytes_per_token: usize,
    pub kv_dtype: &'static str,
    pub pool_bytes: usize,
    pub pool_tokens: usize,
    /// Requests of `request_tokens` (whole blocks each) held at once.
    pub requests: usize,
}

impl fmt::Display for LongContextReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        writeln!(
            f,
            "\n== long context: {} ({} weights), batch-1 decode on {}; ceiling = (weight + KV bytes) / copy {:.2} TB/s ==",
            self.model,
            self.weight_dtype,
            self.device,
            self.copy_bandwidth_bytes_per_s / 1e12
        )?;
        writeln!(
            f,
            "{:<9} {:>9} {:>10} {:>11} {:>13} {:>10}",
            "kv cache", "context", "tok/s", "KV GB/step", "ceiling tok/s", "fraction"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<9} {:>9} {:>10.1} {:>11.2} {:>13.1} {:>9.1}%",
                r.kv_dtype,
                r.context,
                r.tok_s,
                r.kv_bytes / 1e9,
                r.ceiling_tok_s,
                100.0 * r.fraction()
            )?;
        }
        if !self.prefill.is_empty() {
            writeln!(f, "\n== batch-1 prefill from position 0, in chunks ==")?;
            writeln!(f, "{:<9} {:>9} {:>7} {:>10} {:>10}", "kv cache", "tokens", "chunk", "seconds", "tok/s")?;
            for p in &self.prefill {
                let (kv, tokens, chunk, secs, tok_s) = (p.kv_dtype, p.tokens, p.chunk, p.seconds, p.tok_s());
                writeln!(f, "{kv:<9} {tokens:>9} {chunk:>7} {secs:>10.2} {tok_s:>10.0}")?;
            }
        }
        writeln!(
            f,
            "\n== {}-token requests held at once in the runtime's KV pool on this device ==",
            self.request_tokens
        )?;
        writeln!(
            f,
            "{:<9} {:>13} {:>10} {:>12} {:>9}",
            "kv cache", "bytes/token", "pool GB", "pool tokens", "requests"
        )?;
        for p in &self.fits {
            writeln!(
                f,
                "{:<9} {:>13} {:>10.2} {:>12} {:>9}",
                p.kv_dtype,
                p.bytes_per_token,
                p.pool_bytes as f64 / 1e9,
                p.pool_tokens,
                p.requests
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables() {
        let row = |kv_dtype, tok_s| ContextRow {
            ceiling_tok_s: 100.0,
            context: 32_000,
            kv_bytes: 4.2e9,
            kv_dtype,
            tok_s,
            weight_bytes: 16e9,
        };
        let fit = |kv_dtype, bytes_per_token, pool_tokens, requests| PoolFit {
            bytes_per_token,
            kv_dtype,
            pool_bytes: bytes_per_token * pool_tokens,
            pool_tokens,
            requests,
        };
        let r = LongContextReport {
            copy_bandwidth_bytes_per_s: 3e12,
            device: "GPU".into(),
            fits: vec![fit("bf16", 131_072, 400_000, 97), fit("fp8_e4m3", 66_048, 793_792, 193)],
            model: "dummy:llama-3.1-8b".into(),
            request_tokens: 4096,
            rows: vec![row("bf16", 80.0), row("fp8_e4m3", 90.5)],
            prefill: vec![PrefillRow { chunk: 512, kv_dtype: "bf16", seconds: 4.0, tokens: 32_768 }],
            weight_dtype: "bf16",
        };
        let text = r.to_string();
        assert!(text.contains("bf16          32000       80.0        4.20         100.0      80.0%\n"), "{text}");
        assert!(text.contains("fp8_e4m3          66048      52.43       793792       193\n"), "{text}");
        assert!(text.contains("bf16          32768     512       4.00       8192\n"), "{text}");
        assert_eq!(row("bf16", 50.0).fraction(), 0.5);
    }
}
