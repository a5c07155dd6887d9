//! Sessions: named conversations bound to one model instance, whose blocks
//! stay pinned between turns so a follow-up turn prefills only its new
//! tokens.
//!
//! The registry here is what `submit` checks synchronously (existence, the
//! model, one turn at a time); the tokens and the lease live with the
//! scheduler, which moves the lease into a turn's sequence at admission and
//! back once every step that wrote into it has completed (so a session never
//! holds a block whose content is not known good: see `Scheduler::hand_over`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use strata_kv::{ChainRoot, Lease, TokenId};

use crate::request::RequestId;

use crate::sync::{Mutex, MutexGuard};

/// A session's identity: the model instance it belongs to, and its number.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionId {
    /// The engine instance (model) the session is bound to.
    pub model: u64,
    /// That model's name, for errors.
    pub model_name: Arc<str>,
    /// The session's number within its model.
    pub id: u64,
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "session {} of model '{}'", self.id, self.model_name)
    }
}

/// What the engine reports about a live session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session.
    pub id: u64,
    /// Tokens of the conversation so far.
    pub tokens: usize,
    /// Whether its blocks are pinned now (else they are only cached).
    pub pinned: bool,
    /// Whether a turn is running.
    pub busy: bool,
}

/// The synchronous side: which sessions exist, which have a turn running,
/// and how many tokens each conversation holds (so a turn that would pass
/// the context is refused when it is submitted, not failed later).
#[derive(Default)]
pub(crate) struct Registry {
    sessions: HashMap<u64, Entry>,
}

#[derive(Default, Clone, Copy)]
struct Entry {
    busy: bool,
    tokens: usize,
}

pub(crate) type SharedRegistry = Arc<Mutex<Registry>>;

pub(crate) fn lock(r: &SharedRegistry) -> MutexGuard<'_, Registry> {
    crate::sync::lock(r)
}

impl Registry {
    pub(crate) fn create(&mut self, id: u64) {
        self.sessions.insert(id, Entry::default());
    }

    /// Marks a turn started; `None` if there is no such session, `Some(false)`
    /// if a turn is already running.
    pub(crate) fn start_turn(&mut self, id: u64) -> Option<bool> {
        let e = self.sessions.get_mut(&id)?;
        if e.busy {
            return Some(false);
        }
        e.busy = true;
        Some(true)
    }

    /// The turn is over; `tokens`: the conversation's new length, if the
    /// turn completed.
    pub(crate) fn end_turn(&mut self, id: u64, tokens: Option<usize>) {
        if let Some(e) = self.sessions.get_mut(&id) {
            e.busy = false;
            if let Some(t) = tokens {
                e.tokens = t;
            }
        }
    }

    /// The tokens a session's conversation holds (0 for no such session).
    pub(crate) fn tokens(&self, id: u64) -> usize {
        self.sessions.get(&id).map_or(0, |e| e.tokens)
    }

    pub(crate) fn remove(&mut self, id: u64) -> bool {
        self.sessions.remove(&id).is_some()
    }
}

/// The scheduler's side of a session.
pub(crate) struct Session {
    /// The conversation's tokens.
    pub(crate) tokens: Vec<TokenId>,
    /// Its chain root (the salt it was created with).
    pub(crate) root: ChainRoot,
    /// Its blocks, pinned between turns; `None` while a turn runs (the
    /// turn's sequence holds it) or after an idle unpin.
    pub(crate) lease: Option<Lease>,
    /// The running turn's request id.
    pub(crate) turn: Option<RequestId>,
    /// A finished turn whose lease comes back once the step still writing
    /// its wasted row completes; the next turn waits for it.
    pub(crate) handover: Option<RequestId>,
    pub(crate) last_used: Instant,
}
