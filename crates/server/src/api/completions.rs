//! `POST /v1/completions`.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use strata_kv::TokenId;

use super::generation::{Arrival, Kind, ScoredPrompt, Turn};
use super::sessions::take_session;
use super::submit::{Submission, compile_grammar, submit};
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

/// A completion's prompt: its tokens, its text (what `echo` shows), and
/// whether a BOS token that is not in the text went first.
pub(super) struct PromptTokens {
    pub(super) tokens: Vec<TokenId>,
    pub(super) text: String,
    pub(super) added_bos: bool,
}

/// The prompt of a completion: text (special-token strings are parsed, as
/// Hugging Face tokenizers do for raw prompts) or token ids.
pub(super) fn completion_prompt(l: &Loaded, p: &Prompt) -> Result<PromptTokens, ApiError> {
    let ids = |v: &[i64]| token_ids(l, v);
    let text = |s: &str| -> Result<PromptTokens, ApiError> {
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
        let added_bos =
            tok.add_bos() && !s.is_empty() && t.len() > 1 && Some(t[0]) == tok.bos() && {
                // Ours unless the text itself starts with the BOS string.
                let b = tok.token_bytes(t[0]);
                !s.as_bytes().starts_with(b)
            };
        Ok(PromptTokens {
            tokens: t,
            text: s.to_string(),
            added_bos,
        })
    };
    let decoded = |t: Vec<TokenId>| PromptTokens {
        text: l.tokenizer.decode(&t, true),
        tokens: t,
        added_bos: false,
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
        Prompt::Tokens(v) => Ok(decoded(ids(v)?)),
        Prompt::TokenLists(v) => {
            one(v.len())?;
            Ok(decoded(ids(&v[0])?))
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
    let (t, l, mut req): (_, _, CompletionRequest) = begin(&state, &headers, body).await?;
    check_model(&l, req.common.model.as_deref())?;
    let logprobs = match req.logprobs {
        None => None,
        Some(n) => Some(openai::completion_logprobs(n)?),
    };
    // `max_tokens: 0` with `echo` scores the prompt and generates nothing
    // (lm-evaluation-harness's loglikelihood): the engine samples one
    // token, which is not shown or counted.
    let prompt_only = req.echo && req.common.max_tokens == Some(0);
    if prompt_only {
        if req.common.min_tokens.is_some_and(|m| m > 0) {
            return Err(ApiError::invalid(
                "min_tokens",
                "min_tokens must be 0 when max_tokens is 0",
            ));
        }
        req.common.max_tokens = Some(1);
    }
    let mut checked = req.common.check(l.vocab, logprobs.unwrap_or(0))?;
    compile_grammar(&state, t, &l, &mut checked).await?;
    let salt = salt(&state, t, req.common.cache_salt.as_deref())?;
    check_prompt_bytes(&l, &req.prompt)?;
    let (lp, p) = (l.clone(), req.prompt.clone());
    let prompt = off_thread(&state, t, move || completion_prompt(&lp, &p)).await??;
    if state.args.log_text {
        tracing::info!(prompt = %prompt.text, "completion request text");
    }
    if req.echo && logprobs.is_some() && req.common.session.is_some() {
        return Err(strata_engine::EngineError::ScoredTurn.into());
    }
    if prompt_only && req.common.session.is_some() {
        // The engine's one sampled token would stay in the session.
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1 for a session's turn",
        ));
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
    // `echo` with `logprobs`: the prompt's tokens are scored too.
    let scored = (req.echo && logprobs.is_some()).then(|| ScoredPrompt {
        tokens: prompt.tokens.clone(),
        added_bos: prompt.added_bos,
        scores: Vec::new(),
    });
    let sub = Submission {
        kind: Kind::Completion,
        prompt: prompt.tokens,
        checked,
        logprobs,
        salt,
        turn,
        scored,
        prompt_only,
        echo: req.echo.then_some(prompt.text),
        tenant: t.index,
        arrival,
        tools: None,
    };
    submit(state.clone(), l, &req.common, sub).await
}
