//! The WebSocket limits, enforced on the raw bytes as they arrive, before actix's codec sees
//! them. The codec checks a frame's size only once the whole frame is buffered, so a header
//! declaring 2^40 bytes would be buffered as it arrives, and one declaring more than is
//! ever sent would hold the connection forever. Here the declared length is read first:
//! a frame over the limit is refused at its header, and a message that stops arriving
//! midway is cut off after the deadline.
//!
//! ```text
//!  client bytes ─▶ FrameGuard (FrameTracker: where each frame ends) ─▶ actix codec ─▶ messages
//!                      │ header over the limit: TooBig
//!                      └ message unfinished after the deadline: Stalled
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::dev;
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use futures::Stream;
use tokio::time::Sleep;

/// Why the guard stopped a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameLimitError {
    #[error("a frame of {declared} bytes is over the limit of {limit} bytes")]
    TooBig { declared: u64, limit: usize },
    #[error("a message took longer than {} s to arrive", .0.as_secs_f64())]
    Stalled(Duration),
}

/// Follows the frame boundaries of a client's byte stream (RFC 6455 §5.2) without keeping
/// any payload: the header bytes of the frame being read, and how much of its payload is
/// still to come.
#[derive(Debug, Clone)]
pub struct FrameTracker {
    limit: usize,
    /// The current frame's header so far (at most 2 + 8 length + 4 mask bytes).
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// A data frame without FIN was seen: its message goes on in continuation frames.
    fragmented: bool,
    /// Messages begun so far; a new one restarts the deadline.
    started: u64,
}

impl FrameTracker {
    pub fn new(limit: usize) -> Self {
        FrameTracker { limit, header: [0; 14], header_len: 0, remaining: 0, fragmented: false, started: 0 }
    }

    /// Whether a message has begun and not yet arrived whole.
    pub fn mid_message(&self) -> bool {
        self.header_len > 0 || self.remaining > 0 || self.fragmented
    }

    /// How many messages have begun.
    pub fn messages_started(&self) -> u64 {
        self.started
    }

    /// Follows `bytes`; refuses a frame whose header declares more than the limit.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), FrameLimitError> {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(bytes.len() as u64);
                self.remaining -= skip;
                bytes = &bytes[skip as usize..];
                continue;
            }
            if self.header_len == 0 && !self.fragmented {
                self.started += 1;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            if let Some(declared) = self.header_complete() {
                self.start_payload(declared)?;
            }
        }
        Ok(())
    }

    /// The declared payload length once the whole header is in.
    fn header_complete(&self) -> Option<u64> {
        if self.header_len < 2 {
            return None;
        }
        let h = &self.header;
        let (len_bytes, masked) = match h[1] & 0x7F {
            126 => (2, h[1] & 0x80 != 0),
            127 => (8, h[1] & 0x80 != 0),
            _ => (0, h[1] & 0x80 != 0),
        };
        if self.header_len < 2 + len_bytes + if masked { 4 } else { 0 } {
            return None;
        }
        Some(match len_bytes {
            0 => u64::from(h[1] & 0x7F),
            2 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            _ => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
        })
    }

    fn start_payload(&mut self, declared: u64) -> Result<(), FrameLimitError> {
        if declared > self.limit as u64 {
            return Err(FrameLimitError::TooBig { declared, limit: self.limit });
        }
        let (fin, opcode) = (self.header[0] & 0x80 != 0, self.header[0] & 0x0F);
        // Control frames (opcode 8 and up) may come between a message's fragments.
        if opcode < 8 {
            self.fragmented = !fin;
        }
        self.header_len = 0;
        self.remaining = declared;
        Ok(())
    }
}

/// The request payload of a WebSocket connection, passed through unchanged while the
/// client keeps to the limits; an error (then nothing) once it does not.
pub struct FrameGuard {
    inner: dev::Payload,
    tracker: FrameTracker,
    timeout: Duration,
    /// Running while a message is partly received.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The message the deadline is for.
    deadline_for: u64,
    failed: bool,
}

impl FrameGuard {
    pub fn new(inner: dev::Payload, max_frame_bytes: usize, timeout: Duration) -> Self {
        FrameGuard {
            inner,
            tracker: FrameTracker::new(max_frame_bytes),
            timeout,
            deadline: None,
            deadline_for: 0,
            failed: false,
        }
    }

    /// Starts the deadline when a message begins, stops it when the message is whole.
    fn update_deadline(&mut self) {
        if !self.tracker.mid_message() {
            self.deadline = None;
        } else if self.deadline.is_none() || self.deadline_for != self.tracker.messages_started() {
            self.deadline = Some(Box::pin(tokio::time::sleep(self.timeout)));
            self.deadline_for = self.tracker.messages_started();
        }
    }

    fn fail(&mut self, e: FrameLimitError) -> Poll<Option<Result<Bytes, PayloadError>>> {
        self.failed = true;
        Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::other(e)))))
    }
}

impl Stream for FrameGuard {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => {
                if let Err(e) = this.tracker.feed(&bytes) {
                    return this.fail(e);
                }
                this.update_deadline();
                Poll::Ready(Some(Ok(bytes)))
            }
            Poll::Pending => match this.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => this.fail(FrameLimitError::Stalled(this.timeout)),
                _ => Poll::Pending,
            },
            end => end,
        }
    }
}

/// The guard's error, if it is what ended the message stream.
pub fn limit_error(e: &actix_ws::ProtocolError) -> Option<&FrameLimitError> {
    let actix_ws::ProtocolError::Io(io) = e else { return None };
    // actix-ws wraps the payload's error in an io::Error; the guard put its own inside that.
    let payload = io.get_ref()?.downcast_ref::<PayloadError>()?;
    let PayloadError::Io(inner) = payload else { return None };
    inner.get_ref()?.downcast_ref::<FrameLimitError>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame header declaring `len` bytes.
    fn header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
        let mut h = vec![(if fin { 0x80 } else { 0 }) | opcode];
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
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    #[test]
    fn follows_frames_fed_in_any_pieces() {
        let mut stream = header(true, 1, 5);
        stream.extend_from_slice(b"hello");
        stream.extend(header(true, 2, 300));
        stream.extend(vec![7u8; 300]);
        for piece in [1, 2, 3, 7, 64, stream.len()] {
            let mut t = FrameTracker::new(1000);
            for chunk in stream.chunks(piece) {
                t.feed(chunk).unwrap();
            }
            assert!(!t.mid_message(), "piece {piece}");
            assert_eq!(t.messages_started(), 2);
        }
        let mut t = FrameTracker::new(1000);
        t.feed(&stream[..stream.len() - 1]).unwrap();
        assert!(t.mid_message());
    }

    #[test]
    fn refuses_an_oversized_frame_at_its_header() {
        for declared in [1001, 20 << 20, 1 << 40, i64::MAX as u64, u64::MAX] {
            let mut t = FrameTracker::new(1000);
            assert_eq!(t.feed(&header(true, 1, declared)), Err(FrameLimitError::TooBig { declared, limit: 1000 }));
        }
        let mut t = FrameTracker::new(1000);
        t.feed(&header(true, 1, 1000)).unwrap();
        assert!(t.mid_message());
    }

    #[test]
    fn a_fragmented_message_lasts_until_its_final_frame() {
        let mut t = FrameTracker::new(100);
        t.feed(&[header(false, 1, 2), b"ab".to_vec()].concat()).unwrap();
        assert!(t.mid_message());
        // A ping between the fragments neither ends nor starts a message.
        t.feed(&header(true, 9, 0)).unwrap();
        assert!(t.mid_message());
        t.feed(&[header(true, 0, 1), b"c".to_vec()].concat()).unwrap();
        assert!(!t.mid_message());
        assert_eq!(t.messages_started(), 1);
    }

    #[test]
    fn the_limit_error_is_found_through_actix_ws() {
        let guard_error = FrameLimitError::TooBig { declared: 9, limit: 1 };
        let payload = PayloadError::Io(std::io::Error::other(guard_error.clone()));
        let e = actix_ws::ProtocolError::Io(std::io::Error::other(payload));
        assert_eq!(limit_error(&e), Some(&guard_error));
        assert_eq!(limit_error(&actix_ws::ProtocolError::Overflow), None);
    }
}
