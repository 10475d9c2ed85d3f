//! Which backend runs the models. Chosen here, in the library, so that every way in (the
//! in-process API, `serve`, `generate`, the chat example) reaches every device.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, BackendError};

/// Where models run. `Auto` is the GPU when this build has CUDA and a GPU is present, else
/// the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Device {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Auto => "auto",
            Device::Cpu => "CPU",
            Device::Cuda => "GPU (CUDA)",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("CUDA was asked for, but this binary was built without it (cargo build --release --features cuda)")]
    NotBuilt,
    #[error("CUDA was asked for, but no GPU can be used: {0}")]
    Unavailable(String),
}

/// Code generic over the backend, run on the one a `Device` stands for.
pub trait OnDevice {
    type Output;
    /// `new_backend` makes a backend on the device, a new one each call: on a GPU they
    /// share the context and compiled kernels and each has a stream of its own, so that a
    /// draft model's work is ordered apart from the target's.
    fn run<B: Backend>(self, new_backend: &dyn Fn() -> Result<B, BackendError>) -> Self::Output;
}

impl Device {
    /// `Cpu` or `Cuda`: what `Auto` stands for on this machine (it looks for a GPU without
    /// opening it), the others as they are.
    pub fn resolve(self) -> Device {
        match self {
            Device::Auto if gpu_count() > 0 => Device::Cuda,
            Device::Auto => Device::Cpu,
            other => other,
        }
    }

    /// Runs `f` on this device (`Auto` resolved first).
    pub fn run<V: OnDevice>(self, f: V) -> Result<V::Output, DeviceError> {
        let device = self.resolve();
        tracing::debug!("models run on the {device}");
        match device {
            Device::Cuda => run_cuda(f),
            _ => Ok(f.run(&|| Ok(CpuBackend::new()))),
        }
    }
}

#[cfg(feature = "cuda")]
fn run_cuda<V: OnDevice>(f: V) -> Result<V::Output, DeviceError> {
    use crate::backend::cuda::CudaBackend;
    if gpu_count() == 0 {
        return Err(DeviceError::Unavailable("no CUDA driver or GPU found".into()));
    }
    let gpu = CudaBackend::new(0).map_err(|e| DeviceError::Unavailable(e.to_string()))?;
    Ok(f.run(&|| gpu.sibling()))
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<V: OnDevice>(_: V) -> Result<V::Output, DeviceError> {
    Err(DeviceError::NotBuilt)
}

/// GPUs the CUDA driver sees; 0 without CUDA in the build, without a driver (loading it
/// would panic inside cudarc: caught, quietly) or without a GPU.
#[cfg(feature = "cuda")]
pub fn gpu_count() -> usize {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let count = std::panic::catch_unwind(|| cudarc::driver::CudaContext::device_count().unwrap_or(0));
    std::panic::set_hook(hook);
    count.map_or(0, |n| n.max(0) as usize)
}

#[cfg(not(feature = "cuda"))]
pub fn gpu_count() -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Name;
    impl OnDevice for Name {
        type Output = String;
        fn run<B: Backend>(self, new_backend: &dyn Fn() -> Result<B, BackendError>) -> String {
            new_backend().map(|b| b.name()).unwrap_or_default()
        }
    }

    #[test]
    fn the_cpu_runs_what_it_is_given_and_auto_falls_back_to_it() {
        assert!(Device::Cpu.run(Name).unwrap().starts_with("cpu"));
        if gpu_count() == 0 {
            assert_eq!(Device::Auto.resolve(), Device::Cpu);
            assert!(Device::Auto.run(Name).unwrap().starts_with("cpu"));
            assert!(Device::Cuda.run(Name).is_err(), "no GPU here: a clear error, not a panic");
        }
    }
}
