//! One streamed request to an OpenAI-compatible endpoint, timed chunk by
//! chunk: time to the first token, the gaps between tokens, the whole
//! request, and what the server reports in `usage` (llama-server's
//! `timings.cache_n` stands in for `cached_tokens` where it gives no
//! `prompt_tokens_details`).

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpStream;

use crate::sse::SseParser;

/// Where requests go: `http://HOST:PORT/PREFIX` (plain HTTP: the bench
/// drives servers on this machine or a trusted network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The path before `/chat/completions`, like `/v1`.
    pub prefix: String,
    /// Sent as `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
}

impl Endpoint {
    /// Parses `http://host:port/v1` (port 80 if none; the path is kept as
    /// the prefix, without a trailing `/`).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let port_of = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("{url:?}: the port {p:?} is not a number"))
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: no ']' after an IPv6 address"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, port_of(p)?),
                None => (h, 80),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, port_of(p)?),
                None => (authority, 80),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
            api_key: None,
        })
    }

    /// `host:port`, for the `Host` header.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What one request did. Times are in seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// A tag of the workload's (like `question 1` or `turn 3`).
    pub tag: String,
    /// When it was sent, from the start of its phase.
    pub sent_at: f64,
    /// Why it failed (`None`: it succeeded).
    pub error: Option<String>,
    /// Time to the first chunk with text.
    pub ttft: Option<f64>,
    /// Gaps between chunks with text, as they arrive (vLLM's ITL: a chunk
    /// is usually one token; chunks that arrive in one read share a time).
    pub itl: Vec<f64>,
    /// Time to the end of the stream.
    pub e2e: f64,
    /// Output tokens (`usage.completion_tokens`, else chunks with text).
    pub output_tokens: u64,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: Option<u64>,
    /// Prompt tokens the server says it found cached.
    pub cached_tokens: Option<u64>,
    /// The text generated.
    #[serde(skip)]
    pub text: String,
}

impl Outcome {
    /// Decode tokens per second after the first token, `(tokens - 1) /
    /// (e2e - ttft)`, the inverse of vLLM's TPOT (`None` with fewer than
    /// two tokens).
    pub fn decode_rate(&self) -> Option<f64> {
        let ttft = self.ttft?;
        let span = self.e2e - ttft;
        (self.error.is_none() && self.output_tokens >= 2 && span > 0.0)
            .then(|| (self.output_tokens - 1) as f64 / span)
    }
}

/// Folds the events of one stream into an [`Outcome`]: the part of the
/// client that needs no network, so that tests can feed it.
#[derive(Debug, Default)]
pub struct StreamState {
    parser: SseParser,
    out: Outcome,
    chunks: u64,
    last: Option<f64>,
    done: bool,
    completion_tokens: Option<u64>,
}

impl StreamState {
    /// Feeds bytes that arrived `at` seconds after the request was sent.
    pub fn push(&mut self, bytes: &[u8], at: f64) {
        let events = self.parser.push(bytes);
        if self.parser.overflowed() && self.out.error.is_none() {
            self.out.error = Some(format!(
                "a stream line passed {} bytes",
                crate::sse::MAX_LINE
            ));
        }
        for data in events {
            self.event(&data, at);
        }
    }

    /// Whether `[DONE]` (or an error) has ended the stream.
    pub fn ended(&self) -> bool {
        self.done || self.out.error.is_some()
    }

    fn event(&mut self, data: &str, at: f64) {
        if self.done || self.out.error.is_some() {
            return;
        }
        if data.trim() == "[DONE]" {
            self.done = true;
            return;
        }
        let v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                self.out.error = Some(format!("a stream event is not JSON ({e}): {data:.200}"));
                return;
            }
        };
        if let Some(err) = v.get("error") {
            let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
            self.out.error = Some(format!("error in the stream: {msg:.300}"));
            return;
        }
        let choice = v.get("choices").and_then(|c| c.get(0));
        let text = choice.and_then(|c| {
            c.get("delta")
                .and_then(|d| d.get("content"))
                .or_else(|| c.get("text"))
                .and_then(Value::as_str)
        });
        if let Some(t) = text.filter(|t| !t.is_empty()) {
            match self.last {
                None => self.out.ttft = Some(at),
                Some(prev) => self.out.itl.push(at - prev),
            }
            self.last = Some(at);
            self.chunks += 1;
            self.out.text.push_str(t);
        }
        let usage = v.get("usage").filter(|u| !u.is_null());
        if let Some(u) = usage {
            let n = |k: &str| u.get(k).and_then(Value::as_u64);
            self.completion_tokens = n("completion_tokens").or(self.completion_tokens);
            self.out.prompt_tokens = n("prompt_tokens").or(self.out.prompt_tokens);
            if let Some(c) = u
                .get("prompt_tokens_details")
                .and_then(|d| d.get("cached_tokens"))
                .and_then(Value::as_u64)
            {
                self.out.cached_tokens = Some(c);
            }
        }
        if self.out.cached_tokens.is_none()
            && let Some(c) = v
                .get("timings")
                .and_then(|t| t.get("cache_n"))
                .and_then(Value::as_u64)
        {
            self.out.cached_tokens = Some(c);
        }
    }

    /// The outcome of a stream that ended `at` seconds after it was sent.
    pub fn finish(mut self, at: f64) -> Outcome {
        self.out.e2e = at;
        self.out.output_tokens = self.completion_tokens.unwrap_or(self.chunks);
        if self.out.error.is_none() && !self.done {
            self.out.error = Some("the stream ended without [DONE]".into());
        }
        self.out
    }
}

/// Sends `body` (with `"stream": true`) to `path` under the endpoint and
/// reads the whole stream, within `timeout`. Never panics: every failure
/// (connection, status, stream, timeout) is the outcome's `error`.
pub async fn stream(ep: &Endpoint, path: &str, body: &Value, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let state = std::sync::Mutex::new(StreamState::default());
    let result = tokio::time::timeout(timeout, stream_inner(ep, path, body, start, &state)).await;
    match result {
        Ok(out) => out,
        Err(_) => {
            // What had arrived is kept (its first token, its tokens); the
            // request is still a failure.
            let st = std::mem::take(
                &mut *state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            let mut out = st.finish(start.elapsed().as_secs_f64());
            out.error = Some(format!("no end within {:.0} s", timeout.as_secs_f64()));
            out
        }
    }
}

async fn stream_inner(
    ep: &Endpoint,
    path: &str,
    body: &Value,
    start: Instant,
    state: &std::sync::Mutex<StreamState>,
) -> Outcome {
    let failed = |e: String| Outcome {
        error: Some(e),
        e2e: start.elapsed().as_secs_f64(),
        ..Outcome::default()
    };
    let tcp = match TcpStream::connect((ep.host.as_str(), ep.port)).await {
        Ok(t) => t,
        Err(e) => return failed(format!("cannot connect to {}: {e}", ep.authority())),
    };
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
        Ok(x) => x,
        Err(e) => return failed(format!("HTTP handshake: {e}")),
    };
    let conn = tokio::spawn(conn);
    let mut req = Request::post(format!("{}{path}", ep.prefix))
        .header(header::HOST, ep.authority())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "text/event-stream");
    if let Some(k) = &ep.api_key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = match req.body(Full::new(Bytes::from(body.to_string()))) {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot build the request: {e}")),
    };
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return failed(format!("sending: {e}")),
    };
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        // The first frames of the body say why; a server that sends more
        // is not read further.
        let mut text = Vec::new();
        while text.len() < 4_096 {
            match body.frame().await {
                Some(Ok(f)) => text.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
                _ => break,
            }
        }
        conn.abort();
        return failed(format!(
            "HTTP {}: {:.300}",
            status.as_u16(),
            String::from_utf8_lossy(&text)
        ));
    }
    // The stream's state lives outside this future, so that a timeout
    // keeps what had arrived (the first token, the tokens so far); the lock
    // is held only between awaits.
    let lock = || {
        state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    while !lock().ended() {
        let Some(frame) = body.frame().await else {
            break;
        };
        match frame {
            Ok(f) => {
                if let Some(data) = f.data_ref() {
                    lock().push(data, start.elapsed().as_secs_f64());
                }
            }
            Err(e) => {
                let mut out = std::mem::take(&mut *lock()).finish(start.elapsed().as_secs_f64());
                out.error = Some(format!("reading the stream: {e}"));
                conn.abort();
                return out;
            }
        }
    }
    conn.abort();
    std::mem::take(&mut *lock()).finish(start.elapsed().as_secs_f64())
}

/// A plain request (for `/tokenize`, `/health`, `/metrics`): the status
/// and body of `method path` with an optional JSON body, within `timeout`.
pub async fn request(
    ep: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let run = async {
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", ep.authority()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, ep.authority())
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(k) = &ep.api_key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = req.body(Full::new(bytes)).map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading: {e}"))?
            .to_bytes();
        conn.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| format!("no answer within {:.0} s", timeout.as_secs_f64()))?
}
