//! The SSD tier: a bounded directory of block records that survives
//! restarts (format and rationale: `docs/ssd-format.md`).
//!
//! A record is a file holding a run of consecutive blocks of one chain. It
//! is written under a temporary name and renamed into place only once the
//! write succeeded, so a record is visible (indexed, or found by recovery)
//! only when complete. On open, recovery rebuilds the index and the byte
//! accounting from the records' checksummed headers and removes what is
//! temporary, corrupt, cut short or made for another model. On read, the
//! block's checksum and its exact key (parent hash and tokens) are checked;
//! a mismatch removes the record and is a miss. No I/O error is fatal: it
//! is a miss, or a record not written, counted in [`SsdStats`].
//!
//! This type does no policy: what to write and what to restore is `kv`'s
//! and the engine's choice. It holds no lock of its own; its owner (the
//! engine's I/O thread) calls it from one thread.

mod inspect;
mod io;
mod record;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_kv::{BlockHash, TokenId};

pub use inspect::{Inspection, clear, inspect};
pub use io::{Io, RealIo};
pub use record::{
    BlockKey, Header, MAGIC, RecordError, VERSION, decode_header, decode_header_any, encode,
};

/// The file that marks a directory as this tier's.
pub(crate) const MARKER: &str = "STRATA-SSD-TIER";

/// `O_NOFOLLOW` on Linux (the lock file is never opened through a link).
const fn libc_o_nofollow() -> i32 {
    0o400000
}

/// Why the SSD tier cannot open its directory.
#[derive(Debug, thiserror::Error)]
pub enum SsdError {
    /// Another process holds the directory.
    #[error("{0} is in use by another Strata server (its LOCK file is held)")]
    Locked(PathBuf),
    /// The directory holds what this tier did not make.
    #[error("{0}: {1}; refusing to use it as an SSD tier (name an empty or new directory)")]
    NotOurs(PathBuf, &'static str),
    /// The directory cannot be made, locked or listed.
    #[error("{path}: {error}")]
    Io {
        /// The path at fault.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
}

/// How the SSD tier is set up.
#[derive(Debug, Clone)]
pub struct SsdConfig {
    /// The directory (its `records/` holds the records).
    pub dir: PathBuf,
    /// The most bytes its records may take.
    pub capacity: u64,
    /// The model and KV layout its blocks belong to.
    pub fingerprint: Vec<u8>,
    /// Sync each record's data before it becomes visible (durability is
    /// not required: off, a crash loses recent records, never integrity).
    pub sync: bool,
}

/// What recovery found on open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Records kept.
    pub records: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Temporary files of writes that never finished.
    pub temporary_removed: usize,
    /// Records cut short, corrupt, or of an unknown version.
    pub corrupt_removed: usize,
    /// Records of another model or KV layout.
    pub foreign_removed: usize,
    /// Records evicted because the capacity is now smaller.
    pub evicted: usize,
}

/// Counters since open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SsdStats {
    /// Records held.
    pub records: usize,
    /// Blocks they hold.
    pub blocks: usize,
    /// Bytes they take.
    pub bytes: u64,
    /// Blocks served.
    pub hits: u64,
    /// Blocks asked for and not served (absent, another key, or unreadable).
    pub misses: u64,
    /// Records written.
    pub written: u64,
    /// Records that failed to write (never visible).
    pub write_failures: u64,
    /// Reads that failed (their record is dropped).
    pub read_failures: u64,
    /// Records dropped because a block failed its checksum.
    pub corrupt_dropped: u64,
    /// Records evicted to stay within capacity.
    pub evictions: u64,
}

struct Rec {
    path: PathBuf,
    bytes: u64,
    header: Header,
    last_used: u64,
}

/// The SSD tier's directory.
pub struct SsdStore {
    io: Arc<dyn Io>,
    records_dir: PathBuf,
    config: SsdConfig,
    recs: HashMap<u64, Rec>,
    /// Records by last use, coldest first.
    lru: std::collections::BTreeMap<(u64, u64), ()>,
    /// Each block's record and position in it.
    by_block: HashMap<BlockHash, (u64, usize)>,
    used: u64,
    clock: u64,
    next_id: u64,
    stats: SsdStats,
    /// Blocks no longer served since the last [`SsdStore::take_dropped`]
    /// (evicted, corrupt, unreadable), for the tier index.
    dropped: Vec<BlockHash>,
    /// Held while the store lives: one server per directory.
    _lock: std::fs::File,
}

impl std::fmt::Debug for SsdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SsdStore")
            .field("dir", &self.config.dir)
            .field("stats", &self.stats())
            .finish()
    }
}

impl SsdStore {
    /// Opens (creating) `config.dir`, takes its lock and recovers.
    pub fn open(config: SsdConfig, io: Arc<dyn Io>) -> Result<(Self, Recovery), SsdError> {
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |error| SsdError::Io { path, error }
        };
        let records_dir = config.dir.join("records");
        // Only a directory this tier made is ever cleaned: recovery removes
        // files in `records/`, so a `records/` that exists without our
        // marker (someone's own files) is refused, and so is one that is a
        // symbolic link (it would clean the link's target).
        let marker = config.dir.join(MARKER);
        if let Ok(m) = std::fs::symlink_metadata(&records_dir) {
            if !m.is_dir() {
                return Err(SsdError::NotOurs(records_dir, "is not a directory"));
            }
            // Files all named as this tier names them (a directory made
            // before the marker existed) are adopted.
            let foreign = |d: std::fs::ReadDir| {
                d.filter_map(Result::ok).any(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    let stem = n.strip_suffix(".rec").or_else(|| n.strip_suffix(".tmp"));
                    !stem.is_some_and(|h| h.len() == 16 && h.bytes().all(|c| c.is_ascii_hexdigit()))
                })
            };
            if std::fs::symlink_metadata(&marker).is_err()
                && std::fs::read_dir(&records_dir).is_ok_and(foreign)
            {
                return Err(SsdError::NotOurs(
                    records_dir,
                    "holds files but its directory has no Strata marker",
                ));
            }
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&records_dir)
                .map_err(err(&records_dir))?;
        }
        if std::fs::symlink_metadata(&marker).is_err() {
            std::fs::write(&marker, b"a Strata SSD tier: see docs/ssd-format.md\n")
                .map_err(err(&marker))?;
        }
        let lock_path = config.dir.join("LOCK");
        let lock = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .custom_flags(libc_o_nofollow())
                .open(&lock_path)
                .map_err(err(&lock_path))?
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(SsdError::Locked(config.dir.clone()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(&lock_path)(e)),
        }
        let mut s = Self {
            io,
            records_dir,
            config,
            recs: HashMap::new(),
            lru: std::collections::BTreeMap::new(),
            by_block: HashMap::new(),
            used: 0,
            clock: 0,
            next_id: 0,
            stats: SsdStats::default(),
            dropped: Vec::new(),
            _lock: lock,
        };
        let recovery = s.recover().map_err(err(&s.records_dir.clone()))?;
        Ok((s, recovery))
    }

    fn recover(&mut self) -> std::io::Result<Recovery> {
        let mut r = Recovery::default();
        for (path, size) in self.io.list(&self.records_dir)? {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // Exactly the names this store writes (16 lowercase hex
            // digits), so no two files share an id.
            let id = name
                .strip_suffix(".rec")
                .filter(|h| {
                    h.len() == 16 && h.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
                })
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .filter(|&id| id < u64::MAX);
            let Some(id) = id else {
                // A temporary file (a write that never finished), or
                // something that is not ours to keep in our directory.
                let _ = self.io.remove(&path);
                r.temporary_removed += 1;
                continue;
            };
            match self.read_header(&path, size) {
                Ok(header) => {
                    self.next_id = self.next_id.max(id + 1);
                    self.index(id, path, size, header);
                    r.records += 1;
                    r.bytes += size;
                }
                Err(RecordError::OtherModel) => {
                    let _ = self.io.remove(&path);
                    r.foreign_removed += 1;
                }
                Err(_) => {
                    let _ = self.io.remove(&path);
                    r.corrupt_removed += 1;
                }
            }
        }
        while self.used > self.config.capacity {
            self.evict_one();
            r.evicted += 1;
        }
        r.records -= r.evicted;
        r.bytes = self.used;
        Ok(r)
    }

    /// Reads and checks the header of the record at `path` of `size` bytes.
    fn read_header(&self, path: &Path, size: u64) -> Result<Header, RecordError> {
        let io_err = |e: std::io::Error| RecordError::Malformed(e.to_string());
        let start = self.io.read_at(path, 0, 16).map_err(io_err)?;
        let len = record::header_len(&start)?;
        let bytes = self.io.read_at(path, 0, len).map_err(io_err)?;
        let header = decode_header(&bytes, &self.config.fingerprint)?;
        if header.record_len() as u64 != size {
            return Err(RecordError::Malformed(format!(
                "{size} bytes where the header says {}",
                header.record_len()
            )));
        }
        Ok(header)
    }

    fn index(&mut self, id: u64, path: PathBuf, bytes: u64, header: Header) {
        for (i, b) in header.blocks.iter().enumerate() {
            // A block in two records (written twice across restarts): the
            // later record serves it; the earlier copy is dead weight until
            // its record goes.
            self.by_block.insert(b.hash, (id, i));
        }
        self.used += bytes;
        self.clock += 1;
        self.lru.insert((self.clock, id), ());
        self.recs.insert(
            id,
            Rec {
                path,
                bytes,
                header,
                last_used: self.clock,
            },
        );
    }

    /// Removes record `id` from the index and the disk.
    fn drop_record(&mut self, id: u64) {
        let Some(rec) = self.recs.remove(&id) else {
            return;
        };
        self.lru.remove(&(rec.last_used, id));
        for (i, b) in rec.header.blocks.iter().enumerate() {
            if self.by_block.get(&b.hash) == Some(&(id, i)) {
                self.by_block.remove(&b.hash);
                self.dropped.push(b.hash);
            }
        }
        self.used -= rec.bytes;
        let _ = self.io.remove(&rec.path);
    }

    /// Marks record `id` used now.
    fn touch(&mut self, id: u64) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(r) = self.recs.get_mut(&id) {
            self.lru.remove(&(r.last_used, id));
            r.last_used = clock;
            self.lru.insert((clock, id), ());
        }
    }

    fn evict_one(&mut self) {
        let coldest = self.lru.first_key_value().map(|(&(_, id), _)| id);
        if let Some(id) = coldest {
            self.drop_record(id);
            self.stats.evictions += 1;
        }
    }

    /// Writes a record of `blocks` (consecutive, after `parent`) with
    /// `payloads`, evicting the coldest records to make room. `Ok(false)`:
    /// not written (larger than the whole capacity, or empty). An error is
    /// a record not written (never a visible one), and is counted.
    pub fn put(
        &mut self,
        parent: BlockHash,
        blocks: &[BlockKey],
        payloads: &[&[u8]],
    ) -> std::io::Result<bool> {
        if blocks.is_empty() {
            return Ok(false);
        }
        let tokens = blocks[0].tokens.len();
        let bytes = encode(&self.config.fingerprint, parent, tokens, blocks, payloads)
            .map_err(std::io::Error::other)?;
        let len = bytes.len() as u64;
        if len > self.config.capacity {
            return Ok(false);
        }
        let Some(after) = self.next_id.checked_add(1).filter(|&n| n < u64::MAX) else {
            return Err(std::io::Error::other("record ids are exhausted"));
        };
        let id = self.next_id;
        self.next_id = after;
        let tmp = self.records_dir.join(format!("{id:016x}.tmp"));
        let path = self.records_dir.join(format!("{id:016x}.rec"));
        // Written first, evicting only once it is: a disk that fails every
        // write never drains the tier. (The bound holds for visible
        // records; a temporary file is at most one record over it.)
        let mut written = self.io.write_new(&tmp, &bytes, self.config.sync);
        if written
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::StorageFull)
        {
            // The disk itself is full (other files, or a bound near the
            // partition's size): make this record's room, then try once
            // more, so a full disk does not freeze the tier.
            let _ = self.io.remove(&tmp);
            let target = self.used.saturating_sub(len);
            while self.used > target && !self.recs.is_empty() {
                self.evict_one();
            }
            written = self.io.write_new(&tmp, &bytes, self.config.sync);
        }
        if let Err(e) = written {
            let _ = self.io.remove(&tmp);
            self.stats.write_failures += 1;
            return Err(e);
        }
        while self.used + len > self.config.capacity {
            self.evict_one();
        }
        if let Err(e) = self.io.rename(&tmp, &path) {
            let _ = self.io.remove(&tmp);
            self.stats.write_failures += 1;
            return Err(e);
        }
        let header = decode_header(&bytes, &self.config.fingerprint)
            .expect("a record this build just encoded decodes");
        self.index(id, path, len, header);
        self.stats.written += 1;
        Ok(true)
    }

    /// Blocks that stopped being served since the last call (evicted,
    /// corrupt or unreadable records), for the tier index.
    pub fn take_dropped(&mut self) -> Vec<BlockHash> {
        let mut d = std::mem::take(&mut self.dropped);
        d.retain(|h| !self.by_block.contains_key(h));
        d
    }

    /// Every block served, with its exact key: (hash, parent hash,
    /// tokens), for the tier index at start.
    pub fn blocks(&self) -> Vec<(BlockHash, BlockHash, Vec<TokenId>)> {
        let mut out = Vec::with_capacity(self.by_block.len());
        for (&hash, &(id, i)) in &self.by_block {
            let h = &self.recs[&id].header;
            let parent = if i == 0 {
                h.parent
            } else {
                h.blocks[i - 1].hash
            };
            out.push((hash, parent, h.blocks[i].tokens.clone()));
        }
        out
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// Whether the tier holds `hash` (a look, not a hit).
    pub fn contains(&self, hash: BlockHash) -> bool {
        self.by_block.contains_key(&hash)
    }

    /// The payload of block `hash` if the tier holds it under exactly this
    /// key (`parent` before it, `tokens` in it) and its bytes verify; a
    /// corrupt or unreadable record is removed and is a miss.
    pub fn get(
        &mut self,
        hash: BlockHash,
        parent: BlockHash,
        tokens: &[TokenId],
    ) -> Option<Vec<u8>> {
        self.get_run(&[(hash, parent, tokens)]).pop()
    }

    /// The payloads of consecutive blocks of one chain, given by their
    /// exact keys (hash, parent hash, tokens) in chain order, up to the
    /// first that is not served (absent, another key, unreadable or
    /// corrupt; a bad record is dropped as in [`Self::get`]). Blocks that
    /// sit one after another in a record are read with one read.
    pub fn get_run(&mut self, keys: &[(BlockHash, BlockHash, &[TokenId])]) -> Vec<Vec<u8>> {
        // Where the keys lie: runs of consecutive blocks of one record,
        // up to the first key not held under exactly this key.
        let mut runs: Vec<(u64, usize, usize)> = Vec::new();
        let mut i = 0;
        while i < keys.len() {
            let Some(&(id, first)) = self.by_block.get(&keys[i].0) else {
                break;
            };
            let h = &self.recs[&id].header;
            let key_ok = |k: usize, (hash, parent, tokens): (BlockHash, BlockHash, &[TokenId])| {
                let p = if k == 0 {
                    h.parent
                } else {
                    h.blocks[k - 1].hash
                };
                h.blocks[k].hash == hash && p == parent && h.blocks[k].tokens == tokens
            };
            if !key_ok(first, keys[i]) {
                break;
            }
            let mut n = 1;
            while i + n < keys.len() && first + n < h.blocks.len() && key_ok(first + n, keys[i + n])
            {
                n += 1;
            }
            runs.push((id, first, n));
            i += n;
        }
        let found: usize = runs.iter().map(|r| r.2).sum();
        if found < keys.len() {
            self.stats.misses += 1;
        }
        // Read and verify the runs on two threads: the device serves two
        // reads at once faster than one, and one run's checksums overlap
        // the next run's read. NOTE: measured on this machine's disk with
        // pages dropped: one reader 1.3 GB/s, two 1.65 GB/s; 92 KB reads
        // with the kernel's readahead beat one large read (0.46 GB/s) and
        // a WILLNEED hint (0.55 GB/s).
        // A run's blocks, or where it went bad and whether that was
        // corruption (else a read error).
        type Read = Result<Vec<Vec<u8>>, (usize, bool)>;
        let results: Vec<std::sync::Mutex<Option<Read>>> =
            runs.iter().map(|_| std::sync::Mutex::new(None)).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let recs = &self.recs;
        let io = &self.io;
        let work = || {
            loop {
                let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(id, first, n)) = runs.get(j) else {
                    break;
                };
                let rec = &recs[&id];
                let h = &rec.header;
                let start = h.block_range(first).start as u64;
                let r = match io.read_blocks(&rec.path, start, h.block_bytes, n) {
                    Ok(blocks) => {
                        let bad = (0..n).find(|&k| h.verify_block(first + k, &blocks[k]).is_err());
                        match bad {
                            None => Ok(blocks),
                            Some(k) => Err((k, true)),
                        }
                    }
                    Err(e) => Err((0, e.kind() == std::io::ErrorKind::UnexpectedEof)),
                };
                *results[j].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            }
        };
        if runs.len() > 1 {
            std::thread::scope(|sc| {
                // No second thread to be had (limits): one does it all.
                let _ = std::thread::Builder::new().spawn_scoped(sc, work);
                work();
            });
        } else {
            work();
        }
        let mut out = Vec::with_capacity(found);
        for (j, cell) in results.into_iter().enumerate() {
            let (id, _, n) = runs[j];
            let r = cell
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every run was read");
            match r {
                Ok(blocks) => {
                    out.extend(blocks);
                    self.stats.hits += n as u64;
                    self.touch(id);
                }
                Err((_, corrupt)) => {
                    if corrupt {
                        self.stats.corrupt_dropped += 1;
                    } else {
                        self.stats.read_failures += 1;
                    }
                    // The record goes, and the restore stops at its run.
                    self.drop_record(id);
                    self.stats.misses += 1;
                    break;
                }
            }
        }
        out
    }

    /// Counters, with the current occupancy.
    pub fn stats(&self) -> SsdStats {
        SsdStats {
            records: self.recs.len(),
            blocks: self.by_block.len(),
            bytes: self.used,
            ..self.stats
        }
    }

    /// The directory's byte bound.
    pub fn capacity(&self) -> u64 {
        self.config.capacity
    }

    /// Checks the index against itself and the bound (tests call it after
    /// every mutation).
    pub fn check_invariants(&self) -> Result<(), String> {
        let sum: u64 = self.recs.values().map(|r| r.bytes).sum();
        if sum != self.used {
            return Err(format!("used {} but records hold {sum}", self.used));
        }
        if self.used > self.config.capacity {
            return Err(format!(
                "used {} past capacity {}",
                self.used, self.config.capacity
            ));
        }
        for (hash, &(id, i)) in &self.by_block {
            let rec = self
                .recs
                .get(&id)
                .ok_or(format!("{hash:?} names a missing record"))?;
            if rec.header.blocks.get(i).map(|b| b.hash) != Some(*hash) {
                return Err(format!("{hash:?} names the wrong block of record {id}"));
            }
        }
        for (id, r) in &self.recs {
            if r.header.record_len() as u64 != r.bytes {
                return Err(format!("record {id}: length disagrees with its header"));
            }
            if !self.lru.contains_key(&(r.last_used, *id)) {
                return Err(format!("record {id} is missing from the LRU order"));
            }
        }
        if self.lru.len() != self.recs.len() {
            return Err("the LRU order names records that are gone".into());
        }
        Ok(())
    }
}
