//! Shared test helpers: a tiny random Llama, writers for the file formats we load
//! (safetensors folder, GGUF), and an f64 reference forward written independently of `src/`.
#![allow(dead_code)]

pub mod engine;
pub mod fp8;
pub mod gguf_writer;
pub mod random_llama;
pub mod reference;
pub mod runtime;
pub mod sampling;
pub mod tiny;
pub mod vocab;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use specula::request::{GenerateRequest, Prompt};

/// The real default model's GGUF (SmolLM2-135M-Instruct Q4_1): `SPECULA_TEST_GGUF` when set,
/// else the cached default model (fetched on first use). `None` (after saying why) when it
/// cannot be had, so that tests needing it skip rather than fail on machines without it.
pub fn default_model_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SPECULA_TEST_GGUF") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "SPECULA_TEST_GGUF={} does not exist", p.display());
        return Some(p);
    }
    match specula::cli::default_model_path() {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("skipping: the default model is unavailable ({e}); set SPECULA_TEST_GGUF to its .gguf file");
            None
        }
    }
}

/// A fresh empty directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("specula-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// max |got − want| / max |want| over all values.
pub fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    let err = got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    err / scale
}

/// `count` requests of token prompts spread over `vocab` (request i: `2 + growth * i`
/// tokens), request i asking for `max_tokens(i)` tokens with EOS ignored.
pub fn token_requests(vocab: u32, count: u32, growth: u32, max_tokens: impl Fn(u32) -> usize) -> Vec<GenerateRequest> {
    (0..count)
        .map(|i| GenerateRequest {
            max_tokens: max_tokens(i),
            ignore_eos: true,
            ..GenerateRequest::new(Prompt::Tokens((0..2 + growth * i).map(|j| (i * 7 + j * 5) % vocab).collect()))
        })
        .collect()
}
