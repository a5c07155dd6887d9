//! A request's generated text: the streaming detokenizer, and stop strings.
//!
//! Text goes to the client as deltas that never split a character and never
//! show the start of a stop string that may still complete: the longest
//! tail of the text that is a prefix of some stop string is held back until
//! the next token settles it. When a stop string appears, the text before
//! it is the last delta and the request stops (the stop string itself is
//! not sent, as in OpenAI's API).

use std::sync::Arc;

use strata_kv::TokenId;
use strata_model::{Detokenizer, Tokenizer};

/// What one token did to the text.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    /// Text that is now safe to send.
    pub(crate) text: String,
    /// A stop string appeared: the request ends with this token.
    pub(crate) stopped: bool,
}

/// One request's text state.
pub(crate) struct TextState {
    tokenizer: Arc<Tokenizer>,
    detok: Detokenizer,
    /// Everything decoded so far.
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    stops: Vec<String>,
    /// The longest stop string, in bytes.
    longest: usize,
    /// After each token: the text's length, and whether all the token's
    /// bytes are in it (none wait for the rest of a character).
    ends: Vec<(usize, bool)>,
    /// Where the stop string that ended the request begins.
    stopped_at: Option<usize>,
}

impl TextState {
    /// Empty stop strings are ignored (they would match everywhere).
    pub(crate) fn new(tokenizer: Arc<Tokenizer>, stops: &[String]) -> Self {
        let stops: Vec<String> = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            tokenizer,
            detok: Detokenizer::default(),
            text: String::new(),
            sent: 0,
            stops,
            longest,
            ends: Vec::new(),
            stopped_at: None,
        }
    }

    /// A new state with the same tokenizer and stop strings (a fork's).
    pub(crate) fn fresh(&self) -> Self {
        Self::new(self.tokenizer.clone(), &self.stops)
    }

    /// Adds a generated token. Stop strings are looked for only when
    /// `check_stops` (not before `min_tokens`).
    pub(crate) fn push(&mut self, t: TokenId, check_stops: bool) -> Delta {
        let before = self.text.len();
        let piece = self.detok.push(&self.tokenizer, t);
        self.text.push_str(&piece);
        self.ends.push((self.text.len(), self.detok.is_settled()));
        if self.stops.is_empty() {
            return Delta {
                text: self.take(self.text.len()),
                stopped: false,
            };
        }
        if check_stops {
            // A new match ends in the new piece, so it starts at most
            // `longest - 1` bytes before it (and not before what was sent).
            let from = floor_boundary(
                &self.text,
                before.saturating_sub(self.longest - 1).max(self.sent),
            );
            let hit = self
                .stops
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
                .min();
            if let Some(at) = hit {
                self.stopped_at = Some(at);
                return Delta {
                    text: self.take(at),
                    stopped: true,
                };
            }
        }
        let keep = self.held_back();
        Delta {
            text: self.take(self.text.len() - keep),
            stopped: false,
        }
    }

    /// The rest of the text at the end of the sequence (held-back bytes and
    /// an incomplete character, which becomes U+FFFD).
    pub(crate) fn finish(&mut self) -> String {
        let tail = self.detok.finish();
        self.text.push_str(&tail);
        self.take(self.text.len())
    }

    /// After a stop string: what the conversation continues from, which is
    /// the text the client saw. That is the generated tokens lying wholly
    /// before the stop string (`kept` of them), then the rest of the visible
    /// text, tokenized again as plain text (a stop string may begin inside a
    /// token). `None` if no stop string ended the request.
    ///
    /// ```text
    ///   tokens:  | He | llo | ⎵wor | ld |        stop string "orl"
    ///   text:    Hello⎵w|orld                    visible: "Hello⎵w"
    ///   kept: 2 (He, llo); rest: "⎵w", tokenized again
    /// ```
    pub(crate) fn conversation_cut(&self) -> Option<(usize, Vec<TokenId>)> {
        let at = self.stopped_at?;
        let (kept, covered) = self
            .ends
            .iter()
            .enumerate()
            .filter(|&(_, &(end, settled))| end <= at && settled)
            .map(|(i, &(end, _))| (i + 1, end))
            .next_back()
            .unwrap_or((0, 0));
        // The rest is model output the client saw: plain text, so it can
        // never become a control token. A tokenizer error cannot happen on
        // text it decoded; if it did, the conversation continues from the
        // kept tokens alone.
        let rest = self
            .tokenizer
            .encode(&self.text[covered..at])
            .unwrap_or_default();
        Some((kept, rest))
    }

    /// Bytes at the end of the text that could begin a stop string.
    fn held_back(&self) -> usize {
        let unsent = &self.text[self.sent..];
        (1..self.longest.min(unsent.len() + 1))
            .rev()
            .find(|&k| {
                let at = unsent.len() - k;
                unsent.is_char_boundary(at)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.as_bytes().starts_with(&unsent.as_bytes()[at..]))
            })
            .unwrap_or(0)
    }

    /// Sends `text[sent..upto]`.
    fn take(&mut self, upto: usize) -> String {
        let out = self.text[self.sent..upto].to_string();
        self.sent = upto;
        out
    }
}

/// The largest char boundary of `s` at or below `i`.
fn floor_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use strata_model::Gguf;
    use strata_testkit::tiny_model::{self, TinyConfig};

    use super::*;

    fn tokenizer() -> Arc<Tokenizer> {
        let g = Gguf::open(&tiny_model::path(TinyConfig::default())).expect("tiny model");
        Arc::new(Tokenizer::from_gguf(g.content()).expect("tiny tokenizer"))
    }

    /// Streams `text`'s tokens; returns the deltas and whether it stopped.
    fn stream(tok: &Arc<Tokenizer>, text: &str, stops: &[&str], min: usize) -> (Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut state = TextState::new(tok.clone(), &stops);
        let mut out = Vec::new();
        for (i, &t) in tok.encode(text).expect("encodes").iter().enumerate() {
            let d = state.push(t, i + 1 >= min);
            out.push(d.text);
            if d.stopped {
                return (out, true);
            }
        }
        out.push(state.finish());
        (out, false)
    }

    #[test]
    fn text_stops_before_the_stop_string_and_never_shows_its_start() {
        let tok = tokenizer();
        let (d, stopped) = stream(&tok, "hello world. END and more", &["END"], 0);
        assert!(stopped);
        assert_eq!(d.concat(), "hello world. ");
        // Without stop strings, every byte arrives as soon as it is whole.
        let (d, stopped) = stream(&tok, "héllo wörld", &[], 0);
        assert!(!stopped);
        assert_eq!(d.concat(), "héllo wörld");
        assert!(d.iter().all(|p| !p.contains(char::REPLACEMENT_CHARACTER)));
        // A near miss is sent once it is settled.
        let (d, stopped) = stream(&tok, "ENd, EN", &["END"], 0);
        assert!(!stopped);
        assert_eq!(d.concat(), "ENd, EN");
        // Before min_tokens, stop strings do not count.
        let (d, stopped) = stream(&tok, "END END", &["END"], 4);
        assert!(stopped);
        assert_eq!(d.concat(), "END ");
    }

    /// Random texts and stop strings over a small alphabet (so stops are
    /// frequent and overlap): the deltas concatenate to the text up to the
    /// first stop string to appear, and what was sent is always a prefix of
    /// that.
    #[test]
    fn text_random_streams_match_a_plain_search() {
        let tok = tokenizer();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let alphabet = ['a', 'b', 'é', ' ', '日'];
        let word = |rng: &mut ChaCha8Rng, n: usize| -> String {
            (0..n)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect()
        };
        for _ in 0..2000 {
            let n = rng.random_range(1..30);
            let text = word(&mut rng, n);
            let stops: Vec<String> = (0..rng.random_range(0..3))
                .map(|_| {
                    let n = rng.random_range(1..5);
                    word(&mut rng, n)
                })
                .collect();
            let refs: Vec<&str> = stops.iter().map(String::as_str).collect();
            let (d, stopped) = stream(&tok, &text, &refs, 0);
            // The reference: after each token, the whole characters so far;
            // the first of these texts containing a stop string is cut
            // before its earliest occurrence.
            let mut bytes = Vec::new();
            let mut expected = text.clone();
            let mut hit = false;
            for &t in &tok.encode(&text).expect("encodes") {
                bytes.extend_from_slice(tok.token_bytes(t));
                let whole = match std::str::from_utf8(&bytes) {
                    Ok(s) => s,
                    Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).expect("valid"),
                };
                if let Some(at) = stops.iter().filter_map(|s| whole.find(s.as_str())).min() {
                    expected = whole[..at].to_string();
                    hit = true;
                    break;
                }
            }
            let expected = expected.as_str();
            assert_eq!(d.concat(), expected, "{text:?} stops {stops:?}");
            assert_eq!(stopped, hit, "{text:?} stops {stops:?}");
            let mut sent = String::new();
            for p in &d {
                sent.push_str(p);
                assert!(expected.starts_with(&sent), "{text:?} stops {stops:?}");
            }
        }
    }
}
