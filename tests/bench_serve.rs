//! `specula bench serve` as an operator runs it: against a `specula serve` of the default
//! model (speculating with an early exit), over both APIs, with a small synthetic sweep;
//! the JSON report and the plots checked; against servers of dummy weights (no tokenizer)
//! with prompts of random token ids, plain and speculating; and the typed errors of a
//! server that is not there or a bad URL.

mod server_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use server_support::process;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_specula"))
        .args(["bench", "serve"])
        .args(args)
        .env_remove("SPECULA_API_KEY")
        .output()
        .expect("specula runs")
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("specula-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Mean and percentiles present, positive and in order.
fn check_summary(run: &Value, name: &str) {
    let s = &run[name];
    let [mean, p50, p90, p99] = ["mean", "p50", "p90", "p99"].map(|k| s[k].as_f64().unwrap_or(-1.0));
    assert!(mean > 0.0 && p50 > 0.0, "{name}: {s}");
    assert!(p50 <= p90 && p90 <= p99, "{name}: percentiles out of order: {s}");
}

/// Every request completed with its 8 tokens, at positive rates, latencies consistent.
fn check_report(report: &Value, label: &str) {
    assert_eq!(report["label"], label);
    assert_eq!(report["config"]["num_requests"], 6);
    let runs = report["runs"].as_array().unwrap();
    let loads: Vec<&Value> = runs.iter().map(|r| &r["load"]).collect();
    assert_eq!(loads, [&serde_json::json!({"concurrency": 1}), &serde_json::json!({"concurrency": 2})]);
    for run in runs {
        assert_eq!((run["completed"].as_u64(), run["failed"].as_u64()), (Some(6), Some(0)), "{run}");
        assert_eq!(run["total_output_tokens"], 48, "ignore_eos: every request its 8 tokens");
        // One word a token: about 16 (a start-of-sequence token may be added).
        let input = run["mean_input_tokens"].as_f64().unwrap();
        assert!((14.0..=20.0).contains(&input), "prompt length {input}");
        for rate in ["request_throughput", "output_throughput", "total_throughput"] {
            assert!(run[rate].as_f64().unwrap() > 0.0, "{rate}: {run}");
        }
        for name in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
            check_summary(run, name);
        }
        assert!(run["ttft_ms"]["p50"].as_f64() < run["e2e_ms"]["p50"].as_f64(), "{run}");
        if let Some(spec) = run["speculative"].as_object() {
            let (drafted, accepted) = (spec["drafted"].as_u64().unwrap(), spec["accepted"].as_u64().unwrap());
            assert!(spec["steps"].as_u64().unwrap() > 0 && accepted <= drafted, "{run}");
            assert!((1.0..=5.0).contains(&spec["tokens_per_step"].as_f64().unwrap()), "{run}");
        }
    }
}

#[test]
fn a_sweep_over_both_apis_reports_every_request_and_draws_its_plot() {
    let served = process::serve(&["--spec", "early-exit", "--draft-layers", "2"], None);
    let url = format!("http://{}", served.addr);
    let dir = temp_dir();
    let workload = ["--input-len", "16", "--output-len", "8", "--num-requests", "6", "--concurrency", "1,2"];
    // The WebSocket first, on a fresh server that drafts while it learns what steps cost
    // (no warm-up): its `done` frames carry the speculation.
    let ws_json = dir.join("ws.json");
    let png = dir.join("ws.png");
    let mut args = vec!["--url", &url, "--api", "ws", "--warmup", "0", "--label", "smol-ws"];
    args.extend(workload);
    args.extend(["--json", path_str(&ws_json), "--plot", path_str(&png)]);
    let out = bench(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(stdout.contains("smol-ws  concurrency 2"), "{stdout}");
    let report: Value = serde_json::from_slice(&std::fs::read(&ws_json).unwrap()).unwrap();
    check_report(&report, "smol-ws");
    assert_eq!(report["runs"][0]["speculative"]["source"], "per_request", "{report}");
    let png_bytes = std::fs::read(&png).unwrap();
    assert!(png_bytes.starts_with(b"\x89PNG\r\n\x1a\n") && png_bytes.len() > 10_000, "not a PNG image");

    // OpenAI over SSE, drawn with the WebSocket run for comparison.
    let openai_json = dir.join("openai.json");
    let svg = dir.join("both.svg");
    let mut args = vec!["--url", &url, "--api", "openai", "--label", "smol-openai"];
    args.extend(workload);
    args.extend(["--json", path_str(&openai_json), "--plot", path_str(&svg), "--compare", path_str(&ws_json)]);
    let out = bench(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    let report: Value = serde_json::from_slice(&std::fs::read(&openai_json).unwrap()).unwrap();
    check_report(&report, "smol-openai");
    assert!(report["config"]["model"].as_str().unwrap().contains("SmolLM2"), "the model from /v1/models");
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") && svg_text.trim_end().ends_with("</svg>"), "not an SVG image");
    assert!(svg_text.contains("smol-openai") && svg_text.contains("smol-ws"), "a line per configuration");
    assert!(svg_text.contains("mean time per output token (ms)"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `bench serve --dataset random-ids` at concurrency 2 against `served`: 4 requests of 16
/// prompt ids and 8 new tokens, all completed and timed token by token.
fn random_ids_run(served: &process::Served, label: &str, dir: &Path) -> (Value, String) {
    let url = format!("http://{}", served.addr);
    let json = dir.join(format!("{label}.json"));
    let workload = ["--dataset", "random-ids", "--input-len", "16", "--output-len", "8", "--num-requests", "4"];
    let mut args = vec!["--url", &url, "--concurrency", "2", "--label", label, "--json", path_str(&json)];
    args.extend(workload);
    let out = bench(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        (report["config"]["dataset"].as_str(), report["config"]["vocab"].as_u64()),
        (Some("random_ids"), Some(32000))
    );
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run["load"], serde_json::json!({"concurrency": 2}));
    assert_eq!((run["completed"].as_u64(), run["failed"].as_u64()), (Some(4), Some(0)), "{run}");
    // The server's own counts: the ids sent, and every request its 8 tokens (ignore_eos).
    assert_eq!((run["total_input_tokens"].as_u64(), run["total_output_tokens"].as_u64()), (Some(64), Some(32)));
    assert!(run["output_throughput"].as_f64().unwrap() > 0.0, "{run}");
    for name in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
        check_summary(run, name);
    }
    // Tokens arrived one chunk at a time, not all at the end: the first well before the last.
    assert!(run["ttft_ms"]["p50"].as_f64() < run["e2e_ms"]["p50"].as_f64(), "{run}");
    (run.clone(), stdout)
}

#[test]
fn random_token_ids_load_servers_of_dummy_weights_plain_and_speculating() {
    // Its own folder: the other tests remove theirs when they end.
    let dir = std::env::temp_dir().join(format!("specula-bench-dummy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dummy = ["--model", "dummy:smollm2-135m", "--backend", "cpu"];
    let spec = ["--spec", "draft", "--draft-model", "dummy:smollm2-135m", "--synthetic-acceptance", "0.8"];
    let fixed = ["--draft-len", "4", "--draft-lengths", "fixed"];
    let spec_args = [&dummy[..], &spec, &fixed].concat();
    // Both servers start at once: drawing random weights is most of a test this short.
    let (plain, speculating) = std::thread::scope(|s| {
        let speculating = s.spawn(|| process::serve(&spec_args, None));
        (process::serve(&dummy, None), speculating.join().unwrap())
    });
    let (run, stdout) = random_ids_run(&plain, "dummy-plain", &dir);
    assert!(run["speculative"].is_null() && !stdout.contains("tok/step"), "{run}");
    // The WebSocket's `generate` frame takes text only: refused before anything is sent.
    let url = format!("http://{}", plain.addr);
    let out = bench(&["--url", &url, "--api", "ws", "--dataset", "random-ids", "--num-requests", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use --api openai"), "{out:?}");
    drop(plain);

    let (run, stdout) = random_ids_run(&speculating, "dummy-spec", &dir);
    // Over the OpenAI API the acceptance comes from the server's /metrics.
    let s = &run["speculative"];
    assert_eq!(s["source"], "server_metrics", "{run}");
    let (drafted, accepted, steps) = (s["drafted"].as_u64(), s["accepted"].as_u64(), s["steps"].as_u64());
    assert!(steps > Some(0) && accepted <= drafted && drafted <= steps.map(|n| 4 * n), "{run}");
    let per_step = s["tokens_per_step"].as_f64().unwrap();
    assert!((1.0..=5.0).contains(&per_step), "{run}");
    assert!(stdout.contains("tok/step") && stdout.contains("drafts accepted"), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_server_that_is_not_there_or_a_bad_url_is_a_clear_error() {
    // A port nothing listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cases = [
        (format!("http://127.0.0.1:{port}"), "no server answers at"),
        ("https://127.0.0.1:8000".to_string(), "HTTPS is not supported"),
        ("http://bad host".to_string(), "bad --url"),
    ];
    for (url, message) in cases {
        let out = bench(&["--url", &url, "--num-requests", "2"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: succeeded");
        assert!(stderr.contains(message), "{url}: {stderr}");
    }
    let out = bench(&["--url", "http://127.0.0.1:8000", "--plot", "sweep.jpg"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must end in .png or .svg"));
}
