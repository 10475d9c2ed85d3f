//! `specula serve`: the runtime behind the WebSocket and OpenAI-compatible HTTP servers.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use specula::actors::Runtime;
use specula::backend::cpu::CpuBackend;
use specula::model::{load_model_with, LoadOptions, ModelSource, WeightDtype};
use specula::server::{self, ServerConfig};

use crate::spec_args::SpecArgs;

#[derive(Args)]
pub struct ServeArgs {
    /// `default` (SmolLM2-135M-Instruct, fetched on first use), a .gguf file, a Hugging Face
    /// folder, or `dummy:<shape>`.
    #[arg(long, default_value = "default", env = "SPECULA_MODEL")]
    model: ModelSource,
    /// Weight precision: `auto` (the checkpoint's own) or `fp8` (projection matrices
    /// quantized at load to FP8 E4M3, one scale per output channel; activations unquantized).
    #[arg(long, value_enum, default_value = "auto")]
    dtype: WeightDtype,
    /// Address to listen on; the default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "SPECULA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model id clients see in /v1/models and send as `model` (default: the file name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most requests decoded together.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Most requests queued before new ones are refused as overloaded (HTTP 503).
    #[arg(long, default_value_t = 1024)]
    max_waiting: usize,
    /// HTTP worker threads (default: one per physical core).
    #[arg(long)]
    workers: Option<usize>,
    #[command(flatten)]
    spec: SpecArgs,
}

pub fn run(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    // The recorder first, so that the runtime's metrics are kept from its first moment.
    server::metrics::install();
    let backend = CpuBackend::new();
    let loaded = load_model_with(&args.model, &LoadOptions::dtype(args.dtype), &backend)?;
    let model_name = args.served_model_name.clone().unwrap_or_else(|| served_name(&loaded.name));
    let model = Arc::new(loaded.model);
    let mut builder = Runtime::builder().max_batch(args.max_batch).max_waiting(args.max_waiting);
    if let Some(spec) = args.spec.speculation(&model, loaded.tokenizer.as_ref(), &|| Ok(CpuBackend::new()))? {
        args.spec.warn_if_synthetic();
        let method = clap::ValueEnum::to_possible_value(&args.spec.spec).map(|v| v.get_name().to_string());
        eprintln!(
            "specula: speculative decoding with --spec {}, up to {} draft tokens",
            method.unwrap_or_default(),
            spec.max_draft
        );
        builder = builder.speculation(spec);
    }
    let handle = builder.build(backend, model, loaded.tokenizer)?;
    let config = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone(),
        model_name: model_name.clone(),
        workers: args.workers,
    };
    actix_web::rt::System::new().block_on(async move {
        let (server, addrs) = server::bind(handle.clone(), &config)?;
        for addr in &addrs {
            eprintln!("specula: serving `{model_name}` on http://{addr} (WebSocket ws://{addr}/v1/ws)");
            if !addr.ip().is_loopback() && config.api_key.is_none() {
                eprintln!(
                    "warning: listening beyond this machine without --api-key: anyone who can reach {addr} can use it"
                );
            }
        }
        server.await?; // until SIGINT / SIGTERM
        eprintln!("specula: stopping; letting requests in flight finish");
        handle.shutdown(Duration::from_secs(10)).await;
        Ok(())
    })
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` → `SmolLM2-135M-Instruct.Q4_1`.
fn served_name(file_name: &str) -> String {
    file_name.strip_suffix(".gguf").unwrap_or(file_name).to_string()
}
