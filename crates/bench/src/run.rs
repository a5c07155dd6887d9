//! Runs a workload's phases against an endpoint, within bounds: no more
//! than `max_in_flight` requests at once, no new request after the phase's
//! time limit or past its request cap, every request within its timeout.
//! A progress bar shows the requests done.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;

use crate::client::{Endpoint, Outcome, stream};
use crate::report::PhaseResult;
use crate::workload::{Chat, Phase, Plan, Prompt, Req, Workload};

/// The bounds of a run.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests in flight at once, at most.
    pub max_in_flight: usize,
    /// Requests a phase sends, at most.
    pub max_requests: usize,
    /// No request of a phase starts after this.
    pub phase_time: Duration,
    /// A request that has not ended after this fails.
    pub request_timeout: Duration,
    /// The `model` field sent (none: left out, which both Strata and
    /// llama-server take as the model they serve).
    pub model: Option<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            max_requests: 10_000,
            phase_time: Duration::from_secs(600),
            request_timeout: Duration::from_secs(300),
            model: None,
        }
    }
}

/// The shared admission of one phase: the in-flight bound, the request
/// cap and the deadline.
struct Gate {
    permits: Semaphore,
    sent: AtomicUsize,
    max_requests: usize,
    deadline: Instant,
    start: Instant,
    timeout: Duration,
    ep: Endpoint,
    model: Option<String>,
    bar: ProgressBar,
    /// The most requests seen in flight at once.
    peak: AtomicUsize,
    in_flight: AtomicUsize,
}

impl Gate {
    /// Sends `req` if the phase's bounds allow (waiting for an in-flight
    /// place); `None` when the cap or the deadline says no. With `planned`
    /// (an open-loop arrival), latencies count from that instant, not from
    /// the send: time spent waiting for an in-flight place or for the task
    /// to run is the server's delay too (no coordinated omission).
    async fn send(
        &self,
        req: &Req,
        messages_override: Option<&[(String, String)]>,
        planned: Option<Instant>,
    ) -> Option<Outcome> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let _permit = self.permits.acquire().await.ok()?;
        if Instant::now() >= self.deadline
            || self.sent.fetch_add(1, Ordering::SeqCst) >= self.max_requests
        {
            return None;
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let (path, body) = body(req, messages_override, self.model.as_deref());
        let sent = Instant::now();
        let mut out = stream(&self.ep, path, &body, self.timeout).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let from = planned.unwrap_or(sent).min(sent);
        let lag = (sent - from).as_secs_f64();
        out.ttft = out.ttft.map(|t| t + lag);
        out.e2e += lag;
        out.tag = req.tag.clone();
        out.sent_at = (from - self.start).as_secs_f64();
        self.bar.inc(1);
        Some(out)
    }
}

/// The path and JSON body of a request: streamed, greedy, exactly
/// `max_tokens` tokens (`ignore_eos`, which Strata and llama-server both
/// take), usage in the last chunk.
pub fn body(
    req: &Req,
    messages: Option<&[(String, String)]>,
    model: Option<&str>,
) -> (&'static str, Value) {
    let mut b = json!({
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
    });
    let chat = messages.or(match &req.prompt {
        Prompt::Chat(m) => Some(m.as_slice()),
        Prompt::Text(_) => None,
    });
    let path = match (chat, &req.prompt) {
        (Some(m), _) => {
            b["messages"] = m
                .iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect();
            "/chat/completions"
        }
        (None, p) => {
            b["prompt"] = json!(match p {
                Prompt::Text(t) => t.as_str(),
                Prompt::Chat(_) => "",
            });
            "/completions"
        }
    };
    if let Some(m) = model {
        b["model"] = json!(m);
    }
    (path, b)
}

/// Runs one phase and summarizes it.
pub async fn run_phase(
    ep: &Endpoint,
    phase: &Phase,
    limits: &Limits,
    bar: &ProgressBar,
) -> PhaseResult {
    let start = Instant::now();
    let gate = Arc::new(Gate {
        permits: Semaphore::new(limits.max_in_flight.max(1)),
        sent: AtomicUsize::new(0),
        max_requests: limits.max_requests,
        deadline: start + limits.phase_time,
        start,
        timeout: limits.request_timeout,
        ep: ep.clone(),
        model: limits.model.clone(),
        bar: bar.clone(),
        peak: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let mut outcomes: Vec<Outcome> = Vec::new();
    match &phase.plan {
        Plan::Waves(waves) => {
            for wave in waves {
                let mut set = JoinSet::new();
                for r in wave {
                    let (g, r) = (gate.clone(), r.clone());
                    set.spawn(async move { g.send(&r, None, None).await });
                }
                outcomes.extend(set.join_all().await.into_iter().flatten());
            }
        }
        Plan::Clients(clients) => {
            let mut set = JoinSet::new();
            for list in clients {
                let (g, list) = (gate.clone(), list.clone());
                set.spawn(async move {
                    let mut outs = Vec::new();
                    for r in &list {
                        match g.send(r, None, None).await {
                            Some(o) => outs.push(o),
                            None => break,
                        }
                    }
                    outs
                });
            }
            outcomes.extend(set.join_all().await.into_iter().flatten());
        }
        Plan::Open { arrivals, reqs, .. } => {
            let mut set = JoinSet::new();
            for (&at, r) in arrivals.iter().zip(reqs.iter().cloned()) {
                let when = start + Duration::from_secs_f64(at);
                if when >= gate.deadline {
                    break;
                }
                tokio::time::sleep_until(when.into()).await;
                let g = gate.clone();
                set.spawn(async move { g.send(&r, None, Some(when)).await });
            }
            outcomes.extend(set.join_all().await.into_iter().flatten());
        }
        Plan::Chats {
            clients,
            chats,
            model_replies,
        } => {
            let queue = Arc::new(Mutex::new(
                chats.iter().cloned().collect::<VecDeque<Chat>>(),
            ));
            let mut set = JoinSet::new();
            for _ in 0..*clients {
                let (g, q, own) = (gate.clone(), queue.clone(), *model_replies);
                set.spawn(async move {
                    let mut outs = Vec::new();
                    loop {
                        let Some(chat) = q.lock().await.pop_front() else {
                            break;
                        };
                        let mut history: Vec<(String, String)> = Vec::new();
                        if let Some(s) = &chat.system {
                            history.push(("system".into(), s.clone()));
                        }
                        for (i, (user, recorded, n)) in chat.turns.iter().enumerate() {
                            history.push(("user".into(), user.clone()));
                            let r = Req {
                                tag: if i == 0 { "first" } else { "later" }.into(),
                                prompt: Prompt::Chat(Vec::new()),
                                max_tokens: *n,
                            };
                            let Some(o) = g.send(&r, Some(&history), None).await else {
                                return outs;
                            };
                            let failed = o.error.is_some();
                            let reply = if own {
                                o.text.clone()
                            } else {
                                recorded.clone()
                            };
                            outs.push(o);
                            if failed {
                                break; // the rest of this chat would resend a broken history
                            }
                            history.push(("assistant".into(), reply));
                        }
                    }
                    outs
                });
            }
            outcomes.extend(set.join_all().await.into_iter().flatten());
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let mut result = PhaseResult::of(&phase.name, &outcomes, wall);
    result.peak_in_flight = gate.peak.load(Ordering::SeqCst);
    result.not_sent = phase.plan.len().saturating_sub(outcomes.len());
    if let Plan::Open { rate, .. } = &phase.plan {
        result.rate = Some(*rate);
    }
    result
}

/// Runs every phase of `w` in order (a sweep stops after the first phase
/// past its bound), with a progress bar on stderr when it is a terminal.
pub async fn run_workload(ep: &Endpoint, w: &Workload, limits: &Limits) -> Vec<PhaseResult> {
    let total: usize = w
        .phases
        .iter()
        .map(|p| p.plan.len().min(limits.max_requests))
        .sum();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(w.id.clone());
    let mut results = Vec::new();
    for phase in &w.phases {
        bar.set_message(phase.name.clone());
        let r = run_phase(ep, phase, limits, &bar).await;
        let stop = w
            .stop_above_p99_ttft
            .is_some_and(|b| !r.sustained(b.as_secs_f64() * 1e3));
        results.push(r);
        if stop {
            break;
        }
    }
    bar.finish_and_clear();
    results
}

/// TTFT per tag, in ms.
pub(crate) fn by_tag(outcomes: &[Outcome]) -> BTreeMap<String, Vec<f64>> {
    let mut m: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for o in outcomes {
        if let (None, Some(t)) = (&o.error, o.ttft) {
            m.entry(o.tag.clone()).or_default().push(t * 1e3);
        }
    }
    m
}
