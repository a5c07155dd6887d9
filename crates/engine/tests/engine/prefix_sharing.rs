//! Concurrent clients with one long system prompt compute it once: a
//! request whose next prompt block another request is filling right now
//! waits for its publication instead of computing it again.

use strata_engine::{Engine, Event, FinishReason};
use strata_kv::TokenId;

use crate::fake::{self, FakeRunner, VOCAB, next_token};
use crate::fixture::assert_whole;
use crate::regressions::request;

/// `clients` requests at once, each a 1,400-token shared prefix, then 12
/// tokens of its own, then 8 generated. Returns the rows the engine
/// computed and the prompt tokens each request found cached.
fn shared_prefix(clients: usize) -> (u64, Vec<usize>) {
    let (blocks, bs) = (400 + 8 * clients, 4);
    let engine = Engine::start(
        FakeRunner::new(blocks, bs, 3),
        fake::config(blocks, bs, 512, 16),
    )
    .unwrap();
    let prefix: Vec<TokenId> = (0..1400u32)
        .map(|i| TokenId::new(3 + (i * 13) % (VOCAB as u32 - 3)))
        .collect();
    let prompts: Vec<Vec<TokenId>> = (0..clients as u32)
        .map(|c| {
            let mut p = prefix.clone();
            p.extend((0..12u32).map(|i| TokenId::new(3 + (c * 17 + i * 5) % (VOCAB as u32 - 3))));
            p
        })
        .collect();
    let mut handles: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(request(p.clone(), 8)).unwrap())
        .collect();
    let mut cached = Vec::new();
    for (h, p) in handles.iter_mut().zip(&prompts) {
        let mut history = p.clone();
        let mut got = 0;
        for e in h.collect_blocking() {
            match e {
                Event::Admitted { cached_tokens } => cached.push(cached_tokens),
                Event::PromptLogprobs(_) => panic!("prompt scores were not asked for"),
                Event::Token { id, .. } => {
                    assert_eq!(id, next_token(&history));
                    history.push(id);
                    got += 1;
                }
                Event::Finished { reason, .. } => assert_eq!(reason, FinishReason::Length),
            }
        }
        assert_eq!(got, 8);
    }
    assert_whole(&engine);
    (engine.stats().counters.rows, cached)
}

fn computes_the_prefix_once(clients: usize) {
    let (rows, cached) = shared_prefix(clients);
    // The prefix once, every suffix, every decode row (7 per request: none
    // past max_tokens), and at most one block of slack per client.
    let bound = 1400 + clients * 12 + clients * 7 + clients * 4;
    assert!(
        rows as usize <= bound,
        "{clients} clients computed {rows} rows; computing the prefix once allows {bound}"
    );
    let hits = cached.iter().filter(|&&c| c >= 1400).count();
    assert_eq!(
        hits,
        clients - 1,
        "all but the first hit the prefix: {cached:?}"
    );
}

#[test]
fn four_clients_sharing_a_long_prefix_compute_it_once() {
    computes_the_prefix_once(4);
}

#[test]
fn sixteen_clients_sharing_a_long_prefix_compute_it_once() {
    computes_the_prefix_once(16);
}
