//! The network servers, on actix-web, over a `RuntimeHandle`: the WebSocket protocol at
//! `/v1/ws`, the OpenAI-compatible HTTP API, `/health` and `/metrics`.
//!
//! The servers translate and nothing more: requests are parsed and checked here, run by the
//! runtime, and its events are written back in the client's protocol. A client that goes
//! away drops its event streams, which cancels its requests in the runtime.
//!
//! ```text
//!  GET  /health               200 {"status":"ok"}            (no key needed)
//!  GET  /metrics              Prometheus text format
//!  GET  /v1/models            the served model
//!  POST /v1/completions       OpenAI; "stream": true for SSE
//!  POST /v1/chat/completions  OpenAI; "stream": true for SSE
//!  GET  /v1/ws                WebSocket (docs/websocket.md)
//! ```

pub mod auth;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod params;
pub mod sse;
pub mod ws;

use std::net::SocketAddr;

use actix_web::dev::Server;
use actix_web::{middleware, web, App, HttpRequest, HttpResponse, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::actors::RuntimeHandle;
use error::ServerError;

/// Largest HTTP body accepted (a long prompt fits; larger is refused with 413).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// How the server listens and what it calls itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// With a key set, every route but `/health` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The model id reported by `/v1/models` and checked against requests' `model`.
    pub model_name: String,
    /// HTTP worker threads (each its own event loop); `None` is one per physical core.
    pub workers: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            model_name: "default".into(),
            workers: None,
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
}

/// Registers every route on an app (for `HttpServer` and for tests with `actix_web::test`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
        .route("/health", web::get().to(health))
        .route("/metrics", web::get().to(metrics::route))
        .route("/v1/models", web::get().to(openai::models))
        .route("/v1/completions", web::post().to(openai::completions))
        .route("/v1/chat/completions", web::post().to(openai::chat_completions))
        .route("/v1/ws", web::get().to(ws::route));
}

/// Binds the listening socket and returns the server (to be awaited, inside an actix or
/// tokio runtime) with the addresses it is bound to (port 0 picks a free port).
pub fn bind(handle: RuntimeHandle, config: &ServerConfig) -> std::io::Result<(Server, Vec<SocketAddr>)> {
    let state = web::Data::new(AppState {
        handle,
        model_name: config.model_name.clone(),
        api_key: config.api_key.clone().filter(|k| !k.is_empty()),
        metrics: metrics::install(),
        started: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    });
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(middleware::from_fn(auth::require_key))
            .configure(configure)
            .default_service(web::to(not_found))
    })
    // A client that closes its side of the connection is gone: stop serving it, which
    // drops its handler and with it the request's event stream (cancelling the request),
    // even while a non-streamed answer is still being generated.
    .h1_allow_half_closed(false);
    if let Some(n) = config.workers {
        server = server.workers(n);
    }
    let server = server.bind((config.host.as_str(), config.port))?;
    let addrs = server.addrs();
    Ok((server.run(), addrs))
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ServerError> {
    Err(ServerError::NotFound(format!("{} {}", req.method(), req.path())))
}
