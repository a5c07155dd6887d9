//! The tiers below the arena on the tiny model's real KV bytes: a prefix
//! evicted from a small arena comes back from host RAM or SSD, a restart
//! finds it on SSD, and every output equals the request run alone. Peers'
//! field failures, one test each: a failed restore is truncated and still
//! exact (Dynamo #15079), another model or block size never hits (vLLM
//! #49261), another salt never hits (cross-tenant), the index survives a
//! restart (LMCache #562, #4564), a slow SSD makes the policy recompute
//! (SGLang #26305).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_engine::{Engine, TierStores};
use strata_kv::TokenId;
use strata_model::LlamaModel;
use strata_store::HostStore;
use strata_store::ssd::{RealIo, SsdConfig, SsdStore};

use crate::fixture::{Setup, assert_whole, engine_tiered, greedy, model, outcome, prompt, solo};

pub(crate) use strata_testkit::TempDir;

/// The real file system, with each write, rename and read failing at
/// random (`rate`), and reads now and then slow: a disk that errs.
pub(crate) struct FlakyIo {
    rate: f64,
    rng: std::sync::Mutex<rand_chacha::ChaCha8Rng>,
}

impl FlakyIo {
    pub(crate) fn new(rate: f64, seed: u64) -> Self {
        use rand::SeedableRng;
        Self {
            rate,
            rng: std::sync::Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    fn roll(&self) -> std::io::Result<()> {
        use rand::Rng;
        let mut r = self.rng.lock().unwrap();
        if r.random_bool(0.02) {
            std::thread::sleep(std::time::Duration::from_micros(r.random_range(0..300)));
        }
        if r.random_bool(self.rate) {
            Err(std::io::Error::other("injected I/O error"))
        } else {
            Ok(())
        }
    }
}

impl strata_store::ssd::Io for FlakyIo {
    fn write_new(&self, path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
        self.roll()?;
        RealIo.write_new(path, bytes, sync)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.roll()?;
        RealIo.rename(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        RealIo.remove(path)
    }
    fn read_at(&self, path: &Path, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.roll()?;
        RealIo.read_at(path, at, len)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
        RealIo.list(dir)
    }
}

const BS: usize = 4;

fn ssd(m: &LlamaModel, dir: &Path, bs: usize) -> SsdStore {
    SsdStore::open(
        SsdConfig {
            dir: dir.to_path_buf(),
            capacity: 64 << 20,
            fingerprint: m.fingerprint(bs),
            sync: false,
        },
        Arc::new(RealIo),
    )
    .unwrap()
    .0
}

fn stores(host: Option<u64>, ssd: Option<SsdStore>) -> TierStores {
    TierStores {
        host: host.map(HostStore::new),
        ssd,
        write_back: true,
        write_through: true,
        min_chain: 1,
        restore_policy: false,
        ssd_read_delay: std::time::Duration::ZERO,
        ssd_probe_ns: None,
    }
}

fn setup(blocks: usize) -> Setup {
    Setup {
        blocks,
        block_size: BS,
        ..Setup::default()
    }
}

/// Runs `prompt` for `n` greedy tokens: (tokens, cached prompt tokens).
fn run(e: &Engine, p: &[TokenId], n: usize) -> (Vec<TokenId>, usize) {
    let o = outcome(e.submit(greedy(p.to_vec(), n)).unwrap().collect_blocking());
    assert_eq!(o.usage.cached_tokens, o.cached);
    (o.tokens, o.cached)
}

/// Fills the small arena with other prompts, so `p`'s blocks are evicted.
fn flood(e: &Engine, seed: u32) {
    for k in 0..4 {
        run(e, &prompt(0, 40, seed * 10 + k), 1);
    }
}

fn capped(len: usize) -> usize {
    (len - 1) / BS * BS
}

#[test]
fn an_evicted_prefix_comes_back_from_each_tier_exactly() {
    let m = model(1);
    let p = prompt(0, 37, 7);
    let want = solo(&m, &p, 6);
    for (name, host, with_ssd) in [
        ("host", Some(8 << 20), false),
        ("ssd", None, true),
        ("both", Some(8 << 20), true),
    ] {
        let dir = TempDir::new(name);
        let e = engine_tiered(
            &m,
            setup(24),
            Some(stores(host, with_ssd.then(|| ssd(&m, &dir.0, BS)))),
        );
        assert_eq!(run(&e, &p, 6), (want.clone(), 0), "{name}: cold");
        flood(&e, 1);
        let (tokens, cached) = run(&e, &p, 6);
        assert_eq!(
            tokens, want,
            "{name}: the restored prefix computes the same tokens"
        );
        assert_eq!(
            cached,
            capped(p.len()),
            "{name}: every block but the capped last one restored"
        );
        let t = e.tier_stats();
        assert!(
            t.restored_blocks >= (capped(p.len()) / BS) as u64,
            "{name}: {t:?}"
        );
        assert_whole(&e);
        e.shutdown();
    }
}

#[test]
fn a_restart_finds_the_prefix_on_ssd_and_the_output_is_the_cold_one() {
    let m = model(1);
    let dir = TempDir::new("restart");
    let p = prompt(0, 61, 3);
    let want = solo(&m, &p, 5);
    let e = engine_tiered(&m, setup(64), Some(stores(None, Some(ssd(&m, &dir.0, BS)))));
    assert_eq!(run(&e, &p, 5), (want.clone(), 0));
    e.shutdown();
    // The index and the byte accounting come back from the records.
    let store = ssd(&m, &dir.0, BS);
    let st = store.stats();
    assert!(st.blocks >= capped(p.len()) / BS, "{st:?}");
    let e = engine_tiered(&m, setup(64), Some(stores(None, Some(store))));
    assert_eq!(run(&e, &p, 5), (want, capped(p.len())), "after a restart");
    assert_whole(&e);
    e.shutdown();
}

#[test]
fn another_model_or_block_size_never_hits_the_ssd() {
    let m = model(1);
    let other = model(2);
    let dir = TempDir::new("foreign");
    let p = prompt(0, 41, 5);
    let e = engine_tiered(&m, setup(64), Some(stores(None, Some(ssd(&m, &dir.0, BS)))));
    run(&e, &p, 2);
    e.shutdown();
    // Another model's weights: its fingerprint refuses every record.
    let e = engine_tiered(
        &other,
        setup(64),
        Some(stores(None, Some(ssd(&other, &dir.0, BS)))),
    );
    assert_eq!(run(&e, &p, 2), (solo(&other, &p, 2), 0));
    e.shutdown();
    // The same model with another block size.
    let e2 = engine_tiered(
        &m,
        Setup {
            blocks: 64,
            block_size: 8,
            ..Setup::default()
        },
        Some(stores(None, Some(ssd(&m, &dir.0, 8)))),
    );
    assert_eq!(run(&e2, &p, 2), (solo(&m, &p, 2), 0));
    e2.shutdown();
}

#[test]
fn a_corrupt_record_is_a_truncated_restore_and_the_output_is_the_cold_one() {
    let m = model(1);
    let dir = TempDir::new("corrupt");
    let p = prompt(0, 61, 9);
    let want = solo(&m, &p, 4);
    let e = engine_tiered(&m, setup(64), Some(stores(None, Some(ssd(&m, &dir.0, BS)))));
    run(&e, &p, 4);
    e.shutdown();
    // Flip one payload byte near the end of every record: headers still
    // verify at start, the blocks fail their checksums when read.
    for f in std::fs::read_dir(dir.0.join("records")).unwrap() {
        let path = f.unwrap().path();
        let mut b = std::fs::read(&path).unwrap();
        let n = b.len();
        b[n - 3] ^= 0x40;
        std::fs::write(&path, b).unwrap();
    }
    let e = engine_tiered(&m, setup(64), Some(stores(None, Some(ssd(&m, &dir.0, BS)))));
    let (tokens, cached) = run(&e, &p, 4);
    assert_eq!(
        tokens, want,
        "a restore that failed is recomputed, never served"
    );
    assert!(
        cached < capped(p.len()),
        "a failed restore is not counted as loaded"
    );
    let t = e.tier_stats();
    assert!(
        t.ssd.unwrap().corrupt_dropped > 0 && t.restore_misses > 0,
        "{t:?}"
    );
    // The next run recomputes what was dropped and restores nothing bad.
    assert_eq!(run(&e, &p, 4).0, want);
    assert_whole(&e);
    e.shutdown();
}

#[test]
fn a_salt_hits_only_its_own_prefixes_on_host_and_ssd_and_after_restart() {
    let m = model(1);
    let dir = TempDir::new("salt");
    let p = prompt(0, 45, 2);
    let salted = |salt: &str, n| {
        let mut r = greedy(p.clone(), n);
        r.cache_salt = Some(salt.as_bytes().to_vec());
        r
    };
    let go = |e: &Engine, salt: &str| {
        outcome(e.submit(salted(salt, 2)).unwrap().collect_blocking()).cached
    };
    let e = engine_tiered(
        &m,
        setup(24),
        Some(stores(Some(8 << 20), Some(ssd(&m, &dir.0, BS)))),
    );
    assert_eq!(go(&e, "a"), 0);
    flood(&e, 3);
    assert_eq!(go(&e, "b"), 0, "another salt misses the tiers");
    flood(&e, 4);
    assert_eq!(go(&e, "a"), capped(p.len()), "the same salt hits them");
    e.shutdown();
    let e = engine_tiered(&m, setup(24), Some(stores(None, Some(ssd(&m, &dir.0, BS)))));
    assert_eq!(go(&e, "c"), 0, "another salt misses after a restart");
    assert_eq!(
        go(&e, "a"),
        capped(p.len()),
        "the same salt hits after a restart"
    );
    e.shutdown();
}

#[test]
fn a_slow_ssd_makes_the_policy_recompute() {
    let m = model(1);
    let dir = TempDir::new("slow");
    let p = prompt(0, 81, 4);
    let want = solo(&m, &p, 2);
    let e = engine_tiered(&m, setup(64), Some(stores(None, Some(ssd(&m, &dir.0, BS)))));
    run(&e, &p, 2);
    e.shutdown();
    let mut slow = stores(None, Some(ssd(&m, &dir.0, BS)));
    slow.restore_policy = true;
    slow.ssd_read_delay = std::time::Duration::from_millis(20);
    // A probe of this disk measured it at 20 ms a block.
    slow.ssd_probe_ns = Some(20e6);
    let e = engine_tiered(&m, setup(64), Some(slow));
    // The recompute cost is measured on a first, unrelated prefill.
    run(&e, &prompt(0, 64, 99), 1);
    let (tokens, cached) = run(&e, &p, 2);
    assert_eq!(tokens, want);
    assert_eq!(cached, 0, "restoring at 20 ms a block loses to recomputing");
    let t = e.tier_stats();
    assert!(t.recomputed_runs >= 1 && t.restored_blocks == 0, "{t:?}");
    e.shutdown();
}

/// A disk whose reads panic the I/O thread.
struct PanicIo;

impl strata_store::ssd::Io for PanicIo {
    fn write_new(&self, path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
        RealIo.write_new(path, bytes, sync)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        RealIo.rename(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        RealIo.remove(path)
    }
    fn read_at(&self, path: &Path, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
        if path.extension().is_some_and(|e| e == "rec") && at > 0 {
            panic!("injected: the tier I/O thread dies mid-restore");
        }
        RealIo.read_at(path, at, len)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
        RealIo.list(dir)
    }
}

#[test]
fn a_dead_tier_thread_turns_the_tiers_off_and_restores_become_recomputes() {
    let m = model(1);
    let dir = TempDir::new("dead-io");
    let p = prompt(0, 41, 8);
    let want = solo(&m, &p, 3);
    let e = engine_tiered(&m, setup(64), Some(stores(None, Some(ssd(&m, &dir.0, BS)))));
    run(&e, &p, 3);
    e.shutdown();
    let store = SsdStore::open(
        SsdConfig {
            dir: dir.0.clone(),
            capacity: 64 << 20,
            fingerprint: m.fingerprint(BS),
            sync: false,
        },
        Arc::new(PanicIo),
    )
    .unwrap()
    .0;
    let e = engine_tiered(&m, setup(64), Some(stores(None, Some(store))));
    // The restore's read kills the I/O thread: the request does not hang,
    // it computes the prefix itself.
    assert_eq!(run(&e, &p, 3), (want.clone(), 0));
    assert_eq!(run(&e, &p, 3).0, want, "and the engine runs on");
    assert_whole(&e);
    e.shutdown();
}
