//! Forward-pass benchmarks on the default model, printing the figures issue
//! 2/6 asks for (medians):
//!
//! - prefill tokens/s of a 512-token prompt (llama-bench's pp512);
//! - single-sequence decode tokens/s at context 0, 512 and 1,536
//!   (llama-bench's tg at `-d`);
//! - aggregate decode tokens/s with 4, 8 and 16 sequences in one batch;
//! - peak RSS after load, and the same minus the KV arena's bytes.
//!
//! `cargo bench -p strata-model --bench forward` (threads: `STRATA_THREADS`,
//! default 2). `scripts/bench-vs-llama.sh` runs it beside llama-bench.

#![allow(clippy::unwrap_used, missing_docs)] // a bench aborts loudly on any error

use std::time::Instant;

use strata_model::{Gguf, LlamaModel, LoadOptions, Logits, SeqInput};
use strata_store::{Arena, BlockId, TokenId};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn tokens(n: usize, seed: u32) -> Vec<TokenId> {
    (0..n as u32)
        .map(|i| TokenId::new(i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 49_000 + 17))
        .collect()
}

fn main() {
    let threads: usize = std::env::var("STRATA_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    strata_model::set_compute_threads(threads);
    let runs: usize = std::env::var("STRATA_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let path = strata_model::default_model::ensure(&mut |l| eprintln!("{l}")).unwrap();
    let model = LlamaModel::load(
        &mut Gguf::open(&path).unwrap(),
        LoadOptions {
            threads,
            requantize: std::env::var_os("STRATA_REQUANTIZE").is_some(),
        },
    )
    .unwrap();
    let load_rss = peak_rss_kib() as f64 / 1024.0;
    let bs = 16;
    // Room for 16 sequences of 1,536 + 128 tokens.
    let per_seq = (1536 + 160usize).div_ceil(bs);
    let mut arena = Arena::new(model.arena_layout(16 * per_seq, bs)).unwrap();
    let table = |s: usize| -> Vec<BlockId> {
        (0..per_seq)
            .map(|i| BlockId::new((s * per_seq + i) as u32))
            .collect()
    };
    let tables: Vec<Vec<BlockId>> = (0..16).map(table).collect();
    println!("threads {threads}, runs {runs} (medians)");
    println!(
        "weights read per decode step: {:.1} MiB",
        model.weight_bytes() as f64 / 1048576.0
    );
    println!("FIGURE peak RSS after load (no arena yet): {load_rss:.1} MiB");

    // Prefill of 512 tokens.
    let prompt = tokens(512, 1);
    let mut pp = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        model
            .forward(
                &mut arena,
                &[SeqInput {
                    tokens: &prompt,
                    start: 0,
                    block_table: &tables[0],
                    logits: Logits::Last,
                }],
            )
            .unwrap();
        pp.push(512.0 / t.elapsed().as_secs_f64());
    }
    println!("FIGURE prefill pp512: {:.1} tok/s", median(pp));

    // Single-sequence decode at depth d: fill d tokens, then time 64 steps.
    for depth in [0usize, 512, 1536] {
        let ctx = tokens(depth + 64, 2);
        let mut rates = Vec::new();
        for _ in 0..runs.min(3) {
            if depth > 0 {
                model
                    .forward(
                        &mut arena,
                        &[SeqInput {
                            tokens: &ctx[..depth],
                            start: 0,
                            block_table: &tables[0],
                            logits: Logits::None,
                        }],
                    )
                    .unwrap();
            }
            let t = Instant::now();
            for i in 0..64 {
                let p = depth + i;
                model
                    .forward(
                        &mut arena,
                        &[SeqInput {
                            tokens: &ctx[p..p + 1],
                            start: p,
                            block_table: &tables[0],
                            logits: Logits::Last,
                        }],
                    )
                    .unwrap();
            }
            rates.push(64.0 / t.elapsed().as_secs_f64());
        }
        println!(
            "FIGURE decode tg at depth {depth}: {:.1} tok/s",
            median(rates)
        );
    }

    // Aggregate decode: n sequences at depth 128, one row each per step.
    let mut single = 0.0;
    for n in [1usize, 4, 8, 16] {
        let ctxs: Vec<Vec<TokenId>> = (0..n).map(|s| tokens(128 + 32, 10 + s as u32)).collect();
        let mut rates = Vec::new();
        for _ in 0..runs.min(3) {
            for s in 0..n {
                model
                    .forward(
                        &mut arena,
                        &[SeqInput {
                            tokens: &ctxs[s][..128],
                            start: 0,
                            block_table: &tables[s],
                            logits: Logits::None,
                        }],
                    )
                    .unwrap();
            }
            let t = Instant::now();
            for i in 0..32 {
                let p = 128 + i;
                let batch: Vec<SeqInput> = (0..n)
                    .map(|s| SeqInput {
                        tokens: &ctxs[s][p..p + 1],
                        start: p,
                        block_table: &tables[s],
                        logits: Logits::Last,
                    })
                    .collect();
                model.forward(&mut arena, &batch).unwrap();
            }
            rates.push((32 * n) as f64 / t.elapsed().as_secs_f64());
        }
        let r = median(rates);
        if n == 1 {
            single = r;
        }
        println!(
            "FIGURE aggregate decode, {n} sequences at depth 128: {r:.1} tok/s ({:.2}x one sequence)",
            r / single
        );
    }
}
