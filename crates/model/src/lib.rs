//! The model runtime.
//!
//! This crate will own GGUF loading (typed config, weights, load-time
//! requantization, the model fingerprint), the tokenizer built from the GGUF
//! metadata, chat templates, the llama forward pass over a mixed batch with
//! paged attention through the block tables it is handed, and sampling.
//!
//! It may depend on `strata-store` (arena views) and compute crates. It never
//! chooses blocks: it reads and writes K and V only where the block tables
//! say. It spawns no threads of its own beyond the compute pool it is given.
//!
//! Status: filled by issue 2/6.
