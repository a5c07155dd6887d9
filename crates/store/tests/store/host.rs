//! The host tier under random operations, against a model of it: its
//! bytes never pass the bound, it serves a payload only under its exact
//! key, and what it evicts is the least recently used.

use std::collections::VecDeque;

use proptest::prelude::*;
use strata_kv::{BlockHash, TokenId};
use strata_store::HostStore;

#[derive(Clone, Debug)]
enum Op {
    Put(u8),
    Get(u8, bool),
}

fn key(h: u8) -> (BlockHash, BlockHash, Vec<TokenId>, Vec<u8>) {
    (
        BlockHash::from_bits(1000 + h as u128),
        BlockHash::from_bits(h as u128),
        (0..4).map(|i| TokenId::new(h as u32 * 4 + i)).collect(),
        vec![h; 100 + h as usize % 3 * 50],
    )
}

/// Payload plus key, as the store counts it.
fn cost(h: u8) -> u64 {
    let k = key(h);
    (k.3.len() + k.2.len() * 4 + 16) as u64
}

proptest! {
    #[test]
    fn the_host_tier_stays_in_its_bytes_and_evicts_the_least_recent(
        cap in 300u64..1200,
        ops in prop::collection::vec(
            prop_oneof![(0u8..8).prop_map(Op::Put), (0u8..8, any::<bool>()).prop_map(|(h, e)| Op::Get(h, e))],
            1..200,
        ),
    ) {
        let mut s = HostStore::new(cap);
        // The model: most recent last.
        let mut lru: VecDeque<u8> = VecDeque::new();
        for op in ops {
            match op {
                Op::Put(h) => {
                    let (hash, parent, tokens, payload) = key(h);
                    let evicted = s.put(hash, parent, &tokens, payload);
                    lru.retain(|&x| x != h);
                    if cost(h) > cap {
                        prop_assert!(evicted.is_none());
                        continue;
                    }
                    let mut used: u64 = lru.iter().map(|&x| cost(x)).sum();
                    let mut want = Vec::new();
                    while used + cost(h) > cap {
                        let v = lru.pop_front().unwrap();
                        used -= cost(v);
                        want.push(BlockHash::from_bits(1000 + v as u128));
                    }
                    lru.push_back(h);
                    let got: Vec<BlockHash> = evicted.unwrap().iter().map(|b| b.hash).collect();
                    prop_assert_eq!(got, want, "evicts the least recently used first");
                }
                Op::Get(h, exact) => {
                    let (hash, parent, mut tokens, payload) = key(h);
                    if !exact {
                        tokens[0] = TokenId::new(999);
                    }
                    let got = s.get(hash, parent, &tokens);
                    let held = lru.contains(&h);
                    prop_assert_eq!(got.is_some(), held && exact);
                    if let Some(g) = got {
                        prop_assert_eq!(g, payload);
                        lru.retain(|&x| x != h);
                        lru.push_back(h);
                    }
                }
            }
            s.check_invariants().map_err(TestCaseError::fail)?;
            prop_assert!(s.stats().bytes <= cap);
            prop_assert_eq!(s.stats().blocks, lru.len());
        }
    }
}
