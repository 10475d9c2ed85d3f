//! The OpenAI-compatible HTTP API, `/health`, `/v1/models` and `/metrics`, driven by a real
//! HTTP client (awc) against a real server on a loopback port — and by the Python `openai`
//! package when it is installed (`scripts/test` installs it into `.dev/openai-venv`).

mod server_support;

use std::path::PathBuf;
use std::time::Duration;

use awc::http::StatusCode;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};

use server_support::{exclusive, server, TestServer, API_KEY, MODEL};

fn client() -> awc::Client {
    awc::Client::builder().timeout(Duration::from_secs(120)).finish()
}

/// POSTs a raw body with the key; returns the status and the body as JSON.
async fn post_raw(srv: &TestServer, path: &str, body: String, auth: Option<String>) -> (StatusCode, Value) {
    let mut req = client().post(srv.http(path)).insert_header(("Content-Type", "application/json"));
    if let Some(auth) = auth {
        req = req.insert_header(("Authorization", auth));
    }
    let mut res = req.send_body(body).await.expect("the server answers");
    let bytes = res.body().limit(1 << 20).await.unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!({ "raw": String::from_utf8_lossy(&bytes) }));
    (res.status(), json)
}

async fn post(srv: &TestServer, path: &str, body: Value) -> (StatusCode, Value) {
    post_raw(srv, path, body.to_string(), Some(srv.bearer())).await
}

/// POSTs a streaming request and reads the SSE events: the JSON chunks, and whether the
/// stream ended with `data: [DONE]`.
async fn post_stream(srv: &TestServer, path: &str, body: Value) -> (Vec<Value>, bool) {
    let mut res = client()
        .post(srv.http(path))
        .insert_header(("Authorization", srv.bearer()))
        .send_json(&body)
        .await
        .expect("the server answers");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers().get("content-type").unwrap(), "text/event-stream");
    let mut buf = Vec::new();
    while let Some(chunk) = res.next().await {
        buf.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(buf).unwrap();
    let mut chunks = vec![];
    let mut done = false;
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data event: {event:?}"));
        assert!(!done, "an event after [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            chunks.push(serde_json::from_str(data).unwrap());
        }
    }
    (chunks, done)
}

fn chat_body(stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": stream,
    })
}

#[actix_rt::test]
async fn chat_completions_streamed_equals_not_streamed() {
    let _one_at_a_time = exclusive().await;
    let srv = server();
    let (status, full) = post(srv, "/v1/chat/completions", chat_body(false)).await;
    assert_eq!(status, StatusCode::OK, "{full}");
    assert_eq!(full["object"], "chat.completion");
    assert_eq!(full["model"], MODEL);
    let message = &full["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    let text = message["content"].as_str().unwrap();
    assert!(!text.is_empty());
    let usage = &full["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = post_stream(srv, "/v1/chat/completions", body).await;
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str().map(str::to_string)).collect();
    assert_eq!(streamed, text);
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&full["choices"][0]["finish_reason"]]);
    // The usage chunk comes last, with no choices.
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], full["usage"]);

    // Without include_usage there is no usage chunk.
    let (chunks, done) = post_stream(srv, "/v1/chat/completions", chat_body(true)).await;
    assert!(done);
    assert!(chunks.iter().all(|c| c.get("usage").is_none() && c["choices"].as_array().unwrap().len() == 1));
}

#[actix_rt::test]
async fn completions_streamed_equals_not_streamed() {
    let _one_at_a_time = exclusive().await;
    let srv = server();
    let body = json!({"model": MODEL, "prompt": "The three primary colours are", "max_tokens": 12, "temperature": 0});
    let (status, full) = post(srv, "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{full}");
    assert_eq!(full["object"], "text_completion");
    assert_eq!(full["usage"]["completion_tokens"].as_u64().unwrap(), 12);
    assert_eq!(full["choices"][0]["finish_reason"], "length");
    let text = full["choices"][0]["text"].as_str().unwrap();

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = post_stream(srv, "/v1/completions", streaming).await;
    assert!(done);
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)?["text"].as_str().map(str::to_string)).collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.last().unwrap()["usage"], full["usage"]);

    // Token ids as the prompt work too.
    let (status, ids) =
        post(srv, "/v1/completions", json!({"prompt": [1, 2, 3], "max_tokens": 2, "ignore_eos": true})).await;
    assert_eq!(status, StatusCode::OK, "{ids}");
    assert_eq!(ids["usage"]["prompt_tokens"], 3);
}

#[actix_rt::test]
async fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let _one_at_a_time = exclusive().await;
    let srv = server();
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let long_prompt = "hello ".repeat(9000);
    let cases: Vec<(&str, String, StatusCode, &str, &str)> = vec![
        ("/v1/chat/completions", "{\"messages\": [".into(), StatusCode::BAD_REQUEST, "invalid_json", "invalid JSON"),
        ("/v1/chat/completions", String::new(), StatusCode::BAD_REQUEST, "invalid_json", "empty"),
        (
            "/v1/chat/completions",
            json!({"model": MODEL}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "missing field `messages`",
        ),
        (
            "/v1/completions",
            json!({"max_tokens": 3}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "missing field `prompt`",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": "Hi"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "invalid type",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": "lots"}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "invalid type",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "temprature": 1}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "unknown field `temprature`",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "temperature": -0.5}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_sampling",
            "temperature",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "top_p": 0}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_sampling",
            "top_p",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Hi", "max_tokens": 0}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_max_tokens",
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "n": 3}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "`n`",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4", "messages": msgs}).to_string(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "not served",
        ),
        (
            "/v1/completions",
            json!({"prompt": long_prompt}).to_string(),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            "context",
        ),
        (
            "/v1/completions",
            json!({"prompt": long_prompt, "stream": true}).to_string(),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            "context",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 999999]}).to_string(),
            StatusCode::BAD_REQUEST,
            "bad_token_id",
            "vocabulary",
        ),
    ];
    for (path, body, status, code, says) in cases {
        let (got, json) = post_raw(srv, path, body.clone(), Some(srv.bearer())).await;
        let what = format!("{path} {body:.80} -> {got} {json}");
        assert_eq!(got, status, "{what}");
        assert_eq!(json["error"]["code"], code, "{what}");
        assert_eq!(json["error"]["type"], "invalid_request_error", "{what}");
        assert!(json["error"]["message"].as_str().unwrap().contains(says), "{what}");
    }
    // Not UTF-8.
    let mut res = client()
        .post(srv.http("/v1/completions"))
        .insert_header(("Authorization", srv.bearer()))
        .send_body(b"{\"prompt\": \"\xff\xfe\"}".to_vec())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], "invalid_json");

    let (status, json) = post_raw(srv, "/v1/nothing", "{}".into(), Some(srv.bearer())).await;
    assert_eq!((status, json["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));

    // Still serving.
    let (status, ok) = post(srv, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!(status, StatusCode::OK, "{ok}");
}

#[actix_rt::test]
async fn the_api_key_guards_everything_but_health() {
    let _one_at_a_time = exclusive().await;
    let srv = server();
    let body = json!({"prompt": "Hi", "max_tokens": 2}).to_string();
    for auth in [None, Some("Bearer nope".to_string()), Some(API_KEY.to_string()), Some(format!("Bearer {API_KEY}x"))] {
        let (status, json) = post_raw(srv, "/v1/completions", body.clone(), auth.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(json["error"]["code"], "invalid_api_key");
        assert_eq!(json["error"]["type"], "authentication_error");
    }
    for path in ["/v1/models", "/metrics", "/v1/ws"] {
        let res = client().get(srv.http(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let mut health = client().get(srv.http("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");
    let mut models =
        client().get(srv.http("/v1/models")).insert_header(("Authorization", srv.bearer())).send().await.unwrap();
    let models: Value = models.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["object"], "list");
}

#[actix_rt::test]
async fn a_client_leaving_mid_stream_frees_its_request() {
    let _one_at_a_time = exclusive().await;
    let srv = server();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut res = client()
        .post(srv.http("/v1/completions"))
        .insert_header(("Authorization", srv.bearer()))
        .send_json(&body)
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let first = res.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let busy = srv.handle.stats().await.unwrap();
    assert!(busy.running == 1 && busy.kv.target.used > 0, "{busy:?}");
    drop(res); // closes the connection mid-stream
    srv.wait_idle(Duration::from_secs(10)).await;

    // The same for a client that gives up waiting for a non-streamed answer.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true});
    let impatient = awc::Client::builder().timeout(Duration::from_millis(500)).finish();
    let res =
        impatient.post(srv.http("/v1/completions")).insert_header(("Authorization", srv.bearer())).send_json(&body);
    assert!(res.await.is_err(), "4000 tokens in half a second?");
    srv.wait_idle(Duration::from_secs(10)).await;
}

#[actix_rt::test]
async fn metrics_show_the_runtime_after_traffic() {
    let _one_at_a_time = exclusive().await;
    let srv = server();
    let (status, _) =
        post(srv, "/v1/completions", json!({"prompt": "Hello", "max_tokens": 4, "ignore_eos": true})).await;
    assert_eq!(status, StatusCode::OK);
    let mut res =
        client().get(srv.http("/metrics")).insert_header(("Authorization", srv.bearer())).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers().get("content-type").unwrap().to_str().unwrap().starts_with("text/plain"));
    let text = String::from_utf8(res.body().await.unwrap().to_vec()).unwrap();
    let value = |name: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} missing from\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("specula_generation_tokens_total") >= 4.0);
    assert!(value("specula_prompt_tokens_total") >= 1.0);
    assert!(value("specula_steps_total") >= 4.0);
    assert!(value("specula_kv_blocks_total{pool=\"target\"}") > 0.0);
    assert!(text.contains("# TYPE specula_time_to_first_token_seconds histogram"), "{text}");
    assert!(value("specula_time_to_first_token_seconds_count") >= 1.0);
    assert!(text.contains("specula_requests_running"));
}

/// The Python `openai` package against `/v1/chat/completions`, streaming and not. Runs when
/// a Python with `openai` is found: `$SPECULA_TEST_PYTHON`, or `.dev/openai-venv` (made by
/// `scripts/test`); otherwise says so and passes.
#[actix_rt::test]
async fn python_openai_client() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("SPECULA_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".dev/openai-venv/bin/python"));
    if !python.exists() {
        eprintln!(
            "SKIPPED python_openai_client: no Python with `openai` at {} (scripts/test installs it)",
            python.display()
        );
        return;
    }
    let _one_at_a_time = exclusive().await;
    let srv = server();
    let script = root.join("tests/openai_client.py");
    let base = srv.http("/v1");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python).arg(script).args([base.as_str(), API_KEY, MODEL]).output()
    })
    .await
    .unwrap()
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the openai client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai client: ok"), "{stdout}\n{stderr}");
}

/// A full queue is refused with 503 (HTTP) or an `overloaded` error frame (WebSocket), and
/// the server goes on. A server of its own: one running request, one waiting, no more.
#[actix_rt::test]
async fn overload_is_refused_and_then_passes() {
    let _one_at_a_time = exclusive().await; // the metrics are the process's
    let srv = server_support::start(specula::actors::Runtime::builder().max_batch(1).max_waiting(1), None);
    let long = || {
        let mut r = specula::request::GenerateRequest::new(specula::request::Prompt::Text("Once upon a time".into()));
        (r.max_tokens, r.ignore_eos) = (4000, true);
        r
    };
    let mut running = srv.handle.generate(long());
    assert!(matches!(running.next().await, Some(specula::actors::Event::Token { .. })));
    let waiting = srv.handle.generate(long());
    let start = std::time::Instant::now();
    while srv.handle.stats().await.unwrap().waiting == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "the second request never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (status, json) = post_raw(&srv, "/v1/completions", json!({"prompt": "Hi"}).to_string(), None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(
        (json["error"]["code"].as_str(), json["error"]["type"].as_str()),
        (Some("overloaded"), Some("server_error"))
    );

    let (_, mut ws) = awc::Client::new().ws(format!("ws://{}/v1/ws", srv.addr)).connect().await.unwrap();
    ws.send(awc::ws::Message::Text(json!({"type": "generate", "id": 1, "prompt": "Hi"}).to_string().into()))
        .await
        .unwrap();
    let frame = loop {
        if let awc::ws::Frame::Text(bytes) = ws.next().await.unwrap().unwrap() {
            break serde_json::from_slice::<Value>(&bytes).unwrap();
        }
    };
    assert_eq!((frame["type"].as_str(), frame["code"].as_str()), (Some("error"), Some("overloaded")), "{frame}");

    drop((running, waiting));
    srv.wait_idle(Duration::from_secs(10)).await;
    let (status, json) =
        post_raw(&srv, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 2}).to_string(), None).await;
    assert_eq!(status, StatusCode::OK, "{json}");
}

/// `specula_requests_failed_total{reason}` in `/metrics`.
async fn failed_total(srv: &TestServer, reason: &str) -> u64 {
    let mut res = client().get(srv.http("/metrics")).send().await.unwrap();
    let text = String::from_utf8(res.body().limit(1 << 22).await.unwrap().to_vec()).unwrap();
    let name = format!("specula_requests_failed_total{{reason=\"{reason}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&name)).map_or(0, |n| n.parse().unwrap())
}

/// Every refusal is counted by its code, the 503s of a full submit queue included: a burst
/// far faster than the runtime takes submissions, into a queue of one.
#[actix_rt::test]
async fn refusals_are_counted_by_reason() {
    use server_support::paced;
    use specula::actors::Event;
    use specula::request::{GenerateRequest, Prompt};
    let _one_at_a_time = exclusive().await;
    let srv = server_support::start_with(server_support::config(), || paced::runtime(Duration::from_millis(20), 1, 1));
    let before = failed_total(&srv, "overloaded").await;
    let request = GenerateRequest { max_tokens: 2, ..GenerateRequest::new(Prompt::Tokens(vec![1, 2])) };
    let mut streams: Vec<_> = (0..200).map(|_| srv.handle.generate(request.clone())).collect();
    let mut overloaded = 0;
    for events in &mut streams {
        while let Some(event) = events.next().await {
            if let Event::Error(e) = event {
                assert_eq!(e.code(), "overloaded", "{e}");
                overloaded += 1;
            }
        }
    }
    assert!(overloaded > 100, "only {overloaded} of 200 refused");
    assert_eq!(failed_total(&srv, "overloaded").await - before, overloaded);
}
