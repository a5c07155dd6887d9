//! Scenario tests of the KV core, one binary with a module per scenario.

// A test fails loudly on any unexpected error; that is what unwrap is for here.
#![allow(clippy::unwrap_used)]

mod clean_chains;
mod fixture;
mod lru_order;
mod model_based;
mod regression;
mod salt;
mod sanitizer;
mod tier_index;
mod tiers;
