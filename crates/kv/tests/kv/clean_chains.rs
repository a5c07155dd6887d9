//! Clean chains: a block gets a hash in the index only if its parent is the
//! root or is itself published at the generation the block recorded, and no
//! failed step wrote it or anything below it. A lower tier confirms a hit
//! only through the chain of hashes, so one wrongly published block would be
//! served from there; in the arena it would at least take the hash from the
//! correct chain, which then misses.

use strata_kv::KvError;
use strata_testkit::tokens;

use crate::fixture::Fixture;

/// Step E fails while writing the first chunk of a prefill; step E+1, planned
/// before the failure was known, continues the same prefill on top of E's
/// blocks and completes. Nothing E+1 wrote may be published, and the pending
/// index must not advertise it either.
#[test]
fn a_step_continuing_on_a_failed_steps_blocks_publishes_nothing() {
    let mut f = Fixture::new(8, 4);
    let prompt = tokens(0..13);
    let (a, _) = f.lookup(1, &prompt);
    f.pool.allocate(a, 4).unwrap();
    let e1 = f.pool.next_epoch();
    let e2 = f.pool.next_epoch();
    f.pool.write(a, e1, &prompt[..6]).unwrap(); // block 0 and half of 1
    f.pool.write(a, e2, &prompt[6..]).unwrap(); // the rest of 1, then 2 and 3
    f.check();
    f.pool.fail(e1).unwrap();
    f.check();
    let h = f.seq(&prompt).hashes().to_vec();
    for (i, hash) in h.iter().enumerate() {
        assert!(
            !f.pool.is_pending(*hash),
            "block {i} is built on the failed step's KV, yet advertised as pending"
        );
    }
    f.complete(e2);
    for (i, hash) in h.iter().enumerate() {
        assert_eq!(
            f.pool.cached(*hash),
            None,
            "block {i} sits on the failed step's KV, yet was published"
        );
    }
    // The request fails; a fresh one computes everything and publishes the
    // clean chain under the same hashes.
    f.release(a);
    let (b, e3) = f.prefill(2, &prompt);
    f.complete(e3);
    let table = f.pool.table(b).unwrap().to_vec();
    for (i, hash) in h.iter().enumerate() {
        assert_eq!(f.pool.cached(*hash), Some(table[i]), "block {i}");
    }
    f.release(b);
    let (_c, hit) = f.lookup(3, &prompt);
    assert_eq!(
        hit.blocks, 3,
        "the whole clean chain hits (capped at 3 of 4)"
    );
}

/// Taint spreads down the chain only: a sibling request in the same later
/// step, which never read the failed step's blocks, still publishes.
#[test]
fn taint_spreads_to_descendants_only() {
    let mut f = Fixture::new(12, 4);
    let pa = tokens(0..12);
    let pb = tokens(50..62);
    let (a, _) = f.lookup(1, &pa);
    let (b, _) = f.lookup(2, &pb);
    f.pool.allocate(a, 3).unwrap();
    f.pool.allocate(b, 3).unwrap();
    let e1 = f.pool.next_epoch();
    let e2 = f.pool.next_epoch();
    f.pool.write(a, e1, &pa[..4]).unwrap();
    f.pool.write(b, e1, &pb[..4]).unwrap();
    f.pool.complete(e1).unwrap();
    f.check();
    let e3 = f.pool.next_epoch();
    f.pool.write(a, e2, &pa[4..6]).unwrap(); // a's block 1, half: fails
    f.pool.write(a, e3, &pa[6..]).unwrap(); // a's block 1 rest, then 2
    f.pool.write(b, e3, &pb[4..]).unwrap(); // b, untouched by e2
    f.pool.fail(e2).unwrap();
    f.check();
    f.complete(e3);
    let ha = f.seq(&pa).hashes().to_vec();
    let hb = f.seq(&pb).hashes().to_vec();
    assert!(f.pool.cached(ha[0]).is_some(), "e1 completed cleanly");
    assert_eq!(f.pool.cached(ha[1]), None);
    assert_eq!(f.pool.cached(ha[2]), None);
    assert!(f.pool.cached(hb[0]).is_some());
    assert!(
        f.pool.cached(hb[1]).is_some(),
        "b never touched e2's blocks"
    );
    assert!(f.pool.cached(hb[2]).is_some());
    // A tainted block refuses further writes: a's request cannot go on.
    let e4 = f.pool.next_epoch();
    assert!(matches!(
        f.pool.write(a, e4, &tokens([1])),
        Err(KvError::WriteRule { .. }) | Err(KvError::NoRoom { .. })
    ));
}

/// Two requests compute the same first block concurrently; the first to
/// publish wins and the other's copy stays out of the index. The loser's
/// children must not be published either (their parent is not the block the
/// index holds), so the winner's own extension can take those hashes and be
/// hit later.
#[test]
fn children_of_a_duplicate_are_not_published() {
    let mut f = Fixture::new(12, 4);
    let shared = tokens(0..4);
    let mut pa = shared.clone();
    pa.extend(tokens(10..15)); // one more full block, then a partial one
    let (a, ea) = f.prefill(1, &shared);
    let (b, eb) = f.prefill(2, &shared);
    f.complete(ea);
    f.complete(eb);
    let winner = f.pool.table(a).unwrap()[0];
    let loser = f.pool.table(b).unwrap()[0];
    let h = f.seq(&pa).hashes().to_vec();
    assert_eq!(f.pool.cached(h[0]), Some(winner));
    // Both go on with the same next block; the loser's step completes first.
    f.pool.allocate(b, 2).unwrap();
    f.pool.allocate(a, 2).unwrap();
    let e = f.pool.next_epoch();
    f.pool.write(b, e, &pa[4..]).unwrap();
    f.complete(e);
    let b_child = f.pool.table(b).unwrap()[1];
    assert_ne!(
        f.pool.cached(h[1]),
        Some(b_child),
        "the child of the duplicate {loser:?} took the chain's hash"
    );
    let e = f.pool.next_epoch();
    f.pool.write(a, e, &pa[4..]).unwrap();
    f.complete(e);
    let a_child = f.pool.table(a).unwrap()[1];
    assert_eq!(f.pool.cached(h[1]), Some(a_child));
    f.release(a);
    f.release(b);
    let (c, hit) = f.lookup(3, &pa);
    assert_eq!(hit.blocks, 2, "the winner's chain hits in full");
    assert_eq!(f.pool.table(c).unwrap(), &[winner, a_child]);
}
