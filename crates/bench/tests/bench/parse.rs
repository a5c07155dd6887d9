use proptest::prelude::*;
use serde_json::json;
use strata_bench::client::{Endpoint, StreamState};
use strata_bench::compare::sustainable_rate;
use strata_bench::quality::{read_logits, served_rows};
use strata_bench::report::{PhaseResult, RunResult};
use strata_bench::sharegpt::parse;
use strata_bench::sse::SseParser;
use strata_bench::stats::Dist;
use strata_bench::text::{nonce, words};
use strata_bench::workload::{BUILTIN, Plan, Prompt, Sizes, builtin};

const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
: keep-alive comment\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n\
data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\r\
event: message\n\
data: {\"choices\":[{\"delta\":{\"content\":\" there\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n\
data: [DONE]\n\n";

#[test]
fn sse_events_split_on_blank_lines_of_any_line_ending() {
    let mut p = SseParser::new();
    let ev = p.push(STREAM.as_bytes());
    assert_eq!(ev.len(), 6, "{ev:?}");
    assert!(ev[1].contains("Hel") && ev[2].contains("\"lo\"") && ev[3].contains("there"));
    assert_eq!(ev[5], "[DONE]");
    // Several data lines are one event joined with \n; `data:x` needs no
    // space; an event with no blank line after it is not complete.
    let mut p = SseParser::new();
    assert_eq!(
        p.push(b"data: a\ndata:b\n\ndata: c"),
        vec!["a\nb".to_string()]
    );
    assert_eq!(p.push(b"\n\n"), vec!["c".to_string()]);
}

proptest! {
    #[test]
    fn sse_parsing_does_not_depend_on_how_the_bytes_arrive(cuts in prop::collection::vec(0usize..STREAM.len(), 0..40)) {
        let whole = SseParser::new().push(STREAM.as_bytes());
        let mut cuts = cuts;
        cuts.sort_unstable();
        let mut p = SseParser::new();
        let (mut got, mut at) = (Vec::new(), 0);
        for c in cuts.into_iter().chain([STREAM.len()]) {
            got.extend(p.push(&STREAM.as_bytes()[at..c]));
            at = c;
        }
        prop_assert_eq!(got, whole);
    }
}

#[test]
fn a_stream_is_timed_from_its_first_text() {
    let mut s = StreamState::default();
    let events: Vec<&str> = STREAM.split_inclusive("\n\n").collect();
    // Feed it in pieces at known times: the role-only chunk (empty
    // content) at 0.1 s is not the first token; "Hel" at 0.5 s is.
    let mut t = 0.1;
    for e in STREAM.as_bytes().chunks(40) {
        s.push(e, t);
        t += 0.1;
    }
    let out = s.finish(t);
    assert!(events.len() > 3);
    assert_eq!(out.error, None);
    let ttft = out.ttft.unwrap();
    assert!(ttft > 0.1 && ttft < t, "{ttft}");
    assert_eq!(out.itl.len(), 2, "two gaps between three texts");
    assert!(out.itl.iter().all(|g| *g >= 0.0));
    assert_eq!(out.output_tokens, 3);
    assert_eq!(out.prompt_tokens, Some(12));
    assert_eq!(out.cached_tokens, Some(8));
    assert_eq!(out.text, "Hello there");
    let rate = out.decode_rate().unwrap();
    assert!((rate - 2.0 / (t - ttft)).abs() < 1e-9);
}

#[test]
fn llama_servers_timings_stand_in_for_cached_tokens_and_errors_fail() {
    let mut s = StreamState::default();
    s.push(b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n", 1.0);
    s.push(
        b"data: {\"choices\":[{\"text\":\"b\"}],\"timings\":{\"cache_n\":40}}\n\ndata: [DONE]\n\n",
        2.0,
    );
    let out = s.finish(2.0);
    assert_eq!(
        (out.error, out.cached_tokens, out.output_tokens),
        (None, Some(40), 2)
    );
    assert_eq!(out.ttft, Some(1.0));
    assert_eq!(out.itl, vec![1.0]);

    let mut s = StreamState::default();
    s.push(
        b"data: {\"error\":{\"message\":\"context too long\"}}\n\n",
        0.5,
    );
    assert!(s.finish(0.5).error.unwrap().contains("context too long"));

    let mut s = StreamState::default();
    s.push(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
        0.5,
    );
    assert!(
        s.finish(0.6).error.unwrap().contains("[DONE]"),
        "a cut stream is a failure"
    );

    let mut s = StreamState::default();
    s.push(b"data: {not json\n\n", 0.5);
    assert!(s.finish(0.6).error.unwrap().contains("not JSON"));
}

#[test]
fn endpoints_parse_host_port_and_prefix() {
    let e = Endpoint::parse("http://127.0.0.1:8080/v1/").unwrap();
    assert_eq!(
        (e.host.as_str(), e.port, e.prefix.as_str()),
        ("127.0.0.1", 8080, "/v1")
    );
    let e = Endpoint::parse("http://[::1]:9000/v1").unwrap();
    assert_eq!((e.host.as_str(), e.port), ("::1", 9000));
    let e = Endpoint::parse("http://localhost").unwrap();
    assert_eq!((e.port, e.prefix.as_str()), (80, ""));
    assert!(
        Endpoint::parse("https://x/v1")
            .unwrap_err()
            .contains("http://")
    );
    assert!(
        Endpoint::parse("http://h:port/v1")
            .unwrap_err()
            .contains("port")
    );
    assert!(Endpoint::parse("http://:80/v1").is_err());
}

#[test]
fn sharegpt_files_give_complete_turns() {
    let file = json!([
        {"id": "a", "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Two"},
            {"from": "human", "value": "parts"},
            {"from": "gpt", "value": "Answer"},
            {"from": "human", "value": "no reply: dropped"}
        ]},
        {"id": 7, "conversations": [{"from": "gpt", "value": "a reply to nothing"}, {"from": "user", "value": "q"}, {"from": "assistant", "value": "r"}]},
        {"conversations": [{"from": "human", "value": "alone"}]}
    ]);
    let c = parse(&file.to_string()).unwrap();
    assert_eq!(c.len(), 2, "the one with no complete turn is skipped");
    assert_eq!(c[0].id, "a");
    assert_eq!(c[0].system.as_deref(), Some("Be brief."));
    assert_eq!(c[0].turns.len(), 2);
    assert_eq!(c[0].turns[1].user, "Two\n\nparts");
    assert_eq!(c[0].turns[1].reply, "Answer");
    assert_eq!(c[1].id, "7");
    assert_eq!(
        (c[1].turns[0].user.as_str(), c[1].turns[0].reply.as_str()),
        ("q", "r")
    );
    let bad = json!([{"conversations": [{"from": "wizard", "value": "x"}]}]);
    assert!(parse(&bad.to_string()).unwrap_err().contains("wizard"));
    assert!(
        parse("{\"not\": \"a list\"}")
            .unwrap_err()
            .contains("ShareGPT")
    );
}

#[test]
fn text_is_seeded_and_about_the_asked_length() {
    assert_eq!(words(3, 500), words(3, 500));
    assert_ne!(words(3, 500), words(4, 500));
    let n = words(3, 500).split_whitespace().count();
    assert!((430..=500).contains(&n), "{n} words for about 500 tokens");
    assert_ne!(nonce(1), nonce(2));
}

#[test]
fn every_builtin_workload_builds_and_is_seeded() {
    for quick in [true, false] {
        for id in BUILTIN {
            let a = builtin(id, Sizes { seed: 1, quick }).unwrap();
            assert_eq!(a, builtin(id, Sizes { seed: 1, quick }).unwrap(), "{id}");
            assert!(a.phases.iter().all(|p| !p.plan.is_empty()), "{id}");
        }
    }
    assert!(
        builtin(
            "w9",
            Sizes {
                seed: 1,
                quick: false
            }
        )
        .unwrap_err()
        .contains("w1")
    );
    // w2's prompts are distinct from their first words on.
    let w2 = builtin(
        "w2",
        Sizes {
            seed: 1,
            quick: false,
        },
    )
    .unwrap();
    let mut firsts = std::collections::HashSet::new();
    for p in &w2.phases {
        let Plan::Clients(c) = &p.plan else {
            panic!("w2 is closed-loop")
        };
        for r in c.iter().flatten() {
            let Prompt::Chat(m) = &r.prompt else {
                panic!("chat")
            };
            assert!(firsts.insert(m[0].1[..10].to_string()), "a repeated start");
        }
    }
    // w3: one system prompt within a phase, another in the next.
    let w3 = builtin(
        "w3",
        Sizes {
            seed: 1,
            quick: false,
        },
    )
    .unwrap();
    let systems: Vec<Vec<String>> = w3
        .phases
        .iter()
        .map(|p| {
            let Plan::Waves(w) = &p.plan else {
                panic!("waves")
            };
            w.iter()
                .flatten()
                .map(|r| match &r.prompt {
                    Prompt::Chat(m) => m[0].1.clone(),
                    Prompt::Text(_) => unreachable!(),
                })
                .collect()
        })
        .collect();
    assert!(systems[0].iter().all(|s| *s == systems[0][0]) && systems[0].len() == 4);
    assert!(systems[1].len() == 16 && systems[1][0] != systems[0][0]);
    // w6's two halves ask about the same document.
    let doc = |id| match &builtin(
        id,
        Sizes {
            seed: 1,
            quick: false,
        },
    )
    .unwrap()
    .phases[0]
        .plan
    {
        Plan::Waves(w) => match &w[0][0].prompt {
            Prompt::Chat(m) => m[0].1.split("\n\nQuestion").next().unwrap().to_string(),
            Prompt::Text(_) => unreachable!(),
        },
        _ => unreachable!(),
    };
    assert_eq!(doc("w6-cold"), doc("w6-restart"));
    // w8: rising rates, each with its seeded arrivals.
    let w8 = builtin(
        "w8",
        Sizes {
            seed: 1,
            quick: false,
        },
    )
    .unwrap();
    let rates: Vec<f64> = w8
        .phases
        .iter()
        .map(|p| match &p.plan {
            Plan::Open {
                rate,
                arrivals,
                reqs,
            } => {
                assert_eq!(arrivals.len(), reqs.len());
                *rate
            }
            _ => unreachable!(),
        })
        .collect();
    assert!(rates.windows(2).all(|w| w[1] > w[0]));
    assert!(w8.stop_above_p99_ttft.is_some());
}

/// A logits file in llama-perplexity's layout: 2 chunks of 8 tokens over
/// a vocabulary of 5.
fn logits_file(dir: &std::path::Path) -> std::path::PathBuf {
    let (n_ctx, n_vocab, n_chunk) = (8i32, 5i32, 2i32);
    let mut b = b"_logits_".to_vec();
    for v in [n_ctx, n_vocab, n_chunk] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let tokens: Vec<i32> = (0..16).map(|i| i % 5).collect();
    for t in &tokens {
        b.extend_from_slice(&t.to_le_bytes());
    }
    let nv = 2 * ((n_vocab + 1) / 2) + 4; // 10 u16s a row
    for c in 0..2 {
        for i in 0..(n_ctx - 1 - n_ctx / 2) {
            let (scale, min_lp) = (0.001f32, -16.0f32);
            let mut row = Vec::new();
            row.extend_from_slice(&scale.to_le_bytes());
            row.extend_from_slice(&min_lp.to_le_bytes());
            // Token (c + i) % 5 is the top one.
            for t in 0..n_vocab {
                let q: u16 = if t == (c + i) % 5 {
                    16_000
                } else {
                    1_000 * t as u16
                };
                row.extend_from_slice(&q.to_le_bytes());
            }
            while row.len() < nv as usize * 2 {
                row.push(0);
            }
            b.extend_from_slice(&row);
        }
    }
    let p = dir.join("logits.bin");
    std::fs::write(&p, b).unwrap();
    p
}

#[test]
fn llama_perplexity_logits_files_are_read_row_by_row() {
    let dir = std::env::temp_dir().join(format!("strata-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (h, rows) = read_logits(&logits_file(&dir)).unwrap();
    assert_eq!(
        (h.n_ctx, h.n_vocab, h.n_chunk, h.tokens.len()),
        (8, 5, 2, 16)
    );
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].len(), 3, "positions 4..7 predict tokens 5..7");
    assert_eq!(rows[1][2].top1, 3);
    assert!((rows[1][2].top1_logprob - (0.001 * 16_000.0 - 16.0)).abs() < 1e-5);
    // Row i of chunk c predicts token c * 8 + 4 + i + 1 = (that) % 5.
    let next = (8 + 4 + 1) % 5;
    let q = if next == 1 {
        16_000.0
    } else {
        1_000.0 * next as f32
    };
    assert!((rows[1][0].actual_logprob - (0.001 * q - 16.0)).abs() < 1e-5);
    std::fs::write(dir.join("bad.bin"), b"_notlog_").unwrap();
    assert!(read_logits(&dir.join("bad.bin")).is_err());
    let whole = std::fs::read(dir.join("logits.bin")).unwrap();
    std::fs::write(dir.join("short.bin"), &whole[..whole.len() - 3]).unwrap();
    assert!(
        format!("{:#}", read_logits(&dir.join("short.bin")).unwrap_err()).contains("ends early")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn served_rows_take_each_prompt_tokens_top_alternative() {
    let answer = json!({"choices": [{"logprobs": {
        "tokens": ["A", " b", " c"],
        "token_logprobs": [null, -1.5, -0.25],
        "top_logprobs": [null, {" x": -0.5}, {" c": -0.25, " d": -2.0}],
    }}]});
    let r = served_rows(&answer).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(
        (
            r[0].actual_logprob,
            r[0].top1_text.as_str(),
            r[0].top1_logprob
        ),
        (-1.5, " x", -0.5)
    );
    assert_eq!(r[1].top1_text, " c");
    assert!(served_rows(&json!({"choices": []})).is_err());
}

#[test]
fn a_stream_is_timed_exactly_at_its_events() {
    let mut s = StreamState::default();
    s.push(
        b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
        0.1,
    );
    s.push(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n",
        0.3,
    );
    // The event completes with its blank line, at 0.4.
    s.push(b"\n", 0.4);
    s.push(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\ndata: [DONE]\n\n",
        0.65,
    );
    assert!(s.ended());
    let out = s.finish(0.7);
    assert_eq!(out.ttft, Some(0.4));
    assert_eq!(out.itl.len(), 1);
    assert!((out.itl[0] - 0.25).abs() < 1e-12);
    assert_eq!(out.e2e, 0.7);
}

#[test]
fn an_unbounded_line_is_cut_and_fails_the_request() {
    let mut s = StreamState::default();
    let long = vec![b'x'; strata_bench::sse::MAX_LINE + 10];
    s.push(b"data: ", 0.1);
    s.push(&long, 0.2);
    assert!(s.ended());
    assert!(s.finish(0.3).error.unwrap().contains("bytes"));
}

fn phase_result(rate: f64, p99: f64, failures: usize, first: f64, last: f64) -> PhaseResult {
    let mut p = PhaseResult {
        name: format!("rate {rate}/s"),
        requests: 10,
        failures,
        rate: Some(rate),
        ..PhaseResult::default()
    };
    p.ttft_ms.p99 = p99;
    p.ttft_by_tag_ms.insert(
        "first third".into(),
        Dist {
            mean: first,
            ..Dist::default()
        },
    );
    p.ttft_by_tag_ms.insert(
        "last third".into(),
        Dist {
            mean: last,
            ..Dist::default()
        },
    );
    p
}

#[test]
fn the_sustainable_rate_is_the_last_rate_before_the_first_that_fails() {
    let run = |phases| RunResult {
        label: "s".into(),
        url: String::new(),
        command: None,
        workload: "w8".into(),
        what: String::new(),
        started: 0,
        phases,
    };
    let ok = |r| phase_result(r, 2_000.0, 0, 500.0, 600.0);
    let r = run(vec![
        ok(0.5),
        ok(1.0),
        phase_result(2.0, 12_000.0, 0, 500.0, 600.0),
    ]);
    assert_eq!(sustainable_rate(&r, 10_000.0), (Some(1.0), true));
    // A growing queue (the last third waits far longer) is not sustained
    // even within the TTFT bound; a failure is not either.
    let r = run(vec![ok(0.5), phase_result(1.0, 9_000.0, 0, 500.0, 5_000.0)]);
    assert_eq!(sustainable_rate(&r, 10_000.0), (Some(0.5), true));
    let r = run(vec![ok(0.5), phase_result(1.0, 100.0, 1, 50.0, 50.0)]);
    assert_eq!(sustainable_rate(&r, 10_000.0), (Some(0.5), true));
    // Every rate held: at least the highest, and the sweep says so.
    assert_eq!(
        sustainable_rate(&run(vec![ok(0.5), ok(1.0)]), 10_000.0),
        (Some(1.0), false)
    );
    // A rate that holds after one that did not does not count.
    let r = run(vec![
        ok(0.5),
        phase_result(1.0, 20_000.0, 0, 1.0, 1.0),
        ok(2.0),
    ]);
    assert_eq!(sustainable_rate(&r, 10_000.0), (Some(0.5), true));
    assert_eq!(
        sustainable_rate(
            &run(vec![phase_result(0.5, 20_000.0, 0, 1.0, 1.0)]),
            10_000.0
        ),
        (None, true)
    );
}

#[test]
fn an_event_that_never_ends_is_bounded_too() {
    // Short data lines with no blank line between them: each line is
    // within the cap, their event is not.
    let mut p = SseParser::new();
    let line = format!("data: {}\n", "y".repeat(1_000));
    for _ in 0..(strata_bench::sse::MAX_LINE / 1_000 + 10) {
        p.push(line.as_bytes());
    }
    assert!(p.overflowed());
}

#[test]
fn a_logits_header_with_negative_sizes_is_refused() {
    let dir = std::env::temp_dir().join(format!("strata-bench-neg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut b = b"_logits_".to_vec();
    for v in [512i32, -5, 4] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(dir.join("neg.bin"), b).unwrap();
    let e = format!("{:#}", read_logits(&dir.join("neg.bin")).unwrap_err());
    assert!(e.contains("negative"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
