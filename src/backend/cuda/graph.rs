//! CUDA graphs for decode-sized steps (decode, verification, the draft loop).
//!
//! A small model's decode step is hundreds of short kernels; launching them one by one
//! costs more than running them. The first step of a given key and shape runs the step
//! (the model's forward, handed over as a closure by `Backend::replayable_step`) under
//! stream capture; later steps copy their metadata into the captured batch buffer and
//! replay the graph: one launch.
//!
//! What makes a replay valid:
//! - every buffer the graph touches keeps its address: tensors made during capture come
//!   from the graph's own arena (`GraphArena`), never reused by anyone else;
//! - everything that changes between steps lives in device memory, not in kernel
//!   arguments: tokens, positions, slots, block tables (padded to a power-of-two bucket
//!   of blocks per row), and the attention kernels read positions to size their loops;
//!   a tree step's tree table has one slot per token of a fixed stride (`tree_stride`,
//!   part of the key), so trees of one depth bucket share a graph whatever their shape;
//! - the same computation on the same KV cache: the caller's `StepKey` is part of the key;
//! - a step's other inputs (`Backend::replayable_step_with`: a drafting head's features)
//!   sit in buffers of the graph's arena, refilled from the host before each replay like
//!   the batch buffer; their shapes are part of the key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaGraph};

use super::batch::{blocks_needed, pack, tree_stride};
use super::device::{driver_err, GraphArena};
use super::{CudaBackend, CudaTensor, MATMUL_MAX_TOKENS};
use crate::tensor::{BackendError, BatchMeta, HostTensor, Result, StepKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    step: StepKey,
    tokens: usize,
    rows: usize,
    logits: usize,
    max_blocks: usize,
    /// Entries per token of the tree table; 0 for a step without tree rows.
    tree_stride: usize,
    /// Captured with programmatic dependent launch or without.
    pdl: bool,
    /// The shapes of the step's inputs (a hash).
    inputs: u64,
}

struct Captured {
    graph: CudaGraph,
    batch: u64,
    /// The step's inputs, refilled before each replay.
    inputs: Vec<CudaTensor>,
    outputs: Vec<CudaTensor>,
    arena: Arc<GraphArena>,
    /// When it last ran (a counter of graph launches): the least recent goes first when
    /// the graphs hold more memory than `GRAPH_MEMORY`.
    last_used: u64,
}

/// Device memory the captured graphs of one backend may hold together (their arenas): a
/// server sees many step shapes (rows, tokens, drafts per row), and each graph keeps every
/// activation of its step. Past it, the least recently used graphs are dropped (and
/// captured again if their shape comes back). Within the runtime's step reserve.
const GRAPH_MEMORY: usize = 4 << 30;

// SAFETY: a graph is used only under the `Graphs` mutex, one call at a time.
unsafe impl Send for Captured {}

#[derive(Default)]
pub struct Graphs {
    captured: Mutex<HashMap<Key, Captured>>,
    launches: std::sync::atomic::AtomicU64,
}

/// Smallest bucket of blocks per row a graph is captured for (1024 positions at 16 per block).
const MIN_BLOCKS: usize = 64;

impl CudaBackend {
    /// Runs `forward` through a captured graph when the step is decode-sized (at most
    /// `MATMUL_MAX_TOKENS` tokens, tree rows included), eagerly otherwise. The result of a
    /// graph lives in its output buffer: read it before the next step of the same key and shape.
    pub(super) fn graphed(
        &self,
        step: StepKey,
        meta: &BatchMeta,
        forward: impl FnOnce() -> Result<Vec<CudaTensor>>,
    ) -> Result<Vec<CudaTensor>> {
        self.graphed_with(step, meta, &[], |_| forward())
    }

    /// `graphed` for a step that reads `inputs` too: uploaded as f32 activations, into the
    /// graph's own buffers when it is captured or replayed.
    pub(super) fn graphed_with(
        &self,
        step: StepKey,
        meta: &BatchMeta,
        inputs: &[&HostTensor],
        forward: impl FnOnce(&[CudaTensor]) -> Result<Vec<CudaTensor>>,
    ) -> Result<Vec<CudaTensor>> {
        if meta.num_tokens() > MATMUL_MAX_TOKENS {
            let inputs = inputs.iter().map(|t| self.upload_f32(t)).collect::<Result<Vec<_>>>()?;
            return forward(&inputs);
        }
        let max_blocks = blocks_needed(meta).next_power_of_two().max(MIN_BLOCKS);
        let key = Key {
            step,
            tokens: meta.num_tokens(),
            rows: meta.rows.len(),
            logits: meta.logits_for.len(),
            max_blocks,
            tree_stride: tree_stride(meta),
            pdl: self.device().pdl(),
            inputs: shapes_hash(inputs),
        };
        let packed = pack(meta, max_blocks)?;
        let now = self.graphs.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = self.graphs.captured.lock().expect("graphs lock");
        if let Some(c) = map.get_mut(&key) {
            self.device().htod(c.batch, &packed)?;
            for (buf, host) in c.inputs.iter().zip(inputs) {
                self.device().htod(buf.ptr(), &host.data)?;
            }
            c.graph.launch().map_err(driver_err("graph launch"))?;
            c.last_used = now;
            return Ok(c.outputs.clone());
        }
        // Graphs of this computation captured on another KV cache are dead (the engine makes
        // one cache per request, and ids are never reused): free their arenas.
        map.retain(|k, _| k.step.computation != step.computation || k.step.kv_cache == step.kv_cache);
        let mut captured = self.capture(&packed, max_blocks, inputs, forward)?;
        captured.graph.launch().map_err(driver_err("graph launch"))?;
        captured.last_used = now;
        let outputs = captured.outputs.clone();
        map.insert(key, captured);
        evict_least_recent(&mut map);
        Ok(outputs)
    }

    fn capture(
        &self,
        packed: &[u32],
        max_blocks: usize,
        inputs: &[&HostTensor],
        forward: impl FnOnce(&[CudaTensor]) -> Result<Vec<CudaTensor>>,
    ) -> Result<Captured> {
        let dev = self.device();
        // One slab to start with; the arena grows by slabs as the capture allocates
        // (allowed in a relaxed-mode capture), so a graph holds what its step uses.
        let arena = Arc::new(GraphArena::new(dev.ctx.clone(), 0)?);
        dev.begin_arena(arena.clone());
        let result = (|| {
            // The batch buffer and the inputs are filled before capture: a copy from host
            // memory cannot be captured, and replays refill them the same way.
            let batch = Arc::new(dev.alloc(4 * packed.len())?);
            dev.htod(batch.ptr(), packed)?;
            let inputs = inputs.iter().map(|t| self.upload_f32(t)).collect::<Result<Vec<_>>>()?;
            *self.capture_batch.lock().expect("capture lock") = Some((batch.clone(), max_blocks));
            dev.stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(driver_err("begin capture"))?;
            let outputs = forward(&inputs);
            // End the capture whatever happened, or the stream stays unusable.
            let graph = dev.stream.end_capture(sys::CUgraphInstantiate_flags(0));
            let outputs = outputs?;
            let graph = graph
                .map_err(driver_err("end capture"))?
                .ok_or_else(|| BackendError::Device("stream capture produced no graph".into()))?;
            Ok(Captured { graph, batch: batch.ptr(), inputs, outputs, arena: arena.clone(), last_used: 0 })
        })();
        *self.capture_batch.lock().expect("capture lock") = None;
        dev.end_arena();
        result
    }
}

/// The inputs' shapes, for the key.
fn shapes_hash(inputs: &[&HostTensor]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    inputs.iter().for_each(|t| t.shape.hash(&mut h));
    h.finish()
}

/// Drops the least recently launched graphs while all of them hold more than `GRAPH_MEMORY`
/// (never the one just captured: it is the most recent).
fn evict_least_recent(map: &mut HashMap<Key, Captured>) {
    let mut held: usize = map.values().map(|c| c.arena.bytes()).sum();
    while held > GRAPH_MEMORY && map.len() > 1 {
        let Some(oldest) = map.iter().min_by_key(|(_, c)| c.last_used).map(|(k, _)| *k) else { break };
        if let Some(c) = map.remove(&oldest) {
            held -= c.arena.bytes();
        }
    }
}
