//! A generation answered as one JSON object.

use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::generation::{Generation, Kind, Step};
use super::logprobs::{ChatLogprobs, TextLogprobs};
use crate::error::ApiError;

/// Runs a generation to its end and answers with one JSON object.
pub(super) async fn respond_whole(mut g: Generation) -> Result<Response, ApiError> {
    let mut chat_lp = ChatLogprobs::default();
    let mut text_lp = TextLogprobs::default();
    let prefix = g.echo.clone().unwrap_or_default();
    // Where the next token starts, in characters of the whole text.
    let mut offset = prefix.chars().count();
    loop {
        match g.next().await? {
            Step::Token {
                id,
                logprob,
                top,
                text,
            } => {
                if g.logprobs.is_some() {
                    let tok = &g.loaded.tokenizer;
                    match g.kind {
                        Kind::Chat => chat_lp.push(tok, id, logprob, &top),
                        Kind::Completion => text_lp.push(tok, offset, id, logprob, &top),
                    }
                }
                offset += text.chars().count();
            }
            Step::Done { reason, usage } => {
                let usage = Generation::usage_json(&usage);
                let body = match g.kind {
                    Kind::Chat => json!({
                        "id": g.id,
                        "object": "chat.completion",
                        "created": g.created,
                        "model": g.loaded.name,
                        "system_fingerprint": g.loaded.fingerprint,
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": g.text, "refusal": null},
                            "logprobs": g.logprobs.map(|_| &chat_lp),
                            "finish_reason": reason,
                        }],
                        "usage": usage,
                    }),
                    Kind::Completion => {
                        if let Some(s) = &g.scored {
                            let mut all = s.logprobs(&g.loaded.tokenizer);
                            all.append(std::mem::take(&mut text_lp));
                            text_lp = all;
                        }
                        json!({
                        "id": g.id,
                        "object": "text_completion",
                        "created": g.created,
                        "model": g.loaded.name,
                        "system_fingerprint": g.loaded.fingerprint,
                        "choices": [{
                            "index": 0,
                            "text": format!("{prefix}{}", g.text),
                            "logprobs": g.logprobs.map(|_| &text_lp),
                            "finish_reason": reason,
                        }],
                        "usage": usage,
                        })
                    }
                };
                return Ok(axum::Json(body).into_response());
            }
        }
    }
}
