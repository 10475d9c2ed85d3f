//! Loads the model a `ModelSource` names (a path, or `dummy:<preset>`). The command line's
//! `default` is resolved to a path before it gets here (`cli::ModelArg`).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use indicatif::{ProgressBar, ProgressStyle};

use super::gguf::GgufFile;
use super::llama::Weights;
use super::safetensors::SafetensorsWeights;
use super::{Llama, LoadError, LoadOptions, ModelConfig, Preset, Shard, Tokenizer};
use crate::tensor::Backend;

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A `.gguf` file or a Hugging Face folder (config.json, safetensors, tokenizer.json).
    Path(PathBuf),
    /// Random weights at a named real shape; no tokenizer.
    Dummy(Preset),
}

impl FromStr for ModelSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix("dummy:") {
            return Preset::parse(name).map(ModelSource::Dummy).ok_or_else(|| {
                format!("unknown dummy shape `{name}`; choose smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b or llama-3.3-70b")
            });
        }
        Ok(ModelSource::Path(PathBuf::from(s)))
    }
}

pub struct LoadedModel<B: Backend> {
    pub model: Llama<B>,
    /// None for dummy weights, which have no vocabulary.
    pub tokenizer: Option<Tokenizer>,
    pub name: String,
}

/// Loads the model `source` names, with the weights as the checkpoint stores them.
pub fn load_model<B: Backend>(source: &ModelSource, backend: &B) -> Result<LoadedModel<B>, LoadError> {
    load_model_with(source, &LoadOptions::default(), backend)
}

/// Loads the model `source` names, as `options` ask (`--dtype`).
pub fn load_model_with<B: Backend>(
    source: &ModelSource,
    options: &LoadOptions,
    backend: &B,
) -> Result<LoadedModel<B>, LoadError> {
    load_model_shard(source, options, Shard::WHOLE, backend)
}

/// Loads the part of the model `source` names that one tensor-parallel rank holds.
pub fn load_model_shard<B: Backend>(
    source: &ModelSource,
    options: &LoadOptions,
    shard: Shard,
    backend: &B,
) -> Result<LoadedModel<B>, LoadError> {
    match source {
        ModelSource::Path(p) => load_path(p, options, shard, backend),
        ModelSource::Dummy(preset) => {
            let config = preset.config();
            let weights = Weights::Dummy { seed: 0 };
            let load = |bar: &ProgressBar| Llama::load_shard(config, weights, options, shard, backend, bar);
            let model = with_progress("dummy weights", load)?;
            Ok(LoadedModel { model, tokenizer: None, name: format!("dummy:{preset:?}") })
        }
    }
}

fn load_path<B: Backend>(
    path: &Path,
    options: &LoadOptions,
    shard: Shard,
    backend: &B,
) -> Result<LoadedModel<B>, LoadError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let load = |config, weights, bar: &ProgressBar| Llama::load_shard(config, weights, options, shard, backend, bar);
    if path.is_dir() {
        let config = ModelConfig::from_hf_json(&path.join("config.json"))?;
        let weights = SafetensorsWeights::open_dir(path)?;
        let tokenizer = Tokenizer::from_hf_dir(path)?;
        let model = with_progress(&name, |bar| load(config, Weights::Source(&weights), bar))?;
        return Ok(LoadedModel { model, tokenizer: Some(tokenizer), name });
    }
    if !path.exists() {
        return Err(LoadError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        return load_path(path.parent().unwrap_or(Path::new(".")), options, shard, backend);
    }
    let gguf = GgufFile::open(path)?;
    let config = gguf.config()?;
    let tokenizer = gguf.tokenizer()?;
    let model = with_progress(&name, |bar| load(config, Weights::Source(&gguf), bar))?;
    Ok(LoadedModel { model, tokenizer: Some(tokenizer), name })
}

/// Runs `load` with a progress bar on stderr (hidden when stderr is not a terminal).
fn with_progress<T>(what: &str, load: impl FnOnce(&ProgressBar) -> T) -> T {
    let bar = ProgressBar::new(0).with_message(format!("loading {what}"));
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let start = std::time::Instant::now();
    let out = load(&bar);
    bar.finish_and_clear();
    tracing::debug!("loaded {what} in {:.2} s", start.elapsed().as_secs_f64());
    out
}
