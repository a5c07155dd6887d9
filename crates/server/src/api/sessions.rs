//! `/v1/sessions`: conversations whose KV stays pinned between turns.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use strata_model::ChatMessage;

use super::{Shared, check_model, loaded, parse, salt, tenant};
use crate::error::ApiError;
use crate::state::{AppState, Loaded, Session, Tenant, unix_now};

/// Takes a session for a turn: it must exist, belong to the tenant, and
/// have no turn running (409). Returns its engine id and what the template
/// needs.
pub(super) fn take_session(
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

pub(super) fn release_session(state: &AppState, key: &str) {
    if let Some(s) = state.sessions().get_mut(key) {
        s.busy = false;
    }
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
        "pinned": info.is_some_and(|i| i.pinned),
        "busy": s.busy,
    })
}

/// `POST /v1/sessions`: a new session owned by the caller's key.
pub(super) async fn create_session(
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
pub(super) async fn list_sessions(
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
    l.engine.destroy_session(&s.id)?;
    Ok(
        axum::Json(json!({"id": key, "object": "session.deleted", "deleted": true}))
            .into_response(),
    )
}
