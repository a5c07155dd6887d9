//! Cache-salt isolation: prefixes are shared only within a salt.

use strata_kv::{BlockPool, OwnerTag, PoolConfig};
use strata_testkit::{hasher, root, tokens};

#[test]
fn same_salt_hits_and_a_different_salt_misses() {
    let h = hasher(4);
    let mut pool = BlockPool::new(
        PoolConfig {
            num_blocks: 16,
            block_size: 4,
        },
        h.clone(),
    )
    .unwrap();
    let prompt = tokens(0..13);
    let seq = |salt: Option<&[u8]>| {
        let mut s = h.sequence(root(&h, salt));
        s.extend(&prompt);
        s
    };
    let alice = seq(Some(b"alice"));
    let (a, _) = pool.lookup_and_pin(OwnerTag(1), &alice).unwrap();
    pool.allocate(a, 4).unwrap();
    let e = pool.next_epoch();
    pool.write(a, e, &prompt).unwrap();
    pool.complete(e).unwrap();
    pool.release(a).unwrap();
    pool.check_invariants().unwrap();

    let (_, hit) = pool
        .lookup_and_pin(OwnerTag(2), &seq(Some(b"alice")))
        .unwrap();
    assert_eq!(hit.blocks, 3, "same salt: the three full blocks hit");
    for other in [Some(&b"bob"[..]), None, Some(&b""[..])] {
        let (_, hit) = pool.lookup_and_pin(OwnerTag(3), &seq(other)).unwrap();
        assert_eq!(hit.blocks, 0, "salt {other:?} must not see alice's prefix");
    }
    pool.check_invariants().unwrap();
}
