//! Admission off the actors' thread. Applying the chat template and tokenizing a prompt run
//! on a small, bounded pool of blocking threads, so that a long prompt never stalls the
//! actors (and with them every stream). A prompt the context could never hold is refused by
//! its size in bytes before any of that (`Lengths::check_prompt_bytes`).
//!
//! ```text
//!  Intake ── start(Submit) ──▶ task: wait for one of TOKENIZE_THREADS permits
//!    ▲                              └─ spawn_blocking: template, tokenize, check lengths
//!    └──── Admitted { submit, result } (an Intake message) ◀──┘
//! ```
//! Token-id prompts need no tokenizer and are admitted at once, in arrival order.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use actix::{Addr, Message};
use tokio::sync::Semaphore;

use super::intake::{Intake, Limits};
use super::messages::Submit;
use super::verifier::panic_message;
use crate::core::scheduler::SeqParams;
use crate::model::Tokenizer;
use crate::prompt::tokenize_prompt;
use crate::request::{Prompt, RequestError};

/// Prompts tokenized at once: enough to keep up with arrivals, few enough to leave the
/// cores to the model.
pub const TOKENIZE_THREADS: usize = 2;

/// A request's prompt and the parameters the model side needs, or why it was refused.
pub type Admission = Result<(Vec<u32>, Arc<SeqParams>), RequestError>;

/// Admission pool → Intake: a request whose admission finished on the pool.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Admitted {
    pub submit: Submit,
    pub result: Admission,
}

/// Validates and tokenizes; every refusal is a typed error. Runs anywhere: on the pool for
/// text and chat prompts, inline for token ids.
pub fn admit(tokenizer: Option<&Tokenizer>, limits: &Limits, s: &Submit) -> Admission {
    let req = &s.req;
    req.sampling.validate().map_err(RequestError::InvalidSampling)?;
    if req.max_tokens == 0 {
        return Err(RequestError::ZeroMaxTokens);
    }
    let prompt = tokenize_prompt(tokenizer, &req.prompt, limits.vocab, &limits.lengths)?;
    let seq = limits.lengths.admit(prompt.len(), req.max_tokens)?;
    let params = SeqParams { sampling: req.sampling.clone(), limits: seq, ignore_eos: req.ignore_eos };
    Ok((prompt, Arc::new(params)))
}

/// The pool: at most `TOKENIZE_THREADS` prompts tokenized at once and `capacity` admissions
/// under way; beyond that Intake holds further submissions (as many again) and refuses the
/// rest as overloaded.
pub struct Pool {
    tokenizer: Option<Arc<Tokenizer>>,
    limits: Arc<Limits>,
    permits: Arc<Semaphore>,
    under_way: usize,
    capacity: usize,
}

impl Pool {
    pub fn new(tokenizer: Option<Arc<Tokenizer>>, limits: Limits, capacity: usize) -> Self {
        let permits = Arc::new(Semaphore::new(TOKENIZE_THREADS));
        Pool { tokenizer, limits: Arc::new(limits), permits, under_way: 0, capacity: capacity.max(1) }
    }

    /// Whether another admission may start.
    pub fn has_room(&self) -> bool {
        self.under_way < self.capacity
    }

    /// Admissions started and not yet taken back with `finished`.
    pub fn under_way(&self) -> usize {
        self.under_way
    }

    /// Admits a token-id prompt at once (`Some`), or starts admitting a text or chat prompt
    /// on the pool (`None`): its `Admitted` is sent to `intake`.
    pub fn start(&mut self, s: Submit, intake: Addr<Intake>) -> Option<(Submit, Admission)> {
        if matches!(s.req.prompt, Prompt::Tokens(_)) {
            let result = admit(None, &self.limits, &s);
            return Some((s, result));
        }
        self.under_way += 1;
        let (tokenizer, limits) = (self.tokenizer.clone(), self.limits.clone());
        let permits = self.permits.clone();
        tokio::spawn(async move {
            // The semaphore is never closed: a permit always comes.
            let _permit = permits.acquire_owned().await;
            let work = tokio::task::spawn_blocking(move || {
                // A tokenizer that panics refuses this request only.
                let result = catch_unwind(AssertUnwindSafe(|| admit(tokenizer.as_deref(), &limits, &s)))
                    .unwrap_or_else(|p| {
                        Err(RequestError::Internal(format!("tokenizing panicked: {}", panic_message(p.as_ref()))))
                    });
                Admitted { submit: s, result }
            });
            if let Ok(admitted) = work.await {
                intake.do_send(admitted); // one per admission under way: bounded by the pool
            }
        });
        None
    }

    /// An `Admitted` came back.
    pub fn finished(&mut self) {
        self.under_way = self.under_way.saturating_sub(1);
    }
}
