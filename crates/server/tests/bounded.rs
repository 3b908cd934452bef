//! Bounded work per request, through HTTP: caps on prompts, characters and prompt tokens (each a
//! 400 naming the field), admission by choices (400 if a request can never fit, 429 with
//! Retry-After if not now), queued choices dropped when their client goes away, tokenization
//! that leaves `/health` answering, and `messages` checked entry by entry.

mod common;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use common::{error_code, http, json_of, server};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn post(addr: std::net::SocketAddr, path: &str, body: &Value) -> Result<(u16, String)> {
    http(addr, "POST", path, Some(&body.to_string()), None).await
}

/// The status and `param` of an OpenAI error answer.
async fn refusal(addr: std::net::SocketAddr, path: &str, body: &Value) -> Result<(u16, Value)> {
    let (status, text) = post(addr, path, body).await?;
    let (status, err) = error_code(status, &text)?;
    Ok((status, err["param"].clone()))
}

/// Sends a request on a raw socket and returns the response head (status line and headers).
async fn head_of(addr: std::net::SocketAddr, path: &str, body: &Value) -> Result<String> {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw)?;
    Ok(text.split("\r\n\r\n").next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_800k_sequence_body_is_a_400_and_requests_at_the_caps_run() -> Result<()> {
    let srv = server(None, 1024).await?;
    let addr = srv.addr;
    // The attack: 50,000 prompts × n 16.
    let attack = json!({"model": "base", "prompt": vec![[5, 6, 7]; 50_000], "n": 16, "max_tokens": 1});
    ensure!(refusal(addr, "/v1/completions", &attack).await? == (400, json!("prompt")));
    let over = json!({"model": "base", "prompt": vec![[5, 6, 7]; 65], "max_tokens": 1});
    ensure!(refusal(addr, "/v1/completions", &over).await? == (400, json!("prompt")));
    let stats = srv.state.engine.stats()?.await?;
    ensure!(
        stats.waiting == 0 && stats.running == 0,
        "a refused request reached the engine"
    );

    // At the caps: 64 prompts × n 16 = 1,024 choices.
    let at_cap = json!({"model": "base", "prompt": vec![[5, 6, 7]; 64], "n": 16, "max_tokens": 1});
    let (status, text) = post(addr, "/v1/completions", &at_cap).await?;
    ensure!(status == 200, "{status} {text}");
    let choices = json_of(&text)?["choices"].as_array().context("choices")?.len();
    ensure!(choices == 1024, "{choices} choices");

    // Prompt tokens, counted per choice: the default cap is 16 × max_model_len (256 here).
    let long: Vec<u32> = (0..250).map(|t| t % 300 + 5).collect();
    let fits = json!({"model": "base", "prompt": long, "n": 16, "max_tokens": 1});
    let (status, text) = post(addr, "/v1/completions", &fits).await?;
    ensure!(status == 200, "one prompt at n = 16 always fits: {status} {text}");
    let too_much = json!({"model": "base", "prompt": [long, long], "n": 16, "max_tokens": 1});
    let (status, text) = post(addr, "/v1/completions", &too_much).await?;
    let (status, err) = error_code(status, &text)?;
    ensure!(
        status == 400 && err["param"] == "prompt" && err["message"].as_str().is_some_and(|m| m.contains("8000")),
        "{text}"
    );

    // Characters, before any tokenizer work (default 1,000,000 per request).
    let big = "a".repeat(1_000_001);
    let text_prompt = json!({"model": "base", "prompt": big, "max_tokens": 1});
    ensure!(refusal(addr, "/v1/completions", &text_prompt).await? == (400, json!("prompt")));
    let halves = json!({"model": "base", "prompt": [&big[..500_001], &big[..500_000]], "max_tokens": 1});
    ensure!(refusal(addr, "/v1/completions", &halves).await? == (400, json!("prompt")));
    let chat = json!({"model": "base", "messages": [{"role": "user", "content": big}], "max_tokens": 1});
    ensure!(refusal(addr, "/v1/chat/completions", &chat).await? == (400, json!("messages")));
    let parts = json!({"model": "base", "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "text", "text": &big[..600_000]}, {"type": "text", "text": &big[..400_001]}]}]});
    ensure!(refusal(addr, "/v1/chat/completions", &parts).await? == (400, json!("messages")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_counts_choices_and_429_says_when_to_retry() -> Result<()> {
    let srv = server(None, 4).await?;
    let addr = srv.addr;
    let ask = |n: u32| json!({"model": "base", "prompt": "hi", "n": n, "max_tokens": 1});
    // Five choices can never fit in four.
    ensure!(refusal(addr, "/v1/completions", &ask(5)).await? == (400, json!("n")));
    let two_prompts = json!({"model": "base", "prompt": ["a", "b"], "n": 3, "max_tokens": 1});
    ensure!(refusal(addr, "/v1/completions", &two_prompts).await? == (400, json!("n")));
    // Three of the four slots busy: two choices wait for later, one fits now.
    let held = srv.state.admission.clone().try_acquire_many_owned(3)?;
    let head = head_of(addr, "/v1/completions", &ask(2)).await?;
    ensure!(head.starts_with("HTTP/1.1 429"), "{head}");
    ensure!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    let (status, text) = post(addr, "/v1/completions", &ask(1)).await?;
    ensure!(status == 200, "{status} {text}");
    let chat = json!({"model": "base", "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 1});
    let (status, text) = post(addr, "/v1/chat/completions", &chat).await?;
    ensure!(error_code(status, &text)?.0 == 429, "{status} {text}");
    drop(held);
    let (status, text) = post(addr, "/v1/completions", &ask(4)).await?;
    ensure!(status == 200, "{status} {text}");
    ensure!(srv.state.admission.available_permits() == 4, "every permit came back");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_choices_leave_when_their_client_goes() -> Result<()> {
    let srv = server(None, 1024).await?;
    // 1,024 choices, 64 running at a time: most wait in the queue.
    let body = json!({"model": "base", "prompt": vec![[5, 6, 7]; 64], "n": 16, "max_tokens": 100,
                      "ignore_eos": true})
    .to_string();
    let mut s = TcpStream::connect(srv.addr).await?;
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut queued = false;
    for _ in 0..200 {
        let st = srv.state.engine.stats()?.await?;
        if st.waiting > 0 {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ensure!(queued, "the request never queued");
    drop(s);
    for _ in 0..400 {
        let st = srv.state.engine.stats()?.await?;
        if st.waiting == 0 && st.running == 0 {
            ensure!(st.cancelled == 1, "cancelled {}", st.cancelled);
            let aborted = st.requests.finished.get("abort").copied().unwrap_or(0);
            ensure!(aborted == 1024, "{aborted} choices aborted");
            ensure!(srv.state.admission.available_permits() == 1024, "permits returned");
            // Far fewer tokens than 1,024 × 100: queued choices never ran.
            ensure!(st.requests.generation_tokens < 100 * 1024 / 2, "{st:?}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("the gone client's choices stayed queued")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn health_answers_while_large_prompts_tokenize() -> Result<()> {
    let srv = server(None, 64).await?;
    let slots = srv.state.tokenizer_slots.available_permits();
    // A slot for every core taken: a request waits for one, off the async workers.
    let all = srv
        .state
        .tokenizer_slots
        .clone()
        .acquire_many_owned(slots as u32)
        .await?;
    let addr = srv.addr;
    let waiting = tokio::spawn(async move {
        post(
            addr,
            "/v1/completions",
            &json!({"model": "base", "prompt": "hello there", "max_tokens": 1}),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = http(addr, "GET", "/health", None, None).await?;
    ensure!(
        status == 200 && !waiting.is_finished(),
        "health {status}, request done early"
    );
    drop(all);
    let (status, text) = waiting.await??;
    ensure!(status == 200, "{status} {text}");

    // Prompts near the character cap, more than there are slots, tokenizing on the blocking pool
    // while the runtime's only worker answers /health.
    let words: String = (0..150_000).map(|i| format!("w{} ", i % 977)).collect();
    let mut jobs = Vec::new();
    for _ in 0..slots + 2 {
        let body = json!({"model": "base", "prompt": words, "max_tokens": 1});
        jobs.push(tokio::spawn(async move { post(addr, "/v1/completions", &body).await }));
    }
    let mut checked = 0;
    for _ in 0..1000 {
        if srv.state.tokenizer_slots.available_permits() < slots {
            let (status, _) = http(addr, "GET", "/health", None, None).await?;
            ensure!(status == 200, "health {status}");
            if srv.state.tokenizer_slots.available_permits() < slots {
                checked += 1;
            }
        }
        if jobs.iter().all(|j| j.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ensure!(checked > 0, "/health never answered while a prompt was tokenizing");
    for j in jobs {
        // Far longer than the context: refused once tokenized.
        let (status, text) = j.await??;
        ensure!(error_code(status, &text)?.1["param"] == "prompt", "{text}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_checked_entry_by_entry_and_text_parts_flattened() -> Result<()> {
    let srv = server(None, 64).await?;
    let addr = srv.addr;
    for (messages, param) in [
        (json!([1]), "messages[0]"),
        (json!([null]), "messages[0]"),
        (json!([{}]), "messages[0].role"),
        (json!([{"role": 5, "content": "x"}]), "messages[0].role"),
        (
            json!([{"role": "user", "content": "x"}, {"role": "hacker", "content": "x"}]),
            "messages[1].role",
        ),
        (
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
            "messages[0].content[0].type",
        ),
        (
            json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]),
            "messages[0].content[0].type",
        ),
    ] {
        let body = json!({"model": "base", "messages": messages, "max_tokens": 1});
        let got = refusal(addr, "/v1/chat/completions", &body).await?;
        ensure!(got == (400, json!(param)), "{messages}: {got:?}");
    }
    // Text parts read as their texts joined with "\n".
    let ask = |content: Value| {
        json!({"model": "base", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
               "max_tokens": 4, "temperature": 0})
    };
    let mut texts = Vec::new();
    for content in [
        json!("Hello\nworld"),
        json!([{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]),
    ] {
        let (status, text) = post(addr, "/v1/chat/completions", &ask(content)).await?;
        ensure!(status == 200, "{status} {text}");
        let v = json_of(&text)?;
        texts.push((
            v["choices"][0]["message"]["content"].clone(),
            v["usage"]["prompt_tokens"].clone(),
        ));
    }
    ensure!(texts[0] == texts[1], "{texts:?}");
    Ok(())
}
