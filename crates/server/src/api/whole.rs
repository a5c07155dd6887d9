//! A generation answered as one JSON object.

use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::generation::{Generation, Kind, Step, TextLogprobs};
use crate::error::ApiError;
use crate::state::unix_now;

/// Runs a generation to its end and answers with one JSON object.
pub(super) async fn respond_whole(mut g: Generation) -> Result<Response, ApiError> {
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
