//! Tokenizer throughput on the default model's tokenizer, in MB/s, at
//! 100 KB, 1 MB and 4 MB, on plain text and on special-token-dense text
//! (issue 6/10: tokenizing must be linear, so the 4 MB rate must be within
//! 1.5x of the 100 KB rate). Medians of `STRATA_BENCH_RUNS` runs (default 5).
//!
//! `cargo bench -p strata-model --bench tokenizer`

#![allow(clippy::unwrap_used, missing_docs)] // a bench aborts loudly on any error

use std::time::Instant;

use strata_model::{Gguf, Tokenizer};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seeded English-like text: words of a small vocabulary, spaces,
/// punctuation and newlines.
fn plain(bytes: usize) -> String {
    const WORDS: [&str; 24] = [
        "the", "cache", "of", "a", "server", "keeps", "prefixes", "in", "blocks", "and", "shares",
        "them", "between", "requests", "that", "start", "alike", "1,400", "tokens", "when", "one",
        "is", "evicted", "it",
    ];
    let mut s = String::with_capacity(bytes + 16);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    while s.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        s.push_str(match x % 29 {
            0 => ".\n",
            1 | 2 => ", ",
            _ => " ",
        });
    }
    s.truncate(bytes);
    s
}

/// The flood the issue measured: `<|im_end|>` over and over, with a word
/// between some of them.
fn dense(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 16);
    let mut i = 0;
    while s.len() < bytes {
        s.push_str(if i % 4 == 3 {
            "<|im_start|>user\n"
        } else {
            "<|im_end|>"
        });
        i += 1;
    }
    while !s.is_char_boundary(bytes) {
        s.push(' ');
    }
    s.truncate(bytes);
    s
}

fn rate(runs: usize, text: &str, f: impl Fn(&str) -> usize) -> f64 {
    let _ = f(text); // warm up
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f(text));
                text.len() as f64 / 1e6 / t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let runs: usize = std::env::var("STRATA_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let path = strata_model::default_model::ensure(&mut |l| eprintln!("{l}")).unwrap();
    let tok = Tokenizer::from_gguf(Gguf::open(&path).unwrap().content()).unwrap();
    println!("| text | mode | 100 KB MB/s | 1 MB MB/s | 4 MB MB/s | 4 MB / 100 KB |");
    println!("|---|---|---|---|---|---|");
    let sizes = [100_000, 1_000_000, 4_000_000];
    let mut worst: f64 = f64::INFINITY;
    for (name, make) in [
        ("plain", plain as fn(usize) -> String),
        ("special-dense", dense),
    ] {
        for (mode, specials) in [("plain text", false), ("specials parsed", true)] {
            let rates: Vec<f64> = sizes
                .iter()
                .map(|&n| {
                    let text = make(n);
                    rate(runs, &text, |t| {
                        if specials {
                            tok.encode_with_specials(t).unwrap().len()
                        } else {
                            tok.encode(t).unwrap().len()
                        }
                    })
                })
                .collect();
            let ratio = rates[2] / rates[0];
            worst = worst.min(ratio);
            println!(
                "| {name} | {mode} | {:.2} | {:.2} | {:.2} | {ratio:.2} |",
                rates[0], rates[1], rates[2]
            );
        }
    }
    println!(
        "\nlinear: the 4 MB rate is at least {worst:.2}x the 100 KB rate (goal: at least 1/1.5 = 0.67)"
    );
}
