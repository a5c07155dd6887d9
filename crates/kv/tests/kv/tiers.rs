//! The pool with tiers under random operations, against a simulated arena
//! and store: demotions copy what the arena holds at the start of the step
//! that carries them, restores copy the store's bytes into their targets,
//! and after every operation every holder's blocks hold exactly its
//! tokens. A demotion that read a reused block, a restore served under the
//! wrong key, a target readable before it landed or a pin left behind
//! shows up as wrong content or a broken invariant.

use std::collections::HashMap;

use proptest::prelude::*;
use strata_kv::{
    BlockHash, BlockPool, HolderId, KvError, OwnerTag, PoolConfig, Tier, TierPolicy, TokenId,
};

const BS: usize = 4;
const BLOCKS: u32 = 12;

#[derive(Clone, Debug)]
enum Op {
    /// A request for the first `len` tokens of family `f`.
    Start(u8, u8),
    /// The store answers request `i`'s next outstanding restore.
    Fetch(u8, bool),
    /// A step: demotions out, landed restores in, prefill, completion.
    Step,
    Release(u8),
    /// Everything free is taken and given back (evicts the arena).
    Pressure,
    /// The store loses one entry (eviction, corruption found on a read).
    Drop(u8),
    /// The store's write of the waiting demotions fails.
    FailWrites,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 1u8..24).prop_map(|(f, l)| Op::Start(f, l)),
        3 => (any::<u8>(), prop::bool::weighted(0.85)).prop_map(|(i, ok)| Op::Fetch(i, ok)),
        3 => Just(Op::Step),
        2 => any::<u8>().prop_map(Op::Release),
        1 => Just(Op::Pressure),
        1 => any::<u8>().prop_map(Op::Drop),
        1 => Just(Op::FailWrites),
    ]
}

/// Token `i` of family `f`: families 0 and 1 share their first 8 tokens.
fn token(f: u8, i: usize) -> TokenId {
    let fam = if i < 8 && f < 2 { 0 } else { f as u32 };
    TokenId::new(fam * 1000 + i as u32)
}

struct Req {
    h: HolderId,
    tokens: Vec<TokenId>,
    /// Tokens written (or restored) so far.
    done: usize,
    /// Outstanding restores' fetched bytes, in order.
    fetched: Vec<Vec<u32>>,
    outstanding: usize,
}

struct Sim {
    pool: BlockPool,
    /// What each arena block holds, slot by slot.
    arena: Vec<Vec<u32>>,
    /// The store: hash -> (parent, tokens, bytes).
    store: HashMap<BlockHash, Vec<u32>>,
    /// Copies taken, not yet written by the store.
    landing: Vec<(BlockHash, Vec<u32>)>,
    reqs: Vec<Req>,
    tag: u64,
}

impl Sim {
    fn new(policy: TierPolicy) -> Self {
        let hasher = strata_testkit::hasher(BS);
        let mut pool = BlockPool::new(
            PoolConfig {
                num_blocks: BLOCKS,
                block_size: BS as u32,
            },
            hasher,
        )
        .unwrap();
        pool.set_tier_policy(policy);
        Self {
            pool,
            arena: vec![vec![u32::MAX; BS]; BLOCKS as usize],
            store: HashMap::new(),
            landing: Vec::new(),
            reqs: Vec::new(),
            tag: 0,
        }
    }

    fn seq(&self, tokens: &[TokenId]) -> strata_kv::SequenceHasher {
        let hasher = self.pool.hasher();
        let mut s = hasher.sequence(strata_testkit::root(hasher, None));
        s.extend(tokens);
        s
    }

    fn check(&self) -> Result<(), TestCaseError> {
        self.pool
            .check_invariants()
            .map_err(|e| TestCaseError::fail(format!("invariant: {e}")))?;
        for r in &self.reqs {
            let table = self.pool.table(r.h).unwrap();
            for (p, t) in r.tokens[..r.done].iter().enumerate() {
                let held = self.arena[table[p / BS].index()][p % BS];
                prop_assert_eq!(held, t.get(), "slot {} of a request holds the wrong KV", p);
            }
        }
        Ok(())
    }

    fn start(&mut self, f: u8, len: usize) {
        let tokens: Vec<TokenId> = (0..len).map(|i| token(f, i)).collect();
        let seq = self.seq(&tokens);
        self.tag += 1;
        let (h, hit, plan) = self
            .pool
            .lookup_and_pin_tiered(OwnerTag(self.tag), &seq, usize::MAX)
            .unwrap();
        for (k, r) in plan.restores.iter().enumerate() {
            // Restores follow the hits in chain order, under their exact key.
            assert_eq!(
                self.pool.table(h).unwrap()[hit.blocks + k],
                r.block,
                "restore targets follow the hits"
            );
            assert_eq!(r.tokens, tokens[(hit.blocks + k) * BS..][..BS]);
        }
        let have = self.pool.table(h).unwrap().len();
        let need = len.div_ceil(BS) - have;
        if need > self.pool.free_blocks() {
            self.pool.release(h).unwrap();
            return;
        }
        self.pool.allocate(h, need).unwrap();
        self.reqs.push(Req {
            h,
            tokens,
            done: hit.tokens,
            fetched: Vec::new(),
            outstanding: plan.restores.len(),
        });
    }

    fn fetch(&mut self, i: usize, ok: bool) {
        let Some(r) = self.reqs.get_mut(i) else {
            return;
        };
        if r.fetched.len() == r.outstanding {
            return;
        }
        let k = r.done / BS + r.fetched.len();
        let seq_hashes = {
            let hasher = self.pool.hasher();
            let mut s = hasher.sequence(strata_testkit::root(hasher, None));
            s.extend(&r.tokens);
            s.hashes().to_vec()
        };
        match self.store.get(&seq_hashes[k]).filter(|_| ok) {
            Some(bytes) => r.fetched.push(bytes.clone()),
            None => {
                let at = r.fetched.len();
                self.pool.restore_failed(r.h, at).unwrap();
                r.outstanding = at;
            }
        }
    }

    fn step(&mut self) {
        let e = self.pool.next_epoch();
        // The executor's order: demotions out first.
        for d in self.pool.take_demotions(usize::MAX) {
            let bytes = self.arena[d.block.index()].clone();
            assert_eq!(
                bytes,
                d.tokens.iter().map(|t| t.get()).collect::<Vec<_>>(),
                "a demotion copies what its key says"
            );
            self.landing.push((d.hash, bytes));
        }
        for r in &mut self.reqs {
            if r.outstanding > 0 && r.fetched.len() < r.outstanding {
                continue;
            }
            if r.outstanding > 0 {
                let landed = self.pool.restore_landed(r.h, e, r.outstanding).unwrap();
                for ((b, _), bytes) in landed.iter().zip(&r.fetched) {
                    self.arena[b.index()] = bytes.clone();
                }
                r.done += r.outstanding * BS;
                r.outstanding = 0;
                r.fetched.clear();
            }
            if r.done < r.tokens.len() {
                self.pool.write(r.h, e, &r.tokens[r.done..]).unwrap();
                let table = self.pool.table(r.h).unwrap();
                for p in r.done..r.tokens.len() {
                    self.arena[table[p / BS].index()][p % BS] = r.tokens[p].get();
                }
                r.done = r.tokens.len();
            }
        }
        self.pool.complete(e).unwrap();
        // The store writes what the step copied out.
        for (hash, bytes) in std::mem::take(&mut self.landing) {
            self.store.insert(hash, bytes);
            self.pool.tiers_mut().located(hash, Some(Tier::Ssd));
        }
    }

    fn release(&mut self, i: usize) {
        if i < self.reqs.len() {
            let r = self.reqs.remove(i);
            self.pool.release(r.h).unwrap();
        }
    }

    fn pressure(&mut self) {
        let hog = self
            .pool
            .new_holder(OwnerTag(0), strata_testkit::root(self.pool.hasher(), None));
        let n = self.pool.free_blocks();
        self.pool.allocate(hog, n).unwrap();
        self.pool.release(hog).unwrap();
    }

    fn drop_entry(&mut self, k: u8) {
        let mut keys: Vec<BlockHash> = self.store.keys().copied().collect();
        keys.sort_by_key(|h| h.bits());
        if keys.is_empty() {
            return;
        }
        let h = keys[k as usize % keys.len()];
        self.store.remove(&h);
        self.pool.tiers_mut().located(h, None);
    }

    fn fail_writes(&mut self) {
        // Demotions the next step would carry are taken now and never land.
        let e = self.pool.next_epoch();
        for d in self.pool.take_demotions(usize::MAX) {
            self.pool.tiers_mut().located(d.hash, None);
        }
        self.pool.complete(e).unwrap();
    }
}

fn cases() -> u32 {
    std::env::var("STRATA_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn run(policy: TierPolicy, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut sim = Sim::new(policy);
    for op in ops {
        match *op {
            Op::Start(f, l) => sim.start(f, l as usize),
            Op::Fetch(i, ok) => {
                if !sim.reqs.is_empty() {
                    let i = i as usize % sim.reqs.len();
                    sim.fetch(i, ok);
                }
            }
            Op::Step => sim.step(),
            Op::Release(i) => {
                if !sim.reqs.is_empty() {
                    let i = i as usize % sim.reqs.len();
                    sim.release(i);
                }
            }
            Op::Pressure => sim.pressure(),
            Op::Drop(k) => sim.drop_entry(k),
            Op::FailWrites => sim.fail_writes(),
        }
        sim.check()?;
    }
    while let Some(r) = sim.reqs.pop() {
        sim.pool.release(r.h).unwrap();
    }
    sim.check()?;
    prop_assert_eq!(
        sim.pool.tiers().pins(),
        0,
        "a finished workload leaves tier pins"
    );
    prop_assert!(sim.pool.is_whole(), "the pool is whole at the end");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn write_back_tiers_serve_only_exact_content(ops in prop::collection::vec(op(), 1..80)) {
        run(TierPolicy { write_back: true, write_through: false, min_chain: 1, first_tier: Some(Tier::Ssd) }, &ops)?;
    }

    #[test]
    fn write_through_tiers_serve_only_exact_content(ops in prop::collection::vec(op(), 1..80)) {
        run(TierPolicy { write_back: false, write_through: true, min_chain: 2, first_tier: Some(Tier::Ssd) }, &ops)?;
    }
}

fn tokens(f: u8, n: usize) -> Vec<TokenId> {
    (0..n).map(|i| token(f, i)).collect()
}

/// A chain written, evicted, demoted and restored: found only once landed,
/// its targets refuse writes and reads until their copy lands, a second
/// request waits for the first one's copy, and a failed restore truncates.
#[test]
fn a_restore_lands_in_order_and_a_failure_truncates() {
    let mut sim = Sim::new(TierPolicy {
        write_back: true,
        write_through: false,
        min_chain: 1,
        first_tier: Some(Tier::Ssd),
    });
    sim.start(2, 13);
    sim.step();
    sim.release(0);
    sim.pressure();
    sim.check().unwrap();
    // Evicted: the demotions wait for a step; until they land, no hit.
    let seq = sim.seq(&tokens(2, 13));
    assert_eq!(
        sim.pool.peek_tiers(&seq).unwrap().0,
        0,
        "landing is never found"
    );
    sim.step();
    assert_eq!(sim.pool.peek_tiers(&seq).unwrap(), (3, Some(Tier::Ssd)));

    let (h, hit, plan) = sim
        .pool
        .lookup_and_pin_tiered(OwnerTag(7), &seq, usize::MAX)
        .unwrap();
    assert_eq!(
        (hit.blocks, plan.restores.len()),
        (0, 3),
        "capped: the last block computes"
    );
    sim.pool.allocate(h, 1).unwrap();
    sim.pool.check_invariants().unwrap();
    let e = sim.pool.next_epoch();
    assert!(
        matches!(
            sim.pool.write(h, e, &tokens(2, 4)),
            Err(KvError::WriteRule { reason, .. }) if reason.contains("restoring")
        ),
        "a restoring target is not writable"
    );
    let read = [(
        plan.restores[0].block,
        plan.restores[0].generation,
        strata_kv::Access::Read,
    )];
    assert!(sim.pool.validate(e, &read).is_err(), "nor readable");
    // A second request for the same prefix waits for this copy.
    let peek = sim.pool.peek_prefix(&seq).unwrap();
    assert_eq!(peek.hit.pending, Some(plan.restores[0].hash));
    // The second restore fails: the first lands, the rest is computed.
    sim.pool.restore_failed(h, 1).unwrap();
    assert_eq!(sim.pool.tiers().pins(), 1);
    let landed = sim.pool.restore_landed(h, e, 1).unwrap();
    assert_eq!(landed[0].0, plan.restores[0].block);
    sim.pool.check_invariants().unwrap();
    assert!(
        sim.pool.restore_landed(h, e, 1).is_err(),
        "nothing else outstanding"
    );
    sim.pool.write(h, e, &tokens(2, 13)[4..]).unwrap();
    sim.pool.complete(e).unwrap();
    sim.pool.check_invariants().unwrap();
    // The failed block's entry is gone; the one after it is still there
    // but unreachable until the chain is rebuilt.
    assert!(!sim.pool.tiers().contains(plan.restores[1].hash));
    sim.pool.release(h).unwrap();
    sim.pool.check_invariants().unwrap();
    assert_eq!(sim.pool.tiers().pins(), 0);
}

/// Write-through holds short chains back until they reach `min_chain`
/// blocks, then demotes the whole chain.
#[test]
fn write_through_waits_for_min_chain() {
    let mut sim = Sim::new(TierPolicy {
        write_back: false,
        write_through: true,
        min_chain: 3,
        first_tier: Some(Tier::Ssd),
    });
    sim.start(2, 8);
    sim.step();
    sim.step();
    assert!(
        sim.store.is_empty(),
        "two blocks are under the wear rule's minimum"
    );
    sim.release(0);
    sim.start(2, 12);
    sim.step();
    sim.step();
    assert_eq!(
        sim.store.len(),
        3,
        "the chain reached three blocks: all of it is demoted"
    );
    sim.release(0);
    sim.check().unwrap();
}
