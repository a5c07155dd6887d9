//! A generation answered as one JSON object: one choice per sample (`n`),
//! or with `best_of` the `n` most likely of the samples drawn.

use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use strata_engine::Usage;

use super::generation::{Generation, Kind, Step};
use super::logprobs::{ChatLogprobs, TextLogprobs};
use super::tool_calls::{Call, parse};
use crate::error::ApiError;

/// One sample run to its end.
struct Finished {
    choice: Choice,
    usage: Usage,
    logprob_sum: f64,
}

/// Runs a generation to its end: its choice.
async fn finish(mut g: Generation) -> Result<Finished, ApiError> {
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
                // Calls read from a complete answer (one cut by max_tokens
                // stays text).
                let parsed = g
                    .tools
                    .as_ref()
                    .filter(|_| reason == "stop")
                    .and_then(|(ts, format)| parse(*format, ts, &g.text));
                let index = g.index;
                let choice = match g.kind {
                    Kind::Chat => {
                        let (content, tool_calls, reason) = match parsed {
                            Some(p) => (
                                p.content,
                                Some(p.calls.iter().map(Call::json).collect::<Vec<_>>()),
                                "tool_calls",
                            ),
                            None => (Some(std::mem::take(&mut g.text)), None, reason),
                        };
                        Choice::Chat(ChatChoice {
                            index,
                            message: Message {
                                role: "assistant",
                                content,
                                refusal: None,
                                tool_calls,
                            },
                            logprobs: g.logprobs.map(|_| chat_lp),
                            finish_reason: reason,
                        })
                    }
                    Kind::Completion => {
                        if let Some(s) = &g.scored {
                            let mut all = s.logprobs(&g.loaded.tokenizer);
                            all.append(std::mem::take(&mut text_lp));
                            text_lp = all;
                        }
                        Choice::Text(TextChoice {
                            index,
                            text: format!("{prefix}{}", g.text),
                            logprobs: g.logprobs.map(|_| text_lp),
                            finish_reason: reason,
                        })
                    }
                };
                return Ok(Finished {
                    choice,
                    usage,
                    logprob_sum: g.logprob_sum,
                });
            }
        }
    }
}

/// Runs the generations to their ends (together: they decode in one
/// batch) and answers with one JSON object of `n` choices. The prompt
/// counts once in the usage; every sample's tokens count.
pub(super) async fn respond_whole(gens: Vec<Generation>, n: usize) -> Result<Response, ApiError> {
    let Some(first) = gens.first() else {
        return Err(ApiError::internal("a request without a generation"));
    };
    let (id, created, kind) = (first.id.clone(), first.created, first.kind);
    let (model, fp) = (first.loaded.name.clone(), first.loaded.fingerprint.clone());
    let done = futures_util::future::join_all(gens.into_iter().map(finish)).await;
    let mut done = done.into_iter().collect::<Result<Vec<_>, _>>()?;
    let mut usage = done[0].usage;
    usage.completion_tokens = done.iter().map(|d| d.usage.completion_tokens).sum();
    if done.len() > n {
        // best_of: the n most likely, by their tokens' log-probability.
        done.sort_by(|a, b| b.logprob_sum.total_cmp(&a.logprob_sum));
        done.truncate(n);
    }
    let choices: Vec<Choice> = done
        .into_iter()
        .enumerate()
        .map(|(i, d)| d.choice.with_index(i as u32))
        .collect();
    let object = match kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    // Serialized straight from typed structs: a long answer's logprobs
    // never become a tree of JSON values.
    Ok(axum::Json(Whole {
        id: &id,
        object,
        created,
        model: &model,
        system_fingerprint: &fp,
        choices,
        usage: Generation::usage_json(&usage),
    })
    .into_response())
}

/// A whole answer (both endpoints' shape).
#[derive(Serialize)]
struct Whole<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'a str,
    choices: Vec<Choice>,
    usage: Value,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Choice {
    Chat(ChatChoice),
    Text(TextChoice),
}

impl Choice {
    fn with_index(mut self, i: u32) -> Self {
        match &mut self {
            Choice::Chat(c) => c.index = i,
            Choice::Text(c) => c.index = i,
        }
        self
    }
}

#[derive(Serialize)]
struct ChatChoice {
    index: u32,
    message: Message,
    logprobs: Option<ChatLogprobs>,
    finish_reason: &'static str,
}

/// The assistant's message; `refusal` is always null (there are none).
#[derive(Serialize)]
struct Message {
    role: &'static str,
    content: Option<String>,
    refusal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Serialize)]
struct TextChoice {
    index: u32,
    text: String,
    logprobs: Option<TextLogprobs>,
    finish_reason: &'static str,
}
