//! The OpenAI request shapes we accept, checked the way vLLM checks them,
//! and turned into the engine's sampling parameters and stop conditions.
//!
//! Unknown fields are ignored (clients send many, like `user` or
//! `metadata`, that change nothing in the answer); known ones are validated,
//! and a value out of range is a 400 naming the parameter. A parameter that
//! would change the answer but that Strata does not implement yet is refused
//! with a 400 naming it ([`Unsupported`]), never silently ignored. `null`
//! means "not given" wherever OpenAI accepts it.

mod de;
mod structured;
pub(crate) mod tools;

pub(crate) use structured::Wanted;

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use strata_engine::StopConditions;
use strata_kv::TokenId;
use strata_model::SamplingParams;

use crate::error::ApiError;
use de::{Capped, CappedMap, Counted, Fields, Given, read_fields};

/// The most `top_logprobs` (as vLLM and OpenAI).
pub(crate) const MAX_TOP_LOGPROBS: usize = 20;
/// The most stop strings.
pub(crate) const MAX_STOPS: usize = 16;
/// The longest stop string, in bytes (the engine matches each against the
/// text's tail after every token).
pub(crate) const MAX_STOP_BYTES: usize = 1024;
/// The most `stop_token_ids`.
pub(crate) const MAX_STOP_TOKEN_IDS: usize = 256;
/// The most messages in a request (each costs tokens of template
/// markers: far more than any context holds).
pub(crate) const MAX_MESSAGES: usize = 65_536;
/// The most `logit_bias` entries.
pub(crate) const MAX_LOGIT_BIAS: usize = 1024;

/// `null` is "not given": the field's default.
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `stop`: one string or several.
#[derive(Debug, Clone)]
pub(crate) enum Stop {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Deserialize, Debug, Clone, Default)]
pub(crate) struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default, deserialize_with = "nullable")]
    pub(crate) include_usage: bool,
}

/// Parameters common to both completion endpoints.
#[derive(Debug, Clone, Default)]
pub(crate) struct Common {
    /// The model (must be the one served; may be left out).
    pub(crate) model: Option<String>,
    /// Generated tokens at most.
    pub(crate) max_tokens: Option<i64>,
    /// The chat API's newer name for `max_tokens`.
    pub(crate) max_completion_tokens: Option<i64>,
    /// In [0, 2]; 0 is greedy.
    pub(crate) temperature: Option<f64>,
    /// In (0, 1].
    pub(crate) top_p: Option<f64>,
    /// -1 or 0: off; else at least 1.
    pub(crate) top_k: Option<i64>,
    /// In [0, 1].
    pub(crate) min_p: Option<f64>,
    /// Reproducible sampling.
    pub(crate) seed: Option<i64>,
    /// Stop strings.
    pub(crate) stop: Option<Stop>,
    /// Stop token ids (vLLM's extension).
    pub(crate) stop_token_ids: Option<Vec<i64>>,
    /// In [-2, 2].
    pub(crate) presence_penalty: Option<f64>,
    /// In [-2, 2].
    pub(crate) frequency_penalty: Option<f64>,
    /// In (0, 2].
    pub(crate) repetition_penalty: Option<f64>,
    /// Choices to return, in [1, 16].
    pub(crate) n: Option<i64>,
    /// Completions: samples to draw, the `n` most likely returned.
    pub(crate) best_of: Option<i64>,
    /// Token id (as a string) to a bias in [-100, 100], as given.
    pub(crate) logit_bias: Option<Vec<(String, f64)>>,
    /// Keep going past end-of-sequence.
    pub(crate) ignore_eos: bool,
    /// No stop before this many tokens.
    pub(crate) min_tokens: Option<i64>,
    /// Stream the answer as server-sent events.
    pub(crate) stream: bool,
    /// Streaming options.
    pub(crate) stream_options: Option<StreamOptions>,
    /// Continue a session (an extension; see docs/api.md).
    pub(crate) session: Option<String>,
    /// Share prefixes only within this salt (if the operator allows).
    pub(crate) cache_salt: Option<String>,
    /// Structured output (a grammar the output follows).
    pub(crate) structured: structured::Structured,
    /// What Strata does not implement yet.
    pub(crate) unsupported: Unsupported,
}

impl Common {
    /// Reads one of its fields (see [`Fields::read`]).
    fn read<'de, A: serde::de::MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> Result<Option<&'static str>, A::Error> {
        // Lists and maps are capped as they are read.
        match key {
            "stop_token_ids" => {
                self.stop_token_ids = map.next_value::<Capped<i64, MAX_STOP_TOKEN_IDS>>()?.0;
                return Ok(Some("stop_token_ids"));
            }
            "logit_bias" => {
                self.logit_bias = map.next_value::<CappedMap<f64, MAX_LOGIT_BIAS>>()?.0;
                return Ok(Some("logit_bias"));
            }
            _ => {}
        }
        let read = read_fields!(
            self,
            key,
            map,
            [
                model,
                max_tokens,
                max_completion_tokens,
                temperature,
                top_p,
                top_k,
                min_p,
                seed,
                stop,
                presence_penalty,
                frequency_penalty,
                repetition_penalty,
                n,
                best_of,
                ignore_eos,
                min_tokens,
                stream,
                stream_options,
                session,
                cache_salt,
            ]
        );
        if let Some(name) = read {
            return Ok(Some(name));
        }
        match self.structured.read(key, map)? {
            Some(name) => Ok(Some(name)),
            None => self.unsupported.read(key, map),
        }
    }
}

/// Parameters that change the answer and that Strata does not implement
/// (here: tools on text completions, the older `functions`): given with a
/// value other than "off", they are a 400 naming them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Unsupported {
    tools: Option<Given>,
    tool_choice: Option<Given>,
    functions: Option<Given>,
    function_call: Option<Given>,
    suffix: Option<Given>,
    audio: Option<Given>,
    modalities: Option<Given>,
    prediction: Option<Given>,
    reasoning_effort: Option<Given>,
    web_search_options: Option<Given>,
}

impl Unsupported {
    fn read<'de, A: serde::de::MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> Result<Option<&'static str>, A::Error> {
        Ok(read_fields!(
            self,
            key,
            map,
            [
                tools,
                tool_choice,
                functions,
                function_call,
                suffix,
                audio,
                modalities,
                prediction,
                reasoning_effort,
                web_search_options,
            ]
        ))
    }

    /// The first parameter given that Strata cannot honour, as a 400.
    pub(crate) fn check(&self) -> Result<(), ApiError> {
        let off = |v: &Option<Given>, offs: &[Value]| v.as_ref().is_none_or(|v| v.is_off(offs));
        let no_tools = [Value::Array(Vec::new())];
        let checks: [(&'static str, bool, &str); 10] = [
            (
                "tools",
                off(&self.tools, &no_tools),
                "tools are for /v1/chat/completions",
            ),
            (
                "tool_choice",
                off(&self.tool_choice, &[Value::from("none")]),
                "tools are for /v1/chat/completions",
            ),
            (
                "functions",
                off(&self.functions, &no_tools),
                "the older functions form is not supported: use tools",
            ),
            (
                "function_call",
                off(&self.function_call, &[Value::from("none")]),
                "the older functions form is not supported: use tools",
            ),
            (
                "suffix",
                off(&self.suffix, &[Value::from("")]),
                "suffix (insertion) is not supported",
            ),
            (
                "audio",
                off(&self.audio, &[]),
                "audio output is not supported",
            ),
            (
                "modalities",
                off(&self.modalities, &[serde_json::json!(["text"])]),
                "only the text modality is supported",
            ),
            (
                "prediction",
                off(&self.prediction, &[]),
                "predicted outputs are not supported",
            ),
            (
                "reasoning_effort",
                off(&self.reasoning_effort, &[]),
                "reasoning_effort is not supported (this is not a reasoning model)",
            ),
            (
                "web_search_options",
                off(&self.web_search_options, &[]),
                "web search is not supported",
            ),
        ];
        match checks.into_iter().find(|(_, ok, _)| !ok) {
            None => Ok(()),
            Some((param, _, why)) => Err(ApiError::invalid(param, format!("{param}: {why}"))),
        }
    }
}

/// A chat message's content: text, or a list of parts of which only text
/// is supported.
#[derive(Debug, Clone)]
pub(crate) enum Content {
    /// Plain text.
    Text(String),
    /// Parts.
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Deserialize, Debug, Clone)]
pub(crate) struct Part {
    /// `text` is the only type supported.
    #[serde(rename = "type")]
    pub(crate) kind: String,
    /// The text.
    pub(crate) text: Option<String>,
}

/// Who speaks: exactly OpenAI's roles. Anything else is a 400, so no
/// client text reaches the template as a role.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Role {
    /// Instructions.
    System,
    /// OpenAI's newer name for system instructions.
    Developer,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

impl Role {
    /// The name templates know.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message.
#[derive(Deserialize, Debug, Clone)]
pub(crate) struct Message {
    /// Who speaks.
    pub(crate) role: Role,
    /// Its content (may be null for an assistant message).
    pub(crate) content: Option<Content>,
    /// A participant's name (given to the template as plain text).
    pub(crate) name: Option<String>,
    /// An assistant's tool calls.
    pub(crate) tool_calls: Option<Vec<ToolCallIn>>,
    /// A tool result's call id.
    pub(crate) tool_call_id: Option<String>,
    /// A function call (the older form; not supported).
    function_call: Option<Given>,
}

/// A tool call in an assistant message.
#[derive(Deserialize, Debug, Clone)]
pub(crate) struct ToolCallIn {
    pub(crate) id: Option<String>,
    pub(crate) function: FunctionCallIn,
}

/// A tool call's function: its name, and its arguments as JSON text (or,
/// as some clients send them, an object).
#[derive(Deserialize, Debug, Clone)]
pub(crate) struct FunctionCallIn {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) arguments: Value,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChatRequest {
    /// The conversation (or, in a session, its new messages): at most
    /// [`MAX_MESSAGES`] kept.
    pub(crate) messages: Vec<Message>,
    /// How many messages were given (past the cap, the rest were skipped
    /// unread: they cannot fit any context).
    pub(crate) messages_given: usize,
    /// Return log-probabilities.
    pub(crate) logprobs: bool,
    /// How many alternatives per token, in [0, 20].
    pub(crate) top_logprobs: Option<i64>,
    /// Functions the model may call (at most [`tools::MAX_TOOLS`]).
    pub(crate) tools: Option<Vec<tools::Tool>>,
    /// `none`, `auto`, `required` or a named function.
    pub(crate) tool_choice: Option<Value>,
    /// More than one call per answer (default true).
    pub(crate) parallel_tool_calls: Option<bool>,
    /// Everything else.
    pub(crate) common: Common,
}

impl Fields for ChatRequest {
    const WHAT: &'static str = "a chat completion request";

    fn read<'de, A: serde::de::MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> Result<Option<&'static str>, A::Error> {
        if key == "messages" {
            let c = map.next_value::<Counted<Message, MAX_MESSAGES>>()?;
            (self.messages, self.messages_given) = (c.kept, c.given);
            return Ok(Some("messages"));
        }
        if key == "tools" {
            self.tools = map
                .next_value::<Capped<tools::Tool, { tools::MAX_TOOLS }>>()?
                .0;
            return Ok(Some("tools"));
        }
        match read_fields!(
            self,
            key,
            map,
            [logprobs, top_logprobs, tool_choice, parallel_tool_calls]
        ) {
            Some(name) => Ok(Some(name)),
            None => self.common.read(key, map),
        }
    }

    fn finish<E: serde::de::Error>(&self, given: &[&'static str]) -> Result<(), E> {
        if given.contains(&"messages") {
            Ok(())
        } else {
            Err(E::missing_field("messages"))
        }
    }
}

impl<'de> Deserialize<'de> for ChatRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::fields(d)
    }
}

/// `prompt` of `/v1/completions`.
#[derive(Debug, Clone)]
pub(crate) enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<i64>),
    /// A batch of texts (only one is supported: n = 1, one prompt).
    Texts(Vec<String>),
    /// A batch of token lists (only one).
    TokenLists(Vec<Vec<i64>>),
}

impl Default for Prompt {
    fn default() -> Self {
        Prompt::Text(String::new())
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Default)]
pub(crate) struct CompletionRequest {
    /// What to continue.
    pub(crate) prompt: Prompt,
    /// Alternatives per token, in [0, 20].
    pub(crate) logprobs: Option<i64>,
    /// Prepend the prompt to the answer.
    pub(crate) echo: bool,
    /// Everything else.
    pub(crate) common: Common,
}

impl Fields for CompletionRequest {
    const WHAT: &'static str = "a completion request";

    fn read<'de, A: serde::de::MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
    ) -> Result<Option<&'static str>, A::Error> {
        match read_fields!(self, key, map, [prompt, logprobs, echo]) {
            Some(name) => Ok(Some(name)),
            None => self.common.read(key, map),
        }
    }

    fn finish<E: serde::de::Error>(&self, given: &[&'static str]) -> Result<(), E> {
        if given.contains(&"prompt") {
            Ok(())
        } else {
            Err(E::missing_field("prompt"))
        }
    }
}

impl<'de> Deserialize<'de> for CompletionRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::fields(d)
    }
}

/// What the engine gets from the common parameters.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) sampling: SamplingParams,
    pub(crate) stop: StopConditions,
    /// The grammar the output must follow (compiled before submitting).
    pub(crate) grammar: Option<Wanted>,
    /// Choices returned.
    pub(crate) n: usize,
    /// Samples drawn (at least `n`): the `n` most likely are returned.
    pub(crate) best_of: usize,
}

fn range(
    v: Option<f64>,
    param: &'static str,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<Option<f32>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x.is_finite() && ok(x) => Ok(Some(x as f32)),
        Some(x) => Err(ApiError::invalid(
            param,
            format!("{param} must be {what}, got {x}"),
        )),
    }
}

impl Common {
    /// Checks every parameter; `vocab` bounds token ids, `top_logprobs` is
    /// the endpoint's own logprobs parameter, already read.
    pub(crate) fn check(&self, vocab: usize, top_logprobs: usize) -> Result<Checked, ApiError> {
        self.unsupported.check()?;
        let grammar = self.structured.wanted()?;
        let max = strata_engine::MAX_SAMPLES as i64;
        let n = match self.n {
            None => 1,
            Some(n) if (1..=max).contains(&n) => n as usize,
            Some(n) => {
                return Err(ApiError::invalid(
                    "n",
                    format!("n must be in [1, {max}], got {n}"),
                ));
            }
        };
        let best_of = match self.best_of {
            None => n,
            Some(b) if (n as i64..=max).contains(&b) => b as usize,
            Some(b) => {
                return Err(ApiError::invalid(
                    "best_of",
                    format!("best_of must be in [n, {max}] (n = {n}), got {b}"),
                ));
            }
        };
        if best_of > n && self.stream {
            return Err(ApiError::invalid(
                "best_of",
                "best_of cannot be streamed (the best are known only at the end)",
            ));
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) | (None, Some(m)) => {
                if m < 1 {
                    let p = if self.max_completion_tokens.is_some() {
                        "max_completion_tokens"
                    } else {
                        "max_tokens"
                    };
                    return Err(ApiError::invalid(
                        p,
                        format!("{p} must be at least 1, got {m}"),
                    ));
                }
                Some(m as usize)
            }
            (None, None) => None,
        };
        let temperature = range(
            self.temperature,
            "temperature",
            |x| (0.0..=2.0).contains(&x),
            "in [0, 2]",
        )?;
        let top_p = range(self.top_p, "top_p", |x| x > 0.0 && x <= 1.0, "in (0, 1]")?;
        let min_p = range(
            self.min_p,
            "min_p",
            |x| (0.0..=1.0).contains(&x),
            "in [0, 1]",
        )?;
        let presence = range(
            self.presence_penalty,
            "presence_penalty",
            |x| (-2.0..=2.0).contains(&x),
            "in [-2, 2]",
        )?;
        let frequency = range(
            self.frequency_penalty,
            "frequency_penalty",
            |x| (-2.0..=2.0).contains(&x),
            "in [-2, 2]",
        )?;
        let repetition = range(
            self.repetition_penalty,
            "repetition_penalty",
            |x| x > 0.0 && x <= 2.0,
            "in (0, 2]",
        )?;
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k >= 1 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be -1 (off) or at least 1, got {k}"),
                ));
            }
        };
        let token = |param: &'static str, t: i64| -> Result<TokenId, ApiError> {
            if t < 0 || t as usize >= vocab {
                return Err(ApiError::invalid(
                    param,
                    format!("token id {t} is outside the vocabulary (0..{vocab})"),
                ));
            }
            Ok(TokenId::new(t as u32))
        };
        // (At most MAX_LOGIT_BIAS entries: refused as the body is read.)
        let mut logit_bias = Vec::new();
        for &(ref k, b) in self.logit_bias.iter().flatten() {
            let id: i64 = k.trim().parse().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias keys are token ids, got {k:?}"),
                )
            })?;
            if !(b.is_finite() && (-100.0..=100.0).contains(&b)) {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("a logit bias must be in [-100, 100], got {b}"),
                ));
            }
            logit_bias.push((token("logit_bias", id)?, b as f32));
        }
        logit_bias.sort_by_key(|&(t, _)| t.get());
        // Keys are strings, so "5", " 5" and "05" all name token 5: one
        // token gets one bias, never a sum past the range.
        if let Some(w) = logit_bias.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias names token {} more than once", w[0].0.get()),
            ));
        }
        let stop_strings = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop_strings.len() > MAX_STOPS {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "at most {MAX_STOPS} stop strings, got {}",
                    stop_strings.len()
                ),
            ));
        }
        if stop_strings.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        if let Some(long) = stop_strings.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "a stop string is at most {MAX_STOP_BYTES} bytes, got one of {}",
                    long.len()
                ),
            ));
        }
        // (At most MAX_STOP_TOKEN_IDS: refused as the body is read.)
        let mut stop_token_ids = self
            .stop_token_ids
            .iter()
            .flatten()
            .map(|&t| token("stop_token_ids", t))
            .collect::<Result<Vec<_>, _>>()?;
        // A set: the same id twice stops the same way once.
        stop_token_ids.sort_by_key(|t| t.get());
        stop_token_ids.dedup();
        let min_tokens = match self.min_tokens {
            None => 0,
            Some(m) if m >= 0 => m as usize,
            Some(m) => {
                return Err(ApiError::invalid(
                    "min_tokens",
                    format!("min_tokens must be at least 0, got {m}"),
                ));
            }
        };
        if let Some(max) = max_tokens
            && min_tokens > max
        {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max})"),
            ));
        }
        let seed = self.seed.map(|s| s as u64);
        let sampling = SamplingParams {
            temperature: temperature.unwrap_or(1.0),
            top_k,
            top_p: top_p.unwrap_or(1.0),
            min_p: min_p.unwrap_or(0.0),
            seed,
            repetition_penalty: repetition.unwrap_or(1.0),
            frequency_penalty: frequency.unwrap_or(0.0),
            presence_penalty: presence.unwrap_or(0.0),
            logit_bias,
            top_logprobs,
            grammar: None,
        };
        Ok(Checked {
            grammar,
            n,
            best_of,
            sampling,
            stop: StopConditions {
                max_tokens,
                stop_token_ids,
                ignore_eos: self.ignore_eos,
                min_tokens,
                stop_strings,
            },
        })
    }
}

/// The most alternatives `/v1/completions` returns per token (OpenAI's
/// legacy completions allow 5).
pub(crate) const MAX_COMPLETION_LOGPROBS: usize = 5;

/// Reads `/v1/completions`' `logprobs`, in [0, 5].
pub(crate) fn completion_logprobs(n: i64) -> Result<usize, ApiError> {
    if (0..=MAX_COMPLETION_LOGPROBS as i64).contains(&n) {
        Ok(n as usize)
    } else {
        Err(ApiError::invalid(
            "logprobs",
            format!("logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {n}"),
        ))
    }
}

/// Reads a logprobs count parameter in [0, 20].
pub(crate) fn top_logprobs(param: &'static str, v: Option<i64>) -> Result<usize, ApiError> {
    match v {
        None => Ok(0),
        Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::invalid(
            param,
            format!("{param} must be in [0, {MAX_TOP_LOGPROBS}], got {n}"),
        )),
    }
}

impl Message {
    /// An assistant's tool calls in Hugging Face's shape (arguments as
    /// objects), or `None` if it made none.
    pub(crate) fn hf_tool_calls(&self) -> Result<Option<Value>, ApiError> {
        let Some(calls) = self.tool_calls.as_ref().filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        if self.role != Role::Assistant {
            return Err(ApiError::invalid(
                "messages",
                "only assistant messages carry tool_calls",
            ));
        }
        let calls = calls
            .iter()
            .map(|c| {
                let args = match &c.function.arguments {
                    Value::String(s) => serde_json::from_str::<Value>(s).map_err(|e| {
                        ApiError::invalid(
                            "messages",
                            format!("the arguments of a tool call to {:?} are not JSON: {e}", c.function.name),
                        )
                    })?,
                    Value::Null => Value::Object(Default::default()),
                    v => v.clone(),
                };
                let mut call = serde_json::json!({"type": "function", "function": {"name": c.function.name, "arguments": args}});
                if let Some(id) = &c.id {
                    call["id"] = Value::from(id.as_str());
                }
                Ok(call)
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(Some(Value::Array(calls)))
    }

    /// The text of the content (text parts joined with newlines, as OpenAI
    /// joins them); other part types are refused, and so are the older
    /// `function_call`s.
    pub(crate) fn text(&self) -> Result<String, ApiError> {
        if self.function_call.as_ref().is_some_and(|v| !v.is_off(&[])) {
            return Err(ApiError::invalid(
                "messages",
                "messages with function_call (the older form) are not supported: use tool_calls",
            ));
        }
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(s)) => Ok(s.clone()),
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => texts.push(t.as_str()),
                        (k, _) => {
                            return Err(ApiError::invalid(
                                "messages",
                                format!(
                                    "content parts of type '{k}' are not supported (text only)"
                                ),
                            ));
                        }
                    }
                }
                Ok(texts.join("\n"))
            }
        }
    }
}

#[cfg(test)]
mod tests;
