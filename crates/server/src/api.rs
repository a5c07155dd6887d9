//! The HTTP API: routes, request parsing, authentication, and the
//! completion endpoints (streamed and not).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use strata_engine::{Event, FinishReason, Request, RequestHandle, Usage};
use strata_kv::TokenId;
use strata_model::{ChatMessage, Tokenizer};

use crate::error::ApiError;
use crate::metrics::Reason;
use crate::openai::{self, ChatRequest, Checked, Common, CompletionRequest, Prompt};
use crate::state::{AppState, Loaded, Session, Tenant, unix_now};

type Shared = Arc<AppState>;

/// Every route of the server.
pub(crate) fn router(state: Shared) -> Router {
    let limit = usize::try_from(state.args.max_body).unwrap_or(usize::MAX);
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/sessions", post(create_session).get(list_sessions))
        .route("/v1/sessions/{id}", delete(delete_session))
        .route("/admin/clear_prefix_cache", post(clear_prefix_cache))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::bad_request("this method is not allowed on this endpoint")
    }
}

/// The tenant of a request, or 401.
fn tenant<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a Tenant, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    state.tenant(bearer).ok_or_else(ApiError::unauthorized)
}

/// The loaded model, or 503 while it loads.
fn loaded(state: &AppState) -> Result<Arc<Loaded>, ApiError> {
    state
        .loaded
        .get()
        .cloned()
        .ok_or_else(|| ApiError::unavailable("the model is still loading", 2))
}

/// What every JSON endpoint starts with: the caller's tenant (401), the
/// model (503 while loading), the parsed body.
fn begin<'a, T: DeserializeOwned>(
    state: &'a AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(&'a Tenant, Arc<Loaded>, T), ApiError> {
    let t = tenant(state, headers)?;
    let l = loaded(state)?;
    let req = parse(headers, body, state.args.max_body)?;
    Ok((t, l, req))
}

/// Parses a JSON body: 415 for another content type, 413 over the size
/// limit, 400 for invalid UTF-8 or malformed JSON, 422 for JSON of the wrong
/// shape.
fn parse<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: u64,
) -> Result<T, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                ..ApiError::bad_request(format!("the request body is larger than {limit} bytes"))
            }
        } else {
            ApiError::bad_request(format!("cannot read the request body: {r}"))
        }
    })?;
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ..ApiError::bad_request("send the body as JSON with `Content-Type: application/json`")
        });
    }
    if std::str::from_utf8(&body).is_err() {
        return Err(ApiError::bad_request("the request body is not valid UTF-8"));
    }
    serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            ..ApiError::bad_request(format!("the request does not match the API: {e}"))
        },
        _ => ApiError::bad_request(format!("malformed JSON: {e}")),
    })
}

async fn health(State(state): State<Shared>) -> Response {
    if state.stopping.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    match state.loaded.get() {
        Some(_) => axum::Json(json!({"status": "ok"})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Shared>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

fn model_card(l: &Loaded) -> Value {
    json!({
        "id": l.name,
        "object": "model",
        "created": l.created,
        "owned_by": "strata",
        "max_model_len": l.engine.context(),
    })
}

async fn models(State(state): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    tenant(&state, &headers)?;
    let l = loaded(&state)?;
    Ok(axum::Json(json!({"object": "list", "data": [model_card(&l)]})).into_response())
}

async fn model(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    tenant(&state, &headers)?;
    let l = loaded(&state)?;
    check_model(&l, Some(&id))?;
    Ok(axum::Json(model_card(&l)).into_response())
}

fn check_model(l: &Loaded, asked: Option<&str>) -> Result<(), ApiError> {
    match asked {
        Some(m) if m != l.name => Err(ApiError {
            param: Some("model"),
            ..ApiError::not_found(
                "model_not_found",
                format!(
                    "The model `{m}` does not exist. This server serves `{}`.",
                    l.name
                ),
            )
        }),
        _ => Ok(()),
    }
}

/// The cache salt of a request: the tenant's, combined with the client's
/// if the operator allows client salts.
fn salt(state: &AppState, t: &Tenant, client: Option<&str>) -> Result<Option<Vec<u8>>, ApiError> {
    match client {
        None => Ok(t.salt.clone()),
        Some(_) if !state.args.allow_client_salt => Err(ApiError::invalid(
            "cache_salt",
            "this server does not accept cache_salt from clients (the operator can allow it with --allow-client-salt)",
        )),
        Some(c) => {
            let mut s = t.salt.clone().unwrap_or_default();
            s.extend_from_slice(b"\x00client\x00");
            s.extend_from_slice(c.as_bytes());
            Ok(Some(s))
        }
    }
}

static REQUESTS: AtomicU64 = AtomicU64::new(1);

fn request_id(prefix: &str) -> String {
    let n = REQUESTS.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{n:06x}", unix_now())
}

/// Which endpoint a generation answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Chat,
    Completion,
}

/// A session turn to record when the generation completes.
struct Turn {
    key: String,
    /// Chat: the new messages (the reply is appended after them).
    messages: Option<Vec<ChatMessage>>,
}

/// One generation in progress, with everything needed to answer it.
struct Generation {
    state: Shared,
    loaded: Arc<Loaded>,
    handle: Option<RequestHandle>,
    kind: Kind,
    id: String,
    logprobs: Option<usize>,
    arrival: Instant,
    deadline: tokio::time::Instant,
    last_token: Option<Instant>,
    text: String,
    /// The latest generated token (a session turn that ends with an
    /// end-of-sequence token holds the template's closing marker).
    last: Option<TokenId>,
    /// Completions with `echo`: the prompt text goes first.
    echo: Option<String>,
    turn: Option<Turn>,
    tenant: usize,
    finished: bool,
}

/// What came out of a generation.
enum Step {
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
    async fn next(&mut self) -> Result<Step, ApiError> {
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

    fn usage_json(u: &Usage) -> Value {
        json!({
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        })
    }

    fn token_text(tok: &Tokenizer, t: TokenId) -> (String, Vec<u8>) {
        let b = tok.token_bytes(t).to_vec();
        (String::from_utf8_lossy(&b).into_owned(), b)
    }

    /// Chat logprobs entry of one token.
    fn chat_logprob(&self, id: TokenId, logprob: f32, top: &[(TokenId, f32)]) -> Value {
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
struct TextLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top: Vec<serde_json::Map<String, Value>>,
    offsets: Vec<usize>,
}

impl TextLogprobs {
    fn push(
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

    fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top,
            "text_offset": self.offsets,
        })
    }
}

/// Runs a generation to its end and answers with one JSON object.
async fn respond_whole(mut g: Generation) -> Result<Response, ApiError> {
    let mut chat_lp = Vec::new();
    let mut text_lp = TextLogprobs::default();
    let prefix = g.echo.clone().unwrap_or_default();
    loop {
        match g.next().await? {
            Step::Token {
                id, logprob, top, ..
            } => {
                if g.logprobs.is_some() {
                    match g.kind {
                        Kind::Chat => chat_lp.push(g.chat_logprob(id, logprob, &top)),
                        Kind::Completion => {
                            let offset = prefix.len() + g.text.len();
                            text_lp.push(&g.loaded.tokenizer, offset, id, logprob, &top);
                        }
                    }
                }
            }
            Step::Done { reason, usage } => {
                let usage = Generation::usage_json(&usage);
                let body = match g.kind {
                    Kind::Chat => json!({
                        "id": g.id,
                        "object": "chat.completion",
                        "created": unix_now(),
                        "model": g.loaded.name,
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": g.text},
                            "logprobs": g.logprobs.map(|_| json!({"content": chat_lp})),
                            "finish_reason": reason,
                        }],
                        "usage": usage,
                    }),
                    Kind::Completion => json!({
                        "id": g.id,
                        "object": "text_completion",
                        "created": unix_now(),
                        "model": g.loaded.name,
                        "choices": [{
                            "index": 0,
                            "text": format!("{prefix}{}", g.text),
                            "logprobs": g.logprobs.map(|_| text_lp.json()),
                            "finish_reason": reason,
                        }],
                        "usage": usage,
                    }),
                };
                return Ok(axum::Json(body).into_response());
            }
        }
    }
}

/// A streamed generation: server-sent events, one chunk per token, a last
/// chunk with the finish reason, the usage if asked for, then `[DONE]`.
struct Streamer {
    g: Generation,
    include_usage: bool,
    queue: VecDeque<String>,
    started: bool,
    over: bool,
    created: u64,
}

impl Streamer {
    /// A chunk with these choices (and `usage`, null unless given, when the
    /// client asked for usage).
    fn chunk_with(&self, choices: Value, usage: Value) -> String {
        let object = match self.g.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.g.id,
            "object": object,
            "created": self.created,
            "model": self.g.loaded.name,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = usage;
        }
        v.to_string()
    }

    fn chunk(&self, choice: Value) -> String {
        self.chunk_with(json!([choice]), Value::Null)
    }

    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(s) = self.queue.pop_front() {
                return Some(s);
            }
            if self.over {
                return None;
            }
            if !self.started {
                self.started = true;
                match self.g.kind {
                    Kind::Chat => {
                        let c = self.chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}));
                        self.queue.push_back(c);
                    }
                    Kind::Completion => {
                        if let Some(e) = self.g.echo.clone() {
                            let c = self.chunk(json!({"index": 0, "text": e, "logprobs": null, "finish_reason": null}));
                            self.queue.push_back(c);
                        }
                    }
                }
                continue;
            }
            match self.g.next().await {
                Ok(Step::Token {
                    id,
                    logprob,
                    top,
                    text,
                }) => {
                    let offset = self.g.echo.as_ref().map_or(0, String::len) + self.g.text.len()
                        - text.len();
                    let choice = match self.g.kind {
                        Kind::Chat => json!({
                            "index": 0,
                            "delta": {"content": text},
                            "logprobs": self.g.logprobs.map(|_| json!({"content": [self.g.chat_logprob(id, logprob, &top)]})),
                            "finish_reason": null,
                        }),
                        Kind::Completion => {
                            let lp = self.g.logprobs.map(|_| {
                                let mut l = TextLogprobs::default();
                                l.push(&self.g.loaded.tokenizer, offset, id, logprob, &top);
                                l.json()
                            });
                            json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": null})
                        }
                    };
                    let c = self.chunk(choice);
                    self.queue.push_back(c);
                }
                Ok(Step::Done { reason, usage }) => {
                    let last = match self.g.kind {
                        Kind::Chat => {
                            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason})
                        }
                        Kind::Completion => {
                            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": reason})
                        }
                    };
                    let c = self.chunk(last);
                    self.queue.push_back(c);
                    if self.include_usage {
                        let c = self.chunk_with(json!([]), Generation::usage_json(&usage));
                        self.queue.push_back(c);
                    }
                    self.queue.push_back("[DONE]".into());
                    self.over = true;
                }
                Err(e) => {
                    // Errors inside a stream are an event with OpenAI's
                    // error object, then the end.
                    self.queue.push_back(e.body().to_string());
                    self.queue.push_back("[DONE]".into());
                    self.over = true;
                }
            }
        }
    }
}

fn respond_stream(g: Generation, include_usage: bool) -> Response {
    let s = Streamer {
        g,
        include_usage,
        queue: VecDeque::new(),
        started: false,
        over: false,
        created: unix_now(),
    };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        s.next()
            .await
            .map(|d| (Ok::<_, Infallible>(SseEvent::default().data(d)), s))
    });
    Sse::new(stream).into_response()
}

/// What a handler hands to [`submit`].
struct Submission {
    kind: Kind,
    prompt: Vec<TokenId>,
    checked: Checked,
    logprobs: Option<usize>,
    salt: Option<Vec<u8>>,
    turn: Option<(Turn, strata_engine::SessionId)>,
    echo: Option<String>,
    tenant: usize,
}

/// Submits a checked request and answers it, streamed or whole.
async fn submit(
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

/// Takes a session for a turn: it must exist, belong to the tenant, and
/// have no turn running (409). Returns its engine id and what the template
/// needs.
fn take_session(
    state: &AppState,
    t: &Tenant,
    key: &str,
) -> Result<(strata_engine::SessionId, Vec<ChatMessage>, bool, bool), ApiError> {
    let mut sessions = state.sessions();
    let s = sessions
        .get_mut(key)
        .filter(|s| s.owner == t.index)
        .ok_or_else(|| {
            ApiError::not_found(
                "session_not_found",
                format!("session '{key}' does not exist"),
            )
        })?;
    if s.busy {
        return Err(ApiError::conflict(format!(
            "session '{key}' already has a turn running"
        )));
    }
    s.busy = true;
    Ok((s.id.clone(), s.history.clone(), s.ended_with_eos, s.raw))
}

fn release_session(state: &AppState, key: &str) {
    if let Some(s) = state.sessions().get_mut(key) {
        s.busy = false;
    }
}

async fn chat(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (t, l, req): (_, _, ChatRequest) = begin(&state, &headers, body)?;
    check_model(&l, req.common.model.as_deref())?;
    let top = openai::top_logprobs("top_logprobs", req.top_logprobs)?;
    let logprobs = req.logprobs.then_some(top);
    let checked = req.common.check(l.vocab, top)?;
    let salt = salt(&state, t, req.common.cache_salt.as_deref())?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let messages = req
        .messages
        .iter()
        .map(|m| m.text().map(|c| ChatMessage::new(m.role.clone(), c)))
        .collect::<Result<Vec<_>, _>>()?;
    if state.args.log_text {
        tracing::info!(messages = ?messages, "chat request text");
    }
    let template = l.template.as_ref().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; use /v1/completions")
    })?;
    let template_error = |e: strata_model::ModelError| ApiError::invalid("messages", e.to_string());
    let (prompt, turn) = match &req.common.session {
        None => (
            template
                .apply(&l.tokenizer, &messages, true)
                .map_err(template_error)?,
            None,
        ),
        Some(key) => {
            let (sid, history, ended_with_eos, raw) = take_session(&state, t, key)?;
            let built = (|| {
                if raw {
                    return Err(ApiError::invalid(
                        "session",
                        "this session was continued with /v1/completions; a chat turn needs a chat session",
                    ));
                }
                if history.is_empty() {
                    return template
                        .apply(&l.tokenizer, &messages, true)
                        .map_err(template_error);
                }
                let mut all = history.clone();
                all.extend(messages.iter().cloned());
                let mut cont = template
                    .continuation(&l.tokenizer, &all, history.len(), true)
                    .map_err(template_error)?
                    .ok_or_else(|| ApiError::bad_request("this model's chat template rewrites message contents, so a session cannot be continued with it"))?;
                // The reply's end-of-sequence token is already in the
                // session when the template closes the message with it.
                if ended_with_eos && cont.first().is_some_and(|t| l.tokenizer.eos().contains(t)) {
                    cont.remove(0);
                }
                Ok(cont)
            })();
            match built {
                Ok(p) => (
                    p,
                    Some((
                        Turn {
                            key: key.clone(),
                            messages: Some(messages.clone()),
                        },
                        sid,
                    )),
                ),
                Err(e) => {
                    release_session(&state, key);
                    return Err(e);
                }
            }
        }
    };
    let sub = Submission {
        kind: Kind::Chat,
        prompt,
        checked,
        logprobs,
        salt,
        turn,
        echo: None,
        tenant: t.index,
    };
    submit(state.clone(), l, &req.common, sub).await
}

/// The prompt of a completion: text (special-token strings are parsed, as
/// Hugging Face tokenizers do for raw prompts) or token ids.
fn completion_prompt(l: &Loaded, p: &Prompt) -> Result<(Vec<TokenId>, String), ApiError> {
    let ids = |v: &[i64]| -> Result<Vec<TokenId>, ApiError> {
        v.iter()
            .map(|&t| {
                if t < 0 || t as usize >= l.vocab {
                    Err(ApiError::invalid(
                        "prompt",
                        format!("token id {t} is outside the vocabulary (0..{})", l.vocab),
                    ))
                } else {
                    Ok(TokenId::new(t as u32))
                }
            })
            .collect()
    };
    let text = |s: &str| -> Result<(Vec<TokenId>, String), ApiError> {
        let t = l
            .tokenizer
            .encode_with_specials(s)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
        Ok((t, s.to_string()))
    };
    let one = |n: usize| -> Result<(), ApiError> {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid(
                "prompt",
                format!("one prompt per request is supported, got {n}"),
            ))
        }
    };
    match p {
        Prompt::Text(s) => text(s),
        Prompt::Texts(v) => {
            one(v.len())?;
            text(&v[0])
        }
        Prompt::Tokens(v) => {
            let t = ids(v)?;
            let s = l.tokenizer.decode(&t, true);
            Ok((t, s))
        }
        Prompt::TokenLists(v) => {
            one(v.len())?;
            let t = ids(&v[0])?;
            let s = l.tokenizer.decode(&t, true);
            Ok((t, s))
        }
    }
}

async fn completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (t, l, req): (_, _, CompletionRequest) = begin(&state, &headers, body)?;
    check_model(&l, req.common.model.as_deref())?;
    let logprobs = match req.logprobs {
        None => None,
        Some(n) => Some(openai::top_logprobs("logprobs", Some(n))?),
    };
    let checked = req.common.check(l.vocab, logprobs.unwrap_or(0))?;
    let salt = salt(&state, t, req.common.cache_salt.as_deref())?;
    let (prompt, text) = completion_prompt(&l, &req.prompt)?;
    if state.args.log_text {
        tracing::info!(prompt = %text, "completion request text");
    }
    let turn = match &req.common.session {
        None => None,
        Some(key) => {
            let (sid, history, _, _) = take_session(&state, t, key)?;
            if !history.is_empty() {
                release_session(&state, key);
                return Err(ApiError::invalid(
                    "session",
                    "this session holds a chat conversation; continue it with /v1/chat/completions",
                ));
            }
            if let Some(s) = state.sessions().get_mut(key) {
                s.raw = true;
            }
            Some((
                Turn {
                    key: key.clone(),
                    messages: None,
                },
                sid,
            ))
        }
    };
    let sub = Submission {
        kind: Kind::Completion,
        prompt,
        checked,
        logprobs,
        salt,
        turn,
        echo: req.echo.then_some(text),
        tenant: t.index,
    };
    submit(state.clone(), l, &req.common, sub).await
}

#[derive(Deserialize)]
struct TokenizeRequest {
    content: Option<String>,
    messages: Option<Vec<openai::Message>>,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
}

fn yes() -> bool {
    true
}

/// llama-server's `/tokenize`: text (or chat messages, through the
/// template) in, token ids out.
async fn tokenize(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (_, l, req): (_, _, TokenizeRequest) = begin(&state, &headers, body)?;
    let tok = &l.tokenizer;
    let bad = |e: strata_model::ModelError| ApiError::invalid("content", e.to_string());
    let mut tokens = match (&req.content, &req.messages) {
        (Some(c), None) => {
            let mut t = Vec::new();
            if req.add_special && tok.add_bos() {
                t.extend(tok.bos());
            }
            t.extend(
                if req.parse_special {
                    tok.encode_with_specials(c)
                } else {
                    tok.encode(c)
                }
                .map_err(bad)?,
            );
            t
        }
        (None, Some(m)) => {
            let template = l
                .template
                .as_ref()
                .ok_or_else(|| ApiError::bad_request("this model has no chat template"))?;
            let msgs = m
                .iter()
                .map(|m| m.text().map(|c| ChatMessage::new(m.role.clone(), c)))
                .collect::<Result<Vec<_>, _>>()?;
            template
                .apply(tok, &msgs, true)
                .map_err(|e| ApiError::invalid("messages", e.to_string()))?
        }
        _ => return Err(ApiError::bad_request("give either `content` or `messages`")),
    };
    let ids: Vec<u32> = tokens.drain(..).map(TokenId::get).collect();
    Ok(axum::Json(json!({"tokens": ids})).into_response())
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<i64>,
}

/// llama-server's `/detokenize`: token ids in, text out.
async fn detokenize(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (_, l, req): (_, _, DetokenizeRequest) = begin(&state, &headers, body)?;
    let (ids, _) = completion_prompt(&l, &Prompt::Tokens(req.tokens))?;
    Ok(axum::Json(json!({"content": l.tokenizer.decode(&ids, true)})).into_response())
}

#[derive(Deserialize, Default)]
struct CreateSession {
    model: Option<String>,
    cache_salt: Option<String>,
}

fn session_json(
    key: &str,
    s: &Session,
    l: &Loaded,
    info: Option<&strata_engine::SessionInfo>,
) -> Value {
    json!({
        "id": key,
        "object": "session",
        "created": s.created,
        "model": l.name,
        "tokens": info.map_or(0, |i| i.tokens),
        "pinned": info.is_some_and(|i| i.pinned),
        "busy": s.busy,
    })
}

/// `POST /v1/sessions`: a new session owned by the caller's key.
async fn create_session(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let t = tenant(&state, &headers)?;
    let l = loaded(&state)?;
    let empty = matches!(&body, Ok(b) if b.iter().all(u8::is_ascii_whitespace));
    let req: CreateSession = if empty {
        CreateSession::default()
    } else {
        parse(&headers, body, state.args.max_body)?
    };
    check_model(&l, req.model.as_deref())?;
    let salt = salt(&state, t, req.cache_salt.as_deref())?;
    let id = l.engine.create_session(salt)?;
    let mut raw = [0u8; 12];
    getrandom::fill(&mut raw).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    let key = format!(
        "sess_{}",
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let s = Session {
        id,
        owner: t.index,
        history: Vec::new(),
        ended_with_eos: false,
        created: unix_now(),
        busy: false,
        raw: false,
    };
    let body = session_json(&key, &s, &l, None);
    state.sessions().insert(key, s);
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// `GET /v1/sessions`: the caller's sessions.
async fn list_sessions(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let t = tenant(&state, &headers)?;
    let l = loaded(&state)?;
    let infos = l.engine.sessions();
    let sessions = state.sessions();
    let mut data: Vec<(u64, Value)> = sessions
        .iter()
        .filter(|(_, s)| s.owner == t.index)
        .map(|(k, s)| {
            let info = infos.iter().find(|i| i.id == s.id.id);
            (s.id.id, session_json(k, s, &l, info))
        })
        .collect();
    data.sort_by_key(|(id, _)| *id);
    let data: Vec<Value> = data.into_iter().map(|(_, v)| v).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// `DELETE /v1/sessions/{id}`: safe while a turn runs (the turn is
/// aborted; its blocks wait in quarantine for the step using them).
async fn delete_session(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let t = tenant(&state, &headers)?;
    let l = loaded(&state)?;
    let s = {
        let mut sessions = state.sessions();
        match sessions.get(&key) {
            Some(s) if s.owner == t.index => sessions.remove(&key),
            _ => None,
        }
    }
    .ok_or_else(|| {
        ApiError::not_found(
            "session_not_found",
            format!("session '{key}' does not exist"),
        )
    })?;
    l.engine.destroy_session(&s.id)?;
    Ok(
        axum::Json(json!({"id": key, "object": "session.deleted", "deleted": true}))
            .into_response(),
    )
}

/// `POST /admin/clear_prefix_cache`: drops every free cached block (pinned
/// and in-flight blocks are never touched).
async fn clear_prefix_cache(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    tenant(&state, &headers)?;
    let l = loaded(&state)?;
    let dropped = l.engine.clear_prefix_cache();
    tracing::info!(dropped_blocks = dropped, "prefix cache cleared");
    Ok(axum::Json(json!({"dropped_blocks": dropped})).into_response())
}
