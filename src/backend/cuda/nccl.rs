//! Tensor parallelism across GPUs: one rank per GPU 0..N-1, each a `CudaBackend` with its
//! own context and stream, meeting in an NCCL all-reduce. All communicators are made in
//! this process at once (`ncclCommInitAll`); each rank's thread then calls the all-reduce
//! on its own communicator and stream.
//!
//! The all-reduce is queued on the rank's compute stream, like its kernels, so a decode
//! step that calls it still captures into one CUDA graph (NCCL calls can be captured) and
//! replays as one launch per rank. It sums f32 partial sums (what the forward's
//! row-parallel matmuls produce) in f32. Every rank gets the same bits (each chunk is
//! reduced once and then copied to all), though the order of the additions is NCCL's,
//! not rank order; with one rank it leaves the data as it is, so a group of one gives
//! the plain path's bits.
//!
//! NCCL is loaded (dlopen) only here, when a group is made: a build with the `cuda`
//! feature runs and compiles kernels on machines without it. cudarc's safe `Comm` takes
//! `CudaSlice`s and keeps the stream it was made with; our tensors are raw allocations
//! (`DeviceBuf`) on the rank's stream, so its thin `result` layer is called instead: four
//! calls (init all, all-reduce, group start/end, abort).

use std::ffi::c_void;
use std::sync::{Arc, PoisonError, RwLock};

use cudarc::nccl::{result, sys};

use super::{CudaBackend, CudaTensor, DType};
use crate::tensor::{BackendError, RankGroup, Result};

/// The communicators of one group, in rank order. Each is used for collectives by its
/// rank's thread only; `abort` and `Drop` take the write lock, so they never run while a
/// rank is inside a call.
pub struct NcclGroup {
    comms: RwLock<Option<Vec<sys::ncclComm_t>>>,
}

// SAFETY: a communicator is an opaque handle; see the locking rule above.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

/// One rank's place in a group (held by its `CudaBackend`).
#[derive(Clone)]
pub struct NcclRank {
    group: Arc<NcclGroup>,
    index: usize,
}

fn nccl_err(call: &'static str) -> impl Fn(result::NcclError) -> BackendError {
    move |e| BackendError::Nccl { call, code: format!("{:?}", e.0) }
}

/// NCCL settings, each unless the user set it: NVLink multicast (NVLS) off, since the
/// machines we run on do not support it reliably and NCCL would try it on Hopper; all
/// connections made when the communicators are (not lazily at the first all-reduce, which
/// may be inside a graph capture); and no registration of captured buffers (a zero-copy
/// path for large messages; ours are a few KB, and graph arenas are plain allocations).
/// Set in this process's environment before the first communicator reads them.
fn set_nccl_defaults() {
    let defaults = [("NCCL_NVLS_ENABLE", "0"), ("NCCL_RUNTIME_CONNECT", "0"), ("NCCL_GRAPH_REGISTER", "0")];
    for (name, value) in defaults {
        if std::env::var_os(name).is_none() {
            std::env::set_var(name, value);
        }
    }
}

/// Fails, typed, where cudarc would panic: NCCL not on the library path.
fn check_nccl() -> Result<()> {
    // SAFETY: only tries to open the shared library.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(BackendError::NcclMissing { searched: cudarc::get_lib_name_candidates("nccl") })
}

impl NcclGroup {
    /// One communicator per GPU of `ordinals` (rank i on `ordinals[i]`).
    fn new(ordinals: &[usize]) -> Result<Arc<Self>> {
        check_nccl()?;
        set_nccl_defaults();
        let devices: Vec<i32> = ordinals.iter().map(|&o| o as i32).collect();
        let mut comms = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has room for one handle per device.
        unsafe { result::comm_init_all(comms.as_mut_ptr(), devices.len() as i32, devices.as_ptr()) }
            .map_err(nccl_err("ncclCommInitAll"))?;
        Ok(Arc::new(NcclGroup { comms: RwLock::new(Some(comms)) }))
    }

    /// Sums `count` f32 at `ptr` over the ranks, in place, queued on `stream`.
    fn all_reduce(&self, index: usize, ptr: u64, count: usize, stream: sys::cudaStream_t) -> Result<()> {
        let comms = self.comms.read().unwrap_or_else(PoisonError::into_inner);
        let Some(comm) = comms.as_ref().map(|c| c[index]) else {
            let code = "the group was aborted after a rank failed; start again".into();
            return Err(BackendError::Nccl { call: "ncclAllReduce", code });
        };
        let (f32, sum) = (sys::ncclDataType_t::ncclFloat32, sys::ncclRedOp_t::ncclSum);
        // SAFETY: `ptr` holds `count` f32 on this rank's GPU; the stream is this rank's.
        unsafe { result::all_reduce(ptr as *const c_void, ptr as *mut c_void, count, f32, sum, comm, stream) }
            .map_err(nccl_err("ncclAllReduce"))?;
        Ok(())
    }

    /// Aborts every communicator (which ends NCCL kernels waiting for a rank that left)
    /// and forgets them; later all-reduces fail.
    fn abort_all(&self) {
        let mut comms = self.comms.write().unwrap_or_else(PoisonError::into_inner);
        for comm in comms.take().unwrap_or_default() {
            // SAFETY: each handle came from ncclCommInitAll and is aborted once.
            let _ = unsafe { result::comm_abort(comm) };
        }
    }
}

/// A failed rank cannot be waited out on a GPU: the others' all-reduce kernels are already
/// queued and would spin forever. So `abort` ends the communicators for good, and the
/// group stays failed (`reset` cannot make new ones: a step that failed on a GPU left it
/// in a state the process should not go on from anyway).
impl RankGroup for NcclGroup {
    fn abort(&self) {
        self.abort_all();
    }

    fn reset(&self) {}
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        self.abort_all(); // also frees a healthy group's resources
    }
}

impl CudaBackend {
    /// `ranks` backends, rank i on GPU i (rank 0 shares this backend's context and kernels
    /// when it is on GPU 0), in one NCCL group.
    pub(super) fn nccl_group(&self, ranks: usize) -> Result<(Arc<NcclGroup>, Vec<CudaBackend>)> {
        if ranks == 0 {
            return Err(BackendError::Invalid("tensor parallelism needs at least one rank".into()));
        }
        let visible = crate::device::gpu_count();
        if ranks > visible {
            return Err(BackendError::TooFewGpus { ranks, visible });
        }
        let mut backends = (0..ranks).map(|ordinal| self.on_gpu(ordinal)).collect::<Result<Vec<_>>>()?;
        let ordinals: Vec<usize> = (0..ranks).collect();
        let group = NcclGroup::new(&ordinals)?;
        for (index, backend) in backends.iter_mut().enumerate() {
            backend.rank = Some(NcclRank { group: group.clone(), index });
        }
        warm_up(&backends)?;
        Ok((group, backends))
    }

    /// The forward's all-reduce on this rank's stream (a no-op outside a group).
    pub(super) fn nccl_all_reduce(&self, x: &mut CudaTensor) -> Result<()> {
        let Some(rank) = &self.rank else { return Ok(()) };
        Self::expect(x, DType::F32, "all-reduce input")?;
        self.dev.bind()?;
        let stream = self.dev.stream.cu_stream() as sys::cudaStream_t;
        rank.group.all_reduce(rank.index, x.ptr(), x.numel(), stream)
    }
}

/// One all-reduce of one value on every rank, issued from this thread as one NCCL group
/// (one thread driving several GPUs must group its calls), then waited for: the
/// communicators work before the first step, and a broken setup fails here, typed.
fn warm_up(backends: &[CudaBackend]) -> Result<()> {
    let bufs = backends.iter().map(|b| b.alloc(vec![1, 1], DType::F32)).collect::<Result<Vec<_>>>()?;
    for (b, buf) in backends.iter().zip(&bufs) {
        b.dev.memset_zero(buf.ptr(), buf.bytes())?;
    }
    result::group_start().map_err(nccl_err("ncclGroupStart"))?;
    let queued: Result<()> = backends.iter().zip(bufs.iter()).try_for_each(|(b, buf)| {
        let mut buf = buf.clone();
        b.nccl_all_reduce(&mut buf)
    });
    // End the group whatever happened, or NCCL stays inside it.
    let ended = result::group_end().map_err(nccl_err("ncclGroupEnd"));
    queued?;
    ended?;
    backends.iter().try_for_each(|b| b.synchronize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nccl_is_a_typed_error_naming_the_libraries_looked_for() {
        match check_nccl() {
            Ok(()) => {} // installed on this machine
            Err(BackendError::NcclMissing { searched }) => {
                assert!(searched.iter().any(|s| s == "libnccl.so"), "{searched:?}");
            }
            Err(e) => panic!("expected NcclMissing, got {e}"),
        }
    }
}
