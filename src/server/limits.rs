//! What one client may hold of the server, and for how long. Every limit has a flag of
//! `specula serve`; a client over one gets a documented error and nothing else is affected.
//!
//! | limit | default | beyond it |
//! |---|---|---|
//! | `max_body_bytes` | 4 MiB | 413 `payload_too_large`, connection closed |
//! | `header_timeout` | 5 s | 408, connection closed (actix's own answer) |
//! | `body_timeout` | 30 s | 408 `request_timeout`, connection closed; a WebSocket message: close 1008 |
//! | `ws_max_frame_bytes` | 4 MiB | close 1009, at the frame's header |
//! | `ws_max_in_flight` | 64 | an `error` frame `too_many_in_flight` |
//! | `max_connections` | 1024, fewer if file descriptors are short | new connections wait to be accepted |
//! | `send_timeout` | 30 s | a client that reads nothing of what it is sent: disconnected |

use std::time::Duration;

/// File descriptors kept back from connections: the model files, the listening sockets,
/// the event loops' own, logs.
pub const RESERVED_FDS: u64 = 64;
/// `max_connections` when file descriptors are plentiful.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest HTTP request body.
    pub max_body_bytes: usize,
    /// A request's headers must arrive whole within this of its connection's start.
    pub header_timeout: Duration,
    /// A request's body, and each WebSocket message, must arrive whole within this of its
    /// first byte.
    pub body_timeout: Duration,
    /// Largest WebSocket frame, and message (continuation frames together).
    pub ws_max_frame_bytes: usize,
    /// Most requests in flight on one WebSocket connection.
    pub ws_max_in_flight: usize,
    /// Most connections open at once, WebSocket ones included.
    pub max_connections: usize,
    /// A client that takes none of what it is sent for this long is disconnected.
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 4 << 20,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(30),
            ws_max_frame_bytes: 4 << 20,
            ws_max_in_flight: 64,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            send_timeout: Duration::from_secs(30),
        }
    }
}

/// A limit that cannot be honoured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    #[error("{0} must be positive")]
    Zero(&'static str),
    #[error(
        "--max-connections {wanted} needs more file descriptors than this process may open \
         ({fd_limit}, of which {RESERVED_FDS} are kept back); raise `ulimit -n` or lower --max-connections"
    )]
    NotEnoughFds { wanted: usize, fd_limit: u64 },
}

impl Limits {
    /// Refuses a zero limit, and more connections than there are file descriptors for
    /// (`fd_limit`: the process's limit, when known).
    pub fn check(&self, fd_limit: Option<u64>) -> Result<(), LimitError> {
        let sizes = [
            (self.max_body_bytes, "--max-body-bytes"),
            (self.ws_max_frame_bytes, "--ws-max-frame-bytes"),
            (self.ws_max_in_flight, "--ws-max-in-flight"),
            (self.max_connections, "--max-connections"),
        ];
        if let Some((_, name)) = sizes.iter().find(|(n, _)| *n == 0) {
            return Err(LimitError::Zero(name));
        }
        let times = [
            (self.header_timeout, "--header-timeout"),
            (self.body_timeout, "--body-timeout"),
            (self.send_timeout, "--send-timeout"),
        ];
        if let Some((_, name)) = times.iter().find(|(t, _)| t.is_zero()) {
            return Err(LimitError::Zero(name));
        }
        match fd_limit {
            Some(fds) if self.max_connections as u64 > connection_fds(fds) => {
                Err(LimitError::NotEnoughFds { wanted: self.max_connections, fd_limit: fds })
            }
            _ => Ok(()),
        }
    }
}

/// File descriptors left for connections out of `fd_limit`.
fn connection_fds(fd_limit: u64) -> u64 {
    fd_limit.saturating_sub(RESERVED_FDS)
}

/// The default connection cap for a process that may open `fd_limit` files: below the
/// limit, so that a flood of connections waits to be accepted instead of leaving the
/// server unable to open anything (and `/health` unanswered) once descriptors run out.
pub fn default_max_connections(fd_limit: Option<u64>) -> usize {
    match fd_limit {
        Some(fds) => (connection_fds(fds) as usize).clamp(1, DEFAULT_MAX_CONNECTIONS),
        None => DEFAULT_MAX_CONNECTIONS,
    }
}

/// Sets the send deadline on an accepted connection (`HttpServer::on_connect`): with
/// `TCP_USER_TIMEOUT` the kernel drops a connection whose sent data stays unacknowledged, or
/// whose receiver keeps its window shut, for longer. actix has no write deadline of its own,
/// so without this a client that stops reading holds its connection, a WebSocket's task and
/// an SSE response forever. Linux only; elsewhere a no-op.
pub fn set_send_timeout(connection: &dyn std::any::Any, timeout: Duration) {
    #[cfg(target_os = "linux")]
    if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
        // A failure leaves the system's own (much longer) timeouts: nothing to report to anyone.
        let _ = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(timeout));
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (connection, timeout);
}

/// Raises this process's soft limit on open files to its hard limit (as most servers do)
/// and returns the limit now in force; `None` where there is no such limit to read.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit::increase_nofile_limit(u64::MAX).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_stays_below_the_descriptors() {
        assert_eq!(default_max_connections(None), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(default_max_connections(Some(1 << 20)), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(default_max_connections(Some(256)), 192);
        assert_eq!(default_max_connections(Some(10)), 1);
        let limits = Limits { max_connections: 200, ..Limits::default() };
        assert_eq!(limits.check(Some(1024)), Ok(()));
        assert_eq!(limits.check(Some(256)), Err(LimitError::NotEnoughFds { wanted: 200, fd_limit: 256 }));
        assert_eq!(limits.check(None), Ok(()));
    }

    #[test]
    fn zero_limits_are_refused_by_flag_name() {
        let zero = Limits { ws_max_in_flight: 0, ..Limits::default() };
        assert_eq!(zero.check(None), Err(LimitError::Zero("--ws-max-in-flight")));
        let zero = Limits { body_timeout: Duration::ZERO, ..Limits::default() };
        assert_eq!(zero.check(None).unwrap_err().to_string(), "--body-timeout must be positive");
    }
}
