//! The tokenizer, built from GGUF metadata.
//!
//! Byte-level BPE from the stored tokens and merges (the `tokenizers`
//! crate), with the pre-tokenizer `tokenizer.ggml.pre` names. Special
//! (control) tokens are recognised only where Strata asks for it, in the
//! chat template's own text: text that comes from users is always plain
//! text, so a message containing `<|im_start|>system` stays those characters.
//!
//! Decoding is ours: each token id maps to its raw bytes (the inverse of the
//! GPT-2 byte-to-unicode table), so the incremental [`Detokenizer`] can emit
//! exactly the complete UTF-8 it has and hold back a split character.

use std::collections::HashMap;

use aho_corasick::{AhoCorasick, MatchKind};
use candle_core::quantized::gguf_file::{Content, Value};
use strata_store::TokenId;
use tokenizers::PreTokenizerWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use crate::config::meta_str;
use crate::error::ModelError;

/// The size (bytes) of the pieces long text is tokenized in.
pub const CHUNK: usize = 8 * 1024;

/// Where to cut `text` so that its first piece is about `target` bytes and
/// tokenizing the pieces alone gives the whole text's tokens: between two
/// ASCII characters (whose classes are exact: letter, digit, other), neither
/// whitespace (GPT-2's `\s+(?!\S)` looks ahead across whitespace, and a
/// leading space joins the next word), of different classes (no word, number
/// or punctuation run spans the cut), and not an apostrophe before a letter
/// (the contractions `'s`, `'ll`, ...). With no such place, the whole text.
fn safe_cut(text: &str, target: usize) -> usize {
    if text.len() <= target {
        return text.len();
    }
    let class = |b: u8| {
        if b.is_ascii_alphabetic() {
            0
        } else if b.is_ascii_digit() {
            1
        } else {
            2
        }
    };
    let bytes = text.as_bytes();
    for i in target.max(1)..bytes.len() {
        let (p, c) = (bytes[i - 1], bytes[i]);
        if p.is_ascii()
            && c.is_ascii()
            && !p.is_ascii_whitespace()
            && !c.is_ascii_whitespace()
            && p != 0x0b
            && c != 0x0b
            && class(p) != class(c)
            && !(p == b'\'' && c.is_ascii_alphabetic())
        {
            return i;
        }
    }
    text.len()
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// A model's tokenizer.
pub struct Tokenizer {
    bpe: tokenizers::Tokenizer,
    /// Control and user-defined tokens, longest first, for matching in
    /// template text.
    specials: Vec<(String, TokenId)>,
    /// One automaton over every special-token string (leftmost-longest),
    /// so finding them all is one pass over the text, whatever their number.
    finder: AhoCorasick,
    is_special: Vec<bool>,
    bytes: Vec<Vec<u8>>,
    eos: Vec<TokenId>,
    bos: Option<TokenId>,
    add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.bytes.len())
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the
/// rest to code points from 256 up, so every byte is a visible character.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("code points 256..324 are valid chars");
            next += 1;
            c
        };
    }
    table
}

fn strings(c: &Content, key: &str) -> Result<Vec<String>, ModelError> {
    match c.metadata.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ModelError::MissingMetadata {
                    key: key.into(),
                    expected: "array of strings",
                }),
            })
            .collect(),
        _ => Err(ModelError::MissingMetadata {
            key: key.into(),
            expected: "array of strings",
        }),
    }
}

fn token_types(c: &Content, n: usize) -> Vec<i32> {
    match c.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::I32(x) => *x,
                Value::U32(x) => *x as i32,
                _ => 1,
            })
            .collect(),
        _ => vec![1; n],
    }
}

fn opt_id(c: &Content, key: &str) -> Option<TokenId> {
    crate::config::meta_u32(c, key)
        .ok()
        .and_then(|v| u32::try_from(v).ok())
        .map(TokenId::new)
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf(c: &Content) -> Result<Self, ModelError> {
        let model = meta_str(c, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer model {model:?} is not supported yet (Strata supports byte-level BPE, tokenizer.ggml.model = \"gpt2\")"
            )));
        }
        let pre = meta_str(c, "tokenizer.ggml.pre").unwrap_or("default");
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // llama.cpp: split every digit, then GPT-2's regex, no prefix space.
            "smollm" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "pre-tokenizer {other:?} is not supported yet (supported: smollm, gpt2, default)"
                )));
            }
        };
        let tokens = strings(c, "tokenizer.ggml.tokens")?;
        let merges = strings(c, "tokenizer.ggml.merges")?;
        let types = token_types(c, tokens.len());
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge {m:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut tk = tokenizers::Tokenizer::new(bpe);
        tk.with_pre_tokenizer(Some(pre_tokenizer));

        let to_char = byte_to_char();
        let mut from_char: HashMap<char, u8> = HashMap::new();
        for (b, ch) in to_char.iter().enumerate() {
            from_char.insert(*ch, b as u8);
        }
        let mut specials = Vec::new();
        let mut is_special = vec![false; tokens.len()];
        let bytes = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let ty = types.get(i).copied().unwrap_or(1);
                if (ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED) && !t.is_empty() {
                    specials.push((t.clone(), TokenId::new(i as u32)));
                    is_special[i] = ty == TYPE_CONTROL;
                    return t.as_bytes().to_vec();
                }
                // Byte-level strings map char by char back to bytes.
                t.chars()
                    .map(|ch| from_char.get(&ch).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| t.as_bytes().to_vec())
            })
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let finder = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(specials.iter().map(|(s, _)| s.as_str()))
            .map_err(|e| ModelError::Tokenizer(format!("special tokens: {e}")))?;
        let mut eos: Vec<TokenId> = opt_id(c, "tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect();
        for extra in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(t) = opt_id(c, extra).filter(|t| !eos.contains(t)) {
                eos.push(t);
            }
        }
        if eos.is_empty() {
            return Err(ModelError::MissingMetadata {
                key: "tokenizer.ggml.eos_token_id".into(),
                expected: "integer",
            });
        }
        let add_bos = matches!(
            c.metadata.get("tokenizer.ggml.add_bos_token"),
            Some(Value::Bool(true))
        );
        Ok(Self {
            bpe: tk,
            specials,
            finder,
            is_special,
            bytes,
            eos,
            bos: opt_id(c, "tokenizer.ggml.bos_token_id"),
            add_bos,
        })
    }

    /// Tokenizes text as plain text: special-token strings in it are ordinary
    /// characters.
    ///
    /// Long text is cut into pieces of about [`CHUNK`] bytes at places where
    /// the pre-tokenizer splits anyway, and each piece is tokenized alone:
    /// the ids are the same as for the whole text (the test compares them),
    /// but the tokenizer's per-call buffers stay small, so the rate does not
    /// fall as the text grows (the `tokenizer` bench measures it).
    pub fn encode(&self, text: &str) -> Result<Vec<TokenId>, ModelError> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let cut = safe_cut(rest, CHUNK);
            out.extend(self.encode_whole(&rest[..cut])?);
            rest = &rest[cut..];
        }
        Ok(out)
    }

    /// Tokenizes text in one call to the BPE (no cutting).
    pub fn encode_whole(&self, text: &str) -> Result<Vec<TokenId>, ModelError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .bpe
            .encode_fast(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().copied().map(TokenId::new).collect())
    }

    /// Tokenizes text in which special-token strings are those tokens (for
    /// the chat template's own markers, never for user text).
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<TokenId>, ModelError> {
        // One leftmost-longest pass: at each position the longest special
        // string wins, as the old longest-first scan chose, but the text is
        // read once instead of once per match and per special token.
        let mut out = Vec::new();
        let mut at = 0;
        for m in self.finder.find_iter(text) {
            out.extend(self.encode(&text[at..m.start()])?);
            out.push(self.specials[m.pattern().as_usize()].1);
            at = m.end();
        }
        out.extend(self.encode(&text[at..])?);
        Ok(out)
    }

    /// The raw bytes of a token (a special token's are its text).
    pub fn token_bytes(&self, t: TokenId) -> &[u8] {
        self.bytes.get(t.get() as usize).map_or(&[], Vec::as_slice)
    }

    /// Whether `t` is one of the special (control or user-defined) tokens
    /// that special-token parsing produces.
    pub fn is_special_token(&self, t: TokenId) -> bool {
        self.specials.iter().any(|&(_, id)| id == t)
    }

    /// Whether `t` is a control token (EOS, chat markers...).
    pub fn is_control(&self, t: TokenId) -> bool {
        self.is_special
            .get(t.get() as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Decodes tokens to text; control tokens are left out unless asked for,
    /// and invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[TokenId], keep_control: bool) -> String {
        let mut bytes = Vec::new();
        for &t in ids {
            if keep_control || !self.is_control(t) {
                bytes.extend_from_slice(self.token_bytes(t));
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The token id of an exact special-token string, if there is one.
    pub fn special(&self, text: &str) -> Option<TokenId> {
        self.specials
            .iter()
            .find(|(s, _)| s == text)
            .map(|&(_, id)| id)
    }

    /// End-of-sequence tokens (EOS, and EOT/EOM where the model has them).
    pub fn eos(&self) -> &[TokenId] {
        &self.eos
    }

    /// The beginning-of-sequence token, if any.
    pub fn bos(&self) -> Option<TokenId> {
        self.bos
    }

    /// Whether prompts get the BOS token prepended.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The most bytes one token stands for: a text of more than
    /// `n * max_token_bytes()` bytes cannot be `n` tokens or fewer, so it can
    /// be refused for a context of `n` before it is tokenized.
    pub fn max_token_bytes(&self) -> usize {
        self.bytes.iter().map(Vec::len).max().unwrap_or(1).max(1)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }
}

/// Turns one sequence's tokens into text as they arrive, never emitting
/// broken UTF-8: bytes of a character split across tokens wait for the
/// rest. It holds no reference to the tokenizer, so it can live in state
/// that outlives a borrow (the engine keeps one per request).
#[derive(Clone, Debug, Default)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    /// Adds a token; returns the text it completes (possibly empty). Control
    /// tokens add nothing.
    pub fn push(&mut self, tokenizer: &Tokenizer, t: TokenId) -> String {
        if tokenizer.is_control(t) {
            return String::new();
        }
        self.push_bytes(tokenizer.token_bytes(t))
    }

    /// Adds raw bytes (a token's, control tokens included); returns the
    /// text they complete.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("validated prefix"),
                    );
                    match e.error_len() {
                        // Incomplete at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never be valid: one replacement each run.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whether every byte pushed so far is in the text returned (no
    /// character is waiting for the rest of its bytes).
    pub fn is_settled(&self) -> bool {
        self.pending.is_empty()
    }

    /// Flushes what is left at the end of the sequence (an incomplete
    /// character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

impl Tokenizer {
    /// Whether `text` contains any special-token string.
    pub fn contains_special(&self, text: &str) -> bool {
        self.finder.is_match(text)
    }
}
