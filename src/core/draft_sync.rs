//! Keeping a drafter's copy of a sequence in line with the target's, for the runtime's
//! Drafter and the single-request engine alike.
//!
//! ```text
//!  the proposer holds:   | history (as last seen) | ahead (proposed, unverified) |
//!  the target now has:   | verified (computed)          | new tokens |
//!                         ^^^^^^^^^ common prefix ^^^^^^^
//! ```
//! The target verified the first `computed` tokens of what the proposer assumed (history,
//! then its own drafts, accepted) and then added new tokens of its own. If those new tokens
//! are what the proposer had ahead, everything it proposed still stands; otherwise it rolls
//! back to the common prefix and re-feeds the rest from the new history.

/// What becomes of the tokens proposed ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// The target followed them: their first `skip` are history now, the rest stay ahead.
    Kept { skip: usize },
    /// It did not: roll the proposer back to its first `rollback_to` tokens (a prefix of the
    /// new history) and drop what was ahead.
    Dropped { rollback_to: usize },
}

/// The drafter's sequence after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    /// The sequence as the target has it: verified tokens, then its new ones.
    pub history: Vec<u32>,
    pub ahead: Ahead,
}

/// Brings a drafter's `history` and the tokens it proposed `ahead` of it in line with a
/// target that verified `computed` tokens of them and then produced `new` tokens.
pub fn resync(history: &[u32], ahead: &[u32], computed: usize, new: &[u32]) -> Resync {
    let assumed = history.len() + ahead.len();
    let at = |i: usize| if i < history.len() { history[i] } else { ahead[i - history.len()] };
    // Accepted drafts are the proposer's own tokens: never more than it assumed.
    let computed = computed.min(assumed);
    let same = new.iter().enumerate().take_while(|&(i, &t)| computed + i < assumed && at(computed + i) == t).count();
    let mut now: Vec<u32> = (0..computed).map(at).collect();
    now.extend_from_slice(new);
    let ahead = if same == new.len() && now.len() >= history.len() {
        Ahead::Kept { skip: now.len() - history.len() }
    } else {
        Ahead::Dropped { rollback_to: computed + same }
    };
    Resync { history: now, ahead }
}

/// Where a proposer that holds `held` rolls back to when its request is (re)admitted with
/// `prefix` as the verified sequence: what the two share.
pub fn readmit(held: &[u32], prefix: &[u32]) -> usize {
    held.iter().zip(prefix).take_while(|(a, b)| a == b).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepted_drafts_keep_the_rest_and_a_rejection_rolls_back() {
        // History 1 2 3, proposed 4 5 6 7 ahead (a draft 4 5, then a pre-draft 6 7).
        let (h, a) = ([1, 2, 3], [4, 5, 6, 7]);
        // Both drafts accepted and the target's token is the guess 6: 7 is still ahead.
        assert_eq!(resync(&h, &a, 5, &[6]), Resync { history: vec![1, 2, 3, 4, 5, 6], ahead: Ahead::Kept { skip: 3 } });
        // The second draft rejected, the target says 9: back to 1 2 3 4.
        assert_eq!(
            resync(&h, &a, 4, &[9]),
            Resync { history: vec![1, 2, 3, 4, 9], ahead: Ahead::Dropped { rollback_to: 4 } }
        );
        // Everything accepted with nothing more ahead (the engine's case).
        assert_eq!(resync(&h, &a[..2], 5, &[8]).ahead, Ahead::Dropped { rollback_to: 5 });
        assert_eq!(readmit(&[1, 2, 3, 4], &[1, 2, 9]), 2);
    }

    proptest! {
        /// The proposer's sequence (history, then ahead) after the resync is the new history
        /// followed by what stays ahead; or, rolled back, the longest prefix it shares with
        /// the new history, so that re-feeding the rest makes the two equal.
        #[test]
        fn the_proposer_ends_in_line_with_the_target(
            history in proptest::collection::vec(0u32..3, 0..12),
            ahead in proptest::collection::vec(0u32..3, 0..8),
            computed in 0usize..24,
            new in proptest::collection::vec(0u32..3, 0..4),
        ) {
            let held: Vec<u32> = history.iter().chain(&ahead).copied().collect();
            let r = resync(&history, &ahead, computed, &new);
            let verified = computed.min(held.len());
            prop_assert_eq!(&r.history[..verified], &held[..verified]);
            prop_assert_eq!(&r.history[verified..], new.as_slice());
            match r.ahead {
                Ahead::Kept { skip } => {
                    prop_assert_eq!(history.len() + skip, r.history.len());
                    prop_assert!(skip <= ahead.len());
                    let still: Vec<u32> = r.history.iter().chain(&ahead[skip..]).copied().collect();
                    prop_assert_eq!(still, held);
                }
                Ahead::Dropped { rollback_to } => {
                    prop_assert_eq!(rollback_to, readmit(&held, &r.history));
                    prop_assert!(rollback_to <= r.history.len());
                }
            }
        }
    }
}
