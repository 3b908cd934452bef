//! The handle the API holds: starts the scheduler thread and talks to it through commands.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use quiver_adapters::HostAdapter;
use quiver_model::{Llama, Tokenizer};
use quiver_tensor::Backend;
use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::adapters::AdapterInfo;
use crate::error::EngineError;
use crate::request::{Command, EngineStats, Event, GenerateRequest};
use crate::scheduler::Scheduler;
use crate::validation::{ValidRequest, ValidationError, Validator};
use crate::EngineConfig;

#[derive(Clone)]
pub struct Engine {
    commands: mpsc::Sender<Command>,
    validator: Validator,
}

impl Engine {
    /// Sizes the KV cache and the adapter page pool from one memory budget and starts the
    /// scheduler on its own OS thread (tensor work never runs on the async runtime). With a
    /// tokenizer the engine detokenizes and applies stop strings; without one, deltas carry
    /// tokens only and stop strings are refused.
    pub fn start<B: Backend>(
        model: Llama<B>,
        tokenizer: Option<Arc<Tokenizer>>,
        eos: Vec<u32>,
        cfg: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let mut model = model;
        let kv_dtype = cfg.kv_cache_dtype.unwrap_or(model.checkpoint_dtype());
        model.set_kv_dtype(kv_dtype);
        tracing::info!(%kv_dtype, checkpoint = %model.checkpoint_dtype(), "KV cache dtype");
        let scheduler = Scheduler::build(model, tokenizer, eos, cfg)?;
        let validator = Validator::new(scheduler.limits());
        let (commands, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("quiver-scheduler".into())
            .spawn(move || scheduler.run(rx))
            .map_err(|e| EngineError::Model(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Engine { commands, validator })
    }

    /// The checks every request passes before [`submit`](Self::submit).
    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    pub fn validate(&self, request: GenerateRequest) -> Result<ValidRequest, ValidationError> {
        self.validator.validate(request)
    }

    fn send(&self, cmd: Command) -> Result<(), EngineError> {
        self.commands.send(cmd).map_err(|_| EngineError::Stopped)
    }

    /// Queues every choice of a request; their events arrive on the returned channel. Dropping
    /// the receiver cancels the request at the next step.
    pub fn submit(
        &self,
        request: impl Into<Arc<ValidRequest>>,
    ) -> Result<tmpsc::UnboundedReceiver<Event>, EngineError> {
        let (events, rx) = tmpsc::unbounded_channel();
        self.send(Command::Submit {
            request: request.into(),
            events,
        })?;
        Ok(rx)
    }

    fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<oneshot::Receiver<T>, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        Ok(rx)
    }

    pub fn register_adapter(
        &self,
        name: &str,
        path: PathBuf,
        pinned: bool,
    ) -> Result<oneshot::Receiver<Result<(), EngineError>>, EngineError> {
        self.ask(|reply| Command::RegisterAdapter {
            name: name.into(),
            path,
            pinned,
            preloaded: None,
            reply,
        })
    }

    /// Registers an adapter the caller already loaded and validated.
    pub fn register_loaded_adapter(
        &self,
        name: &str,
        path: PathBuf,
        pinned: bool,
        adapter: Arc<HostAdapter>,
    ) -> Result<oneshot::Receiver<Result<(), EngineError>>, EngineError> {
        self.ask(|reply| Command::RegisterAdapter {
            name: name.into(),
            path,
            pinned,
            preloaded: Some(adapter),
            reply,
        })
    }

    pub fn unregister_adapter(&self, name: &str) -> Result<oneshot::Receiver<Result<(), EngineError>>, EngineError> {
        self.ask(|reply| Command::UnregisterAdapter {
            name: name.into(),
            reply,
        })
    }

    /// Unregisters the first of `candidates` that no running or waiting request uses (see
    /// [`AdapterManager::unregister_first_idle`](crate::adapters::AdapterManager::unregister_first_idle));
    /// answers its name, or `None` when all are busy. One command, so no request can start
    /// using the adapter between the check and the removal.
    pub fn unregister_idle_adapter(
        &self,
        candidates: Vec<String>,
    ) -> Result<oneshot::Receiver<Option<String>>, EngineError> {
        self.ask(|reply| Command::UnregisterIdleAdapter { candidates, reply })
    }

    pub fn pin_adapter(
        &self,
        name: &str,
        pinned: bool,
    ) -> Result<oneshot::Receiver<Result<(), EngineError>>, EngineError> {
        self.ask(|reply| Command::PinAdapter {
            name: name.into(),
            pinned,
            reply,
        })
    }

    pub fn adapters(&self) -> Result<oneshot::Receiver<Vec<AdapterInfo>>, EngineError> {
        self.ask(|reply| Command::Adapters { reply })
    }

    pub fn stats(&self) -> Result<oneshot::Receiver<EngineStats>, EngineError> {
        self.ask(|reply| Command::Stats { reply })
    }
}
