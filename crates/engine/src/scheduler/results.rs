//! Applying a step's results: prompt scores and tokens to clients, stop
//! and length, finished requests and what they leave to their sessions.

use std::time::Instant;

use super::Scheduler;
use crate::executor::StepResult;
use crate::request::{Event, FinishReason, RequestId, Usage};

impl Scheduler {
    /// Applies a step's results: tokens to clients, finished requests.
    pub(crate) fn on_result(&mut self, r: StepResult) {
        assert!(
            r.epoch > self.last_done,
            "step results arrive in epoch order"
        );
        self.last_done = r.epoch;
        self.counters.results += 1;
        self.counters.step_nanos += r.nanos;
        self.counters.lock_wait_nanos += r.lock_wait_nanos;
        self.counters.grammar_masks += r.masks;
        self.counters.grammar_mask_nanos += r.mask_nanos;
        if let Some(t) = self.tiers.as_mut() {
            t.measured_step(r.rows, r.nanos);
        }
        let t0 = Instant::now();
        for f in r.failed {
            if let Some(s) = self.seqs.get_mut(&f.seq) {
                if f.sampling {
                    s.outstanding -= 1;
                }
                if !s.finished {
                    let reason = if f.grammar {
                        FinishReason::Grammar(f.error)
                    } else {
                        FinishReason::Error(f.error)
                    };
                    self.finish(f.seq, reason);
                }
                self.forget_if_done(f.seq);
            }
        }
        // A step's prompt scores go before its samples (the last prompt
        // chunk's row also samples the first token).
        for (id, scores) in r.scores {
            if let Some(s) = self.seqs.get(&id).filter(|s| !s.finished) {
                let _ = s.events.send(Event::PromptLogprobs(scores));
            }
        }
        for (id, sampled) in r.samples {
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            s.outstanding -= 1;
            if s.finished {
                // A row planned before the request ended: discarded.
                self.forget_if_done(id);
                continue;
            }
            s.tokens.push(sampled.token);
            let past_min = s.generated() >= s.min_tokens;
            let delta = s
                .text
                .as_mut()
                .map(|t| t.push(sampled.token, past_min))
                .unwrap_or_default();
            let reason = if delta.stopped || (past_min && s.stops.contains(&sampled.token)) {
                Some(FinishReason::Stop)
            } else if s.generated() >= s.max_tokens || s.tokens.len() >= self.context {
                Some(FinishReason::Length)
            } else {
                None
            };
            let mut text = delta.text;
            if let Some(t) = s
                .text
                .as_mut()
                .filter(|_| reason.is_some() && !delta.stopped)
            {
                text.push_str(&t.finish());
            }
            s.unread.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            let _ = s.events.send(Event::Token {
                id: sampled.token,
                logprob: sampled.logprob,
                top: sampled.top,
                text,
            });
            if let Some(reason) = reason {
                self.finish(id, reason);
            }
        }
        if !self.handovers.is_empty() {
            let cache = self.cache.clone();
            let mut g = cache.lock();
            self.apply_handovers(&mut g);
        }
        self.counters.schedule_nanos += t0.elapsed().as_nanos() as u64;
    }

    pub(super) fn finish(&mut self, id: RequestId, reason: FinishReason) {
        let s = self.seqs.get_mut(&id).expect("finishing a known request");
        s.finished = true;
        if let Some(sid) = s.session {
            self.end_turn_of(id, sid, &reason);
        }
        let s = self.seqs.get_mut(&id).expect("finishing a known request");
        // Blocks a planned step still uses wait in quarantine for its epoch
        // (a turn's lease stays until it is handed over).
        if s.handover.is_none() {
            s.lease = None;
        }
        let usage = Usage {
            prompt_tokens: s.prompt_len,
            cached_tokens: s.cached_tokens.unwrap_or(0),
            completion_tokens: s.generated(),
        };
        // Samples that never forked end as their request did.
        for f in std::mem::take(&mut s.forks) {
            let _ = f.events.send(Event::Finished {
                reason: reason.clone(),
                usage: Usage {
                    completion_tokens: 0,
                    ..usage
                },
            });
        }
        let _ = s.events.send(Event::Finished { reason, usage });
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        self.counters.finished += 1;
        if s.sampler_sent {
            self.retire.push(id);
        }
        self.forget_if_done(id);
    }

    /// A finished request whose steps have all come back is forgotten (a
    /// session turn's lease handed over first).
    pub(super) fn forget_if_done(&mut self, id: RequestId) {
        if !self
            .seqs
            .get(&id)
            .is_some_and(|s| s.finished && s.outstanding == 0)
        {
            return;
        }
        let s = self.seqs.remove(&id).expect("checked above");
        if let (Some(sid), Some(tokens)) = (s.session, s.handover) {
            self.hand_over(id, sid, tokens, s.lease);
        }
    }
}
