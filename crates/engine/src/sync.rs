//! The threads, channels and locks the engine's hand-off uses: std's, or
//! shuttle's when built with `RUSTFLAGS="--cfg shuttle"`, so the shuttle
//! tests (`tests/engine/shuttle.rs`) explore random interleavings of the
//! scheduler thread, the executor thread and the clients.
//!
//! The per-request event channel stays tokio's in both builds: its sender
//! never blocks, and clients read it with `try_recv` under shuttle.

#[cfg(shuttle)]
pub(crate) use shuttle::{
    sync::{Arc, Mutex, MutexGuard, mpsc},
    thread,
};
#[cfg(not(shuttle))]
pub(crate) use std::{
    sync::{Arc, Mutex, MutexGuard, mpsc},
    thread,
};

/// Locks `m`, ignoring poison: a panic elsewhere while it was held must not
/// turn every later call into a second panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
