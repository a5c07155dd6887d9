//! llama-server's `/tokenize` and `/detokenize`.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use strata_kv::TokenId;
use strata_model::ChatMessage;

use super::completions::completion_prompt;
use super::{Shared, begin};
use crate::error::ApiError;
use crate::openai::{self, Prompt};

#[derive(Deserialize)]
pub(super) struct TokenizeRequest {
    content: Option<String>,
    messages: Option<Vec<openai::Message>>,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
}

pub(super) fn yes() -> bool {
    true
}

/// llama-server's `/tokenize`: text (or chat messages, through the
/// template) in, token ids out.
pub(super) async fn tokenize(
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
pub(super) struct DetokenizeRequest {
    tokens: Vec<i64>,
}

/// llama-server's `/detokenize`: token ids in, text out.
pub(super) async fn detokenize(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (_, l, req): (_, _, DetokenizeRequest) = begin(&state, &headers, body)?;
    let (ids, _) = completion_prompt(&l, &Prompt::Tokens(req.tokens))?;
    Ok(axum::Json(json!({"content": l.tokenizer.decode(&ids, true)})).into_response())
}
