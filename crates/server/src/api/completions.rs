//! `POST /v1/completions`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use strata_kv::TokenId;

use super::generation::{Arrival, Kind, Turn};
use super::sessions::take_session;
use super::submit::{Submission, submit};
use super::{RawBody, Shared, begin, check_model, off_thread, salt};
use crate::error::ApiError;
use crate::openai::{self, CompletionRequest, Prompt};
use crate::state::Loaded;

/// Token ids as the client gave them, checked against the vocabulary.
pub(super) fn token_ids(l: &Loaded, v: &[i64]) -> Result<Vec<TokenId>, ApiError> {
    v.iter()
        .map(|&t| {
            if t < 0 || t as usize >= l.vocab {
                Err(ApiError::invalid(
                    "prompt",
                    format!("token id {t} is outside the vocabulary (0..{})", l.vocab),
                ))
            } else {
                Ok(TokenId::new(t as u32))
            }
        })
        .collect()
}

/// The prompt of a completion: text (special-token strings are parsed, as
/// Hugging Face tokenizers do for raw prompts) or token ids.
pub(super) fn completion_prompt(
    l: &Loaded,
    p: &Prompt,
) -> Result<(Vec<TokenId>, String), ApiError> {
    let ids = |v: &[i64]| token_ids(l, v);
    let text = |s: &str| -> Result<(Vec<TokenId>, String), ApiError> {
        let tok = &l.tokenizer;
        let mut t = Vec::new();
        // The BOS token where the model's metadata says prompts get one.
        if let Some(bos) = tok.bos().filter(|_| tok.add_bos()) {
            t.push(bos);
        }
        t.extend(
            tok.encode_with_specials(s)
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
        );
        if tok.add_bos() && t.len() > 1 && t[0] == t[1] {
            t.remove(0); // the prompt brought its own
        }
        Ok((t, s.to_string()))
    };
    let one = |n: usize| -> Result<(), ApiError> {
        if n == 1 {
            Ok(())
        } else {
            Err(ApiError::invalid(
                "prompt",
                format!("one prompt per request is supported, got {n}"),
            ))
        }
    };
    match p {
        Prompt::Text(s) => text(s),
        Prompt::Texts(v) => {
            one(v.len())?;
            text(&v[0])
        }
        Prompt::Tokens(v) => {
            let t = ids(v)?;
            let s = l.tokenizer.decode(&t, true);
            Ok((t, s))
        }
        Prompt::TokenLists(v) => {
            one(v.len())?;
            let t = ids(&v[0])?;
            let s = l.tokenizer.decode(&t, true);
            Ok((t, s))
        }
    }
}

/// Refuses a prompt that cannot fit the context before tokenizing (or
/// decoding) it: text by its bytes, token ids by their count.
pub(super) fn check_prompt_bytes(l: &Loaded, p: &Prompt) -> Result<(), ApiError> {
    let ids = match p {
        Prompt::Tokens(v) => v.len(),
        Prompt::TokenLists(v) => v.iter().map(Vec::len).sum(),
        Prompt::Text(_) | Prompt::Texts(_) => 0,
    };
    if ids >= l.engine.context() {
        return Err(ApiError {
            param: Some("prompt".into()),
            ..ApiError::context_exceeded(format!(
                "This model's maximum context length is {} tokens. However, the prompt has {ids} tokens. Please shorten the prompt.",
                l.engine.context()
            ))
        });
    }
    let bytes = match p {
        Prompt::Text(s) => s.len(),
        Prompt::Texts(v) => v.iter().map(String::len).sum(),
        Prompt::Tokens(_) | Prompt::TokenLists(_) => 0,
    };
    if bytes > l.max_prompt_bytes {
        return Err(ApiError {
            param: Some("prompt".into()),
            ..ApiError::context_exceeded(format!(
                "The prompt holds {bytes} bytes of text: more than this model's maximum context length of {} tokens can hold (at most {} bytes). Please shorten the prompt.",
                l.engine.context(),
                l.max_prompt_bytes
            ))
        });
    }
    Ok(())
}

pub(super) async fn completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let arrival = Arrival::now();
    let (t, l, req): (_, _, CompletionRequest) = begin(&state, &headers, body).await?;
    check_model(&l, req.common.model.as_deref())?;
    let logprobs = match req.logprobs {
        None => None,
        Some(n) => Some(openai::completion_logprobs(n)?),
    };
    if req.echo && logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "echo with logprobs (the prompt's log-probabilities) is not supported yet",
        ));
    }
    let checked = req.common.check(l.vocab, logprobs.unwrap_or(0))?;
    let salt = salt(&state, t, req.common.cache_salt.as_deref())?;
    check_prompt_bytes(&l, &req.prompt)?;
    let (lp, p) = (l.clone(), req.prompt.clone());
    let (prompt, text) = off_thread(&state, move || completion_prompt(&lp, &p)).await??;
    if state.args.log_text {
        tracing::info!(prompt = %text, "completion request text");
    }
    let turn = match &req.common.session {
        None => None,
        Some(key) => {
            let claim = take_session(&state, t, key)?;
            if !claim.history.is_empty() {
                return Err(ApiError::invalid(
                    "session",
                    "this session holds a chat conversation; continue it with /v1/chat/completions",
                ));
            }
            Some((
                Turn {
                    key: key.clone(),
                    messages: None,
                },
                claim.keep(),
            ))
        }
    };
    let sub = Submission {
        kind: Kind::Completion,
        prompt,
        checked,
        logprobs,
        salt,
        turn,
        echo: req.echo.then_some(text),
        tenant: t.index,
        arrival,
    };
    submit(state.clone(), l, &req.common, sub).await
}
