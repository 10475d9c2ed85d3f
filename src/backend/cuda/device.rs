//! The device side of one backend instance: the CUDA context (shared), this instance's own
//! stream (never the default stream), device memory and kernel launches.
//!
//! Memory comes from two places. Ordinary tensors use the driver's stream-ordered pool
//! (`cuMemAllocAsync` / `cuMemFreeAsync` on our stream: cheap, and a buffer is reused only
//! after the work queued before its free). While a CUDA graph is being captured, tensors
//! come from that graph's own arena instead, so that the addresses baked into the graph
//! stay reserved for it for as long as it lives.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaStream, DriverError};

use crate::tensor::{BackendError, Result};

pub(crate) fn driver_err(what: &str) -> impl Fn(DriverError) -> BackendError + '_ {
    move |e| BackendError::Device(format!("{what}: {e}"))
}

/// One device allocation. Dropping it frees it (or leaves it to its graph arena).
pub struct DeviceBuf {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    owner: Owner,
}

enum Owner {
    /// From the stream-ordered pool; freed on this stream.
    Stream(Arc<CudaStream>),
    /// Part of a graph's arena; freed with the arena.
    Graph(#[allow(dead_code)] Arc<GraphArena>),
}

// SAFETY: a device pointer is just an address; the driver calls that use it are thread-safe.
unsafe impl Send for DeviceBuf {}
unsafe impl Sync for DeviceBuf {}

impl DeviceBuf {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        if let Owner::Stream(stream) = &self.owner {
            let _ = stream.context().bind_to_thread();
            // SAFETY: allocated on this stream by `Device::alloc`, freed once, in stream order.
            let _ = unsafe { result::free_async(self.ptr, stream.cu_stream()) };
        }
    }
}

/// Device memory reserved for one captured graph: slabs carved by a bump pointer and
/// never reused while the graph (or a tensor it produced) lives.
pub struct GraphArena {
    slabs: Mutex<Vec<(sys::CUdeviceptr, usize, usize)>>, // (base, size, used)
    ctx: Arc<CudaContext>,
}

// SAFETY: see DeviceBuf.
unsafe impl Send for GraphArena {}
unsafe impl Sync for GraphArena {}

const SLAB: usize = 64 << 20;
const ALIGN: usize = 256;

impl GraphArena {
    /// An arena with `reserve` bytes allocated up front (before capture starts), so that
    /// a capture normally needs no allocation at all.
    pub fn new(ctx: Arc<CudaContext>, reserve: usize) -> Result<Self> {
        let arena = GraphArena { slabs: Mutex::new(vec![]), ctx };
        let size = reserve.max(SLAB);
        let base = arena.malloc(size)?;
        arena.slabs.lock().expect("arena lock").push((base, size, 0));
        Ok(arena)
    }

    /// `cuMemAlloc` is allowed during a relaxed-mode capture; stream-ordered allocation
    /// would instead become a node of the graph.
    fn alloc(&self, bytes: usize) -> Result<sys::CUdeviceptr> {
        let bytes = bytes.div_ceil(ALIGN).max(1) * ALIGN;
        let mut slabs = self.slabs.lock().expect("arena lock");
        if let Some(slab) = slabs.iter_mut().find(|s| s.2 + bytes <= s.1) {
            slab.2 += bytes;
            return Ok(slab.0 + (slab.2 - bytes) as u64);
        }
        let size = bytes.max(SLAB);
        let base = self.malloc(size)?;
        slabs.push((base, size, bytes));
        Ok(base)
    }

    pub fn bytes(&self) -> usize {
        self.slabs.lock().expect("arena lock").iter().map(|s| s.1).sum()
    }

    /// A plain allocation in this arena's context, which must be current on the calling
    /// thread (the runtime's Verifier and Drafter threads capture graphs too).
    fn malloc(&self, bytes: usize) -> Result<sys::CUdeviceptr> {
        self.ctx.bind_to_thread().map_err(driver_err("binding the context"))?;
        // SAFETY: plain device allocation, freed in Drop.
        unsafe { result::malloc_sync(bytes) }.map_err(|e| match e.0 {
            sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => BackendError::OutOfMemory { bytes },
            _ => BackendError::Device(format!("allocating {bytes} bytes: {e}")),
        })
    }
}

impl Drop for GraphArena {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        for (base, _, _) in self.slabs.get_mut().expect("arena lock").drain(..) {
            // SAFETY: allocated with malloc_sync above; the graph using it is gone.
            let _ = unsafe { result::free_sync(base) };
        }
    }
}

/// A kernel parameter, passed to `cuLaunchKernel` as a pointer to its bytes. Every
/// parameter is stored in 8 bytes; 4-byte values sit in the low half (little-endian).
pub trait KernelArg {
    fn bits(self) -> u64;
}
impl KernelArg for u64 {
    fn bits(self) -> u64 {
        self
    }
}
impl KernelArg for usize {
    fn bits(self) -> u64 {
        self as u64
    }
}
impl KernelArg for i32 {
    fn bits(self) -> u64 {
        self as u32 as u64
    }
}
impl KernelArg for u32 {
    fn bits(self) -> u64 {
        self as u64
    }
}
impl KernelArg for f32 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

/// `launch!(device, kernel, grid, block; arg, arg, ...)` with every argument a `KernelArg`;
/// `launch!(device, kernel, grid, block, shared_bytes; ...)` with dynamic shared memory.
macro_rules! launch {
    ($dev:expr, $f:expr, $grid:expr, $block:expr; $($arg:expr),* $(,)?) => {
        launch!($dev, $f, $grid, $block, 0; $($arg),*)
    };
    ($dev:expr, $f:expr, $grid:expr, $block:expr, $smem:expr; $($arg:expr),* $(,)?) => {{
        let mut vals = [$($crate::backend::cuda::device::KernelArg::bits($arg)),*];
        $dev.launch($f, $grid, $block, $smem, &mut vals)
    }};
}
pub(crate) use launch;

pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Set while a graph is being captured on `stream`: allocations go to its arena.
    capture: Mutex<Option<Arc<GraphArena>>>,
    /// Launch kernels with programmatic dependent launch (see `pdl_start` in common.cuh).
    pdl: std::sync::atomic::AtomicBool,
}

impl Device {
    pub fn new(ctx: Arc<CudaContext>) -> Result<Self> {
        let stream = ctx.new_stream().map_err(driver_err("creating a stream"))?;
        // PDL needs Hopper (compute capability 9.0) or newer.
        let major = ctx.compute_capability().map(|c| c.0).unwrap_or(0);
        Ok(Device { ctx, stream, capture: Mutex::new(None), pdl: (major >= 9).into() })
    }

    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn pdl(&self) -> bool {
        self.pdl.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(driver_err("binding the context"))
    }

    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuf> {
        self.bind()?;
        if let Some(arena) = self.capture.lock().expect("capture lock").as_ref() {
            let ptr = arena.alloc(bytes)?;
            return Ok(DeviceBuf { ptr, bytes, owner: Owner::Graph(arena.clone()) });
        }
        // SAFETY: stream-ordered allocation on our own stream; freed on it in Drop.
        let ptr = unsafe { result::malloc_async(self.stream.cu_stream(), bytes.max(1)) }
            .map_err(|_| BackendError::OutOfMemory { bytes })?;
        Ok(DeviceBuf { ptr, bytes, owner: Owner::Stream(self.stream.clone()) })
    }

    pub fn begin_arena(&self, arena: Arc<GraphArena>) {
        *self.capture.lock().expect("capture lock") = Some(arena);
    }

    pub fn end_arena(&self) {
        *self.capture.lock().expect("capture lock") = None;
    }

    /// Copies of nothing return at once: an empty step has no bytes to move, and a copy
    /// from host memory would break a graph capture.
    pub fn htod<T: Copy>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst holds at least size_of_val(src) bytes (callers allocate it so).
        // From pageable memory the copy is staged before the call returns, so `src` may go.
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(driver_err("copy to device"))
    }

    pub fn dtoh<T: Copy + Default>(&self, src: u64, len: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        if len == 0 {
            return Ok(out);
        }
        self.bind()?;
        // SAFETY: src holds len values of T; we wait for the copy before returning.
        unsafe { result::memcpy_dtoh_async(&mut out, src, self.stream.cu_stream()) }
            .map_err(driver_err("copy to host"))?;
        self.sync()?;
        Ok(out)
    }

    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both hold `bytes` bytes.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(driver_err("copy"))
    }

    pub fn memset_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst holds `bytes` bytes.
        unsafe { result::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }.map_err(driver_err("memset"))
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver_err("synchronizing the stream"))
    }

    /// Launches `f` on this instance's stream; `args` as built by `launch!`.
    pub fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &mut [u64],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            // No rows (a step of prompt chunks has no logits, say): no block would have work,
            // and the driver refuses an empty grid.
            return Ok(());
        }
        self.bind()?;
        let mut params: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
        if !self.pdl.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: the kernel's parameter list matches `args` (each kernel has one call
            // site, beside its signature's description); every pointer is a live allocation.
            return unsafe {
                result::launch_kernel(f.cu_function(), grid, block, shared_bytes, self.stream.cu_stream(), &mut params)
            }
            .map_err(driver_err("kernel launch"));
        }
        // SAFETY: zeroed is a valid bit pattern for this plain C struct; then one field is set.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: shared_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: as above; `config` and `attr` outlive the call.
        unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(driver_err("kernel launch"))
    }
}
/// Fails cleanly where cudarc would panic at its first call: on a machine without an NVIDIA
/// driver (no GPU) or without cuBLAS. NVRTC is checked where kernels are compiled.
pub(super) fn check_libraries() -> Result<()> {
    // SAFETY: these only try to open the shared libraries.
    let (driver, cublas) =
        unsafe { (cudarc::driver::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present()) };
    if !driver {
        return Err(BackendError::Device(
            "no CUDA driver (libcuda.so) on this machine: is there an NVIDIA GPU? Use --backend cpu".into(),
        ));
    }
    if !cublas {
        return Err(BackendError::Device(
            "cuBLAS (libcublas.so) could not be loaded: install the CUDA toolkit or put it on LD_LIBRARY_PATH".into(),
        ));
    }
    Ok(())
}

/// Keep freed memory in the stream-ordered pool instead of returning it to the driver at
/// every synchronisation: every step allocates the same sizes again.
pub(super) fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    use cudarc::driver::result;
    ctx.bind_to_thread().map_err(driver_err("binding the context"))?;
    // SAFETY: the device's default pool; the attribute takes a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(driver_err("memory pool"))?;
        let mut threshold = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut _,
        )
        .map_err(driver_err("memory pool"))
    }
}
