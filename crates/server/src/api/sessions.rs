//! `/v1/sessions`: conversations whose KV stays pinned between turns.

use std::collections::HashMap;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use strata_model::ChatMessage;

use super::{RawBody, Shared, check_model, loaded, parse, salt, tenant};
use crate::error::ApiError;
use crate::state::{AppState, Loaded, Session, Tenant, random_hex, unix_now};

/// A session taken for a turn: released (no longer busy) when dropped,
/// unless the turn was submitted ([`Claim::keep`]); so a client that
/// disconnects while its turn is being tokenized never leaves the session
/// busy.
pub(super) struct Claim {
    state: Shared,
    key: String,
    id: strata_engine::SessionId,
    /// The conversation so far.
    pub(super) history: Vec<ChatMessage>,
    /// Whether the last reply ended with end-of-sequence.
    pub(super) ended_with_eos: bool,
    /// Continued with raw completions.
    pub(super) raw: bool,
    armed: bool,
}

impl Claim {
    /// The turn is submitted: the generation releases the session when it
    /// ends. Returns the engine's session.
    pub(super) fn keep(mut self) -> strata_engine::SessionId {
        self.armed = false;
        self.id.clone()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.armed {
            release_session(&self.state, &self.key);
        }
    }
}

/// Takes a session for a turn: it must exist, belong to the tenant, and
/// have no turn running (409).
pub(super) fn take_session(state: &Shared, t: &Tenant, key: &str) -> Result<Claim, ApiError> {
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
    Ok(Claim {
        state: state.clone(),
        key: key.to_string(),
        id: s.id.clone(),
        history: s.history.clone(),
        ended_with_eos: s.ended_with_eos,
        raw: s.raw,
        armed: true,
    })
}

/// The session's turn is over: it may take the next one, and its idle
/// time starts now.
pub(super) fn release_session(state: &AppState, key: &str) {
    if let Some(s) = state.sessions().get_mut(key) {
        s.busy = false;
        s.last_used = Instant::now();
    }
}

/// Deletes the sessions idle for longer than `--session-ttl` (the server
/// runs this periodically): the engine gives up their pins, and their ids
/// stop working. Returns how many were deleted.
pub(crate) fn delete_expired(state: &AppState) -> usize {
    let Some(l) = state.loaded.get() else {
        return 0;
    };
    let ttl = state.args.session_ttl;
    let expired: Vec<Session> = {
        let mut sessions = state.sessions();
        let keys: Vec<String> = sessions
            .iter()
            .filter(|(_, s)| !s.busy && s.last_used.elapsed() >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().filter_map(|k| sessions.remove(k)).collect()
    };
    for s in &expired {
        // Already gone from the engine (it unpins on its own clock) is fine.
        let _ = l.engine.destroy_session(&s.id);
    }
    expired.len()
}

#[derive(Deserialize, Default)]
pub(super) struct CreateSession {
    model: Option<String>,
    cache_salt: Option<String>,
}

pub(super) fn session_json(
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
        "messages": s.history.len(),
        "pinned": info.is_some_and(|i| i.pinned),
        "busy": s.busy,
    })
}

/// `POST /v1/sessions`: a new session owned by the caller's key.
pub(super) async fn create_session(
    State(state): State<Shared>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let t = tenant(&state, &headers)?;
    let l = loaded(&state)?;
    let empty = matches!(&body, Ok(b) if b.iter().all(u8::is_ascii_whitespace));
    let req: CreateSession = if empty {
        CreateSession::default()
    } else {
        parse(&headers, body)?
    };
    check_model(&l, req.model.as_deref())?;
    let salt = salt(&state, t, req.cache_salt.as_deref())?;
    let max = state.args.max_sessions;
    if state
        .sessions()
        .values()
        .filter(|s| s.owner == t.index)
        .count()
        >= max
    {
        return Err(ApiError::too_many(format!(
            "this key already holds {max} sessions, the most allowed; delete one first"
        )));
    }
    let id = l.engine.create_session(salt)?;
    let key = format!("sess_{}", random_hex(12));
    let s = Session {
        id,
        owner: t.index,
        history: Vec::new(),
        ended_with_eos: false,
        created: unix_now(),
        busy: false,
        raw: false,
        last_used: Instant::now(),
    };
    let body = session_json(&key, &s, &l, None);
    {
        // Counted again and inserted under one lock: a burst of creations
        // cannot overshoot the cap.
        let mut sessions = state.sessions();
        if sessions.values().filter(|s| s.owner == t.index).count() < max {
            sessions.insert(key, s);
            return Ok((StatusCode::CREATED, axum::Json(body)).into_response());
        }
    }
    let sid = s.id;
    tokio::task::spawn_blocking(move || l.engine.destroy_session(&sid))
        .await
        .map_err(|e| ApiError::internal(format!("deleting the session failed: {e}")))??;
    Err(ApiError::too_many(format!(
        "this key already holds {max} sessions, the most allowed; delete one first"
    )))
}

/// `GET /v1/sessions`: the caller's sessions.
pub(super) async fn list_sessions(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let t = tenant(&state, &headers)?;
    let l = loaded(&state)?;
    let engine = l.clone();
    let infos: HashMap<u64, strata_engine::SessionInfo> =
        tokio::task::spawn_blocking(move || engine.engine.sessions())
            .await
            .map_err(|e| ApiError::internal(format!("listing sessions failed: {e}")))?
            .into_iter()
            .map(|i| (i.id, i))
            .collect();
    let sessions = state.sessions();
    let mut data: Vec<(u64, Value)> = sessions
        .iter()
        .filter(|(_, s)| s.owner == t.index)
        .map(|(k, s)| {
            let info = infos.get(&s.id.id);
            (s.id.id, session_json(k, s, &l, info))
        })
        .collect();
    data.sort_by_key(|(id, _)| *id);
    let data: Vec<Value> = data.into_iter().map(|(_, v)| v).collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// `DELETE /v1/sessions/{id}`: safe while a turn runs (the turn is
/// aborted; its blocks wait in quarantine for the step using them).
pub(super) async fn delete_session(
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
    // It waits for the scheduler's answer: off the async workers.
    tokio::task::spawn_blocking(move || l.engine.destroy_session(&s.id))
        .await
        .map_err(|e| ApiError::internal(format!("deleting the session failed: {e}")))??;
    Ok(
        axum::Json(json!({"id": key, "object": "session.deleted", "deleted": true}))
            .into_response(),
    )
}
