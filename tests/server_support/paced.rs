//! A runtime that needs no model: the no-op executor (each token is the previous one plus
//! one) slowed to a fixed time per step, and a word-level tokenizer (`w0` .. `w63`, any
//! other word is `w1`). Starts in milliseconds; requests run as long as a test needs.

use std::sync::Arc;
use std::time::Duration;

use specula::actors::{Executor, ModelInfo, NoopExecutor, Runtime, RuntimeHandle};
use specula::backend::BatchMeta;
use specula::model::tokenizer::Tokenizer;

pub const VOCAB: usize = 64;
/// The model's context, in tokens.
pub const CONTEXT: usize = 4096;

/// The no-op executor, `step` per forward.
pub struct PacedExecutor {
    pub step: Duration,
    inner: NoopExecutor,
}

impl Executor for PacedExecutor {
    fn vocab_size(&self) -> usize {
        VOCAB
    }

    fn forward(&mut self, meta: &BatchMeta) -> Result<Vec<f32>, String> {
        std::thread::sleep(self.step);
        self.inner.forward(meta)
    }
}

pub fn tokenizer() -> Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB).map(|i| (format!("w{i}"), i.into())).collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w1"},
    });
    let inner: tokenizers::Tokenizer = json.to_string().parse().expect("a word-level tokenizer");
    Tokenizer::new(inner)
}

/// A runtime of `max_batch` rows taking `step` per step; no end-of-sequence token.
pub fn runtime(step: Duration, max_batch: usize, max_waiting: usize) -> RuntimeHandle {
    let info = ModelInfo { vocab: VOCAB, context: CONTEXT, eos: vec![] };
    Runtime::builder()
        .max_batch(max_batch)
        .max_waiting(max_waiting)
        .kv_blocks(4096)
        .build_with(PacedExecutor { step, inner: NoopExecutor { vocab: VOCAB } }, info, Some(Arc::new(tokenizer())))
        .expect("the paced runtime starts")
}
