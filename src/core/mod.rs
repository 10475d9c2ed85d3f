//! Pure logic, unit-tested without threads, channels or devices.

pub mod block_pool;
pub mod detokenizer;
pub mod draft_sync;
pub mod finish;
pub mod kv_manager;
pub mod lengths;
pub mod lookahead;
pub mod ngram;
pub mod sample_cut;
pub mod sampling;
pub mod scheduler;
pub mod spec;
pub mod spec_guard;
pub mod step_cost;
pub mod tree;
