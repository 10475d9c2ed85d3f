//! Tensor parallelism's cut of one model over N ranks (Megatron-style). Each rank holds
//! whole attention heads and a band of the MLP's intermediate features:
//!
//! ```text
//!   q/k/v   [heads·d, hidden]   column-parallel: rank r keeps its heads' rows
//!   o       [hidden, heads·d]   row-parallel: the matching input columns, then all-reduce
//!   gate/up [inter, hidden]     column-parallel: rows r·inter/N .. (r+1)·inter/N
//!   down    [hidden, inter]     row-parallel: the matching columns, then all-reduce
//!   embedding, norms, LM head   replicated
//! ```
//!
//! A rank's model is an ordinary `Llama` whose configuration counts its own heads and
//! intermediate features; the forward's all-reduce (`Backend::all_reduce`) sums the
//! row-parallel outputs, so the residual stream is whole again on every rank.

use std::ops::Range;

use super::ModelConfig;

/// One rank of a tensor-parallel group: `rank` of `ranks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

/// Why a model cannot be split over the ranks asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("tensor parallelism needs at least one rank")]
    NoRanks,
    /// Every rank needs whole KV heads (and so whole query heads, which come in groups of
    /// the same count per KV head).
    #[error(
        "tensor parallelism over {ranks} ranks cannot split the model's {kv_heads} KV heads ({heads} attention heads): the ranks must divide the KV heads"
    )]
    KvHeads { ranks: usize, kv_heads: usize, heads: usize },
    #[error(
        "tensor parallelism over {ranks} ranks cannot split the model's intermediate size {intermediate}: the ranks must divide it"
    )]
    Intermediate { ranks: usize, intermediate: usize },
}

/// How one weight is cut for a rank, in the checkpoint's `[out, in]` layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    Whole,
    /// Output rows (column-parallel).
    Rows(Range<usize>),
    /// Input columns (row-parallel).
    Cols(Range<usize>),
}

impl Shard {
    /// The whole model on one rank: today's path.
    pub const WHOLE: Shard = Shard { rank: 0, ranks: 1 };

    pub fn is_whole(self) -> bool {
        self.ranks == 1
    }

    /// Checks that `ranks` can split `config`.
    pub fn check(config: &ModelConfig, ranks: usize) -> Result<(), ShardError> {
        if ranks == 0 {
            return Err(ShardError::NoRanks);
        }
        if !config.num_kv_heads.is_multiple_of(ranks) {
            let (kv_heads, heads) = (config.num_kv_heads, config.num_heads);
            return Err(ShardError::KvHeads { ranks, kv_heads, heads });
        }
        if !config.intermediate_size.is_multiple_of(ranks) {
            return Err(ShardError::Intermediate { ranks, intermediate: config.intermediate_size });
        }
        Ok(())
    }

    /// The configuration this rank computes with: its own heads, KV heads and intermediate
    /// features; everything else as the whole model's.
    pub fn local_config(self, config: &ModelConfig) -> Result<ModelConfig, ShardError> {
        Self::check(config, self.ranks)?;
        Ok(split_counts(config, |count| count / self.ranks))
    }

    /// The whole model's configuration from a rank's own (`local_config`'s inverse).
    pub fn whole_config(self, local: &ModelConfig) -> ModelConfig {
        split_counts(local, |count| count * self.ranks)
    }

    /// How the weight named `name` (a Hugging Face key) is cut for this rank, given the
    /// rank's own configuration `local`.
    pub fn split(self, name: &str, local: &ModelConfig) -> Split {
        if self.is_whole() {
            return Split::Whole;
        }
        let band = |width: usize| self.rank * width..(self.rank + 1) * width;
        let (q, kv, inter) = (band(local.q_dim()), band(local.kv_dim()), band(local.intermediate_size));
        let kind = name.strip_suffix(".weight").and_then(|n| n.rsplit('.').next()).unwrap_or("");
        match kind {
            "q_proj" => Split::Rows(q),
            "k_proj" | "v_proj" => Split::Rows(kv),
            "o_proj" => Split::Cols(q),
            "gate_proj" | "up_proj" => Split::Rows(inter),
            "down_proj" => Split::Cols(inter),
            _ => Split::Whole,
        }
    }
}

/// `config` with the counts tensor parallelism splits (attention heads, KV heads,
/// intermediate features) mapped by `f`.
fn split_counts(config: &ModelConfig, f: impl Fn(usize) -> usize) -> ModelConfig {
    ModelConfig {
        num_heads: f(config.num_heads),
        num_kv_heads: f(config.num_kv_heads),
        intermediate_size: f(config.intermediate_size),
        ..config.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Preset;

    #[test]
    fn the_default_shape_splits_over_three_ranks_and_not_two() {
        let c = Preset::SmolLm2_135m.config();
        let local = Shard { rank: 2, ranks: 3 }.local_config(&c).unwrap();
        assert_eq!((local.num_heads, local.num_kv_heads, local.intermediate_size), (3, 1, 512));
        assert_eq!(Shard { rank: 0, ranks: 3 }.whole_config(&local), c);
        let e = Shard { rank: 0, ranks: 2 }.local_config(&c).unwrap_err();
        assert_eq!(e, ShardError::KvHeads { ranks: 2, kv_heads: 3, heads: 9 });
        assert!(e.to_string().contains("3 KV heads"));
        assert_eq!(Shard::check(&c, 0), Err(ShardError::NoRanks));
    }

    #[test]
    fn a_ranks_bands_tile_each_projection() {
        let c = Preset::SmolLm2_135m.config();
        let shard = Shard { rank: 1, ranks: 3 };
        let local = shard.local_config(&c).unwrap();
        let s = |n: &str| shard.split(&format!("model.layers.4.{n}.weight"), &local);
        assert_eq!(s("self_attn.q_proj"), Split::Rows(192..384));
        assert_eq!(s("self_attn.k_proj"), Split::Rows(64..128));
        assert_eq!(s("self_attn.o_proj"), Split::Cols(192..384));
        assert_eq!(s("mlp.up_proj"), Split::Rows(512..1024));
        assert_eq!(s("mlp.down_proj"), Split::Cols(512..1024));
        assert_eq!(s("input_layernorm"), Split::Whole);
        assert_eq!(shard.split("model.embed_tokens.weight", &local), Split::Whole);
    }
}
