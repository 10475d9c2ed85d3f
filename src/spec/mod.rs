//! Speculative decoding: proposers draft tokens, the target verifies them in one forward,
//! and `core::spec` decides what is accepted. The output is the target's own.

mod choice;
mod draft_model;
pub mod eagle;
mod lookahead;
pub mod medusa;
mod stats;

pub use crate::core::lookahead::LookaheadConfig;
pub use crate::core::spec::{Draft, DraftLengths};
pub use choice::ProposerChoice;
pub use draft_model::ModelProposer;
pub use eagle::{EagleProposer, HeadSize};
pub use lookahead::LookaheadProposer;
pub use medusa::MedusaProposer;
pub use stats::SpecStats;

use crate::backend::BackendError;
use crate::core::kv_manager::KvStats;
use crate::core::ngram;
use crate::core::sampling::{distribution, sample_from, Sampler, SamplingParams};
use crate::core::spec::{accept_greedy, accept_sampled};
pub use crate::core::tree::{TreeDraft, TreeShape, MAX_TREE_NODES, MAX_TREE_TOP_K};

/// Identifies a sequence to a proposer that keeps per-sequence state (a draft KV cache).
pub type SeqId = u64;

/// Something that guesses the next tokens of a sequence.
pub trait Proposer: Send {
    /// Up to `k` tokens continuing `history` (prompt and accepted output so far).
    fn propose(
        &mut self,
        seq: SeqId,
        history: &[u32],
        k: usize,
        sampling: &SamplingParams,
    ) -> Result<Draft, BackendError>;
    /// Drafts for several sequences at once; a model runs them as one batch per draft
    /// position. One result per request, in order.
    fn propose_many(&mut self, reqs: &[ProposeRequest]) -> Vec<Result<Draft, BackendError>> {
        reqs.iter().map(|r| self.propose(r.seq, r.history, r.k, r.sampling)).collect()
    }
    /// Only the first `valid` tokens of what this proposer has seen of `seq` still stand
    /// (the rest were rejected drafts): forget the others.
    fn rollback(&mut self, _seq: SeqId, _valid: usize) {}
    /// The sequence is finished: free its state.
    fn release(&mut self, _seq: SeqId) {}
    /// Usage of the proposer's own KV pool, if it has one.
    fn kv_stats(&self) -> Option<KvStats> {
        None
    }
    /// Whether this proposer reads the target's hidden states (EAGLE): the target then keeps
    /// them and hands those of verified positions to `observe`. Such a proposer drafts from
    /// verified positions only, never ahead of the target.
    fn wants_hidden(&self) -> bool {
        false
    }
    /// Which of the target's hidden states `observe` gets (with `wants_hidden`).
    fn hidden_kind(&self) -> crate::model::HiddenKind {
        crate::model::HiddenKind::Last
    }
    /// The target's hidden states `hidden_kind` names at positions `start..` of `seq`,
    /// `[n, parts * hidden]` row-major: verified tokens only.
    fn observe(&mut self, _seq: SeqId, _start: usize, _hidden: &[f32]) {}
    /// Whether this proposer drafts trees (`propose_tree`).
    fn drafts_trees(&self) -> bool {
        false
    }
    /// A tree of draft tokens continuing `history`, as `shape` bounds it (greedy requests:
    /// the likeliest continuations). Empty from a proposer that drafts no trees.
    fn propose_tree(&mut self, _seq: SeqId, _history: &[u32], _shape: TreeShape) -> Result<TreeDraft, BackendError> {
        Ok(TreeDraft::default())
    }
    /// The target's greedy token after each node of the tree it just verified for `seq`
    /// (`targets[0]`: after the row's last token): lookahead learns from all of them.
    fn tree_verified(&mut self, _seq: SeqId, _draft: &TreeDraft, _targets: &[u32]) {}
    /// Whether the drafts come from random weights (Medusa heads made up for measuring
    /// cost): the statistics say so.
    fn random_weights(&self) -> bool {
        false
    }
}

/// One sequence's part of `Proposer::propose_many`.
#[derive(Debug, Clone, Copy)]
pub struct ProposeRequest<'a> {
    pub seq: SeqId,
    pub history: &'a [u32],
    pub k: usize,
    pub sampling: &'a SamplingParams,
}

/// `Proposer::propose` for a proposer whose `propose_many` does the work.
pub fn propose_one(p: &mut (impl Proposer + ?Sized), req: ProposeRequest) -> Result<Draft, BackendError> {
    p.propose_many(&[req]).pop().expect("one result per request")
}

impl ProposeRequest<'_> {
    /// An empty draft for this request, with room for the probabilities if it samples.
    pub fn empty_draft(&self) -> Draft {
        Draft { tokens: Vec::with_capacity(self.k), probs: (!self.sampling.is_greedy()).then(Vec::new) }
    }
}

/// A drafter's next token from its logits `row`: the argmax for a greedy draft; otherwise
/// sampled with the request's own parameters over `context` (the sequence before this
/// token), its distribution kept in the draft's probabilities for the rejection sampling.
pub fn pick_draft_token(
    draft: &mut Draft,
    row: &[f32],
    context: &[u32],
    sampling: &SamplingParams,
    rng: &mut impl rand::Rng,
) -> u32 {
    let Some(probs) = draft.probs.as_mut() else { return crate::core::sampling::argmax(row) };
    // Drafts follow the request's own temperature and top-p, so q is close to p.
    let q = distribution(row, context, sampling);
    let t = sample_from(&q, rng);
    probs.push(q);
    t
}

/// Speculative decoding as the runtime runs it.
pub struct Speculation {
    pub proposer: Box<dyn Proposer>,
    /// The most draft tokens per row and step (at most `MAX_DRAFT_LEN`).
    pub max_draft: usize,
    /// Benchmarks only: accept each draft token with this probability whatever its value.
    /// The output is then not the model's; it is labelled `synthetic` in the statistics.
    pub synthetic_acceptance: Option<f64>,
    /// Adaptive (the default) or always `max_draft`.
    pub lengths: DraftLengths,
    /// Draft a tree of this shape per decoding row instead of a chain (a proposer that
    /// drafts trees); the row's length policy then only turns its tree on or off.
    pub tree: Option<TreeShape>,
}

/// Which proposer, as chosen on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SpecMethod {
    None,
    Ngram,
    Draft,
    EarlyExit,
    /// An EAGLE head over the target's hidden states (`draft_model`: the head's folder;
    /// without one, the head trained for the default model).
    Eagle,
    /// Medusa heads over the target's last hidden state (`draft_model`: the heads' folder;
    /// `dummy:` random heads, labelled); chains, or trees with `--spec-tree`.
    Medusa,
    /// Lookahead decoding: Jacobi iterations and an n-gram pool, verified as one tree.
    Lookahead,
}

/// Prompt lookup: no model, no state.
#[derive(Debug, Clone)]
pub struct NgramProposer {
    pub min_n: usize,
    pub max_n: usize,
}

impl Default for NgramProposer {
    fn default() -> Self {
        NgramProposer { min_n: 1, max_n: 4 }
    }
}

impl Proposer for NgramProposer {
    fn propose(&mut self, _: SeqId, history: &[u32], k: usize, _: &SamplingParams) -> Result<Draft, BackendError> {
        Ok(Draft { tokens: ngram::propose(history, k, self.min_n, self.max_n), probs: None })
    }
}

/// The target's verdict on a draft: the tokens to append (accepted drafts, then the
/// target's own token). `logits` holds k + 1 rows: after the last token, and after each draft;
/// `history` ends with that last token. With `synthetic_acceptance` (benchmarks only) each
/// draft is accepted with that probability whatever its value.
pub fn verify(
    draft: &Draft,
    logits: &[f32],
    vocab: usize,
    history: &[u32],
    sampler: &mut Sampler,
    synthetic_acceptance: Option<f64>,
) -> Vec<u32> {
    let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
    let context = |i: usize| -> Vec<u32> { history.iter().chain(&draft.tokens[..i]).copied().collect() };
    if let Some(rate) = synthetic_acceptance {
        let accepted = draft.tokens.iter().take_while(|_| rand::Rng::random::<f64>(sampler.rng()) < rate).count();
        let mut out = draft.tokens[..accepted].to_vec();
        out.push(sampler.sample(rows[accepted], &context(accepted)));
        return out;
    }
    if sampler.params.is_greedy() {
        let target: Vec<u32> = (0..rows.len()).map(|i| sampler.sample(rows[i], &context(i))).collect();
        return accept_greedy(&draft.tokens, &target);
    }
    let p: Vec<Vec<f32>> = (0..rows.len()).map(|i| distribution(rows[i], &context(i), &sampler.params)).collect();
    let q: Vec<Vec<f32>> = (0..draft.tokens.len()).map(|i| draft.q(i, vocab)).collect();
    accept_sampled(&draft.tokens, &q, &p, sampler.rng())
}

/// Whether the target's greedy ids decide the step: greedy sampling whose logits nothing
/// rewrites (no repetition penalty).
pub fn ids_suffice(sampler: &Sampler) -> bool {
    sampler.params.is_greedy() && sampler.params.repetition_penalty == 1.0
}

/// `spec::verify` when `ids_suffice`, from the target's greedy id after the last token and
/// after each draft (`ids`, k + 1 of them): the same tokens, the same random draws.
pub fn verify_ids(draft: &Draft, ids: &[u32], sampler: &mut Sampler, synthetic_acceptance: Option<f64>) -> Vec<u32> {
    let accepted = match synthetic_acceptance {
        Some(rate) => draft.tokens.iter().take_while(|_| rand::Rng::random::<f64>(sampler.rng()) < rate).count(),
        None => return accept_greedy(&draft.tokens, ids),
    };
    let mut out = draft.tokens[..accepted].to_vec();
    out.push(ids[accepted]);
    out
}

/// Why speculation could not be set up. Settings are named by their fields
/// (`ProposerChoice`, `Speculation`); a command line maps them to its own flags.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("drafting with a draft model needs `draft_model`")]
    MissingDraftModel,
    #[error("the draft model cannot draft for this target: {0}")]
    IncompatibleDraft(String),
    #[error("draft_layers must be between 1 and {max} (the target's layers), got {got}")]
    DraftLayers { got: usize, max: usize },
    #[error("max_draft must be between 1 and {MAX_DRAFT_LEN}, got {0}")]
    DraftLen(usize),
    #[error("synthetic_acceptance must be in [0, 1], got {0}")]
    SyntheticRate(f64),
    #[error("could not load the draft model: {0}")]
    DraftModel(String),
    #[error("could not load the EAGLE head: {0}")]
    EagleHead(#[source] crate::model::LoadError),
    /// `--spec eagle` without `--draft-model`, from a binary that cannot see its source tree.
    #[error("the default EAGLE head ships in the source tree ({0}), which this binary cannot see: pass the head's folder with --draft-model")]
    DefaultHeadMissing(&'static str),
    #[error("the draft head's {what} is {head}, the target's is {target}: it was trained for another model")]
    HeadMismatch { what: HeadSize, head: usize, target: usize },
    /// An EAGLE-3 head that reads target layers the target does not have (or a target too
    /// shallow for the default low, middle and high layers).
    #[error("the EAGLE-3 head reads the residual stream entering the target's layers {ids:?}, but the target has {layers} layers")]
    AuxLayers { ids: Vec<i64>, layers: usize },
    /// A proposer that drafts with the target's own layers, for a target split by tensor
    /// parallelism.
    #[error("the {method:?} proposer drafts with the target's own layers, which tensor parallelism splits over {ranks} ranks (a draft model or n-grams can draft)")]
    SplitTarget { method: SpecMethod, ranks: usize },
    #[error("could not load the Medusa heads: {0}")]
    MedusaHead(#[source] crate::model::LoadError),
    #[error("Medusa drafting needs trained heads (`draft_model`: a folder of config.json and medusa_lm_head.safetensors), or `dummy:` for random ones")]
    MissingMedusaHead,
    #[error("a lookahead shape needs window >= 1, ngram >= 2 and (window + guesses) * (ngram - 1) <= {MAX_TREE_NODES}, got {0:?}")]
    LookaheadShape(LookaheadConfig),
    /// A device for a proposer that runs the target's own layers, other than the target's.
    #[error("the {method:?} proposer runs the target's own layers, on the target's device: draft_device {device} applies to a draft model or an EAGLE head")]
    DraftDevice { method: SpecMethod, device: usize },
    #[error("tree speculation needs a proposer that drafts trees (the EAGLE head)")]
    TreeProposer,
    #[error("synthetic_acceptance applies to chains of drafts, not trees")]
    TreeSynthetic,
    #[error(
        "tree speculation moves the accepted path's KV entries, which this executor cannot (a tensor-parallel target)"
    )]
    TreeExecutor,
    #[error(
        "a tree needs 1 to {MAX_TREE_NODES} nodes and 1 to {MAX_TREE_TOP_K} children per node, got {nodes} and {top_k}"
    )]
    TreeShape { nodes: usize, top_k: usize },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// The longest draft a step may carry.
pub const MAX_DRAFT_LEN: usize = 16;

/// Refuses a maximum draft length or a synthetic acceptance rate that cannot work.
pub fn check_settings(max_draft: usize, synthetic_acceptance: Option<f64>) -> Result<(), SpecError> {
    if !(1..=MAX_DRAFT_LEN).contains(&max_draft) {
        return Err(SpecError::DraftLen(max_draft));
    }
    match synthetic_acceptance {
        Some(rate) if !(0.0..=1.0).contains(&rate) => Err(SpecError::SyntheticRate(rate)),
        _ => Ok(()),
    }
}

/// A draft model must speak the target's language: same vocabulary, token for token.
pub fn check_draft_compatible(
    target: Option<&crate::model::Tokenizer>,
    draft: Option<&crate::model::Tokenizer>,
    target_vocab: usize,
    draft_vocab: usize,
) -> Result<(), SpecError> {
    if target_vocab != draft_vocab {
        return Err(SpecError::IncompatibleDraft(format!(
            "vocabulary sizes differ ({draft_vocab} in the draft, {target_vocab} in the target)"
        )));
    }
    match (target, draft) {
        (Some(t), Some(d)) => match (0..t.vocab_size() as u32).find(|&id| t.id_to_token(id) != d.id_to_token(id)) {
            Some(id) => Err(SpecError::IncompatibleDraft(format!(
                "token {id} is {:?} in the target but {:?} in the draft: the tokenizers differ",
                t.id_to_token(id),
                d.id_to_token(id)
            ))),
            None if t.vocab_size() != d.vocab_size() => {
                Err(SpecError::IncompatibleDraft("the tokenizers have different sizes".into()))
            }
            None => Ok(()),
        },
        (None, None) => Ok(()),
        _ => Err(SpecError::IncompatibleDraft("one model has a tokenizer and the other has none".into())),
    }
}
