//! WebSocket echo round trips with many sockets open: `sockets` WebSockets
//! are opened through the target (with the given `Cookie`), then messages
//! are sent at a fixed total `rate` spread evenly over them (socket j sends
//! at t0 + (j + m·sockets)/rate, m = 0, 1, …), like keystrokes of many
//! users; each socket has one message in flight at a time. The round trip
//! is timed from the send to the echo. A socket whose echo comes after its
//! next turn sends at once and the turn counts as late. The first `warmup`
//! seconds are not recorded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What one run measured.
pub struct Outcome {
    /// Round trips in µs (after the warm-up).
    pub rtt_us: Vec<f64>,
    pub late: u64,
    pub errors: u64,
    pub seconds: f64,
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str, cookie: Option<&str>) -> anyhow::Result<Socket> {
    let mut request = url.into_client_request()?;
    if let Some(c) = cookie {
        request.headers_mut().insert("cookie", c.parse()?);
    }
    let (socket, resp) = tokio_tungstenite::connect_async(request).await?;
    anyhow::ensure!(resp.status() == 101, "expected 101, got {}", resp.status());
    Ok(socket)
}

pub async fn run(
    url: &str,
    cookie: Option<&str>,
    sockets: usize,
    rate: f64,
    size: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Outcome> {
    // Open them all first, 64 handshakes at a time.
    let gate = Arc::new(Semaphore::new(64));
    let mut opening = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let (gate, url, cookie) = (gate.clone(), url.to_string(), cookie.map(str::to_string));
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            open(&url, cookie.as_deref()).await
        }));
    }
    let mut open_sockets = Vec::with_capacity(sockets);
    for (i, o) in opening.into_iter().enumerate() {
        open_sockets.push(o.await?.with_context(|| format!("opening WebSocket {i} of {sockets} to {url}"))?);
    }

    let period = Duration::from_secs_f64(sockets as f64 / rate);
    let t0 = tokio::time::Instant::now() + Duration::from_millis(100);
    let record_from = t0 + warmup;
    let end = record_from + duration;
    let payload = "k".repeat(size);
    let rtts = Arc::new(Mutex::new(Vec::<f64>::with_capacity((rate * duration.as_secs_f64()) as usize + 16)));
    let late = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(sockets);
    for (j, mut socket) in open_sockets.into_iter().enumerate() {
        let (rtts, late, errors, payload) = (rtts.clone(), late.clone(), errors.clone(), payload.clone());
        let first = t0 + Duration::from_secs_f64(j as f64 / rate);
        tasks.push(tokio::spawn(async move {
            let mut next = first;
            let mut mine = Vec::new();
            while next < end {
                let now = tokio::time::Instant::now();
                if now < next {
                    tokio::time::sleep_until(next).await;
                } else if now > next + period {
                    late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let sent = Instant::now();
                let record = tokio::time::Instant::now() >= record_from;
                if socket.send(Message::text(payload.as_str())).await.is_err() {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
                loop {
                    match socket.next().await {
                        Some(Ok(Message::Text(t))) if t.len() == payload.len() => break,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        _ => {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return;
                        }
                    }
                }
                if record {
                    mine.push(sent.elapsed().as_secs_f64() * 1e6);
                }
                next += period;
            }
            let _ = socket.close(None).await;
            rtts.lock().extend(mine);
        }));
    }
    for t in tasks {
        t.await?;
    }
    let rtt_us = std::mem::take(&mut *rtts.lock());
    Ok(Outcome {
        rtt_us,
        late: late.load(std::sync::atomic::Ordering::Relaxed),
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        seconds: duration.as_secs_f64(),
    })
}
