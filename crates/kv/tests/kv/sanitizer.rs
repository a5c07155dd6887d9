//! The sanitizer's run-time checks of a step's recorded accesses: the
//! generation still matches, the block is still held (or waits in
//! quarantine for this step), a write goes only into an unpublished block
//! with at most one holder (invariant 6), and nothing reads a block a failed
//! step wrote.

use strata_kv::{Access, KvError, OwnerTag};
use strata_testkit::tokens;

use crate::fixture::Fixture;

fn is_violation(r: Result<(), KvError>) -> bool {
    matches!(r, Err(KvError::Violation(_)))
}

#[test]
fn a_write_into_a_published_block_is_a_violation() {
    let mut f = Fixture::new(6, 4);
    let prompt = tokens(0..9);
    let (a, e1) = f.prefill(1, &prompt);
    f.complete(e1);
    let b0 = f.pool.table(a).unwrap()[0];
    let g0 = f.pool.generation(b0);
    let e2 = f.pool.next_epoch();
    f.pool.validate(e2, &[(b0, g0, Access::Read)]).unwrap();
    assert!(is_violation(
        f.pool.validate(e2, &[(b0, g0, Access::Write)])
    ));
}

#[test]
fn a_write_into_a_block_with_two_holders_is_a_violation() {
    let mut f = Fixture::new(6, 4);
    let (a, e1) = f.prefill(1, &tokens(0..6)); // block 1 is partial
    f.complete(e1);
    let _fork = f.pool.fork(a, OwnerTag(2)).unwrap();
    let b1 = f.pool.table(a).unwrap()[1];
    let g1 = f.pool.generation(b1);
    assert_eq!(f.pool.refcount(b1), 2);
    let e2 = f.pool.next_epoch();
    f.pool.validate(e2, &[(b1, g1, Access::Read)]).unwrap();
    assert!(
        is_violation(f.pool.validate(e2, &[(b1, g1, Access::Write)])),
        "a write into a shared partial block needs copy on write first"
    );
}

#[test]
fn a_read_of_a_block_a_failed_step_wrote_is_a_violation() {
    let mut f = Fixture::new(6, 4);
    let prompt = tokens(0..6);
    let (a, _) = f.lookup(1, &prompt);
    f.pool.allocate(a, 2).unwrap();
    let e1 = f.pool.next_epoch();
    let e2 = f.pool.next_epoch();
    f.pool.write(a, e1, &prompt).unwrap();
    f.pool.touch(a, e2).unwrap();
    let b0 = f.pool.table(a).unwrap()[0];
    let g0 = f.pool.generation(b0);
    f.pool.fail(e1).unwrap();
    assert!(
        is_violation(f.pool.validate(e2, &[(b0, g0, Access::Read)])),
        "e2 would attend over garbage"
    );
}

/// A finished request's wasted row writes into its own quarantined block:
/// no holder, last use this step. That is allowed.
#[test]
fn a_write_into_a_quarantined_block_of_this_step_is_allowed() {
    let mut f = Fixture::new(6, 4);
    let (a, e1) = f.prefill(1, &tokens(0..5));
    let e2 = f.pool.next_epoch();
    let slot = f.pool.write_pending(a, e2).unwrap();
    f.release(a);
    f.complete(e1);
    f.pool
        .validate(e2, &[(slot.block, slot.generation, Access::Write)])
        .unwrap();
}
