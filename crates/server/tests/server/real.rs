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
