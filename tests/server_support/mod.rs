//! One real server per test binary: the default model, the actor runtime and the actix-web
//! server on a free loopback port, in a background thread that lives as long as the tests.
//! Tests talk to it over the network with real clients.

#![allow(dead_code)]

pub mod paced;
pub mod process;
pub mod raw;

use std::net::SocketAddr;
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use specula::actors::{Runtime, RuntimeBuilder, RuntimeHandle};
use specula::backend::cpu::CpuBackend;
use specula::model::{load_model, ModelSource};
use specula::server::{self, ServerConfig};

pub const API_KEY: &str = "test-key-0123";
pub const MODEL: &str = "smollm2-test";

pub struct TestServer {
    pub addr: SocketAddr,
    pub handle: RuntimeHandle,
    pub stopper: server::Stopper,
}

impl TestServer {
    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    pub fn ws(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }
    pub fn bearer(&self) -> String {
        format!("Bearer {API_KEY}")
    }

    /// Waits until no request runs or waits and no KV block is in use: what a cancelled or
    /// abandoned request must come back to. Panics after `limit`.
    pub async fn wait_idle(&self, limit: Duration) {
        let start = Instant::now();
        loop {
            let s = self.handle.stats().await.expect("runtime alive");
            if s.running == 0 && s.waiting == 0 && s.kv.target.used == 0 {
                return;
            }
            assert!(start.elapsed() < limit, "the runtime is still busy after {limit:?}: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The shared server, started on first use.
pub fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(Runtime::builder().max_batch(8), Some(API_KEY)))
}

/// Starts a server of its own around a runtime built by `runtime` on the default model, on a
/// free loopback port.
pub fn start(runtime: RuntimeBuilder, api_key: Option<&str>) -> TestServer {
    let config = ServerConfig { api_key: api_key.map(str::to_string), ..config() };
    start_with(config, move || {
        let backend = CpuBackend::new();
        let loaded = load_model(&ModelSource::Path(specula::cli::default_model_path().unwrap()), &backend)
            .expect("the default model loads");
        runtime.build(backend, loaded.model, loaded.tokenizer).expect("runtime")
    })
}

/// A server around the paced runtime (no model; `step` per step, 8 rows, 64 waiting).
pub fn start_paced(step: Duration, config: ServerConfig) -> TestServer {
    start_with(config, move || paced::runtime(step, 8, 64))
}

/// The test servers' configuration: loopback, a free port, one worker.
pub fn config() -> ServerConfig {
    ServerConfig { host: "127.0.0.1".into(), port: 0, model_name: MODEL.into(), workers: Some(1), ..Default::default() }
}

/// Starts a server with `config` around the runtime `runtime` builds, in a thread of its own.
pub fn start_with(config: ServerConfig, runtime: impl FnOnce() -> RuntimeHandle + Send + 'static) -> TestServer {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        server::metrics::install();
        let handle = runtime();
        actix_web::rt::System::new().block_on(async move {
            let running = server::bind(handle.clone(), &config).expect("bind");
            tx.send(TestServer { addr: running.addrs[0], handle, stopper: running.stopper }).unwrap();
            running.server.await.unwrap();
        });
    });
    rx.recv_timeout(Duration::from_secs(300)).expect("the test server starts")
}

/// Tests of one binary run one at a time: some check that the runtime comes back to idle,
/// which only means something when nothing else is running.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
