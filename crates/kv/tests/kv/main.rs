//! Scenario tests of the KV core, one binary with a module per scenario.

mod fixture;
mod model_based;
mod regression;
mod salt;
