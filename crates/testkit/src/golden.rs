//! Golden outputs produced by `tests/oracle/make_goldens.py` and helpers to use them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::spec::spec_by_name;
use crate::write_model;

/// Versions of the reference implementation that produced a golden file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generator {
    pub torch: String,
    pub transformers: String,
}

/// One raw-text prompt and what transformers computed for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenPrompt {
    pub text: String,
    /// `tokenizer(text).input_ids`, special tokens included as the tokenizer adds them.
    pub ids: Vec<u32>,
    /// f32 logits at the last position of a forward pass over `ids`.
    pub last_logits: Vec<f32>,
    /// Greedy continuation (full recompute each step).
    pub greedy: Vec<u32>,
    /// Top-1 minus top-2 logit at each greedy step; small margins may legitimately flip.
    pub greedy_margins: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A conversation and `apply_chat_template(..., add_generation_prompt=True)` ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenChat {
    pub messages: Vec<ChatMessage>,
    pub ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Golden {
    pub model: String,
    pub generator: Generator,
    /// sha256 (hex) of every file the test kit wrote, by file name relative to the model dir.
    pub files: BTreeMap<String, String>,
    pub prompts: Vec<GoldenPrompt>,
    pub chat: Vec<GoldenChat>,
}

/// Largest absolute difference between two logit vectors; a NaN on either side is infinitely far.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit vectors differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

/// `<workspace root>/tests/goldens`.
pub fn goldens_dir() -> PathBuf {
    // CARGO_MANIFEST_DIR is <root>/crates/testkit.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.ancestors().nth(2).unwrap_or(manifest).join("tests/goldens")
}

pub fn load_golden(name: &str) -> Result<Golden> {
    let path = goldens_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading golden {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing golden {}", path.display()))
}

/// sha256 of every regular file directly inside `dir`, by file name.
pub fn file_hashes(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let bytes = std::fs::read(entry.path()).with_context(|| format!("reading {}", entry.path().display()))?;
        let hex: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        out.insert(entry.file_name().to_string_lossy().into_owned(), hex);
    }
    Ok(out)
}

/// Writes golden model `name` into a fresh temp dir and checks that its files are exactly
/// the ones the golden was computed from. Keep the `TempDir` alive while using the path.
pub fn materialize(name: &str) -> Result<(tempfile::TempDir, Golden)> {
    let golden = load_golden(name)?;
    let spec = spec_by_name(name).with_context(|| format!("no test kit spec named {name}"))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("quiver-{name}-"))
        .tempdir()
        .context("creating temp dir")?;
    write_model(&spec, dir.path())?;
    let hashes = file_hashes(dir.path())?;
    if let Some(diffs) = hash_diffs(&hashes, &golden.files) {
        bail!(
            "model files for {name} differ from the ones its golden was computed on \
             ({diffs}). The test kit changed: regenerate the goldens with \
             `python tests/oracle/make_goldens.py` (see its docstring) and commit them."
        );
    }
    Ok((dir, golden))
}

/// What differs between the written files' hashes and the golden's, or `None`.
pub(crate) fn hash_diffs(hashes: &BTreeMap<String, String>, golden: &BTreeMap<String, String>) -> Option<String> {
    if hashes == golden {
        return None;
    }
    let mut diffs = Vec::new();
    for (f, h) in golden {
        match hashes.get(f) {
            None => diffs.push(format!("{f}: missing")),
            Some(x) if x != h => diffs.push(format!("{f}: sha256 {x}, golden {h}")),
            _ => {}
        }
    }
    diffs.extend(
        hashes
            .keys()
            .filter(|f| !golden.contains_key(*f))
            .map(|f| format!("{f}: not in golden")),
    );
    Some(diffs.join("; "))
}
