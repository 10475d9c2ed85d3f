//! A tiny Llama with random weights of a chosen scale, built directly (no files): for
//! tests of speculation, where only the model's distributions matter.

use indicatif::ProgressBar;
use specula::backend::cpu::CpuBackend;
use specula::model::{Llama, LoadError, ModelConfig, Preset, WeightSource, Weights};
use specula::tensor::random::normal_values;
use specula::tensor::HostTensor;

/// Random weights of a chosen scale, large enough that the tiny model's distributions are
/// far from uniform (the dummy format's 0.02 would make them nearly flat).
struct RandomWeights {
    seed: u64,
    std: f32,
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor, LoadError> {
        let n = shape.iter().product();
        let data = if shape.len() == 1 {
            vec![1.0; n]
        } else {
            normal_values(n, self.std, specula::model::dummy::seed_for(name, self.seed))
        };
        Ok(HostTensor::new(shape.to_vec(), data))
    }
    fn contains(&self, _: &str) -> bool {
        false
    }
}

pub fn tiny_config(vocab: usize) -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        vocab_size: vocab,
        tie_word_embeddings: true,
        max_position_embeddings: 256,
        ..Preset::SmolLm2_135m.config()
    }
}

pub fn tiny(vocab: usize, seed: u64, std: f32) -> Llama<CpuBackend> {
    tiny_with(tiny_config(vocab), seed, std)
}

/// A tiny model of any configuration (a shorter context, say) with random weights.
pub fn tiny_with(config: ModelConfig, seed: u64, std: f32) -> Llama<CpuBackend> {
    let src = RandomWeights { seed, std };
    Llama::load(config, Weights::Source(&src), &CpuBackend::new(), &ProgressBar::hidden()).unwrap()
}
