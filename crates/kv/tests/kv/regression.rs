//! One test per bug of other servers that Strata's KV core makes impossible
//! (shared/design.md), each reproducing the original interleaving.

use strata_kv::{Access, BlockState, KvCache, KvError, OwnerTag, PoolConfig};
use strata_testkit::tokens;

use crate::fixture::Fixture;

/// MLX allocator: a cache trim recycled buffers still read by in-flight GPU
/// work. Here a block released while its step runs is quarantined, and no
/// allocation (nor cache clear) can take it until that step completes.
#[test]
fn mlx_block_released_in_flight_is_not_reused_until_complete() {
    let mut f = Fixture::new(4, 4);
    let (a, e1) = f.prefill(1, &tokens(0..6)); // 2 blocks, step e1 in flight
    let a_blocks = f.pool.table(a).unwrap().to_vec();
    f.release(a); // finished (or aborted) while e1 runs
    for &b in &a_blocks {
        assert_eq!(f.pool.block_state(b), BlockState::Quarantined);
    }
    assert_eq!(f.pool.free_blocks(), 2);
    assert!(
        f.pool.evict_cached(usize::MAX).is_empty(),
        "a trim may drop only free cached blocks"
    );
    let b = f.pool.new_holder(OwnerTag(2), f.root);
    assert_eq!(
        f.pool.allocate(b, 3),
        Err(KvError::OutOfBlocks { needed: 3, free: 2 })
    );
    f.check();
    f.pool.allocate(b, 2).unwrap();
    f.check();
    for x in f.pool.table(b).unwrap() {
        assert!(
            !a_blocks.contains(x),
            "{x:?} was reused while step e1 could still read it"
        );
    }
    f.complete(e1);
    for &x in &a_blocks {
        assert_eq!(f.pool.block_state(x), BlockState::Free);
    }
    let first = f.seq(&tokens(0..6)).hashes()[0];
    assert_eq!(
        f.pool.cached(first),
        Some(a_blocks[0]),
        "e1 completed: its full block is valid KV, published though A ended"
    );
    f.pool.allocate(b, 2).unwrap();
    f.check();
}

/// oMLX: the deferred-free window was anchored to the first of several
/// concurrent completions, so a later completion's blocks were reused early.
/// Here each block waits for its own last use.
#[test]
fn omlx_each_block_waits_for_its_own_epoch() {
    let mut f = Fixture::new(8, 4);
    let (a, e1) = f.prefill(1, &tokens(0..8));
    let (b, e2) = f.prefill(2, &tokens(100..108));
    let (a_blocks, b_blocks) = (
        f.pool.table(a).unwrap().to_vec(),
        f.pool.table(b).unwrap().to_vec(),
    );
    // Both finish in the same scheduling pass, back to back.
    f.release(a);
    f.release(b);
    assert_eq!(f.pool.stats().quarantined, 4);
    f.complete(e1);
    for &x in &a_blocks {
        assert_eq!(
            f.pool.block_state(x),
            BlockState::Free,
            "e1 is done with {x:?}"
        );
    }
    for &x in &b_blocks {
        assert_eq!(
            f.pool.block_state(x),
            BlockState::Quarantined,
            "e2 still runs on {x:?}"
        );
    }
    f.complete(e2);
    assert_eq!(f.pool.free_blocks(), 8);
}

/// The same with a block shared by two sequences: its window is the later of
/// the two, whichever holder lets go last.
#[test]
fn omlx_a_shared_block_waits_for_the_latest_reader() {
    let mut f = Fixture::new(8, 4);
    let prompt = tokens(0..9);
    let (x, e1) = f.prefill(1, &prompt);
    f.complete(e1);
    let (y, hit) = f.lookup(2, &prompt);
    assert_eq!(hit.blocks, 2);
    f.pool.allocate(y, 1).unwrap();
    let e2 = f.pool.next_epoch();
    let e3 = f.pool.next_epoch();
    f.pool.touch(x, e2).unwrap(); // x decodes in e2
    f.pool.write(y, e3, &prompt[8..]).unwrap(); // y prefills its tail in e3
    let shared = f.pool.table(x).unwrap()[0];
    f.release(y); // the later reader lets go first
    f.release(x);
    f.complete(e2);
    assert_eq!(
        f.pool.block_state(shared),
        BlockState::Quarantined,
        "e3 still reads the shared block"
    );
    f.complete(e3);
    assert_eq!(f.pool.block_state(shared), BlockState::Free);
    assert!(f.pool.is_whole());
}

/// A block's hash is never findable before the step that fills it has
/// completed; while it runs, it is findable only as pending.
#[test]
fn block_is_not_visible_in_the_index_before_its_epoch_completes() {
    let mut f = Fixture::new(8, 4);
    let prompt = tokens(0..9);
    let (_a, e1) = f.prefill(1, &prompt);
    let (b, hit) = f.lookup(2, &prompt);
    assert_eq!(hit.blocks, 0, "nothing may be hit while e1 is writing it");
    let first_hash = f.seq(&prompt).hashes()[0];
    assert_eq!(
        hit.pending,
        Some(first_hash),
        "the block being filled is findable as pending"
    );
    assert_eq!(f.pool.cached(first_hash), None);
    f.release(b);
    f.complete(e1);
    let (_c, hit) = f.lookup(3, &prompt);
    assert_eq!(hit.blocks, 2);
    assert_eq!(hit.pending, None);
}

/// A failed step publishes nothing it wrote, even when a later step fills
/// the block; the pending entry disappears so waiters compute it themselves.
#[test]
fn a_failed_step_publishes_nothing_it_wrote() {
    let mut f = Fixture::new(8, 4);
    let prompt = tokens(0..8);
    let (a, _) = f.lookup(1, &prompt);
    f.pool.allocate(a, 2).unwrap();
    let e1 = f.pool.next_epoch();
    let e2 = f.pool.next_epoch();
    f.pool.write(a, e1, &prompt[..2]).unwrap();
    f.pool.write(a, e2, &prompt[2..]).unwrap();
    f.check();
    f.pool.fail(e1).unwrap();
    f.check();
    f.complete(e2);
    let h = f.seq(&prompt).hashes().to_vec();
    assert_eq!(
        f.pool.cached(h[0]),
        None,
        "block 0 holds garbage from the failed e1"
    );
    assert!(!f.pool.is_pending(h[0]));
    assert!(matches!(
        f.pool.write(a, f.pool.stats().issued, &prompt[..1]),
        Err(KvError::EpochNotInFlight { .. })
    ));
}

/// vLLM prefix cache ("token bleed"): a block found for A was evicted and
/// handed to B before A pinned it, and early pins leaked on abort. Here the
/// lookup pins, so B cannot take it, and dropping A's lease returns it all.
#[test]
fn vllm_prefix_hit_cannot_be_evicted_before_allocation_and_abort_leaks_nothing() {
    let mut f = Fixture::new(6, 4);
    let prompt = tokens(0..9);
    let (x, e1) = f.prefill(1, &prompt);
    f.complete(e1);
    f.release(x);
    let free_at_start = f.pool.free_blocks();
    assert_eq!(free_at_start, 6);

    let (a, hit) = f.lookup(2, &prompt);
    assert_eq!(hit.blocks, 2);
    let a_blocks = f.pool.table(a).unwrap().to_vec();
    let gens: Vec<_> = a_blocks.iter().map(|&b| f.pool.generation(b)).collect();
    // Block pressure from another admission before A allocates.
    let b = f.pool.new_holder(OwnerTag(3), f.root);
    assert_eq!(
        f.pool.allocate(b, 5),
        Err(KvError::OutOfBlocks { needed: 5, free: 4 })
    );
    f.pool.allocate(b, 4).unwrap();
    f.check();
    for (&blk, &g) in a_blocks.iter().zip(&gens) {
        assert_eq!(
            f.pool.generation(blk),
            g,
            "{blk:?} was reallocated under A's pin"
        );
        assert!(!f.pool.table(b).unwrap().contains(&blk));
    }
    f.pool
        .validate(
            f.pool.stats().issued,
            &[(a_blocks[0], gens[0], Access::Read)],
        )
        .unwrap();
    f.release(b);

    // A is aborted right after its lookup, through the RAII lease this time.
    let cache = KvCache::new(
        PoolConfig {
            num_blocks: 6,
            block_size: 4,
        },
        f.hasher.clone(),
    )
    .unwrap();
    let seq = f.seq(&prompt);
    {
        let mut pool = cache.lock();
        let (lease, _) = pool.lookup_and_pin(OwnerTag(1), &seq).unwrap();
        pool.allocate(&lease, 3).unwrap();
        let e = pool.next_epoch();
        pool.write(&lease, e, &prompt).unwrap();
        pool.complete(e).unwrap();
    } // lease dropped: finished
    let start = cache.lock().free_blocks();
    let (lease, hit) = cache.lookup_and_pin(OwnerTag(2), &seq).unwrap();
    assert_eq!(hit.blocks, 2);
    assert_eq!(cache.lock().free_blocks(), start - 2);
    drop(lease); // abort right after the lookup
    let pool = cache.lock();
    assert_eq!(pool.free_blocks(), start, "the abort leaked pins");
    pool.check_invariants().unwrap();
    assert!(pool.is_whole());
}

/// Pins also come back when the holder of the lease panics.
#[test]
fn a_panic_after_lookup_returns_the_pins() {
    let f = Fixture::new(4, 2);
    let cache = KvCache::new(
        PoolConfig {
            num_blocks: 4,
            block_size: 2,
        },
        f.hasher.clone(),
    )
    .unwrap();
    let prompt = tokens(0..5);
    let seq = f.seq(&prompt);
    {
        let mut pool = cache.lock();
        let (lease, _) = pool.lookup_and_pin(OwnerTag(1), &seq).unwrap();
        pool.allocate(&lease, 3).unwrap();
        let e = pool.next_epoch();
        pool.write(&lease, e, &prompt).unwrap();
        pool.complete(e).unwrap();
    }
    let c2 = cache.clone();
    let r = std::thread::spawn(move || {
        let mut pool = c2.lock();
        let (_lease, hit) = pool.lookup_and_pin(OwnerTag(2), &seq).unwrap();
        assert_eq!(hit.blocks, 2);
        panic!("the request handler dies while holding pins and the lock");
    })
    .join();
    assert!(r.is_err());
    let pool = cache.lock();
    pool.check_invariants().unwrap();
    assert!(pool.is_whole(), "pins leaked through a panic");
}

/// ExecuTorch sessions: one model's weights, isolated KV per session; using
/// a session with the wrong context ran on someone else's state, and
/// destroying one mid-step left a dangling pointer. Here a lease works only
/// with the cache that minted it, a destroyed holder is unknown, and its
/// blocks wait in quarantine for the step that still uses them.
#[test]
fn executorch_session_with_wrong_cache_or_destroyed_is_refused() {
    let f = Fixture::new(4, 2);
    let (model_a, model_b) = two_models(&f);
    let session = model_a.lock().new_lease(OwnerTag(7), f.root);
    let mut b = model_b.lock();
    let other = b.new_lease(OwnerTag(8), f.root); // same holder id in b's pool
    assert_eq!(session.id(), other.id());
    assert_eq!(
        b.allocate(&session, 1),
        Err(KvError::ForeignLease(session.id()))
    );
    drop(b);

    let mut a = model_a.lock();
    a.allocate(&session, 1).unwrap();
    let e = a.next_epoch();
    let slot = a.write_pending(&session, e).unwrap();
    let block = slot.block;
    let id = session.id();
    a.release(session).unwrap(); // destroyed while its step runs
    assert_eq!(a.block_state(block), BlockState::Quarantined);
    assert_eq!(a.table(id), Err(KvError::UnknownHolder(id)));
    a.complete(e).unwrap();
    let n = a.new_lease(OwnerTag(9), f.root);
    a.allocate(&n, 4).unwrap();
    assert!(matches!(
        a.resolve(slot, strata_kv::TokenId::new(1)),
        Err(KvError::StaleSlot { .. })
    ));
    a.check_invariants().unwrap();
}

/// A published block still in quarantine may be hit: the pin takes it out,
/// and reclamation skips it.
#[test]
fn hit_on_a_published_block_still_in_quarantine() {
    let mut f = Fixture::new(6, 4);
    let prompt = tokens(0..9);
    let (a, e1) = f.prefill(1, &prompt);
    let e2 = f.pool.next_epoch();
    f.pool.touch(a, e2).unwrap();
    f.complete(e1); // published, still read by e2
    f.release(a);
    let first = f.pool.cached(f.seq(&prompt).hashes()[0]).unwrap();
    assert_eq!(f.pool.block_state(first), BlockState::Quarantined);
    let (b, hit) = f.lookup(2, &prompt);
    assert_eq!(hit.blocks, 2);
    assert_eq!(f.pool.block_state(first), BlockState::Owned);
    f.complete(e2);
    assert_eq!(
        f.pool.block_state(first),
        BlockState::Owned,
        "reclamation must skip a pinned block"
    );
    f.release(b);
    assert!(f.pool.is_whole());
}

/// A prompt that is entirely cached still computes its last token, in a
/// block of its own.
#[test]
fn a_complete_hit_is_capped_so_the_last_token_is_computed() {
    let mut f = Fixture::new(8, 4);
    let prompt = tokens(0..8); // exactly two full blocks
    let (a, e1) = f.prefill(1, &prompt);
    f.complete(e1);
    f.release(a);
    let (b, hit) = f.lookup(2, &prompt);
    assert_eq!(
        (hit.blocks, hit.tokens),
        (1, 4),
        "floor((8 - 1) / 4) = 1 block"
    );
    f.pool.allocate(b, 1).unwrap();
    let e2 = f.pool.next_epoch();
    f.pool.write(b, e2, &prompt[4..]).unwrap();
    f.check();
    f.complete(e2);
    f.release(b);
    let (_c, hit) = f.lookup(3, &prompt[..7]);
    assert_eq!(hit.blocks, 1);
    let (_d, hit) = f.lookup(4, &prompt[..1]);
    assert_eq!(hit.blocks, 0, "a one-token prompt computes its token");
}

/// A finished sequence is freed tail first: its prefix is evicted last.
#[test]
fn a_prefix_outlives_its_extensions() {
    let mut f = Fixture::new(3, 2);
    let (a, e1) = f.prefill(1, &tokens(0..6));
    f.complete(e1);
    let t = f.pool.table(a).unwrap().to_vec();
    f.release(a);
    assert_eq!(f.pool.free_queue(), vec![t[2], t[1], t[0]]);
    let b = f.pool.new_holder(OwnerTag(2), f.root);
    let evicted = f.pool.allocate(b, 1).unwrap();
    assert_eq!(evicted[0].block, t[2]);
    f.check();
    f.release(b);
    let (_c, hit) = f.lookup(3, &tokens(0..6));
    assert_eq!(hit.blocks, 2, "the two leading blocks survived");
}

/// Publishing a hash the index already holds keeps the first block; the
/// duplicate stays uncached and is freed as empty.
#[test]
fn a_duplicate_publication_keeps_the_first_block() {
    let mut f = Fixture::new(8, 4);
    let prompt = tokens(0..5);
    let (a, e1) = f.prefill(1, &prompt);
    let (b, e2) = f.prefill(2, &prompt); // computed again concurrently
    f.complete(e1);
    f.complete(e2);
    let h = f.seq(&prompt).hashes()[0];
    let first = f.pool.table(a).unwrap()[0];
    let dup = f.pool.table(b).unwrap()[0];
    assert_eq!(f.pool.cached(h), Some(first));
    f.release(b);
    assert_eq!(
        f.pool.free_queue()[0],
        dup,
        "the uncached duplicate is reused first"
    );
    f.release(a);
}

/// A decode row planned before its input token is known: the block is
/// published once the token is resolved and its step completed.
#[test]
fn pending_tokens_publish_after_resolve() {
    let mut f = Fixture::new(4, 2);
    let prompt = tokens([5, 6, 7]);
    let (a, e1) = f.prefill(1, &prompt);
    let e2 = f.pool.next_epoch();
    let slot = f.pool.write_pending(a, e2).unwrap(); // fills block 1
    f.check();
    f.complete(e1);
    f.pool.resolve(slot, strata_kv::TokenId::new(8)).unwrap(); // e1 sampled 8
    f.check();
    assert!(f.pool.is_pending(f.seq(&tokens([5, 6, 7, 8])).hashes()[1]));
    f.complete(e2);
    let (_b, hit) = f.lookup(2, &tokens([5, 6, 7, 8, 9]));
    assert_eq!(hit.blocks, 2);
}

/// Copy on write gives a fork its own copy of a shared partial block.
#[test]
fn copy_on_write_of_a_shared_partial_block() {
    let mut f = Fixture::new(6, 4);
    let (a, e1) = f.prefill(1, &tokens(0..6));
    f.complete(e1);
    let b = f.pool.fork(a, OwnerTag(2)).unwrap();
    f.check();
    let e2 = f.pool.next_epoch();
    assert!(matches!(
        f.pool.write(b, e2, &tokens([50])),
        Err(KvError::WriteRule { .. })
    ));
    let copy = f.pool.copy_on_write(b, e2).unwrap().unwrap();
    f.check();
    assert_eq!(copy.slots, 2);
    assert_eq!(f.pool.table(a).unwrap()[1], copy.src);
    assert_eq!(f.pool.table(b).unwrap()[1], copy.dst);
    f.pool.write(b, e2, &tokens([50])).unwrap();
    f.pool.write(a, e2, &tokens([60])).unwrap();
    f.check();
    f.complete(e2);
    f.release(a);
    f.release(b);
    assert!(f.pool.is_whole());
}

/// The sanitizer names the block, its generations, epochs and owners.
#[test]
fn sanitizer_reports_a_stale_generation() {
    let mut f = Fixture::new(2, 2);
    let (a, e1) = f.prefill(1, &tokens(0..2));
    let b0 = f.pool.table(a).unwrap()[0];
    let g0 = f.pool.generation(b0);
    f.complete(e1);
    f.release(a);
    let c = f.pool.new_holder(OwnerTag(42), f.root);
    f.pool.allocate(c, 2).unwrap();
    let e2 = f.pool.next_epoch();
    let err = f.pool.validate(e2, &[(b0, g0, Access::Read)]).unwrap_err();
    let KvError::Violation(v) = err else {
        panic!("expected a violation")
    };
    assert_eq!(v.block, b0);
    assert_ne!(v.current, g0);
    assert_eq!(v.owners, vec![OwnerTag(42)]);
    assert!(v.to_string().contains("KV sanitizer"));
}

/// A block hit while quarantined, then released again by a later step,
/// waits for that later step: its old quarantine entry must not free it.
#[test]
fn a_block_pinned_out_of_quarantine_waits_for_its_new_window() {
    let mut f = Fixture::new(6, 4);
    let prompt = tokens(0..9);
    let (a, e1) = f.prefill(1, &prompt);
    let e2 = f.pool.next_epoch();
    f.pool.touch(a, e2).unwrap();
    f.complete(e1);
    f.release(a); // quarantined until e2
    let (b, hit) = f.lookup(2, &prompt);
    assert_eq!(hit.blocks, 2);
    let first = f.pool.table(b).unwrap()[0];
    let e3 = f.pool.next_epoch();
    f.pool.touch(b, e3).unwrap();
    f.release(b); // quarantined again, now until e3
    f.complete(e2);
    assert_eq!(
        f.pool.block_state(first),
        BlockState::Quarantined,
        "e3 still reads {first:?}"
    );
    f.complete(e3);
    assert_eq!(f.pool.block_state(first), BlockState::Free);
}

/// ExecuTorch sessions, through a slot reference: a decode row's "token the
/// previous step samples" names a block by index and generation; another
/// cache's block with the same index and generation is not it. Resolving
/// the reference there must be refused, not write into a foreign block.
#[test]
fn executorch_a_slot_reference_of_another_cache_is_refused() {
    let f = Fixture::new(4, 2);
    let (model_a, model_b) = two_models(&f);
    let (slot_a, _lease_a) = {
        let mut a = model_a.lock();
        let lease = a.new_lease(OwnerTag(1), f.root);
        a.allocate(&lease, 1).unwrap();
        let e = a.next_epoch();
        (a.write_pending(&lease, e).unwrap(), lease)
    };
    let mut b = model_b.lock();
    let lease_b = b.new_lease(OwnerTag(2), f.root);
    b.allocate(&lease_b, 1).unwrap();
    let e = b.next_epoch();
    let slot_b = b.write_pending(&lease_b, e).unwrap();
    assert_eq!(
        (slot_b.block, slot_b.generation, slot_b.slot),
        (slot_a.block, slot_a.generation, slot_a.slot),
        "the two references look alike"
    );
    assert!(
        b.resolve(slot_a, strata_kv::TokenId::new(5)).is_err(),
        "a reference minted by another cache wrote into this one"
    );
    // This cache's own reference still resolves, once.
    b.resolve(slot_b, strata_kv::TokenId::new(6)).unwrap();
    b.check_invariants().unwrap();
}

/// Two model instances' caches of 4 two-token blocks, with `f`'s hasher.
fn two_models(f: &Fixture) -> (KvCache, KvCache) {
    let config = PoolConfig {
        num_blocks: 4,
        block_size: 2,
    };
    (
        KvCache::new(config, f.hasher.clone()).unwrap(),
        KvCache::new(config, f.hasher.clone()).unwrap(),
    )
}
