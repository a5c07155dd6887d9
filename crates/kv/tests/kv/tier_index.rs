//! The tier index under random operations: only a landed, unevicted entry
//! under its exact key is ever found; an eviction waits for the restores
//! that pin it; every misuse is an error, never a panic.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use strata_kv::{BlockHash, Tier, TierIndex, TokenId};

#[derive(Clone, Debug)]
enum Op {
    Demote(u8),
    Land(u8, bool),
    Pin(u8),
    Unpin(u8),
    Evict(u8),
    RestoreFailed(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let h = 0u8..4;
    prop_oneof![
        h.clone().prop_map(Op::Demote),
        (h.clone(), any::<bool>()).prop_map(|(h, ok)| Op::Land(h, ok)),
        h.clone().prop_map(Op::Pin),
        h.clone().prop_map(Op::Unpin),
        h.clone().prop_map(Op::Evict),
        h.prop_map(Op::RestoreFailed),
    ]
}

fn key(h: u8) -> (BlockHash, BlockHash, Vec<TokenId>) {
    (
        BlockHash::from_bits(100 + h as u128),
        BlockHash::from_bits(h as u128),
        (0..4).map(|i| TokenId::new(h as u32 * 10 + i)).collect(),
    )
}

fn cases() -> u32 {
    std::env::var("STRATA_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn only_landed_unevicted_entries_under_their_exact_key_are_found(ops in prop::collection::vec(op(), 1..60)) {
        let mut t = TierIndex::new();
        // What the rules say, kept apart from the index: entries that may
        // be found, entries that exist at all, pins held.
        let mut findable: HashSet<u8> = HashSet::new();
        let mut exists: HashSet<u8> = HashSet::new();
        let mut landing: HashSet<u8> = HashSet::new();
        // Landing entries evicted before they landed.
        let mut doomed: HashSet<u8> = HashSet::new();
        let mut pins: HashMap<u8, u32> = HashMap::new();
        for op in ops {
            match op {
                Op::Demote(h) => {
                    let (hash, parent, tokens) = key(h);
                    let r = t.begin_demotion(hash, parent, &tokens, Tier::Ssd);
                    prop_assert_eq!(r.is_ok(), !exists.contains(&h), "a second entry for one hash");
                    if r.is_ok() {
                        exists.insert(h);
                        landing.insert(h);
                    }
                }
                Op::Land(h, ok) => {
                    let r = t.demotion_landed(key(h).0, ok);
                    prop_assert_eq!(r.is_ok(), landing.contains(&h));
                    if landing.remove(&h) {
                        // A landing entry evicted meanwhile never shows.
                        if ok && !doomed.remove(&h) {
                            findable.insert(h);
                        } else {
                            doomed.remove(&h);
                            exists.remove(&h);
                        }
                    }
                }
                Op::Pin(h) => {
                    let (hash, parent, tokens) = key(h);
                    let got = t.pin(hash, parent, &tokens);
                    prop_assert_eq!(got.is_some(), findable.contains(&h));
                    if got.is_some() {
                        *pins.entry(h).or_default() += 1;
                    }
                }
                Op::Unpin(h) => {
                    let held = pins.get(&h).copied().unwrap_or(0);
                    let r = t.unpin(key(h).0);
                    prop_assert_eq!(r.is_ok(), held > 0, "unpin without a pin");
                    if held > 0 {
                        pins.insert(h, held - 1);
                        if held == 1 && !findable.contains(&h) {
                            exists.remove(&h); // its deferred eviction
                        }
                    }
                }
                Op::Evict(h) | Op::RestoreFailed(h) => {
                    let r = if matches!(op, Op::Evict(_)) {
                        t.evict(key(h).0).map(|_| ())
                    } else {
                        t.restore_failed(key(h).0)
                    };
                    prop_assert_eq!(r.is_ok(), exists.contains(&h));
                    if exists.contains(&h) {
                        findable.remove(&h);
                        if landing.contains(&h) {
                            doomed.insert(h);
                        } else if pins.get(&h).copied().unwrap_or(0) == 0 {
                            exists.remove(&h);
                        }
                    }
                }
            }
            t.check_invariants().map_err(TestCaseError::fail)?;
            for h in 0..4u8 {
                let (hash, parent, tokens) = key(h);
                prop_assert_eq!(t.find(hash, parent, &tokens).is_some(), findable.contains(&h), "hash {}", h);
                // Another key under the hash is never found.
                let mut other = tokens.clone();
                other[0] = TokenId::new(999);
                prop_assert!(t.find(hash, parent, &other).is_none());
                prop_assert!(t.find(hash, BlockHash::from_bits(77), &tokens).is_none());
            }
            prop_assert_eq!(t.len(Tier::Ssd), exists.len());
        }
    }
}
