//! Log-probabilities in OpenAI's two shapes (chat's per-token objects,
//! completions' parallel arrays), built as typed structs: no JSON tree per
//! token.

use serde::Serialize;
use serde::ser::SerializeMap;
use strata_kv::TokenId;
use strata_model::Tokenizer;

/// One token as the chat API shows it.
#[derive(Serialize)]
pub(super) struct TokenLogprob {
    token: String,
    logprob: f64,
    bytes: Vec<u8>,
}

impl TokenLogprob {
    fn new(tok: &Tokenizer, t: TokenId, logprob: f32) -> Self {
        let bytes = tok.token_bytes(t).to_vec();
        Self {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            logprob: logprob.into(),
            bytes,
        }
    }
}

/// A sampled token with its alternatives.
#[derive(Serialize)]
pub(super) struct ChatTokenLogprob {
    token: String,
    logprob: f64,
    bytes: Vec<u8>,
    top_logprobs: Vec<TokenLogprob>,
}

/// Chat's `logprobs` object: `content`, and `refusal` (always null: there
/// are no refusals), as OpenAI's schema requires both.
#[derive(Serialize, Default)]
pub(super) struct ChatLogprobs {
    content: Vec<ChatTokenLogprob>,
    refusal: Option<Vec<ChatTokenLogprob>>,
}

impl ChatLogprobs {
    pub(super) fn push(&mut self, tok: &Tokenizer, id: TokenId, lp: f32, top: &[(TokenId, f32)]) {
        let TokenLogprob {
            token,
            logprob,
            bytes,
        } = TokenLogprob::new(tok, id, lp);
        self.content.push(ChatTokenLogprob {
            token,
            logprob,
            bytes,
            top_logprobs: top
                .iter()
                .map(|&(t, l)| TokenLogprob::new(tok, t, l))
                .collect(),
        });
    }
}

/// One token's alternatives, serialized as a JSON object from token text
/// to log-probability (completions' shape).
struct TopMap(Vec<(String, f64)>);

impl Serialize for TopMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// Completions' `logprobs`: parallel arrays, `text_offset` in characters
/// of the whole text (the echoed prompt included).
#[derive(Serialize, Default)]
pub(super) struct TextLogprobs {
    tokens: Vec<String>,
    /// `null` for the prompt's first token (nothing comes before it).
    token_logprobs: Vec<Option<f64>>,
    top_logprobs: Vec<Option<TopMap>>,
    text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// A prompt token, with its score (none for the first).
    pub(super) fn push_prompt(
        &mut self,
        tok: &Tokenizer,
        offset: usize,
        id: TokenId,
        score: Option<(f32, &[(TokenId, f32)])>,
    ) {
        let text = |t: TokenId| String::from_utf8_lossy(tok.token_bytes(t)).into_owned();
        self.tokens.push(text(id));
        self.token_logprobs.push(score.map(|s| f64::from(s.0)));
        self.top_logprobs.push(
            score.map(|(_, top)| {
                TopMap(top.iter().map(|&(t, l)| (text(t), f64::from(l))).collect())
            }),
        );
        self.text_offset.push(offset);
    }

    /// Appends `other`'s entries (the generated tokens after the prompt's).
    pub(super) fn append(&mut self, other: TextLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }

    pub(super) fn push(
        &mut self,
        tok: &Tokenizer,
        offset: usize,
        id: TokenId,
        lp: f32,
        top: &[(TokenId, f32)],
    ) {
        let text = |t: TokenId| String::from_utf8_lossy(tok.token_bytes(t)).into_owned();
        self.tokens.push(text(id));
        self.token_logprobs.push(Some(lp.into()));
        self.top_logprobs.push(Some(TopMap(
            top.iter().map(|&(t, l)| (text(t), f64::from(l))).collect(),
        )));
        self.text_offset.push(offset);
    }
}
