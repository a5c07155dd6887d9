//! 32 concurrent streaming clients, a third of them disconnecting (some
//! during prefill, some during decode): every other response completes,
//! and afterwards nothing runs and every KV block is free.

use serde_json::json;

use crate::harness::TestServer;

#[test]
fn concurrent_streams_with_disconnects_leave_the_pool_whole() {
    let s = TestServer::tiny(&["--max-running", "16", "--max-batch-tokens", "64"]);
    let s = &s;
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..32)
            .map(|i| {
                scope.spawn(move || {
                    let prompt =
                        format!("client {i} asks about {} things", "many ".repeat(i % 7 + 1));
                    let body = json!({
                        "prompt": prompt,
                        "max_tokens": 24,
                        "temperature": 0,
                        "ignore_eos": true,
                        "stream": true,
                    });
                    let mut stream = s.open_stream("/v1/completions", &body);
                    match i % 6 {
                        // Gone before the first token (during prefill).
                        0 => None,
                        // Gone after two tokens (during decode).
                        1 => {
                            stream.next_data().unwrap();
                            stream.next_data().unwrap();
                            None
                        }
                        _ => {
                            let mut tokens = 0;
                            let mut reason = None;
                            while let Some(d) = stream.next_data() {
                                if d == "[DONE]" {
                                    break;
                                }
                                let v: serde_json::Value = serde_json::from_str(&d).unwrap();
                                match v["choices"][0]["finish_reason"].as_str() {
                                    Some(r) => reason = Some(r.to_string()),
                                    None => tokens += 1,
                                }
                            }
                            Some((tokens, reason))
                        }
                    }
                })
            })
            .collect();
        let mut completed = 0;
        for c in clients {
            if let Some((tokens, reason)) = c.join().unwrap() {
                assert_eq!(reason.as_deref(), Some("length"));
                assert_eq!(tokens, 24);
                completed += 1;
            }
        }
        assert_eq!(completed, (0..32).filter(|i| i % 6 >= 2).count());
    });
    s.wait_idle();
    assert_eq!(s.metric("vllm:num_requests_running"), 0.0);
    assert_eq!(s.metric("vllm:num_requests_waiting"), 0.0);
    assert_eq!(s.metric("strata:kv_blocks_owned"), 0.0);
    assert_eq!(s.metric("strata:kv_blocks_quarantined"), 0.0);
    assert_eq!(
        s.metric("strata:kv_blocks_free"),
        s.metric("strata:kv_blocks_total")
    );
    assert_eq!(s.metric("strata:sanitizer_violations_total"), 0.0);
    let st = s.server().stats().unwrap();
    assert_eq!(st.pool.issued, st.pool.completed, "{st:?}");
    assert!(st.counters.aborted >= 10, "{st:?}");
}
