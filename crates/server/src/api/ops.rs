//! Operations endpoints: `/health`, `/metrics`, `/admin/*`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Shared, bearer, loaded};
use crate::error::ApiError;

pub(super) async fn health(State(state): State<Shared>) -> Response {
    if state.stopping.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    match state.loaded.get() {
        // The engine's threads ended without a shutdown: a bug, said
        // plainly (requests get 503 too, never a hang).
        Some(l) if !l.engine.is_alive() => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "engine stopped"})),
        )
            .into_response(),
        Some(_) => axum::Json(json!({"status": "ok"})).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

pub(super) async fn metrics(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if !state.may_read_metrics(bearer(&headers)) {
        return ApiError::unauthorized().into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// `POST /admin/clear_prefix_cache`: drops every free cached block (pinned
/// and in-flight blocks are never touched).
pub(super) async fn clear_prefix_cache(State(state): State<Shared>) -> Result<Response, ApiError> {
    let l = loaded(&state)?;
    let dropped = l.engine.clear_prefix_cache();
    tracing::info!(dropped_blocks = dropped, "prefix cache cleared");
    Ok(axum::Json(json!({"dropped_blocks": dropped})).into_response())
}
