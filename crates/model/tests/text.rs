//! Tokenizer, incremental detokenization and chat-template helpers.

use quiver_model::chat::strftime;
use quiver_model::{ChatTemplate, IncrementalDecoder, ModelError, Tokenizer};
use quiver_testkit::{spec_by_name, write_model, CORPUS};
use serde_json::json;

fn tokenizer() -> (tempfile::TempDir, Tokenizer) {
    let dir = tempfile::tempdir().unwrap();
    write_model(&spec_by_name("qwen2-f32-tied").unwrap(), dir.path()).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    (dir, tok)
}

/// Streaming piece by piece reproduces the full decode, and no piece carries a broken UTF-8
/// sequence, even where one character spans several byte-level tokens.
#[test]
fn incremental_decoding_never_splits_characters() {
    let (_d, tok) = tokenizer();
    let text = "Grüße aus Köln — 東京で会いましょう 🎉🦀 and ελληνικά. ";
    let ids = tok.encode(text, false).unwrap();
    let split_chars = ids
        .iter()
        .filter(|&&id| tok.decode(&[id], false).unwrap().contains('\u{FFFD}'))
        .count();
    assert!(split_chars > 0, "the test needs tokens that are partial characters");
    let mut dec = IncrementalDecoder::new(false);
    let mut streamed = String::new();
    for &id in &ids {
        if let Some(piece) = dec.push(&tok, id).unwrap() {
            assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} has a broken character");
            streamed.push_str(&piece);
        }
    }
    streamed.extend(dec.flush(&tok).unwrap());
    assert_eq!(streamed, tok.decode(&ids, false).unwrap());
    assert_eq!(streamed, text);
}

#[test]
fn tokenizer_round_trips_corpus() {
    let (_d, tok) = tokenizer();
    let ids = tok.encode(CORPUS, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), CORPUS);
}

fn template(src: &str) -> ChatTemplate {
    ChatTemplate::new(src.to_string(), "<s>".into(), "</s>".into()).unwrap()
}

#[test]
fn template_helpers() {
    let t = template(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('role ' + m.role + ' not allowed') }}{% endif %}\
         {% if loop.index0 == 2 %}{% break %}{% endif %}[{{ m.role | upper }}]{{ m.content.strip() }}{{ eos_token }}{% endfor %}\
         {% if add_generation_prompt %}>{% endif %}",
    );
    let msgs = [
        json!({"role": "user", "content": " hi "}),
        json!({"role": "assistant", "content": "yo"}),
        json!({"role": "user", "content": "cut"}),
    ];
    assert_eq!(
        t.render(&msgs, true, None).unwrap(),
        "<s>[USER]hi</s>[ASSISTANT]yo</s>>"
    );
    match t.render(&[json!({"role": "bad", "content": ""})], false, None) {
        Err(ModelError::ChatTemplate(msg)) => assert!(msg.contains("role bad not allowed"), "{msg}"),
        other => panic!("expected the template's exception, got {other:?}"),
    }
}

#[test]
fn tojson_uses_python_separators() {
    let t = template("{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}");
    let tools = json!([{"name": "f", "args": [1, "é"]}]);
    assert_eq!(
        t.render(&[], false, Some(&tools)).unwrap(),
        "[{\"args\": [1, \"é\"], \"name\": \"f\"}]|{\n  \"args\": [\n    1,\n    \"é\"\n  ],\n  \"name\": \"f\"\n}"
    );
}

#[test]
fn strftime_formats_utc_dates() {
    // 2024-07-26 13:05:09 UTC, a Friday.
    let t = 1_721_999_109;
    assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
    assert_eq!(strftime("%A %B %-d, %H:%M:%S %%", t), "Friday July 26, 13:05:09 %");
    assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
    assert!(!template("{{ strftime_now('%Y') }}")
        .render(&[], false, None)
        .unwrap()
        .is_empty());
}

#[test]
fn trims_blocks_like_transformers() {
    let t = template("{% for m in messages %}\n  {{ m.content }}\n{% endfor %}");
    assert_eq!(
        t.render(&[json!({"content": "a"}), json!({"content": "b"})], false, None)
            .unwrap(),
        "  a\n  b\n"
    );
}

/// transformers 5 saves the template as `chat_template.jinja`; it wins over tokenizer_config.json.
#[test]
fn chat_template_jinja_file_takes_precedence() {
    let dir = tempfile::tempdir().unwrap();
    write_model(&spec_by_name("qwen2-f32-tied").unwrap(), dir.path()).unwrap();
    let from_config = ChatTemplate::from_dir(dir.path())
        .unwrap()
        .expect("the test kit writes a template");
    let msgs = [json!({"role": "user", "content": "hi"})];
    assert!(from_config
        .render(&msgs, true, None)
        .unwrap()
        .contains("<|im_start|>user"));
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{{ messages[0].content | upper }}!",
    )
    .unwrap();
    let from_file = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
    assert_eq!(from_file.render(&msgs, true, None).unwrap(), "HI!");
}
