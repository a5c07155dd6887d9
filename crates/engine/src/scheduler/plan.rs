//! Planning a step: decode rows first, then prefill chunks, under the
//! token budget; admission after; each row's tokens written into its
//! blocks (`plan_row`).

use std::time::Instant;

use strata_kv::{Access, Epoch, KvError, PoolGuard};

use super::admission::Admission;
use super::room::Room;
use super::{Planned, SCORE_CHUNK, Scheduler};

/// Write-through demotions one step carries at most (the rest wait for
/// the next step); 64 blocks of the default model are about 6 MB.
const DEMOTIONS_PER_STEP: usize = 64;
use crate::executor::{Score, Step, StepSeq};
use crate::request::{FinishReason, RequestId};

impl Scheduler {
    /// Plans the next step, or `None` if there is nothing to run.
    pub(crate) fn plan(&mut self, overlapped: bool) -> Result<Option<Step>, KvError> {
        if !self.has_work() {
            return Ok(None);
        }
        let t0 = Instant::now();
        let cache = self.cache.clone();
        let mut g = cache.lock();
        let locked = Instant::now();
        let epoch = g.next_epoch();
        self.apply_handovers(&mut g);
        // Blocks promised last step came back with the step in flight then
        // (it has completed: at most two steps are ever outstanding). The
        // pool's free count checks the promise, apart from this tally.
        if g.free_blocks() < self.promised {
            self.counters.broken_promises += 1;
        }
        self.fork_parked(&mut g)?;
        let mut room = Room::new(epoch, self.finishing_blocks(&g)?);
        let mut budget = self.config.max_step_tokens;
        self.score_rows = SCORE_CHUNK;
        let mut seqs: Vec<StepSeq> = Vec::new();
        let preemptions_before = self.counters.preemptions;
        // Decode rows first (one token each), oldest first; then prefill.
        for decode in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let id = self.running[i];
                let s = &self.seqs[&id];
                let remaining = s.tokens.len().saturating_sub(s.computed);
                let is_decode = remaining <= 1;
                if !self.plannable(s)
                    || s.waits_for_reader()
                    || is_decode != decode
                    || seqs.iter().any(|r| r.seq == id)
                    || room.is_waiting(id)
                {
                    i += 1;
                    continue;
                }
                match self.plan_row(&mut g, &room, id, epoch, budget)? {
                    Planned::Row(row) => {
                        budget -= row.known.len().max(1);
                        seqs.push(*row);
                        i += 1;
                    }
                    Planned::Failed(e) => self.finish(id, FinishReason::Error(e)),
                    Planned::Later => i += 1,
                    Planned::NoBlocks(need) => {
                        let now = self.make_room(&mut g, &mut room, id, need, &seqs)?;
                        // Preemption may have moved it; if it waits this
                        // step (for blocks the step in flight gives back,
                        // or for others to finish), go on after it.
                        let at = self.running.partition_point(|&r| r < id);
                        i = if now { at } else { at + 1 };
                    }
                }
            }
        }
        // Admission, first come first served; not in a step that had to
        // preempt or whose running requests wait for blocks (the blocks
        // coming back are theirs).
        let pressed = self.counters.preemptions > preemptions_before || room.any_waiting();
        while !pressed && budget > 0 {
            // A request paused for its client waits for it to read, out of
            // everyone's way (it gave way to be here).
            let Some(&id) = self
                .waiting
                .iter()
                .find(|id| !self.seqs[id].waits_to_resume())
            else {
                break;
            };
            if self.running.len() >= self.config.max_running
                && !self.give_way_for_slot(&mut g, &mut room, &seqs)?
            {
                break;
            }
            match self.admit(&mut g, &mut room, id)? {
                Admission::Admitted => {}
                Admission::Wait => break,
                Admission::Gone => continue,
            }
            // By id: a request that gave way may have joined the line.
            self.waiting.retain(|&w| w != id);
            let at = self.running.partition_point(|&r| r < id);
            self.running.insert(at, id);
            match self.plan_row(&mut g, &room, id, epoch, budget)? {
                Planned::Row(row) => {
                    budget -= row.known.len().max(1);
                    seqs.push(*row);
                }
                Planned::Failed(e) => self.finish(id, FinishReason::Error(e)),
                Planned::NoBlocks(_) | Planned::Later => {}
            }
        }
        self.promised = room.promised();
        // Taken last: every eviction this plan made is in them, and the
        // step that carries them is the first that may reuse the blocks.
        let demotions = if self.tiers.is_some() {
            g.take_demotions(DEMOTIONS_PER_STEP)
        } else {
            Vec::new()
        };
        // A step that carries transfers is sent even with no row: a restore
        // landed in this epoch must be copied in before it completes (it
        // publishes then), and demotions must precede any reuse.
        let transfers = !demotions.is_empty()
            || self
                .tiers
                .as_ref()
                .is_some_and(|t| !t.step_restores.is_empty());
        if seqs.is_empty() && !overlapped && !transfers {
            // Nothing could run and nothing is in flight: close the epoch
            // now rather than send an empty step (the engine waits for a
            // message before planning again).
            g.complete(epoch)?;
            drop(g);
            self.counters.plan_lock_nanos += locked.elapsed().as_nanos() as u64;
            return Ok(None);
        }
        if self.config.sanitize
            && self.sanitizer.due(epoch.get())
            && let Err(e) = g.check_invariants()
        {
            self.sanitizer
                .report(&format!("KV invariants after planning step {epoch:?}: {e}"));
        }
        drop(g);
        self.counters.plan_lock_nanos += locked.elapsed().as_nanos() as u64;
        self.counters.steps += 1;
        self.counters.overlapped_steps += overlapped as u64;
        self.counters.rows += (self.config.max_step_tokens - budget) as u64;
        self.counters.batch_seqs += seqs.len() as u64;
        self.counters.schedule_nanos += t0.elapsed().as_nanos() as u64;
        // Forked samples run from the next step (their first tokens come
        // from this one).
        for c in std::mem::take(&mut self.forked) {
            self.seqs.insert(c.id, c);
        }
        Ok(Some(Step {
            epoch,
            seqs,
            retire: std::mem::take(&mut self.retire),
            poison: std::mem::take(&mut self.fresh),
            copies: std::mem::take(&mut self.copies),
            demotions,
            restores: self
                .tiers
                .as_mut()
                .map(|t| std::mem::take(&mut t.step_restores))
                .unwrap_or_default(),
        }))
    }

    /// Forks the samples whose prompt's step has completed: each shares
    /// the request's blocks and runs from this step. A request that ended
    /// meanwhile leaves its samples to be admitted as preempted requests
    /// are (its full blocks are in the prefix cache by then).
    fn fork_parked(&mut self, g: &mut PoolGuard<'_>) -> Result<(), KvError> {
        let done = self.last_done;
        let (ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked)
            .into_iter()
            .partition(|p| p.2 <= done);
        self.parked = later;
        for (parent, kids, _) in ready {
            let live: Vec<RequestId> = kids
                .into_iter()
                .filter(|k| self.seqs.get(k).is_some_and(|c| !c.finished))
                .collect();
            // Each live sample's lease, forked from the request's.
            let mut leases = Vec::new();
            if let Some(p) = self.seqs.get_mut(&parent) {
                p.waits_fork = false;
                if let Some(l) = p.lease.as_ref().filter(|_| !p.finished) {
                    p.shared_tail = true;
                    for &k in &live {
                        leases.push(g.fork(l, strata_kv::OwnerTag(k.get()))?);
                    }
                }
            }
            let mut leases = leases.into_iter();
            for k in live {
                let c = self.seqs.get_mut(&k).expect("filtered above");
                match leases.next() {
                    Some(l) => {
                        c.lease = Some(l);
                        let at = self.running.partition_point(|&r| r < k);
                        self.running.insert(at, k);
                    }
                    None => {
                        c.computed = 0;
                        c.shared_tail = false;
                        self.waiting.push_front(k);
                    }
                }
            }
        }
        Ok(())
    }

    /// The row of running request `id` in this step, writing its tokens
    /// into its blocks.
    fn plan_row(
        &mut self,
        g: &mut PoolGuard<'_>,
        room: &Room,
        id: RequestId,
        epoch: Epoch,
        budget: usize,
    ) -> Result<Planned, KvError> {
        let bs = self.block_size;
        let s = &self.seqs[&id];
        let mut restored = Vec::new();
        if let Some(r) = &s.restore {
            if !r.ready() {
                return Ok(Planned::Later);
            }
            restored = self.land_restores(g, id, epoch)?;
        }
        let s = self.seqs.get_mut(&id).expect("running requests exist");
        let lease = s.lease.as_ref().expect("running requests hold a lease");
        let pending = s.computed == s.tokens.len();
        let scoring = s.scoring() && s.computed + 1 < s.prompt_len;
        if scoring && self.score_rows == 0 {
            // This step returns all the logits it may.
            return Ok(Planned::Later);
        }
        let n = if pending {
            1
        } else if scoring {
            // Each scored row returns a whole row of logits: bounded, per
            // step (all scored rows together).
            let n = (s.tokens.len() - s.computed)
                .min(budget)
                .min(self.score_rows);
            self.score_rows -= n;
            n
        } else {
            (s.tokens.len() - s.computed).min(budget)
        };
        let have = g.table(lease.id())?.len();
        let need = (s.computed + n).div_ceil(bs).saturating_sub(have);
        // The first write into a partial tail block shared with forks
        // copies it first: one block more.
        let cow = s.shared_tail && !s.computed.is_multiple_of(bs);
        if need + usize::from(cow) > room.available_now(g) {
            return Ok(Planned::NoBlocks(need + usize::from(cow)));
        }
        if need > 0 {
            g.allocate(lease, need)?;
            if self.config.sanitize {
                self.fresh.extend_from_slice(&g.table(lease.id())?[have..]);
            }
        }
        if cow {
            s.shared_tail = false;
            if let Some(c) = g.copy_on_write(lease, epoch)? {
                self.copies.push(c);
            }
        } else {
            s.shared_tail = false;
        }
        let start = s.computed;
        let written = if pending {
            g.write_pending(lease, epoch)
                .map(|slot| (Some(slot), Vec::new()))
        } else {
            let chunk = s.tokens[start..start + n].to_vec();
            g.write(lease, epoch, &chunk).map(|_| (None, chunk))
        };
        let (slot, known) = match written {
            Ok(x) => x,
            // A step that wrote this block failed after this request's
            // previous row was planned (the overlap): the request fails
            // with it, here instead of when that step's result arrives.
            Err(e @ KvError::WriteRule { .. }) => {
                return Ok(Planned::Failed(format!(
                    "a step carrying this request failed ({e})"
                )));
            }
            Err(e) => return Err(e),
        };
        // Row p scores prompt token p + 1.
        let score = s.score.filter(|_| scoring).and_then(|top| {
            let from = start.max(s.scored);
            let to = (start + n).min(s.prompt_len - 1);
            (from < to).then(|| {
                s.scored = to;
                Score {
                    top,
                    first_row: from - start,
                    targets: s.tokens[from + 1..=to].to_vec(),
                }
            })
        });
        s.computed += n;
        let sample = s.computed >= s.tokens.len();
        if sample {
            s.outstanding += 1;
        }
        let sampler = (sample && !s.sampler_sent).then(|| {
            s.sampler_sent = true;
            (s.sampling.clone(), s.tokens[..s.prompt_len].to_vec())
        });
        // The prompt's last row: the other samples fork here, sharing its
        // blocks, and this row's logits give them their first tokens.
        let mut fanout = Vec::new();
        if sample && !s.forks.is_empty() {
            let forks = std::mem::take(&mut s.forks);
            s.waits_fork = true;
            let mut kids = Vec::new();
            for f in forks {
                if f.unread.load(std::sync::atomic::Ordering::Acquire) & crate::request::CANCELLED
                    != 0
                {
                    let _ = f.events.send(crate::request::Event::Finished {
                        reason: FinishReason::Abort,
                        usage: Default::default(),
                    });
                    continue;
                }
                let _ = f.events.send(crate::request::Event::Admitted {
                    cached_tokens: s.cached_tokens.unwrap_or(0),
                });
                let mut sampling = s.sampling.clone();
                sampling.seed = f.seed;
                fanout.push((f.id, (sampling.clone(), s.tokens[..s.prompt_len].to_vec())));
                kids.push(f.id);
                self.forked.push(s.fork(f, sampling));
            }
            self.parked.push((id, kids, epoch));
        }
        // Stop tokens may not be sampled before `min_tokens`.
        let produced = s.generated() + s.outstanding - sample as usize;
        let suppress = if sample && produced < s.min_tokens {
            s.stops.clone()
        } else {
            Vec::new()
        };
        let table = g.table(lease.id())?.to_vec();
        let mut accesses = Vec::new();
        if self.config.sanitize {
            accesses.append(&mut restored);
            let end = (start + n).div_ceil(bs);
            for (j, &b) in table[..end].iter().enumerate() {
                let access = if j >= start / bs {
                    Access::Write
                } else {
                    Access::Read
                };
                accesses.push((b, g.generation(b), access));
            }
        }
        Ok(Planned::Row(Box::new(StepSeq {
            seq: id,
            start,
            pending: slot,
            known,
            table,
            sample,
            suppress,
            sampler,
            accesses,
            score,
            fanout,
        })))
    }
}
