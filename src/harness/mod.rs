//! The GPU harnesses behind `specula kernels` and `specula bench`:
//!
//! - [`check`]: compile every CUDA kernel with NVRTC (no GPU needed);
//! - [`parity`]: on a GPU, every CUDA op against the CPU op it replaces, the model's forward
//!   on both backends, verification against decoding bit for bit, and speculative against
//!   plain greedy decoding; a [`parity::ParityReport`];
//! - [`bench`]: GPU speed at real shapes against the memory-bandwidth ceiling; a
//!   [`bench::BenchReport`] (JSON through serde, the tables through `Display`).
//!
//! Their options derive `clap::Args`, so the command line is theirs as written here. Each
//! `run` writes the lines a person watches while it works to the writer it is given and
//! returns its report. The GPU work is compiled with the `cuda` feature; without it, `run`
//! returns [`HarnessError::NoCuda`].

pub mod bench;
pub mod check;
pub mod parity;
#[cfg(feature = "cuda")]
pub mod tp;

/// `specula kernels`: the NVRTC compile, or the parity suite on a GPU.
#[derive(clap::Subcommand)]
pub enum KernelsCommand {
    /// Compile every kernel with NVRTC for an architecture; no GPU needed (NVRTC on the
    /// library path, CUDA headers under $CUDA_HOME/include). Exits non-zero on any failure.
    Check(check::CheckOptions),
    /// On a GPU: every op against the CPU reference on fresh random inputs, then the model's
    /// greedy tokens and logits on both backends.
    Parity(parity::ParityOptions),
}

/// Why a harness stopped: it could not run to its end, or (`Compile`) kernels did not
/// compile. A parity check that does not hold is not an error but a row of the report.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("this binary was built without the `cuda` feature (cargo build --features cuda)")]
    NoCuda,
    #[error("{failed} of {total} kernel files failed to compile")]
    Compile { failed: usize, total: usize },
    #[error("{0}")]
    ModelSource(String),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Load(#[from] crate::model::LoadError),
    #[error(transparent)]
    Fetch(#[from] crate::cli::FetchError),
    #[error(transparent)]
    Request(#[from] crate::request::RequestError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// The runtime's sizing of a KV pool (the long-context benchmark asks it).
    #[error(transparent)]
    Runtime(#[from] crate::actors::RuntimeError),
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("a tensor-parallel rank's thread panicked")]
    RankPanicked,
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, HarnessError>;

/// A model named on the command line (`default`, a path, `dummy:SHAPE`).
#[cfg(feature = "cuda")]
fn model_source(name: &str) -> Result<crate::model::ModelSource> {
    let arg: crate::cli::ModelArg = name.parse().map_err(HarnessError::ModelSource)?;
    Ok(arg.resolve()?)
}
