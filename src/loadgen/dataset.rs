//! The requests of a run: synthetic prompts, a file of prompts, or a ShareGPT conversation
//! dump.
//!
//! The benchmark knows nothing of the server's tokenizer, so lengths in tokens are
//! approximated here and measured by the server (its `usage`) when it reports them:
//! - a synthetic prompt of N tokens is N words drawn from common English words, each a
//!   single token, space included, in the BPE vocabularies of Llama-family models (the
//!   server may add a start-of-sequence token);
//! - a text's length (a file's prompt, a ShareGPT answer) is taken as one token per four
//!   characters, the usual figure for English text;
//! - a `random-ids` prompt is token ids, its length exact: for servers without a tokenizer.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::args::{DatasetSource, ServeBenchArgs};
use super::BenchError;

/// A request's prompt, serialized as the OpenAI `prompt` field takes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PromptBody {
    Text(String),
    TokenIds(Vec<u32>),
}

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItem {
    pub prompt: PromptBody,
    /// The prompt's length in tokens, as estimated here.
    pub input_len: usize,
    /// `max_tokens`.
    pub output_len: usize,
}

/// The requests of the sweep's runs (each run takes as many as it sends from the start),
/// from the configured dataset.
pub fn load(args: &ServeBenchArgs) -> Result<Vec<WorkItem>, BenchError> {
    match &args.dataset {
        DatasetSource::Synthetic => Ok(synthetic(args)),
        DatasetSource::RandomIds => random_ids(args),
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
            Ok(items.into_iter().cycle().take(args.most_requests()).collect())
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
    drawn(args, |rng, len| {
        let mut prompt = String::with_capacity(len * 6);
        for _ in 0..len {
            prompt.push(' ');
            prompt.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        }
        PromptBody::Text(prompt)
    })
}

/// Prompts of token ids drawn uniformly below `--vocab`, lengths as for synthetic prompts.
fn random_ids(args: &ServeBenchArgs) -> Result<Vec<WorkItem>, BenchError> {
    let vocab = u32::try_from(args.vocab).map_err(|_| BenchError::Option("--vocab must be below 2^32".into()))?;
    Ok(drawn(args, |rng, len| PromptBody::TokenIds((0..len).map(|_| rng.random_range(0..vocab)).collect())))
}

/// The run's requests: input and output lengths drawn from normal distributions (at least
/// 1 each), then each prompt from `prompt(rng, input_len)`, all from one seeded generator.
fn drawn(args: &ServeBenchArgs, mut prompt: impl FnMut(&mut StdRng, usize) -> PromptBody) -> Vec<WorkItem> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    (0..args.most_requests())
        .map(|_| {
            let input_len = normal_len(&mut rng, args.input_len, args.input_std);
            let output_len = normal_len(&mut rng, args.default_output_len(), args.output_std);
            WorkItem { prompt: prompt(&mut rng, input_len), input_len, output_len }
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
    lines
        .map(|p| WorkItem { prompt: PromptBody::Text(p.to_string()), input_len: approx_tokens(p), output_len })
        .collect()
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
        Some(WorkItem { input_len: approx_tokens(&prompt), prompt: PromptBody::Text(prompt), output_len })
    };
    Ok(conversations.into_iter().filter_map(item).collect())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::loadgen::args::{Load, DEFAULT_VOCAB};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeBenchArgs,
    }

    /// A prompt's text, `None` for token ids.
    fn text_of(prompt: &PromptBody) -> Option<&str> {
        match prompt {
            PromptBody::Text(text) => Some(text),
            PromptBody::TokenIds(_) => None,
        }
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
            assert_eq!(text_of(&item.prompt).unwrap().split_whitespace().count(), item.input_len);
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
    fn random_id_prompts_have_exact_lengths_ids_below_the_vocabulary_and_repeat_with_the_seed() {
        let a = args(&["--dataset", "random-ids", "--input-len", "40", "--output-len", "7", "--vocab", "50"]);
        let items = load(&a).unwrap();
        assert_eq!(items.len(), 100);
        let mut seen = [false; 50];
        for item in &items {
            let PromptBody::TokenIds(ids) = &item.prompt else { panic!("{item:?}") };
            assert_eq!((ids.len(), item.input_len, item.output_len), (40, 40, 7));
            ids.iter().for_each(|&id| seen[id as usize] = true);
        }
        assert!(seen.iter().all(|&s| s), "4,000 draws below 50 reach every id");
        assert_eq!(items, load(&a).unwrap());
        assert_ne!(items[0], items[1]);
        assert_eq!(serde_json::to_string(&PromptBody::TokenIds(vec![3, 1])).unwrap(), "[3,1]");
        let ids = load(&args(&["--dataset", "random-ids", "--input-len", "8"])).unwrap();
        let max = ids.iter().filter_map(|i| match &i.prompt {
            PromptBody::TokenIds(v) => v.iter().max(),
            _ => None,
        });
        assert!(max.max().is_some_and(|&m| (m as usize) < DEFAULT_VOCAB));
    }

    #[test]
    fn requests_per_client_scale_each_run_with_its_clients_above_the_floor() {
        let a = args(&["--concurrency", "1,8,64", "--requests-per-client", "2", "--num-requests", "8"]);
        let counts: Vec<_> = a.loads().into_iter().map(|l| a.requests_for(l)).collect();
        assert_eq!(counts, [8, 16, 128]);
        assert_eq!(load(&a).unwrap().len(), 128);
        let plain = args(&["--concurrency", "1,8", "--num-requests", "5"]);
        assert_eq!((plain.requests_for(Load::Concurrency(8)), plain.most_requests()), (5, 5));
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
        assert_eq!((text_of(&items[0].prompt), items[0].output_len), (Some("Hi there"), 4));
        assert_eq!((text_of(&items[1].prompt), items[1].output_len), (Some("Q"), 1));
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
        let prompts: Vec<_> = items.iter().map(|i| text_of(&i.prompt).unwrap()).collect();
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
