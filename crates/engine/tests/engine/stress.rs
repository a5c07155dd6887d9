//! The stress run: random arrivals with shared prefixes and salts, random
//! disconnects, preemption in a small pool, a fault-injecting fake model
//! (failed steps, random delays), the sanitizer on. Every output is checked
//! token by token against the fake model's rule, and the run ends with zero
//! violations and a whole pool.
//!
//! Quick by default (at least 10,000 steps); `STRATA_STRESS_STEPS=1000000`
//! for the long run.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use strata_engine::{
    Engine, EngineConfig, Event, FinishReason, Request, RequestHandle, SchedulerConfig,
    StopConditions,
};
use strata_kv::TokenId;
use strata_model::SamplingParams;

use crate::fake::{FakeRunner, VOCAB, next_token};
use crate::fixture::assert_whole;

struct Live {
    handle: RequestHandle,
    prompt: Vec<TokenId>,
    got: Vec<TokenId>,
    /// Disconnect after this many tokens.
    drop_after: Option<usize>,
    max_tokens: usize,
}

/// Checks one finished request against the fake model's rule.
fn verify(l: &Live, reason: &FinishReason) {
    let mut history = l.prompt.clone();
    for (i, t) in l.got.iter().enumerate() {
        assert_eq!(
            *t,
            next_token(&history),
            "token {i} of a {}-token prompt",
            l.prompt.len()
        );
        history.push(*t);
    }
    match reason {
        FinishReason::Stop => assert_eq!(l.got.last(), Some(&TokenId::new(2))),
        FinishReason::Length => assert_eq!(l.got.len(), l.max_tokens),
        FinishReason::Error(e) => assert!(e.contains("failed"), "{e}"),
        FinishReason::Abort => panic!("aborted without a disconnect"),
    }
}

#[test]
fn stress_random_traffic_keeps_every_output_exact_and_the_pool_whole() {
    let steps: u64 = std::env::var("STRATA_STRESS_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let (blocks, bs) = (48, 4);
    let mut runner = FakeRunner::new(blocks, bs, 7);
    runner.fail_rate = 0.002;
    runner.max_delay = 2_000;
    let failures = runner.failures.clone();
    let engine = Engine::start(
        runner,
        EngineConfig {
            num_blocks: blocks,
            block_size: bs,
            context: 4096,
            vocab: VOCAB,
            eos: vec![TokenId::new(2)],
            model_fingerprint: b"fake".to_vec(),
            hash_key: strata_testkit::test_key(),
            scheduler: SchedulerConfig {
                max_step_tokens: 24,
                max_running: 10,
                sanitize: true,
            },
            queue_limit: 1 << 20,
        },
    )
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let prefixes: Vec<Vec<TokenId>> = (0..4)
        .map(|k| {
            (0..8 * k)
                .map(|_| TokenId::new(rng.random_range(3..VOCAB as u32)))
                .collect()
        })
        .collect();
    let mut live: Vec<Live> = Vec::new();
    let (mut finished, mut disconnected, mut errors) = (0u64, 0u64, 0u64);
    while engine.stats().counters.steps < steps {
        while live.len() < 16 {
            let mut prompt = prefixes[rng.random_range(0..prefixes.len())].clone();
            prompt.extend(
                (0..rng.random_range(1..24))
                    .map(|_| TokenId::new(rng.random_range(3..VOCAB as u32))),
            );
            let max_tokens = rng.random_range(1..40);
            let req = Request {
                prompt: prompt.clone(),
                sampling: SamplingParams::greedy(),
                stop: StopConditions {
                    max_tokens: Some(max_tokens),
                    ..StopConditions::default()
                },
                cache_salt: rng.random_bool(0.3).then(|| b"other tenant".to_vec()),
            };
            live.push(Live {
                handle: engine.submit(req).unwrap(),
                prompt,
                got: Vec::new(),
                drop_after: rng.random_bool(0.15).then(|| rng.random_range(0..8)),
                max_tokens,
            });
        }
        let mut progressed = false;
        let mut i = 0;
        while i < live.len() {
            let l = &mut live[i];
            let mut done = None;
            while let Ok(e) = l.handle.try_recv() {
                progressed = true;
                match e {
                    Event::Token { id, .. } => l.got.push(id),
                    Event::Finished { reason, .. } => {
                        done = Some(reason);
                        break;
                    }
                    Event::Admitted { .. } => {}
                }
            }
            if let Some(reason) = done {
                verify(l, &reason);
                errors += matches!(reason, FinishReason::Error(_)) as u64;
                finished += 1;
                live.swap_remove(i);
                continue;
            }
            if l.drop_after.is_some_and(|n| l.got.len() >= n) {
                // The client goes away mid-request.
                let mut history = l.prompt.clone();
                for t in &l.got {
                    assert_eq!(*t, next_token(&history));
                    history.push(*t);
                }
                disconnected += 1;
                live.swap_remove(i);
                continue;
            }
            i += 1;
        }
        if !progressed && let Some(l) = live.first_mut() {
            // Nothing ready: wait for the oldest request's next event.
            if let Some(e) = l.handle.recv_blocking() {
                match e {
                    Event::Token { id, .. } => l.got.push(id),
                    Event::Finished { reason, .. } => {
                        verify(l, &reason);
                        errors += matches!(reason, FinishReason::Error(_)) as u64;
                        finished += 1;
                        live.swap_remove(0);
                    }
                    Event::Admitted { .. } => {}
                }
            }
        }
    }
    drop(live);
    assert_whole(&engine);
    let c = engine.stats().counters;
    eprintln!(
        "stress: {} steps ({} overlapped), {finished} finished, {disconnected} disconnected, \
         {errors} failed by {} injected step failures, {} preemptions, {} waits for pending blocks",
        c.steps,
        c.overlapped_steps,
        failures.load(std::sync::atomic::Ordering::Relaxed),
        c.preemptions,
        c.waits_for_pending
    );
    assert!(c.preemptions > 0, "{c:?}");
    assert!(disconnected > 0 && finished > 0);
    assert!(
        c.overlapped_steps * 2 > c.steps,
        "most steps overlap under load: {c:?}"
    );
}
