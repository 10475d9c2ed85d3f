//! `specula serve`: the runtime behind the WebSocket and OpenAI-compatible HTTP servers,
//! until SIGTERM or Ctrl-C stops it gracefully.

use std::time::Duration;

use clap::Args;

use specula::actors::Runtime;
use specula::cli::{start_runtime, ModelArgs, SpecArgs};
use specula::server::limits::{self, Limits};
use specula::server::{self, ServerConfig};
use specula::spec::SpecMethod;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on; the default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health (visible ASCII, no
    /// spaces; checked at start, without echoing the key).
    #[arg(long, env = "SPECULA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model id clients see in /v1/models and send as `model` (default: the file name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most requests decoded together.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    max_batch: usize,
    /// Most requests queued before new ones are refused as overloaded (HTTP 503).
    #[arg(long, default_value_t = 1024, value_parser = positive)]
    max_waiting: usize,
    /// HTTP worker threads (default: one per CPU).
    #[arg(long, value_parser = positive)]
    workers: Option<usize>,
    /// On SIGTERM or Ctrl-C, seconds the requests in flight may go on before they are failed.
    #[arg(long, default_value = "10", value_parser = seconds)]
    drain_timeout: Duration,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    spec: SpecArgs,
}

/// What one client may hold (`specula::server::limits`).
#[derive(Args)]
struct LimitArgs {
    /// Largest HTTP request body, in bytes (beyond: 413).
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Seconds a request's headers may take to arrive (beyond: 408).
    #[arg(long, default_value = "5", value_parser = seconds)]
    header_timeout: Duration,
    /// Seconds a request's body, or a WebSocket message, may take to arrive (beyond: 408, or
    /// WebSocket close 1008).
    #[arg(long, default_value = "30", value_parser = seconds)]
    body_timeout: Duration,
    /// Largest WebSocket frame or message, in bytes (beyond: close 1009, at the frame's header).
    #[arg(long, default_value_t = Limits::default().ws_max_frame_bytes)]
    ws_max_frame_bytes: usize,
    /// Most requests in flight on one WebSocket connection (beyond: `too_many_in_flight`).
    #[arg(long, default_value_t = Limits::default().ws_max_in_flight)]
    ws_max_in_flight: usize,
    /// Most connections open at once (default: 1024, or fewer when the limit on open files,
    /// `ulimit -n`, is lower); beyond it new connections wait to be accepted.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Seconds a client may leave what it is sent unread (once the buffers for it are full)
    /// before it is disconnected.
    #[arg(long, default_value = "30", value_parser = seconds)]
    send_timeout: Duration,
}

impl LimitArgs {
    fn limits(&self, fd_limit: Option<u64>) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            ws_max_frame_bytes: self.ws_max_frame_bytes,
            ws_max_in_flight: self.ws_max_in_flight,
            max_connections: self.max_connections.unwrap_or_else(|| limits::default_max_connections(fd_limit)),
            send_timeout: self.send_timeout,
        }
    }
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A positive number of seconds (`30`, `2.5`).
fn seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Duration::try_from_secs_f64(x).map_err(|e| e.to_string()),
        Ok(_) => Err("must be a positive number of seconds".into()),
        Err(e) => Err(e.to_string()),
    }
}

pub fn run(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    // The recorder first, so that the runtime's metrics are kept from its first moment.
    server::metrics::install();
    let fd_limit = limits::raise_fd_limit();
    let mut config = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone(),
        model_name: String::new(),
        workers: args.workers,
        limits: args.limits.limits(fd_limit),
        drain: args.drain_timeout,
        fd_limit,
    };
    // Before the model loads, so that a bad setting is reported at once.
    config.check()?;
    eprintln!("specula: running on the {}", args.model.backend.resolve());
    let builder = Runtime::builder().max_batch(args.max_batch).max_waiting(args.max_waiting);
    let started = start_runtime(&args.model, &args.spec, builder)?;
    if args.spec.spec != SpecMethod::None {
        let method = clap::ValueEnum::to_possible_value(&args.spec.spec).map(|v| v.get_name().to_string());
        let (method, k) = (method.unwrap_or_default(), args.spec.draft_len);
        eprintln!("specula: speculative decoding with --spec {method}, up to {k} draft tokens");
    }
    let handle = started.handle;
    config.model_name = args.served_model_name.clone().unwrap_or_else(|| served_name(&started.name));
    actix_web::rt::System::new().block_on(async move {
        let running = server::bind(handle.clone(), &config)?;
        for addr in &running.addrs {
            eprintln!("specula: serving `{}` on http://{addr} (WebSocket ws://{addr}/v1/ws)", config.model_name);
            if !addr.ip().is_loopback() && config.api_key.is_none() {
                eprintln!(
                    "warning: listening beyond this machine without --api-key: anyone who can reach {addr} can use it"
                );
            }
        }
        let (stopper, drain) = (running.stopper.clone(), config.drain);
        actix_web::rt::spawn(async move {
            let Ok(signal) = stop_signal().await else { return };
            eprintln!(
                "specula: {signal}: stopping; requests in flight have {} s to finish (again to stop at once)",
                drain.as_secs_f64()
            );
            actix_web::rt::spawn(async {
                if stop_signal().await.is_ok() {
                    eprintln!("specula: stopping at once");
                    std::process::exit(130);
                }
            });
            stopper.stop(drain).await;
        });
        running.server.await?;
        // A no-op after a stop; otherwise (the server ended by itself) the runtime drains.
        handle.shutdown(drain).await;
        eprintln!("specula: stopped");
        Ok(())
    })
}

/// The first SIGTERM or SIGINT (Ctrl-C), by name.
async fn stop_signal() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map(|()| "Ctrl-C")
    }
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct.Q4_1`.
fn served_name(file_name: &str) -> String {
    file_name.strip_suffix(".gguf").unwrap_or(file_name).to_string()
}
