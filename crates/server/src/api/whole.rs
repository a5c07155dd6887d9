//! A generation answered as one JSON object.

use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use super::generation::{Generation, Kind, Step};
use super::logprobs::{ChatLogprobs, TextLogprobs};
use super::tool_calls::{Call, parse};
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
                let (id, created) = (g.id.as_str(), g.created);
                let (model, fp) = (g.loaded.name.as_str(), g.loaded.fingerprint.as_str());
                // Serialized straight from typed structs: a long answer's
                // logprobs never become a tree of JSON values.
                // Calls read from a complete answer (one cut by max_tokens
                // stays text).
                let parsed = g
                    .tools
                    .as_ref()
                    .filter(|_| reason == "stop")
                    .and_then(|(ts, format)| parse(*format, ts, &g.text));
                let (content, tool_calls, reason) = match &parsed {
                    Some(p) => (
                        p.content.as_deref(),
                        Some(p.calls.iter().map(Call::json).collect::<Vec<_>>()),
                        "tool_calls",
                    ),
                    None => (Some(g.text.as_str()), None, reason),
                };
                return Ok(match g.kind {
                    Kind::Chat => axum::Json(Whole {
                        id,
                        object: "chat.completion",
                        created,
                        model,
                        system_fingerprint: fp,
                        choices: [ChatChoice {
                            index: 0,
                            message: Message {
                                role: "assistant",
                                content,
                                refusal: None,
                                tool_calls,
                            },
                            logprobs: g.logprobs.map(|_| &chat_lp),
                            finish_reason: reason,
                        }],
                        usage,
                    })
                    .into_response(),
                    Kind::Completion => {
                        if let Some(s) = &g.scored {
                            let mut all = s.logprobs(&g.loaded.tokenizer);
                            all.append(std::mem::take(&mut text_lp));
                            text_lp = all;
                        }
                        axum::Json(Whole {
                            id,
                            object: "text_completion",
                            created,
                            model,
                            system_fingerprint: fp,
                            choices: [TextChoice {
                                index: 0,
                                text: format!("{prefix}{}", g.text),
                                logprobs: g.logprobs.map(|_| &text_lp),
                                finish_reason: reason,
                            }],
                            usage,
                        })
                        .into_response()
                    }
                });
            }
        }
    }
}

/// A whole answer (both endpoints' shape).
#[derive(Serialize)]
struct Whole<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: [C; 1],
    usage: Value,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<&'a ChatLogprobs>,
    finish_reason: &'a str,
}

/// The assistant's message; `refusal` is always null (there are none).
#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: Option<&'a str>,
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: String,
    logprobs: Option<&'a TextLogprobs>,
    finish_reason: &'a str,
}
