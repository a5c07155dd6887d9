//! Constrained decoding: a request's grammar (a JSON schema, a regex, a
//! Lark grammar, a list of choices) compiled by llguidance, and for each
//! sequence the set of tokens that may come next.
//!
//! [`Grammars`] is built once per model: the token trie of its tokenizer
//! and a cache of compiled grammars keyed by their text, so a schema sent
//! with every request is compiled once. [`Grammar::start`] gives a
//! sequence its own [`Constraint`]; the executor asks it for the next
//! token's mask while the forward pass runs ([`Constraint::compute_mask`]),
//! samples under it, and commits the sampled token.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};
use strata_store::TokenId;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use crate::tokenizer::Tokenizer;

/// Compiled grammars kept, least recently used dropped first.
pub const GRAMMAR_CACHE: usize = 64;

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema(Value),
    /// Text matching a regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// A context-free grammar in llguidance's Lark syntax.
    Lark(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl GrammarSpec {
    /// The cache key: the kind and the grammar's text.
    fn key(&self) -> String {
        match self {
            GrammarSpec::JsonObject => "json_object".into(),
            GrammarSpec::JsonSchema(v) => format!("json_schema:{v}"),
            GrammarSpec::Regex(r) => format!("regex:{r}"),
            GrammarSpec::Lark(g) => format!("lark:{g}"),
            GrammarSpec::Choice(c) => format!("choice:{}", Value::from(c.clone())),
        }
    }

    /// The grammar llguidance compiles. JSON is compact (one space after
    /// `:` and `,`, no other whitespace) unless the schema says otherwise
    /// in its `x-guidance`: a small model let loose on flexible whitespace
    /// can spend its whole budget on newlines.
    fn top_level(&self) -> Result<TopLevelGrammar, String> {
        let compact =
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        Ok(match self {
            GrammarSpec::JsonObject => TopLevelGrammar::from_json_schema(
                json!({"type": "object", "x-guidance": compact()}),
            ),
            GrammarSpec::JsonSchema(v) => {
                let v = match v {
                    Value::Object(o) => {
                        let mut o = o.clone();
                        o.entry("x-guidance").or_insert_with(compact);
                        Value::Object(o)
                    }
                    // `true`: any JSON value.
                    Value::Bool(true) => json!({"x-guidance": compact()}),
                    _ => return Err("a JSON schema must be an object".into()),
                };
                TopLevelGrammar::from_json_schema(v)
            }
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            GrammarSpec::Choice(c) => {
                if c.is_empty() {
                    return Err("a choice list must not be empty".into());
                }
                let alts: Vec<String> = c.iter().map(|s| regex_syntax::escape(s)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alts.join("|")))
            }
        })
    }
}

/// The tokenizer as llguidance sees it: its trie, and tokenizing of the
/// literal text grammars hold.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<toktrie::TokenId> {
        // Grammar literals are text; special-token strings in them stay
        // text (a grammar never produces a control token by spelling it).
        self.tokenizer
            .encode(&String::from_utf8_lossy(s))
            .map(|ids| ids.into_iter().map(TokenId::get).collect())
            .unwrap_or_default()
    }
}

/// Compiles grammars for one model's tokenizer, and caches them.
pub struct Grammars {
    factory: ParserFactory,
    eos: Arc<[TokenId]>,
    cache: Mutex<VecDeque<(String, Arc<Grammar>)>>,
}

impl fmt::Debug for Grammars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// For a model whose logits have `vocab` entries (at least the
    /// tokenizer's; ids past the tokenizer's are never allowed).
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize) -> Result<Self, String> {
        let eos = tokenizer
            .eos()
            .first()
            .copied()
            .ok_or("the tokenizer has no end-of-sequence token")?;
        let words: Vec<Vec<u8>> = (0..vocab)
            .map(|i| {
                let t = TokenId::new(i as u32);
                let bytes = tokenizer.token_bytes(t);
                if tokenizer.is_control(t) || tokenizer.is_special_token(t) {
                    // llguidance's mark of a special token: grammars cannot
                    // match it as text.
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(bytes);
                    w
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, eos.get());
        let eos_ids: Vec<u32> = tokenizer
            .eos()
            .iter()
            .map(|t| t.get())
            .filter(|&t| (t as usize) < vocab)
            .collect();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos_ids);
        let eos: Arc<[TokenId]> = eos_ids.iter().map(|&t| TokenId::new(t)).collect();
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        // Errors name the grammar, not the whole parser state (which holds
        // the tokens so far: a client's error message is not a log).
        factory.limits_mut().verbose_errors = false;
        Ok(Self {
            factory,
            eos,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// The compiled grammar for `spec`, from the cache or compiled now (the
    /// error is the compiler's message). Compiling takes milliseconds for
    /// a large schema: call it off the async runtime.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Arc<Grammar>, String> {
        let key = spec.key();
        {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = c.iter().position(|(k, _)| *k == key) {
                let hit = c.remove(i).expect("found above");
                let g = hit.1.clone();
                c.push_back(hit);
                return Ok(g);
            }
        }
        let top = spec.top_level()?;
        let parser = self.factory.create_parser(top).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        let g = Arc::new(Grammar {
            template: Mutex::new(matcher),
            key: key.clone(),
            eos: self.eos.clone(),
        });
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if !c.iter().any(|(k, _)| *k == key) {
            if c.len() >= GRAMMAR_CACHE {
                c.pop_front();
            }
            c.push_back((key, g.clone()));
        }
        Ok(g)
    }

    /// Grammars in the cache.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The parser limits every grammar runs under (they bound one mask's
    /// work, so no grammar can stall a step).
    pub fn limits(&self) -> &ParserLimits {
        self.factory.limits()
    }
}

/// A compiled grammar, shared by every request that sends the same text.
pub struct Grammar {
    /// A matcher in its start state: each sequence gets a deep copy.
    template: Mutex<Matcher>,
    key: String,
    eos: Arc<[TokenId]>,
}

impl fmt::Debug for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.key.chars().take(80).collect();
        write!(f, "Grammar({shown:?})")
    }
}

/// Two grammars are equal when their texts are.
impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Grammar {
    /// A sequence's own constraint, at the grammar's start.
    pub fn start(&self) -> Constraint {
        let m = self.template.lock().unwrap_or_else(|p| p.into_inner());
        Constraint {
            matcher: m.deep_clone(),
            eos: self.eos.clone(),
            ended: false,
            mask: None,
            mask_nanos: 0,
        }
    }
}

/// One sequence's progress through its grammar.
pub struct Constraint {
    matcher: Matcher,
    eos: Arc<[TokenId]>,
    /// An end-of-sequence token was sampled: the grammar allows nothing
    /// after it (a sequence that goes on, with `ignore_eos`, is at a dead
    /// end).
    ended: bool,
    /// The next token's mask, once computed: a bit per token id.
    mask: Option<Result<Vec<u32>, String>>,
    mask_nanos: u64,
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Computes the next token's mask (the work; the executor runs it
    /// beside the forward pass). Once the grammar is complete the mask is
    /// the end-of-sequence tokens alone.
    pub fn compute_mask(&mut self) {
        if self.mask.is_some() {
            return;
        }
        let t = Instant::now();
        let m = if self.ended {
            Err("the grammar reached a dead end: it is complete, and nothing may follow its end (ignore_eos asks for more)".to_string())
        } else {
            self.matcher
                .compute_mask_or_eos()
                .map(|v| v.as_slice().to_vec())
                .map_err(|e| format!("the grammar failed: {e}"))
        };
        self.mask_nanos = t.elapsed().as_nanos() as u64;
        self.mask = Some(m);
    }

    /// The next token's mask (computed now if it was not): a bit per token
    /// id, set where the token may come next.
    pub fn mask(&mut self) -> Result<&[u32], String> {
        self.compute_mask();
        match self.mask.as_ref().expect("computed above") {
            Ok(m) => Ok(m),
            Err(e) => Err(e.clone()),
        }
    }

    /// How long the latest mask took to compute.
    pub fn mask_nanos(&self) -> u64 {
        self.mask_nanos
    }

    /// Records the sampled token (it must be one the mask allowed).
    pub fn commit(&mut self, t: TokenId) -> Result<(), String> {
        self.mask = None;
        if self.eos.contains(&t) {
            self.ended = true;
        }
        if self.ended || self.matcher.is_stopped() {
            // The end itself, or a token past an end the scheduler has
            // not seen yet (its row is discarded).
            return Ok(());
        }
        self.matcher
            .consume_token(t.get())
            .map_err(|e| format!("the grammar refused the sampled token: {e}"))
    }

    /// Whether the grammar is complete (only end-of-sequence may follow).
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// Whether the mask allows token `t`.
pub fn allows(mask: &[u32], t: usize) -> bool {
    mask.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1)
}
