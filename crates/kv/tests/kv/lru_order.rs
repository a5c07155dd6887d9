//! The free queue's order: allocation takes the front, so a prefix must
//! always sit behind its extensions (a prefix outlives them). These cover the
//! paths where a block is reclaimed and published by the same completion.

use strata_kv::{BlockId, OwnerTag, TokenId};
use strata_testkit::tokens;

use crate::fixture::Fixture;

/// Where `b` sits in the free queue (0 = taken first).
fn rank(f: &Fixture, b: BlockId) -> usize {
    f.pool
        .free_queue()
        .iter()
        .position(|&x| x == b)
        .unwrap_or_else(|| panic!("{b:?} is not free"))
}

/// A request is aborted while the step that fills its blocks runs: the step
/// completes, its blocks are valid KV and are published, and they join the
/// queue tail first.
#[test]
fn abort_mid_prefill_frees_the_chain_tail_first() {
    let mut f = Fixture::new(8, 4);
    let prompt = tokens(0..12);
    let (a, e1) = f.prefill(1, &prompt);
    let t = f.pool.table(a).unwrap().to_vec();
    f.release(a); // the client went away while e1 runs
    f.complete(e1);
    let h = f.seq(&prompt).hashes().to_vec();
    for (i, b) in t.iter().enumerate() {
        assert_eq!(
            f.pool.cached(h[i]),
            Some(*b),
            "e1 completed: block {i} is valid"
        );
    }
    assert!(
        rank(&f, t[0]) > rank(&f, t[1]) && rank(&f, t[1]) > rank(&f, t[2]),
        "a child would outlive its parent: queue {:?}, chain {t:?}",
        f.pool.free_queue()
    );
    // Eviction then takes the extensions before the prefix.
    let b = f.pool.new_holder(OwnerTag(2), f.root);
    f.pool.allocate(b, 5 + 1).unwrap(); // the 5 empty blocks, then one cached
    f.check();
    assert_eq!(f.pool.cached(h[2]), None, "the tail goes first");
    assert_eq!(f.pool.cached(h[0]), Some(t[0]));
    assert_eq!(f.pool.cached(h[1]), Some(t[1]));
}

/// A request stops while the step after it, planned before the stop was
/// known, writes its wasted row into the last slot of its tail block; both
/// steps complete after the release.
#[test]
fn a_wasted_row_that_fills_the_tail_keeps_the_tail_first() {
    let mut f = Fixture::new(8, 2);
    let prompt = tokens(0..5);
    let (a, e1) = f.prefill(1, &prompt);
    let e2 = f.pool.next_epoch();
    let slot = f.pool.write_pending(a, e2).unwrap(); // fills block 2
    f.complete(e1);
    f.pool.resolve(slot, TokenId::new(9)).unwrap();
    let t = f.pool.table(a).unwrap().to_vec();
    f.release(a); // e1's sample was a stop token
    f.complete(e2);
    let mut all = prompt.clone();
    all.push(TokenId::new(9));
    let h = f.seq(&all).hashes().to_vec();
    assert_eq!(f.pool.cached(h[2]), Some(t[2]), "e2 completed: valid KV");
    assert!(
        rank(&f, t[0]) > rank(&f, t[1]) && rank(&f, t[1]) > rank(&f, t[2]),
        "queue {:?}, chain {t:?}",
        f.pool.free_queue()
    );
}
