//! The speculative-decoding flags shared by `generate` and `serve`, and the proposer they
//! describe.

use std::sync::Arc;

use clap::Args;

use specula::backend::{Backend, BackendError};
use specula::model::{Llama, ModelSource, Tokenizer, WeightDtype};
use specula::spec::{check_settings, Proposer, ProposerChoice, SpecMethod, Speculation};

/// Speculative decoding options.
#[derive(Args)]
pub struct SpecArgs {
    /// How to draft tokens for the target to verify.
    #[arg(long, value_enum, default_value = "none")]
    pub spec: SpecMethod,
    /// The draft model for `--spec draft` (same tokenizer as the target).
    #[arg(long)]
    pub draft_model: Option<ModelSource>,
    /// Layers of the target that draft for `--spec early-exit`.
    #[arg(long, default_value_t = 6, allow_negative_numbers = true)]
    pub draft_layers: usize,
    /// The most tokens drafted per step (each request's length adapts to its acceptance).
    #[arg(long, default_value_t = 4, allow_negative_numbers = true)]
    pub draft_len: usize,
    /// KV blocks of 16 tokens in the draft model's cache (`draft` and `early-exit`).
    #[arg(long, default_value_t = 1024, allow_negative_numbers = true)]
    pub draft_kv_blocks: usize,
    /// How the draft model's weights are stored: its own precision (`auto`) or FP8.
    #[arg(long, value_enum, default_value = "auto")]
    pub draft_dtype: WeightDtype,
    /// Benchmarks only: accept each draft token with this probability whatever its value.
    /// The output is then not the model's, and is labelled `synthetic` wherever it appears.
    #[arg(long, allow_negative_numbers = true)]
    pub synthetic_acceptance: Option<f64>,
}

impl SpecArgs {
    /// The proposer the options ask for, or None for plain decoding. A drafting model runs
    /// on a backend of its own from `new_backend` (on a GPU: its own stream).
    pub fn proposer<B: Backend>(
        &self,
        target: &Arc<Llama<B>>,
        tokenizer: Option<&Tokenizer>,
        new_backend: &dyn Fn() -> Result<B, BackendError>,
    ) -> Result<Option<Box<dyn Proposer>>, Box<dyn std::error::Error>> {
        check_settings(self.draft_len, self.synthetic_acceptance)?;
        if self.synthetic_acceptance.is_some() && self.spec == SpecMethod::None {
            return Err("--synthetic-acceptance needs a proposer (--spec ngram|draft|early-exit)".into());
        }
        let choice = ProposerChoice {
            method: self.spec,
            draft_model: self.draft_model.clone(),
            draft_layers: self.draft_layers,
            draft_kv_blocks: self.draft_kv_blocks,
            draft_dtype: self.draft_dtype,
        };
        Ok(choice.build(target, tokenizer, new_backend)?)
    }

    /// Speculation for the runtime, or None for plain decoding.
    pub fn speculation<B: Backend>(
        &self,
        target: &Arc<Llama<B>>,
        tokenizer: Option<&Tokenizer>,
        new_backend: &dyn Fn() -> Result<B, BackendError>,
    ) -> Result<Option<Speculation>, Box<dyn std::error::Error>> {
        let proposer = self.proposer(target, tokenizer, new_backend)?;
        Ok(proposer.map(|proposer| Speculation {
            proposer,
            max_draft: self.draft_len,
            synthetic_acceptance: self.synthetic_acceptance,
        }))
    }

    /// Says on stderr that the output will not be the model's.
    pub fn warn_if_synthetic(&self) {
        if self.synthetic_acceptance.is_some() {
            eprintln!("warning: synthetic acceptance is on: the output is not the model's (benchmark mode)");
        }
    }
}
