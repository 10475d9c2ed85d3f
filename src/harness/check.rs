//! `specula kernels check`: compile every CUDA kernel with NVRTC (no GPU needed).

use std::io::Write;
use std::path::PathBuf;

use super::Result;

#[derive(clap::Args)]
pub struct CheckOptions {
    #[arg(long, default_value = "sm_90a")]
    pub arch: String,
    /// Also print each kernel's registers, shared memory and spills.
    #[arg(long)]
    pub resources: bool,
    /// Also write each file's cubin here (for `cuobjdump -sass`).
    #[arg(long)]
    pub cubin_dir: Option<PathBuf>,
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: &CheckOptions, _out: &mut dyn Write, _log: &mut dyn Write) -> Result<()> {
    Err(super::HarnessError::NoCuda)
}

/// Compiles each kernel file, writing a line per file and per kernel to `out` as it goes
/// (with `resources`, NVRTC's log too) and the log of a file that failed to `log`.
#[cfg(feature = "cuda")]
pub fn run(opts: &CheckOptions, out: &mut dyn Write, log: &mut dyn Write) -> Result<()> {
    use crate::backend::cuda::kernels::{compile_with, cuda_include_dir, nvrtc_version, FILES};
    let (arch, resources) = (opts.arch.as_str(), opts.resources);
    let (major, minor) = nvrtc_version()?;
    let include = cuda_include_dir()?;
    writeln!(out, "NVRTC {major}.{minor}, headers {}, target {arch}", include.display())?;
    let mut failed = 0;
    for file in FILES {
        let start = std::time::Instant::now();
        let extra: &[&str] = if resources { &["--ptxas-options=-v"] } else { &[] };
        let result = compile_with(file, arch, &include, extra);
        let ms = start.elapsed().as_millis();
        let status = match &result {
            Ok((cubin, _)) => format!("ok ({} KiB, {ms} ms)", cubin.len() / 1024),
            Err(_) => "FAILED".to_string(),
        };
        writeln!(out, "{:<14} {status}", file.name)?;
        for kernel in file.kernel_names() {
            writeln!(out, "    {kernel:<22} {}", if result.is_ok() { "ok" } else { "FAILED" })?;
        }
        if let (Ok((_, nvrtc_log)), true) = (&result, resources) {
            writeln!(out, "{}", nvrtc_log.trim_end())?;
        }
        if let (Ok((cubin, _)), Some(dir)) = (&result, &opts.cubin_dir) {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(file.name.replace(".cu", ".cubin")), cubin)?;
        }
        if let Err(e) = result {
            failed += 1;
            writeln!(log, "{e}")?;
        }
    }
    if failed > 0 {
        return Err(super::HarnessError::Compile { failed, total: FILES.len() });
    }
    writeln!(out, "all {} kernel files compiled", FILES.len())?;
    Ok(())
}
