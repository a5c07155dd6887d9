//! The four bugs of design.md, each reproduced through the engine with the
//! interleaving that caused it (the executor held at a gate so the test
//! decides what happens while a step is in flight). Bug 3 (ExecuTorch
//! sessions) is in `sessions.rs`: `a_session_is_refused_by_another_model_
//! and_after_destruction` and `one_turn_at_a_time_and_destroying_a_session_
//! mid_turn_is_safe`.

use strata_engine::{FinishReason, Request, StopConditions};
use strata_kv::TokenId;
use strata_model::SamplingParams;

use crate::fake::{VOCAB, next_token};
use crate::held::Harness;

pub(crate) fn request(prompt: Vec<TokenId>, max_tokens: usize) -> Request {
    Request {
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..StopConditions::default()
        },
        cache_salt: None,
        session: None,
        deadline: None,
        prompt_logprobs: None,
    }
}

/// A request that ends at a stop token, as at an end-of-sequence token:
/// unlike `max_tokens`, the engine cannot know in advance, so the step
/// planned while its last token is sampled still carries its (wasted) row.
/// Returns the request and the tokens it must produce (about `n`).
pub(crate) fn stopping(prompt: &[TokenId], n: usize) -> (Request, Vec<TokenId>) {
    let exp = expected(prompt, n + 4);
    let stop = exp[n - 1];
    let first = exp.iter().position(|t| *t == stop).unwrap_or(n - 1);
    let mut r = request(prompt.to_vec(), n + 4);
    r.stop.stop_token_ids = vec![stop];
    (r, exp[..=first].to_vec())
}

pub(crate) fn tokens(seed: u32, n: usize) -> Vec<TokenId> {
    (0..n as u32)
        .map(|i| TokenId::new(3 + (i * 7 + seed * 13) % (VOCAB as u32 - 3)))
        .collect()
}

pub(crate) fn expected(prompt: &[TokenId], n: usize) -> Vec<TokenId> {
    let mut h = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = next_token(&h);
        out.push(t);
        h.push(t);
    }
    out
}

/// Bug 1 (MLX): a request ends while the step after it, which still has
/// its row, is in flight; its blocks must not be handed to anyone until
/// that step completes, even with another request waiting for blocks.
#[test]
fn mlx_blocks_of_a_finished_request_wait_for_the_step_still_using_them() {
    let h = Harness::new(12, 4);
    let a_prompt = tokens(1, 9);
    let (a_req, a_expected) = stopping(&a_prompt, 3);
    let mut a = h.engine.submit(a_req).unwrap();
    let (got, reason) = h.run_until_done(&mut a);
    assert_eq!((got, reason), (a_expected, FinishReason::Stop));
    // The step planned while A's last sample was computed carries A's
    // wasted row, and it is held now: A's blocks are quarantined, not free.
    h.held();
    let s = h.engine.stats().pool;
    assert_eq!(
        s.quarantined, 3,
        "A's 3 blocks wait for the held step: {s:?}"
    );
    assert_eq!(s.free, 9);
    // B needs 10 blocks: it cannot have A's while the step is held.
    let b_prompt = tokens(2, 38);
    let mut b = h.engine.submit(request(b_prompt.clone(), 2)).unwrap();
    assert!(b.try_recv().is_err(), "B was admitted onto A's blocks");
    assert_eq!(h.engine.stats().pool.quarantined, 3);
    h.release();
    let (got, _) = h.run_until_done(&mut b);
    assert_eq!(got, expected(&b_prompt, 2));
    assert_eq!(h.engine.stats().violations, 0);
    h.finish();
}

/// Bug 2 (oMLX): two requests finish in the same step, then another in the
/// next; each one's blocks wait for the last step that used them, not the
/// first completion; a cache clear while steps are in flight drops only
/// free blocks.
#[test]
fn omlx_each_finished_request_waits_for_its_own_last_step() {
    let h = Harness::new(24, 4);
    let pa = tokens(3, 6);
    let pb = tokens(4, 7);
    let pc = tokens(5, 5);
    let (ra, ea) = stopping(&pa, 2);
    let (rb, eb) = stopping(&pb, 2);
    let mut a = h.engine.submit(ra).unwrap();
    let mut b = h.engine.submit(rb).unwrap();
    let mut c = h.engine.submit(request(pc.clone(), 3)).unwrap();
    let (ga, _) = h.run_until_done(&mut a);
    let (gb, _) = h.run_until_done(&mut b);
    assert_eq!((ga, gb), (ea, eb));
    // A and B have ended; C is still running, and a step is held in
    // flight. Whatever A and B left that a step in flight still uses is
    // quarantined (each block for its own last step: the pool checks it),
    // never free.
    h.held();
    let s = h.engine.stats().pool;
    assert!(s.quarantined > 0 && s.issued > s.completed, "{s:?}");
    h.engine.cache().lock().check_invariants().unwrap();
    // A cache clear now may drop only free blocks.
    let dropped = h.engine.clear_prefix_cache();
    let after = h.engine.stats().pool;
    assert_eq!((after.quarantined, after.owned), (s.quarantined, s.owned));
    assert!(dropped <= s.free);
    h.release();
    let (gc, _) = h.run_until_done(&mut c);
    assert_eq!(gc, expected(&pc, 3));
    assert_eq!(h.engine.stats().violations, 0);
    h.finish();
}

/// Bug 4 (vLLM token bleed): a request whose prefix is cached cannot get
/// all its blocks; others' admissions then take the cached blocks. Its pins
/// were dropped when it waited, so nothing leaks, and when it runs its
/// output is exact (it recomputes what was evicted). An abort right after
/// admission leaks nothing either.
#[test]
fn vllm_a_prefix_hit_under_pressure_never_reads_someone_elses_blocks() {
    let h = Harness::new(16, 4);
    let shared = tokens(6, 24);
    let mut first = h.engine.submit(request(shared.clone(), 1)).unwrap();
    h.run_until_done(&mut first);
    // A long runner keeps most of the pool busy.
    let pl = tokens(7, 30);
    let mut long = h.engine.submit(request(pl.clone(), 6)).unwrap();
    h.held();
    h.release();
    // The hitting request waits (not enough blocks beside the runner)...
    let mut hit_prompt = shared.clone();
    hit_prompt.extend(tokens(8, 9));
    let mut hitter = h.engine.submit(request(hit_prompt.clone(), 2)).unwrap();
    // ...and an aborted one is dropped right after submitting.
    drop(h.engine.submit(request(tokens(9, 12), 5)).unwrap());
    let (gl, _) = h.run_until_done(&mut long);
    assert_eq!(gl, expected(&pl, 6));
    let (gh, reason) = h.run_until_done(&mut hitter);
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(gh, expected(&hit_prompt, 2));
    assert_eq!(h.engine.stats().violations, 0);
    h.finish();
}
