//! Specula: an LLM inference runtime for Llama-family models with speculative decoding.

pub mod actors;
pub mod backend;
pub mod cache;
pub mod cli;
pub mod core;
pub mod device;
pub mod engine;
pub mod harness;
pub mod loadgen;
pub mod model;
pub mod prompt;
pub mod request;
pub mod server;
pub mod spec;
pub mod tensor;

/// The README's code, compiled as a doc test so that its in-process API example keeps
/// matching the real API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
