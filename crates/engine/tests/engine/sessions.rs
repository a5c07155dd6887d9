//! Sessions: turns that prefill only their new tokens, isolation between
//! models, destruction mid-step, unpinning under pressure (ExecuTorch's
//! session bugs, design.md's bug 3).

use strata_engine::{EngineError, Event, FinishReason};
use strata_kv::TokenId;

use crate::fixture::{Setup, assert_whole, engine, greedy, model, outcome, prompt, solo};

#[test]
fn a_second_turn_prefills_only_its_new_tokens_and_matches_a_solo_run() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let s = e.create_session(None).unwrap();
    let turn1 = prompt(0, 21, 1);
    let mut r = greedy(turn1.clone(), 6);
    r.session = Some(s.clone());
    let out1 = outcome(e.submit(r).unwrap().collect_blocking());
    assert_eq!(out1.tokens, solo(&m, &turn1, 6));
    assert_eq!(out1.cached, 0);
    // The second turn continues the conversation: turn 1, its answer, then
    // the new tokens; everything before the new tokens is already there.
    let turn2 = prompt(0, 9, 2);
    let mut r = greedy(turn2.clone(), 5);
    r.session = Some(s.clone());
    let out2 = outcome(e.submit(r).unwrap().collect_blocking());
    let mut whole = turn1.clone();
    whole.extend_from_slice(&out1.tokens);
    whole.extend_from_slice(&turn2);
    assert_eq!(out2.tokens, solo(&m, &whole, 5));
    assert!(
        out2.cached >= 21 + 5,
        "cached {} of {}",
        out2.cached,
        whole.len()
    );
    assert_eq!(out2.usage.prompt_tokens, whole.len());
    let info = e.sessions();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].tokens, whole.len() + 5);
    assert!(info[0].pinned && !info[0].busy);
    e.destroy_session(&s).unwrap();
    assert_whole(&e);
}

#[test]
fn a_session_is_refused_by_another_model_and_after_destruction() {
    let (ma, mb) = (model(7), model(8));
    let a = engine(&ma, Setup::default());
    let b = engine(
        &mb,
        Setup {
            name: "b",
            ..Setup::default()
        },
    );
    let s = a.create_session(None).unwrap();
    let mut r = greedy(prompt(0, 5, 1), 2);
    r.session = Some(s.clone());
    let err = b.submit(r.clone()).unwrap_err();
    assert!(
        matches!(err, EngineError::SessionOfAnotherModel { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("tiny-a") && msg.contains("tiny-b"), "{msg}");
    assert!(matches!(
        b.destroy_session(&s),
        Err(EngineError::SessionOfAnotherModel { .. })
    ));
    // Its own model serves it; then it is destroyed and refused.
    assert_eq!(
        outcome(a.submit(r.clone()).unwrap().collect_blocking())
            .tokens
            .len(),
        2
    );
    a.destroy_session(&s).unwrap();
    assert!(matches!(
        a.submit(r).unwrap_err(),
        EngineError::UnknownSession(_)
    ));
    assert!(matches!(
        a.destroy_session(&s),
        Err(EngineError::UnknownSession(_))
    ));
    assert_whole(&a);
    assert_whole(&b);
}

#[test]
fn one_turn_at_a_time_and_destroying_a_session_mid_turn_is_safe() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let s = e.create_session(None).unwrap();
    let mut r = greedy(prompt(0, 30, 3), 200);
    r.session = Some(s.clone());
    let mut h = e.submit(r.clone()).unwrap();
    assert!(matches!(
        e.submit(r).unwrap_err(),
        EngineError::SessionBusy(_)
    ));
    // Wait until it is decoding, then destroy the session under it.
    loop {
        match h.recv_blocking() {
            Some(Event::Token { .. }) => break,
            Some(Event::Admitted { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    e.destroy_session(&s).unwrap();
    let rest = h.collect_blocking();
    assert!(
        matches!(
            rest.last(),
            Some(Event::Finished {
                reason: FinishReason::Abort,
                ..
            })
        ),
        "{rest:?}"
    );
    assert!(e.sessions().is_empty());
    assert_whole(&e);
}

#[test]
fn idle_sessions_give_up_their_pins_under_pressure_and_still_continue() {
    let m = model(7);
    // 16 blocks of 4: one idle session pins 7; a 40-token request needs 11.
    let e = engine(
        &m,
        Setup {
            blocks: 16,
            block_size: 4,
            ..Setup::default()
        },
    );
    let s = e.create_session(None).unwrap();
    let turn1 = prompt(0, 22, 4);
    let mut r = greedy(turn1.clone(), 4);
    r.session = Some(s.clone());
    let out1 = outcome(e.submit(r).unwrap().collect_blocking());
    assert!(e.sessions()[0].pinned);
    let big = prompt(0, 40, 5);
    let out = outcome(e.submit(greedy(big.clone(), 3)).unwrap().collect_blocking());
    assert_eq!(out.tokens, solo(&m, &big, 3));
    assert!(!e.sessions()[0].pinned, "the idle session kept its pins");
    // The next turn still sees the whole conversation.
    let turn2: Vec<TokenId> = prompt(0, 3, 6);
    let mut r = greedy(turn2.clone(), 3);
    r.session = Some(s.clone());
    let out2 = outcome(e.submit(r).unwrap().collect_blocking());
    let mut whole = turn1;
    whole.extend_from_slice(&out1.tokens);
    whole.extend_from_slice(&turn2);
    assert_eq!(out2.tokens, solo(&m, &whole, 3));
    e.destroy_session(&s).unwrap();
    assert_whole(&e);
}

/// A stop string for `tokens`' text that begins inside a token's text (one
/// character in) and occurs nowhere earlier; with its byte offset.
fn stop_inside_a_token(
    tok: &strata_model::Tokenizer,
    tokens: &[TokenId],
) -> Option<(String, usize)> {
    let full = tok.decode(tokens, false);
    for i in 2..tokens.len().saturating_sub(2) {
        let before = tok.decode(&tokens[..i], false);
        let piece = tok.decode(&tokens[i..=i], false);
        let mut chars = piece.char_indices();
        let (Some(_), Some((second, _))) = (chars.next(), chars.next()) else {
            continue;
        };
        let at = before.len() + second;
        let end = full[at..]
            .char_indices()
            .nth(3)
            .map_or(full.len(), |(k, _)| at + k);
        let stop = &full[at..end];
        if stop.trim().len() >= 2 && full.find(stop) == Some(at) {
            return Some((stop.to_string(), at));
        }
    }
    None
}

/// A turn that ends at a stop string: the client sees the text before it,
/// and the conversation continues from exactly that text (as a client
/// resending the conversation would). The session keeps the generated
/// tokens that lie wholly before the stop string, then the rest of the
/// visible text tokenized again (a stop string may begin inside a token);
/// the stop string's tokens, and their KV, are dropped.
#[test]
fn a_stop_string_turn_continues_from_the_text_the_client_saw() {
    use crate::fake::{FakeRunner, next_word};
    let tok = crate::fixture::tokenizer();
    let mut config = crate::fake::config(64, 4, 64, 8);
    config.vocab = strata_testkit::tiny_model::vocab().len();
    config.tokenizer = Some(tok.clone());
    let e = strata_engine::Engine::start(FakeRunner::with_words(64, 4, 1), config).unwrap();
    let rule = |history: &[TokenId], n: usize| {
        let mut h = history.to_vec();
        for _ in 0..n {
            let t = next_word(&h);
            h.push(t);
        }
        h[history.len()..].to_vec()
    };
    let (turn1, free_run, (stop, at)) = (1..200)
        .find_map(|seed| {
            let p = prompt(0, 9, seed);
            let run = rule(&p, 24);
            stop_inside_a_token(&tok, &run).map(|x| (p, run, x))
        })
        .expect("some prompt's answer has a stop string inside a token");
    let s = e.create_session(None).unwrap();
    let mut r = greedy(turn1.clone(), 24);
    r.stop.stop_strings = vec![stop.clone()];
    r.session = Some(s.clone());
    let events = e.submit(r).unwrap().collect_blocking();
    let visible: String = events
        .iter()
        .filter_map(|ev| match ev {
            Event::Token { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    let full = tok.decode(&free_run, false);
    assert_eq!(
        visible,
        full[..at],
        "the client sees the text before {stop:?}"
    );
    assert_eq!(outcome(events).reason, FinishReason::Stop);
    // What the conversation continues from.
    let kept = (0..=free_run.len())
        .take_while(|&k| {
            let t = tok.decode(&free_run[..k], false);
            t.len() <= at && visible.starts_with(&t)
        })
        .last()
        .unwrap();
    let covered = tok.decode(&free_run[..kept], false).len();
    let mut reply = free_run[..kept].to_vec();
    reply.extend(tok.encode(&visible[covered..]).unwrap());
    assert_eq!(tok.decode(&reply, false), visible);
    assert!(covered < at, "the stop string begins inside a token");
    let info = e.sessions();
    assert_eq!(
        info[0].tokens,
        turn1.len() + reply.len(),
        "the session holds other tokens than the visible reply's"
    );
    let turn2 = prompt(0, 4, 77);
    let mut r = greedy(turn2.clone(), 5);
    r.session = Some(s.clone());
    let out2 = outcome(e.submit(r).unwrap().collect_blocking());
    let mut whole = turn1.clone();
    whole.extend_from_slice(&reply);
    whole.extend_from_slice(&turn2);
    assert_eq!(out2.tokens, rule(&whole, 5));
    e.destroy_session(&s).unwrap();
    assert_whole(&e);
}
