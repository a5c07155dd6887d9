//! The SSD tier on a real directory and through an I/O layer that fails on
//! command: restart, exact keys, corruption, torn writes, bounds, the lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use strata_kv::{BlockHash, TokenId};
use strata_store::ssd::{BlockKey, Io, RealIo, SsdConfig, SsdError, SsdStore};

pub(crate) const FP: &[u8] = b"test-model;kv=f16;block-size=4";
const BLOCK: usize = 256;

pub(crate) use strata_testkit::TempDir;

pub(crate) fn config(dir: &Path, capacity: u64) -> SsdConfig {
    SsdConfig {
        dir: dir.to_path_buf(),
        capacity,
        fingerprint: FP.to_vec(),
        sync: false,
    }
}

pub(crate) fn open(dir: &Path, capacity: u64) -> SsdStore {
    let (s, _) = SsdStore::open(config(dir, capacity), Arc::new(RealIo)).unwrap();
    s.check_invariants().unwrap();
    s
}

/// Chain `c`'s block `i`: a hash, its tokens, its parent, its payload.
pub(crate) fn block(c: u32, i: u32) -> (BlockKey, BlockHash, Vec<u8>) {
    let hash = |i: u32| BlockHash::from_bits(((c as u128) << 64) | (i as u128 + 1));
    let parent = if i == 0 {
        BlockHash::from_bits(c as u128)
    } else {
        hash(i - 1)
    };
    let tokens = (0..4).map(|k| TokenId::new(c * 1000 + i * 4 + k)).collect();
    let payload = (0..BLOCK)
        .map(|k| (c as usize * 31 + i as usize * 7 + k) as u8)
        .collect();
    (
        BlockKey {
            hash: hash(i),
            tokens,
        },
        parent,
        payload,
    )
}

/// Writes blocks `from..to` of chain `c` as one record.
fn put(s: &mut SsdStore, c: u32, from: u32, to: u32) -> std::io::Result<bool> {
    let blocks: Vec<_> = (from..to).map(|i| block(c, i)).collect();
    let keys: Vec<BlockKey> = blocks.iter().map(|b| b.0.clone()).collect();
    let payloads: Vec<&[u8]> = blocks.iter().map(|b| &b.2[..]).collect();
    let r = s.put(blocks[0].1, &keys, &payloads);
    s.check_invariants().unwrap();
    r
}

/// What the tier serves for chain `c`'s block `i`: exactly its payload,
/// or nothing.
pub(crate) fn get(s: &mut SsdStore, c: u32, i: u32) -> Option<Vec<u8>> {
    let (key, parent, payload) = block(c, i);
    let got = s.get(key.hash, parent, &key.tokens);
    s.check_invariants().unwrap();
    if let Some(g) = &got {
        assert_eq!(g, &payload, "chain {c} block {i} served other bytes");
    }
    got
}

pub(crate) fn record_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("records"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn records_survive_a_restart_with_their_index_and_byte_accounting() {
    let d = TempDir::new("restart");
    let mut s = open(&d.0, 1 << 20);
    assert!(put(&mut s, 1, 0, 3).unwrap());
    assert!(put(&mut s, 2, 0, 1).unwrap());
    let before = s.stats();
    drop(s);
    let (mut s, rec) = SsdStore::open(config(&d.0, 1 << 20), Arc::new(RealIo)).unwrap();
    assert_eq!((rec.records, rec.bytes), (2, before.bytes));
    assert_eq!(
        s.stats().bytes,
        before.bytes,
        "the accounting starts where it was"
    );
    for i in 0..3 {
        assert!(get(&mut s, 1, i).is_some(), "block {i}");
    }
    assert!(get(&mut s, 2, 0).is_some());
    assert!(get(&mut s, 3, 0).is_none());
    // Files are the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    for f in record_files(&d.0) {
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

#[test]
fn only_the_exact_key_and_model_hit() {
    let d = TempDir::new("key");
    let mut s = open(&d.0, 1 << 20);
    put(&mut s, 1, 0, 2).unwrap();
    let (key, parent, _) = block(1, 1);
    let mut other = key.tokens.clone();
    other[3] = TokenId::new(9);
    assert!(
        s.get(key.hash, parent, &other).is_none(),
        "other tokens under the hash"
    );
    assert!(
        s.get(key.hash, BlockHash::from_bits(77), &key.tokens)
            .is_none(),
        "another parent"
    );
    assert!(get(&mut s, 1, 1).is_some());
    drop(s);
    // Another model (or KV layout, or block size): its records never hit,
    // and are removed.
    let mut c = config(&d.0, 1 << 20);
    c.fingerprint = b"another-model".to_vec();
    let (mut s, rec) = SsdStore::open(c, Arc::new(RealIo)).unwrap();
    assert_eq!((rec.records, rec.foreign_removed), (0, 1));
    assert!(get(&mut s, 1, 0).is_none());
}

#[test]
fn corrupt_cut_and_temporary_files_are_never_served_and_are_removed() {
    let d = TempDir::new("corrupt");
    let mut s = open(&d.0, 1 << 20);
    for c in 0..5 {
        put(&mut s, c, 0, 2).unwrap();
    }
    drop(s);
    let files = record_files(&d.0);
    let bytes = |f: &PathBuf| std::fs::read(f).unwrap();
    // 0: a bit flipped in a payload (found on read); 1: a bit flipped in
    // the header; 2: cut short; 3: its tail zero-filled (same length).
    let mut b = bytes(&files[0]);
    let n = b.len();
    b[n - 10] ^= 0x04;
    std::fs::write(&files[0], &b).unwrap();
    let mut b = bytes(&files[1]);
    b[40] ^= 0x01;
    std::fs::write(&files[1], &b).unwrap();
    let b = bytes(&files[2]);
    std::fs::write(&files[2], &b[..b.len() - 100]).unwrap();
    let mut b = bytes(&files[3]);
    let n = b.len();
    b[n - BLOCK / 2..].fill(0);
    std::fs::write(&files[3], &b).unwrap();
    std::fs::write(d.0.join("records/00000000000000ff.tmp"), b"half a record").unwrap();
    let (mut s, rec) = SsdStore::open(config(&d.0, 1 << 20), Arc::new(RealIo)).unwrap();
    assert_eq!(
        (rec.corrupt_removed, rec.temporary_removed),
        (2, 1),
        "{rec:?}"
    );
    assert_eq!(rec.records, 3);
    // The payload flip and the zero-filled tail are found on read: a miss,
    // the record dropped and counted.
    assert!(get(&mut s, 0, 1).is_none());
    assert!(get(&mut s, 3, 1).is_none());
    assert_eq!(s.stats().corrupt_dropped, 2);
    assert!(get(&mut s, 4, 0).is_some() && get(&mut s, 4, 1).is_some());
    for c in 0..4 {
        for i in 0..2 {
            assert!(get(&mut s, c, i).is_none(), "chain {c} block {i}");
        }
    }
    assert_eq!(record_files(&d.0).len(), 1, "only the sound record is left");
}

#[test]
fn the_directory_stays_within_its_bytes_evicting_the_coldest() {
    let d = TempDir::new("bound");
    // Room for three two-block records.
    let one = {
        let t = TempDir::new("size");
        let mut s = open(&t.0, 1 << 20);
        put(&mut s, 0, 0, 2).unwrap();
        s.stats().bytes
    };
    let mut s = open(&d.0, 3 * one + one / 2);
    for c in 0..3 {
        put(&mut s, c, 0, 2).unwrap();
    }
    assert!(get(&mut s, 0, 0).is_some()); // chain 0 is now the warmest
    put(&mut s, 3, 0, 2).unwrap(); // evicts chain 1, the coldest
    assert!(s.stats().bytes <= s.capacity());
    assert!(get(&mut s, 1, 0).is_none());
    assert!(get(&mut s, 0, 0).is_some() && get(&mut s, 2, 0).is_some());
    assert_eq!(s.stats().evictions, 1);
    // Larger than the whole capacity: not written.
    assert!(!put(&mut s, 9, 0, 8).unwrap());
    drop(s);
    // Reopened smaller, recovery evicts down to the new bound.
    let (s, rec) = SsdStore::open(config(&d.0, one + one / 2), Arc::new(RealIo)).unwrap();
    assert_eq!(rec.evicted, 2);
    assert!(s.stats().bytes <= one + one / 2);
    s.check_invariants().unwrap();
}

#[test]
fn a_second_server_on_the_directory_is_refused() {
    let d = TempDir::new("lock");
    let s = open(&d.0, 1 << 20);
    match SsdStore::open(config(&d.0, 1 << 20), Arc::new(RealIo)) {
        Err(SsdError::Locked(p)) => assert_eq!(p, d.0),
        other => panic!("{other:?}"),
    }
    drop(s);
    open(&d.0, 1 << 20);
}

/// The real file system, failing the `n`-th operation (0-based) of the
/// kinds it counts.
struct FailAt {
    n: usize,
    count: AtomicUsize,
    /// The failure has been injected.
    failed: std::sync::atomic::AtomicBool,
}

impl FailAt {
    fn tick(&self) -> std::io::Result<()> {
        if self.count.fetch_add(1, Ordering::Relaxed) == self.n {
            self.failed.store(true, Ordering::Relaxed);
            Err(std::io::Error::other("injected failure"))
        } else {
            Ok(())
        }
    }
}

impl Io for FailAt {
    fn write_new(&self, path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
        self.tick()?;
        if self.count.load(Ordering::Relaxed) == self.n + 1 && bytes.len() > 64 {
            // Half the record reached the disk before the failure.
            return RealIo
                .write_new(path, &bytes[..bytes.len() / 2], sync)
                .and(Err(std::io::Error::other(
                    "injected failure after a partial write",
                )));
        }
        RealIo.write_new(path, bytes, sync)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.tick()?;
        RealIo.rename(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        RealIo.remove(path)
    }
    fn read_at(&self, path: &Path, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.tick()?;
        RealIo.read_at(path, at, len)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
        RealIo.list(dir)
    }
}

/// A workload run with its `n`-th write, rename or read failing, for
/// every `n`: the failed record is never visible, every block served
/// during or after (reopened on the real file system) is exactly what was
/// written or a miss, and no temporary file survives recovery.
#[test]
fn a_failure_at_any_write_rename_or_read_never_serves_bad_bytes() {
    for n in 0..40 {
        let d = TempDir::new("fail");
        let io = Arc::new(FailAt {
            n,
            count: AtomicUsize::new(0),
            failed: Default::default(),
        });
        let (mut s, _) = SsdStore::open(config(&d.0, 1 << 20), io.clone()).unwrap();
        let mut written = Vec::new();
        for c in 0..6 {
            let before = io.failed.load(Ordering::Relaxed);
            let r = put(&mut s, c, 0, 2);
            let failed_now = !before && io.failed.load(Ordering::Relaxed);
            let visible = s.contains(block(c, 0).0.hash);
            if failed_now {
                // This record's write or rename failed: it is not visible,
                // and put said so.
                assert!(!visible, "n={n}: a failed write is visible");
                assert!(r.is_err(), "n={n}: a failed write reported as written");
            } else {
                assert!(r.unwrap(), "n={n}: room for all");
            }
            if visible {
                written.push(c);
            }
            for &w in &written {
                get(&mut s, w, 0); // checked inside: exact or a miss
            }
        }
        drop(s);
        let (mut s, rec) = SsdStore::open(config(&d.0, 1 << 20), Arc::new(RealIo)).unwrap();
        assert_eq!(rec.corrupt_removed, 0, "n={n}: {rec:?}");
        for c in 0..6 {
            for i in 0..2 {
                get(&mut s, c, i);
            }
        }
        let tmp = record_files(&d.0)
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "tmp"))
            .count();
        assert_eq!(tmp, 0, "n={n}: a temporary file survived recovery");
    }
}

/// Bad records from a caller or from the disk are errors, never a panic:
/// blocks of mixed sizes, a header past its limit, and a crafted header
/// (valid checksum) whose sizes overflow.
#[test]
fn malformed_and_crafted_records_are_refused_not_panics() {
    let d = TempDir::new("crafted");
    let mut s = open(&d.0, 1 << 30);
    let (a, parent, pa) = block(1, 0);
    let (b, _, _) = block(1, 1);
    assert!(
        s.put(parent, &[a.clone(), b.clone()], &[&pa, &pa[..10]])
            .is_err()
    );
    assert!(s.put(parent, std::slice::from_ref(&a), &[]).is_err());
    let many: Vec<BlockKey> = (0..20_000u32).map(|i| block(2, i).0).collect();
    let tiny = [0u8; 1];
    let payloads: Vec<&[u8]> = many.iter().map(|_| &tiny[..]).collect();
    assert!(
        s.put(block(2, 0).1, &many, &payloads).is_err(),
        "a header past 1 MiB"
    );
    s.check_invariants().unwrap();
    assert!(put(&mut s, 3, 0, 2).unwrap());
    drop(s);
    // Rewrite the record's block_bytes to 2^63 and re-sign its header.
    let f = record_files(&d.0).remove(0);
    let mut bytes = std::fs::read(&f).unwrap();
    let hlen = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let at = 16 + 4 + FP.len() + 4 + 4;
    bytes[at..at + 8].copy_from_slice(&(1u64 << 63).to_le_bytes());
    let sum = *blake3::hash(&bytes[..hlen - 32]).as_bytes();
    bytes[hlen - 32..hlen].copy_from_slice(&sum);
    std::fs::write(&f, &bytes).unwrap();
    std::fs::write(d.0.join("records/+1.rec"), b"not one of ours").unwrap();
    let (mut s, rec) = SsdStore::open(config(&d.0, 1 << 30), Arc::new(RealIo)).unwrap();
    assert_eq!(
        (rec.records, rec.corrupt_removed, rec.temporary_removed),
        (0, 1, 1),
        "{rec:?}"
    );
    assert!(get(&mut s, 3, 0).is_none());
}

#[test]
fn a_directory_this_tier_did_not_make_is_refused_not_cleaned() {
    let d = TempDir::new("not-ours");
    // Someone's own files under `records/`: never removed.
    std::fs::create_dir_all(d.0.join("records")).unwrap();
    std::fs::write(d.0.join("records/notes.txt"), b"mine").unwrap();
    let r = SsdStore::open(config(&d.0, 1 << 20), Arc::new(RealIo));
    assert!(matches!(r, Err(SsdError::NotOurs(..))), "{r:?}");
    assert!(d.0.join("records/notes.txt").exists());
    // A `records` that is a link to elsewhere: refused, the target untouched.
    let target = TempDir::new("link-target");
    std::fs::create_dir_all(&target.0).unwrap();
    std::fs::write(target.0.join("precious"), b"x").unwrap();
    let l = TempDir::new("linked");
    std::fs::create_dir_all(&l.0).unwrap();
    std::os::unix::fs::symlink(&target.0, l.0.join("records")).unwrap();
    let r = SsdStore::open(config(&l.0, 1 << 20), Arc::new(RealIo));
    assert!(matches!(r, Err(SsdError::NotOurs(..))), "{r:?}");
    assert!(target.0.join("precious").exists());
    // A tier's own directory opens again.
    let t = TempDir::new("ours");
    drop(open(&t.0, 1 << 20));
    drop(open(&t.0, 1 << 20));
}

/// A write that fails evicts nothing: a disk failing every write keeps what
/// it held instead of draining (before the fix, room was made first).
#[test]
fn a_failed_write_evicts_nothing() {
    let d = TempDir::new("failed-write-keeps");
    let rec = {
        let mut s = open(&d.0, 1 << 20);
        put(&mut s, 1, 0, 2).unwrap();
        s.stats().bytes
    };
    // Room for exactly the records written so far: the next write needs
    // an eviction, and it fails (recovery's two header reads come first).
    let io = Arc::new(FailAt {
        n: 2,
        count: AtomicUsize::new(0),
        failed: Default::default(),
    });
    let (mut s, _) = SsdStore::open(config(&d.0, rec), io).unwrap();
    assert!(put(&mut s, 2, 0, 2).is_err());
    assert_eq!(
        s.stats().records,
        1,
        "the record held before the failure is still held"
    );
    assert!(get(&mut s, 1, 0).is_some());
}

/// A file whose name is the largest id never makes the store's ids wrap
/// (before the fix, recovery raised the next id from the name alone and
/// the next write overflowed).
#[test]
fn a_file_named_with_the_last_id_is_not_trusted() {
    let d = TempDir::new("last-id");
    drop(open(&d.0, 1 << 20));
    std::fs::write(d.0.join("records/fffffffffffffffe.rec"), b"not a record").unwrap();
    let mut s = open(&d.0, 1 << 20);
    assert!(put(&mut s, 1, 0, 2).unwrap());
    assert!(put(&mut s, 2, 0, 2).unwrap());
    assert!(get(&mut s, 1, 1).is_some() && get(&mut s, 2, 1).is_some());
}

/// The disk itself fills up before the tier's bound: the write that finds
/// it full evicts this record's room and tries once more, so the tier
/// keeps taking new records instead of freezing on stale ones.
#[test]
fn a_full_disk_makes_room_and_writes() {
    struct FullOnce(std::sync::atomic::AtomicBool);
    impl Io for FullOnce {
        fn write_new(&self, path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
            if self.0.swap(false, Ordering::Relaxed) {
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            RealIo.write_new(path, bytes, sync)
        }
        fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
            RealIo.rename(from, to)
        }
        fn remove(&self, path: &Path) -> std::io::Result<()> {
            RealIo.remove(path)
        }
        fn read_at(&self, path: &Path, at: u64, len: usize) -> std::io::Result<Vec<u8>> {
            RealIo.read_at(path, at, len)
        }
        fn list(&self, dir: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
            RealIo.list(dir)
        }
    }
    let d = TempDir::new("disk-full");
    {
        let mut s = open(&d.0, 1 << 20);
        put(&mut s, 1, 0, 2).unwrap();
    }
    let io = Arc::new(FullOnce(std::sync::atomic::AtomicBool::new(true)));
    let (mut s, _) = SsdStore::open(config(&d.0, 1 << 20), io).unwrap();
    assert!(put(&mut s, 2, 0, 2).unwrap(), "written after making room");
    assert!(get(&mut s, 2, 1).is_some());
    assert!(
        get(&mut s, 1, 0).is_none(),
        "the coldest record made the room"
    );
}
