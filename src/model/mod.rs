//! Everything about a model that is not computation: its configuration, weights in
//! several file formats, tokenizer and chat template, and the one Llama forward.

pub mod chat;
pub mod config;
pub mod dummy;
pub mod fp8_checkpoint;
pub mod gguf;
pub mod llama;
pub mod loader;
pub mod safetensors;
pub mod shard;
pub mod tokenizer;
pub mod weight_loader;

pub use config::{ConfigField, InvalidConfig, ModelConfig, Preset, RopeScaling};
pub use llama::{hidden_to_host, ForwardStep, HiddenKind, KvCache, Llama, Weights};

pub use loader::{load_model, load_model_shard, load_model_with, LoadedModel, ModelSource};
pub use shard::{Shard, ShardError};
pub use tokenizer::Tokenizer;
pub use weight_loader::{LoadOptions, WeightDtype};

use std::path::{Path, PathBuf};

use crate::tensor::quant::QuantWeight;
use crate::tensor::{BackendError, HostTensor};

/// Any source of named weights: a safetensors folder, a GGUF file, random dummy weights.
pub trait WeightSource {
    /// The tensor named `name` (Hugging Face key), checked against `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor, LoadError>;
    /// Whether the source holds `name` (used for optional tensors such as `lm_head.weight`).
    fn contains(&self, name: &str) -> bool;
    /// The tensor as the file stores it, if quantized (GGUF Q8_0/Q4_0/Q4_1 blocks, FP8
    /// E4M3 with its scales and activation scheme), for backends that compute on it. Row
    /// order as in `tensor`.
    fn quantized(&self, _name: &str, _shape: &[usize]) -> Result<Option<QuantWeight>, LoadError> {
        Ok(None)
    }
}

/// Why a model could not be loaded. Every variant names the file, and the tensor where one applies.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: tensor `{tensor}` not found")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    Shape { path: PathBuf, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tensor `{tensor}` has unsupported type {dtype}")]
    Dtype { path: PathBuf, tensor: String, dtype: String },
    #[error("{path}: unsupported quantization: {scheme}")]
    UnsupportedQuantization { path: PathBuf, scheme: String },
    #[error("{path}: unsupported architecture `{arch}`; Specula runs Llama-family models")]
    Architecture { path: PathBuf, arch: String },
    #[error(
        "{path}: no tokenizer found (expected tokenizer.json beside the weights, or tokenizer metadata in the GGUF)"
    )]
    MissingTokenizer { path: PathBuf },
    #[error("{path}: invalid tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Shard(#[from] shard::ShardError),
}

impl LoadError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LoadError::Io { path: path.to_path_buf(), source }
    }
    pub fn format(path: &Path, msg: impl Into<String>) -> Self {
        LoadError::Format { path: path.to_path_buf(), msg: msg.into() }
    }
    pub fn missing(path: &Path, tensor: &str) -> Self {
        LoadError::MissingTensor { path: path.to_path_buf(), tensor: tensor.to_string() }
    }
    pub fn unsupported_quantization(path: &Path, scheme: impl Into<String>) -> Self {
        LoadError::UnsupportedQuantization { path: path.to_path_buf(), scheme: scheme.into() }
    }
    pub fn shape(path: &Path, tensor: &str, expected: &[usize], found: &[usize]) -> Self {
        LoadError::Shape {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        }
    }
}
