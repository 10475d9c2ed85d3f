//! Hugging Face safetensors weights: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped, in f32, f16 or bf16, or FP8 E4M3 with the
//! scales and scheme of the checkpoint's quantization config (`fp8_checkpoint`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::fp8_checkpoint::{Fp8Checkpoint, InputQuant};
use super::{LoadError, WeightSource};
use crate::tensor::quant::{ActivationScheme, Fp8Weight, QuantWeight};
use crate::tensor::HostTensor;

pub struct SafetensorsWeights {
    shards: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
    /// How FP8 weights are scaled and used, for a pre-quantized checkpoint.
    fp8: Option<Fp8Checkpoint>,
}
impl SafetensorsWeights {
    /// Opens the weights of a Hugging Face model folder.
    pub fn open_dir(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| LoadError::io(&index_path, e))?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| LoadError::format(&index_path, format!("invalid JSON: {e}")))?;
            let map = index["weight_map"]
                .as_object()
                .ok_or_else(|| LoadError::format(&index_path, "no `weight_map` object"))?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            // Shards are files of this folder: an index may not point anywhere else.
            if let Some(bad) = names.iter().find(|n| !is_plain_file_name(n)) {
                return Err(LoadError::format(&index_path, format!("shard `{bad}` is not a file name in this folder")));
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let fp8 = Fp8Checkpoint::from_dir(dir)?;
        Ok(SafetensorsWeights { fp8, ..Self::open_files(&files)? })
    }

    pub fn open_files(files: &[PathBuf]) -> Result<Self, LoadError> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
            // SAFETY: the file is opened read-only; weights files are not modified while loaded.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
            let st = SafeTensors::deserialize(&mmap)
                .map_err(|e| LoadError::format(path, format!("not a valid safetensors file: {e}")))?;
            for name in st.names() {
                index.insert(name.to_string(), shards.len());
            }
            shards.push((path.clone(), mmap));
        }
        Ok(SafetensorsWeights { shards, index, fp8: None })
    }

    /// The shape of tensor `name` as stored, if the files hold it.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.view(name).ok().map(|(_, v)| v.shape().to_vec())
    }

    /// The tensor `name` and the file holding it.
    fn view(&self, name: &str) -> Result<(&Path, TensorView<'_>), LoadError> {
        let first = &self.shards[0].0;
        let &i = self.index.get(name).ok_or_else(|| LoadError::missing(first, name))?;
        let (path, mmap) = &self.shards[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| LoadError::format(path, e.to_string()))?;
        let view = st.tensor(name).map_err(|e| LoadError::format(path, format!("tensor `{name}`: {e}")))?;
        Ok((path, view))
    }

    /// An FP8 weight with its scales, as the quantization config says to use it.
    fn fp8_weight(&self, path: &Path, name: &str, rows_cols: [usize; 2], codes: &[u8]) -> Result<Fp8Weight, LoadError> {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let scheme = self.fp8.as_ref().and_then(|c| c.scheme_for(module)).ok_or_else(|| {
            LoadError::format(
                path,
                format!(
                    "tensor `{name}` is F8_E4M3 but the checkpoint's quantization config does not quantize `{module}`"
                ),
            )
        })?;
        let scales = self.floats(&format!("{module}.weight_scale"))?;
        let activations = match scheme.inputs {
            InputQuant::None => ActivationScheme::WeightOnly,
            InputQuant::DynamicPerToken => ActivationScheme::DynamicPerToken,
            InputQuant::StaticPerTensor => match self.floats(&format!("{module}.input_scale"))?[..] {
                [input_scale] => ActivationScheme::Static { input_scale },
                ref other => {
                    let msg = format!("tensor `{module}.input_scale` has {} values, expected 1", other.len());
                    return Err(LoadError::format(path, msg));
                }
            },
        };
        Fp8Weight::from_parts(rows_cols, codes.to_vec(), &scales, scheme.weights, activations)
            .map_err(|msg| LoadError::format(path, format!("tensor `{name}`: {msg}")))
    }

    /// An integer tensor (I64 or I32) of `len` values: an index table such as an EAGLE-3
    /// head's draft-to-target vocabulary map.
    pub fn integers(&self, name: &str, len: usize) -> Result<Vec<i64>, LoadError> {
        let (path, view) = self.view(name)?;
        if view.shape() != [len] {
            return Err(LoadError::shape(path, name, &[len], view.shape()));
        }
        let bytes = view.data();
        Ok(match view.dtype() {
            Dtype::I64 => bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect(),
            Dtype::I32 => {
                bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64).collect()
            }
            other => {
                return Err(LoadError::Dtype {
                    path: path.to_path_buf(),
                    tensor: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }

    /// A floating-point tensor of any shape, as f32.
    fn floats(&self, name: &str) -> Result<Vec<f32>, LoadError> {
        let (path, view) = self.view(name)?;
        to_f32(path, name, &view)
    }
}

fn to_f32(path: &Path, name: &str, view: &TensorView) -> Result<Vec<f32>, LoadError> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => {
            return Err(LoadError::Dtype { path: path.to_path_buf(), tensor: name.into(), dtype: format!("{other:?}") })
        }
    })
}

/// A name without folders: no separator, not `.` or `..`.
fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None)) && !name.contains('\\')
}

impl WeightSource for SafetensorsWeights {
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor, LoadError> {
        if let Some(q) = self.quantized(name, shape)? {
            return Ok(HostTensor::new(shape.to_vec(), q.to_f32()));
        }
        let (path, view) = self.view(name)?;
        if view.shape() != shape {
            return Err(LoadError::shape(path, name, shape, view.shape()));
        }
        Ok(HostTensor::new(shape.to_vec(), to_f32(path, name, &view)?))
    }

    fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QuantWeight>, LoadError> {
        let (path, view) = self.view(name)?;
        if view.dtype() != Dtype::F8_E4M3 {
            return Ok(None);
        }
        let &[rows, cols] = shape else {
            return Err(LoadError::format(path, format!("tensor `{name}`: FP8 is for matrices, not shape {shape:?}")));
        };
        if view.shape() != shape {
            return Err(LoadError::shape(path, name, shape, view.shape()));
        }
        Ok(Some(QuantWeight::Fp8(self.fp8_weight(path, name, [rows, cols], view.data())?)))
    }
}
