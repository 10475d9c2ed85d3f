//! The WebSocket protocol at `/v1/ws`, driven by a real client (tokio-tungstenite) against a
//! real server on a loopback port: multiplexed requests, cancel, bad frames, the API key,
//! and a client that vanishes mid-stream.

mod server_support;

use std::collections::HashMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use specula::actors::collect;
use specula::core::sampling::SamplingParams;
use specula::model::chat::ChatMessage;
use specula::request::{GenerateRequest, Prompt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, StatusCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use server_support::{exclusive, server, TestServer};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect_with(srv: &TestServer, auth: Option<&str>) -> Result<Ws, WsError> {
    let mut request = srv.ws().into_client_request().unwrap();
    if let Some(auth) = auth {
        request.headers_mut().insert(header::AUTHORIZATION, auth.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.map(|(ws, _)| ws)
}

async fn connect(srv: &TestServer) -> Ws {
    connect_with(srv, Some(&srv.bearer())).await.expect("the WebSocket handshake succeeds")
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// The next JSON frame from the server (pings and pongs skipped).
async fn recv(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a frame within a minute")
            .expect("the connection is open")
            .expect("a valid frame");
        match msg {
            Message::Text(text) => return serde_json::from_str(&text).expect("the server sends JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// What one request received: text, token ids, and its `done` frame.
#[derive(Default, Debug)]
struct Received {
    text: String,
    ids: Vec<u64>,
    done: Option<Value>,
}

/// Reads frames until every id in `ids` has its `done`; returns the frames in order too.
async fn until_done(ws: &mut Ws, ids: &[&str]) -> (HashMap<String, Received>, Vec<Value>) {
    let mut got: HashMap<String, Received> = ids.iter().map(|i| (i.to_string(), Received::default())).collect();
    let mut order = vec![];
    while got.values().any(|r| r.done.is_none()) {
        let frame = recv(ws).await;
        let id = frame["id"].as_str().expect("a string id").to_string();
        let r = got.get_mut(&id).unwrap_or_else(|| panic!("a frame for an unknown id: {frame}"));
        assert!(r.done.is_none(), "a frame after done: {frame}");
        match frame["type"].as_str().unwrap() {
            "delta" => {
                r.text.push_str(frame["text"].as_str().unwrap());
                r.ids.extend(frame["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()));
            }
            "done" => r.done = Some(frame.clone()),
            _ => panic!("unexpected frame {frame}"),
        }
        order.push(frame);
    }
    (got, order)
}

#[tokio::test]
async fn two_interleaved_requests_and_a_cancel() {
    let _one_at_a_time = exclusive().await;
    let srv = server();
    let mut ws = connect(srv).await;
    send(&mut ws, json!({"type": "generate", "id": "a", "prompt": "The capital of France is", "max_tokens": 12, "ignore_eos": true})).await;
    let chat = [json!({"role": "user", "content": "Name three colours."})];
    send(&mut ws, json!({"type": "generate", "id": "b", "messages": chat, "max_tokens": 12, "temperature": 0})).await;
    // A long request to cancel once it has started.
    send(
        &mut ws,
        json!({"type": "generate", "id": "c", "prompt": "Count: 1, 2, 3,", "max_tokens": 2000, "ignore_eos": true}),
    )
    .await;

    let mut got: HashMap<String, Received> =
        ["a", "b", "c"].iter().map(|i| (i.to_string(), Received::default())).collect();
    let mut order = vec![];
    let mut cancelled = false;
    while got.values().any(|r| r.done.is_none()) {
        let frame = recv(&mut ws).await;
        let id = frame["id"].as_str().unwrap().to_string();
        let r = got.get_mut(&id).unwrap();
        match frame["type"].as_str().unwrap() {
            "delta" => {
                r.text.push_str(frame["text"].as_str().unwrap());
                r.ids.extend(frame["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()));
                if id == "c" && !cancelled {
                    send(&mut ws, json!({"type": "cancel", "id": "c"})).await;
                    cancelled = true;
                }
            }
            "done" => r.done = Some(frame.clone()),
            _ => panic!("unexpected frame {frame}"),
        }
        order.push(id);
    }

    // Both requests ran at once on the one connection: each had output before the other ended.
    let first = |id: &str| order.iter().position(|x| x == id).unwrap();
    let last = |id: &str| order.iter().rposition(|x| x == id).unwrap();
    assert!(first("a") < last("b") && first("b") < last("a"), "not interleaved: {order:?}");

    for id in ["a", "b"] {
        let done = got[id].done.as_ref().unwrap();
        assert_eq!(done["usage"]["completion_tokens"].as_u64().unwrap() as usize, got[id].ids.len(), "{done}");
        assert!(done["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
        assert!(done.get("speculative").is_some(), "{done}");
        assert!(!got[id].text.is_empty());
    }
    assert_eq!(got["a"].done.as_ref().unwrap()["finish_reason"], "length");
    assert_eq!(got["a"].ids.len(), 12);
    let c = got["c"].done.as_ref().unwrap();
    assert_eq!(c["finish_reason"], "cancelled", "{c}");
    assert!(got["c"].ids.len() < 2000);

    // The WebSocket adds nothing: the same greedy requests in-process give the same text.
    let mut a = GenerateRequest::new(Prompt::Text("The capital of France is".into()));
    (a.max_tokens, a.ignore_eos) = (12, true);
    assert_eq!(collect(srv.handle.generate(a)).await.unwrap().text, got["a"].text);
    let mut b = GenerateRequest::new(Prompt::Chat(vec![ChatMessage::user("Name three colours.")]));
    (b.max_tokens, b.sampling) = (12, SamplingParams::greedy());
    assert_eq!(collect(srv.handle.generate(b)).await.unwrap().text, got["b"].text);

    // The cancelled request let go of its blocks.
    srv.wait_idle(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_stays_up() {
    let _one_at_a_time = exclusive().await;
    let srv = server();
    let mut ws = connect(srv).await;
    let long_prompt = "hello ".repeat(9000);
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        ("{not json".into(), None, "invalid_json"),
        (r#"["generate"]"#.into(), None, "invalid_request"),
        (r#"{"type":"dance","id":"x1"}"#.into(), Some("x1"), "unknown_type"),
        (r#"{"id":"x2","prompt":"hi"}"#.into(), Some("x2"), "invalid_request"),
        (r#"{"type":"generate","prompt":"hi"}"#.into(), None, "invalid_request"),
        (r#"{"type":"generate","id":"x3"}"#.into(), Some("x3"), "invalid_request"),
        (r#"{"type":"generate","id":"x4","prompt":42}"#.into(), Some("x4"), "invalid_request"),
        (r#"{"type":"generate","id":"x5","prompt":"hi","max_tokens":"many"}"#.into(), Some("x5"), "invalid_request"),
        (r#"{"type":"generate","id":"x6","prompt":"hi","temprature":0.5}"#.into(), Some("x6"), "invalid_request"),
        (r#"{"type":"generate","id":"x7","prompt":"hi","temperature":-1}"#.into(), Some("x7"), "invalid_sampling"),
        (r#"{"type":"generate","id":"x8","prompt":"hi","top_p":1.5}"#.into(), Some("x8"), "invalid_sampling"),
        (r#"{"type":"generate","id":"x9","prompt":"hi","max_tokens":0}"#.into(), Some("x9"), "invalid_max_tokens"),
        (r#"{"type":"generate","id":"x10","prompt":"hi","top_k":-3}"#.into(), Some("x10"), "invalid_request"),
        (r#"{"type":"cancel","id":"nobody"}"#.into(), Some("nobody"), "unknown_id"),
        (
            json!({"type": "generate", "id": "x11", "prompt": long_prompt}).to_string(),
            Some("x11"),
            "context_length_exceeded",
        ),
    ];
    for (frame, id, code) in &cases {
        ws.send(Message::text(frame.clone())).await.unwrap();
        let reply = recv(&mut ws).await;
        assert_eq!(reply["type"], "error", "{frame:.80} -> {reply}");
        assert_eq!(reply["code"], *code, "{frame:.80} -> {reply}");
        assert_eq!(reply["id"], id.map_or(Value::Null, |i| json!(i)), "{frame:.80} -> {reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(recv(&mut ws).await["type"], "error");

    // A duplicate id while the first is in flight.
    send(&mut ws, json!({"type": "generate", "id": "dup", "prompt": "Hello", "max_tokens": 8, "ignore_eos": true}))
        .await;
    send(&mut ws, json!({"type": "generate", "id": "dup", "prompt": "Hello", "max_tokens": 8})).await;
    let mut duplicate_refused = false;
    let mut tokens = 0;
    loop {
        let f = recv(&mut ws).await;
        match f["type"].as_str().unwrap() {
            "error" => {
                assert_eq!(f["code"], "duplicate_id");
                duplicate_refused = true;
            }
            "delta" => tokens += f["token_ids"].as_array().unwrap().len(),
            "done" => break,
            _ => unreachable!(),
        }
    }
    assert!(duplicate_refused);
    assert_eq!(tokens, 8);

    // Still serving, on the same connection.
    send(&mut ws, json!({"type": "generate", "id": 7, "prompt": "Hi", "max_tokens": 3, "ignore_eos": true})).await;
    let mut last = recv(&mut ws).await;
    while last["type"] == "delta" {
        assert_eq!(last["id"], 7);
        last = recv(&mut ws).await;
    }
    assert_eq!((last["type"].as_str(), last["id"].as_u64()), (Some("done"), Some(7)));
}

#[tokio::test]
async fn the_api_key_is_required() {
    let _one_at_a_time = exclusive().await;
    let srv = server();
    for auth in [None, Some("Bearer wrong-key"), Some("test-key-0123")] {
        match connect_with(srv, auth).await {
            Err(WsError::Http(response)) => assert_eq!(response.status(), StatusCode::UNAUTHORIZED),
            other => panic!("{auth:?}: expected 401, got {:?}", other.map(|_| "a connection")),
        }
    }
    let mut ws = connect(srv).await;
    send(&mut ws, json!({"type": "generate", "id": "k", "prompt": "Hi", "max_tokens": 2})).await;
    let (got, _) = until_done(&mut ws, &["k"]).await;
    assert!(got["k"].done.is_some());
}

#[tokio::test]
async fn a_vanished_client_frees_its_requests() {
    let _one_at_a_time = exclusive().await;
    let srv = server();
    let mut ws = connect(srv).await;
    for id in ["long1", "long2"] {
        send(
            &mut ws,
            json!({"type": "generate", "id": id, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true}),
        )
        .await;
    }
    // Both are running once each has streamed a token.
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        let f = recv(&mut ws).await;
        assert_eq!(f["type"], "delta", "{f}");
        seen.insert(f["id"].as_str().unwrap().to_string());
    }
    let busy = srv.handle.stats().await.unwrap();
    assert!(busy.running == 2 && busy.kv.target.used > 0, "{busy:?}");
    // Gone without a close frame: the TCP connection just drops.
    drop(ws);
    // 4000 tokens each would take minutes; cancelled, the blocks come back at once.
    srv.wait_idle(Duration::from_secs(10)).await;

    // A clean close does the same.
    let mut ws = connect(srv).await;
    send(&mut ws, json!({"type": "generate", "id": "long3", "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true})).await;
    assert_eq!(recv(&mut ws).await["type"], "delta");
    ws.close(None).await.unwrap();
    srv.wait_idle(Duration::from_secs(10)).await;
}

/// A server started with speculation: the `done` frame carries the request's statistics,
/// the text is what plain decoding gives, and `/metrics` counts drafts and acceptances.
#[tokio::test]
async fn a_speculating_server_reports_its_drafts() {
    use specula::spec::{NgramProposer, Speculation};
    let _one_at_a_time = exclusive().await;
    let spec = Speculation {
        proposer: Box::new(NgramProposer::default()),
        max_draft: 8,
        synthetic_acceptance: None,
        lengths: Default::default(),
        tree: None,
    };
    let srv = server_support::start(specula::actors::Runtime::builder().speculation(spec), None);
    let prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick";
    let mut ws = connect_with(&srv, None).await.unwrap();
    send(&mut ws, json!({"type": "generate", "id": "s", "prompt": prompt, "max_tokens": 24, "ignore_eos": true})).await;
    let (got, _) = until_done(&mut ws, &["s"]).await;
    let done = got["s"].done.as_ref().unwrap();
    let spec = &done["speculative"];
    assert!(spec["drafted"].as_u64().unwrap() > 0 && spec["accepted"].as_u64().unwrap() > 0, "{done}");
    assert!(spec["mean_accepted_length"].as_f64().unwrap() > 1.0, "{done}");
    assert!(spec.get("synthetic").is_none(), "{done}");

    let plain =
        GenerateRequest { max_tokens: 24, ignore_eos: true, ..GenerateRequest::new(Prompt::Text(prompt.into())) };
    let want = collect(server().handle.generate(plain)).await.unwrap();
    assert_eq!(got["s"].text, want.text, "speculation changed the output");

    let metrics = http_get(&srv, "/metrics").await;
    for name in ["specula_spec_drafts_total", "specula_spec_draft_tokens_total", "specula_spec_accepted_tokens_total"] {
        assert!(metrics.lines().any(|l| l.starts_with(name)), "{name} missing from\n{metrics}");
    }
    assert!(metrics.contains("specula_spec_accepted_by_position_total{position=\"1\"}"), "{metrics}");
}

/// GET over a plain TCP connection (the WebSocket tests carry no HTTP client).
async fn http_get(srv: &TestServer, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", srv.addr);
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    body
}
