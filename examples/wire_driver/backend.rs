//! The backend of `bench/wire.sh`: as cheap as a backend can be, so that
//! the proxies' costs show. `GET /bench` ("ok", `x-backend: bench`, what
//! `bench/lib.sh::known_session` checks), `GET /ws` (WebSocket echo, no
//! greeting), `POST /upload` (reads and discards the body; answers the byte
//! count as JSON), `GET /download?bytes=N` (N bytes from one shared buffer,
//! no copying, with a Content-Length).

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use futures::StreamExt;
use serde::Deserialize;

/// Download chunk size (one buffer, shared by reference count).
const CHUNK: usize = 256 * 1024;

fn tagged(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert("x-backend", HeaderValue::from_static("bench"));
    resp
}

async fn bench() -> Response {
    tagged(StatusCode::OK, "ok")
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(echo)
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => return,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}

async fn upload(req: Request) -> Response {
    let mut body = req.into_body().into_data_stream();
    let mut bytes: u64 = 0;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => bytes += c.len() as u64,
            Err(e) => return tagged(StatusCode::BAD_REQUEST, format!("upload failed after {bytes} bytes: {e}\n")),
        }
    }
    let mut resp = tagged(StatusCode::OK, format!("{{\"bytes\":{bytes}}}"));
    resp.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

#[derive(Deserialize)]
struct DownloadParams {
    bytes: u64,
}

async fn download(Query(p): Query<DownloadParams>) -> Response {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let total = p.bytes;
    let stream = futures::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            if sent >= total {
                return None;
            }
            let n = (CHUNK as u64).min(total - sent) as usize;
            Some((Ok::<_, Infallible>(chunk.slice(..n)), sent + n as u64))
        }
    });
    let mut resp = tagged(StatusCode::OK, Body::from_stream(stream));
    resp.headers_mut().insert("content-length", HeaderValue::from(total));
    resp.headers_mut().insert("content-type", HeaderValue::from_static("application/octet-stream"));
    resp
}

/// Serve until killed, on `threads` runtime threads.
pub fn serve(listen: SocketAddr, threads: usize) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/bench", get(bench))
        .route("/ws", get(ws))
        .route("/upload", post(upload))
        .route("/download", get(download));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        eprintln!("wire backend listening on {listen}");
        axum::serve(listener, app).await?;
        Ok(())
    })
}
