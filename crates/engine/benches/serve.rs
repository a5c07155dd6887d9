//! Engine benchmarks on the default model, printing the figures issue 3/6
//! asks for (medians of `STRATA_BENCH_RUNS`, default 3):
//!
//! - aggregate output tokens/s with 4, 8 and 16 concurrent requests of
//!   distinct ~230-token prompts and 128 output tokens each;
//! - four concurrent requests sharing a 1,400-token system prompt: mean time
//!   to first token, and how many prompt tokens were computed (the prefix
//!   once, not four times);
//! - the scheduler's time (planning, applying results) per step, as a share
//!   of the step time, at 16 sequences;
//! - how long the executor waits for the KV pool's lock during a step
//!   (the scheduler plans the next step under it), as a share of the step
//!   time, and how long planning holds it (issue 5/10 asks for this at 16
//!   running requests).
//!
//! `cargo bench -p strata-engine --bench serve` (threads: `STRATA_THREADS`,
//! default 2).

#![allow(clippy::unwrap_used, missing_docs)] // a bench aborts loudly on any error

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_engine::{
    Engine, EngineConfig, Event, ModelRunner, Request, SchedulerConfig, StopConditions,
};
use strata_kv::{HashKey, TokenId};
use strata_model::{LlamaModel, LoadOptions, SamplingParams};
use strata_store::Arena;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn tokens(n: usize, seed: u32) -> Vec<TokenId> {
    (0..n as u32)
        .map(|i| {
            TokenId::new((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 49_000 + 17)
        })
        .collect()
}

fn engine(model: &Arc<LlamaModel>) -> Engine {
    // The server's defaults: 4-token blocks, 1 GiB of KV.
    let (blocks, bs) = (11_650, 4);
    let arena = Arena::new(model.arena_layout(blocks, bs)).unwrap();
    Engine::start(
        ModelRunner::new(model.clone(), arena),
        EngineConfig {
            num_blocks: blocks,
            block_size: bs,
            context: model.config().context_length,
            vocab: model.config().vocab,
            eos: vec![TokenId::new(2)],
            model_fingerprint: model.fingerprint(bs),
            hash_key: HashKey::from_bytes([7; 32]),
            scheduler: SchedulerConfig {
                max_step_tokens: 512,
                max_running: 64,
                sanitize: false,
                check_every: 0,
            },
            queue_limit: 1024,
            model_name: "SmolLM2-135M-Instruct".into(),
            session_ttl: Duration::from_secs(600),
            tokenizer: None,
        },
    )
    .unwrap()
}

fn request(prompt: Vec<TokenId>, n: usize) -> Request {
    Request {
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: Some(n),
            ignore_eos: true,
            ..StopConditions::default()
        },
        cache_salt: None,
        session: None,
        deadline: None,
        prompt_logprobs: None,
    }
}

/// Runs `prompts` concurrently; returns (output tokens/s, mean TTFT in s).
fn run(e: &Engine, prompts: &[Vec<TokenId>], n: usize) -> (f64, f64) {
    let t0 = Instant::now();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(request(p.clone(), n)).unwrap())
        .collect();
    let threads: Vec<_> = handles
        .into_iter()
        .map(|mut h| {
            std::thread::spawn(move || {
                let mut first = None;
                let mut count = 0;
                while let Some(ev) = h.recv_blocking() {
                    match ev {
                        Event::Token { .. } => {
                            first.get_or_insert_with(|| t0.elapsed());
                            count += 1;
                        }
                        Event::Finished { .. } => break,
                        Event::Admitted { .. } | Event::PromptLogprobs(_) => {}
                    }
                }
                (count, first.unwrap_or_default())
            })
        })
        .collect();
    let results: Vec<(usize, Duration)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let elapsed = t0.elapsed().as_secs_f64();
    let total: usize = results.iter().map(|r| r.0).sum();
    let ttft = results.iter().map(|r| r.1.as_secs_f64()).sum::<f64>() / results.len() as f64;
    (total as f64 / elapsed, ttft)
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
        .unwrap_or(3);
    let path = strata_model::default_model::ensure(&mut |l| eprintln!("{l}")).unwrap();
    let model = Arc::new(
        LlamaModel::open(
            &path,
            LoadOptions {
                threads,
                requantize: false,
            },
        )
        .unwrap(),
    );
    println!("threads {threads}, runs {runs} (medians)");
    for n in [4usize, 8, 16] {
        let mut rates = Vec::new();
        let mut overhead = Vec::new();
        let mut waits = Vec::new();
        let mut holds = Vec::new();
        for r in 0..runs {
            // A fresh engine per run: distinct prompts, nothing cached.
            let e = engine(&model);
            let prompts: Vec<Vec<TokenId>> = (0..n)
                .map(|i| tokens(230, (r * 100 + i) as u32 + 1))
                .collect();
            rates.push(run(&e, &prompts, 128).0);
            let c = e.stats().counters;
            overhead.push(c.schedule_nanos as f64 / c.step_nanos as f64 * 100.0);
            waits.push(c.lock_wait_nanos as f64 / c.step_nanos as f64 * 100.0);
            holds.push(c.plan_lock_nanos as f64 / c.step_nanos as f64 * 100.0);
        }
        println!(
            "FIGURE aggregate output, {n} concurrent requests (230-token prompts, 128 out): {:.1} tok/s; scheduler time {:.2}% of step time; executor waited for the pool lock {:.3}% of step time (planning held it {:.2}%)",
            median(rates),
            median(overhead),
            median(waits),
            median(holds)
        );
    }
    let mut ttfts = Vec::new();
    let mut computed = Vec::new();
    for r in 0..runs {
        let e = engine(&model);
        let system = tokens(1400, 999 + r as u32);
        let prompts: Vec<Vec<TokenId>> = (0..4)
            .map(|i| {
                let mut p = system.clone();
                p.extend(tokens(30, 5000 + i));
                p
            })
            .collect();
        ttfts.push(run(&e, &prompts, 16).1);
        computed.push(e.stats().counters.rows as f64);
    }
    // Once: 1,400 + 4 x 30 prompt rows and about 4 x 16 decode rows (1,584).
    // Four times over: 4 x 1,430 + 64 = 5,784.
    println!(
        "FIGURE shared 1,400-token system prompt, 4 concurrent requests (16 out): mean TTFT {:.0} ms; rows computed {:.0} (prefix once: ~1,584; four times: ~5,784)",
        median(ttfts) * 1000.0,
        median(computed)
    );
}
