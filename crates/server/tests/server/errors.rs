//! Bad input gets OpenAI's error JSON with the right status, never a 5xx
//! and never a panic.

use serde_json::json;

use crate::harness::TestServer;

/// What, path, content type, body, expected status, expected error type.
type Case = (
    &'static str,
    &'static str,
    &'static str,
    Vec<u8>,
    u16,
    &'static str,
);

#[test]
fn bad_inputs_get_their_status_and_error_type() {
    let s = TestServer::tiny(&["--max-body", "64KiB"]);
    let long = "lorem ipsum ".repeat(300);
    let too_many_stops: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            "/v1/chat/completions",
            "application/json",
            b"{\"messages\": [".to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "bytes after the JSON object",
            "/v1/chat/completions",
            "application/json",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]} {\"more\": 1}".to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "max_tokens 0 with echo in a session",
            "/v1/completions",
            "application/json",
            json!({"prompt": "hi", "echo": true, "max_tokens": 0, "session": "sess-any"})
                .to_string()
                .into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "invalid UTF-8",
            "/v1/chat/completions",
            "application/json",
            b"{\"messages\": \"\xff\xfe\"}".to_vec(),
            400,
            "invalid_request_error",
        ),
        (
            "wrong type",
            "/v1/chat/completions",
            "application/json",
            json!({"messages": "hi"}).to_string().into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "wrong field type",
            "/v1/chat/completions",
            "application/json",
            json!({"messages": msgs, "temperature": "hot"})
                .to_string()
                .into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "missing prompt",
            "/v1/completions",
            "application/json",
            json!({"max_tokens": 3}).to_string().into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "wrong content type",
            "/v1/chat/completions",
            "text/plain",
            json!({"messages": msgs}).to_string().into_bytes(),
            415,
            "invalid_request_error",
        ),
        (
            "empty messages",
            "/v1/chat/completions",
            "application/json",
            json!({"messages": []}).to_string().into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "unsupported content part",
            "/v1/chat/completions",
            "application/json",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
                .to_string()
                .into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "over-long prompt",
            "/v1/chat/completions",
            "application/json",
            json!({"messages": [{"role": "user", "content": long}]})
                .to_string()
                .into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "max_tokens past the context",
            "/v1/completions",
            "application/json",
            json!({"prompt": "hi", "max_tokens": 100000})
                .to_string()
                .into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "oversized body",
            "/v1/completions",
            "application/json",
            json!({"prompt": "x".repeat(70_000)})
                .to_string()
                .into_bytes(),
            413,
            "invalid_request_error",
        ),
        (
            "unknown model",
            "/v1/chat/completions",
            "application/json",
            json!({"model": "gpt-9", "messages": msgs})
                .to_string()
                .into_bytes(),
            404,
            "not_found_error",
        ),
        (
            "unknown session",
            "/v1/chat/completions",
            "application/json",
            json!({"session": "sess_nope", "messages": msgs})
                .to_string()
                .into_bytes(),
            404,
            "not_found_error",
        ),
        (
            "token id out of range",
            "/v1/completions",
            "application/json",
            json!({"prompt": [1, 999999]}).to_string().into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "two prompts",
            "/v1/completions",
            "application/json",
            json!({"prompt": ["a", "b"]}).to_string().into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "detokenize garbage",
            "/detokenize",
            "application/json",
            json!({"tokens": [-1]}).to_string().into_bytes(),
            400,
            "invalid_request_error",
        ),
        (
            "tokenize nothing",
            "/tokenize",
            "application/json",
            json!({}).to_string().into_bytes(),
            400,
            "invalid_request_error",
        ),
    ];
    let params = [
        ("temperature", json!(3.0)),
        ("temperature", json!(-0.5)),
        ("top_p", json!(0.0)),
        ("top_p", json!(1.5)),
        ("top_k", json!(-5)),
        ("min_p", json!(2.0)),
        ("presence_penalty", json!(5.0)),
        ("frequency_penalty", json!(-3.0)),
        ("repetition_penalty", json!(0.0)),
        ("max_tokens", json!(0)),
        ("max_completion_tokens", json!(-1)),
        ("n", json!(0)),
        ("top_logprobs", json!(50)),
        ("logit_bias", json!({"99999": 1})),
        ("logit_bias", json!({"5": 500})),
        ("logit_bias", json!({"five": 1})),
        ("stop", json!(too_many_stops)),
        ("stop", json!([""])),
        ("min_tokens", json!(-1)),
        ("stop_token_ids", json!([100000])),
    ];
    let mut checked = 0;
    for (what, path, ct, body, status, kind) in cases {
        let r = s.post_raw(path, ct, &body, None);
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert_eq!(r.error_type(), kind, "{what}");
        checked += 1;
    }
    for (param, value) in params {
        let mut b = json!({"messages": msgs, "max_tokens": 4});
        b[param] = value.clone();
        let r = s.post("/v1/chat/completions", &b);
        assert_eq!(r.status, 400, "{param} = {value}: {}", r.body);
        assert_eq!(r.error_type(), "invalid_request_error");
        assert_eq!(r.json()["error"]["param"], param, "{param} = {value}");
        checked += 1;
    }
    // min_tokens above max_tokens.
    let r = s.post(
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 2, "min_tokens": 3}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    // The context error reads like OpenAI's.
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 100000}),
    );
    let e = r.json();
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 512 tokens"),
        "{e}"
    );
    // Unknown endpoints and methods.
    assert_eq!(s.get("/v1/nothing").status, 404);
    assert_eq!(s.get("/v1/chat/completions").status, 405);
    assert!(checked >= 37);
    // Nothing above broke the server.
    assert_eq!(
        s.post(
            "/v1/completions",
            &json!({"prompt": "still fine", "max_tokens": 2})
        )
        .status,
        200
    );
    s.wait_idle();
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let s = TestServer::tiny(&["--queue-limit", "0"]);
    let r = s.post("/v1/completions", &json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    assert_eq!(r.error_type(), "server_overloaded");
}

#[test]
fn a_request_past_its_timeout_gets_408_and_gives_its_blocks_back() {
    // A zero timeout: the first wait for a token is already past it (400
    // tokens cannot all be ready at the handler's first look).
    let s = TestServer::tiny(&["--request-timeout", "0"]);
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 400, "ignore_eos": true}),
    );
    assert_eq!(r.status, 408, "{}", r.body);
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(r.error_type(), "timeout_error");
    s.wait_idle();
    let st = s.server().stats().unwrap();
    assert_eq!(st.pool.owned + st.pool.quarantined, 0, "{st:?}");
}
