//! llama-server's `/tokenize` and `/detokenize`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use strata_kv::TokenId;

use super::chat::template_messages;
use super::completions::token_ids;
use super::{RawBody, Shared, begin, json_bytes, off_thread};
use crate::error::ApiError;
use crate::openai;

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
    let (t, l, req): (_, _, TokenizeRequest) = begin(&state, &headers, body).await?;
    let messages = match (&req.content, &req.messages) {
        (Some(_), None) => None,
        (None, Some(m)) => {
            let template = l
                .template
                .as_ref()
                .ok_or_else(|| ApiError::bad_request("this model has no chat template"))?;
            Some(template_messages(&l, template, m, None)?)
        }
        _ => return Err(ApiError::bad_request("give either `content` or `messages`")),
    };
    let work = l.clone();
    let body = off_thread(&state, t, move || -> Result<Vec<u8>, ApiError> {
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
        .map(|t| {
            let tokens: Vec<u32> = t.into_iter().map(TokenId::get).collect();
            serde_json::to_vec(&Tokens { tokens }).unwrap_or_default()
        })
    })
    .await??;
    Ok(json_bytes(body))
}

#[derive(Serialize)]
struct Tokens {
    tokens: Vec<u32>,
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
    let (t, l, req): (_, _, DetokenizeRequest) = begin(&state, &headers, body).await?;
    // A long list decodes to a long text: built off the async workers.
    let body = off_thread(&state, t, move || -> Result<Vec<u8>, ApiError> {
        let ids = token_ids(&l, &req.tokens)?;
        let content = l.tokenizer.decode(&ids, true);
        Ok(serde_json::to_vec(&serde_json::json!({ "content": content })).unwrap_or_default())
    })
    .await??;
    Ok(json_bytes(body))
}
