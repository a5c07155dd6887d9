//! The engine: turns requests into steps and tokens.
//!
//! This crate will own requests and their channels, the scheduler
//! (continuous batching with chunked prefill, admission by
//! `lookup_and_pin`, preemption), the executor thread that runs steps and
//! reports their epochs' completion to the KV core in order, and sessions.
//!
//! It may depend on `strata-kv`, `strata-store` and `strata-model`. It is
//! the only crate that spawns threads, and it knows nothing of HTTP or JSON.
//!
//! Status: filled by issue 3/6.
