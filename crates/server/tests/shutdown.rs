//! Shutdown with a deadline (issue #21): a client stalled in its headers is closed at once, one
//! stalled in its body cannot hold `serve` past `shutdown_timeout`, a running generation that
//! fits in it finishes, one that does not is cancelled, and a request that arrives during the
//! drain gets 503.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{http, server_with, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Slack for `serve` to return after its deadline (tasks to wind down on a busy machine).
const SLACK: Duration = Duration::from_secs(10);
/// Admission slots (choices): room for the 16 choices of the long streamed request.
const ROOM: usize = 32;

async fn stop_and_wait(srv: &mut Server, within: Duration) -> Result<()> {
    srv.stop.take().context("stopped twice")?.send(()).ok();
    tokio::time::timeout(within, &mut srv.serving)
        .await
        .context("serve did not return within its deadline")???;
    Ok(())
}

/// Starts a streamed chat completion of megabytes (16 choices with top log-probabilities) from a
/// client with a tiny receive buffer, and returns once its first frame has arrived, with what was
/// read so far. While the client reads nothing more, the server's writes wait: the response stays
/// in progress for as long as the test needs.
async fn start_stream(srv: &Server) -> Result<(TcpStream, String)> {
    let tokens = srv.state.engine.validator().limits().max_model_len - 64;
    let body = serde_json::json!({"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": tokens, "ignore_eos": true, "stream": true, "n": 16,
                                  "logprobs": true, "top_logprobs": 20})
    .to_string();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut s = socket.connect(srv.addr).await?;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: {") {
        let n = tokio::time::timeout(SLACK, s.read(&mut buf)).await??;
        ensure!(
            n > 0,
            "closed before the first frame: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    Ok((s, String::from_utf8_lossy(&seen).into_owned()))
}

/// Whether the streamed request still holds its admission permit (its response is not over).
fn in_progress(srv: &Server) -> bool {
    srv.state.admission.available_permits() < ROOM
}

async fn read_rest(s: &mut TcpStream, mut seen: String) -> Result<String> {
    let mut rest = Vec::new();
    // A cancelled stream may end in a reset rather than a clean close: both end it.
    let _ = tokio::time::timeout(SLACK, s.read_to_end(&mut rest))
        .await
        .context("the stream was left open")?;
    seen.push_str(&String::from_utf8_lossy(&rest));
    Ok(seen)
}

/// Opens a connection, sends `raw` and returns once the server has accepted it.
async fn stall(srv: &Server, raw: &[u8]) -> Result<TcpStream> {
    let mut stalled = TcpStream::connect(srv.addr).await?;
    stalled.write_all(raw).await?;
    // Connections are accepted in order: once this one is answered, the stalled one is open.
    let (status, _) = http(srv.addr, "GET", "/health", None, None).await?;
    ensure!(status == 200);
    Ok(stalled)
}

async fn closed(mut s: TcpStream) -> Result<()> {
    let mut rest = Vec::new();
    // Closed or reset: either ends it.
    let _ = tokio::time::timeout(SLACK, s.read_to_end(&mut rest))
        .await
        .context("the stalled connection outlived serve")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_in_its_headers_does_not_hold_shutdown() -> Result<()> {
    let mut srv = server_with(None, ROOM, |o| {
        // Both far longer than the test: the stalled connection has no request in progress, so
        // the drain closes it at once.
        o.connections.header_read_timeout = Duration::from_secs(600);
        o.connections.shutdown_timeout = Duration::from_secs(600);
    })
    .await?;
    let stalled = stall(&srv, b"GET /health HTTP/1.1\r\nHost: localhost\r\n").await?;
    stop_and_wait(&mut srv, SLACK).await?;
    closed(stalled).await?;
    ensure!(
        TcpStream::connect(srv.addr).await.is_err(),
        "still accepting after shutdown"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_in_its_body_is_cut_at_the_deadline() -> Result<()> {
    let deadline = Duration::from_millis(500);
    let mut srv = server_with(None, ROOM, |o| {
        // Far longer than the test: only the shutdown deadline can end the stall.
        o.connections.body_read_timeout = Duration::from_secs(600);
        o.connections.shutdown_timeout = deadline;
    })
    .await?;
    let stalled = stall(
        &srv,
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{",
    )
    .await?;
    stop_and_wait(&mut srv, deadline + SLACK).await?;
    closed(stalled).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_running_at_shutdown_finishes_within_the_deadline() -> Result<()> {
    let mut srv = server_with(None, ROOM, |o| o.connections.shutdown_timeout = Duration::from_secs(60)).await?;
    let (mut stream, seen) = start_stream(&srv).await?;
    srv.stop.take().context("stop")?.send(()).ok();
    tokio::time::timeout(SLACK, async {
        while !srv.state.draining.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("never started draining")?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(in_progress(&srv), "the response was over before the drain could matter");
    ensure!(!srv.serving.is_finished(), "serve returned with a response in progress");
    // The client reads again: the response completes, then serve returns.
    let text = read_rest(&mut stream, seen).await?;
    tokio::time::timeout(Duration::from_secs(60) + SLACK, &mut srv.serving).await???;
    ensure!(text.starts_with("HTTP/1.1 200"), "{}", &text[..text.len().min(1000)]);
    let finished = text.matches("\"finish_reason\":\"length\"").count();
    ensure!(
        finished == 16 && text.contains("data: [DONE]"),
        "the drained generation did not finish: {finished} choices, {} bytes",
        text.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_past_the_deadline_is_cancelled() -> Result<()> {
    let mut srv = server_with(None, ROOM, |o| o.connections.shutdown_timeout = Duration::ZERO).await?;
    let (mut stream, seen) = start_stream(&srv).await?;
    ensure!(in_progress(&srv), "the response was over before the shutdown");
    stop_and_wait(&mut srv, SLACK).await?;
    let text = read_rest(&mut stream, seen).await?;
    ensure!(
        !text.contains("data: [DONE]"),
        "a generation outlived a zero deadline ({} bytes)",
        text.len()
    );
    // Its permit came back with the cancelled response.
    let permits = tokio::time::timeout(SLACK, srv.state.admission.acquire_many(ROOM as u32)).await;
    ensure!(
        permits.is_ok(),
        "the cancelled request still holds its admission permit"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_arriving_during_the_drain_gets_503() -> Result<()> {
    let mut srv = server_with(None, ROOM, |o| o.connections.shutdown_timeout = Duration::from_secs(60)).await?;
    // A request whose body is still arriving when the drain starts.
    let body = r#"{"model": "base", "prompt": "hi", "max_tokens": 1}"#;
    let (first, last) = body.split_at(10);
    let mut s = TcpStream::connect(srv.addr).await?;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{first}",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    let (status, _) = http(srv.addr, "GET", "/health", None, None).await?;
    ensure!(status == 200);
    srv.stop.take().context("stop")?.send(()).ok();
    tokio::time::timeout(SLACK, async {
        while !srv.state.draining.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("never started draining")?;
    s.write_all(last.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(SLACK, s.read_to_end(&mut raw)).await??;
    let raw = String::from_utf8_lossy(&raw);
    let (_, json) = raw.split_once("\r\n\r\n").context("no response")?;
    let (status, err) = common::error_code(raw[9..12].parse()?, json)?;
    ensure!(status == 503 && err["code"] == "shutting_down", "{raw}");
    tokio::time::timeout(SLACK, &mut srv.serving).await???;
    Ok(())
}
