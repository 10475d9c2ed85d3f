//! Fuzzing the parsers a network client reaches, on stable Rust: each target replays its
//! corpus (`tests/fuzz/corpus/<target>/`: real inputs, and every crash found so far), then
//! mutates those inputs for a bounded time (`SPECULA_FUZZ_SECONDS`, default 3 per target;
//! `SPECULA_FUZZ_SEED` repeats a run). A panic is a failure: the input is saved into the
//! corpus as `crash-<hash>` and kept there as a regression input once fixed.
//!
//! | target | input | parser |
//! |---|---|---|
//! | `openai_chat` | a body of `POST /v1/chat/completions` | JSON → `ChatCompletionRequest` → `GenerateRequest` |
//! | `openai_completions` | a body of `POST /v1/completions` | JSON → `CompletionRequest` → `GenerateRequest` |
//! | `ws_frames` | a WebSocket text message | `parse_client_frame` → `ClientFrame` |
//! | `ws_bytes` | the raw bytes of a WebSocket connection | the frame guard, then actix's codec |

use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actix_codec::Decoder;
use actix_web::web::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use specula::server::openai::{ChatCompletionRequest, CompletionRequest};
use specula::server::ws::guard::FrameTracker;
use specula::server::ws::protocol::parse_client_frame;

#[test]
fn openai_chat() {
    fuzz("openai_chat", Kind::Json, |input| {
        if let Ok(request) = serde_json::from_slice::<ChatCompletionRequest>(input) {
            let _ = request.into_generate("smol");
        }
    });
}

#[test]
fn openai_completions() {
    fuzz("openai_completions", Kind::Json, |input| {
        if let Ok(request) = serde_json::from_slice::<CompletionRequest>(input) {
            let _ = request.into_generate("smol");
        }
    });
}

#[test]
fn ws_frames() {
    fuzz("ws_frames", Kind::Json, |input| {
        // actix-ws hands over text frames only once they are valid UTF-8.
        if let Ok(text) = std::str::from_utf8(input) {
            let _ = parse_client_frame(text);
        }
    });
}

#[test]
fn ws_bytes() {
    fuzz("ws_bytes", Kind::Bytes, |input| {
        // In pieces, as a connection delivers them: the guard first, then the codec on
        // what the guard let through.
        let limit = 4096;
        let mut guard = FrameTracker::new(limit);
        let mut codec = actix_http::ws::Codec::new().max_size(limit);
        let mut buf = BytesMut::new();
        let piece = 1 + input.first().map_or(0, |b| *b as usize % 7);
        for chunk in input.chunks(piece) {
            if guard.feed(chunk).is_err() {
                return;
            }
            buf.extend_from_slice(chunk);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    });
}

/// How inputs are mutated: JSON ones also by their structure.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Json,
    Bytes,
}

fn fuzz(target: &str, kind: Kind, run: impl Fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus").join(target);
    let corpus = read_corpus(&dir);
    assert!(!corpus.is_empty(), "no corpus in {}", dir.display());
    for input in &corpus {
        check(&dir, input, &run);
    }
    let seconds = env_number("SPECULA_FUZZ_SECONDS").unwrap_or(3.0);
    let seed = env_number("SPECULA_FUZZ_SEED").map_or_else(rand::random, |s| s as u64);
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let input = mutate(&corpus, kind, &mut rng);
        check(&dir, &input, &run);
        runs += 1;
    }
    eprintln!("{target}: {} corpus inputs, {runs} mutated inputs in {seconds} s (seed {seed})", corpus.len());
}

fn env_number(name: &str) -> Option<f64> {
    std::env::var(name).ok()?.parse().ok()
}

fn read_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(dir).map_or(vec![], |d| d.filter_map(|e| Some(e.ok()?.path())).collect());
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Runs one input; on a panic saves it into the corpus and fails.
fn check(dir: &Path, input: &[u8], run: &impl Fn(&[u8])) {
    if catch_unwind(AssertUnwindSafe(|| run(input))).is_ok() {
        return;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    input.hash(&mut hasher);
    let path = dir.join(format!("crash-{:016x}", hasher.finish()));
    let _ = std::fs::write(&path, input);
    panic!("a panic on the input saved as {} ({:?})", path.display(), String::from_utf8_lossy(input));
}

/// Values that tend to break parsers and range checks, separated by spaces.
const INTERESTING: &str = r#"0 -1 1e999 -0 1.5 NaN 18446744073709551616 9223372036854775807 4294967296 null
    true "" [] {} "\ud800" "\u0000" ["a","b"] {"type":"text"} "generate" "cancel" "user""#;

fn interesting(rng: &mut StdRng) -> &'static str {
    let values: Vec<&str> = INTERESTING.split_whitespace().collect();
    values[rng.random_range(0..values.len())]
}

/// One to eight mutations of a corpus input.
fn mutate(corpus: &[Vec<u8>], kind: Kind, rng: &mut StdRng) -> Vec<u8> {
    let mut input = corpus[rng.random_range(0..corpus.len())].clone();
    for _ in 0..rng.random_range(1..=8) {
        input = match rng.random_range(0..if kind == Kind::Json { 7 } else { 6 }) {
            0 => flip_bit(input, rng),
            1 => delete_range(input, rng),
            2 => duplicate_range(input, rng),
            3 => insert_at(input, interesting(rng).as_bytes(), rng),
            4 => splice(input, &corpus[rng.random_range(0..corpus.len())], rng),
            5 => insert_at(input, &[rng.random::<u8>()], rng),
            _ => mutate_json(input, rng),
        };
    }
    input
}

fn flip_bit(mut input: Vec<u8>, rng: &mut StdRng) -> Vec<u8> {
    if !input.is_empty() {
        let i = rng.random_range(0..input.len());
        input[i] ^= 1 << rng.random_range(0..8);
    }
    input
}

fn range(len: usize, rng: &mut StdRng) -> std::ops::Range<usize> {
    let start = rng.random_range(0..=len);
    start..rng.random_range(start..=len.min(start + 64))
}

fn delete_range(mut input: Vec<u8>, rng: &mut StdRng) -> Vec<u8> {
    input.drain(range(input.len(), rng));
    input
}

fn duplicate_range(input: Vec<u8>, rng: &mut StdRng) -> Vec<u8> {
    let copy = input[range(input.len(), rng)].to_vec();
    insert_at(input, &copy, rng)
}

fn insert_at(mut input: Vec<u8>, bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let at = rng.random_range(0..=input.len());
    input.splice(at..at, bytes.iter().copied());
    input
}

fn splice(input: Vec<u8>, other: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let (a, b) = (rng.random_range(0..=input.len()), rng.random_range(0..=other.len()));
    [&input[..a], &other[b..]].concat()
}

/// Replaces one value somewhere in the JSON document (or adds a field) and writes it back:
/// inputs that stay well-formed reach the checks past the parser.
fn mutate_json(input: Vec<u8>, rng: &mut StdRng) -> Vec<u8> {
    let Ok(mut doc) = serde_json::from_slice::<Value>(&input) else { return input };
    let replacement: Value = match rng.random_range(0..4) {
        0 => serde_json::from_str(interesting(rng)).unwrap_or(Value::Null),
        1 => Value::String("w ".repeat(rng.random_range(0..5000))),
        2 => (0..rng.random_range(0..300)).fold(Value::Null, |v, _| Value::Array(vec![v])),
        _ => rng.random::<f64>().into(),
    };
    // A random path down the document, as a JSON pointer.
    let (mut path, mut node) = (String::new(), &doc);
    loop {
        match node {
            Value::Object(map) if !map.is_empty() && rng.random_bool(0.7) => {
                let key = map.keys().nth(rng.random_range(0..map.len())).unwrap();
                path.push_str(&format!("/{}", key.replace('~', "~0").replace('/', "~1")));
                node = &map[key];
            }
            Value::Array(items) if !items.is_empty() && rng.random_bool(0.7) => {
                let i = rng.random_range(0..items.len());
                path.push_str(&format!("/{i}"));
                node = &items[i];
            }
            _ => break,
        }
    }
    let add_field = rng.random_bool(0.3);
    match doc.pointer_mut(&path) {
        Some(Value::Object(map)) if add_field => {
            map.insert(format!("f{}", rng.random_range(0..3)), replacement);
        }
        Some(target) => *target = replacement,
        None => {}
    }
    serde_json::to_vec(&doc).unwrap_or(input)
}
