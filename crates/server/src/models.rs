//! Model names: the base model's, loaded adapters', and (with `--adapter-root`) adapters loaded
//! from disk on first use or through the admin API.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use quiver_adapters::load_peft_adapter;

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
    let known = state.adapters.read().map(|a| a.contains_key(name)).unwrap_or(false);
    if !known {
        let root = state
            .adapter_root
            .as_ref()
            .ok_or_else(|| ApiError::ModelNotFound(name.into()))?;
        let dir = safe_join(root, name).map_err(|_| ApiError::ModelNotFound(name.into()))?;
        if !dir.join("adapter_config.json").is_file() {
            return Err(ApiError::ModelNotFound(name.into()));
        }
        if let Err(e) = load(state, name, dir).await {
            // A concurrent request may have loaded it first; that is fine.
            if !state.adapters.read().map(|a| a.contains_key(name)).unwrap_or(false) {
                return Err(e);
            }
        }
    }
    Ok((name.to_string(), Some(name.to_string())))
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

/// Loads and validates the adapter fully, then makes the name visible.
pub async fn load(state: &Arc<AppState>, name: &str, dir: PathBuf) -> Result<(), ApiError> {
    let cfg = state.model_cfg.clone();
    let (n, d) = (name.to_string(), dir.clone());
    let host = tokio::task::spawn_blocking(move || load_peft_adapter(&n, &d, &cfg))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::bad(e.to_string()))?;
    state
        .engine
        .register_loaded_adapter(name, dir.clone(), false, Arc::new(host))?
        .await
        .map_err(|_| ApiError::Unavailable)??;
    if let Ok(mut a) = state.adapters.write() {
        a.insert(name.to_string(), dir);
    }
    Ok(())
}
