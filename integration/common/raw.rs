//! Raw HTTP/1.x over TCP, for requests an HTTP client library will not send
//! (HTTP/1.0 without Host, CR/LF or NUL in headers, half a request), from a
//! chosen 127.0.0.x source address.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A response read until the server closed the connection (or `timeout`).
#[derive(Debug, Clone)]
pub struct RawReply {
    /// 0 when no status line came back (closed or timed out first).
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }

    /// A header of the response (first value, case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Connect to `to`, from `from` (an IP on the loopback network) when given.
pub async fn connect(to: SocketAddr, from: Option<&str>) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = from {
        socket.bind(format!("{ip}:0").parse().unwrap())?;
    }
    socket.connect(to).await
}

/// Send `request` (bytes as given) and read the answer until the server
/// closes the connection or `timeout` passes. Requests should say
/// `Connection: close` (or be HTTP/1.0) so that the server closes.
pub async fn send(to: SocketAddr, from: Option<&str>, request: &[u8], timeout: Duration) -> std::io::Result<RawReply> {
    let mut stream = connect(to, from).await?;
    stream.write_all(request).await?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(timeout, async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    Ok(parse(&buf))
}

/// Split a raw response into status, head and (de-chunked) body.
pub fn parse(buf: &[u8]) -> RawReply {
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let (head, body) = match split {
        Some(i) => (String::from_utf8_lossy(&buf[..i]).to_string(), buf[i + 4..].to_vec()),
        None => (String::from_utf8_lossy(buf).to_string(), Vec::new()),
    };
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked { dechunk(&body) } else { body };
    RawReply { status, head, body }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = std::str::from_utf8(&data[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
}
