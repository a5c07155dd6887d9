//! Failed steps, through the engine, with the executor held at a gate: what
//! a failed step wrote is never kept by a session, never read again and
//! never published, every request with a row in it fails and no other, and
//! everything that completed cleanly stays cached.

use strata_engine::{Event, FinishReason};
use strata_kv::TokenId;

use crate::fake::Gate;
use crate::held::Harness;
use crate::regressions::{expected, request, stopping, tokens};

/// A session turn ends at a stop token; the step planned meanwhile still
/// writes the stop token's row into the turn's tail block, and that step
/// fails. The next turn must not run on that block: it recomputes the tail
/// and answers exactly as the conversation implies.
fn session_turn_after_a_failed_wasted_row(prompt_len: usize) {
    let h = Harness::new(24, 4);
    let s = h.engine.create_session(None).unwrap();
    let p1 = tokens(11, prompt_len);
    let (mut r1, e1) = stopping(&p1, 3);
    r1.session = Some(s.clone());
    let mut t1 = h.engine.submit(r1).unwrap();
    let (got, reason) = h.run_until_done(&mut t1);
    assert_eq!((got.clone(), reason), (e1.clone(), FinishReason::Stop));
    // The step with the wasted row (the stop token's KV) is held: fail it.
    assert_eq!(h.held(), 1, "the wasted row is in the step after the stop");
    h.release_with(Gate::Fail);
    let mut history = p1.clone();
    history.extend_from_slice(&got);
    let p2 = tokens(12, 5);
    let mut r2 = request(p2.clone(), 6);
    r2.session = Some(s.clone());
    let mut t2 = h.engine.submit(r2).unwrap();
    let (got2, reason2) = h.run_until_done(&mut t2);
    history.extend_from_slice(&p2);
    assert_eq!(reason2, FinishReason::Length, "the next turn failed");
    assert_eq!(
        got2,
        expected(&history, 6),
        "the next turn ran on a failed step's KV"
    );
    h.engine.destroy_session(&s).unwrap();
    assert_eq!(
        h.engine.stats().violations,
        0,
        "{:?}",
        h.engine.last_violation()
    );
    h.finish();
}

/// Prompt lengths whose stop token's slot (the wasted row's write) is, or
/// is not, the last slot of its block.
fn prompt_lens(fills_block: bool) -> Vec<usize> {
    (4..40)
        .filter(|&len| {
            let (_, e) = stopping(&tokens(11, len), 3);
            ((len + e.len() - 1) % 4 == 3) == fills_block
        })
        .take(2)
        .collect()
}

#[test]
fn a_session_drops_a_partial_tail_a_failed_step_wrote() {
    let lens = prompt_lens(false);
    assert_eq!(lens.len(), 2);
    for len in lens {
        session_turn_after_a_failed_wasted_row(len);
    }
}

#[test]
fn a_session_drops_a_full_tail_a_failed_step_wrote() {
    let lens = prompt_lens(true);
    assert_eq!(lens.len(), 2);
    for len in lens {
        session_turn_after_a_failed_wasted_row(len);
    }
}

/// A step whose model returns fewer logits than it has rows to sample is a
/// failed step: every request in it fails (none may sample from another
/// row's logits or keep the previous step's token), and nothing it wrote is
/// published.
#[test]
fn a_step_with_too_few_logits_fails_every_row() {
    let h = Harness::new(32, 4);
    let pa = tokens(21, 9);
    let pb = tokens(22, 10);
    let mut a = h.engine.submit(request(pa.clone(), 8)).unwrap();
    h.held();
    let mut b = h.engine.submit(request(pb.clone(), 8)).unwrap();
    h.release(); // a's prefill
    h.held();
    h.release(); // a decodes, b's prefill
    h.held();
    h.release_with(Gate::FewerLogits); // both decode: one logits row short
    let drain = |r: &mut strata_engine::RequestHandle, h: &Harness| loop {
        let mut got = Vec::new();
        let mut reason = None;
        while let Ok(e) = r.try_recv() {
            match e {
                Event::Token { id, .. } => got.push(id),
                Event::Finished { reason: x, .. } => reason = Some(x),
                Event::Admitted { .. } | Event::PromptLogprobs(_) => {}
            }
        }
        if let Some(x) = reason {
            return (got, x);
        }
        h.held();
        h.release();
    };
    let (ga, ra) = drain(&mut a, &h);
    let (gb, rb) = drain(&mut b, &h);
    assert!(
        matches!(ra, FinishReason::Error(_)),
        "a: {ra:?} after {ga:?}"
    );
    assert!(
        matches!(rb, FinishReason::Error(_)),
        "b: {rb:?} after {gb:?}"
    );
    // What the requests did get is exact.
    assert_eq!(ga, expected(&pa, ga.len()));
    assert_eq!(gb, expected(&pb, gb.len()));
    // The same prompts again: exact, and hitting only clean blocks.
    let mut a2 = h.engine.submit(request(pa.clone(), 8)).unwrap();
    let (ga2, _) = h.run_until_done(&mut a2);
    assert_eq!(ga2, expected(&pa, 8));
    assert_eq!(
        h.engine.stats().violations,
        0,
        "{:?}",
        h.engine.last_violation()
    );
    h.finish();
}

/// The cached tokens a fresh request for `prompt` reports.
fn cached_tokens(h: &Harness, prompt: &[TokenId]) -> (usize, Vec<TokenId>) {
    let mut r = h.engine.submit(request(prompt.to_vec(), 2)).unwrap();
    let mut cached = None;
    let mut got = Vec::new();
    loop {
        while let Ok(e) = r.try_recv() {
            match e {
                Event::Admitted { cached_tokens } => cached = Some(cached_tokens),
                Event::PromptLogprobs(_) => panic!("prompt scores were not asked for"),
                Event::Token { id, .. } => got.push(id),
                Event::Finished { reason, .. } => {
                    assert_eq!(reason, FinishReason::Length);
                    return (cached.unwrap(), got);
                }
            }
        }
        h.held();
        h.release();
    }
}

/// A long prompt is prefilled in chunks of 64 tokens, one per step; the
/// step of its second chunk fails while the third, planned on top of it,
/// is already on its way. The first chunk completed cleanly and stays
/// cached; nothing the later steps wrote may take the chain's hashes, or a
/// fresh request computing the prompt again could not publish it and every
/// later request would miss from there.
#[test]
fn after_a_failed_prefill_step_every_clean_block_is_hit() {
    let h = Harness::new(160, 4);
    let prompt = tokens(31, 200);
    let mut r = h.engine.submit(request(prompt.clone(), 4)).unwrap();
    h.held();
    h.release(); // chunk 1: completes
    h.held();
    h.release_with(Gate::Fail); // chunk 2: fails
    let (_, reason) = h.run_until_done(&mut r); // chunk 3 runs, then the request fails
    assert!(matches!(reason, FinishReason::Error(_)), "{reason:?}");
    let (cached, got) = cached_tokens(&h, &prompt);
    assert_eq!(cached, 64, "exactly the first chunk completed cleanly");
    assert_eq!(got, expected(&prompt, 2));
    // That request recomputed the rest and published it: a third one hits
    // everything but the last token's block.
    let (cached, got) = cached_tokens(&h, &prompt);
    assert_eq!(cached, 196, "the recomputed chain was not published");
    assert_eq!(got, expected(&prompt, 2));
    assert_eq!(
        h.engine.stats().violations,
        0,
        "{:?}",
        h.engine.last_violation()
    );
    h.finish();
}

/// The client goes away while the second chunk's step runs; that step and
/// the third chunk's, planned before the abort was seen, complete: their KV
/// is valid and a fresh request hits all of it.
#[test]
fn after_an_abort_mid_prefill_every_completed_block_is_hit() {
    let h = Harness::new(160, 4);
    let prompt = tokens(32, 200);
    let r = h.engine.submit(request(prompt.clone(), 4)).unwrap();
    h.held();
    h.release(); // chunk 1
    h.held(); // chunk 2 runs; chunk 3 is planned meanwhile
    drop(r);
    h.release();
    h.held();
    h.release(); // chunk 3
    let (cached, got) = cached_tokens(&h, &prompt);
    assert_eq!(cached, 192, "chunks 1 to 3 completed cleanly");
    assert_eq!(got, expected(&prompt, 2));
    h.finish();
}

/// The executor thread dies (a panic in the model): every request fails at
/// once with a clear error instead of waiting forever for a step that will
/// never complete, the engine says it is no longer alive (the server's
/// `/health` reads this), and new requests are refused.
#[test]
fn an_executor_that_dies_fails_every_request_and_the_engine_says_so() {
    let h = Harness::new(32, 4);
    let mut a = h.engine.submit(request(tokens(31, 9), 8)).unwrap();
    h.held();
    h.release(); // a's prefill
    let mut b = h.engine.submit(request(tokens(32, 9), 8)).unwrap();
    h.held();
    assert!(h.engine.is_alive());
    h.release_only(Gate::Panic);
    for r in [&mut a, &mut b] {
        match h.finished(r) {
            FinishReason::Error(e) => assert!(e.contains("executor"), "{e}"),
            other => panic!("a request outlived the executor: {other:?}"),
        }
    }
    let start = std::time::Instant::now();
    while h.engine.is_alive() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "still alive"
        );
        std::thread::yield_now();
    }
    assert!(matches!(
        h.engine.submit(request(tokens(33, 5), 2)),
        Err(strata_engine::EngineError::Stopped)
    ));
}

/// Every running slot held by a request paused for its client (who reads
/// nothing) while another waits: the paused one gives its slot up (before
/// the fix the waiting request waited until the paused one's deadline),
/// the engine then goes quiet (no empty steps: before that fix each
/// completed step was followed by an empty one for ever), and once its
/// client reads, the paused request resumes and its output is exact.
#[test]
fn a_request_paused_for_its_client_gives_its_slot_to_a_waiting_one() {
    use std::time::{Duration, Instant};
    let engine = strata_engine::Engine::start(
        crate::fake::FakeRunner::new(256, 4, 1),
        crate::fake::config(256, 4, 64, 1),
    )
    .unwrap();
    let (p1, p2) = (tokens(41, 5), tokens(42, 5));
    let mut unread = engine.submit(request(p1.clone(), 400)).unwrap();
    let mut waiting = engine.submit(request(p2.clone(), 4)).unwrap();
    let start = Instant::now();
    let got = tokens_within(&mut waiting, "the waiting request never ran");
    assert_eq!(got, expected(&p2, 4));
    assert!(engine.stats().counters.gave_way >= 1);
    // Quiet while the only request left waits for its client.
    let mut rows = engine.stats().counters.rows;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = engine.stats().counters.rows;
        if now == rows {
            break;
        }
        rows = now;
        assert!(start.elapsed() < Duration::from_secs(20), "never paused");
    }
    let steps = engine.stats().counters.steps;
    std::thread::sleep(Duration::from_millis(300));
    let more = engine.stats().counters.steps - steps;
    assert!(more <= 1, "{more} steps while every request waits");
    let out = tokens_within(&mut unread, "the paused request never resumed");
    assert_eq!(out, expected(&p1, 400), "resumed exactly where it paused");
    crate::fixture::assert_whole(&engine);
}

/// The tokens of a request that ends `Length` within 20 s (polled: a
/// regression fails with `what`, never hangs).
fn tokens_within(h: &mut strata_engine::RequestHandle, what: &str) -> Vec<TokenId> {
    use std::time::{Duration, Instant};
    let start = Instant::now();
    let mut got = Vec::new();
    loop {
        match h.try_recv() {
            Ok(Event::Token { id, .. }) => got.push(id),
            Ok(Event::Finished { reason, .. }) => {
                assert_eq!(reason, FinishReason::Length);
                return got;
            }
            Ok(_) => {}
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(20), "{what} ({e:?})");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
