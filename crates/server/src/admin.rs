//! The admin side: `/v1/models`, vLLM's runtime load/unload endpoints, `/v1/lora_adapters`
//! (tiers), `/health`, `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use quiver_engine::adapters::Tier;
use serde::Deserialize;

use crate::error::ApiError;
use crate::extract::{check_key, json_body, Access};
use crate::models::{load_admin, safe_join, unload};
use crate::openai::response::{AdapterCard, List, ModelCard};
use crate::state::AppState;

#[derive(Deserialize)]
struct LoadBody {
    lora_name: Option<String>,
    lora_path: Option<String>,
    /// SGLang's field: keep the adapter in device memory, never evicted.
    #[serde(default)]
    pinned: bool,
}

pub async fn load_lora_adapter(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let r = async {
        check_key(&state, &headers, Access::Admin)?;
        let b: LoadBody = json_body(&body)?;
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
        load_admin(&state, &name, dir, b.pinned).await?;
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
        check_key(&state, &headers, Access::Admin)?;
        let b: UnloadBody = json_body(&body)?;
        let name = b
            .lora_name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::param("lora_name", "lora_name is required"))?;
        unload(&state, &name).await?;
        Ok::<_, ApiError>(format!("Success: LoRA adapter '{name}' removed successfully."))
    }
    .await;
    match r {
        Ok(msg) => (StatusCode::OK, msg).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_key(&state, &headers, Access::Client) {
        return e.into_response();
    }
    let card = |id: &str, root: String, parent: Option<String>| ModelCard {
        id: id.to_string(),
        object: "model",
        created: state.created,
        owned_by: "quiver",
        root,
        parent,
        max_model_len: state.engine.validator().limits().max_model_len,
    };
    let mut data = vec![card(&state.served_name, state.model_path.clone(), None)];
    if let Ok(a) = state.adapters.read() {
        for (name, path) in a.iter() {
            data.push(card(name, path.display().to_string(), Some(state.served_name.clone())));
        }
    }
    Json(List::new(data)).into_response()
}

pub async fn lora_adapters(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let r = async {
        check_key(&state, &headers, Access::Admin)?;
        let infos = state.engine.adapters()?.await.map_err(|_| ApiError::Unavailable)?;
        let data: Vec<_> = infos
            .into_iter()
            .map(|a| AdapterCard {
                name: a.name,
                path: a.path.display().to_string(),
                tier: tier_name(a.tier),
                rank: a.rank,
                bytes: a.bytes,
                pinned: a.pinned,
                in_flight: a.in_flight,
            })
            .collect();
        Ok::<_, ApiError>(List::new(data))
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

pub fn tier_name(t: Tier) -> &'static str {
    match t {
        Tier::Disk => "disk",
        Tier::Loading => "loading",
        Tier::Host => "host",
        Tier::Device => "device",
    }
}
