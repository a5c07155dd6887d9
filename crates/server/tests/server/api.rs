//! The API on the tiny model: shapes of every endpoint, streaming, prefix
//! hits, sessions and tenants, salts, metrics.

use serde_json::{Value, json};

use crate::harness::TestServer;

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
    })
}

/// The content deltas of a streamed chat, and the chunks parsed.
fn chat_deltas(events: &[String]) -> (String, Vec<Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    (text, chunks)
}

fn usage_is_consistent(u: &Value) {
    let p = u["prompt_tokens"].as_u64().unwrap();
    let c = u["completion_tokens"].as_u64().unwrap();
    assert_eq!(u["total_tokens"].as_u64().unwrap(), p + c, "{u}");
    assert!(
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            <= p,
        "{u}"
    );
}

#[test]
fn chat_and_completions_answer_whole_and_streamed_alike() {
    let s = TestServer::tiny(&[]);
    let whole = s.post("/v1/chat/completions", &chat("hello there", 12));
    assert_eq!(whole.status, 200, "{}", whole.body);
    let w = whole.json();
    assert_eq!(w["object"], "chat.completion");
    assert_eq!(w["model"], "tiny");
    assert_eq!(w["choices"][0]["message"]["role"], "assistant");
    assert_eq!(w["choices"][0]["finish_reason"], "length");
    assert_eq!(w["usage"]["completion_tokens"], 12);
    usage_is_consistent(&w["usage"]);
    let content = w["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    let mut body = chat("hello there", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/chat/completions", &body);
    let (streamed, chunks) = chat_deltas(&events);
    assert_eq!(streamed, content, "greedy: streamed and whole agree");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    usage_is_consistent(&usage["usage"]);

    // Text completions, with a token-id prompt, echo and logprobs.
    let ids = s
        .post("/tokenize", &json!({"content": "once upon a time"}))
        .json()["tokens"]
        .clone();
    let c = s.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": true, "echo": true}),
    );
    assert_eq!(c.status, 200, "{}", c.body);
    let c = c.json();
    assert_eq!(c["object"], "text_completion");
    let text = c["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(text.starts_with("once upon a time"), "{text:?}");
    let c = s.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": true, "logprobs": 2}),
    );
    assert_eq!(c.status, 200, "{}", c.body);
    let c = c.json();
    let generated = c["choices"][0]["text"].as_str().unwrap();
    assert_eq!(format!("once upon a time{generated}"), text);
    let lp = &c["choices"][0]["logprobs"];
    // Each token's offset is where its text starts, in characters.
    let mut at = 0;
    for (tok, off) in lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["text_offset"].as_array().unwrap())
    {
        assert_eq!(off.as_u64().unwrap() as usize, at, "{lp}");
        at += tok.as_str().unwrap().chars().count();
    }
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 6);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 6);
    for top in lp["top_logprobs"].as_array().unwrap() {
        assert_eq!(top.as_object().unwrap().len(), 2, "{top}");
    }
    for l in lp["token_logprobs"].as_array().unwrap() {
        assert!(l.as_f64().unwrap() <= 0.0);
    }
    let events = s.stream(
        "/v1/completions",
        &json!({"prompt": "once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": true, "stream": true}),
    );
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(format!("once upon a time{streamed}"), text);

    // Chat logprobs.
    let mut body = chat("hi", 4);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let r = s.post("/v1/chat/completions", &body).json();
    let content = r["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(content.len(), 4);
    for t in content {
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 3, "{t}");
        assert!(t["bytes"].is_array());
    }
    s.wait_idle();
}

#[test]
fn a_second_identical_request_reports_cached_tokens() {
    let s = TestServer::tiny(&[]);
    let first = s
        .post(
            "/v1/chat/completions",
            &chat("the same question, asked twice", 4),
        )
        .json();
    let second = s
        .post(
            "/v1/chat/completions",
            &chat("the same question, asked twice", 4),
        )
        .json();
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(
        first["choices"][0]["message"],
        second["choices"][0]["message"]
    );
    // Every full block of the prompt (blocks of 4 tokens) but the last token.
    assert!(
        cached > 0 && cached >= (prompt - 1) / 4 * 4,
        "{cached} of {prompt}"
    );
    assert!(s.metric("vllm:prefix_cache_hits_total") >= cached as f64);
}

#[test]
fn stop_strings_cut_the_answer() {
    let s = TestServer::tiny(&[]);
    let free = s
        .post("/v1/chat/completions", &chat("tell me a story", 24))
        .json();
    let text = free["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 6, "{text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let mut body = chat("tell me a story", 24);
    body["stop"] = json!([stop]);
    let cut = s.post("/v1/chat/completions", &body).json();
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        cut["choices"][0]["message"]["content"].as_str().unwrap(),
        &text[..text.find(&stop).unwrap()]
    );
}

#[test]
fn models_tokenize_detokenize_health_and_metrics() {
    let s = TestServer::tiny(&[]);
    assert_eq!(s.get("/health").json()["status"], "ok");
    let m = s.get("/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(s.get("/v1/models/tiny").status, 200);
    assert_eq!(s.get("/v1/models/other").status, 404);
    let t = s
        .post("/tokenize", &json!({"content": "héllo <|im_start|>"}))
        .json();
    let ids = t["tokens"].as_array().unwrap().clone();
    assert_eq!(
        ids.last().unwrap(),
        &json!(1),
        "special tokens parsed by default"
    );
    let d = s.post("/detokenize", &json!({"tokens": ids})).json();
    assert_eq!(d["content"], "héllo <|im_start|>");
    let plain = s
        .post(
            "/tokenize",
            &json!({"content": "<|im_start|>", "parse_special": false}),
        )
        .json();
    assert!(plain["tokens"].as_array().unwrap().len() > 1);
    let chat_ids = s
        .post(
            "/tokenize",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .json();
    assert_eq!(
        chat_ids["tokens"][0],
        json!(1),
        "ChatML starts with <|im_start|>"
    );

    for _ in 0..3 {
        assert_eq!(
            s.post("/v1/chat/completions", &chat("count me", 3)).status,
            200
        );
    }
    let text = s.get("/metrics").body;
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "strata:kv_blocks_free",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    assert_eq!(s.metric("vllm:time_to_first_token_seconds_count"), 3.0);
    assert_eq!(s.metric("vllm:generation_tokens_total"), 9.0);
    assert_eq!(s.metric("vllm:request_success_total"), 3.0);
}

#[test]
fn sessions_continue_belong_to_their_key_and_refuse_a_second_turn() {
    let s = TestServer::tiny(&["--api-key", "key-alpha", "--api-key", "key-bravo"]);
    let created = s.post("/v1/sessions", &json!({}));
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let turn = |content: &str| {
        let mut b = chat(content, 5);
        b["session"] = json!(id);
        let r = s.post("/v1/chat/completions", &b);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let t1 = turn("my name is Ada");
    let t2 = turn("what is my name?");
    let total1 = t1["usage"]["total_tokens"].as_u64().unwrap();
    let p2 = t2["usage"]["prompt_tokens"].as_u64().unwrap();
    let c2 = t2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // The second turn's prompt is the whole conversation; all of the first
    // turn (but its last sampled token, not yet computed) was kept.
    assert!(p2 > total1, "{p2} vs {total1}");
    assert!(c2 >= total1 - 1, "cached {c2} of the first turn's {total1}");

    // Another key cannot see, use or delete it.
    let list_b = s.get_as("/v1/sessions", Some("key-bravo")).json();
    assert_eq!(list_b["data"], json!([]));
    let mut b = chat("hi", 2);
    b["session"] = json!(id);
    let r = s.post_raw(
        "/v1/chat/completions",
        "application/json",
        b.to_string().as_bytes(),
        Some("key-bravo"),
    );
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (404, "not_found_error")
    );
    assert_eq!(
        s.delete(&format!("/v1/sessions/{id}"), Some("key-bravo"))
            .status,
        404
    );
    let list_a = s.get("/v1/sessions").json();
    assert_eq!(list_a["data"][0]["id"], json!(id));
    assert!(list_a["data"][0]["tokens"].as_u64().unwrap() >= p2);

    // A second turn while one streams: 409.
    let mut streaming = chat("tell me more", 200);
    streaming["session"] = json!(id);
    streaming["stream"] = json!(true);
    let mut open = s.open_stream("/v1/chat/completions", &streaming);
    assert!(open.next_data().is_some());
    let r = s.post("/v1/chat/completions", &b);
    assert_eq!(r.status, 409, "{}", r.body);
    // The openai package would retry a 409 twice unless told not to.
    assert_eq!(r.header("x-should-retry"), Some("false"));
    drop(open);
    // Deleting it (even mid-turn) is safe; then it is gone.
    let d = s.delete(&format!("/v1/sessions/{id}"), Some("key-alpha"));
    assert_eq!(d.status, 200, "{}", d.body);
    let r = s.post("/v1/chat/completions", &b);
    assert_eq!(r.status, 404, "{}", r.body);
    s.wait_idle();
    let st = s.server().stats().unwrap();
    assert_eq!(st.pool.owned + st.pool.quarantined, 0, "{st:?}");
}

#[test]
fn cache_salts_separate_prefixes_and_need_the_operator() {
    let closed = TestServer::tiny(&[]);
    let mut b = chat("salted", 2);
    b["cache_salt"] = json!("x");
    let r = closed.post("/v1/chat/completions", &b);
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "invalid_request_error")
    );

    let s = TestServer::tiny(&["--allow-client-salt"]);
    let cached = |salt: &str| {
        let mut b = chat("a prompt shared by salts", 2);
        b["cache_salt"] = json!(salt);
        s.post("/v1/chat/completions", &b).json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(cached("tenant-1"), 0);
    assert_eq!(cached("tenant-2"), 0, "another salt shares nothing");
    assert!(cached("tenant-1") > 0, "the same salt hits");
}

#[test]
fn keys_are_required_when_configured() {
    let s = TestServer::tiny(&["--api-key", "secret-key"]);
    let body = chat("hi", 2).to_string();
    for key in [None, Some("wrong"), Some("secret-ke"), Some("secret-key2")] {
        let r = s.post_raw(
            "/v1/chat/completions",
            "application/json",
            body.as_bytes(),
            key,
        );
        assert_eq!(
            (r.status, r.error_type().as_str()),
            (401, "authentication_error"),
            "{key:?}"
        );
    }
    assert_eq!(s.get_as("/v1/models", None).status, 401);
    let r = s.post_raw(
        "/v1/chat/completions",
        "application/json",
        body.as_bytes(),
        Some("secret-key"),
    );
    assert_eq!(r.status, 200);
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(s.get_as("/health", None).status, 200);
    assert_eq!(s.get_as("/metrics", None).status, 200);
}

#[test]
fn a_model_that_fails_to_load_says_why_and_health_stays_503() {
    let argv = [
        "strata",
        "serve",
        "--port",
        "0",
        "--model",
        "/nonexistent/model.gguf",
    ];
    let args = match <strata_server::cli::Cli as clap::Parser>::parse_from(argv).command {
        strata_server::cli::Command::Serve(a) => *a,
        _ => unreachable!(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut server = rt
        .block_on(strata_server::Server::start(args, Box::new(|_| {})))
        .unwrap();
    let err = rt.block_on(server.ready()).unwrap_err();
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .get(format!("http://{}/health", server.addr()))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.body_mut().read_to_string().unwrap().contains("loading"));
    let mut r = agent
        .post(format!("http://{}/v1/completions", server.addr()))
        .header("Content-Type", "application/json")
        .send("{\"prompt\": \"hi\"}")
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let _ = r.body_mut().read_to_string();
    rt.block_on(server.shutdown(std::time::Duration::from_secs(1)));
}

#[test]
fn shutdown_after_the_grace_period_aborts_what_runs() {
    let s = TestServer::tiny(&["--max-batch-tokens", "1"]);
    let body =
        json!({"prompt": "a long story", "max_tokens": 480, "ignore_eos": true, "stream": true});
    let mut stream = s.open_stream("/v1/completions", &body);
    assert!(stream.next_data().is_some());
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        while let Some(d) = stream.next_data() {
            let done = d == "[DONE]";
            all.push(d);
            if done {
                break;
            }
        }
        all
    });
    // No grace: the request (480 tokens, one per step) is still running.
    s.shutdown(std::time::Duration::ZERO);
    let all = reader.join().unwrap();
    assert_eq!(all.last().map(String::as_str), Some("[DONE]"));
    let error: serde_json::Value = serde_json::from_str(&all[all.len() - 2]).unwrap();
    assert_eq!(error["error"]["type"], "server_overloaded", "{error}");
    assert!(all.len() < 480);
}

/// Everything the server logs in this test binary (installed once).
fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static std::sync::Mutex<Vec<u8>> =
            Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
        struct W(&'static std::sync::Mutex<Vec<u8>>);
        impl std::io::Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || W(buf))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
}

#[test]
fn logs_hold_no_prompt_or_completion_text_unless_asked() {
    let logs = captured_logs();
    let secret = "zebra-quokka-4417";
    for (flags, logged) in [(&[][..], false), (&["--log-text"][..], true)] {
        let s = TestServer::tiny(flags);
        let r = s.post("/v1/chat/completions", &chat(secret, 3));
        assert_eq!(r.status, 200);
        let r = s.post(
            "/v1/completions",
            &json!({"prompt": secret, "max_tokens": 3}),
        );
        assert_eq!(r.status, 200);
        s.wait_idle();
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        assert!(
            text.contains("request finished"),
            "requests are logged: {text}"
        );
        assert_eq!(text.contains(secret), logged, "flags {flags:?}: {text}");
    }
}

/// Completions' `logprobs` checked for shape: parallel arrays of one
/// length, offsets where each token's text starts; returns the token
/// strings and log-probabilities.
fn text_logprobs(lp: &Value) -> (Vec<String>, Vec<Option<f64>>) {
    let tokens: Vec<String> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let lps: Vec<Option<f64>> = lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_f64)
        .collect();
    let offsets = lp["text_offset"].as_array().unwrap();
    assert_eq!(lps.len(), tokens.len(), "{lp}");
    assert_eq!(offsets.len(), tokens.len(), "{lp}");
    assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), tokens.len());
    let mut at = 0;
    for (t, off) in tokens.iter().zip(offsets) {
        assert_eq!(off.as_u64().unwrap() as usize, at, "{lp}");
        at += t.chars().count();
    }
    (tokens, lps)
}

/// `echo` with `logprobs` scores the prompt as lm-evaluation-harness and
/// perplexity runs use it: each prompt token's log-probability (the first
/// has none), equal to what generating that token reported; `max_tokens:
/// 0` generates nothing; streamed and whole agree.
#[test]
fn echo_with_logprobs_scores_the_prompt_as_generation_saw_it() {
    let s = TestServer::tiny(&[]);
    let prompt = "once upon a time";
    let ids = s.post("/tokenize", &json!({"content": prompt})).json()["tokens"].clone();
    let n = ids.as_array().unwrap().len();
    let g = s.post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": true, "logprobs": 1}),
    );
    assert_eq!(g.status, 200, "{}", g.body);
    let g = g.json();
    let (_, gen_lps) = text_logprobs(&g["choices"][0]["logprobs"]);
    let full = format!("{prompt}{}", g["choices"][0]["text"].as_str().unwrap());
    let full_ids = s.post("/tokenize", &json!({"content": full})).json()["tokens"].clone();
    let m = full_ids.as_array().unwrap().len();
    assert_eq!(m, n + 6, "the text retokenizes to the same tokens");

    let body = json!({"prompt": full_ids, "max_tokens": 0, "echo": true, "logprobs": 2});
    let r = s.post("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = r.json();
    let c = &r["choices"][0];
    assert_eq!(c["text"], json!(full), "max_tokens 0: the prompt alone");
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 0);
    assert_eq!(r["usage"]["prompt_tokens"], m);
    let lp = &c["logprobs"];
    let (tokens, lps) = text_logprobs(lp);
    assert_eq!(tokens.concat(), full);
    assert_eq!(lps.len(), m);
    assert_eq!(lps[0], None, "the first token has nothing before it");
    assert!(lp["top_logprobs"][0].is_null());
    for (i, l) in lps.iter().enumerate().skip(1) {
        assert!(l.unwrap() <= 0.0);
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 2);
    }
    // The generated tokens, scored as prompt, have the log-probabilities
    // their generation reported.
    for (k, (scored, generated)) in lps[n..].iter().zip(&gen_lps).enumerate() {
        let (a, b) = (scored.unwrap(), generated.unwrap());
        assert!((a - b).abs() < 1e-4, "token {k}: scored {a}, generated {b}");
    }

    // With generation after the prompt: the prompt's entries, then the
    // generated tokens', offsets running through both.
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 3, "temperature": 0, "ignore_eos": true, "echo": true, "logprobs": 0}),
    );
    let r = r.json();
    let (tokens, lps) = text_logprobs(&r["choices"][0]["logprobs"]);
    assert_eq!(tokens.len(), n + 3);
    assert_eq!(tokens.concat(), r["choices"][0]["text"].as_str().unwrap());
    assert!(lps[1..].iter().all(Option::is_some));

    // Streamed: the echo chunk carries the prompt's entries.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let events = s.stream("/v1/completions", &stream);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["text"], json!(full));
    assert_eq!(first["choices"][0]["logprobs"], lp.clone());
    let last: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    // Not for a session's turn; min_tokens cannot pass max_tokens 0.
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": ids, "max_tokens": 0, "echo": true, "min_tokens": 2}),
    );
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("min_tokens"))
    );
    let r = s.post("/v1/completions", &json!({"prompt": ids, "max_tokens": 0}));
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("max_tokens"))
    );
    s.wait_idle();
}

/// A client that leaves a session turn at any point (before its first
/// chunk, mid-answer, after its last token) leaves the session usable and
/// its history in step with the engine: the conversation grew by the turn
/// (two messages) exactly when the engine's session kept the turn.
#[test]
fn a_turn_whose_client_leaves_leaves_history_and_engine_in_step() {
    let s = TestServer::tiny(&[]);
    let id = s.post("/v1/sessions", &json!({})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let info = || {
        let list = s.get("/v1/sessions").json();
        let me = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == json!(id))
            .unwrap()
            .clone();
        (
            me["tokens"].as_u64().unwrap(),
            me["messages"].as_u64().unwrap(),
            me["busy"] == json!(true),
        )
    };
    let mut kept = 0;
    for round in 0..12u32 {
        let (tokens, messages, _) = info();
        let mut b = chat(&format!("turn {round}"), 2 + round % 3);
        b["session"] = json!(id);
        b["stream"] = json!(true);
        let mut stream = s.open_stream("/v1/chat/completions", &b);
        for _ in 0..round % 5 {
            stream.next_data();
        }
        drop(stream);
        // Bounded: the turn ends (aborted or completed) and frees the session.
        let start = std::time::Instant::now();
        let (t2, m2) = loop {
            s.wait_idle();
            let (t, m, busy) = info();
            if !busy {
                break (t, m);
            }
            assert!(start.elapsed().as_secs() < 10, "the session stayed busy");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        if t2 > tokens {
            assert_eq!(
                m2,
                messages + 2,
                "round {round}: the engine kept the turn, the history not"
            );
            kept += 1;
        } else {
            assert_eq!(
                m2, messages,
                "round {round}: the history kept a turn the engine did not"
            );
        }
    }
    // The session still continues.
    let mut b = chat("and now?", 2);
    b["session"] = json!(id);
    let r = s.post("/v1/chat/completions", &b);
    assert_eq!(r.status, 200, "{}", r.body);
    eprintln!("{kept} of 12 turns completed before their clients left");
}
