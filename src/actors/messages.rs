//! Every message between the actors, and the events a caller receives. Commands that need
//! an answer carry a oneshot; events know nothing of any wire format.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::core::kv_manager::KvStats;
use crate::core::scheduler::{Fit, Proposal, RowOutcome, StepPlan};
use crate::request::{FinishReason, GenerateRequest, RequestError, RequestId, Usage};
use crate::spec::SpecStats;

/// What a caller's stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New tokens and the text they complete (possibly empty while a character or a
    /// possible stop string is incomplete).
    Token { ids: Vec<u32>, text: String },
    /// The last event of a request that ran; `speculative` when the runtime speculates.
    Done { finish: FinishReason, usage: Usage, speculative: Option<SpecStats> },
    /// The last event of a request that was refused or failed.
    Error(RequestError),
}

/// Caller → Intake: a new request.
#[derive(Debug)]
pub struct Submit {
    pub id: RequestId,
    pub req: GenerateRequest,
    pub events: mpsc::Sender<Event>,
    pub arrived: Instant,
}

/// Caller / Streamer → Intake: control, on its own lane so that it is never stuck behind
/// submissions.
#[derive(Debug)]
pub enum Control {
    /// The caller dropped its stream.
    Cancel(RequestId),
    /// The Streamer finished the request (a stop string): free it.
    Stopped(RequestId),
    Stats(oneshot::Sender<RuntimeStats>),
    /// Refuse new requests, let the in-flight ones finish until `drain` has passed, fail the
    /// rest, then stop every actor; answered when done.
    Shutdown {
        drain: Duration,
        done: oneshot::Sender<()>,
    },
}

/// Intake → KvAllocator.
#[derive(Debug)]
pub enum KvMsg {
    /// Commits, releases and the step's asks in one hop; answered with what fits.
    Apply {
        proposal: Proposal,
        reply: oneshot::Sender<Fit>,
    },
    Stats {
        reply: oneshot::Sender<KvPoolStats>,
    },
}

/// Block usage of the target pool and the draft model's pool (with a draft model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvPoolStats {
    pub target: KvStats,
    pub draft: Option<KvStats>,
}

/// Verifier → Intake: a step ran (or failed).
#[derive(Debug)]
pub struct StepDone {
    pub step: u64,
    pub result: Result<Vec<RowOutcome>, StepFailure>,
    /// The plan's query tokens (drafts included) and the seconds its forward took; whether
    /// every row decoded (no prompt chunks, whose cost per token is another matter).
    pub tokens: usize,
    pub decode_only: bool,
    pub seconds: f64,
    /// Draft tokens in the plan, and the seconds spent drafting them.
    pub drafted: usize,
    pub draft_seconds: f64,
}

/// A step that failed: its requests fail, and the runtime serves on unless `fatal` says
/// the executor cannot.
#[derive(Debug, Clone, PartialEq)]
pub struct StepFailure {
    pub message: String,
    /// A panic caught at the Verifier's boundary, rather than an error the step returned.
    pub panicked: bool,
    /// Why no further step can run, if none can: the runtime then goes down.
    pub fatal: Option<String>,
}

/// Intake / Verifier → Streamer.
#[derive(Debug)]
pub enum StreamMsg {
    /// A request was admitted: its subscriber and what detokenizing it needs.
    Register { id: RequestId, events: mpsc::Sender<Event>, prompt_tokens: usize, stop: Vec<String>, arrived: Instant },
    /// Tokens and finishes of one step (rows with nothing to say are left out).
    Step(Vec<RowOutcome>),
    /// The request ends without the model saying so (cancelled, or failed).
    End { id: RequestId, why: EndReason },
}

#[derive(Debug, Clone, PartialEq)]
pub enum EndReason {
    Cancelled,
    Failed(RequestError),
}

/// Intake → Verifier, or Intake → Drafter → Verifier with speculation (the Drafter fills
/// `RowPlan::draft`).
pub type VerifyMsg = StepPlan;

/// A snapshot of the runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RuntimeStats {
    pub running: usize,
    pub waiting: usize,
    pub preemptions: u64,
    pub steps: u64,
    pub kv: KvPoolStats,
    /// What decoding steps cost, as the scheduler has measured them: `(fixed, per_token)`
    /// seconds of `fixed + per_token · tokens` (None until enough steps were seen).
    pub step_cost: Option<(f64, f64)>,
}
