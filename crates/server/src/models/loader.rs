//! Adapters registered at run time, by the admin API or just in time by a request naming a
//! directory under `--adapter-root`.
//!
//! - One load per directory at a time: concurrent requests for it wait on the same load
//!   (single flight), which runs in its own task so that a client hanging up cannot cancel it.
//! - A failed just-in-time load is remembered for `--adapter-failure-ttl`: requests for that
//!   directory get the same 400 without touching the disk. The admin load endpoint does not
//!   consult it, and clears it when it succeeds.
//! - Registry changes (register, evict, unload) are serialized, so the engine and the names in
//!   `/v1/models` always agree. A just-in-time request gets the adapter once its load completed,
//!   even if an unload ran meanwhile; an unload that lands before the request is queued in the
//!   engine makes that request a clean 404.
//! - At most `--max-jit-adapters` just-in-time adapters stay registered; the least recently used
//!   one that no request is running or waiting on is unregistered to make room. Adapters from
//!   `--lora-modules` or the admin API are never evicted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use quiver_adapters::{load_peft_adapter_with, HostAdapter, LoadLimits};

use crate::error::ApiError;
use crate::state::AppState;

/// The `serve` flags for runtime adapters.
#[derive(Debug, Clone)]
pub struct AdapterLoading {
    /// Just-in-time registered adapters kept at most (`--max-jit-adapters`).
    pub max_jit_adapters: usize,
    /// How long a failed load is remembered (`--adapter-failure-ttl`); zero: not at all.
    pub failure_ttl: Duration,
}

impl Default for AdapterLoading {
    fn default() -> Self {
        AdapterLoading {
            max_jit_adapters: 1000,
            failure_ttl: Duration::from_secs(30),
        }
    }
}

/// The name an adapter was registered under, or why it was not.
type Outcome = Result<String, ApiError>;
type Flight = Shared<BoxFuture<'static, Outcome>>;

/// Who asked for a registration: only just-in-time ones count against the cap and are evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The admin endpoint; `pinned` is its body's field (SGLang's).
    Admin {
        pinned: bool,
    },
    JustInTime,
}

pub struct AdapterLoader {
    opts: AdapterLoading,
    limits: LoadLimits,
    /// Held across every change of the registry (engine and `AppState::adapters` together).
    changes: tokio::sync::Mutex<()>,
    /// Just-in-time registered names → last use (a tick of `clock`).
    jit: Mutex<HashMap<String, u64>>,
    clock: AtomicU64,
    /// Loads in progress, by canonical directory.
    in_flight: Mutex<HashMap<PathBuf, Flight>>,
    /// Failed loads, by canonical directory: when, and the error to answer.
    failures: Mutex<HashMap<PathBuf, (Instant, ApiError)>>,
    attempts: AtomicU64,
}

impl AdapterLoader {
    /// `max_rank` is `--max-lora-rank`, checked before any tensor is read.
    pub fn new(opts: AdapterLoading, max_rank: usize) -> Self {
        AdapterLoader {
            opts,
            limits: LoadLimits {
                max_rank: Some(max_rank),
            },
            changes: tokio::sync::Mutex::new(()),
            jit: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            in_flight: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            attempts: AtomicU64::new(0),
        }
    }

    /// Adapter loads started (files read), successful or not.
    pub fn load_attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Names registered just in time, for tests and logs.
    pub fn jit_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.jit.lock().map(|j| j.keys().cloned().collect()).unwrap_or_default();
        names.sort();
        names
    }

    /// Marks a just-in-time adapter as used now (no-op for other names).
    pub fn touch(&self, name: &str) {
        let tick = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut jit) = self.jit.lock() {
            if let Some(t) = jit.get_mut(name) {
                *t = tick;
            }
        }
    }

    fn cached_failure(&self, dir: &Path) -> Option<ApiError> {
        let mut failures = self.failures.lock().ok()?;
        let (when, err) = failures.get(dir)?;
        if when.elapsed() < self.opts.failure_ttl {
            return Some(err.clone());
        }
        failures.remove(dir);
        None
    }

    fn remember_failure(&self, dir: &Path, err: &ApiError) {
        // Only the adapter's own fault is remembered, not a full server or a shutdown.
        if self.opts.failure_ttl.is_zero() || !matches!(err, ApiError::BadRequest { .. }) {
            return;
        }
        if let Ok(mut failures) = self.failures.lock() {
            let ttl = self.opts.failure_ttl;
            failures.retain(|_, (when, _)| when.elapsed() < ttl);
            failures.insert(dir.to_path_buf(), (Instant::now(), err.clone()));
        }
    }

    fn forget_failure(&self, dir: &Path) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(dir);
        }
    }
}

/// The registered name whose directory is `dir` (already canonical), if any.
fn registered_for(state: &AppState, dir: &Path) -> Option<String> {
    let adapters = state.adapters.read().ok()?;
    adapters
        .iter()
        .find(|(_, d)| d.as_path() == dir)
        .map(|(n, _)| n.clone())
}

/// Like [`registered_for`], canonicalizing the registered paths (those from `--lora-modules` are
/// stored as given). Costs a syscall per adapter, so only before a load.
fn registered_for_canonical(state: &AppState, dir: &Path) -> Option<String> {
    let adapters = state.adapters.read().ok()?;
    adapters
        .iter()
        .find(|(_, d)| d.canonicalize().is_ok_and(|d| d == dir))
        .map(|(n, _)| n.clone())
}

/// The adapter in `dir` (canonical, under the root) for a request that named it `name`: the one
/// already registered for that directory, or a load that every concurrent request shares.
pub async fn just_in_time(state: &Arc<AppState>, name: &str, dir: PathBuf) -> Outcome {
    let flight = {
        let loader = &state.loader;
        let mut in_flight = loader
            .in_flight
            .lock()
            .map_err(|_| ApiError::Internal("adapter loader lock poisoned".into()))?;
        if let Some(existing) = registered_for(state, &dir) {
            loader.touch(&existing);
            return Ok(existing);
        }
        if let Some(err) = loader.cached_failure(&dir) {
            return Err(err);
        }
        match in_flight.get(&dir) {
            Some(f) => f.clone(),
            None => {
                let f = run_just_in_time(state.clone(), name.to_string(), dir.clone())
                    .boxed()
                    .shared();
                in_flight.insert(dir, f.clone());
                // Runs to the end even if every waiting client hangs up.
                tokio::spawn(f.clone());
                f
            }
        }
    };
    flight.await
}

async fn run_just_in_time(state: Arc<AppState>, name: String, dir: PathBuf) -> Outcome {
    let outcome = async {
        if let Some(existing) = registered_for_canonical(&state, &dir) {
            return Ok(existing);
        }
        let host = read(&state, &name, &dir).await?;
        register(&state, &name, &dir, host, Origin::JustInTime).await
    }
    .await;
    let loader = &state.loader;
    if let Err(e) = &outcome {
        loader.remember_failure(&dir, e);
    }
    if let Ok(mut in_flight) = loader.in_flight.lock() {
        in_flight.remove(&dir);
    }
    outcome
}

/// Reads and validates the adapter files (on the blocking pool).
async fn read(state: &Arc<AppState>, name: &str, dir: &Path) -> Result<HostAdapter, ApiError> {
    state.loader.attempts.fetch_add(1, Ordering::Relaxed);
    let (cfg, limits) = (state.model_cfg.clone(), state.loader.limits);
    let (n, d) = (name.to_string(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || load_peft_adapter_with(&n, &d, &cfg, limits))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::bad(e.to_string()))
}

/// The admin load endpoint: loads `dir` under `name`, ignoring (and on success clearing) a
/// remembered just-in-time failure. Its own failures are answered, not remembered.
pub async fn load_admin(state: &Arc<AppState>, name: &str, dir: PathBuf, pinned: bool) -> Result<(), ApiError> {
    if is_registered(state, name) {
        return Err(already_loaded(name));
    }
    let outcome = match read(state, name, &dir).await {
        Ok(host) => register(state, name, &dir, host, Origin::Admin { pinned }).await,
        Err(e) => Err(e),
    };
    if outcome.is_ok() {
        state.loader.forget_failure(&dir);
    }
    outcome.map(|_| ())
}

fn is_registered(state: &AppState, name: &str) -> bool {
    state.adapters.read().map(|a| a.contains_key(name)).unwrap_or(false)
}

fn already_loaded(name: &str) -> ApiError {
    ApiError::param(
        "lora_name",
        format!("The lora adapter '{name}' has already been loaded."),
    )
}

/// Makes a loaded adapter visible under `name`, evicting an idle just-in-time adapter first when
/// the just-in-time cap is reached.
async fn register(state: &Arc<AppState>, name: &str, dir: &Path, host: HostAdapter, origin: Origin) -> Outcome {
    let _changes = state.loader.changes.lock().await;
    if is_registered(state, name) {
        // A just-in-time request names the model: whoever registered the name first serves it.
        return match origin {
            Origin::JustInTime => Ok(name.to_string()),
            Origin::Admin { .. } => Err(already_loaded(name)),
        };
    }
    if origin == Origin::JustInTime {
        make_room(state).await?;
    }
    state
        .engine
        .register_loaded_adapter(
            name,
            dir.to_path_buf(),
            origin == Origin::Admin { pinned: true },
            Arc::new(host),
        )?
        .await
        .map_err(|_| ApiError::Unavailable)??;
    if let Ok(mut a) = state.adapters.write() {
        a.insert(name.to_string(), dir.to_path_buf());
    }
    if origin == Origin::JustInTime {
        let tick = state.loader.clock.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut jit) = state.loader.jit.lock() {
            jit.insert(name.to_string(), tick);
        }
    }
    Ok(name.to_string())
}

/// Under the registry lock: unregisters the least recently used idle just-in-time adapter while
/// the cap is reached; 429 when every one of them is in use.
async fn make_room(state: &Arc<AppState>) -> Result<(), ApiError> {
    let loader = &state.loader;
    let mut by_age: Vec<(u64, String)> = match loader.jit.lock() {
        Ok(jit) if jit.len() >= loader.opts.max_jit_adapters => jit.iter().map(|(n, t)| (*t, n.clone())).collect(),
        _ => return Ok(()),
    };
    by_age.sort();
    let candidates = by_age.into_iter().map(|(_, n)| n).collect();
    let victim = state
        .engine
        .unregister_idle_adapter(candidates)?
        .await
        .map_err(|_| ApiError::Unavailable)?;
    let Some(victim) = victim else {
        tracing::warn!(
            cap = loader.opts.max_jit_adapters,
            "every just-in-time adapter is in use; refusing another"
        );
        return Err(ApiError::Overloaded);
    };
    tracing::info!(adapter = %victim, "unregistered the least recently used just-in-time adapter");
    if let Ok(mut a) = state.adapters.write() {
        a.remove(&victim);
    }
    if let Ok(mut jit) = loader.jit.lock() {
        jit.remove(&victim);
    }
    Ok(())
}

/// The admin unload endpoint.
pub async fn unload(state: &Arc<AppState>, name: &str) -> Result<(), ApiError> {
    let _changes = state.loader.changes.lock().await;
    let known = state
        .adapters
        .write()
        .map(|mut a| a.remove(name).is_some())
        .unwrap_or(false);
    if !known {
        return Err(ApiError::NotFound(format!(
            "The lora adapter '{name}' cannot be found."
        )));
    }
    if let Ok(mut jit) = state.loader.jit.lock() {
        jit.remove(name);
    }
    state
        .engine
        .unregister_adapter(name)?
        .await
        .map_err(|_| ApiError::Unavailable)??;
    Ok(())
}
