//! The tiers' I/O thread: the host-RAM and SSD stores live here, and only
//! here. The executor sends it the bytes that a step's demotions copied out
//! of the arena; the scheduler sends it the restores a lookup planned. It
//! reports back, as messages to the scheduler, where each block now lives
//! (for the tier index) and the restored payloads (for the next step to
//! copy in). It never touches the pool or its lock, and nothing waits for
//! it: allocation never waits on I/O, and a slow or failing disk only
//! makes restores miss.
//!
//! ```text
//!   executor ──Demote(bytes)──►  [strata-tier-io]  ──Located(hash, tier)──► scheduler
//!   scheduler ──Fetch(keys)───►  host, then SSD    ──Fetched(payloads)────► scheduler
//! ```
//!
//! Where a block goes: to the host tier if there is one, and to the SSD if
//! there is one; the index records the fastest tier holding it. A block
//! the host evicts spills to the SSD if the SSD does not have it.

use std::time::Instant;

use strata_kv::{BlockHash, Demotion, Tier, TokenId};
use strata_store::ssd::{BlockKey, SsdStore};
use strata_store::{HostBlock, HostStats, HostStore};

use crate::request::RequestId;
use crate::sync::{Arc, Mutex, lock, mpsc, thread};

/// Blocks per SSD record at most (a run of one chain); 64 blocks of the
/// default model are about 6 MB.
const MAX_RUN: usize = 64;

/// The stores below the arena, and how to use them.
pub struct TierStores {
    /// The host-RAM tier.
    pub host: Option<HostStore>,
    /// The SSD tier (opened, recovered).
    pub ssd: Option<SsdStore>,
    /// Demote on eviction (write-back).
    pub write_back: bool,
    /// Demote soon after publication (write-through).
    pub write_through: bool,
    /// Write-through only for chains of at least this many blocks.
    pub min_chain: u32,
    /// Restore a run of blocks only when restoring is estimated faster
    /// than recomputing it (else always, while the tier serves).
    pub restore_policy: bool,
    /// Extra time each SSD read takes (tests of a slow disk).
    pub ssd_read_delay: std::time::Duration,
    /// A measured SSD read time per block (ns) to start the policy with.
    pub ssd_probe_ns: Option<f64>,
}

impl std::fmt::Debug for TierStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierStores")
            .field("host", &self.host)
            .field("ssd", &self.ssd)
            .field("write_back", &self.write_back)
            .field("write_through", &self.write_through)
            .finish()
    }
}

/// What the tiers have done, for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TierStats {
    /// The host tier's counters and occupancy.
    pub host: Option<HostStats>,
    /// The SSD tier's counters and occupancy.
    pub ssd: Option<strata_store::ssd::SsdStats>,
    /// The SSD's capacity.
    pub ssd_capacity: u64,
    /// The host tier's capacity.
    pub host_capacity: u64,
    /// Bytes copied out of the arena into the tiers.
    pub bytes_down: u64,
    /// Bytes restored into the arena.
    pub bytes_up: u64,
    /// Blocks restored.
    pub restored_blocks: u64,
    /// Restores that stopped at a miss or a bad block (the rest was
    /// recomputed).
    pub restore_misses: u64,
    /// Runs of tier blocks the policy chose to recompute instead.
    pub recomputed_runs: u64,
    /// Demoted blocks that no tier took (write failed, or too large).
    pub demotions_failed: u64,
    /// Writes refused because the SSD is full of pinned or newer records,
    /// or its disk reported no space.
    pub disk_full: u64,
    /// Restore times, per restore (a run of blocks).
    pub restore_seconds: Histogram,
    /// Demotion write times, per batch (one step's demotions).
    pub demotion_seconds: Histogram,
    /// Blocks that left every tier (evicted from the last one holding
    /// them, or found corrupt).
    pub dropped: u64,
}

/// A histogram of durations: counts per bucket (`le` bounds in seconds,
/// the last bucket unbounded), their sum and count.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// Counts per bucket, one more than [`Histogram::BOUNDS`].
    pub counts: Vec<u64>,
    /// Sum of the samples, in seconds.
    pub sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; Self::BOUNDS.len() + 1],
            sum: 0.0,
        }
    }
}

impl Histogram {
    /// Upper bounds of the buckets, in seconds.
    pub const BOUNDS: [f64; 12] = [
        1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0,
    ];

    fn observe(&mut self, secs: f64) {
        let i = Self::BOUNDS.partition_point(|&b| b < secs);
        self.counts[i] += 1;
        self.sum += secs;
    }

    /// Samples observed.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// A demoted block's bytes, copied out by the executor.
pub(crate) struct DemotedBytes {
    pub(crate) demotion: Demotion,
    pub(crate) bytes: Vec<u8>,
}

/// A restore to read: the exact key of one block.
#[derive(Clone, Debug)]
pub(crate) struct FetchKey {
    pub(crate) hash: BlockHash,
    pub(crate) parent: BlockHash,
    pub(crate) tokens: Vec<TokenId>,
    pub(crate) tier: Tier,
}

pub(crate) enum Job {
    Demote(Vec<DemotedBytes>),
    Fetch {
        id: RequestId,
        /// Tells this restore from an earlier one of the same request
        /// (preempted and admitted again).
        token: u64,
        keys: Vec<FetchKey>,
    },
    /// Demotions dropped before they reached the I/O thread (staging was
    /// full): reported as nowhere.
    Dropped(Vec<BlockHash>),
    /// Checks both stores' invariants (tests), after every job before it.
    Check(mpsc::Sender<Result<(), String>>),
}

/// What the I/O thread reports to the scheduler.
pub(crate) enum Report {
    /// Where blocks now live.
    Located(Located),
    /// A restore's payloads, in order, up to the first block that could
    /// not be served (`complete` false: the rest must be computed).
    Fetched {
        id: RequestId,
        token: u64,
        payloads: Vec<Vec<u8>>,
        complete: bool,
        /// Time per block, per tier it came from, for the policy.
        nanos: u64,
        tier: Tier,
    },
    /// The I/O thread died: no report will come again.
    Died,
}

/// Bytes of demoted blocks waiting for the I/O thread at most: past it, a
/// step's demotions are dropped (a miss later), never queued without
/// bound in the arena's RAM.
const STAGING_BYTES: u64 = 256 << 20;

/// The engine's handle on the I/O thread.
#[derive(Clone)]
pub(crate) struct TierIo {
    jobs: mpsc::Sender<Job>,
    /// Demoted bytes sent and not yet written.
    staged: Arc<std::sync::atomic::AtomicU64>,
}

impl TierIo {
    pub(crate) fn send(&self, job: Job) {
        // A dead I/O thread has told the scheduler (`Report::Died`).
        let _ = self.jobs.send(job);
    }

    /// Whether `bytes` more demoted bytes may be staged now; if so they
    /// are counted until the I/O thread has written them.
    pub(crate) fn reserve(&self, bytes: u64) -> bool {
        use std::sync::atomic::Ordering;
        let mut cur = self.staged.load(Ordering::Relaxed);
        loop {
            if cur + bytes > STAGING_BYTES {
                return false;
            }
            match self.staged.compare_exchange_weak(
                cur,
                cur + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }
}

/// Tells the scheduler when the I/O thread dies by a panic: the tiers are
/// off from then on, and restores waiting for it are misses.
struct DeathNotice<F: Fn(Report)>(Option<F>);

impl<F: Fn(Report)> Drop for DeathNotice<F> {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(f) = self.0.take()
        {
            f(Report::Died);
        }
    }
}

/// Where blocks now live (`None`: nowhere below the arena).
type Located = Vec<(BlockHash, Option<Tier>)>;

/// Starts the I/O thread; reports go to `report`.
pub(crate) fn start(
    mut stores: TierStores,
    block_bytes: usize,
    stats: Arc<Mutex<TierStats>>,
    report: impl Fn(Report) + Send + Sync + 'static,
) -> std::io::Result<(TierIo, thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Job>();
    let staged = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let unstage = staged.clone();
    publish_stats(&stores, &stats, |_| {});
    let report = Arc::new(report);
    let notice_report = report.clone();
    let handle = thread::Builder::new()
        .name("strata-tier-io".into())
        .spawn(move || {
            let _notice = DeathNotice(Some(move |r| notice_report(r)));
            let mut failures_logged = 0u64;
            let mut queue = std::collections::VecDeque::new();
            loop {
                // Restores first: a request waits for each; demotions wait
                // for no one.
                while let Ok(j) = rx.try_recv() {
                    queue.push_back(j);
                }
                let job = match queue.iter().position(|j| matches!(j, Job::Fetch { .. })) {
                    Some(i) => queue.remove(i).expect("found"),
                    None => match queue.pop_front() {
                        Some(j) => j,
                        None => match rx.recv() {
                            Ok(j) => j,
                            Err(_) => break,
                        },
                    },
                };
                let report_msg = match job {
                    Job::Demote(batch) => {
                        let t = Instant::now();
                        let bytes: u64 = batch.iter().map(|d| d.bytes.len() as u64).sum();
                        let failures_before = stores.ssd.as_ref().map_or(0, |s| s.stats().write_failures);
                        let (located, failed, full) = demote(&mut stores, batch, block_bytes);
                        unstage.fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
                        let failures = stores.ssd.as_ref().map_or(0, |s| s.stats().write_failures);
                        if failures > failures_before {
                            // The first failure, then every hundredth: the
                            // disk's trouble is in the log, not a flood.
                            if failures_logged == 0 || failures / 100 > failures_logged / 100 {
                                tracing::warn!(
                                    write_failures = failures,
                                    disk_full = full,
                                    "the SSD tier failed to write records (they are misses; the server runs on)"
                                );
                            }
                            failures_logged = failures;
                        }
                        let secs = t.elapsed().as_secs_f64();
                        let gone = located.iter().filter(|l| l.1.is_none()).count() as u64;
                        publish_stats(&stores, &stats, |s| {
                            s.bytes_down += bytes;
                            s.demotions_failed += failed;
                            s.disk_full += full;
                            s.dropped += gone;
                            s.demotion_seconds.observe(secs);
                        });
                        Report::Located(located)
                    }
                    Job::Dropped(hashes) => {
                        publish_stats(&stores, &stats, |s| s.demotions_failed += hashes.len() as u64);
                        // Wherever a store still holds it (an earlier
                        // write), it stays found.
                        Report::Located(hashes.into_iter().map(|h| (h, location(&stores, h))).collect())
                    }
                    Job::Check(reply) => {
                        let r = stores
                            .host
                            .as_ref()
                            .map_or(Ok(()), HostStore::check_invariants)
                            .and_then(|()| {
                                stores
                                    .ssd
                                    .as_ref()
                                    .map_or(Ok(()), SsdStore::check_invariants)
                            });
                        let _ = reply.send(r);
                        continue;
                    }
                    Job::Fetch { id, token, keys } => {
                        let t = Instant::now();
                        let tier = keys.first().map_or(Tier::Ssd, |k| k.tier);
                        let (payloads, located) = fetch(&mut stores, &keys, block_bytes);
                        let complete = payloads.len() == keys.len();
                        let elapsed = t.elapsed();
                        let got = payloads.len() as u64;
                        let gone = located.iter().filter(|l| l.1.is_none()).count() as u64;
                        publish_stats(&stores, &stats, |s| {
                            s.bytes_up += got * block_bytes as u64;
                            s.restored_blocks += got;
                            s.restore_misses += !complete as u64;
                            s.dropped += gone;
                            s.restore_seconds.observe(elapsed.as_secs_f64());
                        });
                        if !located.is_empty() {
                            report(Report::Located(located));
                        }
                        Report::Fetched {
                            id,
                            token,
                            payloads,
                            complete,
                            // Per block served (a restore cut short is not
                            // cheaper per block than it cost).
                            nanos: elapsed.as_nanos() as u64 / got.max(1),
                            tier,
                        }
                    }
                };
                // The scheduler may be gone (shutting down): the jobs
                // still queued are written all the same.
                report(report_msg);
            }
        })?;
    Ok((TierIo { jobs: tx, staged }, handle))
}

fn publish_stats(stores: &TierStores, stats: &Mutex<TierStats>, f: impl FnOnce(&mut TierStats)) {
    let mut s = lock(stats);
    s.host = stores.host.as_ref().map(HostStore::stats);
    s.host_capacity = stores.host.as_ref().map_or(0, HostStore::capacity);
    s.ssd = stores.ssd.as_ref().map(SsdStore::stats);
    s.ssd_capacity = stores.ssd.as_ref().map_or(0, SsdStore::capacity);
    f(&mut s);
}

/// Where `hash` is served from now.
fn location(stores: &TierStores, hash: BlockHash) -> Option<Tier> {
    if stores.host.as_ref().is_some_and(|h| h.contains(hash)) {
        Some(Tier::Host)
    } else if stores.ssd.as_ref().is_some_and(|s| s.contains(hash)) {
        Some(Tier::Ssd)
    } else {
        None
    }
}

/// Writes a batch of demoted blocks; returns where each block (and each
/// block the stores dropped meanwhile) now lives, the blocks no tier
/// took, and the SSD writes refused for space.
fn demote(
    stores: &mut TierStores,
    batch: Vec<DemotedBytes>,
    block_bytes: usize,
) -> (Located, u64, u64) {
    let demoted: Vec<BlockHash> = batch.iter().map(|d| d.demotion.hash).collect();
    let mut touched = demoted.clone();
    let mut to_ssd: Vec<HostBlock> = Vec::new();
    let mut full = 0;
    for d in batch {
        if d.bytes.len() != block_bytes {
            continue;
        }
        let Demotion {
            hash,
            parent,
            tokens,
            ..
        } = d.demotion;
        if let Some(host) = stores.host.as_mut() {
            let spilled = host.put(hash, parent, &tokens, d.bytes.clone());
            for b in spilled.unwrap_or_default() {
                touched.push(b.hash);
                to_ssd.push(b);
            }
        }
        to_ssd.push(HostBlock {
            hash,
            parent,
            tokens,
            payload: d.bytes,
        });
    }
    if let Some(ssd) = stores.ssd.as_mut() {
        // One copy of each block (the host may evict a block this batch
        // put there a moment ago), none the SSD holds.
        let mut seen = std::collections::HashSet::new();
        to_ssd.retain(|b| seen.insert(b.hash) && !ssd.contains(b.hash));
        for run in runs(to_ssd) {
            let parent = run[0].parent;
            let keys: Vec<BlockKey> = run
                .iter()
                .map(|b| BlockKey {
                    hash: b.hash,
                    tokens: b.tokens.clone(),
                })
                .collect();
            let payloads: Vec<&[u8]> = run.iter().map(|b| b.payload.as_slice()).collect();
            match ssd.put(parent, &keys, &payloads) {
                Ok(true) => {}
                Ok(false) => full += 1,
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::StorageFull {
                        full += 1;
                    }
                }
            }
        }
        touched.extend(ssd.take_dropped());
    }
    touched.sort_unstable_by_key(|h| h.bits());
    touched.dedup();
    let located: Located = touched
        .into_iter()
        .map(|h| (h, location(stores, h)))
        .collect();
    let failed = demoted
        .iter()
        .filter(|h| location(stores, **h).is_none())
        .count() as u64;
    (located, failed, full)
}

/// Splits blocks into runs of one chain each (a block whose parent is the
/// previous block's hash continues it), at most [`MAX_RUN`] long, so a
/// record holds consecutive blocks.
fn runs(blocks: Vec<HostBlock>) -> Vec<Vec<HostBlock>> {
    use std::collections::HashMap;
    // Chain order: a child follows its parent. Demotions of one eviction
    // come tail first, so order them by following parent links.
    let by_parent: HashMap<BlockHash, usize> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| (b.parent, i))
        .collect();
    let hashes: std::collections::HashSet<BlockHash> = blocks.iter().map(|b| b.hash).collect();
    let mut taken = vec![false; blocks.len()];
    let mut order: Vec<Vec<usize>> = Vec::new();
    for i in 0..blocks.len() {
        // Runs start at a block whose parent is not in the batch.
        if taken[i] || hashes.contains(&blocks[i].parent) {
            continue;
        }
        let mut run = Vec::new();
        let mut cur = Some(i);
        while let Some(c) = cur {
            if taken[c] {
                break;
            }
            taken[c] = true;
            run.push(c);
            if run.len() == MAX_RUN {
                order.push(std::mem::take(&mut run));
            }
            cur = by_parent.get(&blocks[c].hash).copied();
        }
        if !run.is_empty() {
            order.push(run);
        }
    }
    // Anything left (a cycle cannot happen with chain hashes): one each.
    for (i, t) in taken.iter().enumerate() {
        if !t {
            order.push(vec![i]);
        }
    }
    let mut slots: Vec<Option<HostBlock>> = blocks.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|run| {
            run.into_iter()
                .map(|i| slots[i].take().expect("each block is in one run"))
                .collect()
        })
        .collect()
}

/// Reads a restore's blocks in order, stopping at the first that no tier
/// serves under its exact key (or whose payload has the wrong size).
fn fetch(
    stores: &mut TierStores,
    keys: &[FetchKey],
    block_bytes: usize,
) -> (Vec<Vec<u8>>, Located) {
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(keys.len());
    let mut located = Vec::new();
    let mut i = 0;
    while i < keys.len() {
        let k = &keys[i];
        let from_host = stores
            .host
            .as_mut()
            .and_then(|h| h.get(k.hash, k.parent, &k.tokens));
        if let Some(b) = from_host {
            if b.len() != block_bytes {
                located.push((k.hash, location(stores, k.hash)));
                break;
            }
            out.push(b);
            i += 1;
            continue;
        }
        // From the SSD: the blocks up to the next one the host holds, read
        // as runs.
        let Some(ssd) = stores.ssd.as_mut() else {
            located.push((k.hash, location(stores, k.hash)));
            break;
        };
        let host = stores.host.as_ref();
        let end = (i..keys.len())
            .find(|&j| j > i && host.is_some_and(|h| h.contains(keys[j].hash)))
            .unwrap_or(keys.len());
        let run: Vec<(BlockHash, BlockHash, &[TokenId])> = keys[i..end]
            .iter()
            .map(|k| (k.hash, k.parent, k.tokens.as_slice()))
            .collect();
        if !stores.ssd_read_delay.is_zero() {
            std::thread::sleep(stores.ssd_read_delay * run.len() as u32);
        }
        let got = ssd.get_run(&run);
        for h in ssd.take_dropped() {
            located.push((h, None));
        }
        let n = got.len();
        let whole = n == run.len() && got.iter().all(|b| b.len() == block_bytes);
        out.extend(got.into_iter().take_while(|b| b.len() == block_bytes));
        if !whole {
            let at = out.len();
            located.push((keys[at].hash, location(stores, keys[at].hash)));
            break;
        }
        i = end;
    }
    for l in &mut located {
        l.1 = location(stores, l.0);
    }
    (out, located)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_store::ssd::{RealIo, SsdConfig};

    /// A batch larger than the host tier spills what the host evicts to the
    /// SSD along with the batch itself: each block is still written once,
    /// as one record of the chain (before the fix, blocks the host evicted
    /// a moment after taking them were written twice, in extra records).
    #[test]
    fn a_batch_past_the_host_tier_writes_each_block_once() {
        let dir = strata_testkit::TempDir::new("demote-once");
        let ssd = SsdStore::open(
            SsdConfig {
                dir: dir.0.clone(),
                capacity: 1 << 20,
                fingerprint: b"fp".to_vec(),
                sync: false,
            },
            std::sync::Arc::new(RealIo),
        )
        .unwrap()
        .0;
        let bb = 64;
        let mut stores = TierStores {
            // One block (payload and key) fits.
            host: Some(HostStore::new((bb + 4 * 4 + 16) as u64)),
            ssd: Some(ssd),
            write_back: true,
            write_through: true,
            min_chain: 1,
            restore_policy: false,
            ssd_read_delay: std::time::Duration::ZERO,
            ssd_probe_ns: None,
        };
        let hash = |i: u128| BlockHash::from_bits(100 + i);
        let batch = (0..3u128)
            .map(|i| DemotedBytes {
                demotion: Demotion {
                    block: strata_kv::BlockId::new(i as u32),
                    hash: hash(i),
                    parent: if i == 0 {
                        BlockHash::from_bits(1)
                    } else {
                        hash(i - 1)
                    },
                    tokens: (0..4).map(|k| TokenId::new(i as u32 * 4 + k)).collect(),
                },
                bytes: vec![i as u8; bb],
            })
            .collect();
        let (located, failed, _) = demote(&mut stores, batch, bb);
        assert_eq!(failed, 0);
        assert_eq!(located.len(), 3, "{located:?}");
        let s = stores.ssd.as_ref().unwrap().stats();
        assert_eq!(
            (s.written, s.blocks),
            (1, 3),
            "one record of the chain: {s:?}"
        );
        stores.ssd.as_ref().unwrap().check_invariants().unwrap();
    }
}
