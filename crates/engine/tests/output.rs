//! Token ids → text with stop strings, through the test kit's byte-level tokenizer.

use quiver_engine::output::TextStream;
use quiver_model::Tokenizer;
use quiver_testkit::{spec_by_name, write_model};

fn tokenizer() -> (tempfile::TempDir, Tokenizer) {
    let dir = tempfile::tempdir().unwrap();
    write_model(&spec_by_name("qwen2-f32-tied").unwrap(), dir.path()).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    (dir, tok)
}

fn stream(tok: &Tokenizer, text: &str, stops: &[&str]) -> (String, bool) {
    let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect(), false).unwrap();
    let mut out = String::new();
    for id in tok.encode(text, false).unwrap() {
        let piece = s.push(tok, id).unwrap();
        out.push_str(&piece.text);
        if piece.stopped {
            return (out, true);
        }
    }
    out.push_str(&s.finish(tok).unwrap());
    (out, false)
}

#[test]
fn stop_strings_cut_the_text_across_tokens() {
    let (_d, tok) = tokenizer();
    let text = "The café in Köln serves 東京 tea. END OF TEXT and more";
    assert_eq!(
        stream(&tok, text, &["END OF"]),
        ("The café in Köln serves 東京 tea. ".to_string(), true)
    );
    assert_eq!(
        stream(&tok, text, &["東京", "tea"]),
        ("The café in Köln serves ".to_string(), true)
    );
    assert_eq!(stream(&tok, text, &["absent"]), (text.to_string(), false));
    assert_eq!(stream(&tok, text, &[]), (text.to_string(), false));
}
