//! `strata-store`'s integration tests (one binary).

#![allow(clippy::unwrap_used)]

mod fixtures;
mod host;
mod ssd;
