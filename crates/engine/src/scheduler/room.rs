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

use strata_kv::{BlockId, Epoch, HolderId, KvError, PoolGuard};

use super::{Scheduler, StepSeq};
use crate::request::RequestId;

/// The block budget of the step being planned.
pub(super) struct Room {
    /// The step in flight while this one is planned, if any: the blocks
    /// quarantined for it come back when it completes. Asked of the pool
    /// each time (a victim's blocks join them), never tallied here.
    in_flight: Option<Epoch>,
    /// Blocks of requests whose last sample is in flight: they finish when
    /// it comes back, and their blocks are free by the next step.
    finishing: usize,
    /// Blocks of session turns whose last sample is in flight: by the next
    /// step they are a session's pins at rest, which an idle session gives
    /// up under pressure.
    settling: usize,
    /// Blocks that rows waiting in this step will take next step.
    promised: usize,
    /// Rows that wait this step (not planned again in it), with what each
    /// was promised.
    waiting: Vec<(RequestId, usize)>,
}

/// Who can give blocks back.
#[derive(Clone, Copy)]
enum Giver {
    Session(u64, HolderId),
    Request(RequestId, HolderId),
    /// A running request paused for its client (any age: it is not
    /// reading, others are waiting).
    Paused(RequestId, HolderId),
}

impl Giver {
    fn holder(self) -> HolderId {
        match self {
            Giver::Session(_, h) | Giver::Request(_, h) | Giver::Paused(_, h) => h,
        }
    }
}

impl Room {
    /// The budget of step `epoch`, planned while (at most) the step before
    /// it runs; `finishing` as above.
    pub(super) fn new(epoch: Epoch, (finishing, settling): (usize, usize)) -> Self {
        Self {
            in_flight: (epoch.get() > 1).then(|| Epoch::new(epoch.get() - 1)),
            finishing,
            settling,
            promised: 0,
            waiting: Vec::new(),
        }
    }

    /// Blocks coming back by the next step.
    fn returning(&self, g: &PoolGuard<'_>) -> usize {
        self.in_flight.map_or(0, |e| g.returning_by(e)) + self.finishing
    }

    /// Free blocks a row may take now without taking what a waiting row
    /// counts on (promises are met first from the returning blocks).
    pub(super) fn available_now(&self, g: &PoolGuard<'_>) -> usize {
        g.free_blocks()
            .saturating_sub(self.promised.saturating_sub(self.returning(g)))
    }

    /// Blocks there will be by the next step, less what is promised.
    fn by_next_step(&self, g: &PoolGuard<'_>) -> usize {
        (g.free_blocks() + self.returning(g)).saturating_sub(self.promised)
    }

    /// Whether any row waits for blocks this step.
    pub(super) fn any_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Blocks promised to rows that wait: free by the next step.
    pub(super) fn promised(&self) -> usize {
        self.promised
    }

    pub(super) fn is_waiting(&self, id: RequestId) -> bool {
        self.waiting.iter().any(|&(w, _)| w == id)
    }

    fn wait(&mut self, id: RequestId, promise: usize) {
        self.waiting.push((id, promise));
        self.promised += promise;
    }

    /// A waiting row was preempted: its promise lapses.
    fn forget(&mut self, id: RequestId) {
        if let Some(k) = self.waiting.iter().position(|&(w, _)| w == id) {
            self.promised -= self.waiting.swap_remove(k).1;
        }
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
        if short > 0 && short <= room.settling {
            // A turn about to finish leaves its blocks as a session's pins
            // at rest next step, to be given up then: wait for that rather
            // than preempt.
            room.wait(id, 0);
            self.counters.waits_for_blocks += 1;
            return Ok(false);
        }
        if short > 0 {
            let mut givers = self.idle_sessions();
            givers.extend(self.paused_givers(in_step));
            // Only newer requests give way (FCFS: a preempted request keeps
            // its place in line, so it cannot starve), none in this step,
            // and none about to finish (its blocks come back anyway).
            for &v in self.running.iter().rev().take_while(|&&v| v > id) {
                let s = &self.seqs[&v];
                if in_step.iter().any(|r| r.seq == v) || !self.plannable(s) || s.waits_for_reader()
                {
                    continue;
                }
                let lease = s.lease.as_ref().expect("running requests hold a lease");
                givers.push(Giver::Request(v, lease.id()));
            }
            // The pool's own count, apart from this scheduler's tally: if
            // it says enough comes back, a preemption now is needless.
            let witness = (g.free_blocks() + room.in_flight.map_or(0, |e| g.returning_by(e)))
                .saturating_sub(room.promised);
            let needless = witness >= need;
            if !self.give_up(g, givers, short, &[], Some((id, needless)), room)? {
                room.wait(id, 0);
                return Ok(false);
            }
        }
        if room.available_now(g) >= need {
            return Ok(true);
        }
        // Enough comes back when the step in flight completes.
        room.wait(id, need);
        self.counters.waits_for_blocks += 1;
        Ok(false)
    }

    /// Whether an admission can take `want` blocks now, unpinning idle
    /// sessions and preempting requests paused for their clients (only as
    /// many as it takes) if even the blocks coming back next step would not
    /// be enough. It never preempts a request whose client reads. `keep`: blocks the
    /// admission will pin (a session's blocks among them free nothing).
    pub(super) fn room_for_admission(
        &mut self,
        g: &mut PoolGuard<'_>,
        room: &mut Room,
        want: usize,
        keep: &[BlockId],
    ) -> Result<bool, KvError> {
        if room.available_now(g) >= want {
            return Ok(true);
        }
        let short = want.saturating_sub(room.by_next_step(g));
        if short == 0 {
            // It comes back with the step in flight: admit next step.
            return Ok(false);
        }
        let mut givers = self.idle_sessions();
        givers.extend(self.paused_givers(&[]));
        Ok(self.give_up(g, givers, short, keep, None, room)? && room.available_now(g) >= want)
    }

    /// Running requests paused for their clients, none in this step,
    /// newest first: they give way to anyone who would run (their full
    /// blocks stay cached, so resuming once the client reads costs little).
    fn paused_givers(&self, in_step: &[StepSeq]) -> Vec<Giver> {
        self.running
            .iter()
            .rev()
            .filter(|&&v| {
                let s = &self.seqs[&v];
                s.waits_for_reader() && self.plannable(s) && !in_step.iter().any(|r| r.seq == v)
            })
            .map(|&v| {
                let lease = self.seqs[&v]
                    .lease
                    .as_ref()
                    .expect("running requests hold a lease");
                Giver::Paused(v, lease.id())
            })
            .collect()
    }

    /// Every running slot is taken: a request paused for its client gives
    /// its slot up to the waiting request about to be admitted. Whether a
    /// slot is free now.
    pub(super) fn give_way_for_slot(
        &mut self,
        g: &mut PoolGuard<'_>,
        room: &mut Room,
        in_step: &[StepSeq],
    ) -> Result<bool, KvError> {
        let Some(Giver::Paused(v, _)) = self.paused_givers(in_step).first().copied() else {
            return Ok(false);
        };
        self.give_way(g, room, v)?;
        Ok(true)
    }

    /// Paused request `v` gives its slot and blocks up (see
    /// [`Giver::Paused`]).
    fn give_way(
        &mut self,
        g: &mut PoolGuard<'_>,
        room: &mut Room,
        v: RequestId,
    ) -> Result<(), KvError> {
        room.forget(v);
        self.preempt(g, v)?;
        self.counters.gave_way += 1;
        Ok(())
    }

    /// Sessions whose pins are at rest (idle, or their turn not admitted),
    /// least recently used first.
    fn idle_sessions(&self) -> Vec<Giver> {
        let mut idle: Vec<(&u64, &crate::session::Session)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.lease.is_some())
            .collect();
        idle.sort_by_key(|(id, s)| (s.last_used, **id));
        idle.into_iter()
            .map(|(&sid, s)| Giver::Session(sid, s.lease.as_ref().expect("filtered above").id()))
            .collect()
    }

    /// Gives up a short prefix of `givers`, in order, whose blocks together
    /// (less `keep`) cover `short`, leaving out any whose pins would free
    /// nothing more; if all of them would not cover it, gives up nothing.
    /// Returns whether it covered `short`. `row`: the request the room is
    /// for, and whether the pool says enough comes back anyway; needless
    /// preemptions and preemptions of an older request are counted (bugs
    /// the stress run checks for).
    fn give_up(
        &mut self,
        g: &mut PoolGuard<'_>,
        givers: Vec<Giver>,
        short: usize,
        keep: &[BlockId],
        row: Option<(RequestId, bool)>,
        room: &mut Room,
    ) -> Result<bool, KvError> {
        let gain = |g: &PoolGuard<'_>, set: &[Giver]| -> Result<usize, KvError> {
            let holders: Vec<HolderId> = set.iter().map(|x| x.holder()).collect();
            let y = g.release_yield_of(&holders, keep)?;
            Ok(y.now + y.later)
        };
        // Together, not one by one: two sessions sharing a prompt free it
        // only when both let go.
        let mut chosen = Vec::new();
        for giver in givers {
            if gain(g, &chosen)? >= short {
                break;
            }
            chosen.push(giver);
        }
        if gain(g, &chosen)? < short {
            return Ok(false);
        }
        // Leave out whoever is not needed for that (a session whose blocks
        // a running request also holds, say).
        let mut k = 0;
        while k < chosen.len() {
            let mut without = chosen.clone();
            without.remove(k);
            if gain(g, &without)? >= short {
                chosen = without;
            } else {
                k += 1;
            }
        }
        self.counters.blocks_short += short as u64;
        for giver in chosen {
            match giver {
                Giver::Session(sid, _) => {
                    let lease = self
                        .sessions
                        .get_mut(&sid)
                        .and_then(|s| s.lease.take())
                        .expect("an idle session's pins");
                    g.release(lease)?;
                    self.counters.sessions_unpinned += 1;
                }
                Giver::Paused(v, _) => self.give_way(g, room, v)?,
                Giver::Request(v, _) => {
                    let (id, needless) = row.expect("only rows preempt");
                    self.counters.needless_preemptions += needless as u64;
                    self.counters.priority_inversions += (v < id) as u64;
                    room.forget(v);
                    self.preempt(g, v)?;
                }
            }
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
        s.restore = None;
        self.running.retain(|&r| r != id);
        let at = self.waiting.partition_point(|&w| w < id);
        self.waiting.insert(at, id);
        self.counters.preemptions += 1;
        Ok(())
    }

    /// Blocks of running requests whose last sample is in flight: those of
    /// plain requests (free by the next step) and those of session turns
    /// (a session's pins at rest by then).
    pub(super) fn finishing_blocks(&self, g: &PoolGuard<'_>) -> Result<(usize, usize), KvError> {
        let (mut plain, mut turns) = (0, 0);
        for id in &self.running {
            let s = &self.seqs[id];
            if s.outstanding > 0 && !self.plannable(s) {
                let lease = s.lease.as_ref().expect("running requests hold a lease");
                let y = g.release_yield(lease.id())?;
                if s.session.is_some() {
                    turns += y.now + y.later;
                } else {
                    plain += y.now + y.later;
                }
            }
        }
        Ok((plain, turns))
    }
}
