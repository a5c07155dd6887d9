//! The roofline of this machine and where Strata's forward pass sits under
//! it, measured in one run: memory read bandwidth (a streaming read of a
//! buffer far larger than the last-level cache), the int8 dot kernel's
//! peak on cache-resident data, and the model's decode and prefill, each
//! for 1 and 2 threads. Decode is reported as a fraction of the bandwidth
//! (weight and KV bytes read per token over the time per token), prefill
//! as a fraction of the kernel's peak (matmul MACs per token times tokens
//! per second).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use strata_model::{Gguf, LlamaModel, LoadOptions, Logits, SeqInput};
use strata_store::{Arena, BlockId, TokenId};

use crate::stats::median;

/// One thread count's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Roof {
    /// Threads used.
    pub threads: usize,
    /// Streaming read bandwidth, GB/s (medians of passes), of a buffer
    /// far larger than the last-level cache.
    pub read_gb_s: f64,
    /// The same over a buffer the size of the weights: what decode's
    /// repeated sweep sees when part of it stays in the last-level cache.
    pub read_weights_sized_gb_s: f64,
    /// The Q4_1 x int8 kernel's peak, GMAC/s.
    pub kernel_gmac_s: f64,
    /// Decode at each depth: (depth, tokens/s, GB/s read, fraction of the
    /// bandwidth).
    pub decode: Vec<DecodeRoof>,
    /// Prefill of 512 tokens: tokens/s.
    pub prefill_tok_s: f64,
    /// Prefill's matmul rate, GMAC/s.
    pub prefill_gmac_s: f64,
    /// Prefill's fraction of the kernel's peak.
    pub prefill_fraction: f64,
}

/// Decode at one depth.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecodeRoof {
    /// Tokens already in the context.
    pub depth: usize,
    /// Single-sequence tokens/s.
    pub tok_s: f64,
    /// Bytes read per token (weights, and the KV of `depth` tokens).
    pub bytes_per_token: u64,
    /// Those bytes times the rate, GB/s.
    pub gb_s: f64,
    /// That over the measured read bandwidth.
    pub fraction: f64,
    /// That over the weights-sized buffer's read bandwidth.
    pub fraction_weights_sized: f64,
}

/// The whole roofline report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Roofline {
    /// The model file.
    pub model: String,
    /// Weight bytes read per forward pass.
    pub weight_bytes: u64,
    /// KV bytes per token of context (f16 K and V, all layers).
    pub kv_bytes_per_token: u64,
    /// The layers' matmul multiply-accumulates per token (the output head
    /// not counted: prefill runs it for the last row only).
    pub macs_per_token: u64,
    /// The output head's, per row that samples.
    pub output_macs: u64,
    /// Per thread count.
    pub roofs: Vec<Roof>,
}

/// Streaming read bandwidth in GB/s over `buf` with `threads` threads
/// (each reads its own contiguous part): the median of `passes` passes.
pub fn read_bandwidth(buf: &[u64], threads: usize, passes: usize) -> f64 {
    let threads = threads.max(1);
    let part = buf.len().div_ceil(threads);
    let mut rates = Vec::new();
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        std::thread::scope(|s| {
            for chunk in buf.chunks(part) {
                s.spawn(move || black_box(sum(chunk)));
            }
        });
        rates.push((buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    median(&rates)
}

/// A sum bound by the loads, not by one add chain: 32-byte loads into four
/// AVX2 accumulators where the CPU has AVX2, else eight scalar ones.
fn sum(v: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, which the function is compiled for.
        return unsafe { sum_avx2(v) };
    }
    sum_scalar(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(v: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` holds 16 u64s; lanes 4i..4i+4 are inside it, and
            // the load is unaligned.
            let x = unsafe { _mm256_loadu_si256(c.as_ptr().add(4 * i).cast()) };
            *a = _mm256_add_epi64(*a, x);
        }
    }
    let mut lanes = [0u64; 4];
    let total = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    // SAFETY: `lanes` is 32 bytes; the store is unaligned.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), total) };
    lanes
        .iter()
        .chain(chunks.remainder())
        .fold(0, |a, x| a.wrapping_add(*x))
}

fn sum_scalar(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*x);
        }
    }
    let tail: u64 = chunks.remainder().iter().fold(0, |a, x| a.wrapping_add(*x));
    acc.iter().fold(tail, |a, x| a.wrapping_add(*x))
}

fn tokens(n: usize, seed: u32) -> Vec<TokenId> {
    (0..n as u32)
        .map(|i| TokenId::new(i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 49_000 + 17))
        .collect()
}

/// Measures the roofline for each of `threads` on the model at `path`,
/// with a read buffer of `buffer_bytes` (make it several times the
/// last-level cache), `runs` runs of each figure (medians).
pub fn measure(
    path: &Path,
    threads: &[usize],
    buffer_bytes: usize,
    runs: usize,
    say: &mut dyn FnMut(&str),
) -> Result<Roofline> {
    let runs = runs.max(1);
    say(&format!("filling a {} MiB read buffer", buffer_bytes >> 20));
    let buf: Vec<u64> = (0..buffer_bytes / 8).map(|i| i as u64 ^ 0x5555).collect();
    let mut roofs = Vec::new();
    let mut head = None;
    for &th in threads {
        say(&format!("{th} thread(s): loading the model"));
        let model = LlamaModel::load(
            &mut Gguf::open(path).with_context(|| format!("opening {}", path.display()))?,
            LoadOptions {
                threads: th,
                requantize: false,
            },
        )?;
        say(&format!("{th} thread(s): read bandwidth"));
        let read_gb_s = read_bandwidth(&buf, th, runs.max(5));
        let words = (model.weight_bytes() / 8).min(buf.len());
        let weights_sized = read_bandwidth(&buf[..words], th, runs.max(5) * 4);
        say(&format!("{th} thread(s): int8 kernel peak"));
        let kernel_gmac_s = median(
            &(0..runs.max(3))
                .map(|_| strata_model::int8_kernel_peak(th, Duration::from_millis(300)))
                .collect::<Vec<_>>(),
        );
        let c = model.config();
        let kv_per_token = (c.layers * c.kv_heads * c.head_dim * 2 * 2) as u64;
        let weight_bytes = model.weight_bytes() as u64;
        let macs = model.matmul_macs_per_token() as u64;
        let output_macs = model.output_macs() as u64;
        head = Some((weight_bytes, kv_per_token, macs, output_macs));
        let bs = 16;
        let per_seq = (1_536 + 600usize).div_ceil(bs);
        let mut arena = Arena::new(model.arena_layout(per_seq, bs))?;
        let table: Vec<BlockId> = (0..per_seq as u32).map(BlockId::new).collect();
        let mut fwd = |toks: &[TokenId], start: usize, logits: Logits| -> Result<()> {
            model.forward(
                &mut arena,
                &[SeqInput {
                    tokens: toks,
                    start,
                    block_table: &table,
                    logits,
                }],
            )?;
            Ok(())
        };
        say(&format!("{th} thread(s): prefill"));
        let prompt = tokens(512, 1);
        let mut pp = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            fwd(&prompt, 0, Logits::Last)?;
            pp.push(512.0 / t.elapsed().as_secs_f64());
        }
        let prefill_tok_s = median(&pp);
        // 512 rows through the layers, one through the output head.
        let prefill_gmac_s = prefill_tok_s * (macs as f64 + output_macs as f64 / 512.0) / 1e9;
        let mut decode = Vec::new();
        for depth in [0usize, 1_536] {
            say(&format!("{th} thread(s): decode at depth {depth}"));
            let ctx = tokens(depth + 32, 2);
            let mut rates = Vec::new();
            for _ in 0..runs {
                if depth > 0 {
                    fwd(&ctx[..depth], 0, Logits::None)?;
                }
                let t = Instant::now();
                for i in 0..32 {
                    fwd(&ctx[depth + i..depth + i + 1], depth + i, Logits::Last)?;
                }
                rates.push(32.0 / t.elapsed().as_secs_f64());
            }
            let tok_s = median(&rates);
            // The KV read per step grows over the 32 steps: count the mean.
            let bytes = weight_bytes + kv_per_token * (depth as u64 + 16);
            let gb_s = bytes as f64 * tok_s / 1e9;
            decode.push(DecodeRoof {
                depth,
                tok_s,
                bytes_per_token: bytes,
                gb_s,
                fraction: gb_s / read_gb_s,
                fraction_weights_sized: gb_s / weights_sized,
            });
        }
        roofs.push(Roof {
            threads: th,
            read_gb_s,
            read_weights_sized_gb_s: weights_sized,
            kernel_gmac_s,
            decode,
            prefill_tok_s,
            prefill_gmac_s,
            prefill_fraction: prefill_gmac_s / kernel_gmac_s,
        });
    }
    let (weight_bytes, kv_bytes_per_token, macs_per_token, output_macs) = head.unwrap_or_default();
    Ok(Roofline {
        model: path.display().to_string(),
        weight_bytes,
        kv_bytes_per_token,
        macs_per_token,
        output_macs,
        roofs,
    })
}
