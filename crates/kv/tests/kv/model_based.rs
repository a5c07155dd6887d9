//! Property test of the block pool over whole histories.
//!
//! Random operations (the engine's: lookups, allocations, writes, pending
//! writes and their resolution, touches, steps completing or failing,
//! releases, forks, copies on write, truncations, cache trims) run against
//! the pool. The test does not re-implement the pool: it records only what
//! happened, as facts the caller knows (which holder was given which blocks,
//! which step wrote which slot with which token, which steps completed or
//! failed), and after every operation checks properties stated on that
//! record:
//!
//! - **Safety.** A block is reallocated only after every step that accessed
//!   it finished; a free block has no holder and no step in flight that used
//!   it.
//! - **Clean chains.** The index holds only blocks whose whole chain was
//!   written by steps that completed (none failed, none still running), each
//!   under a parent that is itself in the index.
//! - **Exact outcomes.** A lookup hits exactly the longest chain of indexed
//!   blocks matching the prompt (capped so the last token is computed); a
//!   block whose good KV is complete is in the index unless another block
//!   holds its hash or its parent is not indexed; a hash leaves the index
//!   only when a trim or an allocation reports it; a release and a
//!   completion give back exactly the blocks their queries promised;
//!   truncation keeps exactly the good prefix; errors are exactly those the
//!   documented rules give.
//! - **LRU order.** Allocation takes empty blocks before cached ones and the
//!   earliest-freed cached block first; of a cached parent and its cached
//!   child, both free, the child goes first (a prefix outlives its
//!   extensions).
//!
//! `scripts/plant-bugs.sh` plants bugs in the pool to show these bite.

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use strata_kv::{
    BlockHash, BlockHasher, BlockId, BlockPool, BlockState, ChainRoot, Epoch, HolderId, KvError,
    OwnerTag, PoolConfig, SlotRef, TokenId,
};

#[derive(Clone, Debug)]
enum Op {
    Lookup {
        family: u8,
        len: u8,
        salted: bool,
    },
    Allocate {
        h: u8,
        n: u8,
    },
    Write {
        h: u8,
        n: u8,
    },
    WritePending {
        h: u8,
    },
    Resolve {
        k: u8,
    },
    Touch {
        h: u8,
    },
    NextEpoch,
    Complete {
        skip: u8,
    },
    Fail {
        skip: u8,
    },
    Release {
        h: u8,
    },
    Fork {
        h: u8,
    },
    CopyOnWrite {
        h: u8,
    },
    Truncate {
        h: u8,
        to: u8,
    },
    EvictCached {
        limit: u8,
    },
    /// The realistic admission path: lookup, allocate the rest, write the
    /// prompt in the newest step (issuing one if none is in flight).
    Prefill {
        family: u8,
        len: u8,
        salted: bool,
    },
    /// One decode row: a block if needed, then a pending slot.
    Decode {
        h: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..4u8, 0..14u8, any::<bool>()).prop_map(|(family, len, salted)| Op::Lookup { family, len, salted }),
        3 => (any::<u8>(), 0..4u8).prop_map(|(h, n)| Op::Allocate { h, n }),
        4 => (any::<u8>(), 1..7u8).prop_map(|(h, n)| Op::Write { h, n }),
        2 => any::<u8>().prop_map(|h| Op::WritePending { h }),
        3 => any::<u8>().prop_map(|k| Op::Resolve { k }),
        2 => any::<u8>().prop_map(|h| Op::Touch { h }),
        3 => Just(Op::NextEpoch),
        3 => (0..2u8).prop_map(|skip| Op::Complete { skip }),
        1 => (0..2u8).prop_map(|skip| Op::Fail { skip }),
        3 => any::<u8>().prop_map(|h| Op::Release { h }),
        1 => any::<u8>().prop_map(|h| Op::Fork { h }),
        1 => any::<u8>().prop_map(|h| Op::CopyOnWrite { h }),
        1 => (any::<u8>(), 0..14u8).prop_map(|(h, to)| Op::Truncate { h, to }),
        1 => (0..3u8).prop_map(|limit| Op::EvictCached { limit }),
        4 => (0..4u8, 1..14u8, any::<bool>()).prop_map(|(family, len, salted)| Op::Prefill { family, len, salted }),
        4 => any::<u8>().prop_map(|h| Op::Decode { h }),
    ]
}

/// The token at position `i` of a family's stream. Families share prefixes
/// of different lengths, so hits, partial hits and duplicates all happen.
fn token(family: u8, i: usize) -> TokenId {
    let k = family as usize;
    TokenId::new(if i < 3 * k {
        (i % 5) as u32
    } else {
        ((i * 7 + k) % 5 + 10 * k) as u32
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StepFate {
    InFlight,
    Completed,
    Failed,
}

/// One written slot: its token (once known) and the steps whose success its
/// KV depends on (the step that wrote it; for a copy, also the source's).
#[derive(Clone, Debug)]
struct Slot {
    token: Option<u32>,
    deps: Vec<u64>,
}

/// What became of a block once its good KV was complete.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Settled {
    Cached,
    Duplicate,
    Orphan,
}

/// The record of one block at its current generation.
#[derive(Clone, Debug)]
struct Rec {
    generation: u32,
    slots: Vec<Slot>,
    /// The block before it in the table it was allocated into.
    parent: Option<(usize, u32)>,
    root: usize,
    /// The latest step that accessed this generation (read or wrote it).
    accessed: u64,
    /// The latest step of any holder that held it, at the time it let go
    /// (the pool's documented window).
    window: u64,
    /// The operation at which it last became free.
    free_since: usize,
    settled: Option<Settled>,
    /// A trim reported it (its hash left the index).
    evicted: bool,
}

impl Rec {
    fn new(generation: u32, parent: Option<(usize, u32)>, root: usize) -> Self {
        Self {
            generation,
            slots: Vec::new(),
            parent,
            root,
            accessed: 0,
            window: 0,
            free_since: 0,
            settled: None,
            evicted: false,
        }
    }
}

struct THolder {
    id: HolderId,
    root: usize,
    family: u8,
    table: Vec<usize>,
    tokens: usize,
    /// The latest step that read or wrote through it.
    last: u64,
}

/// A pending slot: the pool's reference, (block, generation, slot), the
/// token the step will have sampled, the step.
type PendingSlot = (SlotRef, (usize, u32, usize), TokenId, u64);

struct Harness {
    pool: BlockPool,
    hasher: BlockHasher,
    roots: [ChainRoot; 2],
    bs: usize,
    recs: Vec<Rec>,
    holders: Vec<THolder>,
    /// `steps[e]` for each issued epoch `e` (index 0 unused).
    steps: Vec<StepFate>,
    completed: u64,
    pending: Vec<PendingSlot>,
    ops: usize,
    states: Vec<BlockState>,
    /// How often each interesting outcome happened, to show the generator
    /// reaches them all.
    coverage: HashMap<&'static str, u32>,
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    OutOfBlocks(usize, usize),
    Err(&'static str),
}

fn kind(e: &KvError) -> Outcome {
    match e {
        KvError::OutOfBlocks { needed, free } => Outcome::OutOfBlocks(*needed, *free),
        KvError::EpochNotInFlight { .. } => Outcome::Err("epoch"),
        KvError::WriteRule { .. } => Outcome::Err("write rule"),
        KvError::NoRoom { .. } => Outcome::Err("no room"),
        KvError::PendingTokens(_) => Outcome::Err("pending"),
        KvError::HolderInFlight { .. } => Outcome::Err("in flight"),
        other => panic!("unexpected error from the pool: {other}"),
    }
}

impl Harness {
    fn new(n: u32, bs: u32) -> Self {
        let hasher = strata_testkit::hasher(bs as usize);
        let roots = [
            strata_testkit::root(&hasher, None),
            strata_testkit::root(&hasher, Some(b"salt")),
        ];
        let pool = BlockPool::new(
            PoolConfig {
                num_blocks: n,
                block_size: bs,
            },
            hasher.clone(),
        )
        .unwrap();
        Self {
            pool,
            hasher,
            roots,
            bs: bs as usize,
            recs: (0..n).map(|_| Rec::new(0, None, 0)).collect(),
            holders: Vec::new(),
            steps: vec![StepFate::Completed],
            completed: 0,
            pending: Vec::new(),
            ops: 0,
            states: vec![BlockState::Free; n as usize],
            coverage: HashMap::new(),
        }
    }

    fn seen(&mut self, what: &'static str) {
        *self.coverage.entry(what).or_default() += 1;
    }

    fn issued(&self) -> u64 {
        self.steps.len() as u64 - 1
    }

    fn in_flight(&self, e: u64) -> bool {
        e > self.completed && e <= self.issued()
    }

    fn pick(&self, h: u8) -> Option<usize> {
        (!self.holders.is_empty()).then(|| h as usize % self.holders.len())
    }

    fn holders_of(&self, b: usize) -> usize {
        self.holders.iter().filter(|h| h.table.contains(&b)).count()
    }

    // ----- facts derived from the record -----

    fn full_known(&self, b: usize) -> bool {
        let r = &self.recs[b];
        r.slots.len() == self.bs && r.slots.iter().all(|s| s.token.is_some())
    }

    /// The parent, if still at the recorded generation.
    fn parent_of(&self, b: usize) -> Result<Option<usize>, ()> {
        match self.recs[b].parent {
            None => Ok(None),
            Some((p, g)) if self.recs[p].generation == g => Ok(Some(p)),
            Some(_) => Err(()),
        }
    }

    /// The chain's tokens from its root through `b`, if every block of it is
    /// full with known tokens (what the block's hash covers).
    fn chain_tokens(&self, b: usize) -> Option<(usize, Vec<TokenId>)> {
        let mut chain = vec![b];
        let mut cur = b;
        while let Some(p) = self.parent_of(cur).ok()? {
            chain.push(p);
            cur = p;
        }
        let mut toks = Vec::new();
        for &x in chain.iter().rev() {
            if !self.full_known(x) {
                return None;
            }
            toks.extend(
                self.recs[x]
                    .slots
                    .iter()
                    .map(|s| TokenId::new(s.token.unwrap())),
            );
        }
        Some((self.recs[cur].root, toks))
    }

    fn expected_hash(&self, b: usize) -> Option<BlockHash> {
        let (root, toks) = self.chain_tokens(b)?;
        self.hasher
            .prefix_hashes(self.roots[root], &toks)
            .last()
            .copied()
    }

    fn is_cached(&self, b: usize) -> bool {
        self.expected_hash(b)
            .is_some_and(|h| self.pool.cached(h) == Some(BlockId::new(b as u32)))
    }

    /// A step it depends on failed (or, up the chain, its parent's did).
    fn bad(&self, b: usize) -> bool {
        let failed = self.recs[b].slots.iter().any(|s| {
            s.deps
                .iter()
                .any(|&e| self.steps[e as usize] == StepFate::Failed)
        });
        failed
            || match self.parent_of(b) {
                Ok(Some(p)) => self.bad(p),
                Ok(None) => false,
                Err(()) => true,
            }
    }

    /// Every step its chain depends on completed, and none failed: its KV
    /// is good and may be shared.
    fn good(&self, b: usize) -> bool {
        let done = self.recs[b].slots.iter().all(|s| {
            s.deps
                .iter()
                .all(|&e| self.steps[e as usize] == StepFate::Completed)
        });
        done && self.full_known(b)
            && match self.parent_of(b) {
                Ok(Some(p)) => self.good(p),
                Ok(None) => true,
                Err(()) => false,
            }
    }

    fn first_failed_dep_block(&self, table: &[usize]) -> Option<usize> {
        table.iter().position(|&b| {
            self.recs[b].slots.iter().any(|s| {
                s.deps
                    .iter()
                    .any(|&e| self.steps[e as usize] == StepFate::Failed)
            })
        })
    }

    /// Records that step `e` reads or writes through holder `i`.
    fn access(&mut self, i: usize, e: u64) {
        self.holders[i].last = self.holders[i].last.max(e);
        for k in 0..self.holders[i].table.len() {
            let b = self.holders[i].table[k];
            self.recs[b].accessed = self.recs[b].accessed.max(e);
        }
    }

    /// Holder `i` lets go of `blocks` with its last step `last`.
    fn let_go(&mut self, blocks: &[usize], last: u64) {
        for &b in blocks {
            let r = &mut self.recs[b];
            r.window = r.window.max(last).max(r.accessed);
        }
    }

    /// Blocks just taken from the free queue (allocation, copy on write):
    /// they were free, nothing in flight may still touch them, and they
    /// start a new record.
    fn taken(&mut self, b: usize, parent: Option<(usize, u32)>, root: usize) {
        assert_eq!(
            self.states[b],
            BlockState::Free,
            "b{b} was not free before it was allocated"
        );
        assert!(
            self.recs[b].accessed <= self.completed,
            "b{b} reallocated while step e{} may still touch it (completed e{})",
            self.recs[b].accessed,
            self.completed
        );
        let generation = self.pool.generation(BlockId::new(b as u32)).get();
        assert!(
            generation > self.recs[b].generation,
            "b{b} reused at its old generation"
        );
        self.recs[b] = Rec::new(generation, parent, root);
    }

    // ----- operations -----

    fn step(&mut self, op: &Op) {
        self.ops += 1;
        match *op {
            Op::Prefill {
                family,
                len,
                salted,
            } => return self.prefill(family, len, salted),
            Op::Decode { h } => return self.decode(h),
            Op::Lookup {
                family,
                len,
                salted,
            } => self.lookup(family, len, salted),
            Op::Allocate { h, n } => {
                let Some(i) = self.pick(h) else { return };
                self.allocate(i, n as usize);
            }
            Op::Write { h, n } => {
                let Some(i) = self.pick(h) else { return };
                self.write(i, n as usize, false);
            }
            Op::WritePending { h } => {
                let Some(i) = self.pick(h) else { return };
                self.write(i, 1, true);
            }
            Op::Resolve { k } => self.resolve(k),
            Op::Touch { h } => {
                let Some(i) = self.pick(h) else { return };
                let e = self.issued();
                let r = self.pool.touch(self.holders[i].id, Epoch::new(e));
                assert_eq!(r.is_ok(), self.in_flight(e), "touch e{e}: {r:?}");
                if r.is_ok() {
                    self.access(i, e);
                }
            }
            Op::NextEpoch => {
                let e = self.pool.next_epoch();
                self.steps.push(StepFate::InFlight);
                assert_eq!(e.get(), self.issued());
            }
            Op::Complete { skip } => self.retire(skip, false),
            Op::Fail { skip } => self.retire(skip, true),
            Op::Release { h } => {
                let Some(i) = self.pick(h) else { return };
                self.release(i);
            }
            Op::Fork { h } => {
                let Some(i) = self.pick(h) else { return };
                let id = self.pool.fork(self.holders[i].id, OwnerTag(2)).unwrap();
                let src = &self.holders[i];
                let used = src.tokens.div_ceil(self.bs);
                let copy = THolder {
                    id,
                    root: src.root,
                    family: src.family,
                    table: src.table[..used].to_vec(),
                    tokens: src.tokens,
                    last: src.last,
                };
                self.holders.push(copy);
            }
            Op::CopyOnWrite { h } => {
                let Some(i) = self.pick(h) else { return };
                self.copy_on_write(i);
            }
            Op::Truncate { h, to } => {
                let Some(i) = self.pick(h) else { return };
                self.truncate(i, to as usize);
            }
            Op::EvictCached { limit } => self.evict_cached(limit as usize),
        }
        self.check();
    }

    fn lookup(&mut self, family: u8, len: u8, salted: bool) {
        let root = salted as usize;
        let toks: Vec<TokenId> = (0..len as usize).map(|i| token(family, i)).collect();
        let bs = self.bs;
        let cap = toks.len().saturating_sub(1) / bs;
        let hashes = self.hasher.prefix_hashes(self.roots[root], &toks);
        // The longest chain of indexed blocks matching the prompt.
        let mut expected: Vec<usize> = Vec::new();
        for (i, &hash) in hashes.iter().enumerate().take(cap) {
            let prev = expected.last().map(|&p| (p, self.recs[p].generation));
            let next = (0..self.recs.len()).find(|&b| {
                self.is_cached(b)
                    && self.recs[b].parent == prev
                    && self.expected_hash(b) == Some(hash)
                    && self.recs[b]
                        .slots
                        .iter()
                        .zip(&toks[i * bs..(i + 1) * bs])
                        .all(|(s, t)| s.token == Some(t.get()))
            });
            match next {
                Some(b) => expected.push(b),
                None => break,
            }
        }
        let mut seq = self.pool.hasher().sequence(self.roots[root]);
        seq.extend(&toks);
        let (id, hit) = self.pool.lookup_and_pin(OwnerTag(1), &seq).unwrap();
        let table: Vec<usize> = self
            .pool
            .table(id)
            .unwrap()
            .iter()
            .map(|b| b.index())
            .collect();
        assert_eq!(table, expected, "the hit is the longest indexed chain");
        assert_eq!((hit.blocks, hit.tokens), (table.len(), table.len() * bs));
        for &b in &table {
            assert!(
                self.good(b),
                "hit b{b} holds KV no completed step wrote cleanly"
            );
        }
        if let Some(p) = hit.pending {
            // Some block with exactly this chain is being filled right now.
            let k = table.len();
            assert_eq!(Some(&p), hashes.get(k), "pending names the next block");
            let filling = (0..self.recs.len()).any(|b| {
                self.expected_hash(b) == Some(p)
                    && !self.bad(b)
                    && self.recs[b].slots.iter().any(|s| {
                        s.deps
                            .iter()
                            .any(|&e| self.steps[e as usize] == StepFate::InFlight)
                    })
            });
            assert!(
                filling,
                "pending {p:?}, but no block is being filled with it"
            );
            self.seen("pending");
        }
        if !table.is_empty() {
            self.seen("hit");
        }
        self.holders.push(THolder {
            id,
            root,
            family,
            tokens: hit.tokens,
            table,
            last: 0,
        });
    }

    fn allocate(&mut self, i: usize, n: usize) {
        let free: Vec<usize> = self.pool.free_queue().iter().map(|b| b.index()).collect();
        let cached_free: Vec<usize> = free
            .iter()
            .copied()
            .filter(|&b| self.is_cached(b))
            .collect();
        let empty_free = free.len() - cached_free.len();
        let r = self.pool.allocate(self.holders[i].id, n);
        let evicted = match r {
            Err(e) => {
                assert_eq!(kind(&e), Outcome::OutOfBlocks(n, free.len()));
                assert!(n > free.len(), "refused {n} with {} free", free.len());
                self.seen("out of blocks");
                return;
            }
            Ok(ev) => ev,
        };
        assert!(n <= free.len());
        let table: Vec<usize> = self
            .pool
            .table(self.holders[i].id)
            .unwrap()
            .iter()
            .map(|b| b.index())
            .collect();
        let old = self.holders[i].table.len();
        assert_eq!(
            &table[..old],
            &self.holders[i].table[..],
            "the table kept its head"
        );
        assert_eq!(table.len(), old + n);
        // Empty blocks first; then the earliest-freed cached ones.
        let evicted: Vec<usize> = evicted.iter().map(|e| e.block.index()).collect();
        assert_eq!(
            evicted.len(),
            n.saturating_sub(empty_free),
            "empty blocks go first"
        );
        for &e in &evicted {
            assert!(
                cached_free.contains(&e),
                "b{e} reported evicted but was not cached"
            );
            assert!(table[old..].contains(&e));
            for &c in &cached_free {
                if !evicted.contains(&c) {
                    assert!(
                        self.recs[e].free_since <= self.recs[c].free_since,
                        "evicted b{e} (free since op {}) before b{c} (free since op {})",
                        self.recs[e].free_since,
                        self.recs[c].free_since
                    );
                }
            }
        }
        if !evicted.is_empty() {
            self.seen("evicted");
        }
        for k in old..table.len() {
            let b = table[k];
            let parent = (k > 0).then(|| {
                let p = table[k - 1];
                // The block just before may itself be new in this call.
                (p, self.pool.generation(BlockId::new(p as u32)).get())
            });
            let root = self.holders[i].root;
            self.taken(b, parent, root);
            self.holders[i].table.push(b);
        }
    }

    fn write(&mut self, i: usize, n: usize, pending: bool) {
        let e = self.issued();
        let bs = self.bs;
        let h = &self.holders[i];
        let start = h.tokens;
        let toks: Vec<TokenId> = (start..start + n).map(|p| token(h.family, p)).collect();
        let room = h.table.len() * bs - start;
        let targets: Vec<usize> = if n <= room {
            h.table[start / bs..(start + n).div_ceil(bs)].to_vec()
        } else {
            Vec::new()
        };
        let id = h.id;
        let r = if pending {
            self.pool.write_pending(id, Epoch::new(e)).map(Some)
        } else {
            self.pool.write(id, Epoch::new(e), &toks).map(|_| None)
        };
        let slot = match r {
            Err(err) => {
                let k = kind(&err);
                if !self.in_flight(e) {
                    assert_eq!(k, Outcome::Err("epoch"));
                } else if n > room {
                    assert_eq!(k, Outcome::Err("no room"));
                } else {
                    assert_eq!(k, Outcome::Err("write rule"), "{err}");
                    let refusable = targets.iter().any(|&b| {
                        self.holders_of(b) > 1
                            || self.recs[b].slots.len() == bs
                            || self.bad(b)
                            || self.is_cached(b)
                    });
                    assert!(
                        refusable,
                        "write rule refused {targets:?} with no reason: {err}"
                    );
                }
                self.seen(match k {
                    Outcome::Err(s) => s,
                    _ => "other",
                });
                return;
            }
            Ok(slot) => slot,
        };
        assert!(self.in_flight(e) && n <= room);
        for &b in &targets {
            assert!(
                self.holders_of(b) == 1
                    && self.recs[b].slots.len() < bs
                    && self.first_failed_dep_block(&[b]).is_none(),
                "wrote into b{b}: shared, full or written by a failed step"
            );
        }
        for (k, t) in toks.iter().enumerate() {
            let pos = start + k;
            let b = self.holders[i].table[pos / bs];
            assert_eq!(self.recs[b].slots.len(), pos % bs);
            self.recs[b].slots.push(Slot {
                token: (!pending).then_some(t.get()),
                deps: vec![e],
            });
        }
        if let Some(slot) = slot {
            let b = self.holders[i].table[start / bs];
            assert_eq!(slot.block.index(), b);
            self.pending
                .push((slot, (b, self.recs[b].generation, start % bs), toks[0], e));
        }
        self.holders[i].tokens = start + n;
        self.access(i, e);
    }

    fn resolve(&mut self, k: u8) {
        // The executor resolves a pending slot when its step starts: while
        // that step is in flight.
        let live: Vec<usize> = (0..self.pending.len())
            .filter(|&j| self.in_flight(self.pending[j].3))
            .collect();
        if live.is_empty() {
            return;
        }
        let j = live[k as usize % live.len()];
        let (slot, (b, g, s), t, _) = self.pending.remove(j);
        let r = self.pool.resolve(slot, t);
        let stale = self.recs[b].generation != g;
        assert_eq!(r.is_err(), stale, "resolve of {slot:?}: {r:?}");
        if !stale {
            self.recs[b].slots[s].token = Some(t.get());
        }
    }

    fn retire(&mut self, skip: u8, fail: bool) {
        let e = self.completed + 1 + skip as u64;
        let quarantined = self.pool.stats().quarantined;
        let returning = (e <= self.issued()).then(|| self.pool.returning_by(Epoch::new(e)));
        // What comes back: the blocks no one holds whose last holder's
        // steps end by `e` (and after the last completed one).
        let expected = (0..self.recs.len())
            .filter(|&b| self.holders_of(b) == 0)
            .filter(|&b| {
                let w = self.recs[b].window.max(self.recs[b].accessed);
                w > self.completed && w <= e
            })
            .count();
        if let Some(r) = returning {
            assert_eq!(r, expected, "returning_by(e{e})");
        }
        let r = if fail {
            self.pool.fail(Epoch::new(e))
        } else {
            self.pool.complete(Epoch::new(e))
        };
        assert_eq!(r.is_ok(), self.in_flight(e), "retire e{e}: {r:?}");
        if r.is_err() {
            self.seen("epoch");
            return;
        }
        for x in self.completed + 1..e {
            self.steps[x as usize] = StepFate::Completed;
        }
        self.steps[e as usize] = if fail {
            StepFate::Failed
        } else {
            StepFate::Completed
        };
        self.completed = e;
        assert_eq!(
            quarantined - self.pool.stats().quarantined,
            returning.unwrap(),
            "returning_by promised what completing e{e} gives back"
        );
    }

    fn release(&mut self, i: usize) {
        let y = self.pool.release_yield(self.holders[i].id).unwrap();
        // What it gives back: the blocks only it holds, at once if no step
        // in flight may touch them, else when that step completes.
        let h = &self.holders[i];
        let (mut now, mut later) = (0, 0);
        for &b in &h.table {
            if self.holders_of(b) == 1 {
                let w = self.recs[b].window.max(self.recs[b].accessed).max(h.last);
                if w <= self.completed {
                    now += 1;
                } else {
                    later += 1;
                }
            }
        }
        assert_eq!((y.now, y.later), (now, later), "release_yield");
        let s = self.pool.stats();
        let h = self.holders.swap_remove(i);
        self.pool.release(h.id).unwrap();
        assert_eq!(self.pool.release(h.id), Err(KvError::UnknownHolder(h.id)));
        let t = self.pool.stats();
        assert_eq!(
            (t.free - s.free, t.quarantined - s.quarantined),
            (y.now, y.later),
            "release_yield promised {y:?}"
        );
        self.let_go(&h.table, h.last);
    }

    fn copy_on_write(&mut self, i: usize) {
        let e = self.issued();
        let bs = self.bs;
        let h = &self.holders[i];
        let pos = h.tokens / bs;
        let shared_partial = !h.tokens.is_multiple_of(bs) && self.holders_of(h.table[pos]) > 1;
        let free = self.pool.free_blocks();
        let r = self.pool.copy_on_write(h.id, Epoch::new(e));
        let copy = match r {
            Err(err) => {
                let k = kind(&err);
                if !self.in_flight(e) {
                    assert_eq!(k, Outcome::Err("epoch"));
                } else {
                    assert!(shared_partial, "{err}");
                    let src = h.table[pos];
                    if self.recs[src].slots.iter().any(|s| s.token.is_none()) {
                        assert_eq!(k, Outcome::Err("pending"));
                    } else {
                        assert_eq!(k, Outcome::OutOfBlocks(1, 0));
                        assert_eq!(free, 0);
                    }
                }
                return;
            }
            Ok(c) => c,
        };
        assert!(self.in_flight(e));
        let Some(copy) = copy else {
            assert!(!shared_partial, "a shared partial block was not copied");
            return;
        };
        assert!(shared_partial);
        self.seen("copy on write");
        let (src, dst) = (copy.src.index(), copy.dst.index());
        assert_eq!(src, self.holders[i].table[pos]);
        assert_eq!(copy.slots as usize, self.holders[i].tokens % bs);
        let parent = self.recs[src].parent;
        let root = self.recs[src].root;
        self.access(i, e);
        self.recs[src].accessed = self.recs[src].accessed.max(e);
        self.taken(dst, parent, root);
        let slots = self.recs[src].slots.clone();
        self.recs[dst].slots = slots
            .into_iter()
            .map(|mut s| {
                s.deps.push(e);
                s
            })
            .collect();
        self.recs[dst].accessed = e;
        self.holders[i].table[pos] = dst;
        self.let_go(&[src], e);
        if let Some(&next) = self.holders[i].table.get(pos + 1) {
            let g = self.recs[dst].generation;
            self.recs[next].parent = Some((dst, g));
        }
    }

    fn truncate(&mut self, i: usize, to: usize) {
        let bs = self.bs;
        let h = &self.holders[i];
        let r = self.pool.truncate(h.id, to);
        if h.last > self.completed {
            assert_eq!(r.map_err(|e| kind(&e)), Err(Outcome::Err("in flight")));
            return;
        }
        // Keep the good, known prefix: up to the first block a failed step
        // wrote and the first slot whose token never arrived; a partial tail
        // that is shared or cached cannot be cut, so it goes.
        let mut keep = to.min(h.tokens);
        if let Some(t) = self.first_failed_dep_block(&h.table) {
            keep = keep.min(t * bs);
        }
        for (k, &b) in h.table.iter().enumerate() {
            if let Some(s) = self.recs[b].slots.iter().position(|s| s.token.is_none()) {
                keep = keep.min(k * bs + s);
                break;
            }
        }
        if !keep.is_multiple_of(bs) {
            let b = h.table[keep / bs];
            if self.holders_of(b) > 1 || self.is_cached(b) {
                keep -= keep % bs;
            }
        }
        assert_eq!(r, Ok(keep), "truncate({to}) of {} tokens", h.tokens);
        if keep < h.tokens {
            self.seen("truncated");
        }
        let kept_blocks = keep.div_ceil(bs);
        let (cut, last) = {
            let h = &mut self.holders[i];
            let cut = h.table.split_off(kept_blocks);
            h.tokens = keep;
            (cut, h.last)
        };
        if !keep.is_multiple_of(bs) {
            // A block cut back holds new content from here: a new generation,
            // so nothing computed over its old content chains to it.
            let b = self.holders[i].table[keep / bs];
            let r = &mut self.recs[b];
            if r.slots.len() > keep % bs {
                r.slots.truncate(keep % bs);
                r.settled = None;
                let g = self.pool.generation(BlockId::new(b as u32)).get();
                assert!(g > r.generation, "b{b} was cut back at its old generation");
                r.generation = g;
            }
        }
        self.let_go(&cut, last);
    }

    fn evict_cached(&mut self, limit: usize) {
        let cached_free: Vec<usize> = self
            .pool
            .free_queue()
            .iter()
            .map(|b| b.index())
            .filter(|&b| self.is_cached(b))
            .collect();
        let out: Vec<usize> = self
            .pool
            .evict_cached(limit)
            .iter()
            .map(|e| e.block.index())
            .collect();
        assert_eq!(out.len(), limit.min(cached_free.len()));
        for &e in &out {
            assert!(cached_free.contains(&e));
            for &c in &cached_free {
                if !out.contains(&c) {
                    assert!(self.recs[e].free_since <= self.recs[c].free_since);
                }
            }
            self.recs[e].evicted = true;
        }
    }

    // ----- composite operations -----

    fn ensure_epoch(&mut self) {
        if self.issued() == self.completed {
            self.step(&Op::NextEpoch);
        }
    }

    fn prefill(&mut self, family: u8, len: u8, salted: bool) {
        self.step(&Op::Lookup {
            family,
            len,
            salted,
        });
        let i = self.holders.len() - 1;
        let h = &self.holders[i];
        let need = (len as usize).div_ceil(self.bs) - h.table.len();
        let missing = len as usize - h.tokens;
        if need > self.pool.free_blocks() {
            return self.step(&Op::Release { h: i as u8 });
        }
        self.step(&Op::Allocate {
            h: i as u8,
            n: need as u8,
        });
        self.ensure_epoch();
        if missing > 0 {
            self.step(&Op::Write {
                h: i as u8,
                n: missing as u8,
            });
        }
    }

    fn decode(&mut self, h: u8) {
        let Some(i) = self.pick(h) else { return };
        let t = &self.holders[i];
        if t.tokens == t.table.len() * self.bs {
            if self.pool.free_blocks() == 0 {
                return;
            }
            self.step(&Op::Allocate { h: i as u8, n: 1 });
        }
        self.ensure_epoch();
        self.step(&Op::CopyOnWrite { h: i as u8 });
        self.step(&Op::WritePending { h: i as u8 });
    }

    // ----- the properties, after every operation -----

    fn check(&mut self) {
        if let Err(e) = self.pool.check_invariants() {
            panic!("invariant broken: {e}");
        }
        let n = self.recs.len();
        // Tables, refcounts, states.
        for h in &self.holders {
            let table: Vec<usize> = self
                .pool
                .table(h.id)
                .unwrap()
                .iter()
                .map(|b| b.index())
                .collect();
            assert_eq!(
                table, h.table,
                "the pool's table differs from what it handed out"
            );
            assert_eq!(self.pool.len_tokens(h.id).unwrap(), h.tokens);
        }
        for b in 0..n {
            let id = BlockId::new(b as u32);
            let holders = self.holders_of(b);
            assert_eq!(self.pool.refcount(id) as usize, holders, "b{b} refcount");
            let state = self.pool.block_state(id);
            let r = &self.recs[b];
            match state {
                BlockState::Owned => assert!(holders > 0, "b{b} owned by no one"),
                BlockState::Free => {
                    assert_eq!(holders, 0);
                    assert!(
                        r.accessed <= self.completed,
                        "b{b} is free while e{} may still touch it",
                        r.accessed
                    );
                    assert!(
                        r.window <= self.completed,
                        "b{b} freed before the last step of its last holder (e{})",
                        r.window
                    );
                }
                BlockState::Quarantined => {
                    assert_eq!(holders, 0);
                    assert!(
                        r.window > self.completed,
                        "b{b} stuck in quarantine: its last holder's steps completed"
                    );
                    self.seen("quarantined");
                }
            }
            if state == BlockState::Free && self.states[b] != BlockState::Free {
                self.recs[b].free_since = self.ops;
            }
            self.states[b] = state;
        }
        // The index: exactly the blocks whose hash maps to them.
        let cached: Vec<usize> = (0..n).filter(|&b| self.is_cached(b)).collect();
        assert_eq!(
            cached.len(),
            self.pool.stats().cached,
            "the index holds entries for blocks whose chain differs from what was written"
        );
        if !cached.is_empty() {
            self.seen("cached");
        }
        for &b in &cached {
            assert!(
                self.good(b),
                "cached b{b}: its chain was not written cleanly by completed steps"
            );
            if let Ok(Some(p)) = self.parent_of(b) {
                assert!(cached.contains(&p), "cached b{b} hangs under uncached b{p}");
            }
            assert!(!self.recs[b].evicted);
        }
        // Each block whose good KV is complete is settled once; a cached one
        // leaves the index only when a trim or reallocation says so.
        for b in 0..n {
            match self.recs[b].settled {
                None if self.good(b) => {
                    let settled = if cached.contains(&b) {
                        Settled::Cached
                    } else if self
                        .expected_hash(b)
                        .is_some_and(|h| self.pool.cached(h).is_some())
                    {
                        Settled::Duplicate
                    } else if matches!(self.parent_of(b), Ok(Some(p)) if !cached.contains(&p)) {
                        Settled::Orphan
                    } else {
                        panic!(
                            "b{b} holds complete, clean KV under an indexed parent but is not indexed: {:?}, steps {:?}",
                            self.recs[b], self.steps
                        );
                    };
                    if settled == Settled::Duplicate {
                        self.seen("duplicate");
                    }
                    self.recs[b].settled = Some(settled);
                }
                Some(Settled::Cached) => assert!(
                    cached.contains(&b) || self.recs[b].evicted,
                    "b{b}'s hash left the index with no trim or reallocation"
                ),
                _ => {}
            }
        }
        // LRU: of a free cached parent and child, the child goes first.
        let queue: Vec<usize> = self.pool.free_queue().iter().map(|b| b.index()).collect();
        let rank = |b: usize| queue.iter().position(|&x| x == b);
        for &c in &cached {
            if let (Ok(Some(p)), Some(rc)) = (self.parent_of(c), rank(c))
                && let Some(rp) = rank(p)
            {
                assert!(rp > rc, "free b{c} would outlive its parent b{p}");
                self.seen("lru pair");
            }
        }
    }

    /// Ends every request and step; the pool must be whole.
    fn drain(&mut self) {
        while !self.holders.is_empty() {
            self.release(self.holders.len() - 1);
            self.check();
        }
        if self.issued() > self.completed {
            self.retire((self.issued() - self.completed - 1) as u8, false);
            self.check();
        }
        assert!(
            self.pool.is_whole(),
            "the pool is not whole: {:?}",
            self.pool.stats()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("STRATA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        max_shrink_iters: 4096,
        // Failures print their minimal case; scripts/plant-bugs.sh fails
        // the tests on purpose and must leave no files behind.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn pool_histories_keep_every_property(
        num_blocks in 1..12u32,
        block_size in 1..4u32,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let mut h = Harness::new(num_blocks, block_size);
        for op in &ops {
            h.step(op);
        }
        h.drain();
    }
}

/// The generator is only as good as what it reaches: run a fixed-seed batch
/// of cases and require every interesting outcome to occur.
#[test]
fn the_generator_reaches_every_outcome() {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let strategy = (1..12u32, 1..4u32, proptest::collection::vec(op(), 1..120));
    let mut total: HashMap<&'static str, u32> = HashMap::new();
    for _ in 0..300 {
        let (n, bs, ops) = strategy.new_tree(&mut runner).unwrap().current();
        let mut h = Harness::new(n, bs);
        for op in &ops {
            h.step(op);
        }
        h.drain();
        for (k, v) in h.coverage {
            *total.entry(k).or_default() += v;
        }
    }
    eprintln!("coverage over 300 cases: {total:?}");
    for k in [
        "hit",
        "pending",
        "evicted",
        "copy on write",
        "out of blocks",
        "write rule",
        "no room",
        "epoch",
        "quarantined",
        "cached",
        "duplicate",
        "truncated",
        "lru pair",
    ] {
        assert!(
            total.get(k).copied().unwrap_or(0) > 0,
            "never reached {k:?}: {total:?}"
        );
    }
}
