//! The layer below both the model and the backends: tensors on the host (`HostTensor`),
//! quantized weight matrices as files store them (`quant`), what one forward step is
//! (`BatchMeta`) and the op trait every backend implements (`Backend`). The model is
//! written over these; the backends implement them; neither knows the other.

mod batch;
pub mod kv;
mod ops;
pub mod quant;
pub mod random;

pub use batch::{BatchMeta, RowMeta, TreeMask, NO_BLOCK, NO_PARENT};
pub use kv::{AttnWindow, KvDtype, KvLayout, KvOptions, KvStorage, WindowError};
pub use ops::{
    check_concat, check_rows, check_sample_rows, AttnShape, Backend, BackendError, DeviceMemory, KvFeature, RankGroup,
    Result, StepKey, TopLogProbs,
};

/// A tensor on the host, f32, row-major: a weight dequantized at load, or an input a caller
/// builds. Weight names follow the Hugging Face checkpoint keys
/// (`model.layers.0.self_attn.q_proj.weight`) whatever the file format.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "shape {shape:?} vs {} values", data.len());
        Self { shape, data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }
}
