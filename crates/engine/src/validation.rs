//! The one place a request is checked. [`Validator::validate`] is the only constructor of
//! [`ValidRequest`], the only request type the engine accepts, so nothing downstream checks again
//! (TGI's `ValidGenerateRequest` idea). What can change after validation — an adapter unloaded
//! in between — is a runtime event, not a re-check.

use crate::request::GenerateRequest;
use crate::sampling::MAX_LOGPROBS;

/// Most choices (`n`) per prompt.
pub const MAX_N: usize = 16;
/// Most stop strings and most stop token ids per request.
pub const MAX_STOPS: usize = 16;

/// What a request is checked against; built by the engine from the model and its memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Prompt plus completion, in tokens.
    pub max_model_len: usize,
    pub vocab_size: usize,
    /// The longest sequence the whole KV budget can hold.
    pub max_kv_tokens: usize,
    /// Stop strings need detokenization, which needs the tokenizer.
    pub has_tokenizer: bool,
    /// Most prompt tokens one request may bring, counted once per choice (prompts × `n`): the
    /// prefill work a single request can ask for.
    pub max_request_prompt_tokens: usize,
}

/// A refused request: the OpenAI request field at fault (`prompt` for the prompt, which the chat
/// API calls `messages`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub param: &'static str,
    pub message: String,
}

fn refuse(param: &'static str, message: impl Into<String>) -> ValidationError {
    ValidationError {
        param,
        message: message.into(),
    }
}

/// A request that passed every check, with each prompt's completion budget resolved.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    request: GenerateRequest,
    max_tokens: Vec<usize>,
}

impl ValidRequest {
    pub fn request(&self) -> &GenerateRequest {
        &self.request
    }

    /// The completion budget of prompt `i`.
    pub fn max_tokens(&self, prompt: usize) -> usize {
        self.max_tokens[prompt]
    }

    /// Prompts × n.
    pub fn num_choices(&self) -> usize {
        self.request.prompts.len() * self.request.n
    }
}

#[derive(Debug, Clone)]
pub struct Validator {
    limits: Limits,
}

impl Validator {
    pub fn new(limits: Limits) -> Self {
        Validator { limits }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The number of choices (prompts × `n`) of a request with `prompts` prompts, once `n` is in
    /// range: what the API admits a request by, before it spends anything on tokenizing it.
    pub fn choices(&self, prompts: usize, n: usize) -> Result<usize, ValidationError> {
        if !(1..=MAX_N).contains(&n) {
            return Err(refuse("n", format!("n must be between 1 and {MAX_N}, got {n}")));
        }
        if prompts == 0 {
            return Err(refuse("prompt", "the prompt is empty"));
        }
        Ok(prompts.saturating_mul(n))
    }

    pub fn validate(&self, request: GenerateRequest) -> Result<ValidRequest, ValidationError> {
        let l = &self.limits;
        self.choices(request.prompts.len(), request.n)?;
        if request.max_tokens == Some(0) {
            return Err(refuse("max_tokens", "max_tokens must be at least 1, got 0"));
        }
        request
            .sampling
            .validate()
            .map_err(|e| refuse(e.param().unwrap_or("sampling"), e.to_string()))?;
        if request.sampling.logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
            return Err(refuse("logprobs", format!("logprobs must be at most {MAX_LOGPROBS}")));
        }
        if request.stop.len() > MAX_STOPS {
            return Err(refuse("stop", format!("at most {MAX_STOPS} stop sequences")));
        }
        if request.stop.iter().any(String::is_empty) {
            return Err(refuse("stop", "stop sequences must not be empty"));
        }
        if !request.stop.is_empty() && !l.has_tokenizer {
            return Err(refuse(
                "stop",
                "stop strings need a tokenizer, and this engine has none",
            ));
        }
        if request.stop_token_ids.len() > MAX_STOPS {
            return Err(refuse("stop_token_ids", format!("at most {MAX_STOPS} stop token ids")));
        }
        if let Some(t) = request.stop_token_ids.iter().find(|&&t| t as usize >= l.vocab_size) {
            return Err(refuse(
                "stop_token_ids",
                format!("token id {t} is outside the vocabulary"),
            ));
        }
        let max_tokens = request
            .prompts
            .iter()
            .map(|p| self.check_prompt(p, request.max_tokens))
            .collect::<Result<_, _>>()?;
        let tokens = request.prompts.iter().map(Vec::len).sum::<usize>();
        let work = tokens.saturating_mul(request.n);
        if work > l.max_request_prompt_tokens {
            let per_choice = if request.n > 1 {
                format!(" ({tokens} in its prompts × n = {})", request.n)
            } else {
                String::new()
            };
            return Err(refuse(
                "prompt",
                format!(
                    "this request brings {work} prompt tokens{per_choice}; at most {} are allowed per request",
                    l.max_request_prompt_tokens
                ),
            ));
        }
        Ok(ValidRequest { request, max_tokens })
    }

    /// Checks one prompt; returns its completion budget.
    fn check_prompt(&self, prompt: &[u32], max_tokens: Option<usize>) -> Result<usize, ValidationError> {
        let l = &self.limits;
        if prompt.is_empty() {
            return Err(refuse("prompt", "the prompt is empty"));
        }
        if let Some(t) = prompt.iter().find(|&&t| t as usize >= l.vocab_size) {
            return Err(refuse("prompt", format!("token id {t} is outside the vocabulary")));
        }
        let max = l.max_model_len;
        let completion = max_tokens.unwrap_or(1);
        let want = prompt.len().saturating_add(completion);
        if prompt.len() >= max || want > max {
            return Err(refuse(
                "prompt",
                format!(
                    "This model's maximum context length is {max} tokens. However, you requested {want} tokens ({} in the prompt, {completion} for the completion).",
                    prompt.len()
                ),
            ));
        }
        // Without max_tokens a choice may run to the context length, or to what the KV budget
        // holds if that is less.
        let room = max.min(l.max_kv_tokens);
        let budget = max_tokens.unwrap_or(room.saturating_sub(prompt.len()));
        if budget == 0 || prompt.len() + budget > l.max_kv_tokens {
            return Err(refuse(
                if max_tokens.is_some() { "max_tokens" } else { "prompt" },
                format!(
                    "{} tokens need more KV memory than the whole budget holds ({} tokens)",
                    prompt.len() + budget.max(1),
                    l.max_kv_tokens
                ),
            ));
        }
        Ok(budget)
    }
}
