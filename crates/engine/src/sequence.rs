//! One choice of a request inside the engine, and its output stage: detokenization, stop
//! strings, stop tokens, EOS and length. The engine decides every ending here and sends deltas
//! and one `Finished` event; the API only serializes them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_model::{SequenceCache, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::adapters::Lease;
use crate::error::EngineError;
use crate::metrics::RequestMetrics;
use crate::output::TextStream;
use crate::prefix::{Chain, WeightsId};
use crate::queue::Key;
use crate::request::{Delta, Event, FinishReason, StopCause};
use crate::sampling::{Sampled, Sampler};
use crate::validation::ValidRequest;

pub(crate) struct Sequence {
    pub id: u64,
    /// The engine's id of the API request this choice belongs to.
    pub request_id: u64,
    /// Choice index within the request.
    pub index: usize,
    pub adapter: Key,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    /// Tokens whose K/V are in the cache.
    pub computed: usize,
    pub cache: SequenceCache,
    /// How far `cache`'s full blocks are in the prefix cache.
    pub chain: Chain,
    /// The weights computing this sequence's K/V (set at admission, with the lease).
    pub weights: WeightsId,
    /// Prompt tokens found in the prefix cache at first admission (OpenAI's `cached_tokens`).
    pub cached_tokens: Option<usize>,
    pub lease: Option<Lease>,
    pub sampler: Sampler,
    pub request: Arc<ValidRequest>,
    /// `None` when the engine has no tokenizer: deltas then carry tokens only.
    text: Option<TextStream>,
    pub events: UnboundedSender<Event>,
    pub submitted: Instant,
    /// Set when the sequence first runs.
    pub queue_time: Option<Duration>,
    last_token: Option<Instant>,
}

/// What the output stage made of one sampled token.
pub(crate) enum Outcome {
    Running,
    Finished,
    Failed,
}

impl Sequence {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        request_id: u64,
        index: usize,
        request: Arc<ValidRequest>,
        sampler: Sampler,
        has_tokenizer: bool,
        events: UnboundedSender<Event>,
        submitted: Instant,
    ) -> Self {
        let r = request.request();
        let prompt_index = index / r.n;
        let prompt = r.prompts[prompt_index].clone();
        // The validator refused stop strings when there is no tokenizer, and empty ones always.
        let text = has_tokenizer
            .then(|| TextStream::new(r.stop.clone(), r.skip_special_tokens).ok())
            .flatten();
        Sequence {
            id,
            request_id,
            index,
            adapter: r.adapter.clone(),
            prompt_len: prompt.len(),
            tokens: prompt,
            max_tokens: request.max_tokens(prompt_index),
            computed: 0,
            cache: SequenceCache::default(),
            chain: Chain::default(),
            weights: 0,
            cached_tokens: None,
            lease: None,
            sampler,
            text,
            request,
            events,
            submitted,
            queue_time: None,
            last_token: None,
        }
    }

    /// The request and prompt this choice samples from: choices sharing it share the prompt's
    /// blocks.
    pub fn prompt_key(&self) -> (u64, usize) {
        (self.request_id, self.index / self.request.request().n.max(1))
    }

    /// After its blocks went back (preemption, or admission that found no room): the cache is
    /// recomputed, and the lease retaken, on admission.
    pub fn forget_kv(&mut self) {
        self.computed = 0;
        self.chain = Chain::default();
        self.lease = None;
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Appends a sampled token, streams its text and decides whether the choice ended.
    pub fn emit(
        &mut self,
        sampled: Sampled,
        eos: &[u32],
        max_model_len: usize,
        tokenizer: Option<&Tokenizer>,
        metrics: &mut RequestMetrics,
    ) -> Outcome {
        let now = Instant::now();
        match self.last_token {
            None => metrics.time_to_first_token.observe(now - self.submitted),
            Some(last) => metrics.inter_token_latency.observe(now - last),
        }
        self.last_token = Some(now);
        let token = sampled.token;
        self.tokens.push(token);
        let r = self.request.request();
        let mut reason = if r.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop(StopCause::Token(token)))
        } else if !r.ignore_eos && eos.contains(&token) {
            Some(FinishReason::Stop(StopCause::Eos))
        } else if self.generated() >= self.max_tokens || self.tokens.len() >= max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        let mut text = String::new();
        if let (Some(stream), Some(tok)) = (self.text.as_mut(), tokenizer) {
            let piece = match stream.push(tok, token) {
                Ok(p) => p,
                Err(e) => return self.fail(EngineError::Model(format!("detokenizing: {e}")), metrics),
            };
            text = piece.text;
            if reason.is_some() && !piece.stopped {
                match stream.finish(tok) {
                    Ok(rest) => text.push_str(&rest),
                    Err(e) => return self.fail(EngineError::Model(format!("detokenizing: {e}")), metrics),
                }
            }
            // A stop string ends the choice even where EOS or the length would have.
            if let Some(i) = stream.stopped() {
                reason = Some(FinishReason::Stop(StopCause::String(i)));
            }
        }
        let _ = self.events.send(Event::Delta(Delta {
            index: self.index,
            text,
            tokens: vec![sampled],
        }));
        let Some(reason) = reason else {
            return Outcome::Running;
        };
        self.record(reason.as_str(), metrics);
        let _ = self.events.send(Event::Finished {
            index: self.index,
            reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
            cached_tokens: self.cached_tokens.unwrap_or(0),
            queue_time: self.queue_time.unwrap_or_default(),
        });
        Outcome::Finished
    }

    /// Ends the choice (and, for its client, the request) with an error.
    pub fn fail(&mut self, e: EngineError, metrics: &mut RequestMetrics) -> Outcome {
        self.record("error", metrics);
        let _ = self.events.send(Event::Error(e));
        Outcome::Failed
    }

    /// The client went away.
    pub fn abort(&self, metrics: &mut RequestMetrics) {
        self.record("abort", metrics);
    }

    /// Counts the choice's ending once, with its tokens and lifetime.
    fn record(&self, reason: &'static str, metrics: &mut RequestMetrics) {
        metrics.ended(
            reason,
            self.adapter.as_deref(),
            self.prompt_len,
            self.generated(),
            self.submitted.elapsed(),
        );
    }
}
