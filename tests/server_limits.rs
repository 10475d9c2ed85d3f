//! The limits on what one client may hold, tried the way a hostile client would, over raw
//! TCP: WebSocket frame headers that promise more than the limit or never deliver, bodies
//! sent in part, chunked uploads that never end, more requests in flight than allowed, and
//! many connections held at once. Servers here run the paced runtime (no model).

mod server_support;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use specula::server::limits::Limits;
use specula::server::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use server_support::raw::{self, close_code, frame_header, read_until_closed, text_frame, ws_handshake, Outcome};
use server_support::{start_paced, TestServer};

const STEP: Duration = Duration::from_millis(5);

fn server_with(limits: Limits) -> TestServer {
    start_paced(STEP, ServerConfig { limits, ..server_support::config() })
}

/// The HTTP status of a raw response, and whether it carried `connection: close`.
fn status(response: &str) -> u16 {
    response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The JSON body of a raw (non-chunked) response.
fn json_body(response: &str) -> Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

async fn send(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut tcp = raw::connect(addr).await;
    tcp.write_all(bytes).await.unwrap();
    tcp
}

/// A WebSocket round trip still works: the server is unharmed.
async fn ws_still_serves(srv: &TestServer) {
    let (mut ws, _) = tokio_tungstenite::connect_async(srv.ws()).await.expect("a WebSocket");
    let frame = json!({"type": "generate", "id": 1, "prompt": "w5", "max_tokens": 3});
    ws.send(Message::text(frame.to_string())).await.unwrap();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        let Message::Text(text) = msg else { continue };
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "done" {
            assert_eq!(frame["usage"]["completion_tokens"], 3);
            return;
        }
        assert_eq!(frame["type"], "delta", "{frame}");
    }
}

#[tokio::test]
async fn a_websocket_frame_over_the_limit_is_refused_at_its_header() {
    let limit = 64 << 10;
    let srv = server_with(Limits { ws_max_frame_bytes: limit, ..Limits::default() });
    for declared in [limit as u64 + 1, 20 << 20, 1 << 40, i64::MAX as u64] {
        let mut tcp = ws_handshake(srv.addr, None).await;
        let start = Instant::now();
        // The header alone: the server must not wait for (or buffer) the payload.
        tcp.write_all(&frame_header(0x1, declared, [1, 2, 3, 4])).await.unwrap();
        let outcome = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
        assert!(matches!(outcome, Outcome::Closed(_)), "declared {declared}: still open");
        let (code, reason) = close_code(outcome.bytes()).expect("a close frame");
        assert_eq!(code, 1009, "declared {declared}: {reason}");
        assert!(reason.contains(&declared.to_string()), "{reason}");
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }
    // A frame at the limit is read: a prompt of that size, refused by the runtime as too long.
    let mut tcp = ws_handshake(srv.addr, None).await;
    let prefix = r#"{"type":"generate","id":"big","prompt":""#;
    let words = "w1 ".repeat((limit - prefix.len() - 2) / 3);
    let frame = format!("{prefix}{words:<width$}\"}}", width = limit - prefix.len() - 2);
    assert_eq!(frame.len(), limit);
    tcp.write_all(&text_frame(&frame)).await.unwrap();
    let outcome = read_until_closed(&mut tcp, Duration::from_secs(3)).await;
    assert!(outcome.text().contains("context_length_exceeded"), "{}", outcome.text());
    assert!(matches!(outcome, Outcome::Open(_)));
    ws_still_serves(&srv).await;
}

#[tokio::test]
async fn a_websocket_message_that_stalls_is_cut_off() {
    let srv = server_with(Limits { body_timeout: Duration::from_millis(800), ..Limits::default() });
    let partial_frame = [frame_header(0x1, 1000, [1, 2, 3, 4]), b"{\"type\":".to_vec()].concat();
    let mut first_fragment = text_frame(r#"{"type":"gen"#);
    first_fragment[0] &= 0x7F; // no FIN: the message goes on in a continuation frame
    for (what, bytes) in [("a partial frame", partial_frame), ("a first fragment", first_fragment)] {
        let mut tcp = ws_handshake(srv.addr, None).await;
        let start = Instant::now();
        tcp.write_all(&bytes).await.unwrap();
        let outcome = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
        assert!(matches!(outcome, Outcome::Closed(_)), "{what}: still open");
        assert_eq!(close_code(outcome.bytes()).map(|c| c.0), Some(1008), "{what}: {}", outcome.text());
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3), "{what}: {took:?}");
    }
    // Idle between messages is not stalling: a connection may wait for its next request.
    let mut tcp = ws_handshake(srv.addr, None).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    tcp.write_all(&text_frame(r#"{"type":"generate","id":1,"prompt":"w3","max_tokens":2}"#)).await.unwrap();
    let outcome = read_until_closed(&mut tcp, Duration::from_millis(500)).await;
    assert!(matches!(outcome, Outcome::Open(_)) && outcome.text().contains("\"done\""), "{}", outcome.text());
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// The next frame that is not a `delta`.
async fn next_non_delta(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        if let Message::Text(text) = msg {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] != "delta" {
                return frame;
            }
        }
    }
}

#[tokio::test]
async fn requests_in_flight_on_one_websocket_are_capped() {
    let srv = server_with(Limits { ws_max_in_flight: 2, ..Limits::default() });
    let (mut ws, _) = tokio_tungstenite::connect_async(srv.ws()).await.unwrap();
    let long = |id: &str| json!({"type": "generate", "id": id, "prompt": "w1", "max_tokens": 100000}).to_string();
    for id in ["a", "b", "c"] {
        ws.send(Message::text(long(id))).await.unwrap();
    }
    let refused = next_non_delta(&mut ws).await;
    assert_eq!(
        (refused["id"].as_str(), refused["code"].as_str()),
        (Some("c"), Some("too_many_in_flight")),
        "{refused}"
    );
    assert!(refused["message"].as_str().unwrap().contains("at most 2"), "{refused}");
    // Once one has ended, there is room again.
    ws.send(Message::text(json!({"type": "cancel", "id": "a"}).to_string())).await.unwrap();
    let done = next_non_delta(&mut ws).await;
    assert_eq!((done["id"].as_str(), done["finish_reason"].as_str()), (Some("a"), Some("cancelled")));
    ws.send(Message::text(long("c"))).await.unwrap();
    ws.send(Message::text(json!({"type": "cancel", "id": "c"}).to_string())).await.unwrap();
    let done = next_non_delta(&mut ws).await;
    assert_eq!((done["id"].as_str(), done["finish_reason"].as_str()), (Some("c"), Some("cancelled")), "{done}");
}

#[tokio::test]
async fn a_body_sent_in_part_times_out_and_closes_the_connection() {
    let srv = server_with(Limits { body_timeout: Duration::from_millis(800), ..Limits::default() });
    let sized = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":";
    let chunked = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n";
    for (what, request) in [("content-length", sized), ("chunked", chunked)] {
        let mut tcp = send(srv.addr, request.as_bytes()).await;
        let start = Instant::now();
        let outcome = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
        assert!(matches!(outcome, Outcome::Closed(_)), "{what}: held open: {}", outcome.text());
        let response = outcome.text();
        assert_eq!(status(&response), 408, "{what}: {response}");
        assert_eq!(json_body(&response)["error"]["code"], "request_timeout", "{what}: {response}");
        assert!(start.elapsed() >= Duration::from_millis(700), "{what}: {:?}", start.elapsed());
    }
}

#[tokio::test]
async fn headers_sent_in_part_time_out_on_every_request_of_a_connection() {
    let srv = server_with(Limits { header_timeout: Duration::from_millis(800), ..Limits::default() });
    let mut tcp = send(srv.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n").await;
    let outcome = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(matches!(outcome, Outcome::Closed(_)), "held open: {}", outcome.text());
    assert_eq!(status(&outcome.text()), 408, "{}", outcome.text());
    // A second request begun on the same connection must not be held either.
    let mut tcp = send(srv.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut first = vec![0u8; 4096];
    let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut first).await.unwrap();
    assert_eq!(status(&String::from_utf8_lossy(&first[..n])), 200);
    let _ = tcp.write_all(b"GET /hea").await;
    let outcome = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(matches!(outcome, Outcome::Closed(_)), "a second request's headers held the connection");
}

#[tokio::test]
async fn an_oversized_body_is_refused_and_the_connection_closed() {
    let srv = server_with(Limits { max_body_bytes: 1024, ..Limits::default() });
    // Declared too large: refused before the body is sent.
    let mut tcp = send(srv.addr, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n").await;
    let outcome = read_until_closed(&mut tcp, Duration::from_secs(3)).await;
    assert!(matches!(outcome, Outcome::Closed(_)), "held open: {}", outcome.text());
    assert_eq!(status(&outcome.text()), 413, "{}", outcome.text());
    assert_eq!(json_body(&outcome.text())["error"]["code"], "payload_too_large");
    // Chunked, over the limit and still coming: refused and closed, not drained.
    let mut tcp =
        send(srv.addr, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").await;
    let chunk = format!("100\r\n{}\r\n", "a".repeat(256));
    for _ in 0..5 {
        tcp.write_all(chunk.as_bytes()).await.unwrap();
    }
    let start = Instant::now();
    let outcome = loop {
        // Keep sending, as an endless upload would; the server must close regardless.
        let _ = tcp.write_all(chunk.as_bytes()).await;
        match read_until_closed(&mut tcp, Duration::from_millis(100)).await {
            Outcome::Open(got) if start.elapsed() < Duration::from_secs(5) => {
                assert!(got.is_empty() || got.starts_with(b"HTTP"))
            }
            outcome => break outcome,
        }
    };
    assert!(matches!(outcome, Outcome::Closed(_)), "a chunked upload kept the connection open after its 413");
}

#[tokio::test]
async fn a_body_no_route_reads_closes_the_connection() {
    let srv = server_with(Limits::default());
    // POST /health has no route; GET /health never reads a body. Chunks trickle on forever.
    for request in ["POST /health", "GET /health", "POST /v1/nothing"] {
        let head = format!("{request} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
        let mut tcp = send(srv.addr, head.as_bytes()).await;
        let outcome = read_until_closed(&mut tcp, Duration::from_secs(3)).await;
        assert!(matches!(outcome, Outcome::Closed(_)), "{request}: held open: {}", outcome.text());
        assert!(matches!(status(&outcome.text()), 200 | 404), "{request}: {}", outcome.text());
    }
}

/// More half-sent requests than the server takes connections: they wait to be accepted and
/// are cut off at the body deadline, and `/health` is answered in between.
#[tokio::test]
async fn health_answers_while_many_requests_are_half_sent() {
    let limits = Limits { max_connections: 40, body_timeout: Duration::from_millis(500), ..Limits::default() };
    let srv = server_with(limits);
    let request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro";
    let mut held = vec![];
    for _ in 0..100 {
        held.push(send(srv.addr, request).await);
    }
    let start = Instant::now();
    let mut tcp = send(srv.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let outcome = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert_eq!(status(&outcome.text()), 200, "no answer from /health: {}", outcome.text());
    // 100 held requests, 40 at a time, 0.5 s each.
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    for mut tcp in held {
        let outcome = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
        assert_eq!(status(&outcome.text()), 408, "{}", outcome.text());
    }
    ws_still_serves(&srv).await;
}

/// A client that asks for tokens and never reads them: once the server's buffers for it are
/// full it is disconnected after the send deadline, and its requests are cancelled (they
/// would otherwise run to their end and the connection stay open for good).
#[tokio::test]
async fn a_websocket_client_that_stops_reading_is_disconnected() {
    let limits = Limits { send_timeout: Duration::from_secs(1), ..Limits::default() };
    let srv = start_paced(Duration::from_millis(3), ServerConfig { limits, ..server_support::config() });
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(srv.addr).await.unwrap();
    let mut tcp = raw::ws_upgrade(tcp, srv.addr, None).await;
    for id in 0..8 {
        let frame = json!({"type": "generate", "id": id, "prompt": "w1", "max_tokens": 100000});
        tcp.write_all(&text_frame(&frame.to_string())).await.unwrap();
    }
    // 8 rows of 4095 tokens at 3 ms a step would take over 12 s.
    let start = Instant::now();
    while srv.handle.stats().await.unwrap().running < 8 {
        assert!(start.elapsed() < Duration::from_secs(5), "the requests never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    srv.wait_idle(Duration::from_secs(8)).await;
    // What the client finds when it looks: a reset connection.
    let mut buf = vec![0u8; 1 << 20];
    let mut outcome = Ok(1);
    while matches!(outcome, Ok(n) if n > 0) {
        outcome = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
    }
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
}
