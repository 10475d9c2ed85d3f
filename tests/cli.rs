//! The `specula` command line as a user runs it: exit codes and errors on a tiny model
//! written to a Hugging Face folder.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::tiny::{write_hf_dir, StDtype, TinyModel, TinySpec};
use common::TempDir;

fn specula(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_specula")).args(args).output().expect("the binary runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A tiny model whose context (1024) is longer than a step's token budget (512).
fn long_context_model(dir: &Path) -> TinyModel {
    let model = TinyModel::random(TinySpec { max_positions: 1024, ..TinySpec::smol() }, 5);
    write_hf_dir(&model, StDtype::F32, dir);
    model
}

/// A text of about `tokens` tokens for the tiny vocabulary.
fn prompt_of(model: &TinyModel, tokens: usize) -> String {
    let tok = model.vocab.hf_tokenizer();
    let mut text = String::new();
    while tok.encode(text.as_str(), false).unwrap().len() < tokens {
        text.push_str("The quick brown fox jumps over the lazy dog. ");
    }
    text
}

#[test]
fn a_prompts_file_with_a_prompt_longer_than_a_step_runs_and_a_failed_line_fails_the_run() {
    let dir = TempDir::new("cli-long");
    let model = long_context_model(dir.path());
    let (long, too_long) = (prompt_of(&model, 700), prompt_of(&model, 1100));
    let file = dir.join("prompts.txt");
    let model_dir = dir.path().to_str().unwrap();

    std::fs::write(&file, format!("{long}\n")).unwrap();
    let out =
        specula(&["generate", "--model", model_dir, "--prompts-file", file.to_str().unwrap(), "--max-tokens", "3"]);
    assert!(out.status.success(), "a 700-token prompt alone: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("[0] ") && !stdout.contains("error"), "{}", text(&out));

    std::fs::write(&file, format!("{long}\n{too_long}\n")).unwrap();
    let args = ["generate", "--model", model_dir, "--prompts-file", file.to_str().unwrap(), "--max-tokens", "3"];
    let out = specula(&[&args[..], &["--json"]].concat());
    assert_eq!(out.status.code(), Some(1), "one line refused: {}", text(&out));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["usage"]["completion_tokens"], 3, "{lines:?}");
    assert!(lines[1]["error"].as_str().unwrap().contains("context"), "{lines:?}");
    assert!(text(&out).contains("1 of 2 requests failed"), "{}", text(&out));
}

#[test]
fn a_negative_temperature_is_refused_by_the_sampling_check() {
    let out = specula(&["generate", "--model", "dummy:smollm2-135m", "--prompt", "1 2 3", "--temperature", "-1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("invalid sampling parameters: temperature must be between 0 and 100, got -1"), "{msg}");
}

#[test]
fn the_cuda_backend_without_a_gpu_is_a_clear_error() {
    let out = specula(&["generate", "--backend", "cuda", "--model", "dummy:smollm2-135m", "--prompt", "1 2 3"]);
    if out.status.success() {
        return; // a GPU machine: nothing to refuse
    }
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(msg.starts_with("error: ") && !msg.contains("panicked"), "{msg}");
}

#[test]
fn an_attention_window_of_zero_or_smaller_than_its_sinks_is_refused() {
    for (window, sinks, want) in [
        ("0", "0", "the attention window must hold at least one token"),
        ("3", "4", "the attention window (3 tokens) must be at least the sink tokens (4)"),
    ] {
        let args = ["--model", "dummy:smollm2-135m", "--prompt", "1 2 3", "--attention-window", window];
        let out = specula(&[&["generate"][..], &args, &["--sink-tokens", sinks]].concat());
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(want), "{}", text(&out));
    }
}

#[test]
fn a_config_sliding_window_lets_generation_run_past_the_context_with_fp8_kv() {
    let dir = TempDir::new("cli-window");
    let model = TinyModel::random(TinySpec { max_positions: 64, ..TinySpec::smol() }, 5);
    write_hf_dir(&model, StDtype::F32, dir.path());
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["sliding_window"] = 16.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let model_dir = dir.path().to_str().unwrap();
    for extra in [&[][..], &["--kv-cache-dtype", "fp8"], &["--attention-window", "24", "--sink-tokens", "4"]] {
        let args = ["generate", "--model", model_dir, "--prompt", "The quick brown fox", "--max-tokens", "100"];
        let out = specula(&[&args[..], &["--ignore-eos", "--json"], extra].concat());
        assert!(out.status.success(), "{extra:?}: {}", text(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["usage"]["completion_tokens"], 100, "{extra:?}: past the context of 64: {json}");
    }
}

#[test]
fn medusa_and_lookahead_run_labelled_and_refuse_what_they_cannot_do() {
    let dir = TempDir::new("cli-lookahead");
    long_context_model(dir.path());
    let model = dir.path().to_str().unwrap();
    let base = ["generate", "--model", model, "--prompt", "The quick brown fox", "--max-tokens", "6", "--json"];
    let random = ["--spec", "medusa", "--draft-model", "dummy:smollm2-135m", "--spec-tree", "8"];
    let out = specula(&[&base[..], &random].concat());
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"random_heads\":true"), "{}", text(&out));
    let out = specula(&[&base[..], &["--spec", "lookahead"]].concat());
    assert!(out.status.success() && text(&out).contains("\"speculative\":{"), "{}", text(&out));
    // Trees and lookahead run in the batching runtime too (a prompts file goes through it).
    std::fs::write(dir.join("prompts.txt"), "The quick brown fox\nA\n").unwrap();
    let file = dir.join("prompts.txt");
    let batch = ["generate", "--model", model, "--prompts-file", file.to_str().unwrap(), "--max-tokens", "6"];
    for spec in [&["--spec", "lookahead"][..], &random] {
        let out = specula(&[&batch[..], spec].concat());
        assert!(out.status.success(), "{spec:?}: {}", text(&out));
    }
    for (args, want) in [
        ([&base[..], &["--spec", "medusa"]].concat(), "--spec medusa needs --draft-model DIR"),
        ([&base[..], &["--spec", "lookahead", "--lookahead-ngram", "1"]].concat(), "--lookahead-ngram at least 2"),
        ([&batch[..], &["--spec", "ngram", "--spec-tree", "8"]].concat(), "--spec-tree needs --spec eagle or medusa"),
    ] {
        let out = specula(&args);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(want), "{}", text(&out));
    }
}
