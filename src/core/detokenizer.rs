//! Incremental detokenization: token ids in, UTF-8-safe text deltas out, with stop
//! strings that may span token boundaries. Pure: the decoding function is passed in.

/// Turns a growing list of token ids into text deltas.
///
/// Decodes only a short window (`prefix..`) each time, so the cost per token is constant,
/// and holds back text while the last token ends inside a multi-byte character.
#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context (byte-level BPE needs the previous token).
    prefix: usize,
    /// Tokens before this index have been turned into emitted text.
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds tokens and returns the text they complete (possibly empty).
    pub fn push(&mut self, new: &[u32], decode: impl Fn(&[u32]) -> String) -> String {
        self.ids.extend_from_slice(new);
        let before = decode(&self.ids[self.prefix..self.read]);
        let after = decode(&self.ids[self.prefix..]);
        if after.ends_with('\u{FFFD}') || after.len() < before.len() || !after.is_char_boundary(before.len()) {
            return String::new(); // an incomplete character: wait for the next token
        }
        let delta = after[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        delta
    }
}

/// Watches generated text for stop strings and decides how much of it is safe to emit.
#[derive(Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet emitted: it could be the start of a stop string.
    held: String,
}

/// What to do with a text delta.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Emit this text and keep going.
    Continue(String),
    /// A stop string was found: emit this text (everything before it) and finish.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    pub fn push(&mut self, delta: &str) -> StopCheck {
        self.held.push_str(delta);
        let found = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = found {
            let out = self.held[..at].to_string();
            self.held.clear();
            return StopCheck::Stop(out);
        }
        let keep = self.partial_suffix_len();
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        StopCheck::Continue(out)
    }

    /// Text held back at the end; emitted when the request finishes for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn partial_suffix_len(&self) -> usize {
        let h = &self.held;
        self.stops
            .iter()
            .flat_map(|s| (1..s.len()).rev().filter(move |&n| s.is_char_boundary(n) && h.ends_with(&s[..n])))
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy byte-level vocabulary: id = one byte; invalid UTF-8 decodes lossily.
    fn decode(ids: &[u32]) -> String {
        String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<_>>()).into_owned()
    }

    #[test]
    fn multibyte_characters_are_emitted_whole() {
        let mut d = Detokenizer::new();
        let bytes: Vec<u32> = "añ😀b".bytes().map(u32::from).collect();
        let deltas: Vec<String> = bytes.iter().map(|&b| d.push(&[b], decode)).collect();
        assert_eq!(deltas.concat(), "añ😀b");
        assert!(deltas.iter().all(|s| !s.contains('\u{FFFD}')));
        assert_eq!(deltas.iter().filter(|s| !s.is_empty()).count(), 4);
    }

    #[test]
    fn stop_string_across_deltas_is_cut() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("hello S"), StopCheck::Continue("hello ".into()));
        assert_eq!(m.push("TO"), StopCheck::Continue("".into()));
        assert_eq!(m.push("P and more"), StopCheck::Stop(String::new()));
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("ST"), StopCheck::Continue("".into()));
        assert_eq!(m.push("ART"), StopCheck::Continue("START".into()));
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["b".into(), "a".into()]);
        assert_eq!(m.push("xxaxb"), StopCheck::Stop("xx".into()));
    }
}
