//! The shared KV cache: the pool behind a lock, and RAII leases.
//!
//! # Concurrency choice
//!
//! The pool sits behind one mutex. The lock is held only for the pool's own
//! bookkeeping (no I/O, no blocking call, no callback), and poisoning is
//! ignored (see `sync.rs`). Dropping a [`Lease`] never takes the pool lock:
//! it pushes the holder id onto a small release queue (its own mutex, held
//! for one push), and whoever locks the pool next drains that queue first.
//! So a lease may be dropped anywhere, on any thread, even while the same
//! thread holds the pool lock, without deadlock, and its pins are returned
//! before any other operation can observe the pool.
//!
//! Until drained, a dropped lease's blocks stay pinned, which is always safe:
//! the only cost is that they are reused a moment later.
//!
//! Every operation that names a holder takes the [`Lease`], and refuses one
//! minted by another cache: a session used with the wrong model instance is
//! an error, never a silent run on someone else's KV.

use std::ops::Deref;

use crate::block_hash::{BlockHasher, ChainRoot, SequenceHasher};
use crate::block_pool::{
    BlockPool, CowCopy, Demotion, Evicted, PoolConfig, PrefixHit, RestorePlan, SlotRef, TierPolicy,
};
use crate::error::KvError;
use crate::ids::{BlockId, Epoch, Generation, HolderId, OwnerTag, TokenId};
use crate::sync::{Arc, Mutex, MutexGuard, lock};
use crate::tier_index::TierIndex;

struct Shared {
    pool: Mutex<BlockPool>,
    released: Mutex<std::collections::VecDeque<HolderId>>,
}

/// A handle on one model instance's KV cache. Clones share the cache.
#[derive(Clone)]
pub struct KvCache {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache").finish_non_exhaustive()
    }
}

/// Ownership of one holder (a sequence's table, a session, a pin). Dropping
/// it releases every block it holds, on every path: success, error, abort,
/// preemption, panic.
#[must_use = "dropping a lease releases its blocks at once"]
pub struct Lease {
    shared: Arc<Shared>,
    id: HolderId,
    armed: bool,
}

impl Lease {
    /// The holder's id (for diagnostics; operations take the lease itself).
    pub fn id(&self) -> HolderId {
        self.id
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({:?})", self.id)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.shared.released).push_back(self.id);
        }
    }
}

impl KvCache {
    /// A cache over a new pool.
    pub fn new(config: PoolConfig, hasher: BlockHasher) -> Result<Self, KvError> {
        let pool = BlockPool::new(config, hasher)?;
        Ok(Self {
            shared: Arc::new(Shared {
                pool: Mutex::new(pool),
                released: Mutex::new(std::collections::VecDeque::new()),
            }),
        })
    }

    /// Locks the pool, first returning the blocks of every dropped lease.
    pub fn lock(&self) -> PoolGuard<'_> {
        let mut pool = lock(&self.shared.pool);
        // One at a time, each taken off the queue only as it is released: a
        // release that panics (a bug) loses no other lease's pins.
        loop {
            let next = lock(&self.shared.released).pop_front();
            let Some(id) = next else { break };
            pool.release(id)
                .expect("a lease is released exactly once: a second release is a bug");
        }
        PoolGuard { cache: self, pool }
    }

    /// Shorthand for one `lookup_and_pin` under the lock.
    pub fn lookup_and_pin(
        &self,
        tag: OwnerTag,
        seq: &SequenceHasher,
    ) -> Result<(Lease, PrefixHit), KvError> {
        self.lock().lookup_and_pin(tag, seq)
    }

    fn lease(&self, id: HolderId) -> Lease {
        Lease {
            shared: self.shared.clone(),
            id,
            armed: true,
        }
    }
}

/// The locked pool. Reads go through `Deref`; mutations that name a holder
/// take its [`Lease`].
pub struct PoolGuard<'a> {
    cache: &'a KvCache,
    pool: MutexGuard<'a, BlockPool>,
}

impl Deref for PoolGuard<'_> {
    type Target = BlockPool;
    fn deref(&self) -> &BlockPool {
        &self.pool
    }
}

impl PoolGuard<'_> {
    fn own(&self, lease: &Lease) -> Result<HolderId, KvError> {
        if Arc::ptr_eq(&lease.shared, &self.cache.shared) {
            Ok(lease.id)
        } else {
            Err(KvError::ForeignLease(lease.id))
        }
    }

    /// See [`BlockPool::lookup_and_pin`]; the pins live as long as the lease.
    pub fn lookup_and_pin(
        &mut self,
        tag: OwnerTag,
        seq: &SequenceHasher,
    ) -> Result<(Lease, PrefixHit), KvError> {
        let (id, hit) = self.pool.lookup_and_pin(tag, seq)?;
        Ok((self.cache.lease(id), hit))
    }

    /// See [`BlockPool::lookup_and_pin_tiered`]; the pins, tier pins and
    /// restore targets live as long as the lease.
    pub fn lookup_and_pin_tiered(
        &mut self,
        tag: OwnerTag,
        seq: &SequenceHasher,
        max_restore: usize,
    ) -> Result<(Lease, PrefixHit, RestorePlan), KvError> {
        let (id, hit, plan) = self.pool.lookup_and_pin_tiered(tag, seq, max_restore)?;
        Ok((self.cache.lease(id), hit, plan))
    }

    /// See [`BlockPool::restore_landed`].
    pub fn restore_landed(
        &mut self,
        lease: &Lease,
        epoch: Epoch,
        n: usize,
    ) -> Result<Vec<(BlockId, Generation)>, KvError> {
        let id = self.own(lease)?;
        self.pool.restore_landed(id, epoch, n)
    }

    /// See [`BlockPool::restore_failed`].
    pub fn restore_failed(&mut self, lease: &Lease, i: usize) -> Result<(), KvError> {
        let id = self.own(lease)?;
        self.pool.restore_failed(id, i)
    }

    /// See [`BlockPool::set_tier_policy`].
    pub fn set_tier_policy(&mut self, policy: TierPolicy) {
        self.pool.set_tier_policy(policy);
    }

    /// See [`BlockPool::take_demotions`].
    pub fn take_demotions(&mut self, through_budget: usize) -> Vec<Demotion> {
        self.pool.take_demotions(through_budget)
    }

    /// The tier index, for the stores' reports.
    pub fn tiers_mut(&mut self) -> &mut TierIndex {
        self.pool.tiers_mut()
    }

    /// A lease on a new, empty holder.
    pub fn new_lease(&mut self, tag: OwnerTag, root: ChainRoot) -> Lease {
        let id = self.pool.new_holder(tag, root);
        self.cache.lease(id)
    }

    /// See [`BlockPool::fork`].
    pub fn fork(&mut self, lease: &Lease, tag: OwnerTag) -> Result<Lease, KvError> {
        let src = self.own(lease)?;
        let id = self.pool.fork(src, tag)?;
        Ok(self.cache.lease(id))
    }

    /// See [`BlockPool::allocate`].
    pub fn allocate(&mut self, lease: &Lease, n: usize) -> Result<Vec<Evicted>, KvError> {
        let id = self.own(lease)?;
        self.pool.allocate(id, n)
    }

    /// See [`BlockPool::write`].
    pub fn write(
        &mut self,
        lease: &Lease,
        epoch: Epoch,
        tokens: &[TokenId],
    ) -> Result<usize, KvError> {
        let id = self.own(lease)?;
        self.pool.write(id, epoch, tokens)
    }

    /// See [`BlockPool::write_pending`].
    pub fn write_pending(&mut self, lease: &Lease, epoch: Epoch) -> Result<SlotRef, KvError> {
        let id = self.own(lease)?;
        self.pool.write_pending(id, epoch)
    }

    /// See [`BlockPool::touch`].
    pub fn touch(&mut self, lease: &Lease, epoch: Epoch) -> Result<(), KvError> {
        let id = self.own(lease)?;
        self.pool.touch(id, epoch)
    }

    /// See [`BlockPool::copy_on_write`].
    pub fn copy_on_write(
        &mut self,
        lease: &Lease,
        epoch: Epoch,
    ) -> Result<Option<CowCopy>, KvError> {
        let id = self.own(lease)?;
        self.pool.copy_on_write(id, epoch)
    }

    /// Releases the lease's blocks now, under this lock.
    pub fn release(&mut self, mut lease: Lease) -> Result<(), KvError> {
        let id = self.own(&lease)?;
        lease.armed = false;
        self.pool.release(id)
    }

    /// See [`BlockPool::truncate`].
    pub fn truncate(&mut self, lease: &Lease, tokens: usize) -> Result<usize, KvError> {
        let id = self.own(lease)?;
        self.pool.truncate(id, tokens)
    }

    /// See [`BlockPool::resolve`].
    pub fn resolve(&mut self, slot: SlotRef, token: TokenId) -> Result<(), KvError> {
        self.pool.resolve(slot, token)
    }

    /// See [`BlockPool::next_epoch`].
    pub fn next_epoch(&mut self) -> Epoch {
        self.pool.next_epoch()
    }

    /// See [`BlockPool::complete`].
    pub fn complete(&mut self, epoch: Epoch) -> Result<(), KvError> {
        self.pool.complete(epoch)
    }

    /// See [`BlockPool::fail`].
    pub fn fail(&mut self, epoch: Epoch) -> Result<(), KvError> {
        self.pool.fail(epoch)
    }

    /// See [`BlockPool::evict_cached`].
    pub fn evict_cached(&mut self, limit: usize) -> Vec<Evicted> {
        self.pool.evict_cached(limit)
    }
}

/// A cache of `num_blocks` 2-token blocks, its hasher and a chain root,
/// for the tests below.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
fn test_cache(num_blocks: u32) -> (KvCache, BlockHasher, ChainRoot) {
    use crate::{ExtraKeys, HashKey};
    let hasher = BlockHasher::new(&HashKey::from_bytes([3; 32]), 2);
    let root = hasher.root(ExtraKeys {
        model_fingerprint: b"m",
        cache_salt: None,
    });
    let cache = KvCache::new(
        PoolConfig {
            num_blocks,
            block_size: 2,
        },
        hasher.clone(),
    )
    .unwrap();
    (cache, hasher, root)
}

#[cfg(all(test, not(shuttle)))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// One bad entry in the release queue (a holder released twice: a bug
    /// elsewhere) panics the drain; the leases dropped after it must still
    /// come back at the next lock, not be lost with the panic.
    #[test]
    fn a_panicking_release_does_not_lose_the_rest_of_the_queue() {
        let (cache, _, root) = test_cache(4);
        let (bad, good) = {
            let mut pool = cache.lock();
            let bad = pool.new_lease(OwnerTag(1), root);
            let good = pool.new_lease(OwnerTag(2), root);
            pool.allocate(&good, 2).unwrap();
            // Release `bad`'s holder behind its lease's back.
            pool.pool.release(bad.id()).unwrap();
            (bad, good)
        };
        drop(bad); // queued first: its release will panic
        drop(good); // queued second
        let c = cache.clone();
        let r = std::thread::spawn(move || drop(c.lock())).join();
        assert!(r.is_err(), "the double release is reported");
        let pool = cache.lock();
        assert_eq!(pool.free_blocks(), 4, "the good lease's blocks were lost");
        pool.check_invariants().unwrap();
        assert!(pool.is_whole());
    }
}

/// Randomized-schedule tests of the paths where threads meet: completions
/// from the executor, lease drops from request handlers, the scheduler's
/// lookups and allocations. Run with
/// `RUSTFLAGS="--cfg shuttle" cargo test -p strata-kv --lib shuttle`.
#[cfg(all(test, shuttle))]
#[allow(clippy::unwrap_used)]
mod shuttle_tests {
    use shuttle::sync::atomic::{AtomicBool, Ordering};
    use shuttle::thread;

    use super::*;
    use crate::{Access, BlockId};

    const ITERATIONS: usize = 2000;

    fn setup(num_blocks: u32) -> (KvCache, BlockHasher, ChainRoot) {
        super::test_cache(num_blocks)
    }

    fn toks(n: u32) -> Vec<TokenId> {
        (0..n).map(TokenId::new).collect()
    }

    /// Publishes a 2-block prefix of `toks(5)` and returns its blocks.
    fn publish_prefix(cache: &KvCache, hasher: &BlockHasher, root: ChainRoot) -> Vec<BlockId> {
        let mut seq = hasher.sequence(root);
        seq.extend(&toks(5));
        let mut pool = cache.lock();
        let (lease, _) = pool.lookup_and_pin(OwnerTag(0), &seq).unwrap();
        pool.allocate(&lease, 3).unwrap();
        let e = pool.next_epoch();
        pool.write(&lease, e, &toks(5)).unwrap();
        pool.complete(e).unwrap();
        let blocks = pool.table(lease.id()).unwrap()[..2].to_vec();
        pool.release(lease).unwrap();
        blocks
    }

    fn assert_whole(cache: &KvCache) {
        let mut pool = cache.lock();
        let issued = pool.stats().issued;
        if pool.stats().completed < issued {
            pool.complete(issued).unwrap();
        }
        pool.check_invariants().unwrap();
        assert!(pool.is_whole(), "not whole: {:?}", pool.stats());
    }

    fn scenario_completion_races_allocation() {
        let (cache, _, root) = setup(4);
        let (a_blocks, a_gens, e1) = {
            let mut pool = cache.lock();
            let a = pool.new_lease(OwnerTag(1), root);
            pool.allocate(&a, 2).unwrap();
            let e1 = pool.next_epoch();
            pool.write(&a, e1, &toks(4)).unwrap();
            let blocks = pool.table(a.id()).unwrap().to_vec();
            let gens: Vec<_> = blocks.iter().map(|&b| pool.generation(b)).collect();
            pool.release(a).unwrap(); // finished while e1 runs
            (blocks, gens, e1)
        };
        let executor = {
            let cache = cache.clone();
            let a_blocks = a_blocks.clone();
            thread::spawn(move || {
                let accesses: Vec<_> = a_blocks
                    .iter()
                    .zip(&a_gens)
                    .map(|(&b, &g)| (b, g, Access::Write))
                    .collect();
                let mut pool = cache.lock();
                pool.validate(e1, &accesses)
                    .expect("a running step's blocks were taken");
                pool.complete(e1).unwrap();
            })
        };
        let scheduler = {
            let cache = cache.clone();
            thread::spawn(move || {
                let mut pool = cache.lock();
                let b = pool.new_lease(OwnerTag(2), root);
                for _ in 0..4 {
                    if pool.allocate(&b, 1).is_err() {
                        break;
                    }
                    let got = *pool.table(b.id()).unwrap().last().unwrap();
                    if a_blocks.contains(&got) {
                        assert!(
                            pool.stats().completed >= e1,
                            "{got:?} reused before e1 completed"
                        );
                    }
                    drop(pool);
                    thread::yield_now();
                    pool = cache.lock();
                }
                drop(b);
            })
        };
        executor.join().unwrap();
        scheduler.join().unwrap();
        assert_whole(&cache);
    }

    fn scenario_lease_dropped_on_another_thread() {
        let (cache, hasher, root) = setup(5);
        let prefix = publish_prefix(&cache, &hasher, root);
        let dropped = std::sync::Arc::new(AtomicBool::new(false));
        let mut seq = hasher.sequence(root);
        seq.extend(&toks(5));
        let (lease, hit) = cache.lookup_and_pin(OwnerTag(1), &seq).unwrap();
        assert_eq!(hit.blocks, 2);
        let handler = {
            let dropped = dropped.clone();
            thread::spawn(move || {
                thread::yield_now();
                dropped.store(true, Ordering::SeqCst);
                drop(lease); // the client disconnects before allocation
            })
        };
        let scheduler = {
            let cache = cache.clone();
            let dropped = dropped.clone();
            thread::spawn(move || {
                let b = cache.lock().new_lease(OwnerTag(2), root);
                for _ in 0..5 {
                    let mut pool = cache.lock();
                    if pool.allocate(&b, 1).is_ok() {
                        let got = *pool.table(b.id()).unwrap().last().unwrap();
                        if prefix.contains(&got) {
                            assert!(
                                dropped.load(Ordering::SeqCst),
                                "{got:?} evicted under a live pin"
                            );
                        }
                    }
                    drop(pool);
                    thread::yield_now();
                }
            })
        };
        handler.join().unwrap();
        scheduler.join().unwrap();
        assert_whole(&cache);
    }

    fn scenario_hit_races_eviction() {
        let (cache, hasher, root) = setup(4);
        let prefix = publish_prefix(&cache, &hasher, root);
        let requester = {
            let cache = cache.clone();
            thread::spawn(move || {
                let mut seq = hasher.sequence(root);
                seq.extend(&toks(5));
                let (lease, hit) = cache.lookup_and_pin(OwnerTag(1), &seq).unwrap();
                let pinned = {
                    let pool = cache.lock();
                    let t = pool.table(lease.id()).unwrap().to_vec();
                    t.iter()
                        .map(|&b| (b, pool.generation(b)))
                        .collect::<Vec<_>>()
                };
                assert!(hit.blocks == 0 || pinned.iter().map(|p| p.0).eq(prefix.iter().copied()));
                thread::yield_now();
                let pool = cache.lock();
                for &(b, g) in &pinned {
                    assert_eq!(pool.generation(b), g, "{b:?} was reallocated while pinned");
                }
                drop(pool);
                drop(lease);
            })
        };
        let evictor = {
            let cache = cache.clone();
            thread::spawn(move || {
                let mut pool = cache.lock();
                let b = pool.new_lease(OwnerTag(2), root);
                let free = pool.free_blocks();
                pool.allocate(&b, free).unwrap();
                drop(pool);
                thread::yield_now();
                drop(b);
            })
        };
        requester.join().unwrap();
        evictor.join().unwrap();
        assert_whole(&cache);
    }

    #[test]
    fn shuttle_completion_races_allocation() {
        shuttle::check_random(scenario_completion_races_allocation, ITERATIONS);
        shuttle::check_pct(scenario_completion_races_allocation, ITERATIONS, 3);
    }

    #[test]
    fn shuttle_lease_dropped_on_another_thread_between_lookup_and_allocation() {
        shuttle::check_random(scenario_lease_dropped_on_another_thread, ITERATIONS);
        shuttle::check_pct(scenario_lease_dropped_on_another_thread, ITERATIONS, 3);
    }

    #[test]
    fn shuttle_hit_races_eviction() {
        shuttle::check_random(scenario_hit_races_eviction, ITERATIONS);
        shuttle::check_pct(scenario_hit_races_eviction, ITERATIONS, 3);
    }
}
