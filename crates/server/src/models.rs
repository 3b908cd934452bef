//! Model names: the base model's, loaded adapters', and (with `--adapter-root`) adapters loaded
//! from disk on first use or through the admin API.

mod loader;

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use loader::{load_admin, unload, AdapterLoader, AdapterLoading};

use crate::error::ApiError;
use crate::state::AppState;

/// `(name to echo, adapter)`: the base model's name (or no name) means no adapter. An unknown
/// name that is a directory under `--adapter-root` is loaded on first use.
pub async fn resolve_model(state: &Arc<AppState>, model: Option<&str>) -> Result<(String, Option<String>), ApiError> {
    if state.draining.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable);
    }
    let name = match model {
        None => return Ok((state.served_name.clone(), None)),
        Some(n) if n == state.served_name || n == state.model_path => return Ok((n.to_string(), None)),
        Some(n) => n,
    };
    if state.adapters.read().map(|a| a.contains_key(name)).unwrap_or(false) {
        state.loader.touch(name);
        return Ok((name.to_string(), Some(name.to_string())));
    }
    let dir = state
        .adapter_root
        .as_deref()
        .and_then(|root| jit_dir(root, name))
        .ok_or_else(|| ApiError::ModelNotFound(name.into()))?;
    let adapter = loader::just_in_time(state, name, dir).await?;
    Ok((name.to_string(), Some(adapter)))
}

/// The adapter directory a just-in-time `name` stands for: `name` must be one plain directory
/// name (not empty, no `/` or `\`, not `.` or `..`, hence never absolute), and `root/name`,
/// symlinks resolved, a directory strictly inside the root holding an `adapter_config.json`.
/// The canonical path is the adapter's identity: two names for one directory are one adapter.
pub fn jit_dir(root: &Path, name: &str) -> Option<PathBuf> {
    let plain =
        !name.is_empty() && name.len() <= 255 && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
    if !plain {
        return None;
    }
    let root = root.canonicalize().ok()?;
    let dir = root.join(name).canonicalize().ok()?;
    (dir.starts_with(&root) && dir != root && dir.join("adapter_config.json").is_file()).then_some(dir)
}

/// `root/rel` if it stays inside `root` after resolving `..` and symlinks.
pub fn safe_join(root: &Path, rel: &str) -> Result<PathBuf, ApiError> {
    let rel_path = Path::new(rel);
    if rel_path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ApiError::param("lora_path", "lora_path must not contain `..`"));
    }
    let root = root
        .canonicalize()
        .map_err(|e| ApiError::Internal(format!("--adapter-root: {e}")))?;
    let joined = if rel_path.is_absolute() {
        rel_path.to_path_buf()
    } else {
        root.join(rel_path)
    };
    let real = joined
        .canonicalize()
        .map_err(|_| ApiError::param("lora_path", format!("{rel}: no such adapter directory")))?;
    if !real.starts_with(&root) {
        return Err(ApiError::param(
            "lora_path",
            format!("{rel} is outside the adapter root"),
        ));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jit_names_are_plain_directory_names() -> std::io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("a"))?;
        std::fs::write(root.join("a/adapter_config.json"), "{}")?;
        std::fs::create_dir_all(root.join("nested/b"))?;
        std::fs::write(root.join("nested/b/adapter_config.json"), "{}")?;
        std::os::unix::fs::symlink(root.join("a"), root.join("alias"))?;
        std::fs::create_dir_all(tmp.path().join("outside"))?;
        std::fs::write(tmp.path().join("outside/adapter_config.json"), "{}")?;
        std::os::unix::fs::symlink(tmp.path().join("outside"), root.join("out"))?;
        let a = root.join("a").canonicalize()?;
        assert_eq!(jit_dir(&root, "a"), Some(a.clone()));
        assert_eq!(
            jit_dir(&root, "alias"),
            Some(a.clone()),
            "a symlink is the same adapter"
        );
        let abs = a.display().to_string();
        for bad in [
            "",
            ".",
            "..",
            "a/",
            "./a",
            "a/.",
            "nested/b",
            "../root/a",
            abs.as_str(),
            "out",
            "missing",
        ] {
            assert_eq!(jit_dir(&root, bad), None, "{bad:?}");
        }
        Ok(())
    }
}
