//! The bounds on load, against a mock OpenAI server on loopback that
//! counts what it is sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::ProgressBar;
use serde_json::Value;
use strata_bench::client::Endpoint;
use strata_bench::run::{Limits, run_phase};
use strata_bench::workload::{Chat, Phase, Plan, Prompt, Req};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

#[derive(Default)]
struct Seen {
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    total: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
}

/// How the mock answers.
#[derive(Clone, Copy, Default)]
struct Style {
    /// Before the first chunk.
    delay: Duration,
    /// Between chunks (each written on its own).
    gap: Duration,
    /// Keep the connection open this long after `[DONE]`.
    linger: Duration,
    /// Send the first chunk, then nothing more for an hour.
    hang_after_first: bool,
}

async fn mock(delay: Duration) -> (Endpoint, Arc<Seen>) {
    mock_with(Style {
        delay,
        ..Style::default()
    })
    .await
}

/// Serves `/v1/chat/completions` and `/v1/completions` as three text
/// chunks, a 400 for any other path. Returns the endpoint.
async fn mock_with(style: Style) -> (Endpoint, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let ok = head.starts_with("post /v1/chat/completions")
                    || head.starts_with("post /v1/completions");
                if !ok {
                    let _ = sock.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\nconnection: close\r\n\r\nbad request").await;
                    return;
                }
                let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                s.peak.fetch_max(now, Ordering::SeqCst);
                s.total.fetch_add(1, Ordering::SeqCst);
                if let Ok(v) = serde_json::from_slice(&buf[head_end..head_end + len]) {
                    s.bodies.lock().await.push(v);
                }
                tokio::time::sleep(style.delay).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
                    .await;
                for (i, t) in ["one", " two", " three"].iter().enumerate() {
                    if i > 0 {
                        if style.hang_after_first {
                            tokio::time::sleep(Duration::from_secs(3_600)).await;
                        }
                        tokio::time::sleep(style.gap).await;
                    }
                    let chunk = format!(
                        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{t}\"}}}}]}}\n\n"
                    );
                    let _ = sock.write_all(chunk.as_bytes()).await;
                }
                // Done before the client can see [DONE]: the client may
                // send its next request the moment it does.
                s.in_flight.fetch_sub(1, Ordering::SeqCst);
                let _ = sock
                    .write_all(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":3}}\n\ndata: [DONE]\n\n")
                    .await;
                tokio::time::sleep(style.linger).await;
            });
        }
    });
    (
        Endpoint::parse(&format!("http://127.0.0.1:{port}/v1")).unwrap(),
        seen,
    )
}

fn r(tag: &str) -> Req {
    Req {
        tag: tag.into(),
        prompt: Prompt::Chat(vec![("user".into(), "hi".into())]),
        max_tokens: 3,
    }
}

fn phase(plan: Plan) -> Phase {
    Phase {
        name: "p".into(),
        plan,
    }
}

fn limits(max_in_flight: usize, max_requests: usize, phase_time: Duration) -> Limits {
    Limits {
        max_in_flight,
        max_requests,
        phase_time,
        request_timeout: Duration::from_secs(30),
        model: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_requests_in_flight_than_allowed() {
    let (ep, seen) = mock(Duration::from_millis(30)).await;
    let plan = Plan::Clients((0..3).map(|_| (0..4).map(|_| r("all")).collect()).collect());
    let res = run_phase(
        &ep,
        &phase(plan),
        &limits(2, 100, Duration::from_secs(60)),
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!(
        (res.requests, res.failures, res.not_sent),
        (12, 0, 0),
        "{:?}",
        res.errors
    );
    assert_eq!(seen.total.load(Ordering::SeqCst), 12);
    assert!(
        seen.peak.load(Ordering::SeqCst) <= 2,
        "the server saw {} at once",
        seen.peak.load(Ordering::SeqCst)
    );
    assert!(res.peak_in_flight <= 2 && res.peak_in_flight >= 1);
    assert_eq!(res.output_tokens, 36);
    // Every one of the 3 clients sends its 4 requests one after another:
    // with no bound but the clients, the server sees at most 3 at once.
    let (ep, seen) = mock(Duration::from_millis(30)).await;
    let plan = Plan::Clients((0..3).map(|_| (0..4).map(|_| r("all")).collect()).collect());
    run_phase(
        &ep,
        &phase(plan),
        &limits(100, 100, Duration::from_secs(60)),
        &ProgressBar::hidden(),
    )
    .await;
    assert!(seen.peak.load(Ordering::SeqCst) <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_cap_and_the_deadline_stop_sending() {
    let (ep, seen) = mock(Duration::from_millis(5)).await;
    let plan = Plan::Waves(vec![(0..12).map(|_| r("all")).collect()]);
    let res = run_phase(
        &ep,
        &phase(plan),
        &limits(100, 5, Duration::from_secs(60)),
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!(seen.total.load(Ordering::SeqCst), 5);
    assert_eq!((res.requests, res.not_sent), (5, 7));

    // Open loop: three arrivals now, one long after the phase's time.
    let (ep, seen) = mock(Duration::from_millis(5)).await;
    let plan = Plan::Open {
        rate: 1.0,
        arrivals: vec![0.0, 0.01, 0.02, 3_600.0],
        reqs: (0..4).map(|_| r("all")).collect(),
    };
    let res = run_phase(
        &ep,
        &phase(plan),
        &limits(100, 100, Duration::from_millis(500)),
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!(seen.total.load(Ordering::SeqCst), 3);
    assert_eq!((res.requests, res.not_sent, res.rate), (3, 1, Some(1.0)));
    assert!(
        res.duration_s < 60.0,
        "the phase did not wait for the late arrival"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_refused_requests_are_failures_not_hangs() {
    let (ep, _) = mock(Duration::from_secs(3_600)).await;
    let mut l = limits(10, 10, Duration::from_secs(60));
    l.request_timeout = Duration::from_millis(200);
    let res = run_phase(
        &ep,
        &phase(Plan::Waves(vec![vec![r("a"), r("b")]])),
        &l,
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!((res.requests, res.failures), (2, 2));
    assert!(res.errors[0].contains("no end within"), "{:?}", res.errors);

    let (mut ep, _) = mock(Duration::ZERO).await;
    ep.prefix = "/wrong".into();
    let res = run_phase(
        &ep,
        &phase(Plan::Waves(vec![vec![r("a")]])),
        &limits(1, 1, Duration::from_secs(60)),
        &ProgressBar::hidden(),
    )
    .await;
    assert!(res.errors[0].starts_with("HTTP 400"), "{:?}", res.errors);

    // Nobody listening.
    let dead = Endpoint::parse("http://127.0.0.1:9/v1").unwrap();
    let res = run_phase(
        &dead,
        &phase(Plan::Waves(vec![vec![r("a")]])),
        &limits(1, 1, Duration::from_secs(60)),
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!(res.failures, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_resends_the_whole_conversation_each_turn() {
    let (ep, seen) = mock(Duration::ZERO).await;
    let chat = Chat {
        system: Some("sys".into()),
        turns: (0..3)
            .map(|t| (format!("user {t}"), format!("recorded {t}"), 3))
            .collect(),
    };
    let plan = Plan::Chats {
        clients: 1,
        chats: vec![chat.clone()],
        model_replies: true,
    };
    let res = run_phase(
        &ep,
        &phase(plan),
        &limits(4, 100, Duration::from_secs(60)),
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!(res.requests, 3);
    assert_eq!(res.ttft_by_tag_ms.get("first").map(|d| d.n), Some(1));
    assert_eq!(res.ttft_by_tag_ms.get("later").map(|d| d.n), Some(2));
    let bodies = seen.bodies.lock().await.clone();
    let lens: Vec<usize> = bodies
        .iter()
        .map(|b| b["messages"].as_array().unwrap().len())
        .collect();
    assert_eq!(lens, vec![2, 4, 6], "system, then user/assistant pairs");
    assert_eq!(
        bodies[2]["messages"][2]["content"], "one two three",
        "the model's own reply"
    );
    assert_eq!(bodies[0]["stream"], true);
    assert_eq!(bodies[0]["ignore_eos"], true);
    assert_eq!(bodies[0]["max_tokens"], 3);

    let (ep, seen) = mock(Duration::ZERO).await;
    let plan = Plan::Chats {
        clients: 1,
        chats: vec![chat],
        model_replies: false,
    };
    run_phase(
        &ep,
        &phase(plan),
        &limits(4, 100, Duration::from_secs(60)),
        &ProgressBar::hidden(),
    )
    .await;
    let bodies = seen.bodies.lock().await.clone();
    assert_eq!(
        bodies[2]["messages"][2]["content"], "recorded 0",
        "the file's reply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latencies_are_timed_where_the_bytes_arrive() {
    let style = Style {
        delay: Duration::from_millis(150),
        gap: Duration::from_millis(60),
        ..Style::default()
    };
    let (ep, _) = mock_with(style).await;
    let res = run_phase(
        &ep,
        &phase(Plan::Waves(vec![vec![r("a")]])),
        &limits(1, 1, Duration::from_secs(60)),
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!(res.failures, 0, "{:?}", res.errors);
    assert!(
        res.ttft_ms.p50 >= 150.0 && res.ttft_ms.p50 < 20_000.0,
        "TTFT {}",
        res.ttft_ms.p50
    );
    assert_eq!(res.itl_ms.n, 2);
    assert!(
        res.itl_ms.p50 >= 55.0,
        "the gaps between chunks are {:?}",
        res.itl_ms
    );
    assert!(res.e2e_ms.p50 >= 270.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_ends_at_done_and_a_timeout_keeps_what_arrived() {
    // A server that holds the connection an hour after [DONE]: the
    // request is done at [DONE].
    let (ep, _) = mock_with(Style {
        linger: Duration::from_secs(3_600),
        ..Style::default()
    })
    .await;
    let mut l = limits(1, 1, Duration::from_secs(60));
    l.request_timeout = Duration::from_secs(20);
    let res = run_phase(
        &ep,
        &phase(Plan::Waves(vec![vec![r("a")]])),
        &l,
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!(res.failures, 0, "{:?}", res.errors);
    assert!(res.e2e_ms.max < 10_000.0);

    // One chunk, then silence: a failure, but its first token is kept.
    let (ep, _) = mock_with(Style {
        hang_after_first: true,
        ..Style::default()
    })
    .await;
    l.request_timeout = Duration::from_millis(300);
    let res = run_phase(
        &ep,
        &phase(Plan::Waves(vec![vec![r("a")]])),
        &l,
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!(res.failures, 1);
    assert!(res.errors[0].contains("no end within"));
    assert_eq!(
        res.ttft_by_tag_ms.len(),
        0,
        "a failure is not in the latency figures"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_latency_counts_from_the_planned_arrival() {
    // One place in flight, a server that takes 200 ms, two arrivals at
    // time 0: the second waits 200 ms for its place, and that wait is
    // part of its TTFT (no coordinated omission).
    let (ep, _) = mock(Duration::from_millis(200)).await;
    let plan = Plan::Open {
        rate: f64::INFINITY,
        arrivals: vec![0.0, 0.0],
        reqs: vec![r("all"), r("all")],
    };
    let res = run_phase(
        &ep,
        &phase(plan),
        &limits(1, 10, Duration::from_secs(60)),
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!(res.requests, 2);
    assert!(res.ttft_ms.p50 >= 190.0, "{:?}", res.ttft_ms);
    assert!(
        res.ttft_ms.max >= 390.0,
        "the queued request's TTFT {:?} leaves out its wait",
        res.ttft_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharegpt_file_replays_turn_by_turn_with_its_own_replies() {
    let file = serde_json::json!([
        {"id": "a", "conversations": [
            {"from": "human", "value": "first question"},
            {"from": "gpt", "value": "a recorded answer of forty bytes or so.."},
            {"from": "human", "value": "second question"},
            {"from": "gpt", "value": "short"}
        ]},
        {"id": "b", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}
    ]);
    let convs = strata_bench::sharegpt::parse(&file.to_string()).unwrap();
    let w = strata_bench::workload::sharegpt(&convs, 2, 10, 256);
    let (ep, seen) = mock(Duration::ZERO).await;
    let res = run_phase(
        &ep,
        &w.phases[0],
        &limits(4, 100, Duration::from_secs(60)),
        &ProgressBar::hidden(),
    )
    .await;
    assert_eq!((res.requests, res.failures), (3, 0), "{:?}", res.errors);
    let bodies = seen.bodies.lock().await.clone();
    let second = bodies
        .iter()
        .find(|b| b["messages"].as_array().unwrap().len() == 3)
        .unwrap();
    assert_eq!(
        second["messages"][1]["content"],
        "a recorded answer of forty bytes or so.."
    );
    // Output lengths follow the recorded replies (4 bytes a token).
    let mut lens: Vec<u64> = bodies
        .iter()
        .map(|b| b["max_tokens"].as_u64().unwrap())
        .collect();
    lens.sort_unstable();
    assert_eq!(lens, vec![1, 2, 10]);
}
