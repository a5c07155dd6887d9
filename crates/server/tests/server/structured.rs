//! Structured output over HTTP: every output follows its grammar (the
//! real model over a table of JSON schemas, validated by an independent
//! validator; the tiny model, whose output is noise, under regexes and
//! choices), grammars that cannot compile or that reach a dead end get a
//! clear 400, and extensions are read under their documented names.

use serde_json::{Value, json};

use crate::harness::TestServer;

/// Schemas of every shape the issue names: nested objects, bounded
/// arrays, enums, anyOf, string formats, required and optional fields,
/// local `$ref`s, const and nullable, patterns.
fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {
            "person": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 16},
                "address": {"type": "object", "properties": {
                    "city": {"type": "string", "maxLength": 16},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                }, "required": ["city", "zip"], "additionalProperties": false}
            }, "required": ["name", "address"], "additionalProperties": false}
        }, "required": ["person"], "additionalProperties": false}),
        json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
               "minItems": 2, "maxItems": 4}),
        json!({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
               "size": {"enum": ["S", "M", "L", 42]}},
               "required": ["color", "size"], "additionalProperties": false}),
        json!({"anyOf": [
            {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 5}},
             "required": ["a"], "additionalProperties": false},
            {"type": "string", "maxLength": 10}
        ]}),
        json!({"type": "object", "properties": {
            "email": {"type": "string", "format": "email", "maxLength": 30},
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"}
        }, "required": ["email", "day", "id"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 1000},
            "note": {"type": "string", "maxLength": 20}
        }, "required": ["id"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "ok": {"type": "boolean"},
            "score": {"type": "integer", "minimum": 0, "maximum": 10}
        }, "required": ["ok", "score"], "additionalProperties": false}),
        json!({"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
            "k": {"type": "string", "maxLength": 6},
            "v": {"type": "integer", "minimum": 0, "maximum": 9}
        }, "required": ["k", "v"], "additionalProperties": false}}),
        json!({"$defs": {"Pt": {"type": "object", "properties": {
                "x": {"type": "integer", "minimum": 0, "maximum": 9},
                "y": {"type": "integer", "minimum": 0, "maximum": 9}
            }, "required": ["x", "y"], "additionalProperties": false}},
            "type": "object",
            "properties": {"from": {"$ref": "#/$defs/Pt"}, "to": {"$ref": "#/$defs/Pt"}},
            "required": ["from", "to"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "v": {"const": "1.0"},
            "maybe": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}
        }, "required": ["v", "maybe"], "additionalProperties": false}),
        json!({"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}),
    ]
}

#[test]
fn real_model_json_schema_outputs_parse_and_validate() {
    let s = TestServer::real(&[]);
    let schemas = schemas();
    assert!(schemas.len() >= 10);
    let jobs: Vec<(usize, u64)> = (0..schemas.len())
        .flat_map(|i| (0..3u64).map(move |seed| (i, seed)))
        .collect();
    let outcomes: Vec<(usize, u64, Value)> = std::thread::scope(|scope| {
        let chunks: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(4))
            .map(|chunk| {
                let (s, schemas) = (&s, &schemas);
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&(i, seed)| {
                            let body = json!({
                                "messages": [{"role": "user", "content": "Answer in JSON."}],
                                "response_format": {"type": "json_schema", "json_schema": {
                                    "name": format!("s{i}"), "schema": schemas[i], "strict": true}},
                                "temperature": 1, "seed": seed, "max_tokens": 300,
                            });
                            let r = s.post("/v1/chat/completions", &body);
                            assert_eq!(r.status, 200, "schema {i} seed {seed}: {}", r.body);
                            (i, seed, r.json())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        chunks.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut texts = std::collections::HashSet::new();
    for (i, seed, r) in outcomes {
        let choice = &r["choices"][0];
        assert_eq!(
            choice["finish_reason"], "stop",
            "schema {i} seed {seed}: {r}"
        );
        let text = choice["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("schema {i} seed {seed}: {e}: {text}"));
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schemas[i])
            .unwrap();
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "schema {i} seed {seed}: {text}: {errors:?}"
        );
        texts.insert(text.to_string());
    }
    // Temperature 1 over three seeds: not one answer per schema.
    assert!(
        texts.len() > schemas.len(),
        "{} distinct outputs",
        texts.len()
    );
}

#[test]
fn real_model_json_object_and_extensions() {
    let s = TestServer::real(&[]);
    let ask = |extra: Value| {
        let mut body = json!({
            "messages": [{"role": "user", "content": "Is water wet? Answer."}],
            "temperature": 1, "seed": 5, "max_tokens": 200,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = s.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{extra}: {}", r.body);
        let r = r.json();
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let obj = ask(json!({"response_format": {"type": "json_object"}}));
    assert!(
        serde_json::from_str::<Value>(&obj).unwrap().is_object(),
        "{obj}"
    );
    let c = ask(json!({"guided_choice": ["yes", "no", "maybe"]}));
    assert!(["yes", "no", "maybe"].contains(&c.as_str()), "{c}");
    let c = ask(json!({"structured_outputs": {"choice": ["wet", "dry"]}}));
    assert!(["wet", "dry"].contains(&c.as_str()), "{c}");
    let j = ask(
        json!({"guided_json": "{\"type\": \"object\", \"properties\": {\"wet\": {\"type\": \"boolean\"}}, \"required\": [\"wet\"], \"additionalProperties\": false}"}),
    );
    assert!(
        serde_json::from_str::<Value>(&j).unwrap()["wet"].is_boolean(),
        "{j}"
    );
    let j = ask(
        json!({"json_schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 3}}, "required": ["n"], "additionalProperties": false}}),
    );
    assert!(
        serde_json::from_str::<Value>(&j).unwrap()["n"].is_u64(),
        "{j}"
    );
    let g =
        ask(json!({"guided_grammar": "start: \"The answer is \" WORD \".\"\nWORD: /[a-z]{2,8}/"}));
    assert!(g.starts_with("The answer is ") && g.ends_with('.'), "{g}");
    // Streamed, the deltas are the whole answer.
    let body = json!({
        "messages": [{"role": "user", "content": "Is water wet?"}],
        "guided_regex": "(Yes|No), [a-z ]{3,20}\\.", "max_tokens": 60, "seed": 1,
        "temperature": 1, "stream": true,
    });
    let events = s.stream("/v1/chat/completions", &body);
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    let (head, rest) = text.split_once(", ").unwrap_or_else(|| panic!("{text:?}"));
    assert!(
        ["Yes", "No"].contains(&head) && rest.ends_with('.'),
        "{text:?}"
    );
    assert!(
        rest[..rest.len() - 1]
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == ' '),
        "{text:?}"
    );
}

fn completion(s: &TestServer, extra: Value) -> crate::harness::Reply {
    let mut body = json!({"prompt": "abc", "max_tokens": 40, "temperature": 1});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    s.post("/v1/completions", &body)
}

/// The tiny model's output is noise: only the mask makes it follow the
/// grammar, so this checks the engine applies it to every token.
#[test]
fn tiny_model_output_follows_the_grammar() {
    let s = TestServer::tiny(&[]);
    for seed in 0..6 {
        let r = completion(
            &s,
            json!({"guided_regex": "[ab]{3}x[0-9]{2}", "seed": seed}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let t = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let b = t.as_bytes();
        assert!(
            b.len() == 6
                && b[..3].iter().all(|c| b"ab".contains(c))
                && b[3] == b'x'
                && b[4..].iter().all(u8::is_ascii_digit),
            "seed {seed}: {t:?}"
        );
        let r = completion(
            &s,
            json!({"guided_choice": ["left", "right", "up"], "seed": seed}),
        );
        let t = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
        assert!(["left", "right", "up"].contains(&t.as_str()), "{t:?}");
    }
    // The mask costs the step nothing it must not: the counters show one
    // mask per constrained token.
    assert!(s.metric("strata:grammar_masks_total") >= 6.0 * 6.0);
}

#[test]
fn grammar_errors_are_clear_400s() {
    let s = TestServer::tiny(&[]);
    let refused = [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}}),
            "response_format",
            "strin",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
            "schema",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
            "yaml",
        ),
        (
            json!({"response_format": "json"}),
            "response_format",
            "type",
        ),
        (
            json!({"guided_regex": "(unclosed"}),
            "guided_regex",
            "compile",
        ),
        (
            json!({"guided_grammar": "start: nothing_here"}),
            "guided_grammar",
            "compile",
        ),
        (json!({"guided_choice": []}), "guided_choice", "empty"),
        (json!({"guided_json": "{not json"}), "guided_json", "JSON"),
        (
            json!({"guided_regex": "a", "guided_choice": ["a"]}),
            "guided_choice",
            "both",
        ),
        (
            json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
            "structured_outputs",
            "one of",
        ),
        (
            json!({"structured_outputs": {"xml": "a"}}),
            "structured_outputs",
            "xml",
        ),
    ];
    for (extra, param, says) in refused {
        let r = completion(&s, extra.clone());
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{extra}: {msg}");
    }
    // Off values are accepted.
    for extra in [
        json!({"response_format": {"type": "text"}}),
        json!({"response_format": null}),
    ] {
        assert_eq!(completion(&s, extra.clone()).status, 200, "{extra}");
    }
}

/// A grammar whose only ending is forbidden (min_tokens, ignore_eos) ends
/// the request with a clear error, at once, streamed or not: never a loop
/// to max_tokens, never a 5xx.
#[test]
fn a_grammar_dead_end_ends_the_request_with_a_clear_error() {
    let s = TestServer::tiny(&[]);
    for extra in [
        json!({"guided_choice": ["ab"], "min_tokens": 10, "max_tokens": 400}),
        json!({"guided_regex": "a{2}", "ignore_eos": true, "max_tokens": 400}),
    ] {
        let r = completion(&s, extra.clone());
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains("dead end"), "{msg}");
        let mut sx = extra.clone();
        sx["stream"] = json!(true);
        let mut body = json!({"prompt": "abc", "temperature": 1});
        for (k, v) in sx.as_object().unwrap() {
            body[k] = v.clone();
        }
        let events = s.stream("/v1/completions", &body);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("dead end"),
            "{err}"
        );
        let tokens = events.len() - 2;
        assert!(
            tokens < 10,
            "stopped at the dead end, not max_tokens: {tokens} chunks"
        );
    }
    s.wait_idle();
}
