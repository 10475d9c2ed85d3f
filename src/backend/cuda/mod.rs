//! The CUDA backend (feature `cuda`): bf16 or FP8 weights, a bf16 or FP8 KV cache, f32 residual
//! stream, kernels from `kernels/*.cu` compiled by NVRTC at start-up, one tensor-core matmul
//! for every step of up to 64 tokens (`matmul.rs`), cuBLAS for longer bf16 steps, CUDA
//! graphs for decode-sized steps (see `graph.rs`).
//!
//! One `CudaBackend` owns one stream. The draft and target models each get their own
//! backend (`CudaBackend::sibling` shares the context and kernels) so that their work runs
//! on separate streams; `record` / `wait` order them with events, never device-wide syncs.

mod attention;
pub use self::attention::AttnPath;
pub mod batch;
pub mod blas;
pub mod device;
mod draft;
mod fp8;
pub mod graph;
pub mod kernels;
mod kv;
pub mod matmul;
mod nccl;
mod placement;
mod prefill;
mod sample;
pub mod tensor;

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};

use self::batch::{blocks_needed, pack, splits_at, CudaBatch, ATTN_SPLIT};
use self::blas::Blas;
use self::device::{check_libraries, driver_err, keep_pool_memory, launch, Device, DeviceBuf};
use self::graph::Graphs;
use self::kernels::Kernels;
pub use self::matmul::MatmulTuning;
pub use self::matmul::MATMUL_MAX_TOKENS;
use self::matmul::{Epilogue, SplitWorkspace};
pub use self::tensor::{CudaTensor, DType};
use crate::core::sampling::RowSampling;
use crate::tensor::quant::QuantWeight;
use crate::tensor::TopLogProbs;
use crate::tensor::{AttnShape, Backend, BackendError, BatchMeta, DeviceMemory, HostTensor, Result, StepKey};
use crate::tensor::{KvDtype, KvLayout, KvStorage};

pub struct CudaBackend {
    dev: Device,
    kernels: Arc<Kernels>,
    blas: Blas,
    /// Partial sums of the matmuls that split K (one workspace per stream).
    split: SplitWorkspace,
    /// How the matmul kernels in `kernels` were built (and how to launch them).
    tuning: MatmulTuning,
    graphs: Graphs,
    /// Set while `graph::Graphs` captures a step: the batch buffer `prepare` must use.
    capture_batch: Mutex<Option<(Arc<DeviceBuf>, usize)>>,
    device_name: String,
    /// This backend's place in a tensor-parallel group (`tensor_parallel`), if any.
    rank: Option<nccl::NcclRank>,
    /// The CUDA-core attention split kernel rather than the tensor-core one (`AttnPath`).
    attn_simt: AtomicBool,
    /// Long prefill rows through the tiled prefill kernel (`prefill.rs`) rather than the
    /// split kernel.
    tiled_prefill: AtomicBool,
}

impl CudaBackend {
    /// A backend on GPU `ordinal`, with its own stream; compiles (or loads from the disk
    /// cache) every kernel for the device's architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        check_libraries()?;
        let ctx = CudaContext::new(ordinal).map_err(driver_err("opening the GPU"))?;
        // We order work ourselves (one stream per backend, events between them); cudarc's
        // per-buffer event tracking would only add calls to every launch.
        // SAFETY: no cudarc buffers exist yet on this context.
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx)?;
        let tuning = MatmulTuning::default();
        let kernels = Arc::new(Kernels::load(&ctx, &tuning.defines())?);
        Self::on(ctx, kernels, tuning)
    }

    /// A sibling whose matmul kernels are built with other settings (for comparisons).
    pub fn tuned(&self, tuning: MatmulTuning) -> Result<Self> {
        let kernels = Arc::new(Kernels::load(&self.dev.ctx, &tuning.defines())?);
        Self::on(self.dev.ctx.clone(), kernels, tuning)
    }

    /// Another backend on the same GPU and kernels, with a stream of its own (for the draft
    /// model while this one runs the target).
    pub fn sibling(&self) -> Result<Self> {
        Self::on(self.dev.ctx.clone(), self.kernels.clone(), self.tuning)
    }

    fn on(ctx: Arc<CudaContext>, kernels: Arc<Kernels>, tuning: MatmulTuning) -> Result<Self> {
        let dev = Device::new(ctx.clone())?;
        let blas = Blas::new(&dev.stream)?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err("reading the SM count"))? as usize;
        let split = SplitWorkspace::new(&dev, sms, &tuning)?;
        Ok(CudaBackend {
            dev,
            kernels,
            blas,
            split,
            tuning,
            graphs: Graphs::default(),
            capture_batch: Mutex::new(None),
            device_name,
            rank: None,
            attn_simt: AtomicBool::new(AttnPath::from_env() == AttnPath::Simt),
            tiled_prefill: AtomicBool::new(prefill::tiled_from_env()),
        })
    }

    /// The architecture the kernels were compiled for (e.g. `sm_90a`).
    pub fn arch(&self) -> &str {
        &self.kernels.arch
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.dev.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.dev.ctx
    }

    /// An event marking everything queued on this backend's stream so far.
    pub fn record(&self) -> Result<CudaEvent> {
        let event = self.dev.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver_err("event"))?;
        event.record(&self.dev.stream).map_err(driver_err("recording an event"))?;
        Ok(event)
    }

    /// Makes this backend's later work wait for `event` (from any stream) on the GPU.
    pub fn wait(&self, event: &CudaEvent) -> Result<()> {
        self.dev.stream.wait(event).map_err(driver_err("waiting for an event"))
    }

    /// Programmatic dependent launch on or off (on by default on Hopper): with it, each
    /// kernel is scheduled while the previous one drains and prefetches its weights.
    pub fn set_pdl(&self, on: bool) {
        self.dev.set_pdl(on);
    }

    pub fn synchronize(&self) -> Result<()> {
        self.dev.sync()
    }

    pub(crate) fn device(&self) -> &Device {
        &self.dev
    }

    fn alloc(&self, shape: Vec<usize>, dtype: DType) -> Result<CudaTensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        Ok(CudaTensor::new(self.dev.alloc(bytes)?, shape, dtype))
    }

    fn expect(t: &CudaTensor, dtype: DType, what: &str) -> Result<()> {
        if t.dtype != dtype {
            return Err(BackendError::Invalid(format!("{what}: expected {dtype:?}, got {:?}", t.dtype)));
        }
        Ok(())
    }

    /// An f32 tensor rounded to bf16.
    fn to_bf16(&self, x: &CudaTensor) -> Result<CudaTensor> {
        Self::expect(x, DType::F32, "bf16 conversion")?;
        let out = self.alloc(x.shape.clone(), DType::Bf16)?;
        let count = x.numel();
        let grid = (count.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1);
        launch!(self.dev, &self.kernels.f32_to_bf16, grid, (256, 1, 1); x.ptr(), out.ptr(), count)?;
        Ok(out)
    }

    /// An activation (f32, any shape) with the host tensor's values; `upload` is for
    /// weights and makes matrices bf16.
    pub fn upload_f32(&self, t: &HostTensor) -> Result<CudaTensor> {
        let out = self.alloc(t.shape.clone(), DType::F32)?;
        self.dev.htod(out.ptr(), &t.data)?;
        Ok(out)
    }

    /// Copies a device tensor into a fresh one (same shape and type).
    pub fn copy(&self, t: &CudaTensor) -> Result<CudaTensor> {
        let out = self.alloc(t.shape.clone(), t.dtype)?;
        self.dev.dtod(out.ptr(), t.ptr(), t.bytes())?;
        Ok(out)
    }

    /// Device-to-device copy of `bytes` bytes between two fresh buffers, `reps` times,
    /// timed with events: milliseconds per copy (for the bandwidth ceiling).
    pub fn time_copy(&self, bytes: usize, reps: usize) -> Result<Vec<f32>> {
        let (a, b) = (self.dev.alloc(bytes)?, self.dev.alloc(bytes)?);
        self.dev.memset_zero(a.ptr(), bytes)?;
        let mut times = vec![];
        for _ in 0..reps {
            let start = self.record()?;
            self.dev.dtod(b.ptr(), a.ptr(), bytes)?;
            let end = self.record()?;
            end.synchronize().map_err(driver_err("event"))?;
            times.push(start.elapsed_ms(&end).map_err(driver_err("event time"))?);
        }
        Ok(times)
    }

    /// Whether `x` (`n` tokens, `k` wide) times these weights runs on the tensor-core matmul:
    /// always for steps of up to 64 tokens and for FP8 weights; bf16 prefill goes to cuBLAS.
    fn on_tensor_cores(&self, n: usize, ws: &[&CudaTensor], k: usize) -> bool {
        let fp8 = ws.iter().any(|w| w.dtype == DType::Fp8);
        ws.iter().all(|w| matmul::fits(w, k)) && (n <= MATMUL_MAX_TOKENS || fp8)
    }

    /// cuBLAS for bf16 steps longer than the tensor-core matmul takes at once.
    fn gemm(&self, x: &CudaTensor, w: &CudaTensor, out: &CudaTensor) -> Result<()> {
        let ((n, k), m) = (x.dims(), w.dims().0);
        let x = self.bf16_input(x)?;
        self.blas.gemm_bf16_f32(x.ptr(), w.ptr(), out.ptr(), n, k, m)
    }
}

fn to_bf16_bits(data: &[f32]) -> Vec<u16> {
    data.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
}

/// Threads for a norm over rows `d` wide: one float4 per thread where the block allows
/// (kernels/norm.cu holds up to 4 per thread).
fn norm_block(d: usize) -> Result<(u32, u32, u32)> {
    if !d.is_multiple_of(4) || d > 4 * 4 * 1024 {
        return Err(BackendError::Invalid(format!("rms_norm: width {d} must be a multiple of 4, at most 16384")));
    }
    Ok(((d / 4).div_ceil(32).clamp(1, 32) as u32 * 32, 1, 1))
}

fn grid_for(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1)
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Batch = CudaBatch;

    fn name(&self) -> String {
        format!("cuda ({}, {})", self.device_name, self.kernels.arch)
    }

    fn kind(&self) -> &'static str {
        "cuda"
    }

    /// Rank i on GPU i, all in one NCCL group (see `nccl.rs`); one rank is a group too.
    fn tensor_parallel(&self, ranks: usize) -> Result<(Arc<dyn crate::tensor::RankGroup>, Vec<CudaBackend>)> {
        let (group, backends) = self.nccl_group(ranks)?;
        Ok((group, backends))
    }

    fn all_reduce(&self, x: &mut CudaTensor) -> Result<()> {
        self.nccl_all_reduce(x)
    }

    fn on_device(&self, ordinal: usize) -> Result<CudaBackend> {
        self.on_gpu(ordinal)
    }

    fn device_ordinal(&self) -> Option<usize> {
        Some(self.dev.ctx.ordinal())
    }

    fn copy_from(&self, t: &CudaTensor, from: &CudaBackend) -> Result<CudaTensor> {
        self.copy_from_gpu(t, from)
    }

    fn upload(&self, t: &HostTensor) -> Result<CudaTensor> {
        let out;
        if t.shape.len() == 1 {
            out = self.alloc(t.shape.clone(), DType::F32)?;
            self.dev.htod(out.ptr(), &t.data)?;
        } else {
            out = self.alloc(t.shape.clone(), DType::Bf16)?;
            self.dev.htod(out.ptr(), &to_bf16_bits(&t.data))?;
        }
        Ok(out)
    }

    /// FP8 matrices the tensor-core matmul can take stay FP8 (their activations stay bf16
    /// whatever the checkpoint's scheme: at least as precise as quantizing them to E4M3);
    /// GGML blocks and other shapes are dequantized by the loader.
    fn upload_quantized(&self, w: &QuantWeight) -> Result<Option<CudaTensor>> {
        match w {
            QuantWeight::Fp8(f) if matmul::fp8_fits(f.shape) => {
                Ok(Some(self.upload_fp8(f.shape, &f.codes, &f.scales)?))
            }
            _ => Ok(None),
        }
    }

    fn random_fp8(&self, shape: [usize; 2], std: f32, seed: u64) -> Result<Option<CudaTensor>> {
        matmul::fp8_fits(shape).then(|| self.random_fp8_matrix(shape, std, seed)).transpose()
    }

    fn random_part(
        &self,
        shape: [usize; 2],
        std: f32,
        seed: u64,
        part: [Range<usize>; 2],
    ) -> Result<Option<CudaTensor>> {
        let [rows, cols] = part;
        self.random_cut(shape, std, seed, rows, cols).map(Some)
    }

    fn random(&self, shape: &[usize], std: f32, seed: u64) -> Result<CudaTensor> {
        let out = self.alloc(shape.to_vec(), DType::Bf16)?;
        let n = out.numel();
        launch!(self.dev, &self.kernels.fill_normal_bf16, grid_for(n), (256, 1, 1); out.ptr(), n, seed, std)?;
        Ok(out)
    }

    /// bf16 by default; FP8 E4M3 with a power-of-two scale per token and KV head, as the CPU
    /// stores it (kernels/attention.cu writes and reads both).
    fn kv_storage(&self, dtype: KvDtype) -> Result<KvStorage> {
        match dtype {
            KvDtype::Auto | KvDtype::Bf16 => Ok(KvStorage::Bf16),
            KvDtype::Fp8 => Ok(KvStorage::Fp8),
        }
    }

    /// After everything queued so far has run (freed buffers back in the pool count as
    /// used: the pool keeps them for the next step).
    fn memory(&self) -> Result<Option<DeviceMemory>> {
        self.synchronize()?;
        self.dev.bind()?;
        let (free, total) = cudarc::driver::result::mem_get_info().map_err(driver_err("reading free memory"))?;
        Ok(Some(DeviceMemory { free, total }))
    }

    /// One launch per cache, the moves in order (kernels/kv.cu; see `kv.rs`).
    fn copy_kv(&self, cache: &mut CudaTensor, moves: &[(u32, u32)]) -> Result<()> {
        self.move_kv(cache, moves)
    }

    /// bf16 or FP8 (codes and scale exponents, `kv.rs`); refuses f32, which its attention
    /// kernels do not read.
    fn kv_cache(&self, slots: usize, layout: &KvLayout) -> Result<CudaTensor> {
        self.alloc_kv(slots, layout)
    }

    /// Tree rows too: the attention kernel reads each tree token's path through the batch's
    /// tree table (`batch::tree_table`).
    fn prepare(&self, meta: &BatchMeta) -> Result<CudaBatch> {
        if let Some((buf, max_blocks)) = self.capture_batch.lock().expect("capture lock").clone() {
            // Capturing: the graph's buffer already holds this step's values.
            // Enough splits for the last position the graph's block tables can hold.
            let max_splits = splits_at(max_blocks * meta.block_size as usize - 1, ATTN_SPLIT);
            let min_split = ATTN_SPLIT;
            // A captured step holds at most MATMUL_MAX_TOKENS tokens: no row is long enough
            // for the prefill kernel (prefill.rs).
            return Ok(CudaBatch { meta: meta.clone(), buf, max_blocks, max_splits, min_split, prefill: None });
        }
        let max_blocks = blocks_needed(meta);
        let packed = pack(meta, max_blocks)?;
        let buf = self.dev.alloc(4 * packed.len())?;
        self.dev.htod(buf.ptr(), &packed)?;
        let max_splits = meta.positions.iter().map(|&p| splits_at(p as usize, ATTN_SPLIT)).max().unwrap_or(1);
        let (buf, min_split) = (Arc::new(buf), ATTN_SPLIT);
        let prefill = match self.tiled_prefill() {
            true => prefill::plan(&self.dev, meta)?,
            false => None,
        };
        Ok(CudaBatch { meta: meta.clone(), buf, max_blocks, max_splits, min_split, prefill })
    }

    fn embed(&self, table: &CudaTensor, batch: &CudaBatch) -> Result<CudaTensor> {
        Self::expect(table, DType::Bf16, "embed table")?;
        let (vocab, hidden) = table.dims();
        if let Some(&t) = batch.meta.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(BackendError::Invalid(format!("token id {t} out of vocabulary ({vocab})")));
        }
        let n = batch.num_tokens();
        let out = self.alloc(vec![n, hidden], DType::F32)?;
        launch!(self.dev, &self.kernels.embed_rows, (n as u32, 1, 1), (1024, 1, 1);
            table.ptr(), batch.tokens(), out.ptr(), hidden as i32)?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        Self::expect(x, DType::F32, "rms_norm input")?;
        Self::expect(weight, DType::F32, "rms_norm weight")?;
        let (rows, d) = x.dims();
        let block = norm_block(d)?;
        let out = self.alloc(x.shape.clone(), DType::Bf16)?; // a matmul's input
        launch!(self.dev, &self.kernels.rms_norm, (rows as u32, 1, 1), block;
            x.ptr(), weight.ptr(), out.ptr(), d as i32, eps)?;
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaTensor,
        delta: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        Self::expect(residual, DType::F32, "residual")?;
        Self::expect(delta, DType::F32, "delta")?;
        if residual.shape != delta.shape {
            return Err(BackendError::Invalid(format!("add_rms_norm: {:?} vs {:?}", residual.shape, delta.shape)));
        }
        let (rows, d) = residual.dims();
        let block = norm_block(d)?;
        let out = self.alloc(residual.shape.clone(), DType::Bf16)?; // a matmul's input
        launch!(self.dev, &self.kernels.add_rms_norm, (rows as u32, 1, 1), block;
            residual.ptr(), delta.ptr(), weight.ptr(), out.ptr(), d as i32, eps)?;
        Ok(out)
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaTensor) -> Result<CudaTensor> {
        let ((n, k), (m, wk)) = (x.dims(), w.dims());
        if k != wk {
            return Err(BackendError::Invalid(format!("matmul: x has {k} columns, weight {wk}")));
        }
        let out = self.alloc(vec![n, m], DType::F32)?;
        if n == 0 || m == 0 {
            return Ok(out); // nothing to compute; cuBLAS is not asked for an empty product
        }
        if self.on_tensor_cores(n, &[w], k) {
            self.tc_matmul(x, &[w], &[&out], Epilogue::Store)?;
        } else {
            Self::expect(w, DType::Bf16, "matmul weight")?;
            self.gemm(x, w, &out)?;
        }
        Ok(out)
    }

    fn matmul_many(&self, x: &CudaTensor, ws: &[&CudaTensor]) -> Result<Vec<CudaTensor>> {
        let (n, k) = x.dims();
        let same_type = ws.iter().all(|w| w.dtype == ws[0].dtype);
        if n == 0 || ws.len() > 3 || !same_type || !self.on_tensor_cores(n, ws, k) {
            return ws.iter().map(|w| self.matmul(x, w)).collect();
        }
        let outs = ws.iter().map(|w| self.alloc(vec![n, w.dims().0], DType::F32)).collect::<Result<Vec<_>>>()?;
        self.tc_matmul(x, ws, &outs.iter().collect::<Vec<_>>(), Epilogue::Store)?;
        Ok(outs)
    }

    fn swiglu(&self, x: &CudaTensor, w_gate: &CudaTensor, w_up: &CudaTensor) -> Result<CudaTensor> {
        let (n, k) = x.dims();
        let paired = w_gate.shape == w_up.shape && w_gate.dtype == w_up.dtype;
        if n == 0 || !paired || !self.on_tensor_cores(n, &[w_gate, w_up], k) {
            return self.silu_mul(&self.matmul(x, w_gate)?, &self.matmul(x, w_up)?);
        }
        let out = self.alloc(vec![n, w_gate.dims().0], DType::Bf16)?;
        self.tc_matmul(x, &[w_gate, w_up], &[&out], Epilogue::SwiGlu)?;
        Ok(out)
    }

    fn rope(&self, x: &mut CudaTensor, batch: &CudaBatch, inv_freq: &CudaTensor, head_dim: usize) -> Result<()> {
        Self::expect(x, DType::F32, "rope input")?;
        Self::expect(inv_freq, DType::F32, "rope frequencies")?;
        let (n, width) = x.dims();
        let (grid, block) = ((n as u32, 1, (width / head_dim) as u32), ((head_dim / 2) as u32, 1, 1));
        launch!(self.dev, &self.kernels.rope, grid, block;
            x.ptr(), batch.positions(), inv_freq.ptr(), (width / head_dim) as i32, head_dim as i32)?;
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        k_cache: &mut CudaTensor,
        v_cache: &mut CudaTensor,
        batch: &CudaBatch,
        s: AttnShape,
    ) -> Result<CudaTensor> {
        self.attend(q, k, v, k_cache, v_cache, batch, s, None)
    }

    /// The attention kernel rotates q and the step's keys itself: no rope launch.
    fn rope_attention(
        &self,
        q: &mut CudaTensor,
        k: &mut CudaTensor,
        v: &CudaTensor,
        k_cache: &mut CudaTensor,
        v_cache: &mut CudaTensor,
        batch: &CudaBatch,
        inv_freq: &CudaTensor,
        s: AttnShape,
    ) -> Result<CudaTensor> {
        Self::expect(inv_freq, DType::F32, "rope frequencies")?;
        if inv_freq.numel() != s.head_dim / 2 {
            return Err(BackendError::Invalid(format!(
                "rope: {} frequencies for head_dim {}",
                inv_freq.numel(),
                s.head_dim
            )));
        }
        self.attend(q, k, v, k_cache, v_cache, batch, s, Some(inv_freq))
    }

    fn silu_mul(&self, gate: &CudaTensor, up: &CudaTensor) -> Result<CudaTensor> {
        Self::expect(gate, DType::F32, "silu_mul gate")?;
        Self::expect(up, DType::F32, "silu_mul up")?;
        let out = self.alloc(gate.shape.clone(), DType::Bf16)?; // the down projection's input
        let n = out.numel();
        launch!(self.dev, &self.kernels.silu_mul, grid_for(n), (256, 1, 1); gate.ptr(), up.ptr(), out.ptr(), n)?;
        Ok(out)
    }

    /// One stream-ordered device copy (captured into a graph like any other work).
    fn duplicate(&self, x: &CudaTensor) -> Result<CudaTensor> {
        self.copy(x)
    }

    fn gather_logit_rows(&self, x: &CudaTensor, batch: &CudaBatch) -> Result<CudaTensor> {
        let (rows, width) = (batch.meta.logits_for.len(), x.dims().1);
        let out = self.alloc(vec![rows, width], x.dtype)?;
        if rows > 0 {
            // Copied as 16-bit halves: any element type of 2 or 4 bytes.
            let halves = width * x.dtype.size() / 2;
            launch!(self.dev, &self.kernels.gather_rows, (rows as u32, 1, 1), (1024, 1, 1);
                x.ptr(), batch.logits_for(), out.ptr(), halves as i32)?;
        }
        Ok(out)
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        match x.dtype {
            DType::F32 => self.dev.dtoh::<f32>(x.ptr(), x.numel()),
            DType::Bf16 => {
                let bits = self.dev.dtoh::<u16>(x.ptr(), x.numel())?;
                Ok(bits.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect())
            }
            DType::Fp8 => Err(BackendError::Invalid("to_host: FP8 weights are not read back".into())),
        }
    }

    /// Through a captured graph when the step is decode-sized (see `graph.rs`).
    fn replayable_step(
        &self,
        key: StepKey,
        meta: &BatchMeta,
        step: impl FnOnce() -> Result<Vec<CudaTensor>>,
    ) -> Result<Vec<CudaTensor>> {
        self.graphed(key, meta, step)
    }

    /// Its inputs in buffers of the graph, refilled before each replay (see `graph.rs`).
    fn replayable_step_with(
        &self,
        key: StepKey,
        meta: &BatchMeta,
        inputs: &[&HostTensor],
        step: impl FnOnce(&[CudaTensor]) -> Result<Vec<CudaTensor>>,
    ) -> Result<Vec<CudaTensor>> {
        self.graphed_with(key, meta, inputs, step)
    }

    /// A sticky error (an illegal address, say) or a stream left capturing shows here.
    fn healthy(&self) -> Result<()> {
        self.dev.sync()
    }

    fn argmax_rows(&self, logits: &CudaTensor, vocab: usize) -> Result<Vec<u32>> {
        let rows = logits.numel() / vocab.max(1);
        let ids = self.dev.alloc(4 * rows.max(1))?;
        if rows > 0 {
            launch!(self.dev, &self.kernels.argmax_rows, (rows as u32, 1, 1), (1024, 1, 1);
                logits.ptr(), ids.ptr(), vocab as i32)?;
        }
        self.dev.dtoh::<u32>(ids.ptr(), rows)
    }

    fn sample_rows(&self, logits: &CudaTensor, vocab: usize, rows: &[RowSampling]) -> Result<Vec<u32>> {
        self.sample_on_device(logits, vocab, rows)
    }

    fn top_log_probs_rows(&self, logits: &CudaTensor, vocab: usize, k: usize) -> Result<Vec<TopLogProbs>> {
        self.top_log_probs_on_device(logits, vocab, k)
    }

    fn embed_concat(&self, t: &CudaTensor, b: &CudaBatch, f: &CudaTensor, h: usize, w: usize) -> Result<CudaTensor> {
        self.embed_concat_on_device(t, b, f, h, w)
    }
}
