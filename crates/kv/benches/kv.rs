//! Benchmarks of the KV core, each printing the figure issue 1/6 asks for:
//!
//! - `hash_2048_tokens`: hashing, ns per token;
//! - `lookup_and_pin_{2048,32768}_{hit,miss}`: one lookup given the
//!   request's block hashes (hashing is timed separately above);
//! - `allocate_release_64_blocks`: allocate + release, ns per block;
//! - `complete_1000_blocks`: `complete` of an epoch that frees 1,000 blocks;
//!
//! at pool sizes of 1,000 and 1,000,000 blocks (32,768-token lookups need
//! 2,048 blocks, so they run at 1,000,000 only). Each also prints the pool's
//! work counter (block records touched) per block handled, which must not
//! grow with the pool size.
//!
//! `cargo bench -p strata-kv` (add `-- --quick` for a fast pass).

#![allow(clippy::unwrap_used, missing_docs)] // a bench aborts loudly on any error

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use strata_kv::{
    BlockHasher, BlockPool, ChainRoot, ExtraKeys, HashKey, OwnerTag, PoolConfig, SequenceHasher,
    TokenId,
};

const BS: u32 = 16;

fn hasher() -> BlockHasher {
    BlockHasher::new(&HashKey::from_bytes([9; 32]), BS as usize)
}

fn root(h: &BlockHasher, salt: &[u8]) -> ChainRoot {
    h.root(ExtraKeys {
        model_fingerprint: b"bench",
        cache_salt: Some(salt),
    })
}

fn prompt(n: usize, seed: u32) -> Vec<TokenId> {
    (0..n as u32)
        .map(|i| TokenId::new(i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 49_152))
        .collect()
}

fn seq(h: &BlockHasher, r: ChainRoot, toks: &[TokenId]) -> SequenceHasher {
    let mut s = h.sequence(r);
    s.extend(toks);
    s
}

fn pool(n: u32) -> BlockPool {
    BlockPool::new(
        PoolConfig {
            num_blocks: n,
            block_size: BS,
        },
        hasher(),
    )
    .unwrap()
}

/// Fills and publishes `toks` in `pool`, leaving its blocks free but cached.
fn publish(pool: &mut BlockPool, s: &SequenceHasher) {
    let (h, hit) = pool.lookup_and_pin(OwnerTag(0), s).unwrap();
    let need = s.tokens().len().div_ceil(BS as usize) - hit.blocks;
    pool.allocate(h, need).unwrap();
    let e = pool.next_epoch();
    pool.write(h, e, &s.tokens()[hit.tokens..]).unwrap();
    pool.complete(e).unwrap();
    pool.release(h).unwrap();
}

/// Median of `runs` timings of `f`, divided by `per`.
fn median_ns(runs: usize, per: usize, mut f: impl FnMut() -> Duration) -> f64 {
    let mut v: Vec<f64> = (0..runs)
        .map(|_| f().as_nanos() as f64 / per as f64)
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_hash(c: &mut Criterion) {
    let h = hasher();
    let r = root(&h, b"s");
    let toks = prompt(2048, 1);
    let ns = median_ns(501, 2048, || {
        let t = Instant::now();
        black_box(h.prefix_hashes(r, black_box(&toks)));
        t.elapsed()
    });
    println!("FIGURE hashing: {ns:.2} ns per token (median of 501 runs of 2,048 tokens)");
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Elements(2048));
    g.bench_function("hash_2048_tokens", |b| {
        b.iter(|| h.prefix_hashes(r, black_box(&toks)))
    });
    g.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let h = hasher();
    let mut g = c.benchmark_group("lookup_and_pin");
    for (pool_size, tokens) in [
        (1_000u32, 2048usize),
        (1_000_000, 2048),
        (1_000_000, 32_768),
    ] {
        let mut p = pool(pool_size);
        // Fill the pool with other cached prefixes so the index is realistic.
        let fillers = (pool_size as usize / 2) / (tokens / BS as usize + 1);
        for i in 0..fillers.min(200) {
            publish(
                &mut p,
                &seq(&h, root(&h, &i.to_le_bytes()), &prompt(tokens, 1)),
            );
        }
        let hit_seq = seq(&h, root(&h, b"hit"), &prompt(tokens + 1, 7));
        publish(&mut p, &hit_seq);
        let miss_seq = seq(&h, root(&h, b"miss"), &prompt(tokens + 1, 7));
        for (case, s) in [("hit", &hit_seq), ("miss", &miss_seq)] {
            let work0 = p.work();
            let (holder, hit) = p.lookup_and_pin(OwnerTag(1), s).unwrap();
            let work = p.work() - work0;
            p.release(holder).unwrap();
            assert_eq!(
                hit.blocks,
                if case == "hit" {
                    tokens / BS as usize
                } else {
                    0
                }
            );
            let ns = median_ns(101, 1, || {
                let t = Instant::now();
                let (holder, _) = p.lookup_and_pin(OwnerTag(1), black_box(s)).unwrap();
                let d = t.elapsed();
                p.release(holder).unwrap();
                d
            });
            println!(
                "FIGURE lookup_and_pin {tokens} tokens {case} at pool {pool_size}: {:.2} us \
                 ({} blocks hit, {work} block records touched)",
                ns / 1000.0,
                hit.blocks
            );
            let id = BenchmarkId::new(format!("lookup_and_pin_{tokens}_{case}"), pool_size);
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = Instant::now();
                        let (holder, _) = p.lookup_and_pin(OwnerTag(1), black_box(s)).unwrap();
                        total += t.elapsed();
                        p.release(holder).unwrap();
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

fn bench_allocate_release(c: &mut Criterion) {
    let h = hasher();
    let r = root(&h, b"a");
    let mut g = c.benchmark_group("allocate_release");
    const N: usize = 64;
    g.throughput(Throughput::Elements(N as u64));
    for pool_size in [1_000u32, 1_000_000] {
        let mut p = pool(pool_size);
        let work0 = p.work();
        let holder = p.new_holder(OwnerTag(1), r);
        p.allocate(holder, N).unwrap();
        p.release(holder).unwrap();
        let work = (p.work() - work0) as f64 / N as f64;
        let ns = median_ns(2001, N, || {
            let t = Instant::now();
            let holder = p.new_holder(OwnerTag(1), r);
            p.allocate(holder, N).unwrap();
            p.release(holder).unwrap();
            t.elapsed()
        });
        println!(
            "FIGURE allocate+release at pool {pool_size}: {ns:.1} ns per block \
             ({work:.1} block records touched per block)"
        );
        g.bench_function(
            BenchmarkId::new("allocate_release_64_blocks", pool_size),
            |b| {
                b.iter(|| {
                    let holder = p.new_holder(OwnerTag(1), r);
                    p.allocate(holder, N).unwrap();
                    p.release(holder).unwrap();
                })
            },
        );
    }
    g.finish();
}

fn bench_complete(c: &mut Criterion) {
    let h = hasher();
    let mut g = c.benchmark_group("complete");
    const N: usize = 1000;
    for pool_size in [1_000u32, 1_000_000] {
        let mut p = pool(pool_size);
        let mut salt = 0u64;
        // One quarantined sequence of N blocks per call; times complete() only.
        let mut run = |p: &mut BlockPool| {
            salt += 1;
            let s = seq(
                &h,
                root(&h, &salt.to_le_bytes()),
                &prompt(N * BS as usize, 3),
            );
            let (holder, _) = p.lookup_and_pin(OwnerTag(1), &s).unwrap();
            p.allocate(holder, N).unwrap();
            let e = p.next_epoch();
            p.write(holder, e, s.tokens()).unwrap();
            p.release(holder).unwrap();
            assert_eq!(p.stats().quarantined, N);
            let work0 = p.work();
            let t = Instant::now();
            p.complete(e).unwrap();
            let d = t.elapsed();
            assert_eq!(p.stats().quarantined, 0);
            (d, p.work() - work0)
        };
        let (_, work) = run(&mut p);
        let ns = median_ns(51, 1, || run(&mut p).0);
        println!(
            "FIGURE complete of an epoch releasing {N} blocks (and publishing them) at pool \
             {pool_size}: {:.1} us ({:.1} block records touched per block)",
            ns / 1000.0,
            work as f64 / N as f64
        );
        g.bench_function(BenchmarkId::new("complete_1000_blocks", pool_size), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| run(&mut p).0).sum())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench_hash, bench_lookup, bench_allocate_release, bench_complete
}
criterion_main!(benches);
