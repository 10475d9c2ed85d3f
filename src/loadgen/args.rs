//! The command line of `specula bench serve`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `--vocab` by default: Llama 2's vocabulary, the smallest of the Llama family (SmolLM2
/// has 49,152 tokens, Llama 3 128,256), so every id is valid for each of them.
pub const DEFAULT_VOCAB: usize = 32_000;

/// Which of the server's doors the requests go through.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `POST /v1/completions` streamed as server-sent events: any OpenAI-compatible server.
    Openai,
    /// Specula's WebSocket, `/v1/ws` (docs/websocket.md).
    Ws,
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Api::Openai => "openai",
            Api::Ws => "ws",
        })
    }
}

/// Where the prompts come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetSource {
    /// Prompts of random common words, lengths drawn from normal distributions.
    Synthetic,
    /// Prompts of random token ids, exactly `input-len` tokens each (give or take
    /// `input-std`), sent as token-id arrays: for servers without a tokenizer (dummy weights).
    RandomIds,
    /// A ShareGPT-style JSON file (`.json`), or a text file with one prompt per line.
    File(PathBuf),
}

impl FromStr for DatasetSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("name `synthetic`, `random-ids` or a file".into()),
            "synthetic" => Ok(DatasetSource::Synthetic),
            "random-ids" => Ok(DatasetSource::RandomIds),
            path => Ok(DatasetSource::File(path.into())),
        }
    }
}

/// One request rate of a sweep: Poisson arrivals at so many per second, or all at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    PerSecond(f64),
    Unlimited,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "inf" {
            return Ok(Rate::Unlimited);
        }
        match s.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSecond(r)),
            Ok(_) => Err("must be a positive number of requests per second, or `inf`".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The load of one run of a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// So many clients, each sending its next request when its last one ended.
    Concurrency(usize),
    /// Poisson arrivals at this many requests per second, whatever is in flight.
    RequestRate(f64),
    /// Every request sent at once.
    AllAtOnce,
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Load::Concurrency(c) => write!(f, "concurrency {c}"),
            Load::RequestRate(r) => write!(f, "rate {r}/s"),
            Load::AllAtOnce => write!(f, "rate inf"),
        }
    }
}

/// The latency the plot draws against output throughput.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlotLatency {
    /// Mean time per output token after the first.
    Tpot,
    /// Median end-to-end request latency.
    E2e,
}

/// `specula bench serve`: load a running server and report its latency and throughput.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeBenchArgs {
    /// The server's base URL, `http://HOST:PORT` (requests go to /v1/completions or /v1/ws).
    #[arg(long)]
    pub url: String,
    /// `openai`: /v1/completions over SSE (any OpenAI-compatible server); `ws`: Specula's
    /// WebSocket.
    #[arg(long, value_enum, default_value = "openai")]
    pub api: Api,
    /// `synthetic`, `random-ids` (random token ids sent as arrays over the OpenAI API: for
    /// servers of dummy weights, which have no tokenizer), a ShareGPT JSON file (`.json`: the
    /// first human turn is the prompt, the answer's length the output length), or a text
    /// file of one prompt per line.
    #[arg(long, default_value = "synthetic")]
    pub dataset: DatasetSource,
    /// Synthetic prompts: mean length in tokens (approximately: one common word a token;
    /// exactly, for `random-ids`).
    #[arg(long, default_value_t = 1024, value_parser = positive)]
    pub input_len: usize,
    /// Synthetic prompts: standard deviation of the length (0: every prompt `input-len`).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub input_std: f64,
    /// Tokens to generate per request, the mean for synthetic prompts (default 128; for
    /// ShareGPT, the recorded answer's length).
    #[arg(long, value_parser = positive)]
    pub output_len: Option<usize>,
    /// Synthetic prompts: standard deviation of the output length.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub output_std: f64,
    /// Requests per run (a file's prompts are taken in order, from the start again if
    /// there are fewer).
    #[arg(long, default_value_t = 100, value_parser = positive)]
    pub num_requests: usize,
    /// With `--concurrency`: a run of C clients sends K x C requests (at least
    /// `num-requests`), so that each level of a sweep reaches a steady state in its time.
    #[arg(long, value_name = "K", value_parser = positive, requires = "concurrency")]
    pub requests_per_client: Option<usize>,
    /// Clients in a closed loop, comma-separated for a sweep (default 1).
    #[arg(long, value_delimiter = ',', value_parser = positive, conflicts_with = "request_rate")]
    pub concurrency: Vec<usize>,
    /// Requests per second (Poisson arrivals) or `inf`, comma-separated for a sweep.
    #[arg(long, value_delimiter = ',')]
    pub request_rate: Vec<Rate>,
    /// With `--request-rate`: most requests in flight; later arrivals wait for a slot.
    #[arg(long, value_parser = positive, requires = "request_rate")]
    pub max_concurrency: Option<usize>,
    /// `random-ids`: token ids are drawn below this (the default is below every Llama
    /// vocabulary's size).
    #[arg(long, default_value_t = DEFAULT_VOCAB, value_parser = positive)]
    pub vocab: usize,
    /// Seed of the synthetic lengths and words and of the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The `model` sent with each OpenAI request (default: the first of the server's
    /// /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "SPECULA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub temperature: f64,
    /// Do not send `ignore_eos: true` (for servers that refuse the field); requests may
    /// then end before `output-len` tokens.
    #[arg(long)]
    pub no_ignore_eos: bool,
    /// Requests sent one by one before the sweep, not measured; if one fails, the
    /// benchmark stops there (a wrong URL, API or model).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Seconds a request may take before it counts as failed.
    #[arg(long, default_value = "600", value_parser = seconds)]
    pub timeout: Duration,
    /// This configuration's name in the report, the JSON and the plot's legend.
    #[arg(long)]
    pub label: Option<String>,
    /// Write every run's figures and the configuration as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw output throughput against latency across the sweep here (`.png` or `.svg`).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// The plot's latency: `tpot` (mean time per output token) or `e2e` (median
    /// end-to-end latency).
    #[arg(long, value_enum, default_value = "tpot")]
    pub plot_latency: PlotLatency,
    /// Earlier `--json` reports to draw on the same plot, comma-separated.
    #[arg(long, value_delimiter = ',', requires = "plot")]
    pub compare: Vec<PathBuf>,
}

impl ServeBenchArgs {
    /// The runs of the sweep, in order.
    pub fn loads(&self) -> Vec<Load> {
        if !self.request_rate.is_empty() {
            let load = |r: &Rate| match *r {
                Rate::PerSecond(r) => Load::RequestRate(r),
                Rate::Unlimited => Load::AllAtOnce,
            };
            return self.request_rate.iter().map(load).collect();
        }
        match self.concurrency.as_slice() {
            [] => vec![Load::Concurrency(1)],
            list => list.iter().map(|&c| Load::Concurrency(c)).collect(),
        }
    }

    /// Requests sent in a run under `load`.
    pub fn requests_for(&self, load: Load) -> usize {
        match (load, self.requests_per_client) {
            (Load::Concurrency(c), Some(k)) => self.num_requests.max(k.saturating_mul(c)),
            _ => self.num_requests,
        }
    }

    /// Requests the dataset must provide: the most of any run (each run takes them from
    /// the start).
    pub fn most_requests(&self) -> usize {
        self.loads().into_iter().map(|l| self.requests_for(l)).max().unwrap_or(self.num_requests)
    }

    /// Output length of a request whose dataset does not give one.
    pub fn default_output_len(&self) -> usize {
        self.output_len.unwrap_or(128)
    }
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x >= 0.0 && x.is_finite() => Ok(x),
        Ok(_) => Err("must be a number at least 0".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Duration::try_from_secs_f64(x).map_err(|e| e.to_string()),
        Ok(_) => Err("must be a positive number of seconds".into()),
        Err(e) => Err(e.to_string()),
    }
}
