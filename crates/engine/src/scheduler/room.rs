//! Making room when blocks run out: which idle sessions give up their pins
//! and which running requests are preempted, and when a row had better wait
//! a step instead.
//!
//! Planning step E almost always overlaps step E-1, which still uses the
//! blocks of every request in it: a preempted request's blocks go to
//! quarantine, not to the free queue, and come back only when E-1
//! completes. So the scheduler counts, besides the free blocks, the blocks
//! that come back then (`returning`), and frees only as much as the row
//! needs:
//!
//! ```text
//!   need <= free - (promised - returning)+      take them now
//!   need <= free + returning - promised         wait one step for them
//!   otherwise                                   unpin idle sessions (least
//!       recently used first), then preempt running requests (newest first,
//!       none in this step), skipping any whose blocks are all shared, just
//!       enough to cover the rest; if even all of them would not, nothing
//!       is given up and the row waits
//! ```
//!
//! `promised` is what rows already waiting in this step will take next
//! step; later rows and admissions leave it alone, so an older request is
//! not starved by newer ones.

use strata_kv::{Epoch, KvError, PoolGuard, ReleaseYield};

use super::{Scheduler, StepSeq};
use crate::request::RequestId;

/// The block budget of the step being planned.
pub(super) struct Room {
    /// Blocks coming back to the free queue when the step in flight
    /// completes (quarantined until then).
    returning: usize,
    /// Blocks that rows waiting in this step will take next step.
    promised: usize,
    /// Rows that wait this step (not planned again in it).
    waiting: Vec<RequestId>,
}

/// Who can give blocks back.
enum Giver {
    Session(u64),
    Request(RequestId),
}

impl Room {
    /// The budget of step `epoch`, planned while (at most) the step before
    /// it runs.
    pub(super) fn new(g: &PoolGuard<'_>, epoch: Epoch) -> Self {
        let returning = match epoch.get() {
            0 | 1 => 0,
            e => g.returning_by(Epoch::new(e - 1)),
        };
        Self {
            returning,
            promised: 0,
            waiting: Vec::new(),
        }
    }

    /// Free blocks a row may take now without taking what a waiting row
    /// counts on (promises are met first from the returning blocks).
    pub(super) fn available_now(&self, g: &PoolGuard<'_>) -> usize {
        g.free_blocks()
            .saturating_sub(self.promised.saturating_sub(self.returning))
    }

    /// Blocks there will be by the next step, less what is promised.
    fn by_next_step(&self, g: &PoolGuard<'_>) -> usize {
        (g.free_blocks() + self.returning).saturating_sub(self.promised)
    }

    pub(super) fn promised(&self) -> usize {
        self.promised
    }

    pub(super) fn is_waiting(&self, id: RequestId) -> bool {
        self.waiting.contains(&id)
    }
}

impl Scheduler {
    /// Row `id` needs `need` more blocks than it may take. Gives up just
    /// enough pins to cover it (see the module doc); `true` if the row can
    /// be planned now, `false` if it waits this step.
    pub(super) fn make_room(
        &mut self,
        g: &mut PoolGuard<'_>,
        room: &mut Room,
        id: RequestId,
        need: usize,
        in_step: &[StepSeq],
    ) -> Result<bool, KvError> {
        let short = need.saturating_sub(room.by_next_step(g));
        if short > 0 {
            let mut givers = self.idle_sessions(g)?;
            for &v in self.running.iter().rev() {
                if v == id || in_step.iter().any(|r| r.seq == v) {
                    continue;
                }
                let lease = self.seqs[&v]
                    .lease
                    .as_ref()
                    .expect("running requests hold a lease");
                givers.push((Giver::Request(v), g.release_yield(lease.id())?));
            }
            if !self.give_up(g, room, givers, short)? {
                room.waiting.push(id);
                return Ok(false);
            }
        }
        if room.available_now(g) >= need {
            return Ok(true);
        }
        // Enough comes back when the step in flight completes.
        room.waiting.push(id);
        room.promised += need;
        self.counters.waits_for_blocks += 1;
        Ok(false)
    }

    /// Whether an admission can take `want` blocks now, unpinning idle
    /// sessions (only as many as it takes) if even the blocks coming back
    /// next step would not be enough. It never preempts.
    pub(super) fn room_for_admission(
        &mut self,
        g: &mut PoolGuard<'_>,
        room: &mut Room,
        want: usize,
    ) -> Result<bool, KvError> {
        if room.available_now(g) >= want {
            return Ok(true);
        }
        let short = want.saturating_sub(room.by_next_step(g));
        if short == 0 {
            // It comes back with the step in flight: admit next step.
            return Ok(false);
        }
        let givers = self.idle_sessions(g)?;
        Ok(self.give_up(g, room, givers, short)? && room.available_now(g) >= want)
    }

    /// Sessions whose pins are at rest (idle, or their turn not admitted),
    /// least recently used first, with what unpinning each gives back.
    fn idle_sessions(&self, g: &PoolGuard<'_>) -> Result<Vec<(Giver, ReleaseYield)>, KvError> {
        let mut idle: Vec<(&u64, &crate::session::Session)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.lease.is_some())
            .collect();
        idle.sort_by_key(|(id, s)| (s.last_used, **id));
        idle.into_iter()
            .map(|(&sid, s)| {
                let lease = s.lease.as_ref().expect("filtered above");
                Ok((Giver::Session(sid), g.release_yield(lease.id())?))
            })
            .collect()
    }

    /// Gives up the shortest prefix of `givers` (skipping those that would
    /// give nothing) whose blocks cover `short`; if all of them would not,
    /// gives up nothing. Returns whether it covered `short`.
    fn give_up(
        &mut self,
        g: &mut PoolGuard<'_>,
        room: &mut Room,
        givers: Vec<(Giver, ReleaseYield)>,
        short: usize,
    ) -> Result<bool, KvError> {
        let mut gain = 0;
        let mut chosen = Vec::new();
        for (giver, y) in givers {
            if gain >= short {
                break;
            }
            if y.now + y.later == 0 {
                continue;
            }
            gain += y.now + y.later;
            chosen.push((giver, y));
        }
        if gain < short {
            return Ok(false);
        }
        self.counters.blocks_short += short as u64;
        for (giver, y) in chosen {
            match giver {
                Giver::Session(sid) => {
                    let lease = self
                        .sessions
                        .get_mut(&sid)
                        .and_then(|s| s.lease.take())
                        .expect("an idle session's pins");
                    g.release(lease)?;
                    self.counters.sessions_unpinned += 1;
                }
                Giver::Request(v) => self.preempt(g, v)?,
            }
            room.returning += y.later;
        }
        Ok(true)
    }

    /// Gives a running request's blocks back (at once, so this step's
    /// allocations can use what is free) and re-queues it in its place.
    fn preempt(&mut self, g: &mut PoolGuard<'_>, id: RequestId) -> Result<(), KvError> {
        let s = self.seqs.get_mut(&id).expect("running requests exist");
        if let Some(lease) = s.lease.take() {
            g.release(lease)?;
        }
        s.computed = 0;
        self.running.retain(|&r| r != id);
        let at = self.waiting.partition_point(|&w| w < id);
        self.waiting.insert(at, id);
        self.counters.preemptions += 1;
        Ok(())
    }
}
