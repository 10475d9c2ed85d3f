//! `specula serve` as an operator runs it: settings refused at start, SIGTERM with streams
//! open, and more held connections than the process has file descriptors.

mod server_support;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use server_support::process::{self, Start};

#[test]
fn settings_no_client_could_use_are_refused_at_start() {
    // Flags, environment variables, and what the refusal says.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        (&["--api-key", ""], &[], "the API key (--api-key or SPECULA_API_KEY) is empty"),
        (&["--api-key", "   "], &[], "has a space, a control or a non-ASCII character at byte 0"),
        (&["--api-key", "s3cret "], &[], "at byte 6"),
        (&[], &[("SPECULA_API_KEY", "")], "is empty"),
        (&[], &[("SPECULA_API_KEY", " s3cret")], "at byte 0"),
        (&["--max-waiting", "0"], &[], "invalid value '0' for '--max-waiting <MAX_WAITING>': must be at least 1"),
    ];
    for (args, env, message) in cases {
        match process::refused(args, env) {
            Start::Refused { status, stderr } => {
                assert!(!status.success(), "{args:?} {env:?}: {status}");
                assert!(stderr.contains(message), "{args:?} {env:?}: {stderr}");
            }
            Start::Served { stderr } => panic!("{args:?} {env:?}: started serving:\n{stderr}"),
        }
    }
    // A key is never echoed back, even a refused one.
    let Start::Refused { stderr, .. } = process::refused(&["--api-key", "sécret-key"], &[]) else { panic!() };
    assert!(stderr.contains("at byte 1") && !stderr.contains("sécret-key"), "{stderr}");
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn generate(ws: &mut Ws, id: &str) {
    let frame =
        json!({"type": "generate", "id": id, "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true});
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// Reads until the server's close frame: the last frame of each request id, and the close code.
async fn until_close(ws: &mut Ws) -> (Vec<Value>, Option<CloseCode>) {
    let mut last = std::collections::BTreeMap::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next()).await.expect("a frame or a close");
        match msg {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                last.insert(frame["id"].as_str().unwrap_or("?").to_string(), frame);
            }
            Some(Ok(Message::Close(close))) => return (last.into_values().collect(), close.map(|c| c.code)),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("the connection broke without a close frame: {e}"),
            None => return (last.into_values().collect(), None),
        }
    }
}

/// On SIGTERM every open stream hears how it ended and the process exits within the drain
/// time: WebSocket requests an `error` (`shutting_down`) or their `done`, then a close (1001);
/// an idle WebSocket a close; an SSE stream its error chunk and `[DONE]`.
#[tokio::test]
async fn sigterm_gives_every_open_stream_a_final_frame_and_a_close() {
    let mut served = process::serve(&["--drain-timeout", "1"], None);
    let url = format!("ws://{}/v1/ws", served.addr);
    let (mut busy, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut idle, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    generate(&mut busy, "a").await;
    generate(&mut busy, "b").await;
    let mut started = std::collections::HashSet::new();
    while started.len() < 2 {
        if let Some(Ok(Message::Text(text))) = busy.next().await {
            started.insert(serde_json::from_str::<Value>(&text).unwrap()["id"].as_str().unwrap().to_string());
        }
    }
    let mut sse = TcpStream::connect(served.addr).await.unwrap();
    let body = json!({"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 4000,
                      "ignore_eos": true, "stream": true})
    .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sse.write_all(request.as_bytes()).await.unwrap();
    let mut first = vec![0u8; 4096];
    let n = sse.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("200 OK"));

    let signalled = Instant::now();
    served.signal("TERM");
    generate(&mut busy, "late").await; // too late: refused, or failed with the rest

    let (last, close) = until_close(&mut busy).await;
    assert_eq!(close, Some(CloseCode::Away), "{last:?}");
    assert_eq!(last.len(), 3, "{last:?}");
    for frame in &last {
        let ended = frame["type"] == "done" || frame["code"] == "shutting_down";
        assert!(ended, "not a final frame: {frame}");
    }
    let (frames, close) = until_close(&mut idle).await;
    assert_eq!((frames.len(), close), (0, Some(CloseCode::Away)));

    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(20), sse.read_to_string(&mut rest)).await.unwrap().unwrap();
    let events: Vec<&str> = rest.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{rest}");
    assert!(events[events.len() - 2].contains("shutting_down"), "{rest}");

    let status = served.wait_exit(Duration::from_secs(10)).expect("the server exits");
    assert!(status.success(), "{status}\n{}", served.log());
    assert!(signalled.elapsed() < Duration::from_secs(8), "{:?}", signalled.elapsed());
    assert!(!served.log().contains("panicked"), "{}", served.log());
}

/// How many files the server has open.
fn open_fds(served: &process::Served) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", served.child.id())).map_or(0, |d| d.count())
}

/// 300 requests that send their headers and part of their body, against a server allowed
/// 128 open files: it accepts what it has descriptors for, cuts the rest off at the body
/// deadline, and keeps answering `/health`.
#[tokio::test]
async fn health_answers_with_more_held_requests_than_file_descriptors() {
    let served = process::serve(&["--body-timeout", "1"], Some(128));
    let request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro";
    let mut held = vec![];
    for _ in 0..300 {
        let mut tcp = TcpStream::connect(served.addr).await.expect("connect");
        tcp.write_all(request).await.unwrap();
        held.push(tcp);
    }
    // The default cap for 128 files is 64 connections: with the files any process holds
    // (event loops, the model) the server stays well below its limit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds = open_fds(&served);
    assert!(fds <= 100, "{fds} files open of 128");
    let start = Instant::now();
    let mut health = TcpStream::connect(served.addr).await.unwrap();
    health.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(20), health.read_to_string(&mut answer)).await;
    assert!(
        read.is_ok() && answer.contains("{\"status\":\"ok\"}"),
        "no answer from /health: {answer:?}\n{}",
        served.log()
    );
    eprintln!("/health answered after {:?} behind 300 held requests", start.elapsed());
    drop(held);
    // And it still generates.
    let mut tcp = TcpStream::connect(served.addr).await.unwrap();
    let body = r#"{"prompt":"The capital of France is","max_tokens":2}"#;
    let request = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
