//! The network servers, on actix-web, over a `RuntimeHandle`: the WebSocket protocol at
//! `/v1/ws`, the OpenAI-compatible HTTP API, `/health` and `/metrics`.
//!
//! The servers translate and nothing more: requests are parsed and checked here, run by the
//! runtime, and its events are written back in the client's protocol. A client that goes
//! away drops its event streams, which cancels its requests in the runtime.
//!
//! ```text
//!  GET  /health               200 {"status":"ok"}, or 503 with the reason  (no key needed)
//!  GET  /metrics              Prometheus text format
//!  GET  /v1/models            the served model
//!  POST /v1/completions       OpenAI; "stream": true for SSE
//!  POST /v1/chat/completions  OpenAI; "stream": true for SSE
//!  GET  /v1/ws                WebSocket (docs/websocket.md)
//! ```
//!
//! What one client may hold (body sizes, read deadlines, connections, WebSocket frames and
//! requests in flight) is bounded by `Limits`. Keep-alive is off: each HTTP connection
//! carries one request, so that the header deadline covers every request (actix applies it
//! to a connection's first request only).

pub mod auth;
pub mod body;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod params;
pub mod sse;
pub mod stop;
pub mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::http::KeepAlive;
use actix_web::{middleware, web, App, HttpRequest, HttpResponse, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::actors::RuntimeHandle;
use auth::KeyError;
use error::ServerError;
use limits::{LimitError, Limits};
pub use stop::Stopper;

/// How the server listens and what it calls itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// With a key set, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The model id reported by `/v1/models` and checked against requests' `model`.
    pub model_name: String,
    /// HTTP worker threads (each its own event loop); `None` is one per available CPU.
    pub workers: Option<usize>,
    pub limits: Limits,
    /// On stopping, how long requests in flight may go on before they are failed.
    pub drain: Duration,
    /// The process's limit on open files, when known (checked against the connection cap).
    pub fd_limit: Option<u64>,
}

impl ServerConfig {
    /// Refuses an API key no client could send and limits that cannot be honoured.
    pub fn check(&self) -> Result<(), StartError> {
        if let Some(key) = &self.api_key {
            auth::check_key(key)?;
        }
        self.limits.check(self.fd_limit)?;
        Ok(())
    }
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            model_name: "default".into(),
            workers: None,
            limits: Limits::default(),
            drain: Duration::from_secs(10),
            fd_limit: None,
        }
    }
}

/// What every handler shares.
pub struct AppState {
    pub handle: RuntimeHandle,
    pub model_name: String,
    pub api_key: Option<String>,
    pub metrics: PrometheusHandle,
    /// Unix seconds at start (`created` of `/v1/models`).
    pub started: u64,
    pub limits: Limits,
    /// Cancelled when the server starts to stop (WebSocket connections then wind down).
    pub stopping: CancellationToken,
}

/// Registers every route on an app (for `HttpServer` and for tests with `actix_web::test`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .route("/metrics", web::get().to(metrics::route))
        .route("/v1/models", web::get().to(openai::models))
        .route("/v1/completions", web::post().to(openai::completions))
        .route("/v1/chat/completions", web::post().to(openai::chat_completions))
        .route("/v1/ws", web::get().to(ws::route));
}

/// A started server: await `server` (inside an actix or tokio runtime) to serve until it
/// stops; `stopper` stops it gracefully.
pub struct Running {
    pub server: Server,
    /// The addresses it listens on (port 0 picks a free port).
    pub addrs: Vec<SocketAddr>,
    pub stopper: Stopper,
}

/// Checks the configuration and binds the listening socket. The server handles no signals:
/// the caller decides when to call `stopper.stop`.
pub fn bind(handle: RuntimeHandle, config: &ServerConfig) -> Result<Running, StartError> {
    config.check()?;
    let limits = config.limits.clone();
    let stopping = CancellationToken::new();
    let state = web::Data::new(AppState {
        handle: handle.clone(),
        model_name: config.model_name.clone(),
        api_key: config.api_key.clone(),
        metrics: metrics::install(),
        started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        limits: limits.clone(),
        stopping: stopping.clone(),
    });
    let workers = config.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let send_timeout = limits.send_timeout;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(middleware::from_fn(auth::require_key))
            .wrap(middleware::from_fn(body::keep_unread_body))
            .configure(configure)
            .default_service(web::to(not_found))
    })
    // A client that closes its side of the connection is gone: stop serving it, which
    // drops its handler and with it the request's event stream (cancelling the request),
    // even while a non-streamed answer is still being generated.
    .h1_allow_half_closed(false)
    .on_connect(move |connection, _| limits::set_send_timeout(connection, send_timeout))
    .keep_alive(KeepAlive::Disabled)
    .client_request_timeout(limits.header_timeout)
    .workers(workers)
    // actix counts connections per worker.
    .max_connections((limits.max_connections / workers).max(1))
    // Time for the last frames to reach clients once the runtime has drained.
    .shutdown_timeout((config.drain + STOP_GRACE).as_secs().max(1))
    .disable_signals();
    let addr = format!("{}:{}", config.host, config.port);
    let server =
        server.bind((config.host.as_str(), config.port)).map_err(|source| StartError::Bind { addr, source })?;
    let addrs = server.addrs();
    let server = server.run();
    let stopper = Stopper::new(server.handle(), handle, stopping);
    Ok(Running { server, addrs, stopper })
}

/// How long past the drain time connections have to receive their last frames.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// 200 while the runtime serves; 503 with the reason once it cannot (its model executor
/// failed beyond recovery), so that a load balancer stops sending it requests.
async fn health(state: web::Data<AppState>) -> HttpResponse {
    match state.handle.health() {
        Ok(()) => HttpResponse::Ok().json(json!({ "status": "ok" })),
        Err(reason) => HttpResponse::ServiceUnavailable().json(json!({ "status": "unavailable", "reason": reason })),
    }
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ServerError> {
    Err(ServerError::NotFound(format!("{} {}", req.method(), req.path())))
}
