//! `/v1/models`: the one model served.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Shared, check_model, loaded, tenant};
use crate::error::ApiError;
use crate::state::Loaded;

pub(super) fn model_card(l: &Loaded) -> Value {
    json!({
        "id": l.name,
        "object": "model",
        "created": l.created,
        "owned_by": "strata",
        "max_model_len": l.engine.context(),
    })
}

pub(super) async fn models(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    tenant(&state, &headers)?;
    let l = loaded(&state)?;
    Ok(axum::Json(json!({"object": "list", "data": [model_card(&l)]})).into_response())
}

pub(super) async fn model(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    tenant(&state, &headers)?;
    let l = loaded(&state)?;
    check_model(&l, Some(&id))?;
    Ok(axum::Json(model_card(&l)).into_response())
}
