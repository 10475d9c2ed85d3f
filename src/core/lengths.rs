//! Every length rule a request meets, in one place: the model's context, the KV pool, the
//! drafts of speculative decoding, and the token budget of one step.
//!
//! ```text
//!  position  0              prompt_len                         max_len        context
//!            |---- prompt ----|------ generated (≤ max_tokens) ----|               |
//!                                         | row | drafts |  ← never past max_len
//! ```
//!
//! - Before it is tokenized, a prompt of more than `context × bytes per token` bytes is
//!   refused (`PromptTooLarge`): no tokenization of it could fit.
//! - A prompt holds 1 to `context − 1` tokens, so that at least one token is generated;
//!   longer is `PromptTooLong` (`context_length_exceeded`).
//! - The sequence ends at `max_len = min(prompt_len + max_tokens, context)`: a `max_tokens`
//!   beyond the context is clamped to it (never summed with wrap-around).
//! - The whole sequence must fit in the KV pool on its own, or it could never run
//!   (`ExceedsKvCapacity`). With an attention window a sequence holds at most its sink
//!   blocks and its window's (`window_held`), and the context is `WINDOWED_CONTEXT`:
//!   positions keep counting past the model's own context.
//! - A decoding row of `n` tokens carries at most `max_len − n − 1` drafts: verifying them
//!   emits one token more than it accepts.
//! - A step computes at most its token budget: a prompt longer than that is prefilled in
//!   chunks, and only the chunk reaching the end of the sequence wants logits (the others
//!   want none: the forward then skips the head).

use crate::request::RequestError;
use crate::tensor::AttnWindow;

/// The longest sequence under an attention window: positions are `u32`, and a sequence
/// of 2³⁰ tokens is far past any use.
pub const WINDOWED_CONTEXT: usize = 1 << 30;

/// What a request is checked against: the model's context and the KV pool's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lengths {
    pub context: usize,
    /// Tokens the whole KV pool holds.
    pub kv_tokens: usize,
    /// The most tokens one sequence holds in the pool at once, when that is less than its
    /// length (an attention window: `window_held`).
    pub held: Option<usize>,
}

/// Tokens (whole blocks) a sequence holds at most under `window` when a step brings up to
/// `step_tokens` tokens: its sink blocks, and the blocks from the oldest position its first
/// query reads to the last one the step writes.
pub fn window_held(window: AttnWindow, block_size: usize, step_tokens: usize) -> usize {
    let sinks = window.sinks().div_ceil(block_size);
    let recent = (window.size() + step_tokens - 1) / block_size + 2;
    (sinks + recent) * block_size
}

/// One admitted request's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqLimits {
    pub prompt_len: usize,
    /// Tokens it may generate: the asked `max_tokens`, clamped to the context.
    pub max_tokens: usize,
    /// The sequence (prompt and output) never grows past this.
    pub max_len: usize,
}

impl Lengths {
    /// Whether a text of `bytes` bytes could fit in the context, before tokenizing it, when
    /// no token stands for more than `bytes_per_token` bytes.
    pub fn check_prompt_bytes(&self, bytes: usize, bytes_per_token: usize) -> Result<(), RequestError> {
        let max_bytes = self.context.saturating_mul(bytes_per_token);
        if bytes > max_bytes {
            return Err(RequestError::PromptTooLarge { bytes, max_bytes, context: self.context });
        }
        Ok(())
    }

    /// Whether a prompt of `prompt_len` tokens leaves room for a generated token.
    pub fn check_prompt(&self, prompt_len: usize) -> Result<(), RequestError> {
        if prompt_len == 0 {
            return Err(RequestError::EmptyPrompt);
        }
        if prompt_len >= self.context {
            return Err(RequestError::PromptTooLong { tokens: prompt_len, context: self.context });
        }
        Ok(())
    }

    /// The limits of a request with this prompt and `max_tokens`, or why it can never run.
    pub fn admit(&self, prompt_len: usize, max_tokens: usize) -> Result<SeqLimits, RequestError> {
        if max_tokens == 0 {
            return Err(RequestError::ZeroMaxTokens);
        }
        self.check_prompt(prompt_len)?;
        let max_len = prompt_len.saturating_add(max_tokens).min(self.context);
        let held = self.held.map_or(max_len, |h| h.min(max_len));
        if held > self.kv_tokens {
            return Err(RequestError::ExceedsKvCapacity { tokens: held, capacity: self.kv_tokens });
        }
        Ok(SeqLimits { prompt_len, max_tokens: max_len - prompt_len, max_len })
    }
}

impl SeqLimits {
    /// Where the sequence ends: `max_len`, or earlier if `max_tokens` says so (the same
    /// for limits from `Lengths::admit`, which clamps `max_tokens`).
    fn end(&self) -> usize {
        self.max_len.min(self.prompt_len.saturating_add(self.max_tokens))
    }

    /// Draft tokens a decoding row may carry when the sequence holds `seq_len` tokens.
    pub fn draft_room(&self, seq_len: usize) -> usize {
        self.end().saturating_sub(seq_len + 1)
    }

    /// Whether a sequence of `len` tokens has reached its length limit.
    pub fn reached(&self, len: usize) -> bool {
        len >= self.end()
    }
}

/// Tokens a row computes in a step: those not yet computed plus its drafts, within what is
/// left of the step's budget (a prompt longer than the budget is prefilled in chunks).
pub fn row_tokens(uncomputed: usize, drafts: usize, budget_left: usize) -> usize {
    (uncomputed + drafts).min(budget_left)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Lengths = Lengths { context: 100, kv_tokens: 1000, held: None };

    #[test]
    fn prompts_leave_room_for_one_token() {
        assert_eq!(L.check_prompt(0), Err(RequestError::EmptyPrompt));
        assert_eq!(L.check_prompt(99), Ok(()));
        assert_eq!(L.check_prompt(100), Err(RequestError::PromptTooLong { tokens: 100, context: 100 }));
        assert_eq!(L.admit(99, 5).map(|s| (s.max_tokens, s.max_len)), Ok((1, 100)));
    }

    #[test]
    fn a_text_the_context_could_never_hold_is_refused_by_its_size() {
        assert_eq!(L.check_prompt_bytes(1600, 16), Ok(()));
        let err = L.check_prompt_bytes(1601, 16).unwrap_err();
        assert_eq!(err, RequestError::PromptTooLarge { bytes: 1601, max_bytes: 1600, context: 100 });
    }

    #[test]
    fn max_tokens_is_clamped_to_the_context_never_wrapped() {
        for max_tokens in [91, 1000, usize::MAX - 8, usize::MAX - 9, usize::MAX] {
            let s = L.admit(10, max_tokens).unwrap();
            assert_eq!((s.max_tokens, s.max_len), (90, 100), "max_tokens {max_tokens}");
        }
        assert_eq!(L.admit(10, 0), Err(RequestError::ZeroMaxTokens));
    }

    #[test]
    fn a_request_larger_than_the_pool_could_never_run() {
        let small = Lengths { context: 100, kv_tokens: 32, held: None };
        assert_eq!(small.admit(10, 22).map(|s| s.max_len), Ok(32));
        assert_eq!(small.admit(10, 23), Err(RequestError::ExceedsKvCapacity { tokens: 33, capacity: 32 }));
    }

    #[test]
    fn a_windowed_sequence_needs_room_for_its_window_only() {
        let w = AttnWindow::new(32, 4).unwrap();
        // One sink block, then blocks for 32 + 16 - 1 positions, plus two partial ones.
        assert_eq!(window_held(w, 16, 16), (1 + 2 + 2) * 16);
        let windowed = Lengths { context: WINDOWED_CONTEXT, kv_tokens: 80, held: Some(window_held(w, 16, 16)) };
        assert_eq!(windowed.admit(10, 100_000).map(|s| s.max_len), Ok(100_010));
        let small = Lengths { kv_tokens: 79, ..windowed };
        assert_eq!(small.admit(10, 100_000), Err(RequestError::ExceedsKvCapacity { tokens: 80, capacity: 79 }));
    }

    #[test]
    fn drafts_stop_one_short_of_the_end() {
        let s = L.admit(10, 5).unwrap(); // max_len 15
        assert_eq!((s.draft_room(11), s.draft_room(14), s.draft_room(15)), (3, 0, 0));
        assert!(!s.reached(14) && s.reached(15));
        assert_eq!((row_tokens(1, 3, 512), row_tokens(700, 0, 512), row_tokens(1, 3, 2)), (4, 512, 2));
    }
}
