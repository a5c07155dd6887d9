//! One generation in progress: reading its events, and what every answer
//! (whole or streamed) needs from them. `submit.rs` starts one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde_json::{Value, json};
use strata_engine::{Event, FinishReason, RequestHandle, Usage};
use strata_kv::TokenId;
use strata_model::{ChatMessage, Detokenizer, Sampled, Tokenizer};

use super::Shared;
use super::logprobs::TextLogprobs;
use super::sessions::release_session;
use crate::error::ApiError;
use crate::metrics::Reason;
use crate::openai::tools::{ToolFormat, ToolSet};
use crate::state::{Loaded, random_hex, unix_now};

/// A request's id: random, so ids say nothing about how many requests
/// others made or when.
pub(super) fn request_id(prefix: &str) -> String {
    format!("{prefix}-{}", random_hex(12))
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
    /// Its choice's index (`n > 1`).
    pub(super) index: u32,
    pub(super) logprobs: Option<usize>,
    pub(super) arrival: Instant,
    /// Unix seconds when the request arrived (OpenAI's `created`).
    pub(super) created: u64,
    pub(super) deadline: tokio::time::Instant,
    pub(super) last_token: Option<Instant>,
    pub(super) text: String,
    /// The latest generated token (a session turn that ends with an
    /// end-of-sequence token holds the template's closing marker).
    pub(super) last: Option<TokenId>,
    /// Completions with `echo`: the prompt text goes first.
    pub(super) echo: Option<String>,
    /// Completions with `echo` and `logprobs`: the prompt, scored.
    pub(super) scored: Option<ScoredPrompt>,
    /// Nothing generated is shown or counted (`max_tokens: 0`).
    pub(super) prompt_only: bool,
    pub(super) turn: Option<Turn>,
    pub(super) tenant: usize,
    pub(super) finished: bool,
    /// The tools the answer may call, and the format calls come in.
    pub(super) tools: Option<(Arc<ToolSet>, ToolFormat)>,
    /// The log-probability of its tokens so far (`best_of` ranks by it).
    pub(super) logprob_sum: f64,
}

/// A prompt whose tokens' log-probabilities the answer shows.
pub(super) struct ScoredPrompt {
    pub(super) tokens: Vec<TokenId>,
    /// The first token is a BOS the prompt text does not hold.
    pub(super) added_bos: bool,
    /// The engine's scores of `tokens[1..]`, as they come.
    pub(super) scores: Vec<Sampled>,
}

impl ScoredPrompt {
    /// The prompt's entries of completions' `logprobs`: the first token
    /// has none; offsets count characters of the echoed text.
    pub(super) fn logprobs(&self, tok: &Tokenizer) -> TextLogprobs {
        let mut lp = TextLogprobs::default();
        // The echoed text holds control tokens' text too (as written).
        let mut text = Detokenizer::default();
        let mut chars = 0;
        for (i, &t) in self.tokens.iter().enumerate() {
            let score = i.checked_sub(1).and_then(|j| self.scores.get(j));
            lp.push_prompt(tok, chars, t, score.map(|s| (s.logprob, &s.top[..])));
            if i > 0 || !self.added_bos {
                chars += text.push_bytes(tok.token_bytes(t)).chars().count();
            }
        }
        lp
    }
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
                    return Err(self.engine_gone());
                }
                Ok(Some(ev)) => ev,
            };
            match ev {
                Event::PromptLogprobs(v) => {
                    if let Some(s) = self.scored.as_mut() {
                        s.scores.extend(v);
                    }
                }
                // The one token a prompt-only request samples.
                Event::Token { .. } if self.prompt_only => {}
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
                    self.logprob_sum += f64::from(logprob);
                    self.text.push_str(&text);
                    self.last = Some(id);
                    return Ok(Step::Token {
                        id,
                        logprob,
                        top,
                        text,
                    });
                }
                Event::Finished {
                    mut reason,
                    mut usage,
                } => {
                    if self.prompt_only && reason == FinishReason::Stop {
                        reason = FinishReason::Length;
                    }
                    if self.prompt_only {
                        usage.completion_tokens = 0;
                    }
                    let m = &self.state.metrics;
                    m.prompt_tokens.inc_by(usage.prompt_tokens as u64);
                    m.generation_tokens.inc_by(usage.completion_tokens as u64);
                    let name = match &reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                        FinishReason::Abort => "abort",
                        FinishReason::Error(_) => "error",
                        FinishReason::Grammar(_) => "grammar",
                        FinishReason::Timeout => "timeout",
                    };
                    // The session learns the turn before it is free again,
                    // so the next turn never sees the history without it.
                    if matches!(reason, FinishReason::Stop | FinishReason::Length) {
                        self.record_turn();
                    }
                    self.end(name);
                    self.log(name, &usage);
                    return match reason {
                        FinishReason::Stop | FinishReason::Length => Ok(Step::Done {
                            reason: name,
                            usage,
                        }),
                        // The engine ends it at the deadline, read or not.
                        FinishReason::Timeout => Err(ApiError::timeout(
                            self.state.args.request_timeout.as_secs_f64(),
                        )),
                        // The session was deleted during its turn (the turn
                        // was aborted, or reached the engine after it).
                        FinishReason::Abort | FinishReason::Error(_) if self.session_gone() => {
                            Err(ApiError::not_found(
                                "session_not_found",
                                "the session was deleted during its turn",
                            ))
                        }
                        FinishReason::Abort => Err(ApiError::unavailable(
                            "the request was aborted: the server is shutting down",
                            5,
                        )),
                        FinishReason::Error(e) if !self.loaded.engine.is_alive() => {
                            Err(ApiError::unavailable(
                                format!("the engine stopped ({e}); see the server log"),
                                5,
                            ))
                        }
                        FinishReason::Error(e) => {
                            Err(ApiError::internal(format!("generation failed: {e}")))
                        }
                        // The request's own grammar ended it: its input.
                        FinishReason::Grammar(e) => Err(ApiError::bad_request(e)),
                    };
                }
            }
        }
    }

    /// Whether this is a session turn whose session no longer exists.
    fn session_gone(&self) -> bool {
        self.turn
            .as_ref()
            .is_some_and(|t| !self.state.sessions().contains_key(&t.key))
    }

    /// Why the engine's channel closed: shutting down, or the engine died.
    fn engine_gone(&self) -> ApiError {
        if self.loaded.engine.is_alive() || self.state.stopping.load(Ordering::Relaxed) {
            ApiError::unavailable("the server is shutting down", 5)
        } else {
            ApiError::unavailable("the engine stopped; see the server log", 5)
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
        if let Some(t) = &self.turn {
            record(&self.state, &self.loaded, t, &self.text, self.last);
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
}

/// Records a completed turn in its session.
fn record(state: &Shared, loaded: &Loaded, t: &Turn, text: &str, last: Option<TokenId>) {
    let eos = last.is_some_and(|t| loaded.tokenizer.eos().contains(&t));
    if let Some(s) = state.sessions().get_mut(&t.key) {
        // A completed raw turn makes the session raw (a refused one
        // leaves it as it was).
        s.raw |= t.messages.is_none();
        if let Some(msgs) = &t.messages {
            s.history.extend(msgs.iter().cloned());
            s.history
                .push(ChatMessage::new("assistant", text.to_string()));
        }
        s.ended_with_eos = eos;
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // The client left during a session turn. The engine may have
        // completed the turn already (its session holds it then, and the
        // server's history must too) or may still: abort it, and learn
        // which from its last event, the session busy until then.
        if !self.finished
            && self.turn.is_some()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
            && let Some(mut h) = self.handle.take()
        {
            h.abort();
            let turn = self.turn.take().expect("checked above");
            let (state, loaded) = (self.state.clone(), self.loaded.clone());
            let (mut text, mut last) = (std::mem::take(&mut self.text), self.last);
            rt.spawn(async move {
                let completed = loop {
                    match h.recv().await {
                        Some(Event::Token { id, text: t, .. }) => {
                            text.push_str(&t);
                            last = Some(id);
                        }
                        Some(Event::Finished { reason, .. }) => {
                            break matches!(reason, FinishReason::Stop | FinishReason::Length);
                        }
                        Some(Event::Admitted { .. } | Event::PromptLogprobs(_)) => {}
                        None => break false,
                    }
                };
                if completed {
                    record(&state, &loaded, &turn, &text, last);
                }
                release_session(&state, &turn.key);
            });
        }
        // The client went away (or the handler returned early): dropping
        // the handle aborts the request; its blocks come back.
        self.end("abort");
    }
}

/// When a request arrived (before its body was parsed or tokenized).
#[derive(Clone, Copy)]
pub(super) struct Arrival {
    pub(super) at: Instant,
    pub(super) unix: u64,
}

impl Arrival {
    pub(super) fn now() -> Self {
        Self {
            at: Instant::now(),
            unix: unix_now(),
        }
    }
}
