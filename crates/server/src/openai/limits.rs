//! What one request may bring, checked on the parsed body before any template or tokenizer
//! work: how many prompts, and how many characters of prompt text. The token total, counted per
//! choice, is the engine validator's (`--max-request-prompt-tokens`).

use crate::error::ApiError;

/// Default of `--max-prompts-per-request`: with `n` ≤ 16, at most 1,024 choices per request,
/// the default admission size.
pub const DEFAULT_MAX_PROMPTS: usize = 64;
/// Default of `--max-prompt-chars`: about 250k tokens of English, twice the longest context of
/// common models, and a fraction of a second of tokenizer time.
pub const DEFAULT_MAX_PROMPT_CHARS: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// Prompts in one completions request.
    pub max_prompts: usize,
    /// Characters of prompt text in one request: completions' text prompts together, or every
    /// string of the chat `messages` and `tools`.
    pub max_chars: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_prompts: DEFAULT_MAX_PROMPTS,
            max_chars: DEFAULT_MAX_PROMPT_CHARS,
        }
    }
}

pub fn check_prompts(prompts: usize, limits: &InputLimits) -> Result<(), ApiError> {
    if prompts > limits.max_prompts {
        return Err(ApiError::param(
            "prompt",
            format!(
                "prompt holds {prompts} prompts; at most {} are allowed per request",
                limits.max_prompts
            ),
        ));
    }
    Ok(())
}

pub fn check_chars(param: &str, chars: usize, limits: &InputLimits) -> Result<(), ApiError> {
    if chars > limits.max_chars {
        return Err(ApiError::param(
            param,
            format!(
                "{param} holds {chars} characters; at most {} are allowed per request",
                limits.max_chars
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::request::{parse_chat, parse_completion};

    fn param(r: Result<(), ApiError>) -> Option<String> {
        match r {
            Ok(()) => None,
            Err(ApiError::BadRequest { param, .. }) => param,
            Err(e) => panic!("expected a 400, got {e:?}"),
        }
    }

    #[test]
    fn prompts_and_characters_are_capped_before_tokenizing() {
        let limits = InputLimits {
            max_prompts: 2,
            max_chars: 5,
        };
        let completion = |body: &str| {
            param(
                parse_completion(body.as_bytes())
                    .and_then(|r| r.settings(&limits))
                    .map(|_| ()),
            )
        };
        let chat = |body: &str| {
            param(
                parse_chat(body.as_bytes())
                    .and_then(|r| r.settings(&limits))
                    .map(|_| ()),
            )
        };
        assert_eq!(completion(r#"{"prompt": [[1], [2]]}"#), None);
        assert_eq!(completion(r#"{"prompt": [[1], [2], [3]]}"#).as_deref(), Some("prompt"));
        assert_eq!(completion(r#"{"prompt": ["ab", "cde"]}"#), None);
        // Characters, not bytes: "é" is one.
        assert_eq!(completion(r#"{"prompt": "ééééé"}"#), None);
        assert_eq!(completion(r#"{"prompt": ["abc", "def"]}"#).as_deref(), Some("prompt"));
        // Token ids are the validator's to count.
        assert_eq!(completion(r#"{"prompt": [1, 2, 3, 4, 5, 6, 7]}"#), None);
        // Role and content count: "user" + "h".
        assert_eq!(chat(r#"{"messages": [{"role": "user", "content": "h"}]}"#), None);
        assert_eq!(
            chat(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).as_deref(),
            Some("messages")
        );
    }
}
