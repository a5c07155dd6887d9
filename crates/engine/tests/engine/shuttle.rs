//! Shuttle tests of the scheduler/executor hand-off: the engine's threads,
//! channels and locks are shuttle's in this build, so each iteration runs
//! the scheduler thread, the executor thread and the clients in a random
//! interleaving (and PCT's priority schedules), and checks every output
//! against the fake model's rule and the pool whole at the end.
//!
//! `RUSTFLAGS="--cfg shuttle" cargo test -p strata-engine --profile ci --test engine shuttle`
//! (`.ci/run` does, in its own target directory).

use shuttle::sync::Arc;
use shuttle::thread;
use strata_engine::{Engine, Event, FinishReason, Request, RequestHandle, SessionId};
use strata_kv::TokenId;
use tokio::sync::mpsc::error::TryRecvError;

use crate::fake::{self, FakeRunner, next_token};
use crate::fixture::{assert_whole, greedy};

const ITERATIONS: usize = 300;

/// A small pool: 8 blocks of 4 tokens, steps of at most 6 tokens, so
/// requests chunk their prefill, wait for blocks and get preempted.
fn engine() -> Arc<Engine> {
    Arc::new(Engine::start(FakeRunner::new(8, 4, 1), fake::config(8, 4, 6, 3)).unwrap())
}

fn tokens(seed: u32, n: usize) -> Vec<TokenId> {
    (0..n as u32)
        .map(|i| TokenId::new(3 + (seed * 7 + i * 5) % 60))
        .collect()
}

/// Events until the request finishes, polling (a blocking receive would
/// block the whole shuttle run).
fn drain(h: &mut RequestHandle, mut stop_after: Option<usize>) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        if stop_after == Some(0) {
            return out;
        }
        match h.try_recv() {
            Ok(e) => {
                let last = matches!(e, Event::Finished { .. });
                if matches!(e, Event::Token { .. }) {
                    stop_after = stop_after.map(|n| n - 1);
                }
                out.push(e);
                if last {
                    return out;
                }
            }
            Err(TryRecvError::Empty) => thread::yield_now(),
            Err(TryRecvError::Disconnected) => return out,
        }
    }
}

/// Checks the tokens of `events` against the fake model's rule after
/// `context`; returns why the request finished.
fn check(context: &[TokenId], events: &[Event]) -> Option<FinishReason> {
    let mut history = context.to_vec();
    for e in events {
        match e {
            Event::Token { id, .. } => {
                assert_eq!(*id, next_token(&history), "after {} tokens", history.len());
                history.push(*id);
            }
            Event::Finished { reason, .. } => return Some(reason.clone()),
            Event::Admitted { .. } | Event::PromptLogprobs(_) => {}
        }
    }
    None
}

/// A request finishes while the next step, planned during its last one,
/// still carries its rows; another's admission needs the blocks it
/// releases; a third disconnects mid-decode. Every kept output is exact.
fn scenario_completion_races_release() {
    let e = engine();
    let shared = tokens(1, 8);
    let mut clients = Vec::new();
    for (k, n, drop_after) in [(0u32, 3, None), (1, 2, None), (2, 4, Some(1))] {
        let e = e.clone();
        let mut prompt = shared.clone();
        prompt.extend(tokens(10 + k, 1 + k as usize));
        clients.push(thread::spawn(move || {
            let mut h = e.submit(greedy(prompt.clone(), n)).unwrap();
            let events = drain(&mut h, drop_after);
            let reason = check(&prompt, &events);
            if drop_after.is_none() {
                assert_eq!(reason, Some(FinishReason::Length), "{events:?}");
            }
        }));
    }
    for c in clients {
        c.join().unwrap();
    }
    assert_whole(&e);
}

/// Clients drop their handles while the scheduler admits them (before,
/// during or after `lookup_and_pin`), racing a request with the same
/// prompt; a later request with that prompt still gets exact tokens.
fn scenario_abort_races_admission() {
    let e = engine();
    let prompt = tokens(3, 9);
    let mut clients = Vec::new();
    for stop_after in [0usize, 1] {
        let e = e.clone();
        let prompt = prompt.clone();
        clients.push(thread::spawn(move || {
            let mut h = e.submit(greedy(prompt.clone(), 3)).unwrap();
            let events = drain(&mut h, Some(stop_after));
            check(&prompt, &events);
        }));
    }
    let mut h = e.submit(greedy(prompt.clone(), 3)).unwrap();
    let events = drain(&mut h, None);
    assert_eq!(check(&prompt, &events), Some(FinishReason::Length));
    for c in clients {
        c.join().unwrap();
    }
    let mut h = e.submit(greedy(prompt.clone(), 2)).unwrap();
    let events = drain(&mut h, None);
    assert_eq!(check(&prompt, &events), Some(FinishReason::Length));
    assert_whole(&e);
}

/// A session destroyed from another thread while its turn is waiting,
/// admitted or in a step; a second session's two turns stay exact.
fn scenario_session_destroyed_during_its_turn() {
    let e = engine();
    let doomed = e.create_session(None).unwrap();
    let killer = {
        let (e, s) = (e.clone(), doomed.clone());
        thread::spawn(move || e.destroy_session(&s).unwrap())
    };
    let victim = {
        let (e, s) = (e.clone(), doomed.clone());
        thread::spawn(move || {
            let mut req = greedy(tokens(4, 5), 3);
            req.session = Some(s);
            // Refused if the session is already gone; else any ending.
            if let Ok(mut h) = e.submit(req) {
                drain(&mut h, None);
            }
        })
    };
    let kept: SessionId = e.create_session(None).unwrap();
    let mut history = Vec::new();
    for turn in 0..2u32 {
        let prompt = tokens(20 + turn, 3);
        let mut req: Request = greedy(prompt.clone(), 2);
        req.session = Some(kept.clone());
        let mut h = e.submit(req).unwrap();
        let events = drain(&mut h, None);
        history.extend_from_slice(&prompt);
        assert_eq!(check(&history, &events), Some(FinishReason::Length));
        history.extend(events.iter().filter_map(|e| match e {
            Event::Token { id, .. } => Some(*id),
            _ => None,
        }));
    }
    killer.join().unwrap();
    victim.join().unwrap();
    e.destroy_session(&kept).unwrap();
    assert_whole(&e);
}

/// A session's turn ends at a stop token, so the step planned meanwhile
/// still writes its wasted row into the turn's blocks; the client sends the
/// next turn at once, racing that step and another client's request. The
/// next turn waits for the hand-over and continues from exactly the
/// conversation.
fn scenario_next_turn_races_the_hand_over() {
    let e = engine();
    let s = e.create_session(None).unwrap();
    let other = {
        let e = e.clone();
        thread::spawn(move || {
            let prompt = tokens(7, 6);
            let mut h = e.submit(greedy(prompt.clone(), 3)).unwrap();
            let events = drain(&mut h, None);
            assert_eq!(check(&prompt, &events), Some(FinishReason::Length));
        })
    };
    let p1 = tokens(30, 5);
    let mut h1 = p1.clone();
    let mut expected = Vec::new();
    for _ in 0..3 {
        let t = next_token(&h1);
        expected.push(t);
        h1.push(t);
    }
    // Stop at the second generated token: its row comes after.
    let mut r1: Request = greedy(p1.clone(), 6);
    r1.stop.stop_token_ids = vec![expected[1]];
    r1.session = Some(s.clone());
    let mut h = e.submit(r1).unwrap();
    let events = drain(&mut h, None);
    let mut history = p1.clone();
    assert_eq!(check(&history, &events), Some(FinishReason::Stop));
    history.extend(events.iter().filter_map(|e| match e {
        Event::Token { id, .. } => Some(*id),
        _ => None,
    }));
    let p2 = tokens(31, 3);
    let mut r2: Request = greedy(p2.clone(), 2);
    r2.session = Some(s.clone());
    let mut h = e.submit(r2).unwrap();
    let events = drain(&mut h, None);
    history.extend_from_slice(&p2);
    assert_eq!(check(&history, &events), Some(FinishReason::Length));
    other.join().unwrap();
    e.destroy_session(&s).unwrap();
    assert_whole(&e);
}

#[test]
fn shuttle_next_turn_races_the_hand_over() {
    shuttle::check_random(scenario_next_turn_races_the_hand_over, ITERATIONS);
    shuttle::check_pct(scenario_next_turn_races_the_hand_over, ITERATIONS, 3);
}

#[test]
fn shuttle_completion_races_release() {
    shuttle::check_random(scenario_completion_races_release, ITERATIONS);
    shuttle::check_pct(scenario_completion_races_release, ITERATIONS, 3);
}

#[test]
fn shuttle_abort_races_admission() {
    shuttle::check_random(scenario_abort_races_admission, ITERATIONS);
    shuttle::check_pct(scenario_abort_races_admission, ITERATIONS, 3);
}

#[test]
fn shuttle_session_destroyed_during_its_turn() {
    shuttle::check_random(scenario_session_destroyed_during_its_turn, ITERATIONS);
    shuttle::check_pct(scenario_session_destroyed_during_its_turn, ITERATIONS, 3);
}
