//! How each weight is fetched and stored at load: as the checkpoint has it, or quantized to
//! FP8 (`--dtype fp8`), on whichever backend runs the model.

use super::dummy::{seed_for, DUMMY_STD};
use super::llama::Weights;
use super::{LoadError, WeightSource};
use crate::tensor::quant::{ActivationScheme, Fp8Weight, QuantWeight};
use crate::tensor::random::normal_values;
use crate::tensor::{Backend, HostTensor};

/// The precision a model's weights are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightDtype {
    /// The checkpoint's own: dense weights as the backend stores them (f32 on the CPU, bf16
    /// on a GPU), GGML blocks kept as blocks, FP8 checkpoints as FP8 with their own scheme.
    #[default]
    Auto,
    /// Every projection matrix (and an untied LM head) quantized at load to FP8 E4M3 with
    /// one scale per output channel, activations unquantized; norms and the embedding table
    /// (so a tied head too) stay as stored. FP8 checkpoints keep their own scales and scheme.
    Fp8,
}

impl WeightDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            WeightDtype::Auto => "auto",
            WeightDtype::Fp8 => "fp8",
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to load a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    pub dtype: WeightDtype,
}

impl LoadOptions {
    pub fn dtype(dtype: WeightDtype) -> Self {
        LoadOptions { dtype }
    }
}

/// One weight, named by its Hugging Face key, stored on `backend` as `options` ask.
pub(crate) fn load_weight<B: Backend>(
    weights: &Weights,
    options: &LoadOptions,
    backend: &B,
    name: &str,
    shape: &[usize],
) -> Result<B::Tensor, LoadError> {
    // Only projections are quantized: norms are vectors, and the embedding table is read a
    // row at a time (and serves as a tied head, which therefore stays as stored).
    let to_fp8 = match shape {
        &[rows, cols] if options.dtype == WeightDtype::Fp8 && name != "model.embed_tokens.weight" => Some([rows, cols]),
        _ => None,
    };
    match weights {
        Weights::Source(src) => from_source(*src, backend, name, shape, to_fp8),
        Weights::Dummy { seed } => dummy(backend, shape, seed_for(name, *seed), to_fp8),
    }
}

fn from_source<B: Backend>(
    src: &dyn WeightSource,
    backend: &B,
    name: &str,
    shape: &[usize],
    to_fp8: Option<[usize; 2]>,
) -> Result<B::Tensor, LoadError> {
    match (src.quantized(name, shape)?, to_fp8) {
        // Already FP8: keep the checkpoint's own scales and activation scheme.
        (Some(q @ QuantWeight::Fp8(_)), _) | (Some(q), None) => upload_quantized(backend, &q),
        (Some(q), Some(shape)) => upload_fp8(backend, shape, &q.to_f32()),
        (None, Some(shape)) => upload_fp8(backend, shape, &src.tensor(name, &shape)?.data),
        (None, None) => Ok(backend.upload(&src.tensor(name, shape)?)?),
    }
}

fn dummy<B: Backend>(
    backend: &B,
    shape: &[usize],
    seed: u64,
    to_fp8: Option<[usize; 2]>,
) -> Result<B::Tensor, LoadError> {
    if let &[n] = shape {
        return Ok(backend.upload(&HostTensor::new(vec![n], vec![1.0; n]))?);
    }
    let Some(shape) = to_fp8 else { return Ok(backend.random(shape, DUMMY_STD, seed)?) };
    match backend.random_fp8(shape, DUMMY_STD, seed)? {
        Some(t) => Ok(t),
        None => upload_fp8(backend, shape, &normal_values(shape[0] * shape[1], DUMMY_STD, seed)),
    }
}

/// Quantizes `values` per output channel, weight-only, and stores the result.
fn upload_fp8<B: Backend>(backend: &B, shape: [usize; 2], values: &[f32]) -> Result<B::Tensor, LoadError> {
    let w = Fp8Weight::quantize(shape, values, ActivationScheme::WeightOnly);
    upload_quantized(backend, &QuantWeight::Fp8(w))
}

/// Stores a quantized matrix as is where the backend computes on it, else its values.
fn upload_quantized<B: Backend>(backend: &B, q: &QuantWeight) -> Result<B::Tensor, LoadError> {
    Ok(match backend.upload_quantized(q)? {
        Some(t) => t,
        None => backend.upload(&HostTensor::new(q.shape().to_vec(), q.to_f32()))?,
    })
}
