//! Every message between the actors, and the events a caller receives. The actix actors'
//! messages are typed `Message`s with their `Result`; the GPU threads receive `StepPlan`s on
//! crossbeam channels. Events know nothing of any wire format.

use std::time::{Duration, Instant};

use actix::Message;
use tokio::sync::{mpsc, oneshot};

use super::error::{DownReason, KvError, StepError};
use crate::core::kv_manager::KvStats;
use crate::core::scheduler::{Fit, Proposal, RowOutcome, StepPlan};
use crate::core::tree::TreeDraft;
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

// Intake's messages.

/// Caller → Intake: a new request, sent with `try_send` (a full mailbox refuses it as
/// overloaded). `span` is the request's tracing span.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Submit {
    pub id: RequestId,
    pub req: GenerateRequest,
    pub events: mpsc::Sender<Event>,
    pub arrived: Instant,
    pub span: tracing::Span,
}

/// Caller → Intake: the caller cancelled or dropped its stream. Sent with `do_send`, which
/// never waits for room: a cancel is never stuck behind submissions.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Cancel(pub RequestId);

/// Streamer → Intake: a stop string ended the request, or its caller is gone.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Ended {
    pub id: RequestId,
    /// The caller stopped reading (rather than a stop string).
    pub caller_gone: bool,
}

/// Verifier → Intake: a step ran (or failed).
#[derive(Debug, Message)]
#[rtype(result = "()")]
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
#[derive(Debug)]
pub struct StepFailure {
    pub error: StepError,
    /// Why no further step can run, if none can: the runtime then goes down.
    pub fatal: Option<DownReason>,
}

impl StepFailure {
    /// A panic caught at the Verifier's boundary, rather than an error the step returned.
    pub fn panicked(&self) -> bool {
        matches!(self.error, StepError::Panicked(_))
    }
}

/// Verifier → Intake, from its thread's last moments: no step will run any more.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ExecutorStopped;

/// Drafter → Intake: the draft model's KV pool, whenever its use changed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct DraftPoolUsage(pub Option<KvStats>);

/// Caller → Intake: a snapshot of the queues and pools.
#[derive(Debug, Message)]
#[rtype(result = "RuntimeStats")]
pub struct GetStats;

/// Caller → Intake: refuse new requests, let the in-flight ones finish until `drain` has
/// passed, fail the rest, then stop every actor; `done` is answered (or dropped) then.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown {
    pub drain: Duration,
    pub done: oneshot::Sender<()>,
}

/// The last `RuntimeHandle` is gone: finish what runs, then stop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct HandlesGone;

// KvAllocator's messages.

/// Intake → KvAllocator: commits, releases and the step's asks in one hop; answered with
/// what fits ("doesn't fit" is a value), or an error if the allocator had to restart.
#[derive(Debug, Message)]
#[rtype(result = "Result<Fit, KvError>")]
pub struct Apply(pub Proposal);

/// Intake → KvAllocator: the target pool's use.
#[derive(Debug, Message)]
#[rtype(result = "KvStats")]
pub struct GetKvStats;

// Streamer's messages.

/// Intake → Streamer: a request was admitted: its subscriber and what detokenizing it needs.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Register {
    pub id: RequestId,
    pub events: mpsc::Sender<Event>,
    pub prompt_tokens: usize,
    pub stop: Vec<String>,
    pub arrived: Instant,
    pub span: tracing::Span,
}

/// Verifier → Streamer: tokens and finishes of one step (rows with nothing to say left out).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StepTokens(pub Vec<RowOutcome>);

/// Intake → Streamer: the request ends without the model saying so.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct End {
    pub id: RequestId,
    pub why: EndReason,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EndReason {
    Cancelled,
    Failed(RequestError),
}

/// Intake → Verifier, or Intake → Drafter → Verifier with speculation (the Drafter fills
/// `RowPlan::draft`): what the GPU threads receive on their crossbeam channels.
pub type VerifyMsg = StepPlan;

/// Verifier → Drafter, when the proposer reads the target's hidden states (EAGLE): those
/// of the positions a step verified. Sent before the step's `StepDone`, so the Drafter has
/// them before the plan that follows.
#[derive(Debug, Default)]
pub struct HiddenStates(pub Vec<RowHidden>);

/// One row's hidden states after the target's final norm: positions `start..` of the
/// request's sequence, `[n, hidden]` row-major.
#[derive(Debug)]
pub struct RowHidden {
    pub id: RequestId,
    pub start: usize,
    pub rows: Vec<f32>,
}

/// Verifier → Drafter, with tree speculation: each tree row's draft and the target's token
/// after each of its nodes. Sent before the step's `StepDone`, so the Drafter has them
/// before the plan that follows: a plan shows the tokens after the accepted path, not the
/// path, which the Drafter takes from here (`accept_tree`), and a proposer learns from
/// every node (`Proposer::tree_verified`: lookahead).
#[derive(Debug, Default)]
pub struct TreeVerdicts(pub Vec<TreeVerdict>);

/// One tree row's draft and the target's token after its root and after each node.
#[derive(Debug)]
pub struct TreeVerdict {
    pub id: RequestId,
    pub draft: TreeDraft,
    pub targets: Vec<u32>,
}

/// Block usage of the target pool and the draft model's pool (with a draft model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvPoolStats {
    pub target: KvStats,
    pub draft: Option<KvStats>,
}

/// A snapshot of the runtime.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RuntimeStats {
    pub running: usize,
    pub waiting: usize,
    pub preemptions: u64,
    pub steps: u64,
    pub kv: KvPoolStats,
    /// The KV cache's storage, bytes per token, size in tokens and attention window.
    pub kv_cache: super::KvCacheInfo,
    /// What decoding steps cost, as the scheduler has measured them: `(fixed, per_token)`
    /// seconds of `fixed + per_token · tokens` (None until enough steps were seen).
    pub step_cost: Option<(f64, f64)>,
}
