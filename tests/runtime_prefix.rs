//! Prefix reuse on the real default model, observed through the `metrics` crate: two
//! requests sharing a 200-token prefix; the second computes only its suffix and its output
//! is unchanged. Its own test binary, so that the process-wide recorder sees this test only.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::executor::block_on;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use specula::actors::metrics as names;
use specula::actors::{collect, Runtime};
use specula::backend::cpu::CpuBackend;
use specula::engine::Engine;
use specula::model::{load_model, ModelSource};
use specula::request::{GenerateRequest, Prompt};

/// A recorder keeping the counters' totals by name (labels ignored).
#[derive(Default)]
struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

struct CounterCell(Arc<AtomicU64>);
impl metrics::CounterFn for CounterCell {
    fn increment(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }
    fn absolute(&self, v: u64) {
        self.0.fetch_max(v, Ordering::Relaxed);
    }
}

impl Counters {
    fn get(&self, name: &str) -> u64 {
        self.0.lock().unwrap().get(name).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl Recorder for &'static Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let cell = self.0.lock().unwrap().entry(key.name().to_string()).or_default().clone();
        Counter::from_arc(Arc::new(CounterCell(cell)))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn a_shared_200_token_prefix_is_computed_once() {
    let Some(path) = common::default_model_path() else { return };
    let counters: &'static Counters = Box::leak(Box::default());
    metrics::set_global_recorder(counters).expect("the only recorder of this binary");

    let load = || load_model(&ModelSource::Path(path.clone()), &CpuBackend::new()).unwrap();
    let (a, b) = (load(), load());
    let tok = a.tokenizer.unwrap();
    let engine = Engine::new(CpuBackend::new(), b.model, b.tokenizer);
    let h = Runtime::builder().build(CpuBackend::new(), a.model, Some(tok)).unwrap();

    let text = "The history of the city begins with a small settlement on the banks of the river, \
                where fishermen and traders met every spring to exchange salt, grain and stories. "
        .repeat(12);
    let ids = engine.tokenizer.as_ref().unwrap().encode(&text, true);
    assert!(ids.len() >= 200, "the text gives {} tokens", ids.len());
    let prefix = &ids[..200];
    let request = |suffix: &str| {
        let s = engine.tokenizer.as_ref().unwrap().encode(suffix, false);
        GenerateRequest { max_tokens: 8, ..GenerateRequest::new(Prompt::Tokens([prefix, &s].concat())) }
    };
    let (first, second) = (request(" Question: what did they trade?"), request(" In summary,"));

    let out1 = block_on(collect(h.generate(first.clone()))).unwrap();
    let (q0, h0) = (counters.get(names::PREFIX_CACHE_QUERIES), counters.get(names::PREFIX_CACHE_HITS));
    let out2 = block_on(collect(h.generate(second.clone()))).unwrap();
    let (q1, h1) = (counters.get(names::PREFIX_CACHE_QUERIES), counters.get(names::PREFIX_CACHE_HITS));

    let second_len = match &second.prompt {
        Prompt::Tokens(t) => t.len() as u64,
        _ => unreachable!(),
    };
    // The first request found nothing; the second found every full block of the prefix
    // (200 tokens = 12 blocks of 16 + 8) and computed only the rest.
    assert_eq!(h0, 0);
    assert_eq!(q1 - q0, second_len);
    assert_eq!(h1 - h0, 192);
    let stats = block_on(h.stats()).unwrap();
    assert_eq!(stats.kv.target.prefix.hits, 192);
    // Outputs are unchanged by the reuse.
    assert_eq!(out1.token_ids, engine.generate(&first, |_, _| {}).unwrap().token_ids);
    assert_eq!(out2.token_ids, engine.generate(&second, |_, _| {}).unwrap().token_ids);
    h.shutdown_blocking(std::time::Duration::from_secs(5));
}
