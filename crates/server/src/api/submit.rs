//! Submitting a checked request to the engine, and answering it streamed
//! or whole.

use std::sync::Arc;

use axum::response::Response;
use strata_engine::Request;
use strata_kv::TokenId;

use super::generation::{Arrival, Generation, Kind, ScoredPrompt, Turn, request_id};
use super::sessions::release_session;
use super::stream::respond_stream;
use super::whole::respond_whole;
use super::{Shared, off_thread};
use crate::error::ApiError;
use crate::openai::tools::{ToolFormat, ToolSet};
use crate::openai::{Checked, Common};
use crate::state::{AppState, Loaded, Tenant};

/// What a handler hands to [`submit`].
pub(super) struct Submission {
    pub(super) kind: Kind,
    pub(super) prompt: Vec<TokenId>,
    pub(super) checked: Checked,
    pub(super) logprobs: Option<usize>,
    pub(super) salt: Option<Vec<u8>>,
    pub(super) turn: Option<(Turn, strata_engine::SessionId)>,
    pub(super) echo: Option<String>,
    /// `echo` with `logprobs`: the prompt to score.
    pub(super) scored: Option<ScoredPrompt>,
    /// Generate nothing (`max_tokens: 0` with `echo`).
    pub(super) prompt_only: bool,
    pub(super) tenant: usize,
    pub(super) arrival: Arrival,
    /// The tools the answer may call, and the format to read calls in.
    pub(super) tools: Option<(Arc<ToolSet>, ToolFormat)>,
}

/// Compiles the grammar a request asked for (cached by its text), on the
/// blocking pool: a large schema takes milliseconds. A grammar that does
/// not compile is a 400 naming its parameter, with the compiler's message.
pub(super) async fn compile_grammar(
    state: &AppState,
    tenant: &Tenant,
    loaded: &Arc<Loaded>,
    checked: &mut Checked,
) -> Result<(), ApiError> {
    let Some((spec, param)) = checked.grammar.take() else {
        return Ok(());
    };
    let l = loaded.clone();
    let compiled = off_thread(state, tenant, move || l.grammars.compile(&spec)).await?;
    checked.sampling.grammar = Some(compiled.map_err(|e| {
        ApiError::invalid(param, format!("{param}: the grammar does not compile: {e}"))
    })?);
    Ok(())
}

/// Submits a checked request and answers it, streamed or whole.
pub(super) async fn submit(
    state: Shared,
    loaded: Arc<Loaded>,
    common: &Common,
    sub: Submission,
) -> Result<Response, ApiError> {
    let Arrival {
        at: arrival,
        unix: created,
    } = sub.arrival;
    let (turn, session) = match sub.turn {
        Some((t, s)) => (Some(t), Some(s)),
        None => (None, None),
    };
    // One deadline, from the arrival, for the engine and for the wait here.
    let deadline = arrival + state.args.request_timeout;
    let req = Request {
        prompt: sub.prompt,
        sampling: sub.checked.sampling,
        stop: sub.checked.stop,
        cache_salt: sub.salt,
        session,
        deadline: Some(deadline),
        prompt_logprobs: sub.scored.as_ref().map(|_| sub.logprobs.unwrap_or(0)),
    };
    let (n, best_of) = (sub.checked.n, sub.checked.best_of);
    let handles = match loaded.engine.submit_n(req, best_of) {
        Ok(h) => h,
        Err(e) => {
            if let Some(t) = &turn {
                release_session(&state, &t.key);
            }
            return Err(e.into());
        }
    };
    let id = request_id(match sub.kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    });
    // One generation per sample (a session's turn is one: the engine
    // refuses more).
    let mut turn = turn;
    let mut scored = sub.scored;
    let gens: Vec<Generation> = handles
        .into_iter()
        .enumerate()
        .map(|(i, handle)| Generation {
            deadline: tokio::time::Instant::from_std(deadline),
            state: state.clone(),
            loaded: loaded.clone(),
            handle: Some(handle),
            kind: sub.kind,
            id: id.clone(),
            index: i as u32,
            logprobs: sub.logprobs,
            arrival,
            created,
            last_token: None,
            text: String::new(),
            last: None,
            echo: sub.echo.clone(),
            scored: scored.take(),
            prompt_only: sub.prompt_only,
            turn: turn.take(),
            tenant: sub.tenant,
            finished: false,
            tools: sub.tools.clone(),
            logprob_sum: 0.0,
        })
        .collect();
    if common.stream {
        let include_usage = common
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        Ok(respond_stream(gens, include_usage))
    } else {
        // This future is the handler's: if the client disconnects, axum
        // drops it, and with it the generations (which abort).
        respond_whole(gens, n).await
    }
}
