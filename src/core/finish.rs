//! When a sequence ends: the rules the single-request engine and the runtime both apply.
//!
//! - Token rules (`FinishRules::take`, on a step's new tokens): an end-of-sequence token ends
//!   the sequence and is not part of the output (unless `ignore_eos`); the token that reaches
//!   the length limit (`max_tokens`, or the context: `SeqLimits::reached`) ends it after
//!   itself.
//! - Text rules (`TextOutput`, on each kept token): a stop string ends the output, its text
//!   and anything after it withheld; text held back for a possible stop string is released
//!   at the end unless the output stopped.
//!
//! In the runtime the Verifier applies the token rules (it knows the sequence) and the
//! Streamer the text rules (it owns the text); the engine applies both in its loop.

use super::detokenizer::{Detokenizer, StopCheck, StopMatcher};
use super::lengths::SeqLimits;
use crate::request::FinishReason;

/// The token rules of one request.
#[derive(Debug, Clone, Copy)]
pub struct FinishRules<'a> {
    pub eos: &'a [u32],
    pub ignore_eos: bool,
    pub limits: SeqLimits,
}

/// What the sequence takes of a step's new tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// The first `kept` tokens join the output.
    pub kept: usize,
    pub finish: Option<FinishReason>,
}

impl FinishRules<'_> {
    /// Applies the token rules to `tokens`, new after a sequence of `len` tokens.
    pub fn take(&self, len: usize, tokens: &[u32]) -> Taken {
        for (i, t) in tokens.iter().enumerate() {
            if !self.ignore_eos && self.eos.contains(t) {
                return Taken { kept: i, finish: Some(FinishReason::Stop) };
            }
            if self.limits.reached(len + i + 1) {
                return Taken { kept: i + 1, finish: Some(FinishReason::Length) };
            }
        }
        Taken { kept: tokens.len(), finish: None }
    }
}

/// A request's text as its tokens arrive: incremental detokenizing, then stop strings.
#[derive(Debug)]
pub struct TextOutput {
    detok: Detokenizer,
    stops: StopMatcher,
}

/// The text one token adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextDelta {
    /// Possibly empty, while a character or a possible stop string is incomplete.
    pub text: String,
    /// A stop string ended the output with this token.
    pub stopped: bool,
}

impl TextOutput {
    pub fn new(stop: Vec<String>) -> Self {
        TextOutput { detok: Detokenizer::new(), stops: StopMatcher::new(stop) }
    }

    /// Adds a token; `decode` turns ids into text (None: no tokenizer, so no text).
    pub fn push<D: Fn(&[u32]) -> String>(&mut self, token: u32, decode: Option<D>) -> TextDelta {
        let delta = decode.map_or_else(String::new, |d| self.detok.push(&[token], d));
        match self.stops.push(&delta) {
            StopCheck::Stop(text) => TextDelta { text, stopped: true },
            StopCheck::Continue(text) => TextDelta { text, stopped: false },
        }
    }

    /// The text still held back when the output ends for `reason`: released unless the
    /// output stopped (end of sequence or a stop string).
    pub fn finish(&mut self, reason: FinishReason) -> String {
        match reason {
            FinishReason::Stop => String::new(),
            _ => self.stops.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::lengths::Lengths;
    use proptest::prelude::*;

    const EOS: u32 = 0;

    fn rules(prompt_len: usize, max_tokens: usize, context: usize, ignore_eos: bool) -> FinishRules<'static> {
        let limits = Lengths { context, kv_tokens: usize::MAX, held: None }.admit(prompt_len, max_tokens).unwrap();
        FinishRules { eos: &[EOS], ignore_eos, limits }
    }

    /// The rules applied one token at a time, as a plain loop over the whole output.
    fn one_by_one(r: &FinishRules, prompt_len: usize, output: &[u32]) -> (Vec<u32>, Option<FinishReason>) {
        let mut kept = vec![];
        for &t in output {
            if !r.ignore_eos && t == EOS {
                return (kept, Some(FinishReason::Stop));
            }
            kept.push(t);
            if kept.len() >= r.limits.max_tokens || prompt_len + kept.len() >= r.limits.max_len {
                return (kept, Some(FinishReason::Length));
            }
        }
        (kept, None)
    }

    #[test]
    fn end_of_sequence_is_not_kept_and_the_limit_token_is() {
        let r = rules(10, 3, 100, false);
        assert_eq!(r.take(10, &[5, EOS, 6]), Taken { kept: 1, finish: Some(FinishReason::Stop) });
        assert_eq!(r.take(10, &[5, 6, 7, 8]), Taken { kept: 3, finish: Some(FinishReason::Length) });
        assert_eq!(r.take(11, &[5]), Taken { kept: 1, finish: None });
        let ignoring = rules(10, 3, 100, true);
        assert_eq!(ignoring.take(10, &[EOS, EOS]), Taken { kept: 2, finish: None });
        // The context ends it before max_tokens would.
        assert_eq!(rules(10, 50, 12, false).take(10, &[1, 2, 3]).kept, 2);
    }

    proptest! {
        /// However the output is cut into steps (drafts make steps of several tokens), the
        /// rules keep the same tokens and give the same reason as one token at a time.
        #[test]
        fn steps_of_any_size_end_where_single_tokens_do(
            prompt_len in 1usize..20,
            max_tokens in 1usize..40,
            context in 21usize..60,
            ignore_eos: bool,
            output in proptest::collection::vec(0u32..6, 0..50),
            cuts in proptest::collection::vec(1usize..6, 1..50),
        ) {
            let r = rules(prompt_len, max_tokens, context, ignore_eos);
            let want = one_by_one(&r, prompt_len, &output);
            let (mut kept, mut finish, mut at) = (vec![], None, 0);
            for n in cuts.iter().cycle() {
                if at >= output.len() || finish.is_some() {
                    break;
                }
                let step = &output[at..(at + n).min(output.len())];
                let taken = r.take(prompt_len + kept.len(), step);
                kept.extend_from_slice(&step[..taken.kept]);
                finish = taken.finish;
                at += step.len();
            }
            prop_assert_eq!((kept, finish), want);
        }

        /// Text cut anywhere by a stop string: the output is the text before it, and held
        /// text comes out at the end unless the output stopped.
        #[test]
        fn text_before_a_stop_string_is_emitted_and_nothing_after(
            words in proptest::collection::vec(0u32..4, 1..30),
            stop in "[ab]{1,3}",
        ) {
            let pieces = ["a", "b", "ab", "c"];
            let decode = |ids: &[u32]| ids.iter().map(|&i| pieces[i as usize]).collect::<String>();
            let full = decode(&words);
            let mut out = TextOutput::new(vec![stop.clone()]);
            let mut text = String::new();
            let mut stopped = false;
            for &w in &words {
                let d = out.push(w, Some(decode));
                text.push_str(&d.text);
                if d.stopped {
                    stopped = true;
                    break;
                }
            }
            if !stopped {
                text.push_str(&out.finish(FinishReason::Length));
            }
            match full.find(&stop) {
                Some(at) => prop_assert_eq!((text.as_str(), stopped), (&full[..at], true)),
                None => prop_assert_eq!((text.as_str(), stopped), (full.as_str(), false)),
            }
        }
    }
}
