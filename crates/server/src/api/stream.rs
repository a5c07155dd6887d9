//! A generation answered as server-sent events.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::generation::{Generation, Kind, Step};
use super::logprobs::{ChatLogprobs, TextLogprobs};
use super::tool_calls::ToolStream;
use futures_util::StreamExt;
use std::sync::{Arc, Mutex};
use strata_engine::Usage;

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
    /// With tools: the text that may be a call, held until it is known.
    calls: Option<ToolStream>,
    /// One of several choices (`n > 1`): its usage goes here, and the
    /// merged stream sends the usage and `[DONE]` once, after all of them.
    shared: Option<Arc<Mutex<Vec<Usage>>>>,
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

    fn chunk(&self, mut choice: Value) -> String {
        choice["index"] = json!(self.g.index);
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
                            let text = match self.calls.as_mut() {
                                Some(c) => c.push(&text),
                                None => text,
                            };
                            if text.is_empty() && lp.is_none() && self.calls.is_some() {
                                // Held (it may be a call): nothing to send yet.
                                continue;
                            }
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
                Ok(Step::Done { mut reason, usage }) => {
                    if let (Some(c), Some((ts, _))) = (self.calls.take(), self.g.tools.clone()) {
                        let (rest, calls) = c.finish(&ts, reason == "stop");
                        if !rest.is_empty() {
                            let c = self.chunk(json!({"index": 0, "delta": {"content": rest}, "logprobs": null, "finish_reason": null}));
                            self.queue.push_back(c);
                        }
                        for (i, call) in calls.iter().enumerate() {
                            // As OpenAI streams them: the call's id, type and
                            // name first, then its arguments.
                            let head = json!({"index": 0, "delta": {"tool_calls": [{"index": i, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}]}, "logprobs": null, "finish_reason": null});
                            let args = json!({"index": 0, "delta": {"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]}, "logprobs": null, "finish_reason": null});
                            let (h, a) = (self.chunk(head), self.chunk(args));
                            self.queue.push_back(h);
                            self.queue.push_back(a);
                        }
                        if !calls.is_empty() {
                            reason = "tool_calls";
                        }
                    }
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
                    self.over = true;
                    if let Some(all) = &self.shared {
                        all.lock().unwrap_or_else(|p| p.into_inner()).push(usage);
                        continue;
                    }
                    if self.include_usage {
                        let c = self.chunk_with(json!([]), Generation::usage_json(&usage));
                        self.queue.push_back(c);
                    }
                    self.queue.push_back("[DONE]".into());
                }
                Err(e) => {
                    // Errors inside a stream are an event with OpenAI's
                    // error object, then the end.
                    self.queue.push_back(e.body().to_string());
                    self.over = true;
                    if self.shared.is_none() {
                        self.queue.push_back("[DONE]".into());
                    }
                }
            }
        }
    }
}

impl Streamer {
    fn new(g: Generation, include_usage: bool, shared: Option<Arc<Mutex<Vec<Usage>>>>) -> Self {
        let offset = g.echo.as_ref().map_or(0, |e| e.chars().count());
        let calls = g.tools.as_ref().map(|(_, f)| ToolStream::new(*f));
        Self {
            g,
            include_usage,
            queue: VecDeque::new(),
            started: false,
            over: false,
            offset,
            echo_pending: false,
            calls,
            shared,
        }
    }

    fn events(self) -> impl futures_util::Stream<Item = String> {
        futures_util::stream::unfold(self, |mut s| async move { s.next().await.map(|d| (d, s)) })
    }
}

/// Streams the generations: one, or several choices (`n > 1`) whose
/// chunks interleave as they come (each names its `index`), then the
/// usage (the prompt counted once) and `[DONE]`, once.
pub(super) fn respond_stream(mut gens: Vec<Generation>, include_usage: bool) -> Response {
    let sse = |d: String| Ok::<_, Infallible>(SseEvent::default().data(d));
    if gens.len() == 1 {
        let g = gens.pop().expect("one generation");
        return Sse::new(Streamer::new(g, include_usage, None).events().map(sse)).into_response();
    }
    let shared = Arc::new(Mutex::new(Vec::new()));
    let head = gens.first().map(|g| {
        json!({
            "id": g.id, "object": "chat.completion.chunk", "created": g.created,
            "model": g.loaded.name, "system_fingerprint": g.loaded.fingerprint,
            "choices": [],
        })
    });
    let kind_object = gens.first().map(|g| match g.kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Completion => "text_completion",
    });
    let merged = futures_util::stream::select_all(gens.into_iter().map(|g| {
        Streamer::new(g, include_usage, Some(shared.clone()))
            .events()
            .boxed()
    }));
    let tail = futures_util::stream::once(async move {
        let mut out = Vec::new();
        if include_usage && let (Some(mut v), Some(object)) = (head, kind_object) {
            let all = shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(first) = all.first() {
                let mut u = *first;
                u.completion_tokens = all.iter().map(|u| u.completion_tokens).sum();
                v["object"] = json!(object);
                v["usage"] = Generation::usage_json(&u);
                out.push(v.to_string());
            }
        }
        out.push("[DONE]".to_string());
        futures_util::stream::iter(out)
    })
    .flatten();
    Sse::new(merged.chain(tail).map(sse)).into_response()
}
