//! A minimal HTTP/1.1 client over raw TCP: the soak needs exact control of what goes on the wire
//! (half-sent headers, slow bodies, dropped streams), which a full client library hides.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The status and body of one `Connection: close` exchange, within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        parse(&raw)
    };
    tokio::time::timeout(timeout, exchange).await.context("timed out")?
}

fn parse(raw: &[u8]) -> Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let status = head.split(' ').nth(1).context("no status")?.parse().context("status")?;
    Ok((status, body.to_string()))
}

/// Starts a streamed request, reads `bytes` of the answer, then drops the connection.
pub async fn disconnect_after(addr: SocketAddr, path: &str, body: &[u8], bytes: usize) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = vec![0u8; bytes.max(1)];
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
    Ok(())
}

/// Opens a connection, sends `prefix` and then nothing for `hold`: a stalled or idle client.
pub async fn stall(addr: SocketAddr, prefix: &[u8], hold: Duration) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(prefix).await?;
    let mut buf = [0u8; 256];
    // Returns early when the server closes the connection (what its timeouts should do).
    let _ = tokio::time::timeout(hold, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}
