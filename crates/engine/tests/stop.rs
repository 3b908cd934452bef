//! Stop strings on a streamed text: hand cases and a split-invariance property.

use proptest::prelude::*;
use quiver_engine::stop::{StopError, StopMatcher, StopOutput};

fn matcher(stops: &[&str]) -> StopMatcher {
    StopMatcher::new(stops.iter().map(|s| s.to_string()).collect()).unwrap()
}

/// Feeds `pieces`, checking nothing is emitted after a stop; returns (all emitted text, stop index).
fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
    let mut m = matcher(stops);
    let mut out = String::new();
    let mut first = None;
    for p in pieces {
        let o = m.push(p);
        if first.is_some() {
            assert_eq!(
                o,
                StopOutput {
                    emit: String::new(),
                    stopped: first
                }
            );
        }
        out.push_str(&o.emit);
        first = first.or(o.stopped);
    }
    out.push_str(&m.finish());
    if first.is_some() {
        assert_eq!(m.stopped(), first);
    }
    (out, m.stopped())
}

fn out(emit: &str, stopped: Option<usize>) -> StopOutput {
    StopOutput {
        emit: emit.to_string(),
        stopped,
    }
}

#[test]
fn no_stops_passes_everything_through() {
    let mut m = matcher(&[]);
    assert_eq!(m.push("hello "), out("hello ", None));
    assert_eq!(m.push("world"), out("world", None));
    assert_eq!(m.finish(), "");
}

#[test]
fn match_inside_one_piece() {
    let mut m = matcher(&["STOP"]);
    assert_eq!(m.push("abc STOP def"), out("abc ", Some(0)));
    assert_eq!(m.push("more"), out("", Some(0)));
    assert_eq!(m.finish(), "");
    assert_eq!(m.stopped(), Some(0));
    // A stop at the very start emits nothing.
    assert_eq!(matcher(&["x"]).push("xyz"), out("", Some(0)));
}

#[test]
fn match_across_pieces() {
    let mut m = matcher(&["</answer>"]);
    assert_eq!(m.push("42 </"), out("42 ", None));
    assert_eq!(m.held(), "</");
    assert_eq!(m.push("ans"), out("", None));
    assert_eq!(m.push("wer> trailing"), out("", Some(0)));
    assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".to_string(), Some(0)));
}

#[test]
fn held_prefix_is_released_when_it_stops_matching() {
    let mut m = matcher(&["abc"]);
    assert_eq!(m.push("xa"), out("x", None));
    assert_eq!(m.push("b"), out("", None));
    assert_eq!(m.push("d"), out("abd", None));
    // A failed prefix may itself contain the start of a new match.
    assert_eq!(m.push("aab"), out("a", None));
    assert_eq!(m.held(), "ab");
    assert_eq!(m.push("ab"), out("ab", None));
    assert_eq!(m.finish(), "ab");
    assert_eq!(m.stopped(), None);
}

#[test]
fn earliest_match_wins_among_several_stops() {
    // Both complete in the same piece: the earlier start wins, whatever the list order.
    let mut m = matcher(&["world", "lo"]);
    assert_eq!(m.push("hello world"), out("hel", Some(1)));
    // "c" completes first but "abcd" started earlier; the earlier one is waited for…
    let mut m = matcher(&["abcd", "c"]);
    assert_eq!(m.push("xab"), out("x", None));
    assert_eq!(m.push("c"), out("", None));
    assert_eq!(m.push("d!"), out("", Some(0)));
    // …and when it fails to complete, the later match still applies.
    assert_eq!(run(&["abcd", "c"], &["xab", "c", "e"]), ("xab".to_string(), Some(1)));
    // Or the stream ends: finish() cuts at the completed match.
    let mut m = matcher(&["abcd", "c"]);
    assert_eq!(m.push("xabc"), out("x", None));
    assert_eq!(m.finish(), "ab");
    assert_eq!(m.stopped(), Some(1));
    // Same start: the shorter one completes first and wins.
    assert_eq!(run(&["ab", "a"], &["zab"]), ("z".to_string(), Some(1)));
    assert_eq!(run(&["a", "a"], &["zab"]), ("z".to_string(), Some(0)));
}

#[test]
fn multibyte_text_is_never_split() {
    let mut m = matcher(&["日本語", "🙂!"]);
    assert_eq!(m.push("こんにちは日本"), out("こんにちは", None));
    assert_eq!(m.push("人"), out("日本人", None));
    assert_eq!(m.push("🙂"), out("", None));
    assert_eq!(m.push("?é"), out("🙂?é", None));
    assert_eq!(m.push("x日本語y"), out("x", Some(0)));
    // Stops sharing a leading byte sequence with the text but not a character don't hold it.
    let mut m = matcher(&["é"]);
    assert_eq!(m.push("è"), out("è", None));
    assert_eq!(run(&["ß"], &["aßb"]), ("a".to_string(), Some(0)));
}

#[test]
fn finish_returns_held_text() {
    let mut m = matcher(&["END"]);
    assert_eq!(m.push("the EN"), out("the ", None));
    assert_eq!(m.finish(), "EN");
    assert_eq!(m.stopped(), None);
}

#[test]
fn empty_stop_strings_are_rejected() {
    let err = StopMatcher::new(vec!["ok".into(), String::new()]).unwrap_err();
    assert_eq!(err, StopError::Empty(1));
    assert!(err.to_string().contains("stop[1]"));
}

/// Text cut at the earliest occurrence (ties: shortest, then lowest index), and that index.
fn reference(text: &str, stops: &[String]) -> (String, Option<usize>) {
    stops
        .iter()
        .enumerate()
        .filter_map(|(i, s)| text.find(s.as_str()).map(|pos| (pos, s.len(), i)))
        .min()
        .map_or((text.to_string(), None), |(pos, _, i)| {
            (text[..pos].to_string(), Some(i))
        })
}

/// Tiny alphabets (with multi-byte chars) so stop strings occur, overlap and share prefixes.
fn text_from(alphabet: &[char], idx: &[usize]) -> String {
    idx.iter().map(|&i| alphabet[i % alphabet.len()]).collect()
}

const ALPHABETS: [&[char]; 3] = [&['a', 'b'], &['a', 'é', '🙂'], &['a', 'b', 'a', 'é', '日', '🙂']];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn output_is_the_text_cut_at_the_first_stop(
        alphabet in 0usize..3,
        text in prop::collection::vec(0usize..6, 0..40),
        stops in prop::collection::vec(prop::collection::vec(0usize..6, 1..5), 0..4),
        cuts in prop::collection::vec(0usize..40, 0..12),
    ) {
        let alphabet = ALPHABETS[alphabet];
        let text = text_from(alphabet, &text);
        let stops: Vec<String> = stops.iter().map(|s| text_from(alphabet, s)).collect();
        // Split at random char positions.
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let mut bounds: Vec<usize> = cuts.iter().filter(|&&c| c < chars.len()).map(|&c| chars[c].0).collect();
        bounds.extend([0, text.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        let pieces: Vec<&str> = bounds.windows(2).map(|w| &text[w[0]..w[1]]).collect();

        let stop_refs: Vec<&str> = stops.iter().map(String::as_str).collect();
        let got = run(&stop_refs, &pieces);
        prop_assert_eq!(got, reference(&text, &stops));
    }
}
