//! The benchmark's own logic: percentiles, SSE parsing, the stream's
//! timing, ShareGPT parsing, seeded arrivals, the workloads' text, the
//! bounds on load (against a mock server on loopback), llama.cpp's logits
//! file, and the sweep's sustainable rate.

#![allow(clippy::unwrap_used, missing_docs)]

mod load;
mod parse;
mod stats;
