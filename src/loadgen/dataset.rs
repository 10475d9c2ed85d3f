//! The requests of a run: synthetic prompts, a file of prompts, or a ShareGPT conversation
//! dump.
//!
//! The benchmark knows nothing of the server's tokenizer, so lengths in tokens are
//! approximated here and measured by the server (its `usage`) when it reports them:
//! - a synthetic prompt of N tokens is N words drawn from common English words, each a
//!   single token, space included, in the BPE vocabularies of Llama-family models (the
//!   server may add a start-of-sequence token);
//! - a text's length (a file's prompt, a ShareGPT answer) is taken as one token per four
//!   characters, the usual figure for English text.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use super::args::{DatasetSource, ServeBenchArgs};
use super::BenchError;

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItem {
    pub prompt: String,
    /// The prompt's length in tokens, as estimated here.
    pub input_len: usize,
    /// `max_tokens`.
    pub output_len: usize,
}

/// The `num_requests` requests of every run, from the configured dataset.
pub fn load(args: &ServeBenchArgs) -> Result<Vec<WorkItem>, BenchError> {
    match &args.dataset {
        DatasetSource::Synthetic => Ok(synthetic(args)),
        DatasetSource::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| dataset_error(path, e.to_string()))?;
            let items = if path.extension().is_some_and(|e| e == "json") {
                sharegpt(&text, args.output_len).map_err(|reason| dataset_error(path, reason))?
            } else {
                prompt_lines(&text, args.default_output_len())
            };
            if items.is_empty() {
                return Err(dataset_error(path, "it has no prompt".into()));
            }
            Ok(items.into_iter().cycle().take(args.num_requests).collect())
        }
    }
}

fn dataset_error(path: &Path, reason: String) -> BenchError {
    BenchError::Dataset { path: path.to_path_buf(), reason }
}

/// Common English words, each one token with its leading space in Llama-family vocabularies.
const WORDS: [&str; 100] = [
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "her",
    "they", "we", "you", "it", "this", "are", "be", "have", "one", "all", "would", "there", "their", "what", "so",
    "up", "out", "if", "about", "who", "get", "which", "go", "me", "when", "make", "can", "like", "time", "no", "just",
    "him", "know", "take", "people", "into", "year", "your", "good", "some", "could", "them", "see", "other", "than",
    "then", "now", "look", "only", "come", "its", "over", "think", "also", "back", "after", "use", "two", "how", "our",
    "work", "first", "well", "way", "even", "new", "want", "because", "any", "these", "give", "day", "most", "us",
    "great", "small", "light", "water", "house", "world", "city", "river", "story",
];

/// Prompts of random words, lengths drawn from normal distributions (at least 1 each).
fn synthetic(args: &ServeBenchArgs) -> Vec<WorkItem> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    (0..args.num_requests)
        .map(|_| {
            let input_len = normal_len(&mut rng, args.input_len, args.input_std);
            let output_len = normal_len(&mut rng, args.default_output_len(), args.output_std);
            let mut prompt = String::with_capacity(input_len * 6);
            for _ in 0..input_len {
                prompt.push(' ');
                prompt.push_str(WORDS[rng.random_range(0..WORDS.len())]);
            }
            WorkItem { prompt, input_len, output_len }
        })
        .collect()
}

/// `mean + std * z` rounded, z standard normal (Box-Muller), at least 1.
fn normal_len(rng: &mut StdRng, mean: usize, std: f64) -> usize {
    if std == 0.0 {
        return mean;
    }
    let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    (mean as f64 + std * z).round().max(1.0) as usize
}

/// A text's length in tokens, roughly: a token per four characters.
pub fn approx_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4).max(1)
}

/// One prompt per non-empty line.
fn prompt_lines(text: &str, output_len: usize) -> Vec<WorkItem> {
    let lines = text.lines().map(str::trim_end).filter(|l| !l.trim().is_empty());
    lines.map(|p| WorkItem { prompt: p.to_string(), input_len: approx_tokens(p), output_len }).collect()
}

#[derive(Deserialize)]
struct Conversation {
    conversations: Vec<Turn>,
}

#[derive(Deserialize)]
struct Turn {
    from: String,
    value: String,
}

/// Each conversation's first human turn and the gpt turn after it; conversations without
/// such a pair are skipped. `output_len` replaces the answers' lengths when given.
fn sharegpt(text: &str, output_len: Option<usize>) -> Result<Vec<WorkItem>, String> {
    let conversations: Vec<Conversation> =
        serde_json::from_str(text).map_err(|e| format!("not ShareGPT JSON (`[{{\"conversations\": ...}}]`): {e}"))?;
    let item = |c: Conversation| {
        let human = c.conversations.iter().position(|t| t.from == "human" && !t.value.trim().is_empty())?;
        let answer = c.conversations[human + 1..].iter().find(|t| t.from == "gpt")?;
        let prompt = c.conversations[human].value.clone();
        let output_len = output_len.unwrap_or_else(|| approx_tokens(&answer.value));
        Some(WorkItem { input_len: approx_tokens(&prompt), prompt, output_len })
    };
    Ok(conversations.into_iter().filter_map(item).collect())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeBenchArgs,
    }

    fn args(extra: &[&str]) -> ServeBenchArgs {
        let mut all = vec!["x", "--url", "http://127.0.0.1:1"];
        all.extend_from_slice(extra);
        Cli::parse_from(all).args
    }

    #[test]
    fn synthetic_prompts_have_the_drawn_lengths_and_repeat_with_the_seed() {
        let a = args(&["--input-len", "50", "--input-std", "10", "--output-len", "20", "--output-std", "5"]);
        let items = synthetic(&a);
        assert_eq!(items.len(), 100);
        for item in &items {
            assert_eq!(item.prompt.split_whitespace().count(), item.input_len);
            assert!(item.input_len >= 1 && item.output_len >= 1);
        }
        let mean = items.iter().map(|i| i.input_len as f64).sum::<f64>() / 100.0;
        assert!((mean - 50.0).abs() < 4.0, "{mean}");
        let spread = items.iter().map(|i| (i.input_len as f64 - mean).powi(2)).sum::<f64>() / 99.0;
        assert!((spread.sqrt() - 10.0).abs() < 3.0, "{}", spread.sqrt());
        assert_eq!(items, synthetic(&a));
        assert_ne!(items, synthetic(&args(&["--input-len", "50", "--input-std", "10", "--seed", "1"])));
        // No standard deviation: every request alike in length, not in words.
        let fixed = synthetic(&args(&["--input-len", "16", "--output-len", "8"]));
        assert!(fixed.iter().all(|i| i.input_len == 16 && i.output_len == 8));
        assert_ne!(fixed[0].prompt, fixed[1].prompt);
    }

    #[test]
    fn sharegpt_takes_the_first_human_turn_and_the_answer_after_it() {
        let text = r#"[
            {"id": "a", "conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "0123456789abcdef"}]},
            {"conversations": [{"from": "gpt", "value": "no question"}]},
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
        ]"#;
        let items = sharegpt(text, None).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!((items[0].prompt.as_str(), items[0].output_len), ("Hi there", 4));
        assert_eq!((items[1].prompt.as_str(), items[1].output_len), ("Q", 1));
        assert_eq!(sharegpt(text, Some(7)).unwrap()[0].output_len, 7);
        assert!(sharegpt("{\"not\": 1}", None).unwrap_err().contains("not ShareGPT JSON"));
    }

    #[test]
    fn a_prompt_file_is_one_prompt_a_line_taken_in_order_and_cycled() {
        let dir = std::env::temp_dir().join(format!("specula-loadgen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("prompts.txt");
        std::fs::write(&path, "first prompt\n\n  second\n").unwrap();
        let items = load(&args(&["--dataset", path.to_str().unwrap(), "--num-requests", "3"])).unwrap();
        let prompts: Vec<_> = items.iter().map(|i| i.prompt.as_str()).collect();
        assert_eq!(prompts, ["first prompt", "  second", "first prompt"]);
        assert!(items.iter().all(|i| i.output_len == 128));
        std::fs::write(&path, "\n\n").unwrap();
        let empty = load(&args(&["--dataset", path.to_str().unwrap()]));
        assert!(matches!(empty, Err(BenchError::Dataset { .. })), "{empty:?}");
        let missing = load(&args(&["--dataset", dir.join("none.json").to_str().unwrap()]));
        assert!(matches!(missing, Err(BenchError::Dataset { .. })), "{missing:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
