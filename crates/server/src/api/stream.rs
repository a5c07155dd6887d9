//! A generation answered as server-sent events.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::generation::{Generation, Kind, Step};
use super::logprobs::{ChatLogprobs, TextLogprobs};

/// A streamed generation: server-sent events, one chunk per token, a last
/// chunk with the finish reason, the usage if asked for, then `[DONE]`.
pub(super) struct Streamer {
    g: Generation,
    include_usage: bool,
    queue: VecDeque<String>,
    started: bool,
    over: bool,
    /// Where the next token starts, in characters of the whole text.
    offset: usize,
    /// The echoed prompt waits for its scores (they come with the first
    /// token, or the end).
    echo_pending: bool,
}

impl Streamer {
    /// A chunk with these choices (and `usage`, null unless given, when the
    /// client asked for usage).
    fn chunk_with(&self, choices: Value, usage: Value) -> String {
        let object = match self.g.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.g.id,
            "object": object,
            "created": self.g.created,
            "model": self.g.loaded.name,
            "system_fingerprint": self.g.loaded.fingerprint,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = usage;
        }
        v.to_string()
    }

    fn chunk(&self, choice: Value) -> String {
        self.chunk_with(json!([choice]), Value::Null)
    }

    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(s) = self.queue.pop_front() {
                return Some(s);
            }
            if self.over {
                return None;
            }
            if !self.started {
                self.started = true;
                match self.g.kind {
                    Kind::Chat => {
                        let c = self.chunk(json!({"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}));
                        self.queue.push_back(c);
                    }
                    Kind::Completion if self.g.scored.is_some() => self.echo_pending = true,
                    Kind::Completion => {
                        if let Some(e) = self.g.echo.clone() {
                            let c = self.chunk(json!({"index": 0, "text": e, "logprobs": null, "finish_reason": null}));
                            self.queue.push_back(c);
                        }
                    }
                }
                continue;
            }
            let step = self.g.next().await;
            if self.echo_pending && step.is_ok() {
                self.echo_pending = false;
                let e = self.g.echo.clone().unwrap_or_default();
                let lp = self
                    .g
                    .scored
                    .as_ref()
                    .map(|s| s.logprobs(&self.g.loaded.tokenizer));
                let c = self
                    .chunk(json!({"index": 0, "text": e, "logprobs": lp, "finish_reason": null}));
                self.queue.push_back(c);
            }
            match step {
                Ok(Step::Token {
                    id,
                    logprob,
                    top,
                    text,
                }) => {
                    let offset = self.offset;
                    self.offset += text.chars().count();
                    let tok = &self.g.loaded.tokenizer;
                    let choice = match self.g.kind {
                        Kind::Chat => {
                            let lp = self.g.logprobs.map(|_| {
                                let mut l = ChatLogprobs::default();
                                l.push(tok, id, logprob, &top);
                                l
                            });
                            json!({
                                "index": 0,
                                "delta": {"content": text},
                                "logprobs": lp,
                                "finish_reason": null,
                            })
                        }
                        Kind::Completion => {
                            let lp = self.g.logprobs.map(|_| {
                                let mut l = TextLogprobs::default();
                                l.push(tok, offset, id, logprob, &top);
                                l
                            });
                            json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": null})
                        }
                    };
                    let c = self.chunk(choice);
                    self.queue.push_back(c);
                }
                Ok(Step::Done { reason, usage }) => {
                    let last = match self.g.kind {
                        Kind::Chat => {
                            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason})
                        }
                        Kind::Completion => {
                            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": reason})
                        }
                    };
                    let c = self.chunk(last);
                    self.queue.push_back(c);
                    if self.include_usage {
                        let c = self.chunk_with(json!([]), Generation::usage_json(&usage));
                        self.queue.push_back(c);
                    }
                    self.queue.push_back("[DONE]".into());
                    self.over = true;
                }
                Err(e) => {
                    // Errors inside a stream are an event with OpenAI's
                    // error object, then the end.
                    self.queue.push_back(e.body().to_string());
                    self.queue.push_back("[DONE]".into());
                    self.over = true;
                }
            }
        }
    }
}

pub(super) fn respond_stream(g: Generation, include_usage: bool) -> Response {
    let offset = g.echo.as_ref().map_or(0, |e| e.chars().count());
    let s = Streamer {
        g,
        include_usage,
        queue: VecDeque::new(),
        started: false,
        over: false,
        offset,
        echo_pending: false,
    };
    let stream = futures_util::stream::unfold(s, |mut s| async move {
        s.next()
            .await
            .map(|d| (Ok::<_, Infallible>(SseEvent::default().data(d)), s))
    });
    Sse::new(stream).into_response()
}
