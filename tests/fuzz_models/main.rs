//! Fuzzing, bounded in time, of every parser a model file reaches: GGUF (header, metadata,
//! configuration, tokenizer, weights), safetensors, `config.json`, and chat templates (the
//! network's parsers are fuzzed by `tests/fuzz_server.rs`, the same way).
//!
//! A mutation fuzzer of our own (stable Rust has no libFuzzer): each target runs every
//! input in `tests/fuzz/corpus/<target>/` (real files, and every input that once broke
//! something, kept as a regression input), then mutates them with a seeded RNG
//! (`mutate.rs`) for `SPECULA_FUZZ_SECONDS` seconds (default 3). An input must be loaded
//! and work, or be refused with an error naming its file. A panic, an error naming no file,
//! a render that runs for seconds, or an allocation past `alloc::LIMIT` (the process then
//! aborts) fails the test, and the input is saved into the corpus as `crash-<hash>`, to stay
//! there as a regression input once fixed.
//!
//! `SPECULA_FUZZ_SEED=N` replays a run (`time` picks a new seed; 0x5eed by default),
//! `SPECULA_FUZZ_LOUD=1` prints panics, `SPECULA_FUZZ_RECORD=1` writes each input to
//! `target/tmp/fuzz-last-input-<target>` before running it (for what aborts: a stack
//! overflow); `cargo test --release --test fuzz_models -- --ignored` rewrites the seeds
//! generated from the test helpers.

#[path = "../common/mod.rs"]
mod common;

mod alloc;
mod mutate;
mod targets;

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::tiny::Rng;
use common::TempDir;
use mutate::Mutator;
use targets::Target;

#[global_allocator]
static ALLOC: alloc::Guard = alloc::Guard;

/// An input that takes longer than this is a failure (renders are bounded by fuel).
const SLOW: Duration = Duration::from_secs(10);

thread_local! {
    static FUZZING: Cell<bool> = const { Cell::new(false) };
}

/// Panics are expected while fuzzing (they are caught and reported once each); with
/// `SPECULA_FUZZ_LOUD` set they are printed as usual (with `RUST_BACKTRACE`, where).
fn quiet_panics() {
    static HOOK: Once = Once::new();
    if std::env::var_os("SPECULA_FUZZ_LOUD").is_some() {
        return;
    }
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !FUZZING.with(Cell::get) {
                default(info);
            }
        }));
    });
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus").join(target)
}

/// The checked-in inputs of a target, by file name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.iter().map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(p).unwrap())).collect()
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic".into(),
    }
}

struct Run<'a> {
    target: &'a Target,
    scratch: TempDir,
    failures: Vec<String>,
}

impl Run<'_> {
    /// Runs one input; a broken property is recorded with the input saved.
    fn check(&mut self, input: &[u8], what: &str) {
        let saved = corpus_dir(self.target.name).join(format!("crash-{:016x}", fnv(input)));
        if std::env::var_os("SPECULA_FUZZ_RECORD").is_some() {
            // Each input before it runs: what a stack overflow (which aborts) was running.
            let last = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-last-input-{}", self.target.name));
            std::fs::write(last, input).unwrap();
        }
        *alloc::CURRENT[self.target.slot].lock().unwrap() = Some((saved.clone(), input.to_vec()));
        let start = Instant::now();
        FUZZING.with(|f| f.set(true));
        let outcome = catch_unwind(AssertUnwindSafe(|| (self.target.run)(self.scratch.path(), input)));
        FUZZING.with(|f| f.set(false));
        let problem = match outcome {
            Ok(Ok(())) if start.elapsed() < SLOW => return,
            Ok(Ok(())) => format!("took {:?}", start.elapsed()),
            Ok(Err(msg)) => msg,
            Err(payload) => format!("panicked: {}", panic_message(payload.as_ref())),
        };
        std::fs::write(&saved, input).unwrap();
        self.failures.push(format!("{what}: {problem}\n  input: {}", saved.display()));
    }
}

fn fuzz(target: &Target) {
    quiet_panics();
    let seconds: f64 = std::env::var("SPECULA_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    // A fixed seed by default, so that a CI run fails only for a new bug, not for one a new
    // seed happened upon; `SPECULA_FUZZ_SEED=time` explores afresh.
    let seed = match std::env::var("SPECULA_FUZZ_SEED").as_deref() {
        Ok("time") => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        }
        Ok(s) => s.parse().unwrap_or_else(|_| panic!("SPECULA_FUZZ_SEED={s}: a number, or `time`")),
        Err(_) => 0x5eed,
    };
    eprintln!("fuzz {}: seed {seed}, {seconds} s", target.name);
    let mut run = Run { target, scratch: TempDir::new(&format!("fuzz-{}", target.name)), failures: vec![] };
    (target.setup)(run.scratch.path());
    let inputs = corpus(target.name);
    assert!(!inputs.is_empty(), "no corpus for {}", target.name);
    for (name, input) in &inputs {
        run.check(input, name);
    }
    let bytes: Vec<Vec<u8>> = inputs.into_iter().map(|(_, b)| b).collect();
    let mut m = Mutator { rng: Rng(seed), header: target.header };
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut mutants = 0;
    while Instant::now() < deadline && run.failures.len() < 8 {
        let base = m.rng.below(bytes.len());
        let input = m.mutate(&bytes[base], &bytes, target.dictionary);
        run.check(&input, &format!("mutant {mutants}"));
        mutants += 1;
    }
    *alloc::CURRENT[target.slot].lock().unwrap() = None;
    eprintln!("fuzz {}: {} corpus inputs, {mutants} mutants in {seconds} s (seed {seed})", target.name, bytes.len());
    assert!(
        run.failures.is_empty(),
        "fuzz {}: {} failures (replay: SPECULA_FUZZ_SEED={seed}); the inputs are in {}, to keep once fixed\n{}",
        target.name,
        run.failures.len(),
        corpus_dir(target.name).display(),
        run.failures.join("\n")
    );
}

#[test]
fn gguf() {
    fuzz(&targets::GGUF);
}

#[test]
fn safetensors() {
    fuzz(&targets::SAFETENSORS);
}

#[test]
fn config_json() {
    fuzz(&targets::CONFIG_JSON);
}

#[test]
fn chat_template() {
    fuzz(&targets::CHAT_TEMPLATE);
}

/// Writes the seed inputs generated from the test helpers into the corpus.
#[test]
#[ignore]
fn write_seed_corpus() {
    for (target, name, bytes) in targets::seeds() {
        std::fs::write(corpus_dir(target).join(name), bytes).unwrap();
    }
}
