//! Connection limits (issue #21): stalled connections (partial headers, a slow body, an idle
//! keep-alive) are closed after their timeout, the open-connection cap holds new connections
//! until one closes without breaking `/health`, and errors produced outside the handlers (404,
//! 405, 413, 408, malformed bodies) are OpenAI JSON.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{http, server_with};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Far above every timeout these tests set: a connection still open then was never closed.
const BOUND: Duration = Duration::from_secs(30);

/// Sends `raw` and reads until the server closes the connection.
async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(raw).await?;
    read_until_closed(&mut s).await
}

async fn read_until_closed(s: &mut TcpStream) -> Result<String> {
    let mut out = Vec::new();
    tokio::time::timeout(BOUND, s.read_to_end(&mut out))
        .await
        .context("the server left the connection open")??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `(status, error object)` of a raw response, which must be OpenAI's error format.
fn openai_error(raw: &str) -> Result<(u16, Value)> {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("no response: {raw:?}"))?;
    let status: u16 = head.split(' ').nth(1).context("status")?.parse()?;
    let v: Value = serde_json::from_str(body).with_context(|| format!("not JSON: {raw}"))?;
    let err = v["error"]
        .as_object()
        .with_context(|| format!("no error object: {raw}"))?;
    for key in ["message", "type", "param", "code"] {
        ensure!(err.contains_key(key), "error lacks {key}: {raw}");
    }
    ensure!(err["message"].is_string() && err["type"].is_string(), "{raw}");
    Ok((status, v["error"].clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_closed_after_their_timeouts() -> Result<()> {
    let srv = server_with(None, 8, |o| {
        o.connections.header_read_timeout = Duration::from_millis(500);
        o.connections.body_read_timeout = Duration::from_millis(500);
    })
    .await?;
    // Partial headers.
    let raw = exchange(srv.addr, b"GET /health HTTP/1.1\r\nHost: localhost\r\n").await?;
    ensure!(
        !raw.contains("200 OK"),
        "a request without its end of headers was answered: {raw}"
    );
    // An idle keep-alive connection, after its answer.
    let raw = exchange(srv.addr, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await?;
    ensure!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    // A body that stops short of its Content-Length.
    let raw = exchange(
        srv.addr,
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":",
    )
    .await?;
    let (status, err) = openai_error(&raw)?;
    ensure!(status == 408 && err["code"] == "request_timeout", "{raw}");
    // Requests that keep to the limits still work.
    let body = r#"{"model": "base", "prompt": "hi", "max_tokens": 2}"#;
    let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(body), None).await?;
    ensure!(status == 200, "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_new_ones_wait_until_one_closes() -> Result<()> {
    let srv = server_with(None, 8, |o| {
        o.connections.max_connections = 3;
        o.connections.header_read_timeout = Duration::from_secs(60);
    })
    .await?;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(srv.addr).await?);
    }
    let addr = srv.addr;
    let mut health = tokio::spawn(async move { http(addr, "GET", "/health", None, None).await });
    ensure!(
        tokio::time::timeout(Duration::from_millis(500), &mut health)
            .await
            .is_err(),
        "a fourth connection was served while three were open"
    );
    drop(idle);
    let (status, text) = tokio::time::timeout(BOUND, health)
        .await
        .context("/health never answered")???;
    ensure!(status == 200, "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_once_a_flood_of_idle_connections_times_out() -> Result<()> {
    let srv = server_with(None, 8, |o| {
        o.connections.max_connections = 4;
        o.connections.header_read_timeout = Duration::from_millis(500);
    })
    .await?;
    // Twice the limit, never sending a byte, and never closed by the client.
    let mut flood = Vec::new();
    for _ in 0..8 {
        flood.push(TcpStream::connect(srv.addr).await?);
    }
    let (status, text) = tokio::time::timeout(BOUND, http(srv.addr, "GET", "/health", None, None))
        .await
        .context("/health never answered")??;
    ensure!(status == 200, "{text}");
    for mut s in flood {
        let mut buf = Vec::new();
        tokio::time::timeout(BOUND, s.read_to_end(&mut buf))
            .await
            .context("an idle connection was left open")??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_outside_the_handlers_are_openai_json() -> Result<()> {
    let srv = server_with(None, 8, |o| o.max_body_bytes = 1024).await?;
    let addr = srv.addr;
    let send = |raw: String| async move { exchange(addr, raw.as_bytes()).await };
    let head = |method: &str, path: &str, extra: &str| {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}")
    };

    let raw = send(head("GET", "/v1/completions", "\r\n")).await?;
    let (status, err) = openai_error(&raw)?;
    ensure!(status == 405 && err["code"] == "method_not_allowed", "{raw}");
    ensure!(
        raw.to_ascii_lowercase().contains("\r\nallow: post"),
        "no Allow header: {raw}"
    );

    let raw = send(head("GET", "/v2/nothing", "\r\n")).await?;
    let (status, err) = openai_error(&raw)?;
    ensure!(status == 404 && err["code"] == "not_found", "{raw}");

    // Too large by Content-Length (refused before the body is read), and by what arrives chunked.
    let big = "x".repeat(2000);
    let raw = send(format!(
        "{}Content-Length: 2000\r\n\r\n{big}",
        head("POST", "/v1/completions", "")
    ))
    .await?;
    let (status, err) = openai_error(&raw)?;
    ensure!(
        status == 413 && err["message"].as_str().is_some_and(|m| m.contains("1024")),
        "{raw}"
    );
    let raw = send(format!(
        "{}Transfer-Encoding: chunked\r\n\r\n7d0\r\n{big}\r\n0\r\n\r\n",
        head("POST", "/v1/chat/completions", "")
    ))
    .await?;
    ensure!(openai_error(&raw)?.0 == 413, "{raw}");

    // A malformed chunked encoding.
    let raw = send(format!(
        "{}Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n",
        head("POST", "/v1/completions", "")
    ))
    .await?;
    let (status, err) = openai_error(&raw)?;
    ensure!(status == 400 && err["type"] == "invalid_request_error", "{raw}");

    // Bodies within the limit, chunked or not, still reach the handlers.
    let body = r#"{"model": "base", "prompt": "hi", "max_tokens": 1}"#;
    let raw = send(format!(
        "{}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        head("POST", "/v1/completions", ""),
        body.len()
    ))
    .await?;
    ensure!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(body), None).await?;
    ensure!(status == 200, "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_still_streaming_outlives_the_timeouts() -> Result<()> {
    let timeout = Duration::from_millis(50);
    // Admission counts choices: room for this request's 16.
    let srv = server_with(None, 32, |o| {
        o.connections.header_read_timeout = timeout;
        o.connections.body_read_timeout = timeout;
    })
    .await?;
    // Megabytes of SSE frames to a client that reads nothing for a while: the server's writes
    // wait on the client, so the response is still running when the timeouts have long passed.
    let tokens = srv.state.engine.validator().limits().max_model_len - 64;
    let body = serde_json::json!({"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": tokens, "ignore_eos": true, "stream": true, "n": 16,
                                  "logprobs": true, "top_logprobs": 20})
    .to_string();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut s = socket.connect(srv.addr).await?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    tokio::time::sleep(timeout * 10).await;
    ensure!(
        srv.state.admission.available_permits() < 32,
        "the response was over (or cut) while its client read nothing; it must still be running \
         here for this test to mean anything"
    );
    let raw = read_until_closed(&mut s).await?;
    let finished = raw.matches("\"finish_reason\":\"length\"").count();
    ensure!(
        finished == 16 && raw.contains("data: [DONE]"),
        "a streamed response was cut ({finished} choices finished, {} bytes): {}",
        raw.len(),
        &raw[..raw.len().min(1000)]
    );
    Ok(())
}
