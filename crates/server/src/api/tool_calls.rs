//! Tool calls, the answer's side: reading the calls a model wrote (in its
//! format) out of its text, whole or as it streams, into OpenAI's
//! `tool_calls`.
//!
//! An answer's content is the text outside its calls (`null` when that is
//! only whitespace). Streamed, text is sent as it comes until a call may
//! be starting; from there it is held, and at the end the calls go out as
//! `delta.tool_calls` (or, if what was held does not read as calls, as
//! text): the deltas always add up to the whole answer.

use serde_json::{Value, json};

use crate::openai::tools::{ToolFormat, ToolSet};
use crate::state::random_hex;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One call, as OpenAI's `tool_calls` entries give it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Call {
    pub(super) id: String,
    pub(super) name: String,
    /// The arguments object as JSON text.
    pub(super) arguments: String,
}

impl Call {
    /// The `message.tool_calls` entry.
    pub(super) fn json(&self) -> Value {
        json!({"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// Text and calls read from an answer.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Parsed {
    /// Text outside the calls (`None` if only whitespace).
    pub(super) content: Option<String>,
    pub(super) calls: Vec<Call>,
}

/// One call object, `{"name": ..., "arguments" | "parameters": {...}}`,
/// naming a defined function; arguments given as JSON text are read.
fn call(v: &Value, tools: &ToolSet) -> Option<Call> {
    let name = v.get("name")?.as_str()?;
    if !tools.defines(name) {
        return None;
    }
    let args = v.get("arguments").or_else(|| v.get("parameters"));
    let args = match args {
        None | Some(Value::Null) => json!({}),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok()?,
        Some(a) => a.clone(),
    };
    if !args.is_object() {
        return None;
    }
    Some(Call {
        id: format!("call_{}", random_hex(12)),
        name: name.to_string(),
        arguments: args.to_string(),
    })
}

fn content(text: String) -> Option<String> {
    (!text.trim().is_empty()).then_some(text)
}

/// The calls in a whole answer; `None` if it holds none (or a call that
/// does not parse, or names no defined function: then it is text).
pub(super) fn parse(format: ToolFormat, tools: &ToolSet, text: &str) -> Option<Parsed> {
    match format {
        ToolFormat::Hermes => {
            let first = text.find(OPEN)?;
            let mut calls = Vec::new();
            let mut rest = &text[first..];
            let mut after = String::new();
            while let Some(start) = rest.find(OPEN) {
                after.push_str(&rest[..start]);
                let body = &rest[start + OPEN.len()..];
                let (inner, next) = match body.find(CLOSE) {
                    Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
                    // The answer ended inside its last call.
                    None => (body, ""),
                };
                calls.push(call(&serde_json::from_str(inner.trim()).ok()?, tools)?);
                rest = next;
            }
            after.push_str(rest);
            let mut text = text[..first].to_string();
            if !after.trim().is_empty() {
                text.push_str(&after);
            }
            Some(Parsed {
                content: content(text),
                calls,
            })
        }
        ToolFormat::Llama3 => {
            let t = text.trim().trim_start_matches("<|python_tag|>").trim();
            if !t.starts_with('{') {
                return None;
            }
            let calls = t
                .split(';')
                .map(|c| call(&serde_json::from_str(c.trim()).ok()?, tools))
                .collect::<Option<Vec<_>>>()?;
            Some(Parsed {
                content: None,
                calls,
            })
        }
        ToolFormat::Mistral => {
            let t = text.trim().trim_start_matches("[TOOL_CALLS]").trim();
            let list: Value = serde_json::from_str(t).ok()?;
            let calls = list
                .as_array()?
                .iter()
                .map(|c| call(c, tools))
                .collect::<Option<Vec<_>>>()?;
            (!calls.is_empty()).then_some(Parsed {
                content: None,
                calls,
            })
        }
    }
}

/// An answer being streamed: which text can go out now, and what is held
/// because it may be a call.
#[derive(Debug)]
pub(super) struct ToolStream {
    format: ToolFormat,
    /// Text not sent yet.
    held: String,
    /// A call has begun: everything from here on is held.
    calling: bool,
    /// Anything but whitespace has been sent.
    sent_text: bool,
}

impl ToolStream {
    pub(super) fn new(format: ToolFormat) -> Self {
        Self {
            format,
            held: String::new(),
            calling: false,
            sent_text: false,
        }
    }

    /// Takes a delta; gives the text that can be sent now.
    pub(super) fn push(&mut self, delta: &str) -> String {
        self.held.push_str(delta);
        if self.calling {
            return String::new();
        }
        let out = match self.format {
            ToolFormat::Hermes => {
                if let Some(at) = self.held.find(OPEN) {
                    self.calling = true;
                    let text: String = self.held.drain(..at).collect();
                    text
                } else {
                    // Hold the longest tail that could begin the marker.
                    let keep = (1..OPEN.len().min(self.held.len() + 1))
                        .rev()
                        .find(|&n| {
                            self.held.is_char_boundary(self.held.len() - n)
                                && OPEN.starts_with(&self.held[self.held.len() - n..])
                        })
                        .unwrap_or(0);
                    let cut = self.held.len() - keep;
                    self.held.drain(..cut).collect()
                }
            }
            ToolFormat::Llama3 | ToolFormat::Mistral => {
                if self.sent_text {
                    std::mem::take(&mut self.held)
                } else {
                    // Calls are the whole answer: decided by its first
                    // character that is not whitespace.
                    match self.held.trim_start().chars().next() {
                        None => String::new(),
                        Some('{' | '[' | '<') => {
                            self.calling = true;
                            String::new()
                        }
                        Some(_) => std::mem::take(&mut self.held),
                    }
                }
            }
        };
        // Leading whitespace waits until text follows (an answer that is
        // only calls has null content, streamed or not).
        if !self.sent_text {
            if out.trim().is_empty() {
                self.held.insert_str(0, &out);
                return String::new();
            }
            self.sent_text = true;
        }
        out
    }

    /// The end of the answer (`complete`: it ended by itself, not cut by
    /// `max_tokens`): the text still to send and the calls.
    pub(super) fn finish(self, tools: &ToolSet, complete: bool) -> (String, Vec<Call>) {
        if self.calling
            && complete
            && let Some(p) = parse(self.format, tools, &self.held)
        {
            // What was held outside the calls (whitespace before them, text
            // after them) is the rest of the content, as a whole answer's.
            return (p.content.unwrap_or_default(), p.calls);
        }
        if !self.sent_text && self.held.trim().is_empty() {
            return (String::new(), Vec::new());
        }
        (self.held, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn tools() -> ToolSet {
        let tools: Vec<crate::openai::tools::Tool> = serde_json::from_value(json!([
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "g_2"}}
        ]))
        .unwrap();
        ToolSet::from_request(Some(&tools), None, None)
            .unwrap()
            .unwrap()
    }

    fn names(p: &Parsed) -> Vec<(&str, Value)> {
        p.calls
            .iter()
            .map(|c| (c.name.as_str(), serde_json::from_str(&c.arguments).unwrap()))
            .collect()
    }

    #[test]
    fn calls_are_read_in_each_format() {
        let t = tools();
        let h = parse(
            ToolFormat::Hermes,
            &t,
            "Let me see.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>{\"name\": \"g_2\", \"arguments\": \"{}\"}</tool_call>",
        )
        .unwrap();
        assert_eq!(h.content.as_deref(), Some("Let me see.\n"));
        assert_eq!(names(&h), vec![("f", json!({"x": 1})), ("g_2", json!({}))]);
        assert_ne!(h.calls[0].id, h.calls[1].id);
        let l = parse(
            ToolFormat::Llama3,
            &t,
            " {\"name\": \"f\", \"parameters\": {\"y\": [1]}}; {\"name\": \"g_2\", \"parameters\": {}}",
        )
        .unwrap();
        assert_eq!(l.content, None);
        assert_eq!(
            names(&l),
            vec![("f", json!({"y": [1]})), ("g_2", json!({}))]
        );
        let m = parse(
            ToolFormat::Mistral,
            &t,
            "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"z\": true}}]",
        )
        .unwrap();
        assert_eq!(names(&m), vec![("f", json!({"z": true}))]);
        // Not calls: text, an unknown function, arguments that are not an
        // object, a call that does not parse.
        for (f, text) in [
            (ToolFormat::Hermes, "just text"),
            (
                ToolFormat::Hermes,
                "<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>",
            ),
            (
                ToolFormat::Hermes,
                "<tool_call>{\"name\": \"f\", \"arguments\": 3}</tool_call>",
            ),
            (
                ToolFormat::Hermes,
                "<tool_call>{\"name\": \"f\", </tool_call>",
            ),
            (ToolFormat::Llama3, "Paris is sunny."),
            (ToolFormat::Mistral, "[]"),
        ] {
            assert_eq!(parse(f, &t, text), None, "{text}");
        }
    }

    fn texts() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("<tool_call>".to_string()),
            Just("</tool_call>".to_string()),
            Just(
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": \"<x>\"}}\n</tool_call>"
                    .to_string()
            ),
            Just("{\"name\": \"g_2\", \"parameters\": {}}".to_string()),
            Just("[{\"name\": \"f\", \"arguments\": {}}]".to_string()),
            "[ <a-z\n{}\"]{0,6}".prop_map(String::from),
            Just("é".to_string()),
        ];
        prop::collection::vec(piece, 0..6).prop_map(|v| v.concat())
    }

    proptest! {
        /// However the answer is cut into deltas, what the stream sends
        /// (text as it goes, then the calls) is the whole answer's content
        /// and calls.
        #[test]
        fn streamed_calls_reassemble_to_the_whole_answer(
            text in texts(),
            cuts in prop::collection::vec(0usize..64, 0..8),
            format in prop_oneof![Just(ToolFormat::Hermes), Just(ToolFormat::Llama3), Just(ToolFormat::Mistral)],
        ) {
            let t = tools();
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).filter(|&c| text.is_char_boundary(c)).collect();
            bounds.push(0);
            bounds.push(text.len());
            bounds.sort_unstable();
            let mut s = ToolStream::new(format);
            let mut sent = String::new();
            for w in bounds.windows(2) {
                sent.push_str(&s.push(&text[w[0]..w[1]]));
            }
            let (rest, calls) = s.finish(&t, true);
            sent.push_str(&rest);
            let whole = parse(format, &t, &text);
            let strip = |c: &[Call]| c.iter().map(|c| (c.name.clone(), c.arguments.clone())).collect::<Vec<_>>();
            match whole {
                Some(p) => {
                    prop_assert_eq!(strip(&calls), strip(&p.calls));
                    prop_assert_eq!(sent, p.content.unwrap_or_default());
                }
                None => {
                    prop_assert!(calls.is_empty());
                    let expect = if text.trim().is_empty() { String::new() } else { text.clone() };
                    prop_assert_eq!(sent, expect);
                }
            }
        }
    }
}
