//! Conversations in ShareGPT's JSON format, the one vLLM's and SGLang's
//! benchmarks read: a list of `{"id": ..., "conversations": [{"from":
//! "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}`.

use serde::Deserialize;

/// One conversation: an optional system message, then turns.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// The file's `id` (or the conversation's index).
    pub id: String,
    /// A leading system message.
    pub system: Option<String>,
    /// The user's messages, each with the reply the file gives for it.
    pub turns: Vec<Turn>,
}

/// A user message and the reply the file records after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    /// What the user says.
    pub user: String,
    /// What the assistant answered in the file.
    pub reply: String,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    conversations: Vec<Message>,
}

#[derive(Deserialize)]
struct Message {
    from: String,
    value: String,
}

/// Parses a ShareGPT file. Roles: `human`/`user` and `gpt`/`chatgpt`/
/// `bard`/`assistant`/`model`, `system` first. A user message without a
/// reply after it ends the conversation (vLLM's reader likewise keeps
/// only complete pairs); consecutive messages of one side are joined with
/// a blank line; conversations with no complete turn are skipped. An
/// unknown role is an error naming it, as is anything that is not JSON of
/// this shape.
pub fn parse(json: &str) -> Result<Vec<Conversation>, String> {
    let entries: Vec<Entry> = serde_json::from_str(json).map_err(|e| {
        format!("not a ShareGPT file (a JSON list of {{\"conversations\": [...]}}): {e}")
    })?;
    let mut out = Vec::new();
    for (i, e) in entries.into_iter().enumerate() {
        let id = match e.id {
            Some(serde_json::Value::String(s)) => s,
            Some(v) => v.to_string(),
            None => i.to_string(),
        };
        let mut system = None;
        let mut turns = Vec::new();
        let mut user: Option<String> = None;
        let mut reply: Option<String> = None;
        for (k, m) in e.conversations.into_iter().enumerate() {
            match m.from.as_str() {
                "system" if k == 0 => system = Some(m.value),
                "human" | "user" => {
                    if let Some(r) = reply.take() {
                        let u = user.take().unwrap_or_default();
                        turns.push(Turn { user: u, reply: r });
                    }
                    user = Some(join(user.take(), m.value));
                }
                "gpt" | "chatgpt" | "bard" | "assistant" | "model" => {
                    if user.is_some() {
                        reply = Some(join(reply.take(), m.value));
                    }
                }
                other => {
                    return Err(format!(
                        "conversation {id}: message {k} has the unknown role {other:?}"
                    ));
                }
            }
        }
        if let (Some(u), Some(r)) = (user, reply) {
            turns.push(Turn { user: u, reply: r });
        }
        if !turns.is_empty() {
            out.push(Conversation { id, system, turns });
        }
    }
    Ok(out)
}

fn join(prev: Option<String>, next: String) -> String {
    match prev {
        Some(p) => format!("{p}\n\n{next}"),
        None => next,
    }
}
