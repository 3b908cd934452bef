//! Model names, keys and the admin side: `/v1/models`, vLLM's runtime load/unload endpoints,
//! `/v1/lora_adapters` (tiers), `/health`, `/metrics`.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use quiver_adapters::load_peft_adapter;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::routes::parse;
use crate::state::AppState;

/// Checks `Authorization: Bearer <key>`: admin endpoints want the admin key when one is set
/// (else the API key), the others the API key when one is set.
pub fn check_key(state: &AppState, headers: &HeaderMap, admin: bool) -> Result<(), ApiError> {
    let want = if admin {
        state.admin_key.as_ref().or(state.api_key.as_ref())
    } else {
        state.api_key.as_ref()
    };
    let Some(want) = want else { return Ok(()) };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time comparison: do not leak the key's prefix through timing.
    let ok = got.is_some_and(|g| {
        g.len() == want.len() && g.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

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
fn safe_join(root: &Path, rel: &str) -> Result<PathBuf, ApiError> {
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
async fn load(state: &Arc<AppState>, name: &str, dir: PathBuf) -> Result<(), ApiError> {
    let cfg = state.model_cfg.clone();
    let (n, d) = (name.to_string(), dir.clone());
    let host = tokio::task::spawn_blocking(move || load_peft_adapter(&n, &d, &cfg))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::bad(e.to_string()))?;
    if host.max_rank() > state.limits.max_lora_rank {
        return Err(ApiError::bad(format!(
            "adapter `{name}` has rank {}, above --max-lora-rank {}",
            host.max_rank(),
            state.limits.max_lora_rank
        )));
    }
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

#[derive(Deserialize)]
struct LoadBody {
    lora_name: Option<String>,
    lora_path: Option<String>,
}

pub async fn load_lora_adapter(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = async {
        check_key(&state, &headers, true)?;
        let b: LoadBody = parse(&body)?;
        let name = b
            .lora_name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::param("lora_name", "lora_name is required"))?;
        let path = b
            .lora_path
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ApiError::param("lora_path", "lora_path is required"))?;
        if name == state.served_name || state.adapters.read().map(|a| a.contains_key(&name)).unwrap_or(false) {
            return Err(ApiError::param(
                "lora_name",
                format!("The lora adapter '{name}' has already been loaded."),
            ));
        }
        let root = state.adapter_root.as_ref().ok_or_else(|| {
            ApiError::bad("runtime adapter loading is disabled: start the server with --adapter-root")
        })?;
        let dir = safe_join(root, &path)?;
        load(&state, &name, dir).await?;
        Ok::<_, ApiError>(format!("Success: LoRA adapter '{name}' added successfully."))
    }
    .await;
    match r {
        Ok(msg) => (StatusCode::OK, msg).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct UnloadBody {
    lora_name: Option<String>,
}

pub async fn unload_lora_adapter(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = async {
        check_key(&state, &headers, true)?;
        let b: UnloadBody = parse(&body)?;
        let name = b
            .lora_name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::param("lora_name", "lora_name is required"))?;
        let known = state
            .adapters
            .write()
            .map(|mut a| a.remove(&name).is_some())
            .unwrap_or(false);
        if !known {
            return Err(ApiError::NotFound(format!(
                "The lora adapter '{name}' cannot be found."
            )));
        }
        state
            .engine
            .unregister_adapter(&name)?
            .await
            .map_err(|_| ApiError::Unavailable)??;
        Ok::<_, ApiError>(format!("Success: LoRA adapter '{name}' removed successfully."))
    }
    .await;
    match r {
        Ok(msg) => (StatusCode::OK, msg).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&state, &headers, false) {
        return e.into_response();
    }
    let card = |id: &str, root: &str, parent: Option<&str>| {
        json!({"id": id, "object": "model", "created": state.created, "owned_by": "quiver", "root": root, "parent": parent,
               "max_model_len": state.limits.max_model_len})
    };
    let mut data = vec![card(&state.served_name, &state.model_path, None)];
    if let Ok(a) = state.adapters.read() {
        for (name, path) in a.iter() {
            data.push(card(name, &path.display().to_string(), Some(&state.served_name)));
        }
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

pub async fn lora_adapters(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = async {
        check_key(&state, &headers, true)?;
        let infos = state.engine.adapters()?.await.map_err(|_| ApiError::Unavailable)?;
        let data: Vec<_> = infos
            .iter()
            .map(|a| {
                json!({"name": a.name, "path": a.path, "tier": format!("{:?}", a.tier).to_lowercase(), "rank": a.rank,
                       "bytes": a.bytes, "pinned": a.pinned, "in_flight": a.in_flight})
            })
            .collect();
        Ok::<_, ApiError>(json!({"object": "list", "data": data}))
    }
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return ApiError::Unavailable.into_response();
    }
    let alive = match state.engine.stats() {
        Ok(rx) => rx.await.is_ok(),
        Err(_) => false,
    };
    if alive {
        StatusCode::OK.into_response()
    } else {
        ApiError::Unavailable.into_response()
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let r = async {
        let stats = state.engine.stats()?.await.map_err(|_| ApiError::Unavailable)?;
        let adapters = state.engine.adapters()?.await.map_err(|_| ApiError::Unavailable)?;
        Ok::<_, ApiError>(
            state
                .metrics
                .render(&stats, &adapters, state.limits.max_loras, &state.served_name),
        )
    }
    .await;
    match r {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => e.into_response(),
    }
}
