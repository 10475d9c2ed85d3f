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
