//! OpenAI request bodies (with vLLM's extensions) and their validation into engine parameters.

use quiver_engine::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Value>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    #[serde(default = "yes")]
    pub skip_special_tokens: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: Common,
    pub prompt: Value,
    /// Completions API: number of top alternatives per token.
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Vec<Value>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Value>,
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
}

/// Validated generation settings of one request.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub sampling: SamplingParams,
    /// `None`: whatever the context leaves.
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub token_ids_as_text: bool,
    pub skip_special_tokens: bool,
}

pub const MAX_N: usize = 16;
pub const MAX_STOPS: usize = 16;

fn stops(v: &Option<Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= MAX_STOPS => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::param("stop", "stop must be a string or a list of strings"))
            })
            .collect(),
        Some(Value::Array(_)) => Err(ApiError::param("stop", format!("at most {MAX_STOPS} stop sequences"))),
        Some(_) => Err(ApiError::param("stop", "stop must be a string or a list of strings")),
    }
}

impl Common {
    /// `logprobs`: top alternatives wanted per token (`Some(0)` = the chosen token's only).
    pub fn params(&self, max_tokens: Option<i64>, logprobs: Option<usize>) -> Result<GenParams, ApiError> {
        let n = self.n.unwrap_or(1);
        if n < 1 || n as usize > MAX_N {
            return Err(ApiError::param(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ));
        }
        let max_tokens = match max_tokens.or(self.max_tokens) {
            Some(m) if m < 1 => {
                return Err(ApiError::param(
                    "max_tokens",
                    format!("max_tokens must be at least 1, got {m}"),
                ))
            }
            Some(m) => Some(m as usize),
            None => None,
        };
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::param(
                    "top_k",
                    format!("top_k must be -1 (off) or positive, got {k}"),
                ))
            }
        };
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            seed: self.seed,
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            logprobs,
        };
        sampling.validate().map_err(|e| ApiError::BadRequest {
            message: e.to_string(),
            param: e.param().map(str::to_string),
        })?;
        let stop = stops(&self.stop)?;
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::param("stop", "stop sequences must not be empty"));
        }
        Ok(GenParams {
            sampling,
            max_tokens,
            n: n as usize,
            stop,
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
            token_ids_as_text: self.return_tokens_as_token_ids,
            skip_special_tokens: self.skip_special_tokens,
        })
    }
}

/// The completions `prompt`: a string, a list of strings, a list of token ids, or a list of such.
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub fn prompts(v: &Value) -> Result<Vec<Prompt>, ApiError> {
    let bad = || {
        ApiError::param(
            "prompt",
            "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
        )
    };
    let ids = |a: &Vec<Value>| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(bad)
            })
            .collect()
    };
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(a) if a.is_empty() => return Err(ApiError::param("prompt", "prompt must not be empty")),
        Value::Array(a) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| Prompt::Text(s.as_str().unwrap_or_default().to_string()))
            .collect(),
        Value::Array(a) if a.iter().all(Value::is_number) => vec![Prompt::Tokens(ids(a)?)],
        Value::Array(a) => a
            .iter()
            .map(|p| match p {
                Value::Array(inner) => Ok(Prompt::Tokens(ids(inner)?)),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    Ok(out)
}
