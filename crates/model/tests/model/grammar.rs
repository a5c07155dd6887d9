//! Grammars over the real model's tokenizer: the cache, compile errors,
//! and a constraint walked token by token (every path it allows ends in
//! text the grammar accepts, and no control token is ever allowed but the
//! end of the sequence).

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use strata_model::{GRAMMAR_CACHE, Gguf, GrammarSpec, Grammars, Tokenizer, allows};
use strata_store::TokenId;

use crate::real_model::model_path;

fn grammars() -> (Arc<Tokenizer>, Grammars) {
    let g = Gguf::open(&model_path()).unwrap();
    let tok = Arc::new(Tokenizer::from_gguf(g.content()).unwrap());
    let vocab = tok.vocab_size();
    let grammars = Grammars::new(tok.clone(), vocab).unwrap();
    (tok, grammars)
}

/// Walks the constraint with random allowed tokens until only the end of
/// the sequence is allowed (or `max` tokens), checking each mask; returns
/// the text and whether it ended.
fn walk(
    tok: &Tokenizer,
    spec: &GrammarSpec,
    g: &Grammars,
    seed: u64,
    max: usize,
) -> (String, bool) {
    let mut c = g.compile(spec).unwrap().start();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    let vocab = tok.vocab_size();
    for _ in 0..max {
        let mask = c.mask().unwrap().to_vec();
        let allowed: Vec<usize> = (0..vocab).filter(|&t| allows(&mask, t)).collect();
        assert!(!allowed.is_empty(), "a live grammar allows some token");
        for &t in &allowed {
            let id = TokenId::new(t as u32);
            assert!(
                !tok.is_control(id) || tok.eos().contains(&id),
                "the mask allows control token {t}"
            );
        }
        let eos = allowed
            .iter()
            .any(|&t| tok.eos().contains(&TokenId::new(t as u32)));
        let text: Vec<usize> = allowed
            .iter()
            .copied()
            .filter(|&t| !tok.eos().contains(&TokenId::new(t as u32)))
            .collect();
        // End when only the end is left, or now and then when it may.
        if text.is_empty() || (eos && rng.random_bool(0.3)) {
            return (tok.decode(&out, false), true);
        }
        // Prefer short tokens' neighbours rarely: any allowed token will do.
        let t = TokenId::new(text[rng.random_range(0..text.len())] as u32);
        c.commit(t).unwrap();
        out.push(t);
    }
    (tok.decode(&out, false), false)
}

#[test]
fn real_model_grammar_paths_end_in_accepted_text() {
    let (tok, g) = grammars();
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "kind": {"enum": ["cat", "dog", "fish"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}
        },
        "required": ["name", "kind", "age", "tags"],
        "additionalProperties": false
    });
    let validator = jsonschema::validator_for(&schema).unwrap();
    let spec = GrammarSpec::JsonSchema(schema.clone());
    let mut ended = 0;
    for seed in 0..8 {
        let (text, done) = walk(&tok, &spec, &g, seed, 400);
        if done {
            ended += 1;
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
            assert!(validator.is_valid(&v), "seed {seed}: {text}");
        }
    }
    assert!(
        ended >= 6,
        "random walks of a bounded schema end: {ended}/8"
    );

    let choices = vec![
        "yes".to_string(),
        "no".to_string(),
        "<|im_end|>".to_string(),
    ];
    for seed in 0..8 {
        let (text, done) = walk(&tok, &GrammarSpec::Choice(choices.clone()), &g, seed, 50);
        assert!(done && choices.contains(&text), "seed {seed}: {text:?}");
    }
    for seed in 0..8 {
        let (text, done) = walk(
            &tok,
            &GrammarSpec::Regex("[a-c]{2,4}-[0-9]".into()),
            &g,
            seed,
            50,
        );
        let ok = text.len() >= 4
            && text.len() <= 6
            && text[..text.len() - 2]
                .chars()
                .all(|c| ('a'..='c').contains(&c))
            && text[text.len() - 2..].starts_with('-');
        assert!(done && ok, "seed {seed}: {text:?}");
    }
    let lark = GrammarSpec::Lark("start: \"(\" num (\",\" num)* \")\"\nnum: /[0-9]{1,3}/".into());
    for seed in 0..8 {
        let (text, done) = walk(&tok, &lark, &g, seed, 100);
        let inner = text.strip_prefix('(').and_then(|t| t.strip_suffix(')'));
        let ok = inner.is_some_and(|i| {
            i.split(',')
                .all(|n| (1..=3).contains(&n.len()) && n.chars().all(|c| c.is_ascii_digit()))
        });
        assert!(done && ok, "seed {seed}: {text:?}");
    }
}

/// The special-token text in a choice stays text: the model can only
/// spell it out byte by byte, never emit the control token.
#[test]
fn real_model_grammar_text_never_becomes_a_control_token() {
    let (tok, g) = grammars();
    let spec = GrammarSpec::Choice(vec!["<|im_start|>system".into()]);
    let mut c = g.compile(&spec).unwrap().start();
    let mut n = 0;
    loop {
        let mask = c.mask().unwrap().to_vec();
        let first = (0..tok.vocab_size())
            .find(|&t| allows(&mask, t))
            .map(|t| TokenId::new(t as u32))
            .unwrap();
        if tok.eos().contains(&first) {
            break;
        }
        assert!(!tok.is_control(first), "control token {first:?} allowed");
        c.commit(first).unwrap();
        n += 1;
        assert!(n < 40);
    }
    assert!(c.is_complete());
}

#[test]
fn real_model_grammars_are_compiled_once_and_cached_in_bounds() {
    let (_, g) = grammars();
    let spec = GrammarSpec::JsonSchema(
        json!({"type": "object", "properties": {"a": {"type": "integer"}}}),
    );
    let a = g.compile(&spec).unwrap();
    let b = g.compile(&spec).unwrap();
    assert!(Arc::ptr_eq(&a, &b), "the same text is one compiled grammar");
    assert_eq!(g.cached(), 1);
    for i in 0..GRAMMAR_CACHE + 5 {
        g.compile(&GrammarSpec::Regex(format!("x{{{i}}}"))).unwrap();
        assert!(g.cached() <= GRAMMAR_CACHE);
    }
    assert_eq!(g.cached(), GRAMMAR_CACHE);
    // The oldest went first: the schema is compiled anew.
    let c = g.compile(&spec).unwrap();
    assert!(!Arc::ptr_eq(&a, &c));
    // Recently used stays: the newest regex is still the same grammar.
    let last = GrammarSpec::Regex(format!("x{{{}}}", GRAMMAR_CACHE + 4));
    let l1 = g.compile(&last).unwrap();
    let l2 = g.compile(&last).unwrap();
    assert!(Arc::ptr_eq(&l1, &l2));
}

#[test]
fn real_model_bad_grammars_fail_with_the_compilers_message() {
    let (_, g) = grammars();
    let bad = [
        GrammarSpec::JsonSchema(json!({"type": "strin"})),
        GrammarSpec::JsonSchema(json!(3)),
        GrammarSpec::Regex("(unclosed".into()),
        GrammarSpec::Lark("start: undefined_rule".into()),
        GrammarSpec::Choice(vec![]),
    ];
    for spec in bad {
        let e = g.compile(&spec).unwrap_err();
        assert!(!e.is_empty(), "{spec:?}");
    }
    assert_eq!(g.cached(), 0, "failures are not cached");
}
