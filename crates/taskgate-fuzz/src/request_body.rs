//! Target 1: the generateTask and generateTasks bodies, through the checks their handlers run
//! before the model's own (`api::fuzzing`).
#![allow(clippy::unwrap_used)]

use bolero::{check, TypeGenerator};
use serde_json::{Map, Value};
use taskgate_server::api::fuzzing::{self, MAX_JSON_DEPTH, MAX_JSON_ELEMENTS};

/// Deepest nesting of arrays and objects in `v` (a scalar is depth 0), and its number of values.
fn shape(v: &Value) -> (usize, usize) {
    match v {
        Value::Array(items) => items.iter().fold((1, 1), |(d, n), item| {
            let (id, inn) = shape(item);
            (d.max(id + 1), n + inn)
        }),
        Value::Object(map) => map.values().fold((1, 1), |(d, n), item| {
            let (id, inn) = shape(item);
            (d.max(id + 1), n + inn)
        }),
        _ => (0, 1),
    }
}

/// The promises of both submit routes for one body: a refusal is a 4xx with a message; an
/// accepted body is within the depth and value limits, its callback URL is http(s), and each
/// task input survives the trip through its stored text (`serde_json::to_string`, as
/// `store::rows` writes it) unchanged.
fn check_body(bytes: &[u8]) {
    let single = fuzzing::generate_task(bytes).map(|one| vec![one]);
    let batch = fuzzing::generate_tasks(bytes);
    for outcome in [single, batch] {
        let accepted = match outcome {
            Ok(accepted) => accepted,
            Err(e) => {
                assert!(
                    e.status().is_client_error(),
                    "{:?} for {bytes:?}",
                    e.status()
                );
                assert!(!e.to_string().trim().is_empty());
                continue;
            }
        };
        // serde_json's own recursion limit (128) is above ours, so the accepted text parses here.
        let whole: Value = serde_json::from_slice(bytes).unwrap();
        let (depth, values) = shape(&whole);
        assert!(depth <= MAX_JSON_DEPTH, "accepted depth {depth}");
        assert!(values <= MAX_JSON_ELEMENTS, "accepted {values} values");
        for (input, callback_url) in accepted {
            let stored = serde_json::to_string(&input).unwrap();
            let back: Map<String, Value> = serde_json::from_str(&stored).unwrap();
            assert_eq!(
                back, input,
                "input changed through its stored text {stored}"
            );
            if let Some(url) = callback_url {
                assert!(
                    url.starts_with("http://") || url.starts_with("https://"),
                    "{url}"
                );
            }
        }
    }
}

/// One piece of a JSON-ish text. Rendered by [`render_json`], mostly into well-formed JSON with
/// the fields the submit routes read, sometimes (`Junk`) not.
#[derive(Debug, TypeGenerator)]
enum JsonToken {
    OpenArray,
    OpenObject,
    Close,
    /// So many nested arrays at once: reaches the depth limit, which single tokens rarely do.
    Nest(u8),
    /// An array of so many zeros: approaches the value limit.
    Zeros(u16),
    Key(u8),
    Str(String),
    Int(i64),
    Float(f64),
    Known(u8),
    Junk(String),
}

const KEYS: &[&str] = &[
    "input",
    "tasks",
    "callback_url",
    "request_type",
    "webhook_events",
    "priority",
    "ttl",
    "prompt",
];
const KNOWN: &[&str] = &[
    "true",
    "false",
    "null",
    "\"async\"",
    "\"callback\"",
    "\"https://example.com/hook\"",
    "\"http://127.0.0.1:9/hook\"",
    "\"http://[::ffff:10.0.0.1]/\"",
    "\"completed\"",
    "\"start\"",
    "\"progress\"",
    "\"1h\"",
    "1e400",
    "-0",
    "0.1",
    "\"\\ud800\"",
];

/// Renders tokens as JSON: commas and colons placed, objects given keys, everything closed at
/// the end, and the whole wrapped as a generateTask or generateTasks body when `wrap` says so.
fn render_json(wrap: u8, tokens: &[JsonToken]) -> String {
    #[derive(PartialEq)]
    enum Frame {
        Array,
        Object,
    }
    let mut out = String::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut first = true;
    let mut pending_key: Option<String> = None;
    // Before a value: the separator, and a key when inside an object.
    fn before_value(out: &mut String, stack: &[Frame], first: &mut bool, key: Option<String>) {
        if !stack.is_empty() && !*first {
            out.push(',');
        }
        *first = false;
        if stack.last() == Some(&Frame::Object) {
            out.push_str(&serde_json::to_string(&key.unwrap_or_else(|| "k".into())).unwrap());
            out.push(':');
        }
    }
    match wrap % 4 {
        0 => out.push_str("{\"input\":"),
        1 => out.push_str("{\"tasks\":[{\"input\":"),
        _ => {}
    }
    for token in tokens {
        match token {
            JsonToken::Key(k) if stack.last() == Some(&Frame::Object) => {
                pending_key = Some(KEYS[*k as usize % KEYS.len()].into());
                continue;
            }
            JsonToken::Close => {
                match stack.pop() {
                    Some(Frame::Array) => out.push(']'),
                    Some(Frame::Object) => out.push('}'),
                    None => {}
                }
                first = false;
                continue;
            }
            JsonToken::Junk(s) => {
                out.push_str(s);
                continue;
            }
            _ => {}
        }
        if stack.is_empty() && !out.is_empty() && wrap % 4 > 1 {
            // A second top-level value would only be a syntax error; nest it instead.
            out.insert(0, '[');
            stack.insert(0, Frame::Array);
        }
        before_value(&mut out, &stack, &mut first, pending_key.take());
        match token {
            JsonToken::OpenArray => {
                out.push('[');
                stack.push(Frame::Array);
                first = true;
            }
            JsonToken::OpenObject => {
                out.push('{');
                stack.push(Frame::Object);
                first = true;
            }
            JsonToken::Nest(n) => {
                for _ in 0..*n {
                    out.push('[');
                    stack.push(Frame::Array);
                }
                first = true;
            }
            JsonToken::Zeros(n) => {
                out.push('[');
                for i in 0..*n {
                    out.push_str(if i == 0 { "0" } else { ",0" });
                }
                out.push(']');
            }
            JsonToken::Key(k) => out.push_str(&format!("\"{}\"", KEYS[*k as usize % KEYS.len()])),
            JsonToken::Str(s) => out.push_str(&serde_json::to_string(s).unwrap()),
            JsonToken::Int(i) => out.push_str(&i.to_string()),
            // NaN and infinities render as words that are not JSON: a refusal to check too.
            JsonToken::Float(f) => out.push_str(&f.to_string()),
            JsonToken::Known(k) => out.push_str(KNOWN[*k as usize % KNOWN.len()]),
            JsonToken::Close | JsonToken::Junk(_) => unreachable!(),
        }
    }
    if out.is_empty() {
        out.push_str("{}");
    }
    while let Some(frame) = stack.pop() {
        out.push(if frame == Frame::Array { ']' } else { '}' });
    }
    match wrap % 4 {
        0 => out.push('}'),
        1 => out.push_str("}]}"),
        _ => {}
    }
    out
}

#[test]
fn any_request_body_is_refused_with_a_4xx_or_accepted_within_the_limits() {
    check!().for_each(|bytes: &[u8]| check_body(bytes));
}

#[test]
fn json_shaped_request_bodies_keep_the_limits_and_round_trip_their_input() {
    check!()
        .with_type::<(u8, Vec<JsonToken>)>()
        .for_each(|(wrap, tokens)| check_body(render_json(*wrap, tokens).as_bytes()));
}

#[test]
fn request_bodies_at_the_limits_are_judged_by_them() {
    let nested = |n: usize| {
        format!(
            "{{\"input\":{{\"a\":{}0{}}}}}",
            "[".repeat(n),
            "]".repeat(n)
        )
    };
    // `{"input":{"a":` is two levels, so 62 arrays make 64.
    assert!(fuzzing::generate_task(nested(62).as_bytes()).is_ok());
    assert!(fuzzing::generate_task(nested(63).as_bytes()).is_err());
    let zeros = |n: usize| format!("{{\"input\":{{\"a\":[0{}]}}}}", ",0".repeat(n - 1));
    // The body, input and the array are three values besides the zeros.
    assert!(fuzzing::generate_task(zeros(MAX_JSON_ELEMENTS - 3).as_bytes()).is_ok());
    assert!(fuzzing::generate_task(zeros(MAX_JSON_ELEMENTS - 2).as_bytes()).is_err());
    for body in [nested(63), zeros(MAX_JSON_ELEMENTS - 2)] {
        check_body(body.as_bytes());
    }
}
