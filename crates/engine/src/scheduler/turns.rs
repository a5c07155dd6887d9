//! The scheduler's side of sessions: the conversation's tokens and the lease
//! that pins its blocks between turns.
//!
//! A turn takes the session's lease at admission. When it ends with a stop
//! or at its length, the session gets the conversation's tokens and the
//! lease back, but only once every step that writes into the lease has
//! completed: a turn that stops at a token still has its row in the step
//! planned meanwhile (the stop token's KV, the "wasted" row), and if that
//! step fails, what it wrote is garbage. So the hand-over waits for that
//! step, then truncates the lease to the content known good (the KV core
//! drops what a failed step wrote, and the tail is recomputed next turn).
//! The next turn waits for the hand-over (at most one step).
//!
//! After a stop string, the conversation continues from the text the
//! client saw (see `TextState::conversation_cut`), and the lease keeps
//! only the KV of the tokens that lie wholly before the stop string.
//!
//! An aborted or failed turn leaves the session's tokens as they were; its
//! pins are dropped (full blocks stay cached).

use strata_kv::TokenId;

use super::Scheduler;
use crate::request::{FinishReason, RequestId};
use crate::session::{self, Session, SessionInfo};
use strata_kv::{ExtraKeys, Lease, PoolGuard};

impl Scheduler {
    /// A new session with an empty conversation.
    pub(crate) fn create_session(&mut self, id: u64, salt: Option<Vec<u8>>) {
        let root = self.hasher.root(ExtraKeys {
            model_fingerprint: &self.fingerprint,
            cache_salt: salt.as_deref(),
        });
        self.sessions.insert(
            id,
            Session {
                tokens: Vec::new(),
                root,
                lease: None,
                turn: None,
                handover: None,
                last_used: std::time::Instant::now(),
            },
        );
    }

    /// Ends a session; a running turn is aborted (its blocks wait in
    /// quarantine for the steps still using them), and a hand-over still
    /// waiting for its step is dropped.
    pub(crate) fn destroy_session(&mut self, id: u64) -> bool {
        let Some(s) = self.sessions.get(&id) else {
            return false;
        };
        if let Some(turn) = s.turn {
            self.counters.aborted += 1;
            self.finish(turn, FinishReason::Abort);
        }
        self.sessions.remove(&id);
        true
    }

    /// The live sessions.
    pub(crate) fn session_infos(&self) -> Vec<SessionInfo> {
        let held = |t: Option<RequestId>| {
            t.and_then(|t| self.seqs.get(&t))
                .is_some_and(|q| q.lease.is_some())
        };
        let mut v: Vec<SessionInfo> = self
            .sessions
            .iter()
            .map(|(&id, s)| SessionInfo {
                id,
                tokens: s.tokens.len(),
                pinned: s.lease.is_some() || held(s.turn) || held(s.handover),
                busy: s.turn.is_some(),
            })
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Unpins sessions idle for longer than the time-to-live: their full
    /// blocks stay cached, the partial tail is recomputed next turn.
    pub(crate) fn unpin_expired(&mut self) {
        let now = std::time::Instant::now();
        for s in self.sessions.values_mut() {
            if s.turn.is_none() && now.duration_since(s.last_used) >= self.session_ttl {
                s.lease = None;
            }
        }
    }

    /// Turn `id` of session `sid` ended for `reason`: a completed turn's
    /// tokens wait, with its lease, for the hand-over; any other leaves the
    /// session as it was.
    pub(super) fn end_turn_of(&mut self, id: RequestId, sid: u64, reason: &FinishReason) {
        let mut tokens = None;
        if matches!(reason, FinishReason::Stop | FinishReason::Length)
            && self.sessions.contains_key(&sid)
        {
            let handover = self.conversation(id);
            tokens = Some(handover.0.len());
            self.seqs.get_mut(&id).expect("a known turn").handover = Some(handover);
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.handover = Some(id);
            }
        }
        self.end_turn(sid, tokens);
    }

    /// What a completed turn leaves its session: the conversation's tokens,
    /// and how many of them the lease may keep KV for.
    fn conversation(&self, id: RequestId) -> (Vec<TokenId>, usize) {
        let s = &self.seqs[&id];
        match s.text.as_ref().and_then(|t| t.conversation_cut()) {
            Some((kept, rest)) => {
                let upto = s.prompt_len + kept;
                let mut tokens = s.tokens[..upto].to_vec();
                tokens.extend(rest);
                (tokens, upto)
            }
            None => (s.tokens.clone(), s.tokens.len()),
        }
    }

    /// The session's turn is over (the client may send the next one).
    pub(super) fn end_turn(&mut self, sid: u64, tokens: Option<usize>) {
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.turn = None;
            s.last_used = std::time::Instant::now();
        }
        session::lock(&self.registry).end_turn(sid, tokens);
    }

    /// Every step that wrote into turn `id`'s lease has completed: queues
    /// the hand-over, applied under the pool lock by the scheduler's next
    /// `plan` or at the end of applying step results (never by taking the
    /// lock here: a turn may finish while planning holds it).
    pub(super) fn hand_over(
        &mut self,
        id: RequestId,
        sid: u64,
        conversation: (Vec<TokenId>, usize),
        lease: Option<Lease>,
    ) {
        self.handovers.push(Handover {
            id,
            sid,
            conversation,
            lease,
        });
    }

    /// The session gets the conversation and the lease, truncated to what
    /// is known good (a failed step's blocks, and the KV of a stop string's
    /// tokens, are dropped).
    pub(super) fn apply_handovers(&mut self, g: &mut PoolGuard<'_>) {
        for h in std::mem::take(&mut self.handovers) {
            let Some(s) = self
                .sessions
                .get_mut(&h.sid)
                .filter(|s| s.handover == Some(h.id))
            else {
                continue; // destroyed meanwhile: the lease drops
            };
            let (tokens, upto) = h.conversation;
            s.handover = None;
            s.tokens = tokens;
            s.last_used = std::time::Instant::now();
            s.lease = h.lease.and_then(|lease| match g.truncate(&lease, upto) {
                Ok(_) => Some(lease),
                Err(e) => {
                    // Every step that used the lease has completed (that is
                    // when a hand-over is queued), so this is a bug; the
                    // session recomputes from its cached blocks.
                    debug_assert!(false, "a hand-over before its steps completed: {e}");
                    self.counters.handovers_refused += 1;
                    None
                }
            });
        }
    }
}

/// A finished turn's conversation and lease, waiting to go to its session.
pub(super) struct Handover {
    id: RequestId,
    sid: u64,
    conversation: (Vec<TokenId>, usize),
    lease: Option<Lease>,
}
