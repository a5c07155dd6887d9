//! llama-server's `/tokenize` and `/detokenize`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use strata_kv::TokenId;

use super::chat::template_messages;
use super::completions::completion_prompt;
use super::{RawBody, Shared, begin, off_thread};
use crate::error::ApiError;
use crate::openai::{self, Prompt};

#[derive(Deserialize, Clone)]
pub(super) struct TokenizeRequest {
    content: Option<String>,
    messages: Option<Vec<openai::Message>>,
    #[serde(default, deserialize_with = "openai::nullable")]
    add_special: bool,
    parse_special: Option<bool>,
}

/// llama-server's `/tokenize`: text (or chat messages, through the
/// template) in, token ids out. The text is bounded by the body limit, not
/// the context (counting a long document's tokens is what it is for), and
/// tokenized on the blocking pool.
pub(super) async fn tokenize(
    State(state): State<Shared>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let (_, l, req): (_, _, TokenizeRequest) = begin(&state, &headers, body)?;
    let messages = match (&req.content, &req.messages) {
        (Some(_), None) => None,
        (None, Some(m)) => {
            let template = l
                .template
                .as_ref()
                .ok_or_else(|| ApiError::bad_request("this model has no chat template"))?;
            Some(template_messages(&l, template, m)?)
        }
        _ => return Err(ApiError::bad_request("give either `content` or `messages`")),
    };
    let work = l.clone();
    let tokens = off_thread(&state, move || -> Result<Vec<TokenId>, ApiError> {
        let tok = &work.tokenizer;
        match (messages, &req.content) {
            (Some(msgs), _) => work
                .template
                .as_ref()
                .ok_or_else(|| ApiError::bad_request("this model has no chat template"))?
                .apply(tok, &msgs, true)
                .map_err(|e| ApiError::invalid("messages", e.to_string())),
            (None, c) => {
                let c = c.as_deref().unwrap_or("");
                let mut t = Vec::new();
                if req.add_special && tok.add_bos() {
                    t.extend(tok.bos());
                }
                let bad = |e: strata_model::ModelError| ApiError::invalid("content", e.to_string());
                t.extend(
                    if req.parse_special.unwrap_or(true) {
                        tok.encode_with_specials(c)
                    } else {
                        tok.encode(c)
                    }
                    .map_err(bad)?,
                );
                Ok(t)
            }
        }
    })
    .await??;
    let ids: Vec<u32> = tokens.into_iter().map(TokenId::get).collect();
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
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let (_, l, req): (_, _, DetokenizeRequest) = begin(&state, &headers, body)?;
    let (ids, _) = completion_prompt(&l, &Prompt::Tokens(req.tokens))?;
    Ok(axum::Json(json!({"content": l.tokenizer.decode(&ids, true)})).into_response())
}
