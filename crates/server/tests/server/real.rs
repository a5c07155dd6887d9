//! The real model end to end over HTTP: chat and completions, streamed and
//! not, a repeated prompt hitting the prefix cache, a multi-turn session.

use serde_json::json;

use crate::harness::TestServer;

#[test]
fn real_model_answers_over_http() {
    let s = TestServer::real(&[]);
    let model = s.get("/v1/models").json()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let q = json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    });
    let whole = s.post("/v1/chat/completions", &q);
    assert_eq!(whole.status, 200, "{}", whole.body);
    let w = whole.json();
    let content = w["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!content.trim().is_empty());
    let mut sq = q.clone();
    sq["stream"] = json!(true);
    sq["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/chat/completions", &sq);
    let streamed: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            serde_json::from_str::<serde_json::Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, content);
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    let c = s.post(
        "/v1/completions",
        &json!({"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(c.status, 200, "{}", c.body);
    assert!(!c.json()["choices"][0]["text"].as_str().unwrap().is_empty());

    // A session: the second turn reuses the first.
    let id = s.post("/v1/sessions", &json!({})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut usages = Vec::new();
    for text in ["My name is Ada.", "What is my name?"] {
        let r = s.post(
            "/v1/chat/completions",
            &json!({"session": id, "messages": [{"role": "user", "content": text}], "max_tokens": 12, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        usages.push(r.json()["usage"].clone());
    }
    let first = usages[0]["total_tokens"].as_u64().unwrap();
    assert!(
        usages[1]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= first - 1,
        "{usages:?}"
    );
    s.wait_idle();
}

/// `n` samples of one prompt: greedy, all equal to the single answer;
/// seeded, different from each other and the same every time; the prompt
/// counted (and computed) once; streamed choices reassemble to the whole
/// answer's; `best_of` returns the most likely.
#[test]
fn real_model_n_samples_share_the_prompt() {
    let s = TestServer::real(&[]);
    let ask = |extra: serde_json::Value| {
        let mut b = json!({
            "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
            "max_tokens": 24,
        });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let r = s.post("/v1/chat/completions", &b);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let texts = |v: &serde_json::Value| -> Vec<String> {
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i);
                c["message"]["content"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let one = ask(json!({"temperature": 0}));
    let four = ask(json!({"temperature": 0, "n": 4}));
    let t = texts(&four);
    assert_eq!(t.len(), 4);
    assert!(t.iter().all(|x| *x == texts(&one)[0]), "{t:?}");
    assert_eq!(
        four["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    assert_eq!(
        four["usage"]["completion_tokens"].as_u64().unwrap(),
        4 * one["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let a = texts(&ask(json!({"temperature": 1, "seed": 11, "n": 4})));
    let b = texts(&ask(json!({"temperature": 1, "seed": 11, "n": 4})));
    assert_eq!(a, b, "seeded samples repeat");
    let distinct: std::collections::HashSet<_> = a.iter().collect();
    assert_eq!(distinct.len(), 4, "seeded samples differ: {a:?}");
    let solo = texts(&ask(json!({"temperature": 1, "seed": 11})));
    assert_eq!(solo[0], a[0], "sample 0 is the request's own seed");

    // Streamed: each choice's deltas are its whole answer.
    let body = json!({
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
        "max_tokens": 24, "temperature": 1, "seed": 11, "n": 4, "stream": true,
        "stream_options": {"include_usage": true},
    });
    let events = s.stream("/v1/chat/completions", &body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    let mut got = vec![String::new(); 4];
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["delta"]["content"].as_str() {
                got[c["index"].as_u64().unwrap() as usize].push_str(t);
            }
        }
    }
    assert_eq!(got, a);
    let usage = usage.unwrap();
    assert_eq!(usage["prompt_tokens"], four["usage"]["prompt_tokens"]);

    // best_of: one choice, the most likely of three samples.
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": "The sea is", "max_tokens": 12, "temperature": 1, "seed": 3, "best_of": 3, "logprobs": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    let best: f64 = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .sum();
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": "The sea is", "max_tokens": 12, "temperature": 1, "seed": 3, "n": 3, "logprobs": 1}),
    );
    let all = r.json();
    for c in all["choices"].as_array().unwrap() {
        let lp: f64 = c["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        assert!(
            lp <= best + 1e-6,
            "best_of returned {best}, a sample had {lp}"
        );
    }
    s.wait_idle();
}
