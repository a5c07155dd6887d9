//! `POST /v1/chat/completions`.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::Response;
use strata_model::ChatMessage;

use super::generation::{Kind, Submission, Turn, submit};
use super::sessions::{release_session, take_session};
use super::{Shared, begin, check_model, salt};
use crate::error::ApiError;
use crate::openai::{self, ChatRequest};

pub(super) async fn chat(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (t, l, req): (_, _, ChatRequest) = begin(&state, &headers, body)?;
    check_model(&l, req.common.model.as_deref())?;
    let top = openai::top_logprobs("top_logprobs", req.top_logprobs)?;
    let logprobs = req.logprobs.then_some(top);
    let checked = req.common.check(l.vocab, top)?;
    let salt = salt(&state, t, req.common.cache_salt.as_deref())?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let messages = req
        .messages
        .iter()
        .map(|m| m.text().map(|c| ChatMessage::new(m.role.clone(), c)))
        .collect::<Result<Vec<_>, _>>()?;
    if state.args.log_text {
        tracing::info!(messages = ?messages, "chat request text");
    }
    let template = l.template.as_ref().ok_or_else(|| {
        ApiError::bad_request("this model has no chat template; use /v1/completions")
    })?;
    let template_error = |e: strata_model::ModelError| ApiError::invalid("messages", e.to_string());
    let (prompt, turn) = match &req.common.session {
        None => (
            template
                .apply(&l.tokenizer, &messages, true)
                .map_err(template_error)?,
            None,
        ),
        Some(key) => {
            let (sid, history, ended_with_eos, raw) = take_session(&state, t, key)?;
            let built = (|| {
                if raw {
                    return Err(ApiError::invalid(
                        "session",
                        "this session was continued with /v1/completions; a chat turn needs a chat session",
                    ));
                }
                if history.is_empty() {
                    return template
                        .apply(&l.tokenizer, &messages, true)
                        .map_err(template_error);
                }
                let mut all = history.clone();
                all.extend(messages.iter().cloned());
                let mut cont = template
                    .continuation(&l.tokenizer, &all, history.len(), true)
                    .map_err(template_error)?
                    .ok_or_else(|| ApiError::bad_request("this model's chat template rewrites message contents, so a session cannot be continued with it"))?;
                // The reply's end-of-sequence token is already in the
                // session when the template closes the message with it.
                if ended_with_eos && cont.first().is_some_and(|t| l.tokenizer.eos().contains(t)) {
                    cont.remove(0);
                }
                Ok(cont)
            })();
            match built {
                Ok(p) => (
                    p,
                    Some((
                        Turn {
                            key: key.clone(),
                            messages: Some(messages.clone()),
                        },
                        sid,
                    )),
                ),
                Err(e) => {
                    release_session(&state, key);
                    return Err(e);
                }
            }
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
        tenant: t.index,
    };
    submit(state.clone(), l, &req.common, sub).await
}
