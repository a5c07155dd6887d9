//! Server tests over HTTP: the tiny model for most, the real model end to
//! end. One binary, modules.

#![allow(clippy::unwrap_used)]

mod api;
mod errors;
mod harness;
mod hostile;
mod kill9;
mod load;
mod real;
mod slow;
mod structured;
mod tiers;
mod tools;
