//! The SSD tier over HTTP: a long prompt served, the server stopped and
//! started again on the same directory, and the same prompt reports every
//! block but the capped last one cached, with the same greedy output; one
//! server per directory; the tier's metrics; `strata cache` on it.

use serde_json::json;

use crate::harness::TestServer;

use strata_testkit::TempDir;

fn long_prompt() -> String {
    (0..12)
        .map(|i| format!("line {i} of a long shared system prompt"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn complete(s: &TestServer) -> (String, u64, u64) {
    let r = s.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": long_prompt(), "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let u = &v["usage"];
    (
        v["choices"][0]["text"].as_str().unwrap().to_string(),
        u["prompt_tokens"].as_u64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    )
}

#[test]
fn a_restart_on_the_same_directory_hits_every_block_and_answers_the_same() {
    let dir = TempDir::new("restart");
    let flags = ["--ssd-cache-dir", dir.as_str(), "--ssd-cache-size", "64MiB"];
    let s = TestServer::tiny(&flags);
    let (cold, prompt, cached) = complete(&s);
    assert_eq!(cached, 0, "a fresh directory holds nothing");
    let m = s.get("/metrics").body;
    assert!(m.contains("strata:tier_bytes{tier=\"ssd\"}"), "{m}");
    assert!(
        m.contains("strata:tier_restore_seconds_bucket{le=\"+Inf\"}"),
        "histograms end at +Inf: {m}"
    );
    // One server per directory: a second one named here refuses.
    let second = std::panic::catch_unwind(|| TestServer::tiny(&flags)).map(drop);
    let why = second.expect_err("a second server on a held directory must refuse");
    let why = why.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(why.contains("in use by another Strata server"), "{why}");
    drop(s);
    let stats = strata_server::cache_cmd::run(&strata_server::cli::CacheCommand::Verify {
        dir: Some(dir.0.clone()),
    })
    .unwrap();
    assert!(stats.contains("ok: every record verifies"), "{stats}");
    let s = TestServer::tiny(&flags);
    let (warm, prompt2, cached) = complete(&s);
    assert_eq!(prompt2, prompt);
    assert_eq!(
        cached,
        (prompt - 1) / 4 * 4,
        "every block but the capped last one"
    );
    assert_eq!(warm, cold, "the restored KV answers as the cold run did");
    let m = s.get("/metrics").body;
    let restored = m
        .lines()
        .find_map(|l| l.strip_prefix("strata:tier_restored_blocks_total "))
        .unwrap_or_else(|| panic!("{m}"));
    assert!(restored.parse::<f64>().unwrap() >= ((prompt - 1) / 4) as f64);
    drop(s);
    let cleared = strata_server::cache_cmd::run(&strata_server::cli::CacheCommand::Clear {
        dir: Some(dir.0.clone()),
    })
    .unwrap();
    assert!(cleared.contains("removed"), "{cleared}");
    let s = TestServer::tiny(&flags);
    assert_eq!(complete(&s).2, 0, "a cleared directory holds nothing");
}

fn chat(s: &TestServer, messages: &serde_json::Value) -> (String, u64, u64) {
    let r = s.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let u = &v["usage"];
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string(),
        u["prompt_tokens"].as_u64().unwrap(),
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    )
}

#[test]
fn a_conversation_resent_after_a_restart_hits_its_earlier_turns() {
    let dir = TempDir::new("conversation");
    let flags = ["--ssd-cache-dir", dir.as_str(), "--ssd-cache-size", "64MiB"];
    let first = json!([
        {"role": "system", "content": "you answer questions about the weather, briefly and kindly"},
        {"role": "user", "content": "what is the weather like today in the mountains?"}
    ]);
    let s = TestServer::tiny(&flags);
    let (answer, turn1, _) = chat(&s, &first);
    drop(s);
    let mut second = first.as_array().unwrap().clone();
    second.push(json!({"role": "assistant", "content": answer}));
    second.push(json!({"role": "user", "content": "and tomorrow?"}));
    let s = TestServer::tiny(&flags);
    let (_, turn2, cached) = chat(&s, &json!(second));
    assert!(turn2 > turn1);
    // The first turn's prompt, all but its partial last block, comes from
    // the SSD (the template may end the first prompt with tokens the next
    // one replaces, so allow one block less).
    assert!(
        cached >= (turn1 - 1) / 4 * 4 - 4,
        "cached {cached} of a first turn of {turn1} tokens"
    );
}
