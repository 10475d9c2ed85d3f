//! Building a proposer from what a user asks for (`--spec`, `--draft-model`, ...).

use std::path::Path;
use std::sync::Arc;

use super::eagle::{EagleProposer, DEFAULT_HEAD};
use super::medusa::MedusaProposer;
use super::{check_draft_compatible, LookaheadConfig, LookaheadProposer, ModelProposer, NgramProposer};
use super::{Proposer, SpecError, SpecMethod};
use crate::backend::{Backend, BackendError};
use crate::model::{load_model_with, Llama, LoadOptions, ModelSource, Tokenizer, WeightDtype};

/// What to draft with.
#[derive(Debug, Clone, PartialEq)]
pub struct ProposerChoice {
    pub method: SpecMethod,
    /// The draft model for `SpecMethod::Draft` (its tokenizer must match the target's), the
    /// head's folder for `SpecMethod::Eagle` (default: `eagle::DEFAULT_HEAD`), or the heads'
    /// folder for `SpecMethod::Medusa` (`Dummy`: random heads; none: refused).
    pub draft_model: Option<ModelSource>,
    /// The target's layers that draft for `SpecMethod::EarlyExit`.
    pub draft_layers: usize,
    /// KV blocks of 16 tokens in a drafting model's own cache.
    pub draft_kv_blocks: usize,
    /// How the draft model's weights are stored (`Fp8`: quantized at load).
    pub draft_dtype: WeightDtype,
    /// The window, n-gram size and verification set of `SpecMethod::Lookahead`.
    pub lookahead: LookaheadConfig,
    /// The device number (a GPU) a draft model runs on; default: the target's.
    pub draft_device: Option<usize>,
}

/// Random Medusa heads (`dummy:`): as many as Medusa's usual checkpoints have.
const RANDOM_MEDUSA_HEADS: usize = 4;

impl ProposerChoice {
    /// The proposer, or None for `SpecMethod::None`. A drafting model runs on a backend of
    /// its own from `new_backend` (on a GPU: its own stream).
    pub fn build<B: Backend>(
        &self,
        target: &Arc<Llama<B>>,
        tokenizer: Option<&Tokenizer>,
        new_backend: &dyn Fn() -> Result<B, BackendError>,
    ) -> Result<Option<Box<dyn Proposer>>, SpecError> {
        let (blocks, block_size) = (self.draft_kv_blocks.max(1), crate::prompt::BLOCK_SIZE);
        // These draft with the target's own weights, which a tensor-parallel target holds
        // split over its ranks.
        let reads_target = matches!(self.method, SpecMethod::EarlyExit | SpecMethod::Eagle | SpecMethod::Medusa);
        if reads_target && !target.shard().is_whole() {
            return Err(SpecError::SplitTarget { method: self.method, ranks: target.shard().ranks });
        }
        Ok(match self.method {
            SpecMethod::None => None,
            SpecMethod::Ngram => Some(Box::new(NgramProposer::default())),
            SpecMethod::EarlyExit => {
                let max = target.num_layers();
                if !(1..=max).contains(&self.draft_layers) {
                    return Err(SpecError::DraftLayers { got: self.draft_layers, max });
                }
                // Early exit reads the target's layers: it stays on the target's device.
                let (backend, home) = self.backend(new_backend)?;
                if let (Some(device), Some(_)) = (self.draft_device, home) {
                    return Err(SpecError::DraftDevice { method: self.method, device });
                }
                let p = ModelProposer::new(backend, target.clone(), self.draft_layers, blocks, block_size)?;
                Some(Box::new(p))
            }
            SpecMethod::Draft => {
                let source = self.draft_model.as_ref().ok_or(SpecError::MissingDraftModel)?;
                let (backend, _) = self.backend(new_backend)?;
                let draft = load_model_with(source, &LoadOptions::dtype(self.draft_dtype), &backend)
                    .map_err(|e| SpecError::DraftModel(e.to_string()))?;
                check_draft_compatible(
                    tokenizer,
                    draft.tokenizer.as_ref(),
                    target.config.vocab_size,
                    draft.model.config.vocab_size,
                )?;
                let layers = draft.model.num_layers();
                Some(Box::new(ModelProposer::new(backend, Arc::new(draft.model), layers, blocks, block_size)?))
            }
            SpecMethod::Eagle => {
                let dir = match &self.draft_model {
                    Some(ModelSource::Path(p)) => p.clone(),
                    Some(ModelSource::Dummy(_)) => {
                        return Err(SpecError::DraftModel("an EAGLE head is a folder".into()))
                    }
                    None if Path::new(DEFAULT_HEAD).join("config.json").is_file() => DEFAULT_HEAD.into(),
                    None => return Err(SpecError::DefaultHeadMissing(DEFAULT_HEAD)),
                };
                let (backend, target) = self.head_backend(target, new_backend)?;
                Some(Box::new(EagleProposer::load(backend, target, &dir, blocks, block_size)?))
            }
            SpecMethod::Medusa => Some(self.medusa(target, new_backend()?)?),
            SpecMethod::Lookahead => {
                if !self.lookahead.is_valid() {
                    return Err(SpecError::LookaheadShape(self.lookahead));
                }
                Some(Box::new(LookaheadProposer::new(self.lookahead)))
            }
        })
    }

    /// Medusa heads from their folder, or random ones for `dummy:`.
    fn medusa<B: Backend>(&self, target: &Arc<Llama<B>>, backend: B) -> Result<Box<dyn Proposer>, SpecError> {
        Ok(Box::new(match &self.draft_model {
            Some(ModelSource::Path(dir)) => MedusaProposer::load(backend, target.clone(), dir)?,
            Some(ModelSource::Dummy(_)) => {
                tracing::warn!("Medusa heads with random weights: their drafts are guesses (labelled random_heads)");
                MedusaProposer::random(backend, target.clone(), RANDOM_MEDUSA_HEADS)?
            }
            None => return Err(SpecError::MissingMedusaHead),
        }))
    }

    /// The EAGLE head's backend and the target it reads: on the target's device, or on
    /// `draft_device` with a copy of the target's embedding and LM head there (the head
    /// reads nothing else of the target's weights; its hidden states come through the host).
    fn head_backend<B: Backend>(
        &self,
        target: &Arc<Llama<B>>,
        new_backend: &dyn Fn() -> Result<B, BackendError>,
    ) -> Result<(B, Arc<Llama<B>>), SpecError> {
        Ok(match self.backend(new_backend)? {
            (there, Some(home)) => {
                let copy = target.head_copy(&home, &there)?;
                (there, Arc::new(copy))
            }
            (backend, None) => (backend, target.clone()),
        })
    }

    /// The drafting backend: from `new_backend` (the target's device, its own stream), or on
    /// `draft_device`; with it, when that is another device than the target's, a backend on
    /// the target's device (to copy from).
    fn backend<B: Backend>(
        &self,
        new_backend: &dyn Fn() -> Result<B, BackendError>,
    ) -> Result<(B, Option<B>), SpecError> {
        let home = new_backend()?;
        let Some(device) = self.draft_device else { return Ok((home, None)) };
        let there = home.on_device(device)?;
        let moved = there.device_ordinal() != home.device_ordinal();
        Ok((there, moved.then_some(home)))
    }
}
