//! The actor runtime.
