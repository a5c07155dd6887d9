//! `POST /v1/chat/completions`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use strata_kv::TokenId;
use strata_model::{ChatMessage, ChatTemplate};

use super::generation::{Arrival, Kind, Turn};
use super::sessions::take_session;
use super::submit::{Submission, compile_grammar, submit};
use super::{RawBody, Shared, begin, check_model, off_thread, salt};
use crate::error::ApiError;
use crate::openai::tools::{Choice, ToolFormat, ToolSet};
use crate::openai::{self, ChatRequest, Checked, Role};
use crate::state::{AppState, Loaded};

pub(super) async fn chat(
    State(state): State<Shared>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let arrival = Arrival::now();
    let (t, l, req): (_, _, ChatRequest) = begin(&state, &headers, body).await?;
    check_model(&l, req.common.model.as_deref())?;
    let top = openai::top_logprobs("top_logprobs", req.top_logprobs)?;
    if top > 0 && !req.logprobs {
        return Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs needs logprobs set to true",
        ));
    }
    let logprobs = req.logprobs.then_some(top);
    let mut checked = req.common.check(l.vocab, top)?;
    if checked.best_of != checked.n {
        return Err(ApiError::invalid(
            "best_of",
            "best_of is for /v1/completions",
        ));
    }
    let template = l.template.as_ref().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; use /v1/completions")
    })?;
    let tools = chat_tools(&state, template, &req, &mut checked)?;
    compile_grammar(&state, t, &l, &mut checked).await?;
    let salt = salt(&state, t, req.common.cache_salt.as_deref())?;
    if req.messages_given > req.messages.len() {
        return Err(ApiError::context_exceeded(format!(
            "{} messages cannot fit this model's maximum context length of {} tokens",
            req.messages_given,
            l.engine.context()
        )));
    }
    let messages = template_messages(&l, template, &req.messages, tools.as_ref().map(|t| &*t.0))?;
    // The template's own `tools` variable, where it has one.
    let tools_value = tools
        .as_ref()
        .filter(|_| template.knows_tools())
        .map(|t| t.0.template_value());
    if state.args.log_text {
        tracing::info!(messages = ?messages, "chat request text");
    }
    let (prompt, turn) = match &req.common.session {
        None => {
            let (l, msgs) = (l.clone(), messages.clone());
            let prompt = off_thread(&state, t, move || {
                render(&l, &msgs, tools_value.as_ref(), None)
            })
            .await??;
            (prompt, None)
        }
        Some(key) => {
            let claim = take_session(&state, t, key)?;
            if claim.raw {
                return Err(ApiError::invalid(
                    "session",
                    "this session was continued with /v1/completions; a chat turn needs a chat session",
                ));
            }
            let (l, msgs) = (l.clone(), messages.clone());
            let history = (claim.history.clone(), claim.ended_with_eos);
            let prompt =
                off_thread(&state, t, move || render(&l, &msgs, None, Some(history))).await??;
            let turn = Turn {
                key: key.clone(),
                messages: Some(messages),
            };
            (prompt, Some((turn, claim.keep())))
        }
    };
    let sub = Submission {
        kind: Kind::Chat,
        prompt,
        checked,
        logprobs,
        salt,
        turn,
        echo: None,
        scored: None,
        prompt_only: false,
        tenant: t.index,
        arrival,
        tools,
    };
    submit(state.clone(), l, &req.common, sub).await
}

/// The tools a chat request may call, and the format their calls come
/// in; with `required` or a named function, the grammar that makes the
/// answer valid calls goes into `checked`.
fn chat_tools(
    state: &AppState,
    template: &ChatTemplate,
    req: &ChatRequest,
    checked: &mut Checked,
) -> Result<Option<(Arc<ToolSet>, ToolFormat)>, ApiError> {
    let Some(ts) = ToolSet::from_request(
        req.tools.as_deref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?
    else {
        return Ok(None);
    };
    if req.common.session.is_some() {
        return Err(ApiError::invalid(
            "tools",
            "tools in a session turn are not supported: send the whole conversation",
        ));
    }
    // A template that knows no tools gets them described in Hermes' format
    // by Strata, so that is the format to read back.
    let format = match state.args.tool_call_format {
        _ if !template.knows_tools() => ToolFormat::Hermes,
        Some(f) => f,
        None => ToolFormat::of_template(template.source()),
    };
    if let Some(spec) = ts.grammar(format) {
        if let Some((_, param)) = &checked.grammar {
            let what = match ts.choice {
                Choice::Required => "required",
                _ => "naming a function",
            };
            return Err(ApiError::invalid(
                "tool_choice",
                format!("tool_choice {what} and {param} both constrain the output: give one"),
            ));
        }
        checked.grammar = Some((spec, "tool_choice"));
    }
    Ok(Some((Arc::new(ts), format)))
}

/// The messages as the template gets them: OpenAI's roles (`developer` as
/// `system` where the template has no developer role), text parts joined,
/// names kept, tool calls and results as the template knows them (or, for
/// a template that knows no tools, in Hermes' format: calls as
/// `<tool_call>` text, results as a user's `<tool_response>`, and the
/// tools described in the system message); refused if their text alone
/// cannot fit the context.
pub(super) fn template_messages(
    l: &Loaded,
    template: &ChatTemplate,
    given: &[openai::Message],
    tools: Option<&ToolSet>,
) -> Result<Vec<ChatMessage>, ApiError> {
    if given.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    // Every message renders to at least one token of the template's own:
    // more messages than the context has tokens cannot fit, whatever they
    // say (and rendering them all would cost the CPU others need).
    if given.len() >= l.engine.context() {
        return Err(ApiError::context_exceeded(format!(
            "{} messages cannot fit this model's maximum context length of {} tokens",
            given.len(),
            l.engine.context()
        )));
    }
    let native = template.knows_tools();
    let mut messages = given
        .iter()
        .map(|m| {
            let role = match m.role {
                Role::Developer if !template.knows_developer() => Role::System,
                r => r,
            };
            let mut text = m.text()?;
            let calls = m.hf_tool_calls()?;
            if native {
                let mut msg = ChatMessage::new(role.as_str(), text).with_name(m.name.clone());
                msg.tool_calls = calls;
                msg.tool_call_id = m.tool_call_id.clone();
                return Ok(msg);
            }
            for c in calls
                .as_ref()
                .and_then(|c| c.as_array())
                .into_iter()
                .flatten()
            {
                let f = &c["function"];
                let call = serde_json::json!({"name": f["name"], "arguments": f["arguments"]});
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
            }
            Ok(match role {
                Role::Tool => {
                    ChatMessage::new("user", format!("<tool_response>\n{text}\n</tool_response>"))
                }
                r => ChatMessage::new(r.as_str(), text).with_name(m.name.clone()),
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    if let Some(ts) = tools.filter(|_| !native) {
        let prompt = ts.hermes_prompt();
        match messages.first_mut().filter(|m| m.role == "system") {
            Some(sys) => {
                sys.content.push_str("\n\n");
                sys.content.push_str(&prompt);
            }
            None => messages.insert(0, ChatMessage::new("system", prompt)),
        }
    }
    let bytes: usize = messages
        .iter()
        .map(|m| m.content.len() + m.name.as_ref().map_or(0, String::len))
        .sum();
    if bytes > l.max_prompt_bytes {
        return Err(ApiError::context_exceeded(format!(
            "The messages hold {bytes} bytes of text: more than this model's maximum context length of {} tokens can hold (at most {} bytes). Please shorten the messages.",
            l.engine.context(),
            l.max_prompt_bytes
        )));
    }
    Ok(messages)
}

/// Renders and tokenizes (on the blocking pool): the whole conversation,
/// or, for a session's turn, what continues its `history` (the messages
/// so far, and whether the last reply ended with end-of-sequence).
fn render(
    l: &Loaded,
    messages: &[ChatMessage],
    tools: Option<&serde_json::Value>,
    history: Option<(Vec<ChatMessage>, bool)>,
) -> Result<Vec<TokenId>, ApiError> {
    let template = l
        .template
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("this model has no chat template"))?;
    let template_error = |e: strata_model::ModelError| ApiError::invalid("messages", e.to_string());
    let (history, ended_with_eos) = match history {
        Some((h, eos)) if !h.is_empty() => (h, eos),
        _ => {
            return template
                .apply_with_tools(&l.tokenizer, messages, tools, true)
                .map_err(template_error);
        }
    };
    let known = history.len();
    let mut all = history;
    all.extend(messages.iter().cloned());
    let mut cont = template
        .continuation(&l.tokenizer, &all, known, true)
        .map_err(template_error)?
        .ok_or_else(|| ApiError::bad_request("this model's chat template rewrites message contents, so a session cannot be continued with it"))?;
    // The reply's end-of-sequence token is already in the session when
    // the template closes the message with it.
    if ended_with_eos && cont.first().is_some_and(|t| l.tokenizer.eos().contains(t)) {
        cont.remove(0);
    }
    Ok(cont)
}
