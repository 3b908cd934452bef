//! Request bodies of `/v1/completions` and `/v1/chat/completions`. Every field OpenAI defines is
//! honoured, accepted as a documented no-op, or refused with a 400 naming it; unknown fields are
//! refused the same way (README, "API fields").

use quiver_engine::sampling::SamplingParams;
use quiver_engine::GenerateRequest;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::openai::limits::{check_chars, check_prompts, InputLimits};
use crate::openai::messages;

/// Fields both endpoints share (public for the fuzz test's field list).
pub const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    // vLLM's extensions.
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "return_tokens_as_token_ids",
    "stop_token_ids",
    "skip_special_tokens",
];
pub const COMPLETION: &[&str] = &["prompt", "logprobs", "echo", "best_of", "suffix"];
pub const CHAT: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "functions",
    "function_call",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "web_search_options",
    "verbosity",
    "add_generation_prompt",
];

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Fields shared by both endpoints. `None` = not sent (or `null`).
#[derive(Debug, Deserialize, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Refused unless empty.
    pub logit_bias: Option<Map<String, Value>>,
    /// Accepted, unused (OpenAI's end-user id).
    pub user: Option<String>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub return_tokens_as_token_ids: Option<bool>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub skip_special_tokens: Option<bool>,
}

/// The completions `prompt`: a string, a list of strings, token ids, or lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Parsed from the same body separately (no `flatten`, so type errors keep their path).
    #[serde(skip)]
    pub common: Common,
    pub prompt: PromptInput,
    /// Number of top alternatives per token (0-20).
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
    pub suffix: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// Parsed from the same body separately (no `flatten`, so type errors keep their path).
    #[serde(skip)]
    pub common: Common,
    pub messages: Vec<Value>,
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    /// Accepted, unused while tool calls are not parsed.
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    /// Accepted, unused: OpenAI's stored-completion and billing hints.
    pub metadata: Option<Value>,
    pub store: Option<bool>,
    pub service_tier: Option<String>,
    pub prompt_cache_key: Option<String>,
    pub safety_identifier: Option<String>,
    /// Refused unless null (features Quiver does not have).
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub audio: Option<Value>,
    pub modalities: Option<Vec<String>>,
    pub prediction: Option<Value>,
    pub reasoning_effort: Option<Value>,
    pub web_search_options: Option<Value>,
    pub verbosity: Option<Value>,
    pub add_generation_prompt: Option<bool>,
}

/// Parses a JSON object body into the shared fields and the endpoint's own, refusing fields not
/// in `known` and naming the field a type error is in.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], known: &[&[&str]]) -> Result<(Common, T), ApiError> {
    let map: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))?;
    if let Some(k) = map.keys().find(|k| !known.iter().any(|l| l.contains(&k.as_str()))) {
        return Err(ApiError::param(
            k,
            format!("Unrecognized request argument supplied: {k}"),
        ));
    }
    let object = Value::Object(map);
    Ok((typed(&object)?, typed(&object)?))
}

fn typed<T: serde::de::DeserializeOwned>(object: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(object).map_err(|e| {
        let path = e.path().to_string();
        let param = path.split(['.', '[']).next().unwrap_or_default().to_string();
        let message = format!("invalid value for `{path}`: {}", e.inner());
        if param.is_empty() || param == "?" {
            ApiError::bad(message)
        } else {
            ApiError::param(&param, message)
        }
    })
}

pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let (common, request) = parse_body(body, &[COMMON, COMPLETION])?;
    Ok(CompletionRequest { common, ..request })
}

/// Parses a chat body; every `messages` entry is checked and its content flattened to a string.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let (common, mut request): (Common, ChatRequest) = parse_body(body, &[COMMON, CHAT])?;
    messages::normalize(&mut request.messages)?;
    Ok(ChatRequest { common, ..request })
}

fn unsupported(param: &str, what: &str) -> ApiError {
    ApiError::param(param, format!("{param}: {what} is not supported by this server"))
}

/// How the answer is written.
#[derive(Debug, Clone, Copy)]
pub struct Format {
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's `return_tokens_as_token_ids`: logprob tokens as `token_id:N`.
    pub token_ids_as_text: bool,
}

/// The request's settings as the engine takes them (prompts and adapter are added later), and
/// how to answer.
pub struct Settings {
    pub request: GenerateRequest,
    pub format: Format,
}

impl Common {
    /// `logprobs`: top alternatives wanted per token (`Some(0)` = the chosen token's only).
    /// Range checks are the engine validator's; this only maps shapes.
    fn settings(&self, max_tokens: Option<u32>, logprobs: Option<usize>) -> Result<Settings, ApiError> {
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("logit_bias", "logit_bias"));
        }
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
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        let request = GenerateRequest {
            prompts: Vec::new(),
            n: self.n.unwrap_or(1) as usize,
            adapter: None,
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(1.0),
                top_k,
                top_p: self.top_p.unwrap_or(1.0),
                min_p: self.min_p.unwrap_or(0.0),
                seed: self.seed,
                repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                logprobs,
            },
            max_tokens: max_tokens.or(self.max_tokens).map(|m| m as usize),
            stop,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
        };
        Ok(Settings {
            request,
            format: Format {
                stream: self.stream.unwrap_or(false),
                include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
                token_ids_as_text: self.return_tokens_as_token_ids.unwrap_or(false),
            },
        })
    }
}

impl CompletionRequest {
    /// How many prompts `prompt` holds.
    pub fn num_prompts(&self) -> usize {
        match &self.prompt {
            PromptInput::Text(_) | PromptInput::Tokens(_) => 1,
            PromptInput::Texts(v) => v.len(),
            PromptInput::TokenLists(v) => v.len(),
        }
    }

    pub fn settings(&self, limits: &InputLimits) -> Result<Settings, ApiError> {
        check_prompts(self.num_prompts(), limits)?;
        let chars = match &self.prompt {
            PromptInput::Text(t) => t.chars().count(),
            PromptInput::Texts(ts) => ts.iter().map(|t| t.chars().count()).sum(),
            PromptInput::Tokens(_) | PromptInput::TokenLists(_) => 0,
        };
        check_chars("prompt", chars, limits)?;
        if self.echo == Some(true) {
            return Err(unsupported("echo", "echo"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported("suffix", "suffix"));
        }
        let n = self.common.n.unwrap_or(1);
        if self.best_of.is_some_and(|b| b != 1 && b != n) {
            return Err(unsupported("best_of", "best_of other than 1 or n"));
        }
        if self.logprobs.is_some_and(|l| l > 20) {
            return Err(ApiError::param("logprobs", "logprobs must be between 0 and 20"));
        }
        self.common.settings(None, self.logprobs.map(|l| l as usize))
    }
}

/// `true` for a value that asks for nothing: `null`, `"none"`, `{"type": "text"}`.
fn is_default_choice(v: &Value, default: &str) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s == default,
        Value::Object(o) => o.get("type").and_then(Value::as_str) == Some(default) && o.len() == 1,
        _ => false,
    }
}

impl ChatRequest {
    pub fn settings(&self, limits: &InputLimits) -> Result<Settings, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::param("messages", "messages must not be empty"));
        }
        let tools = self.tools.iter().flatten().map(messages::text_chars).sum::<usize>();
        let chars = self.messages.iter().map(messages::text_chars).sum::<usize>() + tools;
        check_chars("messages", chars, limits)?;
        if self
            .response_format
            .as_ref()
            .is_some_and(|f| !is_default_choice(f, "text"))
        {
            return Err(unsupported(
                "response_format",
                "structured output (response_format other than text)",
            ));
        }
        // Tools are rendered into the prompt only when the client asks for no tool calls:
        // parsing calls out of the output is not built yet.
        let has_tools = self.tools.as_ref().is_some_and(|t| !t.is_empty());
        let no_calls = self.tool_choice.as_ref().is_some_and(|c| is_default_choice(c, "none"));
        if has_tools && !no_calls {
            return Err(unsupported(
                "tools",
                "tool calling (tools without tool_choice \"none\")",
            ));
        }
        // "auto" with no tools asks for nothing either.
        let auto_without_tools = !has_tools && self.tool_choice.as_ref().and_then(Value::as_str) == Some("auto");
        if self.tool_choice.is_some() && !no_calls && !auto_without_tools {
            return Err(unsupported("tool_choice", "tool_choice other than \"none\""));
        }
        for (param, v) in [
            ("functions", &self.functions),
            ("function_call", &self.function_call),
            ("audio", &self.audio),
            ("prediction", &self.prediction),
            ("reasoning_effort", &self.reasoning_effort),
            ("web_search_options", &self.web_search_options),
            ("verbosity", &self.verbosity),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(unsupported(param, param));
            }
        }
        if self.modalities.as_ref().is_some_and(|m| m.iter().any(|m| m != "text")) {
            return Err(unsupported("modalities", "output other than text"));
        }
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, None) => None,
            (false, Some(_)) => return Err(ApiError::param("top_logprobs", "top_logprobs needs logprobs: true")),
            (true, None) => Some(0),
            (true, Some(n)) if n <= 20 => Some(n as usize),
            (true, Some(n)) => {
                return Err(ApiError::param(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and 20, got {n}"),
                ))
            }
        };
        self.common.settings(self.max_completion_tokens, logprobs)
    }

    /// Tools handed to the chat template (only with `tool_choice: "none"`).
    pub fn template_tools(&self) -> Option<Value> {
        self.tools
            .as_ref()
            .filter(|t| !t.is_empty())
            .map(|t| Value::Array(t.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_unsupported_fields_are_named() {
        let err = |body: &str, chat: bool| {
            let r = if chat {
                parse_chat(body.as_bytes()).and_then(|r| r.settings(&InputLimits::default()).map(|_| ()))
            } else {
                parse_completion(body.as_bytes()).and_then(|r| r.settings(&InputLimits::default()).map(|_| ()))
            };
            match r {
                Err(ApiError::BadRequest { param, .. }) => param,
                other => panic!("{body}: expected a 400, got {other:?}"),
            }
        };
        let msgs = r#""messages": [{"role": "user", "content": "hi"}]"#;
        assert_eq!(
            err(&format!("{{{msgs}, \"frobnicate\": 1}}"), true).as_deref(),
            Some("frobnicate")
        );
        assert_eq!(
            err(r#"{"prompt": "x", "messages": []}"#, false).as_deref(),
            Some("messages")
        );
        for (field, value) in [
            ("response_format", r#"{"type": "json_object"}"#),
            ("logit_bias", r#"{"5": 10}"#),
            ("tools", r#"[{"type": "function", "function": {"name": "f"}}]"#),
            ("tool_choice", r#""required""#),
            ("functions", "[]"),
            ("audio", "{}"),
            ("modalities", r#"["audio"]"#),
        ] {
            assert_eq!(
                err(&format!("{{{msgs}, \"{field}\": {value}}}"), true).as_deref(),
                Some(field)
            );
        }
        for (field, value) in [("echo", "true"), ("best_of", "3"), ("suffix", "\"s\"")] {
            assert_eq!(
                err(&format!("{{\"prompt\": \"x\", \"{field}\": {value}}}"), false).as_deref(),
                Some(field)
            );
        }
        assert_eq!(
            err(r#"{"prompt": "x", "max_tokens": "ten"}"#, false).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(err(r#"{"prompt": "x", "n": -1}"#, false).as_deref(), Some("n"));
    }

    #[test]
    fn harmless_values_and_no_ops_are_accepted() {
        let ok = r#"{"messages": [{"role": "user", "content": "hi"}], "user": "u", "metadata": {"a": "b"},
            "store": false, "response_format": {"type": "text"}, "logit_bias": {}, "tool_choice": "none",
            "tools": [{"type": "function", "function": {"name": "f"}}], "parallel_tool_calls": true,
            "modalities": ["text"], "service_tier": "auto", "functions": null, "seed": 3}"#;
        let r = parse_chat(ok.as_bytes()).expect("parses");
        let s = r.settings(&InputLimits::default()).expect("accepted");
        assert_eq!(s.request.sampling.seed, Some(3));
        assert!(r.template_tools().is_some());
        let c = parse_completion(br#"{"prompt": [[1, 2], [3]], "best_of": 2, "n": 2, "echo": false}"#).expect("parses");
        assert!(matches!(c.prompt, PromptInput::TokenLists(ref l) if l.len() == 2));
        assert_eq!(c.settings(&InputLimits::default()).expect("accepted").request.n, 2);
    }
}
