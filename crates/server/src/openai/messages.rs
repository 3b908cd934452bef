//! The chat `messages` array, checked entry by entry as OpenAI checks it (a 400 whose `param`
//! names the entry, e.g. `messages[2].role`), and put in the shape chat templates expect:
//! text content parts are joined with "\n" into one string, as vLLM does for templates that
//! take string content. Other part types (images, audio, files) are refused: the models served
//! here read text only.

use serde_json::Value;

use crate::error::ApiError;

/// OpenAI's roles, less the deprecated `function` (function calling is not supported).
/// `developer` is OpenAI's newer name for `system`; it reaches the template as written, as in
/// vLLM.
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

fn refuse(param: String, message: impl std::fmt::Display) -> ApiError {
    ApiError::param(&param, format!("{param}: {message}"))
}

/// Checks every entry and flattens content-part arrays in place.
pub fn normalize(messages: &mut [Value]) -> Result<(), ApiError> {
    for (i, message) in messages.iter_mut().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(m) = message else {
            return Err(refuse(at, "each message must be an object with a role and content"));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
            Some(Value::String(r)) => {
                return Err(refuse(
                    format!("{at}.role"),
                    format!("'{r}' is not one of {}", ROLES.join(", ")),
                ))
            }
            None | Some(Value::Null) => return Err(refuse(format!("{at}.role"), "a role is required")),
            Some(_) => return Err(refuse(format!("{at}.role"), "the role must be a string")),
        };
        for field in ["name", "tool_call_id"] {
            if m.get(field).is_some_and(|v| !v.is_string()) {
                return Err(refuse(format!("{at}.{field}"), "must be a string"));
            }
        }
        if m.get("tool_calls").is_some_and(|v| !v.is_array() && !v.is_null()) {
            return Err(refuse(format!("{at}.tool_calls"), "must be an array"));
        }
        let content = m.get_mut("content");
        match content {
            // An assistant turn may carry tool calls (or nothing) instead of content.
            None | Some(Value::Null) if role == "assistant" => {}
            None | Some(Value::Null) => {
                return Err(refuse(
                    format!("{at}.content"),
                    format!("a {role} message needs content"),
                ))
            }
            Some(Value::String(_)) => {}
            Some(content @ Value::Array(_)) => {
                let text = flatten(&*content, &at)?;
                *content = Value::String(text);
            }
            Some(_) => {
                return Err(refuse(
                    format!("{at}.content"),
                    "content must be a string or an array of content parts",
                ))
            }
        }
    }
    Ok(())
}

/// The text of a content-part array, parts joined with "\n".
fn flatten(parts: &Value, at: &str) -> Result<String, ApiError> {
    let parts = parts.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let here = format!("{at}.content[{j}]");
        // OpenAI's text part, and the refusal part an assistant turn may carry.
        let text = match part.get("type").and_then(Value::as_str) {
            Some(kind @ ("text" | "refusal")) => part.get(kind).and_then(Value::as_str).ok_or_else(|| {
                refuse(
                    format!("{here}.{kind}"),
                    format!("a {kind} part needs a string `{kind}`"),
                )
            })?,
            Some(other) => {
                return Err(refuse(
                    format!("{here}.type"),
                    format!("content parts of type '{other}' are not supported by this server (text only)"),
                ))
            }
            None => return Err(refuse(here, "each content part must be an object with a type")),
        };
        texts.push(text);
    }
    Ok(texts.join("\n"))
}

/// Characters in every string of `v` (keys excluded): what a chat template can copy into the
/// prompt, counted before any rendering or tokenization.
pub fn text_chars(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(map) => map.values().map(text_chars).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn param_of(messages: Value) -> Option<String> {
        let Value::Array(mut list) = messages else {
            panic!("an array")
        };
        match normalize(&mut list) {
            Err(ApiError::BadRequest { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn malformed_entries_are_named() {
        let user = json!({"role": "user", "content": "hi"});
        for (messages, param) in [
            (json!([1]), "messages[0]"),
            (json!([null]), "messages[0]"),
            (json!([{}]), "messages[0].role"),
            (json!([user, {"role": 5, "content": "x"}]), "messages[1].role"),
            (json!([{"role": "hacker", "content": "x"}]), "messages[0].role"),
            (json!([{"role": "user"}]), "messages[0].content"),
            (json!([{"role": "user", "content": 7}]), "messages[0].content"),
            (json!([{"role": "user", "content": "x", "name": 1}]), "messages[0].name"),
            (
                json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}]}]),
                "messages[0].content[1].type",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text"}]}]),
                "messages[0].content[0].text",
            ),
            (json!([{"role": "user", "content": ["bare"]}]), "messages[0].content[0]"),
        ] {
            assert_eq!(param_of(messages.clone()).as_deref(), Some(param), "{messages}");
        }
    }

    #[test]
    fn text_parts_are_joined_and_every_role_passes() {
        let mut list = vec![
            json!({"role": "developer", "content": "be brief"}),
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "assistant", "content": null, "tool_calls": []}),
            json!({"role": "tool", "content": "42", "tool_call_id": "c1"}),
            json!({"role": "system", "content": []}),
        ];
        normalize(&mut list).expect("valid");
        assert_eq!(list[1]["content"], "a\nb");
        assert_eq!(list[4]["content"], "");
        // Roles, contents and ids: 17 + 7 + 9 + 8 + 6.
        assert_eq!(text_chars(&Value::Array(list)), 47);
    }
}
