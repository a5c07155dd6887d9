//! Several samples of one prompt (`submit_n`): the prompt is computed
//! once, the samples fork from it (sharing its blocks, each copying the
//! partial tail block before writing into it) and decode in one batch.

use strata_engine::{EngineError, FinishReason, MAX_SAMPLES, Request};
use strata_kv::TokenId;
use strata_model::SamplingParams;

use crate::fixture::{Setup, assert_whole, engine, greedy, model, outcome, prompt, solo};

fn run(e: &strata_engine::Engine, req: Request, n: usize) -> Vec<Vec<TokenId>> {
    let mut hs = e.submit_n(req, n).unwrap();
    hs.iter_mut()
        .map(|h| {
            let o = outcome(h.collect_blocking());
            assert_eq!(o.reason, FinishReason::Length);
            o.tokens
        })
        .collect()
}

fn sampled(p: Vec<TokenId>, n: usize, seed: u64) -> Request {
    let mut r = greedy(p, n);
    r.sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    r
}

#[test]
fn greedy_samples_are_the_single_answer_and_the_prompt_is_computed_once() {
    let m = model(7);
    // 23 prompt tokens in blocks of 4: the tail block is shared, partial.
    for len in [23, 24] {
        let e = engine(&m, Setup::default());
        let p = prompt(0, len, 3);
        let all = run(&e, greedy(p.clone(), 12), 4);
        let want = solo(&m, &p, 12);
        for (i, t) in all.iter().enumerate() {
            assert_eq!(t, &want, "sample {i} of a {len}-token prompt");
        }
        // The prompt once, then each sample's tokens but its last.
        assert_eq!(e.stats().counters.rows as usize, len + 4 * (12 - 1));
        assert_whole(&e);
    }
}

#[test]
fn seeded_samples_repeat_exactly() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let p = prompt(0, 21, 4);
    let a = run(&e, sampled(p.clone(), 16, 42), 4);
    let b = run(&e, sampled(p.clone(), 16, 42), 4);
    assert_eq!(a, b, "the same seed gives the same samples");
    // (The tiny model's distribution is too peaked for samples to differ:
    // the server's real-model test shows they do.)
    // Sample 0 is the request's own seed: the same as one sample.
    let one = run(&e, sampled(p.clone(), 16, 42), 1);
    assert_eq!(one[0], a[0]);
    assert_whole(&e);
}

#[test]
fn a_sample_aborted_midway_leaves_the_others_and_the_pool_whole() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let p = prompt(0, 22, 5);
    let mut hs = e.submit_n(greedy(p.clone(), 40), 3).unwrap();
    let dropped = hs.remove(1);
    drop(dropped);
    for h in &mut hs {
        let o = outcome(h.collect_blocking());
        assert_eq!(o.tokens, solo(&m, &p, 40));
    }
    // Aborting the first sample (the one that computes the prompt) before
    // anything ran still ends every sample.
    let mut hs = e.submit_n(greedy(prompt(0, 30, 6), 8), 3).unwrap();
    let first = hs.remove(0);
    drop(first);
    for h in &mut hs {
        let o = outcome(h.collect_blocking());
        assert!(
            matches!(o.reason, FinishReason::Abort | FinishReason::Length),
            "{:?}",
            o.reason
        );
    }
    assert_whole(&e);
}

#[test]
fn samples_under_pressure_are_preempted_and_still_exact() {
    let m = model(7);
    // Few blocks: eight samples of a long answer cannot all fit at once.
    let e = engine(
        &m,
        Setup {
            blocks: 40,
            step_tokens: 16,
            ..Setup::default()
        },
    );
    let p = prompt(0, 18, 8);
    let all = run(&e, greedy(p.clone(), 30), 8);
    let want = solo(&m, &p, 30);
    assert!(all.iter().all(|t| *t == want));
    assert_whole(&e);
}

#[test]
fn sample_counts_out_of_range_are_refused() {
    let m = model(7);
    let e = engine(&m, Setup::default());
    let p = prompt(0, 8, 1);
    for n in [0, MAX_SAMPLES + 1] {
        assert!(matches!(
            e.submit_n(greedy(p.clone(), 2), n),
            Err(EngineError::BadSamples(_))
        ));
    }
    let mut scored = greedy(p, 2);
    scored.prompt_logprobs = Some(1);
    assert!(matches!(
        e.submit_n(scored, 2),
        Err(EngineError::BadSamples(_))
    ));
}
