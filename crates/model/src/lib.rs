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
mod grammar;
mod llama;
mod quant;
mod roofline;
mod sampling;
mod tokenizer;
mod weights;

pub use attention::{
    AttnShape, KvStore, PagedKv, Row, SPAN, attend_span, attend_span_f16, merge_spans,
};
pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::{LlamaConfig, RopePairing};
pub use error::ModelError;
pub use grammar::{Constraint, GRAMMAR_CACHE, Grammar, GrammarSpec, Grammars, allows};
pub use llama::{KV_FORMAT_VERSION, LlamaModel, LoadOptions, Logits, SeqInput};
pub use roofline::int8_kernel_peak;
pub use sampling::{Sampled, Sampler, SamplingParams, score};
pub use tokenizer::{CHUNK, Detokenizer, Tokenizer};
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

/// Cores this process may use that are not busy with other work: the
/// CPUs it may run on (affinity and cgroup quota, from
/// `available_parallelism`) times the idle share of the machine over
/// `window`, rounded to the nearest core, at least 1.
///
/// NOTE: sized once, at start. A pool with more threads than free cores
/// waits for a descheduled worker at every barrier; measured here with one
/// core taken by a busy loop, 1 thread decodes at 107 tok/s where 2 threads
/// manage 76 (`scripts/bench-busy-neighbour.sh`).
pub fn free_cores(window: std::time::Duration) -> usize {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Some(before) = cpu_times() else {
        return allowed;
    };
    std::thread::sleep(window);
    let Some(after) = cpu_times() else {
        return allowed;
    };
    let total = after.0.saturating_sub(before.0);
    let idle = after.1.saturating_sub(before.1);
    if total == 0 {
        return allowed;
    }
    let machine = std::fs::read_to_string("/proc/stat")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
                .count()
        })
        .unwrap_or(allowed)
        .max(1);
    let free = (idle as f64 / total as f64 * machine as f64).round() as usize;
    free.clamp(1, allowed)
}

/// (total, idle) jiffies over all CPUs, from `/proc/stat` (Linux).
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((v.iter().take(8).sum(), idle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_cores_is_between_one_and_the_allowed_cores() {
        let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = free_cores(std::time::Duration::from_millis(50));
        eprintln!("free cores: {n} of {allowed}");
        assert!((1..=allowed).contains(&n), "{n} of {allowed}");
    }
}
