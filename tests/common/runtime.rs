//! For runtime tests: the default model loaded once per test binary (for the runtime, and a
//! second copy in the single-request engine as the reference), and the check that a
//! runtime came back to idle with every KV block free.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::executor::block_on;
use specula::actors::RuntimeHandle;
use specula::backend::cpu::CpuBackend;
use specula::engine::Engine;
use specula::model::{load_model, Llama, ModelSource, Tokenizer};

pub struct Shared {
    pub model: Arc<Llama<CpuBackend>>,
    pub tokenizer: Arc<Tokenizer>,
    /// A second copy of the model in the single-request engine: the reference.
    pub engine: Engine<CpuBackend>,
}

/// The default model, loaded once per test binary; `None` when it is unavailable.
pub fn shared() -> Option<&'static Shared> {
    static SHARED: OnceLock<Option<Shared>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let path = super::default_model_path()?;
            let load =
                || load_model(&ModelSource::Path(path.clone()), &CpuBackend::new()).expect("default model loads");
            let (a, b) = (load(), load());
            Some(Shared {
                model: Arc::new(a.model),
                tokenizer: Arc::new(a.tokenizer.expect("tokenizer")),
                engine: Engine::new(CpuBackend::new(), b.model, b.tokenizer),
            })
        })
        .as_ref()
}

/// Polls until nothing runs or waits and every block of the target pool and of a draft
/// model's pool is free again.
pub fn assert_all_blocks_free(h: &RuntimeHandle) {
    for _ in 0..300 {
        let st = block_on(h.stats()).unwrap();
        let draft_used = st.kv.draft.map_or(0, |d| d.used);
        if st.running == 0 && st.waiting == 0 && st.kv.target.used == 0 && draft_used == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("blocks still in use: {:?}", block_on(h.stats()));
}

/// Runs `reqs` through a runtime of `target` speculating with `spec` (a tree, greedy):
/// all at once (batch 8), then `reqs[alone]` by itself; each must give `want`'s tokens, the
/// lone request must have drafted, and every block must be free after. Returns the lone
/// request's statistics.
pub fn assert_runtime_equals(
    target: &Arc<Llama<CpuBackend>>,
    tokenizer: Option<Arc<Tokenizer>>,
    spec: specula::spec::Speculation,
    reqs: &[specula::request::GenerateRequest],
    want: &[Vec<u32>],
    alone: usize,
) -> specula::spec::SpecStats {
    use specula::actors::{collect, Runtime};
    let label = format!("{:?}", spec.tree);
    let h = Runtime::builder().speculation(spec).max_batch(8).build(CpuBackend::new(), target.clone(), tokenizer);
    let h = h.unwrap();
    let outs = block_on(futures::future::join_all(reqs.iter().map(|r| collect(h.generate(r.clone())))));
    for (i, out) in outs.into_iter().enumerate() {
        assert_eq!(out.unwrap().token_ids, want[i], "runtime batch {}, {label}, request {i}", reqs.len());
    }
    let out = block_on(collect(h.generate(reqs[alone].clone()))).unwrap();
    assert_eq!(out.token_ids, want[alone], "runtime batch 1, {label}");
    let stats = out.speculative.expect("speculation statistics");
    eprintln!("{label}, batch 1: {stats:?}");
    assert!(stats.drafted > 0, "{label}: nothing drafted: {stats:?}");
    assert_all_blocks_free(&h);
    stats
}

/// What plain greedy decoding gives each request, one at a time in the engine: the reference
/// every speculative run must equal token for token.
pub fn plain_greedy(engine: &Engine<CpuBackend>, reqs: &[specula::request::GenerateRequest]) -> Vec<Vec<u32>> {
    reqs.iter().map(|r| engine.generate(r, |_, _| {}).unwrap().token_ids).collect()
}

/// A tree shape for a test's table of shapes.
pub fn tree(nodes: usize, top_k: usize, depth: usize) -> Option<specula::spec::TreeShape> {
    Some(specula::spec::TreeShape { nodes, top_k, depth })
}
