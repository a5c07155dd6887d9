//! Engine tests on the tiny random-weight model: one binary, modules.

#![allow(clippy::unwrap_used)]

mod fake;
mod fixture;
mod regressions;
mod requests;
mod sessions;
#[cfg(shuttle)]
mod shuttle;
mod stress;
