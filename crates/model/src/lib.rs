//! The model runtime: GGUF loading, the tokenizer, chat templates, the llama
//! forward pass with paged attention, and sampling.
//!
//! It may depend on `strata-store` (arena views) and compute crates. It
//! never chooses blocks: it reads and writes K and V only where the block
//! tables it is handed say. Its only threads are the compute pools sized by
//! [`set_compute_threads`] and [`LoadOptions::threads`].

mod attention;
mod chat_template;
mod config;
pub mod default_model;
mod error;
mod llama;
mod quant;
mod sampling;
mod tokenizer;
mod weights;

pub use attention::{AttnShape, KvStore, PagedKv, Row, SPAN, attend_span, merge_spans};
pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::{LlamaConfig, RopePairing};
pub use error::ModelError;
pub use llama::{KV_FORMAT_VERSION, LlamaModel, LoadOptions, SeqInput};
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use tokenizer::{Detokenizer, Tokenizer};
pub use weights::{Gguf, requantized_type, sha256_file};

/// Sets the number of threads candle's quantized matmuls use. It takes
/// effect only before the first matmul of the process (candle reads it
/// once), so call it first thing.
///
/// NOTE: candle's pool spin-waits between tasks; with more threads than
/// free cores a busy neighbour makes every step wait for a descheduled
/// spinner (shared/peers.md measured 12 ms becoming 190 ms), so size it to
/// the free cores, not the machine.
pub fn set_compute_threads(threads: usize) {
    // SAFETY: called before any other thread of ours reads the environment;
    // candle reads these variables once, on its first matmul.
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", threads.max(1).to_string());
        // candle's workers spin 25,000 rounds after each matmul by default,
        // taking a core from our own pool's next matmul; 200 rounds measured
        // pp512 146 -> ~165 tok/s and decode 88 -> ~100 tok/s here.
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200");
        }
        std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
    }
}
