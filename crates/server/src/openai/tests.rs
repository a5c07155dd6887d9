//! Reading request bodies: what each shape becomes, what is refused, and
//! that a large body costs about its own size in memory, never a tree.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use serde_json::{Value, json};

use super::{ChatRequest, CompletionRequest, Prompt, Stop};

/// Counts the bytes live on each thread, and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call goes to `System` unchanged; the counting touches only
// const-initialized thread locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size() as isize);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(-(l.size() as isize));
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new as isize - l.size() as isize);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The most bytes `f` had live at once on this thread, above what was
/// live before it.
fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(Cell::get) - base).max(0) as usize)
}

fn chat(body: &Value) -> Result<ChatRequest, String> {
    serde_json::from_value(body.clone()).map_err(|e| e.to_string())
}

fn completion(body: &Value) -> Result<CompletionRequest, String> {
    serde_json::from_value(body.clone()).map_err(|e| e.to_string())
}

/// A body of `bytes` bytes: `head`, then `"key0": value, "key1": value,
/// ...` as needed, then `}`.
fn body(head: &str, value: &str, bytes: usize) -> Vec<u8> {
    let mut b = head.as_bytes().to_vec();
    let mut i = 0;
    while b.len() < bytes {
        b.extend_from_slice(format!("\"junk{i}\": {value}, ").as_bytes());
        i += 1;
    }
    b.extend_from_slice(b"\"max_tokens\": 3}");
    b
}

#[test]
fn fields_become_what_they_say_and_null_is_not_given() {
    let r = chat(&json!({
        "messages": [{"role": "user", "content": "hi"}],
        "logprobs": null, "top_logprobs": 3, "stream": null, "ignore_eos": true,
        "stop": ["a", "b"], "stop_token_ids": [5, 5, 7], "logit_bias": {"5": 1, "05": 2},
        "seed": null, "user": "someone", "metadata": {"any": ["thing"]},
        "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
    }))
    .unwrap();
    assert_eq!(r.messages.len(), 1);
    assert!(!r.logprobs && !r.common.stream && r.common.ignore_eos);
    assert_eq!(r.top_logprobs, Some(3));
    assert!(matches!(&r.common.stop, Some(Stop::Many(v)) if v == &["a", "b"]));
    assert_eq!(r.common.stop_token_ids, Some(vec![5, 5, 7]));
    let mut bias = r.common.logit_bias.clone().unwrap();
    bias.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(bias, [("05".to_string(), 2.0), ("5".to_string(), 1.0)]);
    assert_eq!(r.common.seed, None);
    r.common.unsupported.check().unwrap();

    let c = completion(&json!({"prompt": [1, 2, 3], "echo": null, "logprobs": 2})).unwrap();
    assert!(matches!(c.prompt, Prompt::Tokens(ref v) if v == &[1, 2, 3]));
    assert!(!c.echo);
    for (p, want) in [
        (json!("text"), "Text"),
        (json!(["a", "b"]), "Texts"),
        (json!([[1, 2], [3]]), "TokenLists"),
        (json!([]), "Tokens"),
    ] {
        let c = completion(&json!({ "prompt": p })).unwrap();
        assert!(
            format!("{:?}", c.prompt).starts_with(want),
            "{p}: {:?}",
            c.prompt
        );
    }
}

#[test]
fn bad_shapes_are_refused_naming_what_is_wrong() {
    let user = json!([{"role": "user", "content": "hi"}]);
    for (b, want) in [
        (json!({"model": "x"}), "missing field `messages`"),
        (
            json!({"messages": user, "stop": vec!["s"; 17]}),
            "at most 16 stop strings",
        ),
        (
            json!({"messages": user, "stop_token_ids": vec![1; 257]}),
            "at most 256 items",
        ),
        (json!({"messages": user, "stream": 1}), "invalid type"),
        (json!([1, 2]), "invalid type"),
    ] {
        let e = chat(&b).unwrap_err();
        assert!(e.contains(want), "{b}: {e}");
    }
    // (A JSON value cannot hold a key twice; the text can.)
    let twice = r#"{"messages": [{"role": "user", "content": "hi"}], "n": 1, "n": 2}"#;
    let e = serde_json::from_str::<ChatRequest>(twice).unwrap_err();
    assert!(e.to_string().contains("duplicate field `n`"), "{e}");
    let twice = r#"{"prompt": "a", "logit_bias": {"5": 1, "5": 100}}"#;
    let c = serde_json::from_str::<CompletionRequest>(twice).unwrap();
    assert_eq!(
        c.common.logit_bias.unwrap().len(),
        2,
        "both kept for the check"
    );
    let bias: serde_json::Map<String, Value> =
        (0..1025).map(|i| (i.to_string(), json!(1))).collect();
    let e = chat(&json!({"messages": user, "logit_bias": bias})).unwrap_err();
    assert!(e.contains("at most 1024 entries"), "{e}");
    for (p, want) in [
        (json!([1, "a"]), "one kind"),
        (json!(["a", 1]), "one kind"),
        (json!([1.5]), "invalid type"),
        (json!({"a": 1}), "invalid type"),
        (json!([18446744073709551615u64]), "out of range"),
    ] {
        let e = completion(&json!({ "prompt": p })).unwrap_err();
        assert!(e.contains(want), "{p}: {e}");
    }
    assert!(
        completion(&json!({"echo": true}))
            .unwrap_err()
            .contains("missing field `prompt`")
    );
}

#[test]
fn unsupported_parameters_are_told_from_their_off_values() {
    // Tools are the chat endpoint's: text completions refuse them.
    let refused = |k: &str, v: Value| {
        let mut b = json!({ "prompt": "hi" });
        b[k] = v;
        completion(&b).unwrap().common.unsupported.check().is_err()
    };
    assert!(!refused("tools", json!([])));
    assert!(!refused("tools", Value::Null));
    assert!(refused("tools", json!([{"type": "function"}])));
    assert!(!refused("tool_choice", json!("none")));
    assert!(refused("tool_choice", json!("auto")));
    // Too large to keep is never "off": a long string, a deep or wide value.
    assert!(refused("suffix", json!("x".repeat(100))));
    assert!(refused("tools", json!(vec![json!([]); 100])));
    assert!(refused(
        "tool_choice",
        json!({"type": "function", "junk": vec![0; 50]})
    ));
    let m = |m: Value| {
        chat(&json!({ "messages": [m] })).unwrap().messages[0]
            .text()
            .is_err()
    };
    assert!(!m(
        json!({"role": "assistant", "content": "x", "tool_calls": []})
    ));
    // A tool call without its function is not a tool call.
    assert!(
        chat(&json!({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "a"}]}]}))
            .is_err()
    );
    assert!(m(
        json!({"role": "assistant", "content": "x", "function_call": {"name": "f"}})
    ));
}

/// 4 MiB of fields nobody reads, or of a value only checked for being
/// "off", cost almost nothing; 4 MiB of prompt costs about its own size.
#[test]
fn a_large_body_costs_about_its_size_never_a_tree_of_it() {
    const MIB4: usize = 4 << 20;
    let head = r#"{"messages": [{"role": "user", "content": "hi"}], "#;
    for value in [
        "[0, 0, 0, 0, 0, 0, 0, 0]",
        "{\"a\": {}, \"b\": []}",
        "\"some text\"",
    ] {
        let b = body(head, value, MIB4);
        let (r, bytes) = peak(|| serde_json::from_slice::<ChatRequest>(&b));
        r.unwrap();
        assert!(bytes < 64 << 10, "{value}: {bytes} bytes to skip 4 MiB");
    }
    let tools = format!("{head}\"tools\": [{}0]}}", "{}, ".repeat(MIB4 / 4));
    let (r, bytes) = peak(|| serde_json::from_slice::<ChatRequest>(tools.as_bytes()));
    assert!(r.is_err(), "junk tools are refused as they are read");
    assert!(bytes < 64 << 10, "tools: {bytes} bytes");
    let head = r#"{"prompt": "hi", "#;
    let tools = format!("{head}\"tools\": [{}0]}}", "{}, ".repeat(MIB4 / 4));
    let (r, bytes) = peak(|| serde_json::from_slice::<CompletionRequest>(tools.as_bytes()));
    assert!(r.unwrap().common.unsupported.check().is_err());
    assert!(bytes < 64 << 10, "completion tools: {bytes} bytes");
    // A token-id prompt: 2 bytes of body per id, 8 of memory (the list's
    // doubling may leave up to twice that live at once).
    let ids = format!("{{\"prompt\": [{}1]}}", "1,".repeat(MIB4 / 2));
    let (r, bytes) = peak(|| serde_json::from_slice::<CompletionRequest>(ids.as_bytes()));
    r.unwrap();
    assert!(
        bytes <= 8 * ids.len(),
        "ids: {bytes} bytes for {}",
        ids.len()
    );
    let text = format!("{{\"prompt\": \"{}\"}}", "a".repeat(MIB4));
    let (r, bytes) = peak(|| serde_json::from_slice::<CompletionRequest>(text.as_bytes()));
    r.unwrap();
    assert!(
        bytes <= 2 * text.len(),
        "text: {bytes} bytes for {}",
        text.len()
    );
}

/// A message's content is text or parts, read in place: 4 MiB of parts
/// that are not parts is refused at the first, with almost nothing held;
/// more messages than any context holds are refused as they are read.
#[test]
fn contents_and_messages_are_read_in_place_and_capped() {
    let r = chat(&json!({"messages": [
        {"role": "user", "content": "plain"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]}))
    .unwrap();
    assert_eq!(r.messages[0].text().unwrap(), "plain");
    assert_eq!(r.messages[1].text().unwrap(), "a\nb");
    let junk = format!(
        r#"{{"messages": [{{"role": "user", "content": [{}[]]}}]}}"#,
        "[], ".repeat(1 << 20)
    );
    let (r, bytes) = peak(|| serde_json::from_slice::<ChatRequest>(junk.as_bytes()));
    assert!(r.is_err());
    assert!(bytes < 64 << 10, "content junk: {bytes} bytes");
    let many = format!(
        r#"{{"messages": [{}{{"role": "user", "content": "x"}}]}}"#,
        r#"{"role": "user", "content": "x"}, "#.repeat(super::MAX_MESSAGES)
    );
    let r = serde_json::from_str::<ChatRequest>(&many).unwrap();
    assert_eq!(
        r.messages.len(),
        super::MAX_MESSAGES,
        "the rest skipped unread"
    );
    assert_eq!(r.messages_given, super::MAX_MESSAGES + 1, "and counted");
}
