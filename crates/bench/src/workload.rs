//! The built-in workloads (w1-w8 of issue 8/10) and ShareGPT replay, as
//! plans of requests: what is sent, in which order, at which times. The
//! text is seeded ([`crate::text`]): the same seed gives every server the
//! same prompts.

use std::time::Duration;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::arrivals::poisson;
use crate::sharegpt::Conversation;
use crate::text::{nonce, words};

/// What one request asks.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `/v1/chat/completions` with these `(role, content)` messages.
    Chat(Vec<(String, String)>),
    /// `/v1/completions` with this text.
    Text(String),
}

/// One request of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Req {
    /// The group it is reported in (like `first` or `later`).
    pub tag: String,
    /// What it asks.
    pub prompt: Prompt,
    /// Tokens to generate (with `ignore_eos`: exactly this many).
    pub max_tokens: u32,
}

/// A multi-turn chat: each turn resends the whole conversation so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Chat {
    /// A system message first.
    pub system: Option<String>,
    /// Each turn's user message, the file's reply (used as the history
    /// when the plan does not use the model's own replies) and its length.
    pub turns: Vec<(String, String, u32)>,
}

/// How a phase's requests are sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Each wave's requests at once; the next wave when the last of the
    /// previous one has ended.
    Waves(Vec<Vec<Req>>),
    /// Closed loop: one client per list, each sending its next request
    /// when its previous one has ended.
    Clients(Vec<Vec<Req>>),
    /// Open loop: request `i` sent `arrivals[i]` seconds after the start,
    /// whatever the server is doing.
    Open {
        /// Requests per second (for the report).
        rate: f64,
        /// Seconds from the start.
        arrivals: Vec<f64>,
        /// What each sends.
        reqs: Vec<Req>,
    },
    /// `clients` users at once, each taking the next chat from the list;
    /// a turn's history holds the model's own earlier replies when
    /// `model_replies`, else the ones the chat records.
    Chats {
        /// Users at once.
        clients: usize,
        /// The conversations.
        chats: Vec<Chat>,
        /// Resend what the model answered (else the recorded replies).
        model_replies: bool,
    },
}

impl Plan {
    /// Requests in the plan.
    pub fn len(&self) -> usize {
        match self {
            Plan::Waves(w) | Plan::Clients(w) => w.iter().map(Vec::len).sum(),
            Plan::Open { reqs, .. } => reqs.len(),
            Plan::Chats { chats, .. } => chats.iter().map(|c| c.turns.len()).sum(),
        }
    }

    /// Whether it sends nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most requests it can have in flight at once.
    pub fn width(&self) -> usize {
        match self {
            Plan::Waves(w) => w.iter().map(Vec::len).max().unwrap_or(0),
            Plan::Clients(c) => c.len(),
            Plan::Open { reqs, .. } => reqs.len(),
            Plan::Chats { clients, chats, .. } => (*clients).min(chats.len()),
        }
    }
}

/// A named part of a workload, reported as one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    /// Like `clients 8` or `rate 2.0/s`.
    pub name: String,
    /// Its requests.
    pub plan: Plan,
}

/// A workload: phases run in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// `w1` ... `w8`, or `sharegpt`.
    pub id: String,
    /// One line saying what it measures.
    pub what: String,
    /// The phases.
    pub phases: Vec<Phase>,
    /// A sweep: stop after the first phase whose TTFT p99 passes this (or
    /// that has a failure).
    pub stop_above_p99_ttft: Option<Duration>,
}

/// How big the built-in workloads are.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// The seed of every text and arrival time.
    pub seed: u64,
    /// Small counts, for a smoke run (CI, a tiny model).
    pub quick: bool,
}

/// The ids [`builtin`] knows.
pub const BUILTIN: &[&str] = &[
    "w1",
    "w2",
    "w3",
    "w4",
    "w5",
    "w6-cold",
    "w6-restart",
    "w7",
    "w8",
];

fn chat(system: Option<String>, user: String) -> Prompt {
    let mut m = Vec::new();
    if let Some(s) = system {
        m.push(("system".to_string(), s));
    }
    m.push(("user".to_string(), user));
    Prompt::Chat(m)
}

fn req(tag: &str, prompt: Prompt, max_tokens: u32) -> Req {
    Req {
        tag: tag.to_string(),
        prompt,
        max_tokens,
    }
}

/// A distinct user message of about `tokens` tokens, from `seed`.
fn distinct(seed: u64, tokens: usize) -> String {
    format!("{} {}", nonce(seed), words(seed, tokens.saturating_sub(6)))
}

/// The long document of w5 and w6 (about 4,000 tokens) with its tag.
fn document(seed: u64) -> String {
    format!(
        "Read this document, then answer the question after it.\n\n{} {}",
        nonce(seed),
        words(seed, 3_980)
    )
}

fn question(seed: u64, i: usize) -> String {
    format!("Question {i}: {}?", words(seed * 1_000 + i as u64, 14))
}

/// The built-in workload `id` (one of [`BUILTIN`]).
pub fn builtin(id: &str, s: Sizes) -> Result<Workload, String> {
    let q = s.quick;
    let seed = s.seed.wrapping_mul(1_000_003);
    let (what, phases, stop) = match id {
        "w1" => {
            let runs = if q { 1 } else { 3 };
            let phases = [16usize, 512, 1_536]
                .iter()
                .map(|&n| Phase {
                    name: format!("prompt {n}"),
                    plan: Plan::Waves(
                        (0..runs)
                            .map(|r| {
                                let p = format!(
                                    "{} {}",
                                    nonce(seed + (n * 10 + r) as u64),
                                    words(seed + n as u64, n.saturating_sub(6))
                                );
                                vec![req("decode", Prompt::Text(p), 128)]
                            })
                            .collect(),
                    ),
                })
                .collect();
            (
                "single stream: 128 tokens after prompts of about 16, 512 and 1,536 tokens",
                phases,
                None,
            )
        }
        "w2" => {
            let per_client = if q { 1 } else { 2 };
            let counts: &[usize] = if q { &[2, 4] } else { &[4, 8, 16, 32] };
            let phases = counts
                .iter()
                .map(|&c| Phase {
                    name: format!("clients {c}"),
                    plan: Plan::Clients(
                        (0..c)
                            .map(|k| {
                                (0..per_client)
                                    .map(|r| {
                                        let sd = seed + (c * 1_000 + k * 10 + r) as u64;
                                        req("all", chat(None, distinct(sd, 215)), 128)
                                    })
                                    .collect()
                            })
                            .collect(),
                    ),
                })
                .collect();
            (
                "concurrency: distinct ~230-token prompts, 128 tokens out, clients in a closed loop",
                phases,
                None,
            )
        }
        "w3" => {
            let counts: &[usize] = if q { &[2] } else { &[4, 16] };
            let phases = counts
                .iter()
                .map(|&c| {
                    let system = distinct(seed + 7_000 + c as u64, 1_400);
                    let wave = (0..c)
                        .map(|k| {
                            let user = distinct(seed + 8_000 + (c * 100 + k) as u64, 24);
                            req("all", chat(Some(system.clone()), user), 64)
                        })
                        .collect();
                    Phase {
                        name: format!("clients {c}"),
                        plan: Plan::Waves(vec![wave]),
                    }
                })
                .collect();
            (
                "shared system prompt: clients at once sharing a 1,400-token system prompt",
                phases,
                None,
            )
        }
        "w4" => {
            let (users, turns) = if q { (2, 3) } else { (8, 6) };
            let chats = (0..users)
                .map(|u| Chat {
                    system: None,
                    turns: (0..turns)
                        .map(|t| {
                            let sd = seed + 20_000 + (u * 100 + t) as u64;
                            let msg = if t == 0 {
                                distinct(sd, 200)
                            } else {
                                words(sd, 30)
                            };
                            (msg, String::new(), 64)
                        })
                        .collect(),
                })
                .collect();
            let phases = vec![Phase {
                name: format!("{users} users x {turns} turns"),
                plan: Plan::Chats {
                    clients: users,
                    chats,
                    model_replies: true,
                },
            }];
            (
                "multi-turn chat: each turn resends the whole conversation",
                phases,
                None,
            )
        }
        "w5" => {
            let n = if q { 3 } else { 10 };
            let make = |sd: u64, concurrent: bool| {
                let doc = document(sd);
                let ask = |i: usize| {
                    let tag = if i == 1 { "first" } else { "later" };
                    req(tag, chat(None, format!("{doc}\n\n{}", question(sd, i))), 32)
                };
                if concurrent {
                    vec![vec![ask(1)], (2..=n).map(ask).collect()]
                } else {
                    (1..=n).map(|i| vec![ask(i)]).collect()
                }
            };
            let phases = vec![
                Phase {
                    name: "sequential".into(),
                    plan: Plan::Waves(make(seed + 30_000, false)),
                },
                Phase {
                    name: "concurrent".into(),
                    plan: Plan::Waves(make(seed + 31_000, true)),
                },
            ];
            (
                "long document: one 4,000-token document, questions one by one, then a fresh one's questions at once after the first",
                phases,
                None,
            )
        }
        "w6-cold" | "w6-restart" => {
            let sd = seed + 40_000;
            let doc = document(sd);
            let ask = |tag: &str, i: usize| {
                vec![req(
                    tag,
                    chat(None, format!("{doc}\n\n{}", question(sd, i))),
                    32,
                )]
            };
            // After a restart, each question is its own phase, so that a
            // harness restarts the server (and drops the page cache) before
            // each: every one is the first request after a restart, never
            // a hit on what the one before it restored.
            let phases = if id == "w6-cold" {
                vec![Phase {
                    name: "cold".into(),
                    plan: Plan::Waves(vec![ask("cold", 1)]),
                }]
            } else {
                (2..=if q { 2 } else { 4 })
                    .map(|i| Phase {
                        name: format!("restart q{i}"),
                        plan: Plan::Waves(vec![ask("restart", i)]),
                    })
                    .collect()
            };
            (
                "restart: w5's document, before and after the server restarts on its SSD directory",
                phases,
                None,
            )
        }
        "w7" => {
            let (k, rounds) = if q { (3, 2) } else { (12, 3) };
            let mut order: Vec<usize> = (0..rounds).flat_map(|_| 0..k).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed + 50_000));
            let mut seen = vec![false; k];
            let waves = order
                .iter()
                .enumerate()
                .map(|(i, &p)| {
                    let tag = if std::mem::replace(&mut seen[p], true) {
                        "revisit"
                    } else {
                        "first visit"
                    };
                    let system = distinct(seed + 51_000 + p as u64, 1_400);
                    vec![req(tag, chat(Some(system), question(seed + 52_000, i)), 16)]
                })
                .collect();
            let phases = vec![Phase {
                name: format!("{k} prefixes x {rounds}"),
                plan: Plan::Waves(waves),
            }];
            (
                "working set: distinct 1,400-token prefixes revisited in a seeded order",
                phases,
                None,
            )
        }
        "w8" => {
            let rates: &[f64] = if q {
                &[1.0, 4.0]
            } else {
                &[0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]
            };
            let phases = rates
                .iter()
                .enumerate()
                .map(|(i, &rate)| {
                    // A minute of arrivals (at least 20): long enough that a
                    // rate the server cannot keep up with builds a queue
                    // the last third of the requests wait in.
                    let count = if q {
                        4
                    } else {
                        ((rate * 60.0).ceil() as usize).max(20)
                    };
                    let third = |r: usize| match r * 3 / count {
                        0 => "first third",
                        1 => "middle third",
                        _ => "last third",
                    };
                    let reqs = (0..count)
                        .map(|r| {
                            let sd = seed + 60_000 + (i * 1_000 + r) as u64;
                            req(third(r), chat(None, distinct(sd, 215)), 128)
                        })
                        .collect();
                    Phase {
                        name: format!("rate {rate}/s"),
                        plan: Plan::Open {
                            rate,
                            arrivals: poisson(rate, count, seed + i as u64),
                            reqs,
                        },
                    }
                })
                .collect();
            (
                "request-rate sweep: Poisson arrivals (a minute at each rate) at rising rates until TTFT p99 passes 10 s or the queue grows",
                phases,
                Some(Duration::from_secs(10)),
            )
        }
        other => {
            return Err(format!(
                "no workload {other:?}: the built-in ones are {}",
                BUILTIN.join(", ")
            ));
        }
    };
    Ok(Workload {
        id: id.to_string(),
        what: what.to_string(),
        phases,
        stop_above_p99_ttft: stop,
    })
}

/// Replays ShareGPT conversations: `clients` users at once, each taking
/// the next conversation, every turn resending the conversation with the
/// file's replies as its history and asking for as many tokens as the
/// file's reply had (estimated at 4 bytes a token, at most `max_tokens`).
pub fn sharegpt(convs: &[Conversation], clients: usize, limit: usize, max_tokens: u32) -> Workload {
    let chats: Vec<Chat> = convs
        .iter()
        .take(limit)
        .map(|c| Chat {
            system: c.system.clone(),
            turns: c
                .turns
                .iter()
                .map(|t| {
                    let n = (t.reply.len().div_ceil(4) as u32).clamp(1, max_tokens.max(1));
                    (t.user.clone(), t.reply.clone(), n)
                })
                .collect(),
        })
        .collect();
    Workload {
        id: "sharegpt".into(),
        what: format!(
            "ShareGPT replay: {} conversations, {clients} at once",
            chats.len()
        ),
        phases: vec![Phase {
            name: format!("clients {clients}"),
            plan: Plan::Chats {
                clients: clients.max(1),
                chats,
                model_replies: false,
            },
        }],
        stop_above_p99_ttft: None,
    }
}
