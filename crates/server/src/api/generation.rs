//! One generation in progress: submitting a checked request to the engine,
//! reading its events, and what every answer (whole or streamed) needs
//! from them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::response::Response;
use serde_json::{Value, json};
use strata_engine::{Event, FinishReason, Request, RequestHandle, Usage};
use strata_kv::TokenId;
use strata_model::{ChatMessage, Tokenizer};

use super::Shared;
use super::sessions::release_session;
use super::stream::respond_stream;
use super::whole::respond_whole;
use crate::error::ApiError;
use crate::metrics::Reason;
use crate::openai::{Checked, Common};
use crate::state::{Loaded, unix_now};

static REQUESTS: AtomicU64 = AtomicU64::new(1);

pub(super) fn request_id(prefix: &str) -> String {
    let n = REQUESTS.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{n:06x}", unix_now())
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    Chat,
    Completion,
}

/// A session turn to record when the generation completes.
pub(super) struct Turn {
    pub(super) key: String,
    /// Chat: the new messages (the reply is appended after them).
    pub(super) messages: Option<Vec<ChatMessage>>,
}

/// One generation in progress, with everything needed to answer it.
pub(super) struct Generation {
    pub(super) state: Shared,
    pub(super) loaded: Arc<Loaded>,
    pub(super) handle: Option<RequestHandle>,
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) logprobs: Option<usize>,
    pub(super) arrival: Instant,
    pub(super) deadline: tokio::time::Instant,
    pub(super) last_token: Option<Instant>,
    pub(super) text: String,
    /// The latest generated token (a session turn that ends with an
    /// end-of-sequence token holds the template's closing marker).
    pub(super) last: Option<TokenId>,
    /// Completions with `echo`: the prompt text goes first.
    pub(super) echo: Option<String>,
    pub(super) turn: Option<Turn>,
    pub(super) tenant: usize,
    pub(super) finished: bool,
}

/// What came out of a generation.
pub(super) enum Step {
    /// A generated token with its text delta.
    Token {
        id: TokenId,
        logprob: f32,
        top: Vec<(TokenId, f32)>,
        text: String,
    },
    /// The end.
    Done { reason: &'static str, usage: Usage },
}

impl Generation {
    /// The next token or the end; an error if the request failed, was
    /// aborted, or ran out of time.
    pub(super) async fn next(&mut self) -> Result<Step, ApiError> {
        loop {
            let Some(h) = self.handle.as_mut() else {
                return Err(ApiError::internal("the generation already ended"));
            };
            let ev = match tokio::time::timeout_at(self.deadline, h.recv()).await {
                Err(_) => {
                    self.end("timeout");
                    return Err(ApiError::timeout(
                        self.state.args.request_timeout.as_secs_f64(),
                    ));
                }
                Ok(None) => {
                    self.end("abort");
                    return Err(ApiError::unavailable("the server is shutting down", 5));
                }
                Ok(Some(ev)) => ev,
            };
            match ev {
                Event::Admitted { .. } => {
                    self.state
                        .metrics
                        .queue
                        .observe(self.arrival.elapsed().as_secs_f64());
                }
                Event::Token {
                    id,
                    logprob,
                    top,
                    text,
                } => {
                    let now = Instant::now();
                    match self.last_token {
                        None => self
                            .state
                            .metrics
                            .ttft
                            .observe((now - self.arrival).as_secs_f64()),
                        Some(t) => self.state.metrics.itl.observe((now - t).as_secs_f64()),
                    }
                    self.last_token = Some(now);
                    self.text.push_str(&text);
                    self.last = Some(id);
                    return Ok(Step::Token {
                        id,
                        logprob,
                        top,
                        text,
                    });
                }
                Event::Finished { reason, usage } => {
                    let m = &self.state.metrics;
                    m.prompt_tokens.inc_by(usage.prompt_tokens as u64);
                    m.generation_tokens.inc_by(usage.completion_tokens as u64);
                    let name = match &reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                        FinishReason::Abort => "abort",
                        FinishReason::Error(_) => "error",
                    };
                    self.end(name);
                    self.log(name, &usage);
                    return match reason {
                        FinishReason::Stop | FinishReason::Length => {
                            self.record_turn();
                            Ok(Step::Done {
                                reason: name,
                                usage,
                            })
                        }
                        FinishReason::Abort => Err(match &self.turn {
                            Some(t) if !self.state.sessions().contains_key(&t.key) => {
                                ApiError::not_found(
                                    "session_not_found",
                                    "the session was deleted during its turn",
                                )
                            }
                            _ => ApiError::unavailable(
                                "the request was aborted: the server is shutting down",
                                5,
                            ),
                        }),
                        FinishReason::Error(e) => {
                            Err(ApiError::internal(format!("generation failed: {e}")))
                        }
                    };
                }
            }
        }
    }

    /// Marks the generation over (metrics, the session's busy flag).
    fn end(&mut self, reason: &'static str) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.handle = None;
        let m = &self.state.metrics;
        m.e2e.observe(self.arrival.elapsed().as_secs_f64());
        m.finished
            .get_or_create(&Reason {
                finished_reason: reason,
            })
            .inc();
        if let Some(t) = &self.turn {
            release_session(&self.state, &t.key);
        }
    }

    /// A completed session turn: the session remembers the new messages and
    /// the reply.
    fn record_turn(&mut self) {
        let Some(t) = &self.turn else {
            return;
        };
        let eos = self
            .last
            .as_ref()
            .is_some_and(|t| self.loaded.tokenizer.eos().contains(t));
        if let Some(s) = self.state.sessions().get_mut(&t.key) {
            if let Some(msgs) = &t.messages {
                s.history.extend(msgs.iter().cloned());
                s.history
                    .push(ChatMessage::new("assistant", self.text.clone()));
            }
            s.ended_with_eos = eos;
        }
    }

    fn log(&self, reason: &str, usage: &Usage) {
        tracing::info!(
            id = %self.id,
            tenant = %match self.tenant {
                usize::MAX => "anonymous".to_string(),
                i => format!("key {}", i + 1),
            },
            prompt_tokens = usage.prompt_tokens,
            cached_tokens = usage.cached_tokens,
            completion_tokens = usage.completion_tokens,
            reason,
            seconds = self.arrival.elapsed().as_secs_f64(),
            "request finished"
        );
        if self.state.args.log_text {
            tracing::info!(id = %self.id, completion = %self.text, "completion text");
        }
    }

    pub(super) fn usage_json(u: &Usage) -> Value {
        json!({
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        })
    }

    pub(super) fn token_text(tok: &Tokenizer, t: TokenId) -> (String, Vec<u8>) {
        let b = tok.token_bytes(t).to_vec();
        (String::from_utf8_lossy(&b).into_owned(), b)
    }

    /// Chat logprobs entry of one token.
    pub(super) fn chat_logprob(&self, id: TokenId, logprob: f32, top: &[(TokenId, f32)]) -> Value {
        let tok = &self.loaded.tokenizer;
        let entry = |t: TokenId, lp: f32| {
            let (s, b) = Self::token_text(tok, t);
            json!({"token": s, "logprob": lp, "bytes": b})
        };
        let mut v = entry(id, logprob);
        v["top_logprobs"] = Value::Array(top.iter().map(|&(t, lp)| entry(t, lp)).collect());
        v
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // The client went away (or the handler returned early): dropping
        // the handle aborts the request; its blocks come back.
        self.end("abort");
    }
}

/// Completion-style logprobs, accumulated.
#[derive(Default)]
pub(super) struct TextLogprobs {
    pub(super) tokens: Vec<String>,
    pub(super) token_logprobs: Vec<f32>,
    pub(super) top: Vec<serde_json::Map<String, Value>>,
    pub(super) offsets: Vec<usize>,
}

impl TextLogprobs {
    pub(super) fn push(
        &mut self,
        tok: &Tokenizer,
        offset: usize,
        id: TokenId,
        lp: f32,
        top: &[(TokenId, f32)],
    ) {
        self.tokens.push(Generation::token_text(tok, id).0);
        self.token_logprobs.push(lp);
        self.top.push(
            top.iter()
                .map(|&(t, l)| (Generation::token_text(tok, t).0, json!(l)))
                .collect(),
        );
        self.offsets.push(offset);
    }

    pub(super) fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top,
            "text_offset": self.offsets,
        })
    }
}

/// What a handler hands to [`submit`].
pub(super) struct Submission {
    pub(super) kind: Kind,
    pub(super) prompt: Vec<TokenId>,
    pub(super) checked: Checked,
    pub(super) logprobs: Option<usize>,
    pub(super) salt: Option<Vec<u8>>,
    pub(super) turn: Option<(Turn, strata_engine::SessionId)>,
    pub(super) echo: Option<String>,
    pub(super) tenant: usize,
}

/// Submits a checked request and answers it, streamed or whole.
pub(super) async fn submit(
    state: Shared,
    loaded: Arc<Loaded>,
    common: &Common,
    sub: Submission,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    let (turn, session) = match sub.turn {
        Some((t, s)) => (Some(t), Some(s)),
        None => (None, None),
    };
    let req = Request {
        prompt: sub.prompt,
        sampling: sub.checked.sampling,
        stop: sub.checked.stop,
        cache_salt: sub.salt,
        session,
    };
    let handle = match loaded.engine.submit(req) {
        Ok(h) => h,
        Err(e) => {
            if let Some(t) = &turn {
                release_session(&state, &t.key);
            }
            return Err(e.into());
        }
    };
    let g = Generation {
        deadline: tokio::time::Instant::now() + state.args.request_timeout,
        state,
        loaded,
        handle: Some(handle),
        kind: sub.kind,
        id: request_id(match sub.kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        }),
        logprobs: sub.logprobs,
        arrival,
        last_token: None,
        text: String::new(),
        last: None,
        echo: sub.echo,
        turn,
        tenant: sub.tenant,
        finished: false,
    };
    if common.stream {
        let include_usage = common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        Ok(respond_stream(g, include_usage))
    } else {
        // This future is the handler's: if the client disconnects, axum
        // drops it, and with it the generation (which aborts).
        respond_whole(g).await
    }
}
