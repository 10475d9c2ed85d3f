//! Hugging Face safetensors weights: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped, in f32, f16 or bf16.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::{HostTensor, LoadError, WeightSource};

pub struct SafetensorsWeights {
    shards: Vec<(PathBuf, Mmap)>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
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
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        Self::open_files(&files)
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
        Ok(SafetensorsWeights { shards, index })
    }
}

impl WeightSource for SafetensorsWeights {
    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor, LoadError> {
        let first = &self.shards[0].0;
        let &i = self.index.get(name).ok_or_else(|| LoadError::missing(first, name))?;
        let (path, mmap) = &self.shards[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| LoadError::format(path, e.to_string()))?;
        let view = st.tensor(name).map_err(|e| LoadError::format(path, format!("tensor `{name}`: {e}")))?;
        if view.shape() != shape {
            return Err(LoadError::shape(path, name, shape, view.shape()));
        }
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(LoadError::Dtype { path: path.clone(), tensor: name.into(), dtype: format!("{other:?}") })
            }
        };
        Ok(HostTensor::new(shape.to_vec(), data))
    }
}
