//! The engine: turns requests into steps and tokens.
//!
//! A request (prompt tokens, sampling, stop conditions, cache salt) goes to
//! the scheduler, which admits it by `lookup_and_pin` of its prompt's prefix
//! and allocation of the rest, and plans steps that mix decode rows and
//! prefill chunks under a token budget. The executor thread runs each step
//! (forward pass, sampling) and reports its epoch to the KV core, in order.
//! Step N+1 is planned while step N runs; correctness rests only on epochs.
//!
//! It may depend on `strata-kv`, `strata-store` and `strata-model`. It is
//! the only crate that spawns threads, and it knows nothing of HTTP or JSON.

mod engine;
mod executor;
mod request;
mod sanitizer;
mod scheduler;
mod session;
mod sync;
mod text;
mod tiers;

pub use engine::{Engine, EngineConfig, EngineError, EngineStats, MAX_SAMPLES};
pub use executor::{ModelRunner, Runner};
pub use request::{
    Event, FinishReason, MAX_PAUSE, MAX_UNREAD, Request, RequestHandle, RequestId, StopConditions,
    Usage,
};
pub use scheduler::{Counters, SchedulerConfig};
pub use session::{SessionId, SessionInfo};
pub use tiers::{Histogram, TierStats, TierStores};
