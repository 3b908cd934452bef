//! Structure-aware fuzzing of the two generation endpoints, bounded for CI: bodies grown from valid
//! requests by random mutations (wrong types, extreme numbers, unknown and duplicate fields, odd
//! `messages` entries, deep nesting, truncation, bytes that are not UTF-8). Every answer must be a
//! 2xx that parses, or a 4xx in OpenAI's error format; never a 5xx, a panic or a hang; and the server
//! must still serve a normal request afterwards. `QUIVER_FUZZ_CASES` and `QUIVER_FUZZ_SEED` run more
//! or other cases; a failure prints its seed and body so it can be replayed.

mod common;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use common::{error_code, http_bytes, json_of, server};
use serde_json::{json, Map, Value};

/// splitmix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Every field the server knows, and one it does not.
static FIELDS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    use quiver_server::openai::request::{CHAT, COMMON, COMPLETION};
    [COMMON, COMPLETION, CHAT, &["no_such_field"]].concat()
});

fn scalar(rng: &mut Rng) -> Value {
    match rng.below(16) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(0),
        3 => json!(-1),
        4 => json!(1),
        5 => json!(rng.below(300)),
        6 => json!(1e308),
        7 => json!(-1e308),
        8 => json!(u64::MAX),
        9 => json!(i64::MIN),
        10 => json!(0.5),
        11 => json!(""),
        12 => json!("hello"),
        13 => json!("\u{0}\u{ffff}🦀 \" \\ \n"),
        14 => json!("x".repeat(rng.below(5000))),
        _ => json!("base"),
    }
}

fn value(rng: &mut Rng, depth: usize) -> Value {
    if depth > 3 {
        return scalar(rng);
    }
    match rng.below(6) {
        0 => Value::Array((0..rng.below(4)).map(|_| value(rng, depth + 1)).collect()),
        1 => {
            let mut m = Map::new();
            for _ in 0..rng.below(3) {
                m.insert(rng.pick(&FIELDS).to_string(), value(rng, depth + 1));
            }
            Value::Object(m)
        }
        2 => json!([[5, 6, 7], [9, 10]]),
        3 => json!([rng.below(1 << 20), 3, 4]),
        _ => scalar(rng),
    }
}

fn message(rng: &mut Rng) -> Value {
    let role = *rng.pick(&["system", "user", "assistant", "tool", "developer", "hacker", ""]);
    match rng.below(9) {
        0 => scalar(rng),
        1 => json!({}),
        2 => json!({"role": 5, "content": "hi"}),
        3 => json!({"role": role}),
        4 => json!({"role": role, "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}),
        5 => json!({"role": role, "content": [{"type": "text", "text": "hi"}]}),
        6 => json!({"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                    "function": {"name": "f", "arguments": "{}"}}]}),
        7 => json!({"role": role, "content": value(rng, 2)}),
        _ => json!({"role": role, "content": "Say something."}),
    }
}

fn mutate(rng: &mut Rng, body: &mut Map<String, Value>, chat: bool) {
    match rng.below(10) {
        0 => {
            let k = rng.pick(&FIELDS).to_string();
            body.remove(&k);
        }
        1 | 2 if chat => {
            let msgs: Vec<Value> = (0..rng.below(4)).map(|_| message(rng)).collect();
            body.insert("messages".into(), Value::Array(msgs));
        }
        3 => {
            body.insert("stream".into(), json!(true));
        }
        _ => {
            let k = rng.pick(&FIELDS).to_string();
            body.insert(k, value(rng, 0));
        }
    }
}

/// A body and whether it went to the chat endpoint.
fn case(rng: &mut Rng) -> (bool, Vec<u8>) {
    let chat = rng.below(2) == 0;
    let mut body = if chat {
        json!({"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    } else {
        json!({"model": "base", "prompt": "Hello", "max_tokens": 4})
    };
    let obj = body.as_object_mut().expect("a literal object");
    for _ in 0..1 + rng.below(4) {
        mutate(rng, obj, chat);
    }
    // Keep each case cheap: generation length is what validation bounds anyway.
    if let Some(Value::Number(n)) = obj.get("max_tokens") {
        if n.as_u64().is_some_and(|n| n > 16) && rng.below(4) > 0 {
            obj.insert("max_tokens".into(), json!(16));
        }
    }
    let mut bytes = serde_json::to_vec(&body).expect("JSON values serialize");
    match rng.below(20) {
        0 => bytes.truncate(rng.below(bytes.len())),
        1 => bytes = format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
        2 => bytes.splice(1..1, b"\"model\": 1, ".iter().copied()).for_each(drop),
        3 => bytes.extend_from_slice(&[0xff, 0xfe]),
        4 => bytes = b"not json".to_vec(),
        _ => {}
    }
    (chat, bytes)
}

fn check(status: u16, body: &str, stream: bool) -> Result<()> {
    match status {
        200 if stream => {
            let mut done = false;
            for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    done = true;
                } else {
                    json_of(data)?;
                }
            }
            ensure!(done || body.contains("\"error\""), "a stream without [DONE]: {body}");
        }
        200 => {
            ensure!(json_of(body)?["choices"].is_array(), "200 without choices: {body}");
        }
        400..=499 => {
            error_code(status, body)?;
        }
        s => bail!("status {s}: {body}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_bodies_get_a_clean_answer_and_the_server_keeps_serving() -> Result<()> {
    let srv = server(None, 64).await?;
    let cases: usize = std::env::var("QUIVER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("QUIVER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x0f0e);
    let mut rng = Rng(seed);
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for i in 0..cases {
        let (chat, body) = case(&mut rng);
        let path = if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let stream = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("stream").and_then(Value::as_bool))
            .unwrap_or(false);
        let shown = String::from_utf8_lossy(&body[..body.len().min(2000)]).into_owned();
        let (status, text) = tokio::time::timeout(Duration::from_secs(60), http_bytes(srv.addr, "POST", path, &body))
            .await
            .with_context(|| format!("case {i} (seed {seed}) hung: {path} {shown}"))??;
        check(status, &text, stream).with_context(|| format!("case {i} (seed {seed}): {path} {shown}"))?;
        *statuses.entry(status).or_default() += 1;
    }
    eprintln!("statuses: {statuses:?}");
    ensure!(
        statuses.get(&200).copied().unwrap_or(0) > 0,
        "no case succeeded: {statuses:?}"
    );
    ensure!(
        statuses.get(&400).copied().unwrap_or(0) > 0,
        "no case was refused: {statuses:?}"
    );
    let ok = br#"{"model": "base", "prompt": "Hello", "max_tokens": 2}"#;
    let (status, text) = http_bytes(srv.addr, "POST", "/v1/completions", ok).await?;
    ensure!(status == 200, "a normal request after fuzzing: {status} {text}");
    Ok(())
}
