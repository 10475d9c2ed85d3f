//! Pure logic, unit-tested without threads, channels or devices.

pub mod block_pool;
pub mod detokenizer;
pub mod ngram;
pub mod sampling;
pub mod spec;
