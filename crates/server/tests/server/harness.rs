//! A server started in-process on 127.0.0.1 (port 0), and a small blocking
//! HTTP client for it.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::Value;
use strata_server::Server;
use strata_server::cli::{Cli, Command};
use strata_testkit::tiny_model::{self, TinyConfig};

pub(crate) struct TestServer {
    rt: tokio::runtime::Runtime,
    server: Option<Server>,
    pub(crate) base: String,
    agent: ureq::Agent,
    /// The key requests send unless told otherwise.
    pub(crate) key: Option<String>,
}

/// What came back.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<String>,
    pub(crate) body: String,
    headers: Vec<(String, String)>,
}

impl Reply {
    /// A response header's value.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The OpenAI error type, checking the error's shape.
    pub(crate) fn error_type(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        e["type"].as_str().unwrap().to_string()
    }
}

impl TestServer {
    /// The tiny model with `flags` (as on the command line).
    pub(crate) fn tiny(flags: &[&str]) -> Self {
        let path = tiny_model::path(TinyConfig::default());
        let mut args = vec![
            "--model",
            path.to_str().unwrap(),
            "--served-model-name",
            "tiny",
        ];
        args.extend_from_slice(&[
            "--kv-blocks",
            "256",
            "--block-size",
            "4",
            "--sanitize",
            "--threads",
            "1",
        ]);
        args.extend_from_slice(flags);
        Self::start(&args)
    }

    /// The real default model (fetched by `strata fetch-model` or an
    /// earlier test; the tests never fetch it themselves in CI's order).
    pub(crate) fn real(flags: &[&str]) -> Self {
        let path = strata_model::default_model::ensure(&mut |l| eprintln!("{l}"))
            .unwrap_or_else(|e| panic!("the real-model tests need the default model: {e}"));
        let mut args = vec![
            "--model",
            path.to_str().unwrap(),
            "--threads",
            "2",
            "--kv-memory",
            "256MiB",
        ];
        args.extend_from_slice(flags);
        Self::start(&args)
    }

    fn start(flags: &[&str]) -> Self {
        let mut argv = vec!["strata", "serve", "--host", "127.0.0.1", "--port", "0"];
        if !flags.contains(&"--ssd-cache-size") {
            // Tests share the user's cache directory: no SSD tier there,
            // unless a test names its own directory.
            argv.extend_from_slice(&["--ssd-cache-size", "0"]);
        }
        argv.extend_from_slice(flags);
        let args = match <Cli as clap::Parser>::parse_from(argv).command {
            Command::Serve(a) => *a,
            _ => unreachable!(),
        };
        let key = args.api_keys.first().cloned();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut server = rt.block_on(Server::start(args, Box::new(|_| {}))).unwrap();
        rt.block_on(server.ready()).unwrap();
        let base = format!("http://{}", server.addr());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Self {
            rt,
            server: Some(server),
            base,
            agent,
            key,
        }
    }

    pub(crate) fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
        let mut r = r.unwrap();
        Reply {
            status: r.status().as_u16(),
            retry_after: r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string()),
            headers: r
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body: r.body_mut().read_to_string().unwrap(),
        }
    }

    /// POSTs raw bytes with a content type, as `key`.
    pub(crate) fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
        key: Option<&str>,
    ) -> Reply {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", content_type);
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        Self::reply(req.send(body))
    }

    /// POSTs JSON with the default key.
    pub(crate) fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(
            path,
            "application/json",
            body.to_string().as_bytes(),
            self.key.as_deref(),
        )
    }

    pub(crate) fn get_as(&self, path: &str, key: Option<&str>) -> Reply {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        Self::reply(req.call())
    }

    pub(crate) fn get(&self, path: &str) -> Reply {
        self.get_as(path, self.key.as_deref())
    }

    pub(crate) fn delete(&self, path: &str, key: Option<&str>) -> Reply {
        let mut req = self.agent.delete(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        Self::reply(req.call())
    }

    /// Opens a streamed POST and returns a reader of its SSE data lines.
    pub(crate) fn open_stream(&self, path: &str, body: &Value) -> SseReader {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(k) = &self.key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let r = req.send(body.to_string().as_bytes()).unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let ct = r
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        SseReader {
            lines: BufReader::new(r.into_body().into_reader()),
        }
    }

    /// Every data payload of a stream, `[DONE]` included.
    pub(crate) fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let mut s = self.open_stream(path, body);
        let mut out = Vec::new();
        while let Some(d) = s.next_data() {
            let done = d == "[DONE]";
            out.push(d);
            if done {
                break;
            }
        }
        out
    }

    /// A metric's value from `/metrics` (the first sample of that name).
    pub(crate) fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").body;
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }

    /// Shuts the server down now (as on SIGTERM), with `grace` for what runs.
    pub(crate) fn shutdown(mut self, grace: Duration) {
        let s = self.server.take().unwrap();
        self.rt.block_on(s.shutdown(grace));
    }

    /// Waits until no request is live and no step is in flight.
    pub(crate) fn wait_idle(&self) {
        self.server().wait_idle();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.shutdown(Duration::from_secs(5)));
        }
    }
}

/// Reads server-sent events.
pub(crate) struct SseReader {
    lines: BufReader<ureq::BodyReader<'static>>,
}

impl SseReader {
    /// The next `data:` payload, or `None` at the end.
    pub(crate) fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.lines.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data:") {
                return Some(d.trim_start().to_string());
            }
        }
    }
}
