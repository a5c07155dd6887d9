//! Admission: a waiting request joins its session's conversation (a
//! turn's tokens are the conversation at its admission, after the previous
//! turn's hand-over), looks up its prefix without pinning it, and, if room
//! can be made, pins the hit and allocates the rest of its known tokens.

use strata_kv::{KvError, OwnerTag, PoolGuard};

use super::{Room, Scheduler};
use crate::request::{Event, FinishReason, RequestId};

/// What admitting a waiting request gave.
pub(super) enum Admission {
    Admitted,
    /// It stays first in line.
    Wait,
    /// It was finished (an error) and left the line.
    Gone,
}

impl Scheduler {
    /// A session turn's tokens become the conversation so far, then its
    /// prompt. `false`: not yet (the previous turn's hand-over waits for
    /// the step in flight), or never (the turn was finished with an error).
    fn join_conversation(&mut self, id: RequestId) -> bool {
        let s = &self.seqs[&id];
        let Some(sid) = s.session.filter(|_| !s.joined) else {
            return true;
        };
        let Some(sess) = self.sessions.get(&sid) else {
            self.finish(
                id,
                FinishReason::Error(format!("session {sid} was destroyed")),
            );
            return false;
        };
        if sess.handover.is_some() {
            return false;
        }
        let total = sess.tokens.len() + s.tokens.len();
        if total >= self.context {
            // A session's conversation can outgrow the context.
            self.finish(
                id,
                FinishReason::Error(format!(
                    "the conversation has {total} tokens; this model's maximum context length is {} tokens",
                    self.context
                )),
            );
            return false;
        }
        let mut tokens = sess.tokens.clone();
        let s = self.seqs.get_mut(&id).expect("checked above");
        tokens.extend_from_slice(&s.tokens);
        s.tokens = tokens;
        s.prompt_len = total;
        s.max_tokens = s.max_asked.min(self.context - total);
        s.joined = true;
        true
    }

    /// Looks up and pins the prefix of a waiting request, then allocates
    /// blocks for the rest of its known tokens. `Wait`: not now (its pins
    /// are dropped); `Gone`: it was finished instead.
    pub(super) fn admit(
        &mut self,
        g: &mut PoolGuard<'_>,
        room: &mut Room,
        id: RequestId,
    ) -> Result<Admission, KvError> {
        if self.seqs[&id].outstanding > 0 {
            // Preempted with a sample still coming back: wait for it.
            return Ok(Admission::Wait);
        }
        if !self.join_conversation(id) {
            return Ok(if self.seqs.get(&id).is_some_and(|s| !s.finished) {
                Admission::Wait
            } else {
                Admission::Gone
            });
        }
        // Keep a block of headroom per running request for its decode, so
        // a new admission does not force the next step to preempt.
        let reserve = self.running.len();
        let s = &self.seqs[&id];
        let blocks = s.tokens.len().div_ceil(self.block_size);
        // A session's turn takes the session's pinned blocks.
        let sid = s.session;
        let carried = sid
            .and_then(|sid| self.sessions.get_mut(&sid))
            .and_then(|x| x.lease.take());
        let mut restore = None;
        let (lease, hit_blocks, hit_tokens) = match carried {
            Some(lease) => {
                let t = g.len_tokens(lease.id())?;
                let b = g.table(lease.id())?.len();
                if !self.room_for_admission(g, room, blocks - b + reserve, &[])? {
                    // Wait, holding nothing; the pins go back to the session
                    // (where pressure may take them).
                    if let Some(x) = sid.and_then(|sid| self.sessions.get_mut(&sid)) {
                        x.lease = Some(lease);
                    }
                    return Ok(Admission::Wait);
                }
                (lease, b, t)
            }
            // A prompt still to score computes every row: it takes no hits
            // (once scored, as after a preemption, it takes them again).
            None if s.scoring() => {
                if !self.room_for_admission(g, room, blocks + reserve, &[])? {
                    return Ok(Admission::Wait);
                }
                let root = self.seqs[&id].root;
                (g.new_lease(OwnerTag(id.get()), root), 0, 0)
            }
            None => {
                let mut seq = self.hasher.sequence(s.root);
                seq.extend(&s.tokens);
                // Decide on a look that pins nothing: a request that waits
                // must not reorder the LRU queue or count as a lookup each
                // time it retries.
                let peek = g.peek_prefix(&seq)?;
                if peek.hit.pending.is_some() {
                    self.counters.waits_for_pending += 1;
                    return Ok(Admission::Wait);
                }
                // Pinning takes the free hit blocks out of the free queue;
                // an idle session holding hit blocks frees nothing by them.
                let want = |p: &strata_kv::PrefixPeek| blocks - p.hit.blocks + reserve + p.free;
                if !self.room_for_admission(g, room, want(&peek), &peek.blocks)? {
                    return Ok(Admission::Wait);
                }
                // Unpinning may have changed what the prefix hits: look
                // again before pinning (nothing is pinned yet).
                let peek = g.peek_prefix(&seq)?;
                if peek.hit.pending.is_some() || room.available_now(g) < want(&peek) {
                    return Ok(Admission::Wait);
                }
                let max_restore = self.max_restore(g, &seq)?;
                let (lease, hit, plan) =
                    g.lookup_and_pin_tiered(OwnerTag(id.get()), &seq, max_restore)?;
                debug_assert_eq!(hit, peek.hit, "a look and the lookup under one lock agree");
                restore = self.start_restore(id, plan);
                (lease, hit.blocks, hit.tokens)
            }
        };
        // Restore targets are in the table already.
        let have = g.table(lease.id())?.len();
        let need = blocks - have;
        debug_assert!(need <= g.free_blocks(), "the room was checked");
        g.allocate(&lease, need)?;
        if self.config.sanitize {
            self.fresh
                .extend_from_slice(&g.table(lease.id())?[hit_blocks..]);
        }

        self.counters.prompt_tokens += self.seqs[&id].tokens.len() as u64;
        self.counters.cached_tokens += hit_tokens as u64;
        let s = self.seqs.get_mut(&id).expect("waiting requests exist");
        s.computed = hit_tokens;
        s.lease = Some(lease);
        let restoring = restore.is_some();
        s.restore = restore;
        if s.cached_tokens.is_none() && !restoring {
            s.cached_tokens = Some(hit_tokens);
            let _ = s.events.send(Event::Admitted {
                cached_tokens: hit_tokens,
            });
        }
        Ok(Admission::Admitted)
    }
}
