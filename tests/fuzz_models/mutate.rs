//! Mutations of real inputs, as libFuzzer's mutators do them: bit flips, interesting bytes
//! and integers (counts of 2^31, u64::MAX, NaN), dictionary words (JSON keys, template
//! syntax), deletions, duplications, truncations and splices with another input. A few are
//! stacked per input; offsets favour the start of the input, where headers live.

use super::common::tiny::Rng;

/// Integers that break counts and sizes, written little-endian over 4 or 8 bytes.
const INTERESTING: [u64; 12] =
    [0, 1, 2, 0x7f, 0x80, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 40, 1 << 62, u64::MAX];

/// f32 values no hyper-parameter should have.
const FLOATS: [f32; 5] = [f32::NAN, f32::INFINITY, -1.0, 0.0, 1e38];

const BYTES: &[u8] = b"\x00\x01\x7f\x80\xff0179-.\"'{}[]:,\\\n ";

pub struct Mutator {
    pub rng: Rng,
    /// Where headers end, roughly: half of the offsets chosen fall before it.
    pub header: usize,
}

impl Mutator {
    /// `input` changed by 1 to 4 stacked mutations.
    pub fn mutate(&mut self, input: &[u8], corpus: &[Vec<u8>], dictionary: &[&[u8]]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..1 + self.rng.below(4) {
            self.once(&mut out, corpus, dictionary);
        }
        out
    }

    fn offset(&mut self, len: usize) -> usize {
        let end = if self.rng.below(2) == 0 { len.min(self.header) } else { len };
        self.rng.below(end + 1)
    }

    fn once(&mut self, out: &mut Vec<u8>, corpus: &[Vec<u8>], dictionary: &[&[u8]]) {
        let len = out.len();
        let at = self.offset(len);
        match self.rng.below(10) {
            0 if len > 0 => out[at.min(len - 1)] ^= 1 << self.rng.below(8),
            1 if len > 0 => out[at.min(len - 1)] = BYTES[self.rng.below(BYTES.len())],
            2 => {
                let v = INTERESTING[self.rng.below(INTERESTING.len())];
                let width = if self.rng.below(2) == 0 { 4 } else { 8 };
                overwrite(out, at, &v.to_le_bytes()[..width]);
            }
            3 => overwrite(out, at, &FLOATS[self.rng.below(FLOATS.len())].to_le_bytes()),
            4 if !dictionary.is_empty() => {
                let word = dictionary[self.rng.below(dictionary.len())];
                out.splice(at..at, word.iter().copied());
            }
            5 if !dictionary.is_empty() => overwrite(out, at, dictionary[self.rng.below(dictionary.len())]),
            6 => {
                let end = (at + 1 + self.rng.below(64)).min(len);
                out.drain(at..end);
            }
            7 if len > 0 => {
                let from = self.rng.below(len);
                let end = (from + 1 + self.rng.below(256)).min(len);
                let chunk = out[from..end].to_vec();
                out.splice(at..at, chunk);
            }
            8 => out.truncate(at),
            9 if !corpus.is_empty() => {
                let other = &corpus[self.rng.below(corpus.len())];
                let from = self.rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            _ => {
                // A decimal number where a number may be expected (JSON, templates).
                let v = INTERESTING[self.rng.below(INTERESTING.len())];
                let text = if self.rng.below(2) == 0 { v.to_string() } else { format!("-{v}") };
                out.splice(at..at, text.bytes());
            }
        }
    }
}

/// Writes `bytes` at `at`, growing `out` as needed.
fn overwrite(out: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if out.len() < at + bytes.len() {
        out.resize(at + bytes.len(), 0);
    }
    out[at..at + bytes.len()].copy_from_slice(bytes);
}
