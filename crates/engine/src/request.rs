//! What a client hands the engine, and what comes back.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use strata_kv::TokenId;
use strata_model::{Sampled, SamplingParams};
use tokio::sync::mpsc;

/// The engine's number for a request, unique within its engine.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub(crate) u64);

impl RequestId {
    /// The raw number (logs, metrics, the sanitizer's owner tags).
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// When a sequence stops, besides the model's end-of-sequence tokens.
#[derive(Clone, Debug, Default)]
pub struct StopConditions {
    /// Generated tokens at most (`None`: up to the context length).
    pub max_tokens: Option<usize>,
    /// Token ids that end the sequence (the stop token is reported).
    pub stop_token_ids: Vec<TokenId>,
    /// Keep going past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// End-of-sequence and stop ids are ignored before this many tokens.
    pub min_tokens: usize,
    /// Text that ends the sequence; the text before it is the last sent
    /// (needs an engine with a tokenizer).
    pub stop_strings: Vec<String>,
}

/// One request: a prompt to continue.
#[derive(Clone, Debug)]
pub struct Request {
    /// The prompt's token ids (at least one).
    pub prompt: Vec<TokenId>,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// When to stop.
    pub stop: StopConditions,
    /// Prefixes are shared only between requests with the same salt
    /// (ignored for a session's turn: the session keeps its creation salt).
    pub cache_salt: Option<Vec<u8>>,
    /// Continue this session: `prompt` is appended to its conversation.
    pub session: Option<crate::SessionId>,
    /// Past this instant the request ends with [`FinishReason::Timeout`],
    /// whether or not its client is reading.
    pub deadline: Option<std::time::Instant>,
    /// Score the prompt: every prompt token after the first gets its
    /// log-probability and this many alternatives
    /// ([`Event::PromptLogprobs`], before the first token). The whole
    /// prompt is computed (a prefix-cache hit has no logits to give); not
    /// for a session's turn.
    pub prompt_logprobs: Option<usize>,
}

/// Generated tokens a client may leave unread before its request pauses:
/// a client that stops reading never makes the engine buffer its whole
/// answer (it resumes as the client reads, or ends at its deadline).
pub const MAX_UNREAD: usize = 64;

/// A request that gave way while paused for its client comes back once
/// this few tokens are left unread (not at the first token read, or a
/// client reading a token now and then would cost a resume per token).
pub(crate) const RESUME_UNREAD: usize = MAX_UNREAD / 2;

/// A request paused this long for its client (who read nothing meanwhile)
/// ends with [`FinishReason::Timeout`]: a client that stops reading does
/// not hold its running slot and its KV blocks until its deadline.
pub const MAX_PAUSE: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a sequence ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence or stop token.
    Stop,
    /// `max_tokens`, or the context length.
    Length,
    /// The client went away, or the engine is shutting down.
    Abort,
    /// A step carrying the request failed.
    Error(String),
    /// The request's grammar reached a dead end (no token could continue
    /// it) or refused a token: the request's own input, not the engine.
    Grammar(String),
    /// The request's deadline passed.
    Timeout,
}

/// Token counts of a finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens found in the prefix cache at (first) admission.
    pub cached_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

/// What the engine sends back over a request's channel.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The request was admitted; `cached_tokens` of its prompt were hits.
    Admitted {
        /// Prompt tokens found in the prefix cache.
        cached_tokens: usize,
    },
    /// Log-probabilities of prompt tokens (asked for with
    /// [`Request::prompt_logprobs`]), in order, in one or more events
    /// before the first token: the first event's first entry is the
    /// prompt's second token (the first has nothing before it).
    PromptLogprobs(Vec<Sampled>),
    /// One generated token.
    Token {
        /// The token.
        id: TokenId,
        /// Its log-probability.
        logprob: f32,
        /// The most likely alternatives, if asked for.
        top: Vec<(TokenId, f32)>,
        /// Text now safe to show (empty without a tokenizer): whole
        /// characters, never the start of a stop string that may still
        /// complete; the last token's delta includes the rest of the text.
        text: String,
    },
    /// The last event of a request.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Its token counts.
        usage: Usage,
    },
}

/// The top bit of the word a handle shares with the engine (the rest
/// counts unread tokens): the client asked to abort, and still reads.
pub(crate) const CANCELLED: usize = 1 << (usize::BITS - 1);

/// The receiving side of a request. Dropping it aborts the request: its
/// blocks come back (through quarantine if a step still uses them).
#[derive(Debug)]
pub struct RequestHandle {
    pub(crate) id: RequestId,
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
    /// Tokens sent and not yet received (the engine pauses the request at
    /// [`MAX_UNREAD`]).
    pub(crate) unread: Arc<AtomicUsize>,
}

impl RequestHandle {
    /// The engine's id for the request.
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Aborts the request but keeps the handle: its events still arrive,
    /// ending with `Finished`, whose reason says how it really ended (a
    /// request that completed before the abort reached the engine says
    /// `Stop` or `Length`; a session's turn that did is in the session).
    /// Dropping the handle aborts too, without telling.
    pub fn abort(&self) {
        self.unread.fetch_or(CANCELLED, Ordering::AcqRel);
    }

    /// The next event, waiting for it (from async code).
    pub async fn recv(&mut self) -> Option<Event> {
        let e = self.events.recv().await;
        self.received(e.as_ref());
        e
    }

    /// The next event if one is waiting; `Err` tells empty from closed.
    pub fn try_recv(&mut self) -> Result<Event, mpsc::error::TryRecvError> {
        let e = self.events.try_recv();
        self.received(e.as_ref().ok());
        e
    }

    fn received(&self, e: Option<&Event>) {
        if let Some(Event::Token { .. }) = e {
            self.unread.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The next event, blocking the thread (from sync code and tests).
    pub fn recv_blocking(&mut self) -> Option<Event> {
        let e = self.events.blocking_recv();
        self.received(e.as_ref());
        e
    }

    /// Every remaining event, blocking until the request finishes.
    pub fn collect_blocking(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(e) = self.recv_blocking() {
            let last = matches!(e, Event::Finished { .. });
            out.push(e);
            if last {
                break;
            }
        }
        out
    }
}
