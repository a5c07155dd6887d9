//! Engine tests on the tiny random-weight model: one binary, modules.

#![allow(clippy::unwrap_used)]

mod failed_steps;
mod fake;
mod fixture;
mod held;
mod prefix_sharing;
mod regressions;
mod requests;
mod samples;
mod sessions;
#[cfg(shuttle)]
mod shuttle;
mod stress;
mod tiers;
