//! The HTTP API: the routes, and what every endpoint starts with (the
//! caller's tenant, the loaded model, the parsed body). Each endpoint lives
//! in its own file; `error.rs` is the one place errors become HTTP.

mod chat;
mod completions;
mod generation;
mod logprobs;
mod models;
mod ops;
mod sessions;
mod stream;
mod submit;
mod tokenize;
mod tool_calls;
mod whole;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::FromRequest;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::{AppState, Loaded, Tenant};

pub(crate) use sessions::delete_expired;

type Shared = Arc<AppState>;

/// Every route of the server. The key is checked by a layer that runs
/// before the handler reads the body, so an unauthenticated client cannot
/// make the server read (or wait for) megabytes.
pub(crate) fn router(state: Shared) -> Router<()> {
    let tenants = Router::new()
        .route("/v1/models", get(models::models))
        .route("/v1/models/{id}", get(models::model))
        .route("/v1/chat/completions", post(chat::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route(
            "/v1/sessions",
            post(sessions::create_session).get(sessions::list_sessions),
        )
        .route("/v1/sessions/{id}", delete(sessions::delete_session))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_tenant,
        ));
    let admin = Router::new()
        .route("/admin/clear_prefix_cache", post(ops::clear_prefix_cache))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/health", get(ops::health))
        .route("/metrics", get(ops::metrics))
        .merge(tenants)
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), close_keyless))
        .with_state(state)
}

/// With API keys set, a request that carries none of the server's keys is
/// answered and its connection closed: only clients with a key can keep
/// connections open, so strangers cannot hold the connection cap with
/// keep-alive (each of theirs lasts one request, or the header timeout).
async fn close_keyless(
    State(state): State<Shared>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let keyed = state.tenants.is_empty() || {
        let b = bearer(req.headers());
        state.tenant(b).is_some() || state.is_admin(b) == Some(true) || state.is_metrics_key(b)
    };
    let mut resp = next.run(req).await;
    if !keyed {
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    resp
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

/// The bearer token of a request, if it sent one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// The tenant of a request, or 401.
fn tenant<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a Tenant, ApiError> {
    state
        .tenant(bearer(headers))
        .ok_or_else(ApiError::unauthorized)
}

/// 401 before the body is read, unless the request carries a tenant's key.
async fn require_tenant(
    State(state): State<Shared>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    match tenant(&state, req.headers()) {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// `/admin/*`: 404 when the server has no admin key (the endpoints are
/// off), 401 without the admin key (a tenant's key never opens them).
async fn require_admin(
    State(state): State<Shared>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    match state.is_admin(bearer(req.headers())) {
        None => ApiError::not_found(
            "not_found",
            "the admin endpoints are off (start the server with --admin-key)",
        )
        .into_response(),
        Some(false) => ApiError::unauthorized().into_response(),
        Some(true) => next.run(req).await,
    }
}

/// Runs CPU-heavy work for a request (tokenizing, rendering a template)
/// on the blocking pool, at most [`AppState::heavy`] at once, so that no
/// async worker is ever held by it. The permit moves into the work: a
/// client that disconnects cannot free its slot while the work still runs.
async fn off_thread<T: Send + 'static>(
    state: &AppState,
    tenant: &Tenant,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    // Waiting for a permit is bounded too: a crowd of long texts makes the
    // others wait at most the request timeout, then answers 503.
    let permit = tokio::time::timeout(state.args.request_timeout, state.heavy_permit(tenant))
        .await
        .map_err(|_| ApiError::unavailable("the server is busy tokenizing; retry shortly", 1))?
        .ok_or_else(|| ApiError::unavailable("the server is shutting down", 5))?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))
}

/// The loaded model, or 503 while it loads.
fn loaded(state: &AppState) -> Result<Arc<Loaded>, ApiError> {
    state
        .loaded
        .get()
        .cloned()
        .ok_or_else(|| ApiError::unavailable("the model is still loading", 2))
}

/// Bodies larger than this are parsed on the blocking pool.
const PARSE_OFF_THREAD: usize = 64 * 1024;

/// What every JSON endpoint starts with: the caller's tenant (401), the
/// model (503 while loading), the parsed body (a large one parsed off the
/// async workers).
async fn begin<'a, T: DeserializeOwned + Send + 'static>(
    state: &'a AppState,
    headers: &HeaderMap,
    body: Result<Bytes, ApiError>,
) -> Result<(&'a Tenant, Arc<Loaded>, T), ApiError> {
    let t = tenant(state, headers)?;
    let l = loaded(state)?;
    let body = body?;
    json_type(headers)?;
    let req = if body.len() > PARSE_OFF_THREAD {
        off_thread(state, t, move || decode(&body)).await??
    } else {
        decode(&body)?
    };
    Ok((t, l, req))
}

/// A JSON body answered from bytes serialized off the async workers.
fn json_bytes(bytes: Vec<u8>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::from(bytes),
    )
        .into_response()
}

/// A request's body, read whole within `--body-timeout` and `--max-body`.
/// The time bound is on the whole body, not on the gap between its bytes
/// (tower-http's body timeout bounds only the gap, so a client sending a
/// byte every few seconds would hold a handler for as long as it liked).
pub(super) struct RawBody(pub(super) Result<Bytes, ApiError>);

impl FromRequest<Shared> for RawBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(
        req: axum::extract::Request,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        let max = state.args.max_body;
        let limit = usize::try_from(max).unwrap_or(usize::MAX);
        let read = axum::body::to_bytes(req.into_body(), limit);
        Ok(RawBody(
            match tokio::time::timeout(state.args.body_timeout, read).await {
                Err(_) => Err(ApiError::timeout_body()),
                Ok(Ok(b)) => Ok(b),
                Ok(Err(e)) if too_large(&e) => Err(ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    ..ApiError::bad_request(format!("the request body is larger than {max} bytes"))
                }),
                Ok(Err(e)) => Err(ApiError::bad_request(format!(
                    "cannot read the request body: {e}"
                ))),
            },
        ))
    }
}

/// Whether reading a body failed at the size limit.
fn too_large(e: &axum::Error) -> bool {
    let mut at: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = at {
        if x.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        at = x.source();
    }
    false
}

/// Parses a JSON body: 415 for another content type, 400 for invalid
/// UTF-8, malformed JSON, or JSON of the wrong shape (with `param` naming
/// the field); the body's own errors (413, 408) as read.
fn parse<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, ApiError>,
) -> Result<T, ApiError> {
    let body = body?;
    json_type(headers)?;
    decode(&body)
}

/// 415 unless the body is declared JSON.
fn json_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if json_type {
        Ok(())
    } else {
        Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ..ApiError::bad_request("send the body as JSON with `Content-Type: application/json`")
        })
    }
}

/// Decodes a JSON body into `T`.
fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::bad_request("the request body is not valid UTF-8"));
    }
    // The path of the field at fault becomes the error's `param`, as
    // OpenAI names it; a wrong type or a missing field is a 400, as there.
    let de = &mut serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize(&mut *de);
    // Nothing but whitespace may follow the object.
    if parsed.is_ok()
        && let Err(e) = de.end()
    {
        return Err(ApiError::bad_request(format!("malformed JSON: {e}")));
    }
    parsed.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let text = inner.to_string();
        // A missing field is named by the error, not the path (the path
        // is its parent's).
        let missing = text
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(|f| {
                if path == "." {
                    f.to_string()
                } else {
                    format!("{path}.{f}")
                }
            });
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::invalid(
                missing.unwrap_or(if path == "." { "body".into() } else { path }),
                format!("the request does not match the API: {inner}"),
            ),
            _ => ApiError::bad_request(format!("malformed JSON: {inner}")),
        }
    })
}

fn check_model(l: &Loaded, asked: Option<&str>) -> Result<(), ApiError> {
    match asked {
        Some(m) if m != l.name => Err(ApiError {
            param: Some("model".into()),
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
