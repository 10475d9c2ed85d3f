//! A raw TCP client for what no well-behaved client library sends: partial headers and
//! bodies, WebSocket frame headers that promise more than they deliver.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a connection gave back within a time limit.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server closed the connection after sending these bytes.
    Closed(Vec<u8>),
    /// Still open when the time ran out, with these bytes received.
    Open(Vec<u8>),
}

impl Outcome {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Outcome::Closed(b) | Outcome::Open(b) => b,
        }
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }
}

/// Reads until the server closes the connection or `limit` passes.
pub async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> Outcome {
    let mut got = vec![];
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return Outcome::Open(got),
            Ok(Ok(0)) | Ok(Err(_)) => return Outcome::Closed(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("the server accepts")
}

/// Opens a WebSocket at `/v1/ws` by hand; returns the stream after the 101 response.
pub async fn ws_handshake(addr: SocketAddr, auth: Option<&str>) -> TcpStream {
    ws_upgrade(connect(addr).await, addr, auth).await
}

/// The WebSocket handshake on a connection of the caller's making.
pub async fn ws_upgrade(mut tcp: TcpStream, addr: SocketAddr, auth: Option<&str>) -> TcpStream {
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // Read the response head byte by byte, so that nothing after it is consumed.
    let mut head = vec![];
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n =
            tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut b)).await.expect("a handshake answer").unwrap();
        assert_eq!(n, 1, "closed during the handshake: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// The header of a masked client frame (FIN set) declaring `len` payload bytes.
pub fn frame_header(opcode: u8, len: u64, mask: [u8; 4]) -> Vec<u8> {
    let mut h = vec![0x80 | opcode];
    match len {
        0..=125 => h.push(0x80 | len as u8),
        126..=0xFFFF => {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            h.push(0x80 | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
    }
    h.extend_from_slice(&mask);
    h
}

/// A whole masked client text frame.
pub fn text_frame(text: &str) -> Vec<u8> {
    let mask = [1, 2, 3, 4];
    let mut f = frame_header(0x1, text.len() as u64, mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The close code of the first close frame (opcode 8) in `bytes`, server frames being unmasked.
pub fn close_code(bytes: &[u8]) -> Option<(u16, String)> {
    let mut i = 0;
    while i + 2 <= bytes.len() {
        let opcode = bytes[i] & 0x0F;
        let (len, start) = match bytes[i + 1] & 0x7F {
            126 => (u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize, i + 4),
            127 => (u64::from_be_bytes(bytes[i + 2..i + 10].try_into().unwrap()) as usize, i + 10),
            n => (n as usize, i + 2),
        };
        if start + len > bytes.len() {
            return None;
        }
        if opcode == 0x8 && len >= 2 {
            let payload = &bytes[start..start + len];
            return Some((u16::from_be_bytes([payload[0], payload[1]]), String::from_utf8_lossy(&payload[2..]).into()));
        }
        i = start + len;
    }
    None
}
