//! The request lifecycle through HTTP: every field OpenAI defines is honoured, a no-op, or a 400
//! naming it (streaming or not), and a stop string ends a choice as `stop` with vLLM's
//! `stop_reason`, counted as a success, never as a cancellation.

mod common;

use anyhow::{ensure, Context, Result};
use common::{error_code, http, json_of, server};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_unsupported_fields_are_400s_naming_them() -> Result<()> {
    let srv = server(None, 64).await?;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for stream in [false, true] {
        for (field, value) in [
            ("frobnicate", json!(1)),
            (
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
            ),
            ("logit_bias", json!({"5": 3})),
            ("tool_choice", json!("required")),
            ("include_stop_str_in_output", json!(true)),
        ] {
            let mut body = json!({"model": "base", "messages": msgs, "max_tokens": 1, "stream": stream});
            body[field] = value;
            let (status, text) = http(srv.addr, "POST", "/v1/chat/completions", Some(&body.to_string()), None).await?;
            let (status, err) = error_code(status, &text)?;
            ensure!(
                status == 400 && err["param"] == field,
                "{field} (stream {stream}): {status} {text}"
            );
        }
        let body = json!({"model": "base", "prompt": "x", "max_tokens": 1, "stream": stream, "best_of": 4});
        let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&body.to_string()), None).await?;
        ensure!(error_code(status, &text)?.1["param"] == "best_of", "{text}");
    }
    // Documented no-ops and default values pass.
    let body = json!({"model": "base", "messages": msgs, "max_tokens": 2, "user": "u", "metadata": {"k": "v"},
                      "store": false, "response_format": {"type": "text"}, "logit_bias": {}, "service_tier": "auto"});
    let (status, text) = http(srv.addr, "POST", "/v1/chat/completions", Some(&body.to_string()), None).await?;
    ensure!(status == 200, "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_string_is_a_stop_not_a_cancellation() -> Result<()> {
    let srv = server(None, 64).await?;
    let ask = |stop: Option<&str>, stream: bool| {
        let mut b = json!({"model": "base", "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0,
                           "stream": stream});
        if let Some(s) = stop {
            b["stop"] = json!([s]);
        }
        b.to_string()
    };
    let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&ask(None, false)), None).await?;
    ensure!(status == 200, "{text}");
    let full = json_of(&text)?["choices"][0]["text"]
        .as_str()
        .context("text")?
        .to_string();
    let chars: Vec<char> = full.chars().collect();
    ensure!(chars.len() >= 4, "too little output to cut: {full:?}");
    let stop: String = chars[2..4].iter().collect();
    let want = &full[..full.find(&stop).context("stop")?];

    let (status, text) = http(
        srv.addr,
        "POST",
        "/v1/completions",
        Some(&ask(Some(&stop), false)),
        None,
    )
    .await?;
    ensure!(status == 200, "{text}");
    let choice = &json_of(&text)?["choices"][0];
    ensure!(
        choice["text"] == want && choice["finish_reason"] == "stop" && choice["stop_reason"] == stop.as_str(),
        "{choice}"
    );
    // Streamed: the same text, and the last choice frame says stop.
    let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&ask(Some(&stop), true)), None).await?;
    ensure!(status == 200, "{text}");
    let frames: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|f| *f != "[DONE]")
        .map(json_of)
        .collect::<Result<_>>()?;
    let streamed: String = frames.iter().filter_map(|f| f["choices"][0]["text"].as_str()).collect();
    ensure!(streamed == want, "{streamed:?} vs {want:?}");
    ensure!(
        frames.last().context("frames")?["choices"][0]["finish_reason"] == "stop",
        "{text}"
    );

    let (_, metrics) = http(srv.addr, "GET", "/metrics", None, None).await?;
    for needle in [
        "vllm:request_success_total{model_name=\"base\",finished_reason=\"stop\"} 2",
        "vllm:request_success_total{model_name=\"base\",finished_reason=\"length\"} 1",
        "vllm:request_success_total{model_name=\"base\",finished_reason=\"abort\"} 0",
    ] {
        ensure!(metrics.contains(needle), "metrics lack {needle}:\n{metrics}");
    }
    let stats = srv.state.engine.stats()?.await?;
    ensure!(stats.cancelled == 0, "a stop string is not a cancellation: {stats:?}");
    Ok(())
}
