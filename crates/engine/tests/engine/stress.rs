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
    Engine, Event, FinishReason, Request, RequestHandle, SessionId, StopConditions,
};
use strata_kv::TokenId;
use strata_model::SamplingParams;

use crate::fake::{self, FakeRunner, VOCAB, next_token};
use crate::fixture::assert_whole;

struct Live {
    handle: RequestHandle,
    /// What the model sees before the first generated token: a session's
    /// conversation so far, then the prompt.
    prompt: Vec<TokenId>,
    /// The index of the session this is a turn of.
    session: Option<usize>,
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
        FinishReason::Error(e) => assert!(e.contains("failed") || e.contains("context"), "{e}"),
        FinishReason::Abort => assert!(l.session.is_some(), "aborted without a disconnect"),
    }
}

/// A session as the test sees it.
struct Sess {
    id: SessionId,
    history: Vec<TokenId>,
    busy: bool,
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
    let engine = Engine::start(runner, fake::config(blocks, bs, 24, 10)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let prefixes: Vec<Vec<TokenId>> = (0..4)
        .map(|k| {
            (0..8 * k)
                .map(|_| TokenId::new(rng.random_range(3..VOCAB as u32)))
                .collect()
        })
        .collect();
    let mut live: Vec<Live> = Vec::new();
    let mut sessions: Vec<Option<Sess>> = Vec::new();
    let (mut finished, mut disconnected, mut errors) = (0u64, 0u64, 0u64);
    let (mut turns, mut destroyed) = (0u64, 0u64);
    while engine.stats().counters.steps < steps {
        // Sessions come and go, some while their turn runs.
        if rng.random_bool(0.02) && sessions.iter().flatten().count() < 4 {
            let id = engine.create_session(None).unwrap();
            sessions.push(Some(Sess {
                id,
                history: Vec::new(),
                busy: false,
            }));
        }
        if rng.random_bool(0.01) && !sessions.is_empty() {
            let k = rng.random_range(0..sessions.len());
            if let Some(sess) = sessions[k].take() {
                engine.destroy_session(&sess.id).unwrap();
                destroyed += 1;
            }
        }
        while live.len() < 16 {
            let mut prompt = prefixes[rng.random_range(0..prefixes.len())].clone();
            prompt.extend(
                (0..rng.random_range(1..24))
                    .map(|_| TokenId::new(rng.random_range(3..VOCAB as u32))),
            );
            let max_tokens = rng.random_range(1..40);
            let idle: Vec<usize> = (0..sessions.len())
                .filter(|&k| sessions[k].as_ref().is_some_and(|s| !s.busy))
                .collect();
            let turn = (!idle.is_empty() && rng.random_bool(0.3))
                .then(|| idle[rng.random_range(0..idle.len())]);
            let mut context = Vec::new();
            let mut session = None;
            if let Some(k) = turn {
                let sess = sessions[k].as_mut().unwrap();
                if sess.history.len() > 100 {
                    // Long conversations start over in a new session.
                    engine.destroy_session(&sess.id).unwrap();
                    sess.id = engine.create_session(None).unwrap();
                    sess.history.clear();
                }
                sess.busy = true;
                context = sess.history.clone();
                session = Some(sess.id.clone());
                prompt.truncate(6);
                turns += 1;
            }
            let req = Request {
                prompt: prompt.clone(),
                sampling: SamplingParams::greedy(),
                stop: StopConditions {
                    max_tokens: Some(max_tokens),
                    ..StopConditions::default()
                },
                cache_salt: rng.random_bool(0.3).then(|| b"other tenant".to_vec()),
                session,
            };
            context.extend_from_slice(&prompt);
            live.push(Live {
                handle: engine.submit(req).unwrap(),
                prompt: context,
                session: turn,
                got: Vec::new(),
                // A session turn is not disconnected here: whether the
                // turn completed just before the drop cannot be told apart
                // (its sessions end by destruction instead).
                drop_after: (turn.is_none() && rng.random_bool(0.15))
                    .then(|| rng.random_range(0..8)),
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
                end_turn(&mut sessions, l, &reason);
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
                end_turn(&mut sessions, l, &FinishReason::Abort);
                live.swap_remove(i);
                continue;
            }
            i += 1;
        }
        if !progressed && let Some(l) = live.first_mut() {
            // Nothing ready: wait for the oldest request's next event, with
            // a watchdog that dumps the engine's state if it never comes.
            let start = std::time::Instant::now();
            let next = loop {
                match l.handle.try_recv() {
                    Ok(e) => break Some(e),
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break None,
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                        assert!(
                            start.elapsed() < std::time::Duration::from_secs(20),
                            "no progress for 20 s:\n{}",
                            engine.debug_state()
                        );
                        std::thread::yield_now();
                    }
                }
            };
            if let Some(e) = next {
                match e {
                    Event::Token { id, .. } => l.got.push(id),
                    Event::Finished { reason, .. } => {
                        verify(l, &reason);
                        end_turn(&mut sessions, l, &reason);
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
    for sess in sessions.into_iter().flatten() {
        engine.destroy_session(&sess.id).unwrap();
    }
    assert!(engine.sessions().is_empty());
    assert_whole(&engine);
    let c = engine.stats().counters;
    eprintln!(
        "stress: {} steps ({} overlapped), {finished} finished, {disconnected} disconnected, \
         {errors} failed by {} injected step failures, {} preemptions, {} waits for pending blocks, \
         {turns} session turns, {destroyed} sessions destroyed",
        c.steps,
        c.overlapped_steps,
        failures.load(std::sync::atomic::Ordering::Relaxed),
        c.preemptions,
        c.waits_for_pending
    );
    assert!(c.preemptions > 0, "{c:?}");
    assert!(disconnected > 0 && finished > 0 && turns > 0 && destroyed > 0);
    assert!(
        c.overlapped_steps * 2 > c.steps,
        "most steps overlap under load: {c:?}"
    );
}

/// A session's turn ended: a completed one extends the conversation; an
/// aborted or failed one leaves it as it was. Long conversations start over.
fn end_turn(sessions: &mut [Option<Sess>], l: &Live, reason: &FinishReason) {
    let Some(sess) = l.session.and_then(|k| sessions[k].as_mut()) else {
        return;
    };
    sess.busy = false;
    if matches!(reason, FinishReason::Stop | FinishReason::Length) {
        sess.history = l.prompt.clone();
        sess.history.extend_from_slice(&l.got);
    }
}
