//! The command-line layer shared by `specula` and the chat example: the options (which
//! model, on which device, how to speculate), the runtime they start, the default model
//! (`default_model`) and what is shown of the library's tracing events (`log`).

pub mod default_model;
pub mod log;

use std::sync::Arc;

use clap::Args;

use crate::actors::{ConfigError, ConfigField, RuntimeBuilder, RuntimeError, RuntimeHandle};
use crate::backend::{Backend, BackendError};
use crate::device::{Device, OnDevice};
use crate::model::{load_model_shard, load_model_with, Llama, LoadOptions, ModelSource, Shard, Tokenizer, WeightDtype};
use crate::spec::MAX_DRAFT_LEN;
use crate::spec::{check_settings, LookaheadConfig, Proposer, ProposerChoice, SpecError, SpecMethod, Speculation};
use crate::spec::{DraftLengths, TreeShape, MAX_TREE_NODES, MAX_TREE_TOP_K};
use crate::tensor::{AttnWindow, KvDtype, KvOptions, RankGroup, WindowError};
pub use default_model::{default_model_path, FetchError, ModelArg};
pub use log::install_tracing;

/// Which model, stored how, on which device.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// `default` (SmolLM2-135M-Instruct, fetched on first use), a .gguf file, a Hugging Face
    /// folder, or `dummy:<shape>` (random weights at a real shape, for speed work).
    #[arg(long, default_value = "default", env = "SPECULA_MODEL")]
    pub model: ModelArg,
    /// Weight precision: `auto` (the checkpoint's own) or `fp8` (projection matrices
    /// quantized at load to FP8 E4M3, one scale per output channel; activations unquantized).
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: WeightDtype,
    /// Where the model runs: `auto` (the GPU when this binary has CUDA and a GPU is
    /// present, else the CPU), `cpu`, or `cuda` (GPU 0).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Device,
    /// On a GPU, the share of its memory to fill: the batching runtime's KV pool gets what
    /// the weights (and a draft model) leave of it.
    #[arg(long, default_value_t = 0.90, allow_negative_numbers = true)]
    pub gpu_memory_fraction: f64,
    /// KV cache precision: `auto` (f32 on the CPU, bf16 on a GPU), `bf16`, or `fp8` (E4M3
    /// with a power-of-two scale per token and KV head: about half of bf16's bytes).
    #[arg(long, value_enum, default_value = "auto")]
    pub kv_cache_dtype: KvDtype,
    /// Each token attends to the last N tokens (and the sink tokens) only; blocks that slide
    /// out of the window go back to the pool, so a sequence may outgrow the context. Default:
    /// the model's `sliding_window`, if its config.json has one; else full attention.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub attention_window: Option<usize>,
    /// With --attention-window: the first S tokens stay visible to every token (StreamingLLM
    /// attention sinks).
    #[arg(long, value_name = "S", default_value_t = 0, requires = "attention_window", allow_negative_numbers = true)]
    pub sink_tokens: usize,
    /// Split the target over N ranks (tensor parallelism: attention heads and the MLP's
    /// intermediate features). On the CPU the ranks are threads of this process; on CUDA,
    /// rank i runs on GPU i and the ranks sum their parts through NCCL. N = 1 runs the same
    /// path with one rank; without the option the whole model runs as is.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub tensor_parallel: Option<usize>,
}

impl ModelArgs {
    /// The KV cache as the options ask; a window of 0 or smaller than its sinks is refused.
    pub fn kv_options(&self) -> Result<KvOptions, WindowError> {
        let window = self.attention_window.map(|n| AttnWindow::new(n, self.sink_tokens)).transpose()?;
        Ok(KvOptions { dtype: self.kv_cache_dtype, window })
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions::dtype(self.dtype)
    }

    /// The model to load: the default model's path (fetched on first use) or as named.
    pub fn source(&self) -> Result<ModelSource, FetchError> {
        self.model.resolve()
    }
}

/// The target as `--tensor-parallel` asks: one model, or its ranks (rank order) with their
/// group.
pub enum Target<B: Backend> {
    Whole(B, Arc<Llama<B>>),
    Split(Arc<dyn RankGroup>, Vec<(B, Arc<Llama<B>>)>),
}

/// A target loaded from the options, with its tokenizer and name.
pub struct LoadedTarget<B: Backend> {
    pub target: Target<B>,
    pub tokenizer: Option<Tokenizer>,
    pub name: String,
}

impl<B: Backend> Target<B> {
    /// The whole model, or rank 0's part (what a proposer checks the target against).
    pub fn model(&self) -> &Arc<Llama<B>> {
        match self {
            Target::Whole(_, m) => m,
            Target::Split(_, ranks) => &ranks[0].1,
        }
    }

    /// The backend that runs the whole model, or rank 0's.
    pub fn backend(&self) -> &B {
        match self {
            Target::Whole(b, _) => b,
            Target::Split(_, ranks) => &ranks[0].0,
        }
    }

    /// Starts `builder`'s runtime around this target.
    pub fn build(self, builder: RuntimeBuilder, tokenizer: Option<Tokenizer>) -> Result<RuntimeHandle, RuntimeError> {
        match self {
            Target::Whole(backend, model) => builder.build(backend, model, tokenizer),
            Target::Split(group, ranks) => builder.build_tensor_parallel(group, ranks, tokenizer),
        }
    }
}

/// Loads the target `args` name on a backend from `new_backend`: whole, or with
/// `--tensor-parallel N` each rank's part on a backend of the group that backend makes
/// (refused, typed, by a backend without an all-reduce across ranks).
pub fn load_target<B: Backend>(
    args: &ModelArgs,
    new_backend: &dyn Fn() -> Result<B, BackendError>,
) -> Result<LoadedTarget<B>, Box<dyn std::error::Error>> {
    let (source, options, backend) = (args.source()?, args.load_options(), new_backend()?);
    let Some(ranks) = args.tensor_parallel else {
        let loaded = load_model_with(&source, &options, &backend)?;
        let target = Target::Whole(backend, Arc::new(loaded.model));
        return Ok(LoadedTarget { target, tokenizer: loaded.tokenizer, name: loaded.name });
    };
    let (group, backends) = backend.tensor_parallel(ranks)?;
    let (mut parts, mut first) = (Vec::with_capacity(ranks), None);
    for (rank, backend) in backends.into_iter().enumerate() {
        let loaded = load_model_shard(&source, &options, Shard { rank, ranks }, &backend)?;
        parts.push((backend, Arc::new(loaded.model)));
        first.get_or_insert((loaded.tokenizer, loaded.name));
    }
    let (tokenizer, name) = first.unwrap_or_default();
    Ok(LoadedTarget { target: Target::Split(group, parts), tokenizer, name })
}

/// A runtime started from the options.
pub struct Started {
    pub handle: RuntimeHandle,
    /// The model's file (or shape) name.
    pub name: String,
    /// Whether its tokenizer has a chat template (chat requests need one).
    pub chat_template: bool,
}

/// Loads the model on the device the options pick (a draft model on a backend of its own),
/// and starts `builder`'s runtime around it, speculating as `spec` says.
pub fn start_runtime(
    model: &ModelArgs,
    spec: &SpecArgs,
    builder: RuntimeBuilder,
) -> Result<Started, Box<dyn std::error::Error>> {
    model.backend.run(StartRuntime { model, spec, builder })?
}

struct StartRuntime<'a> {
    model: &'a ModelArgs,
    spec: &'a SpecArgs,
    builder: RuntimeBuilder,
}

impl OnDevice for StartRuntime<'_> {
    type Output = Result<Started, Box<dyn std::error::Error>>;

    fn run<B: Backend>(self, new_backend: &dyn Fn() -> Result<B, BackendError>) -> Self::Output {
        let kv = self.model.kv_options()?;
        let loaded = load_target(self.model, new_backend)?;
        let chat_template = loaded.tokenizer.as_ref().is_some_and(|t| t.chat_template.is_some());
        let mut builder = self.builder.gpu_memory_fraction(self.model.gpu_memory_fraction).kv_cache(kv);
        if let Some(spec) = self.spec.speculation(&loaded.target, loaded.tokenizer.as_ref(), new_backend)? {
            self.spec.warn_if_synthetic();
            builder = builder.speculation(spec);
        }
        let handle = loaded.target.build(builder, loaded.tokenizer).map_err(runtime_error)?;
        Ok(Started { handle, name: loaded.name, chat_template })
    }
}

/// Speculative decoding options.
#[derive(Args, Debug, Clone)]
pub struct SpecArgs {
    /// How to draft tokens for the target to verify.
    #[arg(long, value_enum, default_value = "none")]
    pub spec: SpecMethod,
    /// The draft model for `--spec draft` (same tokenizer as the target), the EAGLE head's
    /// folder for `--spec eagle` (default: the head trained for the default model), or the
    /// Medusa heads' folder for `--spec medusa` (`dummy:SHAPE`: random heads, labelled).
    #[arg(long)]
    pub draft_model: Option<ModelArg>,
    /// Layers of the target that draft for `--spec early-exit`.
    #[arg(long, default_value_t = 6, allow_negative_numbers = true)]
    pub draft_layers: usize,
    /// The most tokens drafted per step (each request's length adapts to its acceptance).
    #[arg(long, default_value_t = 4, allow_negative_numbers = true)]
    pub draft_len: usize,
    /// `adaptive`: each row's length follows its acceptance and the measured step costs,
    /// and drafting is held off where it delivers less than plain decoding; `fixed`: always
    /// `--draft-len`.
    #[arg(long, value_enum, default_value = "adaptive")]
    pub draft_lengths: DraftLengths,
    /// KV blocks of 16 tokens in the draft model's cache (`draft`, `early-exit`, `eagle`).
    #[arg(long, default_value_t = 1024, allow_negative_numbers = true)]
    pub draft_kv_blocks: usize,
    /// The GPU the draft model (or EAGLE head) runs on, with its own context and stream
    /// (default: the target's). Its proposed token ids reach the target through the host: a
    /// few bytes per step. An EAGLE head gets a copy of the target's embedding and LM head
    /// there. Not for `early-exit`, which runs the target's own layers.
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    pub draft_device: Option<usize>,
    /// How the draft model's weights are stored: its own precision (`auto`) or FP8.
    #[arg(long, value_enum, default_value = "auto")]
    pub draft_dtype: WeightDtype,
    /// Benchmarks only: accept each draft token with this probability whatever its value.
    /// The output is then not the model's, and is labelled `synthetic` wherever it appears.
    #[arg(long, allow_negative_numbers = true)]
    pub synthetic_acceptance: Option<f64>,
    /// With `--spec eagle` or `medusa`: draft a tree of up to N tokens per step and row, as
    /// deep as `--draft-len`, verified in one forward (one request with `generate --prompt`,
    /// or batched in the runtime). `--spec lookahead` always drafts trees.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub spec_tree: Option<usize>,
    /// With `--spec-tree`: children considered per node, and nodes expanded per depth.
    #[arg(long, value_name = "K", default_value_t = 4, requires = "spec_tree", allow_negative_numbers = true)]
    pub tree_top_k: usize,
    /// With `--spec lookahead`: guesses per Jacobi level (W).
    #[arg(long, value_name = "W", default_value_t = 5, allow_negative_numbers = true)]
    pub lookahead_window: usize,
    /// With `--spec lookahead`: n-gram size (N); the window keeps N - 1 levels.
    #[arg(long, value_name = "N", default_value_t = 4, allow_negative_numbers = true)]
    pub lookahead_ngram: usize,
    /// With `--spec lookahead`: candidate n-grams verified per step (G).
    #[arg(long, value_name = "G", default_value_t = 5, allow_negative_numbers = true)]
    pub lookahead_guesses: usize,
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
        check_settings(self.draft_len, self.synthetic_acceptance).map_err(spec_error)?;
        if self.synthetic_acceptance.is_some() && self.spec == SpecMethod::None {
            return Err("--synthetic-acceptance needs a proposer (--spec ngram|draft|early-exit|eagle|medusa)".into());
        }
        // Medusa heads and lookahead run beside the target (early exit is refused, typed, by
        // `ProposerChoice::build`): only a draft model or an EAGLE head moves.
        let beside_the_target = matches!(self.spec, SpecMethod::Medusa | SpecMethod::Lookahead);
        if self.draft_device.is_some()
            && (beside_the_target || matches!(self.spec, SpecMethod::None | SpecMethod::Ngram))
        {
            return Err("--draft-device needs a drafting model (--spec draft or --spec eagle)".into());
        }
        let choice = ProposerChoice {
            method: self.spec,
            draft_model: self.draft_model.as_ref().map(ModelArg::resolve).transpose()?,
            draft_layers: self.draft_layers,
            draft_kv_blocks: self.draft_kv_blocks,
            draft_dtype: self.draft_dtype,
            lookahead: self.lookahead_config(),
            draft_device: self.draft_device,
        };
        choice.build(target, tokenizer, new_backend).map_err(spec_error)
    }

    fn lookahead_config(&self) -> LookaheadConfig {
        LookaheadConfig { window: self.lookahead_window, ngram: self.lookahead_ngram, guesses: self.lookahead_guesses }
    }

    /// The tree the options ask for (`--spec-tree`, or lookahead's own), checked: a
    /// proposer that drafts trees, a shape in range.
    pub fn tree_shape(&self) -> Result<Option<TreeShape>, Box<dyn std::error::Error>> {
        if self.spec == SpecMethod::Lookahead {
            if self.spec_tree.is_some() {
                return Err("--spec lookahead sizes its tree with --lookahead-window, -ngram and -guesses".into());
            }
            let c = self.lookahead_config();
            if !c.is_valid() {
                return Err(spec_error(SpecError::LookaheadShape(c)));
            }
            return Ok(Some(c.tree_shape()));
        }
        let Some(nodes) = self.spec_tree else { return Ok(None) };
        if !matches!(self.spec, SpecMethod::Eagle | SpecMethod::Medusa) {
            return Err("--spec-tree needs --spec eagle or medusa (their heads draft trees)".into());
        }
        let top_k = self.tree_top_k;
        if !(1..=MAX_TREE_NODES).contains(&nodes) || !(1..=MAX_TREE_TOP_K).contains(&top_k) {
            return Err(spec_error(SpecError::TreeShape { nodes, top_k }));
        }
        Ok(Some(TreeShape { nodes, top_k, depth: self.draft_len }))
    }

    /// Speculation for the runtime, or None for plain decoding. An EAGLE head reads the
    /// target's hidden states, which a tensor-parallel target (even of one rank) does not
    /// hand out.
    pub fn speculation<B: Backend>(
        &self,
        target: &Target<B>,
        tokenizer: Option<&Tokenizer>,
        new_backend: &dyn Fn() -> Result<B, BackendError>,
    ) -> Result<Option<Speculation>, Box<dyn std::error::Error>> {
        let tree = self.tree_shape()?;
        // Proposers that read the target's hidden states: a split target does not hand them out.
        if let (Target::Split(_, ranks), SpecMethod::Eagle | SpecMethod::Medusa) = (target, self.spec) {
            return Err(spec_error(SpecError::SplitTarget { method: self.spec, ranks: ranks.len() }));
        }
        let proposer = self.proposer(target.model(), tokenizer, new_backend)?;
        Ok(proposer.map(|proposer| Speculation {
            proposer,
            max_draft: self.draft_len,
            synthetic_acceptance: self.synthetic_acceptance,
            lengths: self.draft_lengths,
            tree,
        }))
    }

    /// Warns that the output will not be the model's.
    pub fn warn_if_synthetic(&self) {
        if self.synthetic_acceptance.is_some() {
            tracing::warn!("synthetic acceptance is on: the output is not the model's (benchmark mode)");
        }
    }
}

/// A speculation error in the words of the command line: its flags instead of the fields.
pub fn spec_error(e: SpecError) -> Box<dyn std::error::Error> {
    match e {
        SpecError::MissingDraftModel => "--spec draft needs --draft-model PATH".into(),
        SpecError::MissingMedusaHead => {
            "--spec medusa needs --draft-model DIR (config.json and medusa_lm_head.safetensors), or --draft-model dummy:SHAPE for random heads (labelled random_heads)".into()
        }
        SpecError::LookaheadShape(c) => format!(
            "--lookahead-window must be at least 1, --lookahead-ngram at least 2, and (window + guesses) * (ngram - 1) at most {MAX_TREE_NODES}, got {}, {} and {}",
            c.window, c.ngram, c.guesses
        )
        .into(),
        SpecError::DraftLayers { got, max } => {
            format!("--draft-layers must be between 1 and {max} (the target's layers), got {got}").into()
        }
        SpecError::DraftLen(n) => format!("--draft-len must be between 1 and {MAX_DRAFT_LEN}, got {n}").into(),
        SpecError::SyntheticRate(r) => format!("--synthetic-acceptance must be in [0, 1], got {r}").into(),
        SpecError::TreeShape { nodes, top_k } => format!(
            "--spec-tree must be between 1 and {MAX_TREE_NODES} and --tree-top-k between 1 and {MAX_TREE_TOP_K}, got {nodes} and {top_k}"
        )
        .into(),
        SpecError::DraftDevice { method, device } => format!(
            "--draft-device {device}: the {method:?} proposer runs the target's own layers on the target's device; --draft-device applies to --spec draft and --spec eagle"
        )
        .into(),
        SpecError::TreeSynthetic => "--synthetic-acceptance applies to chains of drafts, not --spec-tree".into(),
        SpecError::TreeExecutor => {
            "--spec-tree and --spec lookahead move the accepted path's KV entries, which --tensor-parallel cannot".into()
        }
        other => other.into(),
    }
}

/// A runtime error in the words of the command line: a configuration field that has a flag
/// is named by it.
pub fn runtime_error(e: RuntimeError) -> Box<dyn std::error::Error> {
    let flag = |field| match field {
        ConfigField::MaxBatch => Some("--max-batch"),
        ConfigField::GpuMemoryFraction => Some("--gpu-memory-fraction"),
        ConfigField::StepTokens | ConfigField::Mailbox | ConfigField::KvBlocks => None,
    };
    match e {
        RuntimeError::Spec(e) => spec_error(e),
        RuntimeError::Config(c) => match flag(c.field()) {
            Some(flag) => config_message(&c).replacen(c.field().name(), flag, 1).into(),
            None => RuntimeError::Config(c).into(),
        },
        other => other.into(),
    }
}

fn config_message(c: &ConfigError) -> String {
    format!("invalid runtime configuration: {c}")
}
