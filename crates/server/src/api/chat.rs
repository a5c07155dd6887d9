//! `POST /v1/chat/completions`.

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
use crate::openai::{self, ChatRequest, Role};
use crate::state::Loaded;

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
    compile_grammar(&state, t, &l, &mut checked).await?;
    let salt = salt(&state, t, req.common.cache_salt.as_deref())?;
    let template = l.template.as_ref().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; use /v1/completions")
    })?;
    if req.messages_given > req.messages.len() {
        return Err(ApiError::context_exceeded(format!(
            "{} messages cannot fit this model's maximum context length of {} tokens",
            req.messages_given,
            l.engine.context()
        )));
    }
    let messages = template_messages(&l, template, &req.messages)?;
    if state.args.log_text {
        tracing::info!(messages = ?messages, "chat request text");
    }
    let (prompt, turn) = match &req.common.session {
        None => {
            let (l, msgs) = (l.clone(), messages.clone());
            let prompt = off_thread(&state, t, move || render(&l, &msgs, None)).await??;
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
            let prompt = off_thread(&state, t, move || render(&l, &msgs, Some(history))).await??;
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
    };
    submit(state.clone(), l, &req.common, sub).await
}

/// The messages as the template gets them: OpenAI's roles (`developer` as
/// `system` where the template has no developer role), text parts joined,
/// names kept; refused if their text alone cannot fit the context.
pub(super) fn template_messages(
    l: &Loaded,
    template: &ChatTemplate,
    given: &[openai::Message],
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
    let messages = given
        .iter()
        .map(|m| {
            let role = match m.role {
                Role::Developer if !template.knows_developer() => Role::System,
                r => r,
            };
            m.text()
                .map(|c| ChatMessage::new(role.as_str(), c).with_name(m.name.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
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
                .apply(&l.tokenizer, messages, true)
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
