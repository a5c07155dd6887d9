//! Requests through the engine: exact outputs, prefix hits, aborts,
//! preemption, rejection, overlap.

use strata_engine::{Engine, EngineError, Event, FinishReason, Request, StopConditions};
use strata_kv::TokenId;

use crate::fake::{self, FakeRunner};
use crate::fixture::{
    Setup, assert_whole, engine, greedy, model, outcome, prompt, solo, tokenizer,
};

#[test]
fn a_request_yields_exactly_the_solo_run_tokens() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let p = prompt(0, 23, 1);
    let out = outcome(e.submit(greedy(p.clone(), 12)).unwrap().collect_blocking());
    assert_eq!(out.tokens, solo(&m, &p, 12));
    assert_eq!(out.reason, FinishReason::Length);
    assert_eq!(out.usage.prompt_tokens, 23);
    assert_whole(&e);
    // No row is computed past max_tokens: the prompt, then every sampled
    // token but the last.
    assert_eq!(e.stats().counters.rows, 23 + 12 - 1);
}

#[test]
fn concurrent_requests_each_match_their_solo_run() {
    let m = model(7);
    // A small step budget, so prefill is chunked and mixes with decode.
    let e = engine(
        &m,
        Setup {
            step_tokens: 16,
            ..Setup::default()
        },
    );
    let prompts: Vec<Vec<TokenId>> = (0..8).map(|i| prompt(12, 20 + 3 * i, i as u32)).collect();
    let mut handles: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(greedy(p.clone(), 10)).unwrap())
        .collect();
    for (h, p) in handles.iter_mut().zip(&prompts) {
        let out = outcome(h.collect_blocking());
        assert_eq!(out.tokens, solo(&m, p, 10), "prompt of {}", p.len());
    }
    let c = e.stats().counters;
    assert!(
        c.overlapped_steps > 0,
        "no step was planned during another: {c:?}"
    );
    assert_whole(&e);
}

#[test]
fn an_identical_second_request_hits_the_prefix_cache() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let p = prompt(0, 30, 5);
    let first = outcome(e.submit(greedy(p.clone(), 4)).unwrap().collect_blocking());
    let second = outcome(e.submit(greedy(p.clone(), 4)).unwrap().collect_blocking());
    assert_eq!(first.cached, 0);
    // Every full block but the one holding the last prompt token.
    assert_eq!(second.cached, 28);
    assert_eq!(second.usage.cached_tokens, 28);
    assert_eq!(first.tokens, second.tokens);
    // Another salt shares nothing.
    let mut salted = greedy(p, 4);
    salted.cache_salt = Some(b"tenant-b".to_vec());
    let third = outcome(e.submit(salted).unwrap().collect_blocking());
    assert_eq!(third.cached, 0);
    assert_eq!(third.tokens, first.tokens);
    assert_whole(&e);
}

#[test]
fn dropping_the_handle_aborts_and_the_blocks_come_back() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let mut h = e.submit(greedy(prompt(0, 40, 9), 400)).unwrap();
    let mut tokens = 0;
    while tokens < 3 {
        match h.recv_blocking() {
            Some(Event::Token { .. }) => tokens += 1,
            Some(Event::Finished { reason, .. }) => panic!("finished early: {reason:?}"),
            Some(Event::Admitted { .. } | Event::PromptLogprobs(_)) => {}
            None => panic!("the engine dropped the request"),
        }
    }
    drop(h);
    assert_whole(&e);
    assert_eq!(e.stats().counters.aborted, 1);
}

#[test]
fn preemption_under_a_small_pool_keeps_every_output_exact() {
    let m = model(7);
    // 16 blocks of 4 tokens; each request needs 8 blocks by its end.
    let e = engine(
        &m,
        Setup {
            blocks: 16,
            block_size: 4,
            step_tokens: 32,
            max_running: 8,
            ..Setup::default()
        },
    );
    let prompts: Vec<Vec<TokenId>> = (0..4).map(|i| prompt(0, 10 + i, 40 + i as u32)).collect();
    let mut handles: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(greedy(p.clone(), 20)).unwrap())
        .collect();
    for (h, p) in handles.iter_mut().zip(&prompts) {
        let out = outcome(h.collect_blocking());
        assert_eq!(out.tokens, solo(&m, p, 20));
    }
    assert!(e.stats().counters.preemptions > 0, "{:?}", e.stats());
    assert_whole(&e);
}

#[test]
fn stop_tokens_end_a_request_but_not_before_min_tokens() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let p = prompt(0, 17, 3);
    let free = solo(&m, &p, 6);
    // Stop at the third token of the free run.
    let mut r = greedy(p.clone(), 6);
    r.stop.stop_token_ids = vec![free[2]];
    let out = outcome(e.submit(r).unwrap().collect_blocking());
    let first = free.iter().position(|t| *t == free[2]).unwrap();
    assert_eq!(out.tokens, free[..=first]);
    assert_eq!(out.reason, FinishReason::Stop);
    // With min_tokens, the stop token cannot be sampled before it.
    let mut r = greedy(p, 6);
    r.stop = StopConditions {
        max_tokens: Some(6),
        stop_token_ids: vec![free[0]],
        ignore_eos: true,
        min_tokens: 4,
        stop_strings: Vec::new(),
    };
    let out = outcome(e.submit(r).unwrap().collect_blocking());
    assert!(
        out.tokens[..3].iter().all(|t| *t != free[0]),
        "{:?}",
        out.tokens
    );
    assert_whole(&e);
}

/// The text deltas add up to the decoded tokens; a stop string ends the
/// request at the token that completes it, and its text stops just before
/// the stop string.
#[test]
fn stop_strings_cut_the_text_before_them() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let tok = tokenizer();
    let p = prompt(0, 9, 4);
    let run = |r: Request| {
        let events = e.submit(r).unwrap().collect_blocking();
        let text: String = events
            .iter()
            .filter_map(|ev| match ev {
                Event::Token { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        (outcome(events), text)
    };
    let (free, free_text) = run(greedy(p.clone(), 24));
    assert_eq!(free_text, tok.decode(&free.tokens, false));
    // A stop string from the middle of the free run's text.
    let chars: Vec<char> = free_text.chars().collect();
    assert!(chars.len() > 8, "{free_text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let at = free_text.find(&stop).unwrap();
    let mut r = greedy(p, 24);
    r.stop.stop_strings = vec![stop.clone(), String::new()];
    let (out, text) = run(r);
    assert_eq!(out.reason, FinishReason::Stop, "{stop:?} in {free_text:?}");
    assert_eq!(text, free_text[..at], "{stop:?} in {free_text:?}");
    // It stopped at the token that completed the stop string.
    let n = out.tokens.len();
    assert_eq!(out.tokens, free.tokens[..n]);
    assert!(tok.decode(&out.tokens, false).contains(&stop));
    assert!(!tok.decode(&out.tokens[..n - 1], false).contains(&stop));
    assert_whole(&e);
    // An engine without a tokenizer refuses stop strings.
    let fake = Engine::start(FakeRunner::new(8, 4, 1), fake::config(8, 4, 8, 2)).unwrap();
    let mut r = greedy(strata_testkit::tokens([3, 4, 5]), 2);
    r.stop.stop_strings = vec!["x".into()];
    assert_eq!(fake.submit(r).unwrap_err(), EngineError::NoTokenizer);
}

#[test]
fn requests_that_could_never_fit_are_refused_up_front() {
    let m = model(7);
    let e = engine(
        &m,
        Setup {
            blocks: 9,
            block_size: 4,
            ..Setup::default()
        },
    );
    // The context is clamped to what the arena holds: 8 blocks of 4.
    assert_eq!(e.context(), 32);
    assert_eq!(
        e.submit(greedy(prompt(0, 30, 1), 3)).unwrap_err(),
        EngineError::ContextExceeded {
            context: 32,
            prompt: 30,
            max_tokens: 3
        }
    );
    assert_eq!(
        e.submit(greedy(Vec::new(), 3)).unwrap_err(),
        EngineError::EmptyPrompt
    );
    assert_eq!(
        e.submit(greedy(vec![TokenId::new(100_000)], 3))
            .unwrap_err(),
        EngineError::BadToken(100_000)
    );
    // The largest request that fits runs to its end.
    let out = outcome(
        e.submit(greedy(prompt(0, 28, 1), 4))
            .unwrap()
            .collect_blocking(),
    );
    assert_eq!(out.tokens.len(), 4);
    assert_whole(&e);
}

/// A scored prompt: every token after the first gets its log-probability
/// and alternatives, exactly as one forward pass over the whole prompt
/// gives them (in chunks of rows, beside other requests), before the first
/// token; a cached copy of the prompt is not used (it has no logits), and
/// the output is unchanged.
#[test]
fn a_scored_prompt_gets_every_tokens_logprob_as_one_pass_gives_it() {
    let m = model(7);
    let e = engine(
        &m,
        Setup {
            step_tokens: 512,
            ..Setup::default()
        },
    );
    let p = prompt(0, 150, 3);
    let plain = outcome(e.submit(greedy(p.clone(), 5)).unwrap().collect_blocking());
    let others: Vec<_> = (0..3)
        .map(|i| e.submit(greedy(prompt(0, 40, 10 + i), 20)).unwrap())
        .collect();
    let mut scored = greedy(p.clone(), 5);
    scored.prompt_logprobs = Some(3);
    let out = outcome(e.submit(scored).unwrap().collect_blocking());
    assert_eq!(out.tokens, plain.tokens);
    assert_eq!(out.cached, 0, "a scored prompt takes no prefix hits");
    assert_eq!(out.scores.len(), p.len() - 1);
    scores_are_one_pass(&m, &p, &out.scores, 3);
    for mut h in others {
        outcome(h.collect_blocking());
    }
    assert_whole(&e);
}

#[test]
fn a_scored_session_turn_is_refused() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let sid = e.create_session(None).unwrap();
    let mut r = greedy(prompt(0, 8, 1), 2);
    r.session = Some(sid);
    r.prompt_logprobs = Some(0);
    assert!(matches!(e.submit(r), Err(EngineError::ScoredTurn)));
    assert_whole(&e);
}

/// `abort` keeps the handle: the request ends `Abort` and says so; one
/// that completed before the abort reached the engine says how it really
/// ended (the server records a session's turn by that).
#[test]
fn an_abort_that_keeps_the_handle_tells_how_the_request_ended() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let mut h = e.submit(greedy(prompt(0, 20, 2), 400)).unwrap();
    let mut tokens = 0;
    while tokens < 3 {
        if let Some(Event::Token { .. }) = h.recv_blocking() {
            tokens += 1;
        }
    }
    h.abort();
    let rest = h.collect_blocking();
    let more = rest
        .iter()
        .filter(|e| matches!(e, Event::Token { .. }))
        .count();
    match rest.last() {
        Some(Event::Finished { reason, usage }) => {
            assert_eq!(*reason, FinishReason::Abort);
            assert_eq!(usage.completion_tokens, tokens + more);
            assert!(tokens + more < 400);
        }
        e => panic!("ended with {e:?}"),
    }

    let sid = e.create_session(None).unwrap();
    let mut turn = greedy(prompt(0, 9, 3), 3);
    turn.session = Some(sid.clone());
    let h = e.submit(turn).unwrap();
    e.wait_idle();
    h.abort();
    let mut h = h;
    let out = outcome(h.collect_blocking());
    assert_eq!(out.reason, FinishReason::Length, "it had completed");
    // The session kept it: the next turn continues after its 12 tokens.
    let mut next = greedy(prompt(0, 2, 4), 1);
    next.session = Some(sid.clone());
    let out = outcome(e.submit(next).unwrap().collect_blocking());
    assert_eq!(out.usage.prompt_tokens, 12 + 2);
    e.destroy_session(&sid).unwrap();
    assert_whole(&e);
}

/// A scored prompt preempted halfway through its prefill (an older request
/// grows into its blocks) is recomputed from the start, but each position
/// is scored once: the scores still equal one pass over the prompt.
#[test]
fn a_scored_prompt_preempted_mid_prefill_is_scored_once() {
    let m = model(7);
    let e = engine(
        &m,
        Setup {
            blocks: 30,
            step_tokens: 4,
            ..Setup::default()
        },
    );
    let older = e.submit(greedy(prompt(0, 56, 8), 56)).unwrap();
    let p = prompt(0, 52, 9);
    let mut scored = greedy(p.clone(), 2);
    scored.prompt_logprobs = Some(1);
    let mut h = e.submit(scored).unwrap();
    let out = outcome(h.collect_blocking());
    let mut older = older;
    outcome(older.collect_blocking());
    assert!(e.stats().counters.preemptions > 0, "never preempted");
    assert_eq!(out.scores.len(), p.len() - 1, "each position scored once");
    scores_are_one_pass(&m, &p, &out.scores, 1);
    assert_whole(&e);
}

/// `scores` are, bit for bit, what one forward pass over `p` gives each of
/// its tokens after the first, with `top` alternatives.
fn scores_are_one_pass(
    m: &strata_model::LlamaModel,
    p: &[TokenId],
    scores: &[strata_model::Sampled],
    top: usize,
) {
    let bs = 4;
    let blocks = p.len().div_ceil(bs);
    let mut arena = strata_store::Arena::new(m.arena_layout(blocks, bs)).unwrap();
    let table: Vec<strata_kv::BlockId> = (0..blocks as u32).map(strata_kv::BlockId::new).collect();
    let input = strata_model::SeqInput {
        tokens: p,
        start: 0,
        block_table: &table,
        logits: strata_model::Logits::All,
    };
    let all = m.forward(&mut arena, &[input]).unwrap().remove(0);
    let vocab = m.config().vocab;
    assert_eq!(scores.len(), p.len() - 1, "each position scored once");
    for (i, s) in scores.iter().enumerate() {
        let want = strata_model::score(&all[i * vocab..(i + 1) * vocab], p[i + 1], top);
        assert_eq!(s, &want, "score of prompt token {}", i + 1);
        assert_eq!(s.top.len(), top);
    }
}
