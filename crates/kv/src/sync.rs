//! The lock primitives `KvCache` uses: std's, or shuttle's when built with
//! `RUSTFLAGS="--cfg shuttle"` for the randomized concurrency tests.
//!
//! Poisoning is ignored on purpose: the pool's methods do not panic on any
//! input, and a panic elsewhere while the lock is held (a caller bug) must
//! not turn every later operation, including the guard drops that return
//! blocks, into a second panic.

#[cfg(shuttle)]
pub(crate) use shuttle::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(shuttle))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

/// Locks `m`, ignoring poison.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
