//! Server-sent events, split out of a byte stream that may cut them anywhere.

/// Collects bytes until events are whole and hands out their `data`.
#[derive(Default)]
pub struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    /// Adds the bytes received; returns the `data` of every event they completed (the
    /// `data:` lines of an event joined by newlines; events without data are skipped).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend(bytes.iter().filter(|&&b| b != b'\r'));
        let mut events = Vec::new();
        while let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event[..end]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_cut_anywhere_come_out_whole() {
        let stream = b"data: {\"a\":1}\n\n: a comment\n\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut p = SseParser::default();
            let mut events = p.push(&stream[..cut]);
            events.extend(p.push(&stream[cut..]));
            assert_eq!(events, ["{\"a\":1}", "x\ny", "[DONE]"], "cut at {cut}");
        }
    }
}
