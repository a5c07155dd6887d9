//! The stress run: random arrivals with shared prefixes and salts, random
//! disconnects, preemption in a small pool, a fault-injecting fake model
//! (failed steps, random delays), the sanitizer on (every invariant of the
//! pool checked after every step). Every output is checked token by token
//! against the fake model's rule; every request ends exactly as its script
//! and the injected failures imply (a request fails if and only if it had a
//! row in a failed step, other than the wasted row after its stop token);
//! preemption gives up no more than the blocks rows were short of; and the
//! run ends with zero violations and a whole pool.
//!
//! Quick by default (at least 10,000 steps); `STRATA_STRESS_STEPS=1000000`
//! for the long run.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use strata_engine::{
    Engine, Event, FinishReason, Request, RequestHandle, RequestId, SessionId, StopConditions,
};
use strata_kv::TokenId;
use strata_model::{Sampled, SamplingParams};

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
    /// Its client reads nothing until this many steps have run (it pauses
    /// past MAX_UNREAD tokens, and gives way to others).
    stalled_until: u64,
    /// It asked for prompt scores; these came.
    scored: bool,
    scores: Vec<Sampled>,
}

/// Rows of failed steps, by request: each row's first position.
type FailedRows = HashMap<RequestId, Vec<usize>>;

/// Checks one finished request against the fake model's rule, and its
/// outcome against the failed steps it had rows in.
fn verify(l: &Live, reason: &FinishReason, failed: &FailedRows) {
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
    let id = l.handle.id();
    let rows = failed.get(&id).map_or(&[][..], Vec::as_slice);
    match reason {
        FinishReason::Stop => assert_eq!(l.got.last(), Some(&TokenId::new(2))),
        FinishReason::Length => assert_eq!(l.got.len(), l.max_tokens),
        FinishReason::Error(e) => assert!(
            !rows.is_empty(),
            "{id} failed ({e}) without a row in a failed step"
        ),
        FinishReason::Abort => assert!(l.session.is_some(), "aborted without a disconnect"),
        FinishReason::Timeout => panic!("{id} timed out without a deadline"),
        FinishReason::Grammar(e) => panic!("{id} has no grammar, yet: {e}"),
    }
    if l.scored && matches!(reason, FinishReason::Stop | FinishReason::Length) {
        // Every prompt token after the first, once, in order, however it
        // was chunked, preempted or recomputed; the model's pick first.
        assert_eq!(l.scores.len(), l.prompt.len() - 1, "{id}: prompt scores");
        for (i, s) in l.scores.iter().enumerate() {
            assert_eq!(
                s.token,
                l.prompt[i + 1],
                "{id}: score {i} names another token"
            );
            assert_eq!(s.top[0].0, next_token(&l.prompt[..=i]), "{id}: score {i}");
        }
    }
    if matches!(reason, FinishReason::Stop | FinishReason::Length) {
        // Only the row after the stop token (its KV, planned before the
        // stop was known) may have been in a failed step.
        for &start in rows {
            assert!(
                *reason == FinishReason::Stop && start + 1 == history.len(),
                "{id} ended {reason:?} though its row at {start} (of {} tokens) failed",
                history.len()
            );
        }
    }
}

/// The failed steps' rows so far.
fn failed_rows(calls: &std::sync::Mutex<Vec<crate::fake::FailedCall>>) -> FailedRows {
    let mut out = FailedRows::new();
    for call in calls.lock().unwrap().iter() {
        for &(id, start) in call {
            out.entry(id).or_default().push(start);
        }
    }
    out
}

/// A session as the test sees it.
struct Sess {
    id: SessionId,
    history: Vec<TokenId>,
    busy: bool,
}

#[test]
fn stress_random_traffic_keeps_every_output_exact_and_the_pool_whole() {
    stress(None);
}

/// The seed scenario, stressed: the same run with a small host tier and an
/// SSD tier whose I/O fails and stalls at random, so restores, demotions
/// and evictions race the steps (and aborts land during restores).
#[test]
fn stress_with_tiers_restores_under_in_flight_work_and_stays_exact() {
    let dir = crate::tiers::TempDir::new("stress");
    let io = crate::tiers::FlakyIo::new(0.05, 13);
    let ssd = strata_store::ssd::SsdStore::open(
        strata_store::ssd::SsdConfig {
            dir: dir.0.clone(),
            capacity: 64 * 1024,
            fingerprint: b"fake".to_vec(),
            sync: false,
        },
        std::sync::Arc::new(io),
    )
    .unwrap()
    .0;
    let t = stress(Some(strata_engine::TierStores {
        // Twelve blocks of the fake's 16 bytes (with their keys).
        host: Some(strata_store::HostStore::new(12 * 48)),
        ssd: Some(ssd),
        write_back: true,
        write_through: true,
        min_chain: 2,
        restore_policy: false,
        ssd_read_delay: std::time::Duration::ZERO,
        ssd_probe_ns: None,
    }))
    .expect("tiers were on");
    eprintln!("stress tiers: {t:?}");
    assert!(t.restored_blocks > 0 && t.restore_misses > 0, "{t:?}");
    let host = t.host.unwrap();
    assert!(host.bytes <= 12 * 48 && host.evictions > 0, "{host:?}");
    let ssd = t.ssd.unwrap();
    assert!(ssd.bytes <= 64 * 1024 && ssd.write_failures > 0, "{ssd:?}");
    // Measured on disk, not only in the store's accounting.
    let on_disk: u64 = std::fs::read_dir(dir.0.join("records"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= 64 * 1024, "{on_disk} bytes on disk");
    assert_eq!(on_disk, ssd.bytes, "the accounting is what the disk holds");
}

fn stress(tiers: Option<strata_engine::TierStores>) -> Option<strata_engine::TierStats> {
    let tiered = tiers.is_some();
    let steps: u64 = std::env::var("STRATA_STRESS_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let (blocks, bs) = (48, 4);
    let mut runner = FakeRunner::new(blocks, bs, 7);
    runner.fail_rate = 0.002;
    runner.max_delay = 2_000;
    let failures = runner.failures.clone();
    let calls = runner.failed_calls.clone();
    let engine = Engine::start_with_tiers(runner, fake::config(blocks, bs, 24, 10), tiers).unwrap();
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
            // Now and then a client that stops reading a long answer.
            let stalls = rng.random_bool(0.05);
            let mut max_tokens = if stalls {
                rng.random_range(66..90)
            } else {
                rng.random_range(1..40)
            };
            let mut stalled_until = if stalls {
                engine.stats().counters.steps + rng.random_range(50..500)
            } else {
                0
            };
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
                // A long answer on a long conversation could pass the
                // context: stalling clients are plain requests.
                max_tokens = max_tokens.min(39);
                stalled_until = 0;
            }
            let scored = turn.is_none() && rng.random_bool(0.1);
            let req = Request {
                prompt: prompt.clone(),
                sampling: SamplingParams::greedy(),
                stop: StopConditions {
                    max_tokens: Some(max_tokens),
                    ..StopConditions::default()
                },
                cache_salt: rng.random_bool(0.3).then(|| b"other tenant".to_vec()),
                session,
                deadline: None,
                prompt_logprobs: scored.then_some(1),
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
                stalled_until,
                scored,
                scores: Vec::new(),
            });
        }
        let mut progressed = false;
        let mut i = 0;
        let now = engine.stats().counters.steps;
        while i < live.len() {
            let l = &mut live[i];
            let mut done = None;
            while l.stalled_until <= now
                && let Ok(e) = l.handle.try_recv()
            {
                progressed = true;
                match e {
                    Event::Token { id, .. } => l.got.push(id),
                    Event::Finished { reason, .. } => {
                        done = Some(reason);
                        break;
                    }
                    Event::Admitted { .. } => {}
                    Event::PromptLogprobs(v) => l.scores.extend(v),
                }
            }
            if let Some(reason) = done {
                verify(l, &reason, &failed_rows(&calls));
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
                        verify(l, &reason, &failed_rows(&calls));
                        end_turn(&mut sessions, l, &reason);
                        errors += matches!(reason, FinishReason::Error(_)) as u64;
                        finished += 1;
                        live.swap_remove(0);
                    }
                    Event::Admitted { .. } => {}
                    Event::PromptLogprobs(v) => l.scores.extend(v),
                }
            }
        }
    }
    // Every request still live finishes once its client reads (none is
    // lost: a request that never ends would hang here, so the watchdog).
    for mut l in live {
        let start = std::time::Instant::now();
        let reason = loop {
            match l.handle.try_recv() {
                Ok(Event::Token { id, .. }) => l.got.push(id),
                Ok(Event::Finished { reason, .. }) => break reason,
                Ok(Event::PromptLogprobs(v)) => l.scores.extend(v),
                Ok(Event::Admitted { .. }) => {}
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    panic!("{} ended without finishing", l.handle.id())
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                    assert!(
                        start.elapsed() < std::time::Duration::from_secs(20),
                        "{} never finished:\n{}",
                        l.handle.id(),
                        engine.debug_state()
                    );
                    std::thread::yield_now();
                }
            }
        };
        if l.drop_after.is_none() {
            verify(&l, &reason, &failed_rows(&calls));
        }
        end_turn(&mut sessions, &l, &reason);
    }
    for sess in sessions.into_iter().flatten() {
        engine.destroy_session(&sess.id).unwrap();
    }
    assert!(engine.sessions().is_empty());
    assert_whole(&engine);
    let c = engine.stats().counters;
    let pool = engine.stats().pool;
    eprintln!(
        "stress: {} steps ({} overlapped), {} requests: {finished} finished, {disconnected} disconnected, \
         {errors} failed by {} injected step failures; {} preemptions ({:.1} per 1,000 steps), \
         {} sessions unpinned, {} rows waited a step for blocks, {} waits for pending blocks; \
         hit rate {:.1}% of prompt tokens at admission ({:.1}% of looked-up tokens); \
         {turns} session turns, {destroyed} sessions destroyed",
        c.steps,
        c.overlapped_steps,
        finished + disconnected,
        failures.load(std::sync::atomic::Ordering::Relaxed),
        c.preemptions,
        c.preemptions as f64 * 1000.0 / c.steps as f64,
        c.sessions_unpinned,
        c.waits_for_blocks,
        c.waits_for_pending,
        100.0 * c.cached_tokens as f64 / c.prompt_tokens.max(1) as f64,
        100.0 * pool.hit_tokens as f64 / pool.query_tokens.max(1) as f64,
    );
    assert!(c.preemptions > 0, "{c:?}");
    // No cascade and no priority inversion: a preemption happens only when
    // the pool itself shows too few blocks free or coming back with the
    // step in flight, and only a newer request gives way.
    assert_eq!(c.needless_preemptions, 0, "{c:?}");
    assert_eq!(c.broken_promises, 0, "{c:?}");
    assert_eq!(c.priority_inversions, 0, "{c:?}");
    assert_eq!(c.handovers_refused, 0, "{c:?}");
    // The rate that follows for this workload: a preemption happens only
    // when a decode row crosses into a new block with none free or coming
    // back, and then gives up exactly one victim (a decode row is short of
    // one block, and every victim holds at least one block of its own). A
    // request crosses a block boundary at most once per 4 of its decode
    // rows and at most 10 run at once, so at most 10 / 4 crossings happen
    // per step: 2,500 preemptions per 1,000 steps is the ceiling the policy
    // allows here (the no-cascade check above is the sharp one). Measured:
    // about 28 per 1,000 steps, 63 before the fix.
    assert!(
        c.preemptions * 4 <= c.steps * 10,
        "{} preemptions in {} steps",
        c.preemptions,
        c.steps
    );
    assert!(disconnected > 0 && finished > 0 && turns > 0 && destroyed > 0);
    assert!(c.gave_way > 0, "no paused request gave way: {c:?}");
    assert!(
        c.overlapped_steps * 2 > c.steps,
        "most steps overlap under load: {c:?}"
    );
    // The tiers are whole too: their accounting, their bounds, no pin left.
    engine.check_tiers().unwrap();
    assert_eq!(engine.cache().lock().tiers().pins(), 0);
    tiered.then(|| engine.tier_stats())
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
