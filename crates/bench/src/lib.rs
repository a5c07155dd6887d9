//! `strata bench`: the benchmark that ships with Strata.
//!
//! - [`client`]: one streamed request, timed chunk by chunk, over plain
//!   HTTP/1.1 to any OpenAI-compatible server;
//! - [`workload`]: the built-in workloads w1-w8 and ShareGPT replay, from
//!   seeded text ([`text`]) and seeded arrivals ([`arrivals`]);
//! - [`run`]: runs a workload within its bounds, with a progress bar;
//! - [`report`]: a run's summary (JSON) and table (Markdown);
//! - [`roofline`] and [`quality`]: this machine's ceilings and where the
//!   forward pass sits under them; parity of the numbers with llama.cpp;
//! - [`compare`] and [`plot`]: BENCHMARKS.md and its plots from a results
//!   directory of both servers' runs;
//! - [`cli`]: the subcommand's arguments.

pub mod arrivals;
pub mod cli;
pub mod client;
pub mod compare;
pub mod plot;
pub mod quality;
pub mod report;
pub mod roofline;
pub mod run;
pub mod sharegpt;
pub mod sse;
pub mod stats;
pub mod text;
pub mod workload;
