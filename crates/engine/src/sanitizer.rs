//! The sanitizer's run-time record: the violations it found (each failed
//! its step, or, for a whole-pool check, is reported), the last one's
//! message, and how often the whole pool is checked.
//!
//! The checks themselves are the KV core's (`validate`, `check_invariants`);
//! the scheduler records each row's accesses and each step's fresh blocks,
//! the executor poisons and validates (see `executor.rs`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::{Mutex, lock};

/// Violations seen, shared by the scheduler, the executor and the engine.
#[derive(Default)]
pub(crate) struct Sanitizer {
    /// Check every pool invariant after each `every`-th step (0: never).
    every: u64,
    violations: AtomicU64,
    last: Mutex<Option<String>>,
}

impl Sanitizer {
    pub(crate) fn new(every: u64) -> Self {
        Self {
            every,
            ..Self::default()
        }
    }

    /// Whether step `n` gets a whole-pool check.
    pub(crate) fn due(&self, n: u64) -> bool {
        self.every > 0 && n.is_multiple_of(self.every)
    }

    pub(crate) fn report(&self, msg: &str) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last) = Some(msg.to_string());
    }

    pub(crate) fn violations(&self) -> u64 {
        self.violations.load(Ordering::Relaxed)
    }

    pub(crate) fn last(&self) -> Option<String> {
        lock(&self.last).clone()
    }
}
