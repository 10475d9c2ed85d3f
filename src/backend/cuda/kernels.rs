//! The kernels: their sources (`kernels/*.cu`, embedded in the binary), NVRTC compilation
//! for the device's architecture, an on-disk cache of the compiled cubins keyed by a hash
//! of source, architecture, options and NVRTC version, and the loaded functions.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use super::prefill::{prefill_names, store_names};
use crate::tensor::{BackendError, Result};

/// One `kernels/*.cu` file.
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
}

/// The headers a kernel file may include, pasted in place of their `#include "name"` (in
/// this order: a header includes nothing itself, so a file includes common.cuh first).
const HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    ("attention_common.cuh", include_str!("../../../kernels/attention_common.cuh")),
];

pub const FILES: &[KernelFile] = &[
    KernelFile { name: "embed.cu", source: include_str!("../../../kernels/embed.cu") },
    KernelFile { name: "norm.cu", source: include_str!("../../../kernels/norm.cu") },
    KernelFile { name: "rope.cu", source: include_str!("../../../kernels/rope.cu") },
    KernelFile { name: "activation.cu", source: include_str!("../../../kernels/activation.cu") },
    KernelFile { name: "matmul.cu", source: include_str!("../../../kernels/matmul.cu") },
    KernelFile { name: "fp8.cu", source: include_str!("../../../kernels/fp8.cu") },
    KernelFile { name: "attention.cu", source: include_str!("../../../kernels/attention.cu") },
    KernelFile { name: "attention_mma.cu", source: include_str!("../../../kernels/attention_mma.cu") },
    KernelFile { name: "prefill.cu", source: include_str!("../../../kernels/prefill.cu") },
    KernelFile { name: "kv.cu", source: include_str!("../../../kernels/kv.cu") },
    KernelFile { name: "sample.cu", source: include_str!("../../../kernels/sample.cu") },
    KernelFile { name: "topk.cu", source: include_str!("../../../kernels/topk.cu") },
];

impl KernelFile {
    /// The source as NVRTC sees it: each header pasted in place of its include, so that no
    /// file lookup happens at run time.
    pub fn full_source(&self) -> String {
        HEADERS
            .iter()
            .fold(self.source.to_string(), |src, (name, text)| src.replace(&format!("#include \"{name}\""), text))
    }

    /// The `extern "C" __global__` functions the file defines.
    pub fn kernel_names(&self) -> Vec<String> {
        let text = self.source.split_whitespace().collect::<Vec<_>>().join(" ");
        text.split("extern \"C\" __global__ void ")
            .skip(1)
            // The name is the last word before the parameters (after a bounds macro, if any).
            .filter_map(|rest| rest.split('(').next()?.split_whitespace().last().map(str::to_string))
            .collect()
    }
}

/// Where NVRTC finds `cuda_bf16.h`: `$CUDA_HOME/include`, else `/usr/local/cuda/include`.
pub fn cuda_include_dir() -> Result<PathBuf> {
    let candidates = std::env::var_os("CUDA_HOME")
        .or_else(|| std::env::var_os("CUDA_PATH"))
        .map(|h| PathBuf::from(h).join("include"))
        .into_iter()
        .chain([PathBuf::from("/usr/local/cuda/include")]);
    for dir in candidates {
        if dir.join("cuda_bf16.h").exists() {
            return Ok(dir);
        }
    }
    Err(BackendError::Device(
        "CUDA headers not found: set CUDA_HOME to a folder whose include/ holds cuda_bf16.h".into(),
    ))
}

/// NVRTC's version, e.g. (13, 0). Fails cleanly (no panic) when libnvrtc cannot be loaded.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    // cudarc panics when it cannot dlopen the library; turn that into an error, quietly.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let call = std::panic::catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-parameters.
        let status = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
        (status, major, minor)
    });
    std::panic::set_hook(hook);
    match call {
        Ok((nvrtc_sys::nvrtcResult::NVRTC_SUCCESS, major, minor)) => Ok((major, minor)),
        Ok((status, _, _)) => Err(BackendError::Device(format!("nvrtcVersion failed: {status:?}"))),
        Err(_) => Err(BackendError::Device(
            "libnvrtc could not be loaded: put the folder holding libnvrtc.so.13 on LD_LIBRARY_PATH".into(),
        )),
    }
}

fn options(arch: &str, include: &Path) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        format!("--include-path={}", include.display()),
        "--std=c++17".into(),
        // Exact division and square roots: the CPU reference computes them exactly too.
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
    ]
}

/// Compiles one file to a cubin for `arch` (e.g. `sm_90a`). The error carries NVRTC's log.
pub fn compile(file: &KernelFile, arch: &str, include: &Path) -> Result<Vec<u8>> {
    compile_with(file, arch, include, &[]).map(|(cubin, _)| cubin)
}

/// `compile` with extra NVRTC options (e.g. `--ptxas-options=-v`); also returns NVRTC's log.
pub fn compile_with(file: &KernelFile, arch: &str, include: &Path, extra: &[&str]) -> Result<(Vec<u8>, String)> {
    let fail = |log: String| BackendError::Compile { kernel: file.name.to_string(), log };
    let src = CString::new(file.full_source()).map_err(|_| fail("source holds a NUL byte".into()))?;
    let name = CString::new(file.name).expect("file names hold no NUL");
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| fail(format!("nvrtcCreateProgram: {e:?}")))?;
    // SAFETY: `prog` is live until destroyed below; src and name outlive it.
    let result = unsafe {
        let mut opts = options(arch, include);
        opts.extend(extra.iter().map(|s| s.to_string()));
        match nvrtc::compile_program(prog, &opts) {
            Ok(()) => {
                let log = nvrtc::get_program_log(prog).ok();
                let log = log.map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned()).unwrap_or_default();
                cubin(prog).map(|c| (c, log)).map_err(|e| fail(format!("nvrtcGetCUBIN: {e:?}")))
            }
            Err(e) => {
                let log = nvrtc::get_program_log(prog).ok();
                let log = log.map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned()).unwrap_or_default();
                Err(fail(format!("{e:?}\n{log}")))
            }
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    result
}

unsafe fn cubin(prog: nvrtc_sys::nvrtcProgram) -> std::result::Result<Vec<u8>, nvrtc_sys::nvrtcResult> {
    let mut size = 0usize;
    let status = nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size);
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(status);
    }
    let mut out = vec![0u8; size];
    let status = nvrtc_sys::nvrtcGetCUBIN(prog, out.as_mut_ptr() as *mut _);
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(status);
    }
    Ok(out)
}

/// FNV-1a: stable across builds (std's hasher is not), good enough for a cache key.
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn cache_dir() -> PathBuf {
    crate::cache::cache_dir().join("kernels")
}

/// The cubin of `file` for `arch` (with `extra` NVRTC options), from the disk cache or
/// freshly compiled (and then cached).
pub fn cubin_cached(file: &KernelFile, arch: &str, include: &Path, extra: &[String]) -> Result<Vec<u8>> {
    let (major, minor) = nvrtc_version()?;
    let source = file.full_source();
    let mut opts = options(arch, include);
    opts.extend(extra.iter().cloned());
    let opts = opts.join(" ");
    let version = format!("{major}.{minor}");
    let key = fnv64(&[source.as_bytes(), arch.as_bytes(), opts.as_bytes(), version.as_bytes()]);
    let path = cache_dir().join(format!("{}-{arch}-{key:016x}.cubin", file.name.trim_end_matches(".cu")));
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok(bytes);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let (bytes, _) = compile_with(file, arch, include, &extra)?;
    tracing::debug!("compiled {} for {arch}, cached as {}", file.name, path.display());
    // A failed cache write only costs a recompile next time.
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(bytes)
}

/// The architecture NVRTC should target for a device: `sm_90a` on Hopper (for wgmma and
/// friends), `sm_XY` elsewhere.
pub fn arch_for(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// Every kernel function, loaded once per context and shared by the backends on it.
pub struct Kernels {
    pub embed_rows: CudaFunction,
    /// A drafting head's input rows (`Backend::embed_concat`).
    pub embed_concat_rows: CudaFunction,
    pub gather_rows: CudaFunction,
    pub f32_to_bf16: CudaFunction,
    pub fill_normal_bf16: CudaFunction,
    pub rms_norm: CudaFunction,
    pub add_rms_norm: CudaFunction,
    pub rope: CudaFunction,
    pub silu_mul: CudaFunction,
    pub quantize_rows_fp8: CudaFunction,
    /// The tensor-core matmul by weight type and token group (≤ 8, 16, 32, 64 tokens; see
    /// `matmul::token_group`), plain and with the SwiGLU epilogue.
    pub mm_bf16: [CudaFunction; 4],
    pub mm_fp8: [CudaFunction; 4],
    pub swiglu_bf16: [CudaFunction; 4],
    pub swiglu_fp8: [CudaFunction; 4],
    /// The attention split kernels, by `AttnKernel::index` (head size, window, KV storage,
    /// query heads per KV head, CUDA or tensor cores).
    pub attn_split: Vec<CudaFunction>,
    pub attn_merge: CudaFunction,
    /// The prefill attention kernels, by `prefill::prefill_index` (head size, window, KV
    /// storage), and their KV store pass, by `prefill::store_index`.
    pub prefill: Vec<CudaFunction>,
    pub kv_store: Vec<CudaFunction>,
    /// KV cache entries moved slot to slot (`Backend::copy_kv`).
    pub kv_copy: CudaFunction,
    pub argmax_rows: CudaFunction,
    pub sample_rows: CudaFunction,
    pub top_log_probs_rows: CudaFunction,
    /// The architecture the cubins were built for.
    pub arch: String,
}

/// The cubins of every file for each set of matmul defines, compiled in parallel (NVRTC is
/// single-threaded per program) into the disk cache, in file order per set.
pub fn compile_all(arch: &str, matmul_defines: &[Vec<String>]) -> Result<Vec<Vec<Vec<u8>>>> {
    use rayon::prelude::*;
    let include = cuda_include_dir()?;
    matmul_defines
        .par_iter()
        .map(|defines| {
            FILES
                .par_iter()
                .map(|file| cubin_cached(file, arch, &include, if file.name == "matmul.cu" { defines } else { &[] }))
                .collect()
        })
        .collect()
}

impl Kernels {
    /// Every kernel; `matmul_defines` (e.g. `-DMM_UNROLL=8`) tune kernels/matmul.cu.
    pub fn load(ctx: &Arc<CudaContext>, matmul_defines: &[String]) -> Result<Self> {
        let (major, minor) = ctx.compute_capability().map_err(|e| BackendError::Device(e.to_string()))?;
        let arch = arch_for(major, minor);
        let cubins = compile_all(&arch, &[matmul_defines.to_vec()])?.remove(0);
        let mut modules = Vec::new();
        for (file, cubin) in FILES.iter().zip(cubins) {
            let module = ctx
                .load_module(Ptx::from_binary(cubin))
                .map_err(|e| BackendError::Device(format!("loading {}: {e}", file.name)))?;
            modules.push(module);
        }
        let get = |name: &str| -> Result<CudaFunction> {
            modules
                .iter()
                .find_map(|m| m.load_function(name).ok())
                .ok_or_else(|| BackendError::Device(format!("kernel {name} not found in any module")))
        };
        let by_group = |prefix: &str| -> Result<[CudaFunction; 4]> {
            let fs: Vec<CudaFunction> =
                [8, 16, 32, 64].map(|t| get(&format!("{prefix}_t{t}"))).into_iter().collect::<Result<_>>()?;
            Ok(fs.try_into().unwrap_or_else(|_| unreachable!("four kernels")))
        };
        Ok(Kernels {
            embed_rows: get("embed_rows")?,
            embed_concat_rows: get("embed_concat_rows")?,
            gather_rows: get("gather_rows")?,
            f32_to_bf16: get("f32_to_bf16")?,
            fill_normal_bf16: get("fill_normal_bf16")?,
            rms_norm: get("rms_norm")?,
            add_rms_norm: get("add_rms_norm")?,
            rope: get("rope")?,
            silu_mul: get("silu_mul")?,
            quantize_rows_fp8: get("quantize_rows_fp8")?,
            mm_bf16: by_group("mm_bf16")?,
            mm_fp8: by_group("mm_fp8")?,
            swiglu_bf16: by_group("swiglu_bf16")?,
            swiglu_fp8: by_group("swiglu_fp8")?,
            attn_split: AttnKernel::ALL.iter().map(|k| get(&k.name())).collect::<Result<_>>()?,
            attn_merge: get("attn_merge")?,
            prefill: prefill_names().iter().map(|n| get(n)).collect::<Result<_>>()?,
            kv_store: store_names().iter().map(|n| get(n)).collect::<Result<_>>()?,
            kv_copy: get("kv_copy")?,
            argmax_rows: get("argmax_rows")?,
            sample_rows: get("sample_rows")?,
            top_log_probs_rows: get("top_log_probs_rows")?,
            arch,
        })
    }
}

/// Which attention split kernel a layer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnKernel {
    pub head_dim: usize,
    pub windowed: bool,
    pub fp8: bool,
    /// Query heads per KV head the kernel holds registers for: 4 or 8.
    pub group: usize,
    /// Tensor cores (`kernels/attention_mma.cu`) rather than CUDA cores (`attention.cu`).
    pub mma: bool,
}

impl AttnKernel {
    /// Every kernel `kernels/attention.cu` and `attention_mma.cu` define, in `index` order.
    const ALL: [AttnKernel; 32] = {
        let mut all = [AttnKernel { head_dim: 64, windowed: false, fp8: false, group: 4, mma: false }; 32];
        let mut i = 0;
        while i < 32 {
            all[i] = AttnKernel {
                head_dim: if i & 1 == 0 { 64 } else { 128 },
                windowed: i & 2 != 0,
                fp8: i & 4 != 0,
                group: if i & 8 == 0 { 4 } else { 8 },
                mma: i & 16 != 0,
            };
            i += 1;
        }
        all
    };

    /// The kernel for heads of `head_dim` with `group` query heads per KV head; None where
    /// none fits (head sizes other than 64 and 128, more than 8 query heads per KV head).
    pub fn for_shape(head_dim: usize, group: usize, windowed: bool, fp8: bool, mma: bool) -> Option<Self> {
        let fits = matches!(head_dim, 64 | 128) && (1..=8).contains(&group);
        fits.then_some(AttnKernel { head_dim, windowed, fp8, group: if group <= 4 { 4 } else { 8 }, mma })
    }

    fn index(self) -> usize {
        usize::from(self.head_dim == 128)
            | usize::from(self.windowed) << 1
            | usize::from(self.fp8) << 2
            | usize::from(self.group == 8) << 3
            | usize::from(self.mma) << 4
    }

    /// Its name in `kernels/attention.cu` or `attention_mma.cu`.
    fn name(self) -> String {
        let kind = if self.mma { "mma" } else { "split" };
        let fp8 = if self.fp8 { "_fp8" } else { "" };
        let win = if self.windowed { "_win" } else { "" };
        format!("attn_{kind}{fp8}{win}_hd{}_g{}", self.head_dim, self.group)
    }
}

impl Kernels {
    /// The attention split kernel `k` names.
    pub fn attn_split(&self, k: AttnKernel) -> &CudaFunction {
        &self.attn_split[k.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_names_its_kernels() {
        let names: Vec<String> = FILES.iter().flat_map(|f| f.kernel_names()).collect();
        for expected in [
            "embed_rows",
            "rms_norm",
            "add_rms_norm",
            "rope",
            "mm_bf16_t8",
            "mm_fp8_t64",
            "swiglu_fp8_t16",
            "quantize_rows_fp8",
            "attn_merge",
            "kv_copy",
            "argmax_rows",
            "sample_rows",
            "top_log_probs_rows",
            "embed_concat_rows",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
        }
        for k in AttnKernel::ALL {
            assert!(names.contains(&k.name()), "{k:?} ({}) missing", k.name());
            assert_eq!(AttnKernel::ALL[k.index()], k);
        }
        for name in prefill_names().into_iter().chain(store_names()) {
            assert!(names.contains(&name), "{name} missing");
        }
        assert!(FILES.iter().all(|f| !f.full_source().contains(".cuh\"")));
    }
}
