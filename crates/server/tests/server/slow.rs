//! Slow and stalled clients (issue 6/10): connections trickling headers
//! (slowloris), bodies that never finish, and more connections than the
//! cap. The server keeps answering others, and closes what it must.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::TestServer;

fn connect(s: &TestServer) -> TcpStream {
    let addr = s.server().addr();
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c
}

/// Reads until the server closes the connection; returns what it sent
/// and how long that took. A read timeout (the server kept it open) fails.
fn until_closed(mut c: TcpStream) -> (String, Duration) {
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A reset is closed too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server kept the connection open: {e}"),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), t.elapsed())
}

/// Headers that never finish hold a connection only until the header
/// timeout, and never delay anyone else meanwhile.
#[test]
fn connections_trickling_headers_are_closed_and_never_stall_others() {
    let s = TestServer::tiny(&["--header-timeout", "1", "--max-connections", "256"]);
    let lorises: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
                .unwrap();
            c
        })
        .collect();
    let t = Instant::now();
    assert_eq!(s.get("/health").status, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    for c in lorises {
        let (_, took) = until_closed(c);
        assert!(took < Duration::from_secs(15), "{took:?}");
    }
    // A keep-alive connection left idle is closed the same way.
    let mut idle = connect(&s);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (reply, _) = until_closed(idle);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(s.get("/health").status, 200);
}

/// A body that never finishes gets 408 after the body timeout; the handler
/// is not held.
#[test]
fn a_body_that_never_finishes_gets_408() {
    let s = TestServer::tiny(&["--body-timeout", "0.5"]);
    let mut c = connect(&s);
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ",
    )
    .unwrap();
    // One more byte now and then: a per-gap timeout would never fire.
    let writer = {
        let mut c = c.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..10 {
                std::thread::sleep(Duration::from_millis(200));
                if c.write_all(b" ").is_err() {
                    break;
                }
            }
        })
    };
    let (reply, took) = until_closed(c);
    writer.join().unwrap();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("timeout_error"), "{reply}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    s.wait_idle();
    let st = s.server().stats().unwrap();
    assert_eq!(st.pool.owned + st.pool.quarantined, 0, "{st:?}");
}

/// Past the connection cap, a new connection is closed at once (not
/// queued behind the others); when connections close, new ones are served.
#[test]
fn connections_past_the_cap_are_closed_at_once() {
    let s = TestServer::tiny(&["--max-connections", "8", "--header-timeout", "60"]);
    // Eight keep-alive connections, each answered once (so each is surely
    // accepted and counted), then left open.
    let held: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while !String::from_utf8_lossy(&got).contains("\"ok\"}") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf[..n]);
            }
            c
        })
        .collect();
    let mut extra = connect(&s);
    let _ = extra.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    let (reply, took) = until_closed(extra);
    assert!(reply.is_empty(), "{reply}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    drop(held);
    let start = Instant::now();
    loop {
        let mut c = connect(&s);
        c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (reply, _) = until_closed(c);
        if reply.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never served again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client that stops reading a large answer: the server's writes back
/// up, and after the write timeout it gives up the connection instead of
/// holding it (and the answer) forever; others are served meanwhile. (The
/// engine's side, pausing a stream whose client reads nothing, is the
/// scheduler's `a_request_whose_client_stops_reading_pauses_and_resumes`.)
#[test]
fn a_client_that_stops_reading_is_disconnected_after_the_write_timeout() {
    let s = TestServer::tiny(&["--write-timeout", "1", "--max-body", "16MiB"]);
    // A 13-byte special token, three million times: an answer of 39 MB,
    // far more than the sockets buffer.
    let vocab = s
        .post(
            "/tokenize",
            &serde_json::json!({"content": "<|endoftext|>"}),
        )
        .json()["tokens"][0]
        .as_u64()
        .unwrap();
    let body = serde_json::json!({"tokens": vec![vocab; 3_000_000]}).to_string();
    let full = s
        .post(
            "/detokenize",
            &serde_json::json!({"tokens": vec![vocab; 1000]}),
        )
        .body
        .len();
    let mut c = connect(&s);
    write!(
        c,
        "POST /detokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    assert!(c.read(&mut first).unwrap() > 0, "the answer started");
    // Now read nothing for a while; others are served meanwhile.
    let t = Instant::now();
    assert_eq!(s.get("/health").status, 200);
    assert!(t.elapsed() < Duration::from_secs(1));
    std::thread::sleep(Duration::from_secs(3));
    let (rest, _) = until_closed(c);
    let expected = full * 3_000; // the answer for 3,000,000 ids
    assert!(
        rest.len() + 64 < expected / 2,
        "got {} of about {expected} bytes: the server never gave up",
        rest.len()
    );
    assert_eq!(s.get("/health").status, 200);
}

/// With API keys set, a request without a key is answered and its
/// connection closed (strangers cannot hold the cap with keep-alive); a
/// client with a key keeps its connection.
#[test]
fn without_a_key_a_connection_lasts_one_request() {
    let s = TestServer::tiny(&["--api-key", "key-one-1", "--header-timeout", "60"]);
    let mut c = connect(&s);
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (reply, took) = until_closed(c);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let mut c = connect(&s);
    c.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n\r\n")
        .unwrap();
    let (reply, _) = until_closed(c);
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    // With the key: two requests on one connection.
    let mut c = connect(&s);
    for _ in 0..2 {
        c.write_all(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-one-1\r\n\r\n",
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !String::from_utf8_lossy(&got).contains("\"data\"") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "closed a keyed connection");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    }
}
