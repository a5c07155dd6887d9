//! Chat templates: the model's Jinja template (`tokenizer.chat_template`, or
//! a file the user names) rendered with minijinja, with the usual Hugging
//! Face variables.
//!
//! User text never becomes special tokens. Each message's content (and
//! name, if it has one) is rendered as a private-use sentinel; the rendered
//! text is split at the sentinels, the template's own text is tokenized with
//! special tokens recognised, and each content or name is tokenized as plain
//! text. Roles are not user text: the server admits only OpenAI's five.

use minijinja::{Environment, Error, ErrorKind, context};
use strata_store::TokenId;

use crate::error::ModelError;
use crate::tokenizer::Tokenizer;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
    /// A participant's name, if given (templates see it as `name`).
    pub name: Option<String>,
    /// An assistant's tool calls, in Hugging Face's shape (a list of
    /// `{"type": "function", "function": {"name", "arguments"}}` with the
    /// arguments an object), for templates that render them.
    pub tool_calls: Option<serde_json::Value>,
    /// A tool result's call id.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            name: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }

    /// The same message with a participant's name.
    pub fn with_name(mut self, name: Option<String>) -> Self {
        self.name = name;
        self
    }

    /// The message as the template sees it, its content (and name) given.
    fn value(&self, content: minijinja::Value, name: Option<minijinja::Value>) -> minijinja::Value {
        let mut m = std::collections::BTreeMap::new();
        m.insert("role", minijinja::Value::from(self.role.as_str()));
        m.insert("content", content);
        if let Some(n) = name {
            m.insert("name", n);
        }
        if let Some(t) = &self.tool_calls {
            m.insert(
                "tool_calls",
                minijinja::Value::from(minijinja::value::Serde(t)),
            );
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id", minijinja::Value::from(id.as_str()));
        }
        minijinja::Value::from(m)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    developer: bool,
    tools: bool,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

const OPEN: char = '\u{F8F0}';
const CLOSE: char = '\u{F8F1}';

fn sentinel(i: usize) -> String {
    format!("{OPEN}{i}{CLOSE}")
}

impl ChatTemplate {
    /// Compiles `source`. `bos` and `eos` are the strings the template sees
    /// as `bos_token` and `eos_token`.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("the template raised: {msg}"),
            ))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(format!("cannot parse: {e:#}")))?;
        Ok(Self {
            env,
            bos: bos.into(),
            eos: eos.into(),
            developer: source.contains("'developer'") || source.contains("\"developer\""),
            tools: source.contains("tools"),
            source: source.to_string(),
        })
    }

    /// Whether the template names the `developer` role (OpenAI's newer name
    /// for system instructions); if not, callers render it as `system`.
    pub fn knows_developer(&self) -> bool {
        self.developer
    }

    /// Whether the template renders the `tools` variable (Hugging Face's
    /// convention); if not, callers describe the tools in a message.
    pub fn knows_tools(&self) -> bool {
        self.tools
    }

    /// The template's source (to tell which tool-call format it teaches).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template a GGUF file carries, if any.
    pub fn from_gguf(
        c: &candle_core::quantized::gguf_file::Content,
        tok: &Tokenizer,
    ) -> Result<Option<Self>, ModelError> {
        let Ok(source) = crate::config::meta_str(c, "tokenizer.chat_template") else {
            return Ok(None);
        };
        Self::for_tokenizer(source, tok).map(Some)
    }

    /// Compiles `source` (a template file the user names) with the
    /// tokenizer's BOS and EOS text as `bos_token` and `eos_token`.
    pub fn for_tokenizer(source: &str, tok: &Tokenizer) -> Result<Self, ModelError> {
        let text = |t: Option<TokenId>| {
            t.map(|t| String::from_utf8_lossy(tok.token_bytes(t)).into_owned())
                .unwrap_or_default()
        };
        Self::new(source, &text(tok.bos()), &text(tok.eos().first().copied()))
    }

    /// Renders the template as text.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders the template as text, with `tools` (a list of OpenAI tool
    /// definitions) as its `tools` variable.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let msgs: Vec<_> = messages
            .iter()
            .map(|m| {
                m.value(
                    minijinja::Value::from(m.content.as_str()),
                    m.name.as_deref().map(minijinja::Value::from),
                )
            })
            .collect();
        self.render_values(msgs, tools, add_generation_prompt)
    }

    fn render_values(
        &self,
        msgs: Vec<minijinja::Value>,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let tools = tools.map(|t| minijinja::Value::from(minijinja::value::Serde(t)));
        t.render(context! {
            messages => msgs,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| ModelError::Template(format!("cannot render: {e:#}")))
    }

    /// Renders and tokenizes a conversation: the template's markers become
    /// special tokens, message contents stay plain text.
    pub fn apply(
        &self,
        tok: &Tokenizer,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<TokenId>, ModelError> {
        self.apply_with_tools(tok, messages, None, add_generation_prompt)
    }

    /// [`Self::apply`] with `tools` as the template's `tools` variable.
    /// The tools and the messages' tool calls are client text that the
    /// template renders as it likes: any special-token string in them is
    /// refused, so none can become a control token.
    pub fn apply_with_tools(
        &self,
        tok: &Tokenizer,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<Vec<TokenId>, ModelError> {
        let special = |v: &serde_json::Value| tok.contains_special(&v.to_string());
        if tools.is_some_and(special)
            || messages.iter().any(|m| {
                m.tool_calls.as_ref().is_some_and(special)
                    || m.tool_call_id
                        .as_deref()
                        .is_some_and(|i| tok.contains_special(i))
            })
        {
            return Err(ModelError::Template(
                "a tool definition or tool call contains a special-token string; refusing to tokenize it as a special token".into(),
            ));
        }
        match self.pieces(tok, messages, tools, add_generation_prompt, 0)? {
            Some(tokens) => Ok(tokens),
            // The template rewrote the contents (sliced or filtered them):
            // render them for real, which is safe only if no content holds a
            // special-token string.
            None => {
                if messages.iter().any(|m| {
                    tok.contains_special(&m.content)
                        || m.name.as_deref().is_some_and(|n| tok.contains_special(n))
                }) {
                    return Err(ModelError::Template(
                        "this template rewrites message content, and a message contains a special-token string; refusing to tokenize it as a special token".into(),
                    ));
                }
                // What the template makes of the contents could still spell
                // a marker (a `replace` that joins two halves): the special
                // tokens must be exactly those of the same conversation with
                // neutral contents, the template's own.
                let real = tok.encode_with_specials(&self.render_with_tools(
                    messages,
                    tools,
                    add_generation_prompt,
                )?)?;
                let neutral: Vec<ChatMessage> = messages
                    .iter()
                    .map(|m| ChatMessage {
                        content: "x".into(),
                        name: m.name.as_ref().map(|_| "x".into()),
                        ..m.clone()
                    })
                    .collect();
                let plain = tok.encode_with_specials(&self.render_with_tools(
                    &neutral,
                    tools,
                    add_generation_prompt,
                )?)?;
                let specials = |t: &[TokenId]| -> Vec<TokenId> {
                    t.iter()
                        .copied()
                        .filter(|&t| tok.is_special_token(t))
                        .collect()
                };
                if specials(&real) != specials(&plain) {
                    return Err(ModelError::Template(
                        "this template rewrites message content into special-token strings; refusing to tokenize them as special tokens".into(),
                    ));
                }
                Ok(real)
            }
        }
    }

    /// The tokens that continue a conversation whose first `known`
    /// messages are already in a sequence: everything the template renders
    /// after the content of message `known - 1` (its closing marker, the
    /// new messages, the generation prompt). `None` if the template does not
    /// keep message contents intact (then a continuation cannot be cut).
    pub fn continuation(
        &self,
        tok: &Tokenizer,
        messages: &[ChatMessage],
        known: usize,
        add_generation_prompt: bool,
    ) -> Result<Option<Vec<TokenId>>, ModelError> {
        if known == 0 || known > messages.len() {
            return Ok(None);
        }
        self.pieces(tok, messages, None, add_generation_prompt, known)
    }

    /// Tokenizes the rendering piece by piece, from just after the content
    /// of message `from - 1` (from the start if `from` is 0).
    fn pieces(
        &self,
        tok: &Tokenizer,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        from: usize,
    ) -> Result<Option<Vec<TokenId>>, ModelError> {
        let n = messages.len();
        let placeholders: Vec<_> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.value(
                    minijinja::Value::from(sentinel(i)),
                    m.name
                        .as_ref()
                        .map(|_| minijinja::Value::from(sentinel(n + i))),
                )
            })
            .collect();
        let rendered = self.render_values(placeholders, tools, add_generation_prompt)?;
        let Some(pieces) = split_at_sentinels(&rendered, messages) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        let mut started = from == 0;
        for piece in pieces {
            match piece {
                Piece::Content(i) if i + 1 == from => started = true,
                _ if !started => {}
                Piece::Template(t) => out.extend(tok.encode_with_specials(t)?),
                Piece::Content(i) if i < n => out.extend(tok.encode(&messages[i].content)?),
                Piece::Content(i) => {
                    out.extend(tok.encode(messages[i - n].name.as_deref().unwrap_or(""))?);
                }
            }
        }
        Ok(Some(out))
    }
}

enum Piece<'a> {
    Template(&'a str),
    /// A content (`i < n`) or a name (`n + i`).
    Content(usize),
}

/// Splits rendered text at the sentinels: the contents' (`0..n`) must each
/// appear exactly once, in order; the names' (`n..2n`) at most once each,
/// only for messages that have a name; nothing else may look like one.
fn split_at_sentinels<'a>(s: &'a str, messages: &[ChatMessage]) -> Option<Vec<Piece<'a>>> {
    let n = messages.len();
    let mut out = Vec::new();
    let mut rest = s;
    let mut next = 0;
    let mut names = vec![false; n];
    while let Some(at) = rest.find(OPEN) {
        let end = rest[at..].find(CLOSE)? + at;
        let i: usize = rest[at + OPEN.len_utf8()..end].parse().ok()?;
        if i < n {
            if i != next {
                return None;
            }
            next += 1;
        } else {
            let seen = names.get_mut(i - n)?;
            if *seen || messages[i - n].name.is_none() {
                return None;
            }
            *seen = true;
        }
        out.push(Piece::Template(&rest[..at]));
        out.push(Piece::Content(i));
        rest = &rest[end + CLOSE.len_utf8()..];
    }
    out.push(Piece::Template(rest));
    (next == n).then_some(out)
}
