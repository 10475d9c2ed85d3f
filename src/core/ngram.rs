//! Prompt lookup decoding: propose the tokens that followed the last occurrence of the
//! sequence's most recent n-gram. No model: it pays off when the output repeats the input
//! (editing, summarising, code).

/// Proposes up to `k` tokens for `history` (prompt + output), trying n-grams from
/// `max_n` down to `min_n` tokens and taking the most recent earlier match.
pub fn propose(history: &[u32], k: usize, min_n: usize, max_n: usize) -> Vec<u32> {
    for n in (min_n.max(1)..=max_n).rev() {
        if history.len() <= n {
            continue;
        }
        let suffix = &history[history.len() - n..];
        // Scan earlier windows from the most recent, excluding the suffix itself.
        let found = (0..history.len() - n).rev().find(|&start| &history[start..start + n] == suffix);
        if let Some(start) = found {
            let from = start + n;
            return history[from..(from + k).min(history.len())].to_vec();
        }
    }
    vec![]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_the_latest_match_of_the_longest_ngram() {
        let h = [1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3];
        assert_eq!(propose(&h, 2, 1, 3), vec![5, 6]);
        assert_eq!(propose(&[7, 8, 9, 7, 8], 5, 1, 3), vec![9, 7, 8]);
    }

    #[test]
    fn no_match_proposes_nothing() {
        assert!(propose(&[1, 2, 3], 4, 1, 3).is_empty());
        assert!(propose(&[], 4, 1, 3).is_empty());
    }
}
