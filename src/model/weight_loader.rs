//! How each weight is fetched and stored at load: as the checkpoint has it, or quantized to
//! FP8 (`--dtype fp8`), on whichever backend runs the model.

use super::dummy::{seed_for, DUMMY_STD};
use super::llama::Weights;
use super::shard::Split;
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

/// One weight, named by its Hugging Face key and of the checkpoint's `shape`, stored on
/// `backend` as `options` ask: whole, or the part `split` names (a tensor-parallel rank's).
pub(crate) fn load_weight<B: Backend>(
    weights: &Weights,
    options: &LoadOptions,
    backend: &B,
    name: &str,
    shape: &[usize],
    split: &Split,
) -> Result<B::Tensor, LoadError> {
    // Only projections are quantized: norms are vectors, and the embedding table is read a
    // row at a time (and serves as a tied head, which therefore stays as stored).
    let to_fp8 = match shape {
        &[rows, cols] if options.dtype == WeightDtype::Fp8 && name != "model.embed_tokens.weight" => Some([rows, cols]),
        _ => None,
    };
    let (Split::Rows(_) | Split::Cols(_), &[rows, cols]) = (split, shape) else {
        return match weights {
            Weights::Source(src) => from_source(*src, backend, name, shape, to_fp8),
            Weights::Dummy { seed } => dummy(backend, shape, seed_for(name, *seed), to_fp8),
        };
    };
    if let (Weights::Dummy { seed }, None) = (weights, to_fp8) {
        let part = match split {
            Split::Rows(r) => [r.clone(), 0..cols],
            Split::Cols(c) => [0..rows, c.clone()],
            Split::Whole => [0..rows, 0..cols],
        };
        if let Some(t) = backend.random_part([rows, cols], DUMMY_STD, seed_for(name, *seed), part)? {
            return Ok(t);
        }
    }
    let whole = whole_on_host(weights, name, [rows, cols])?;
    // Quantized whole before it is cut, so that every row keeps the scale it has at one rank.
    let whole = match (whole, to_fp8) {
        (Part::Dense(t), Some(shape)) => Part::Quant(fp8_weight(shape, &t.data)),
        (Part::Quant(q @ QuantWeight::Blocks(_)), Some(shape)) => Part::Quant(fp8_weight(shape, &q.to_f32())),
        (whole, _) => whole,
    };
    match whole.cut(split) {
        Part::Quant(q) => upload_quantized(backend, &q),
        Part::Dense(t) => Ok(backend.upload(&t)?),
    }
}

/// A matrix on the host before it is cut: as the file stores it, or dense f32.
enum Part {
    Quant(QuantWeight),
    Dense(HostTensor),
}

impl Part {
    fn cut(self, split: &Split) -> Part {
        match (self, split) {
            (Part::Quant(q), Split::Rows(r)) => Part::Quant(q.slice_rows(r.clone())),
            (Part::Quant(q), Split::Cols(c)) => match q.slice_cols(c.clone()) {
                Some(q) => Part::Quant(q),
                // GGML blocks cut inside a block: dequantized (the values are the same).
                None => Part::Dense(HostTensor::new(q.shape().to_vec(), q.to_f32())).cut(split),
            },
            (Part::Dense(t), Split::Rows(r)) => {
                let k = t.shape[1];
                Part::Dense(HostTensor::new(vec![r.len(), k], t.data[r.start * k..r.end * k].to_vec()))
            }
            (Part::Dense(t), Split::Cols(c)) => {
                let data = t.data.chunks(t.shape[1]).flat_map(|row| row[c.clone()].iter().copied()).collect();
                Part::Dense(HostTensor::new(vec![t.shape[0], c.len()], data))
            }
            (whole, Split::Whole) => whole,
        }
    }
}

/// The whole matrix on the host (a rank cuts its part out of it).
fn whole_on_host(weights: &Weights, name: &str, shape: [usize; 2]) -> Result<Part, LoadError> {
    Ok(match weights {
        Weights::Source(src) => match src.quantized(name, &shape)? {
            Some(q) => Part::Quant(q),
            None => Part::Dense(src.tensor(name, &shape)?),
        },
        // The values `CpuBackend::random` makes for the whole matrix.
        Weights::Dummy { seed } => {
            let values = normal_values(shape[0] * shape[1], DUMMY_STD, seed_for(name, *seed));
            Part::Dense(HostTensor::new(shape.to_vec(), values))
        }
    })
}

fn fp8_weight(shape: [usize; 2], values: &[f32]) -> QuantWeight {
    QuantWeight::Fp8(Fp8Weight::quantize(shape, values, ActivationScheme::WeightOnly))
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
    upload_quantized(backend, &fp8_weight(shape, values))
}

/// Stores a quantized matrix as is where the backend computes on it, else its values.
fn upload_quantized<B: Backend>(backend: &B, q: &QuantWeight) -> Result<B::Tensor, LoadError> {
    Ok(match backend.upload_quantized(q)? {
        Some(t) => t,
        None => backend.upload(&HostTensor::new(q.shape().to_vec(), q.to_f32()))?,
    })
}
