//! `sessionlb-demo-backend`: a small stand-in for an IDE server, for the
//! quick start, the multi-node tests and the benchmarks.
//!
//! It says which backend it is on every response (`X-Backend` header) and
//! mints Workbench-style session keys: `GET /new-session` returns a fresh
//! `/s/<key>/` URL, and `/s/<key>/...` answers 200 only for keys this
//! backend minted (404 otherwise), as a real IDE server would.
//!
//! With `--tls-cert FILE --tls-key FILE` it serves https (as rserver with
//! `ssl-enabled=1` does).
//!
//! Routes: `/` and `/s/<key>/...` (text), `/new-session`, `/headers` (the
//! request headers as JSON), `/ws` and `/s/<key>/ws` (WebSocket echo, first
//! message `hello from <name>`), `/sse?events=N&interval_ms=M`,
//! `/download?bytes=N` (streamed), `POST /upload` (streamed; returns the
//! byte count and SHA-256), `/status/<code>`, `/bench` (2-byte body).
//!
//! With `--secure-cookie-key-file PATH` it signs users in the way Workbench
//! does: `/` and a minted `/s/<key>/…` without a valid signed `user-id`
//! cookie redirect (302) to `/auth-sign-in` (a form); `POST
//! /auth-do-sign-in` with `username=…` sets the `user-id` cookie (value,
//! expiry and HMAC-SHA256 with the key, as rserver signs it) and redirects
//! to `/`, which then greets the user.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{any, get, post};
use futures::StreamExt;
use parking_lot::Mutex;
use serde::Deserialize;
use sha2::{Digest, Sha256};

struct Backend {
    name: String,
    keys: Mutex<HashSet<String>>,
    /// Signs and verifies `user-id` cookies, when sign-in is on.
    sign_in: Option<hmac::Hmac<sha2::Sha256>>,
}

/// The signed-in user of a request, if its `user-id` cookie verifies.
fn signed_in_user(state: &Backend, headers: &axum::http::HeaderMap) -> Option<String> {
    let mac = state.sign_in.as_ref()?;
    let cookies = headers.get_all("cookie").iter().map(|v| v.as_bytes());
    let value = sessionlb::proxy::cookie::find_cookie(cookies, "user-id")?;
    sessionlb::proxy::identity::verify_workbench_cookie(mac, value, std::time::SystemTime::now()).ok()
}

type Shared = Arc<Backend>;

fn tagged(state: &Backend, status: StatusCode, body: impl Into<Body>) -> Response {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert("x-backend", HeaderValue::from_str(&state.name).expect("name is a header value"));
    resp
}

async fn root(State(s): State<Shared>, headers: axum::http::HeaderMap) -> Response {
    if s.sign_in.is_some() {
        return match signed_in_user(&s, &headers) {
            Some(user) => tagged(&s, StatusCode::OK, format!("backend {}: home of {user}\n", s.name)),
            None => redirect(&s, "/auth-sign-in", None),
        };
    }
    let body = format!("backend {}\n", s.name);
    tagged(&s, StatusCode::OK, body)
}

fn redirect(s: &Backend, to: &'static str, cookie: Option<String>) -> Response {
    let mut resp = tagged(s, StatusCode::FOUND, "");
    resp.headers_mut().insert("location", HeaderValue::from_static(to));
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert("set-cookie", c);
    }
    resp
}

async fn sign_in_page(State(s): State<Shared>) -> Response {
    if s.sign_in.is_none() {
        return tagged(&s, StatusCode::NOT_FOUND, "sign-in is off\n");
    }
    let page = "<!doctype html><form method=post action=/auth-do-sign-in>\
                <input name=username><input name=password type=password><button>Sign in</button></form>\n";
    let mut resp = tagged(&s, StatusCode::OK, page);
    resp.headers_mut().insert("content-type", HeaderValue::from_static("text/html"));
    resp
}

#[derive(Deserialize)]
struct SignIn {
    username: String,
}

async fn do_sign_in(State(s): State<Shared>, axum::Form(form): axum::Form<SignIn>) -> Response {
    let Some(mac) = &s.sign_in else {
        return tagged(&s, StatusCode::NOT_FOUND, "sign-in is off\n");
    };
    let user = form.username.trim();
    if user.is_empty() {
        return redirect(&s, "/auth-sign-in", None);
    }
    let expires = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
    let value = sessionlb::proxy::identity::sign_workbench_cookie(mac, user, &expires);
    redirect(&s, "/", Some(format!("user-id={value}; Path=/; HttpOnly")))
}

async fn bench(State(s): State<Shared>) -> Response {
    tagged(&s, StatusCode::OK, "ok")
}

async fn new_session(State(s): State<Shared>) -> Response {
    // Workbench's shape: 5 hex (user) + 8 hex (project) + 8 hex (session).
    let key = hex::encode(rand::random::<[u8; 11]>())[..21].to_string();
    s.keys.lock().insert(key.clone());
    let body = serde_json::json!({ "key": key, "url": format!("/s/{key}/"), "backend": s.name }).to_string();
    let mut resp = tagged(&s, StatusCode::OK, body);
    resp.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

async fn session_page(
    State(s): State<Shared>,
    Path((key, rest)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if !s.keys.lock().contains(&key) {
        return tagged(&s, StatusCode::NOT_FOUND, format!("unknown session {key} on backend {}\n", s.name));
    }
    // Like Workbench: a session is for signed-in users only.
    if s.sign_in.is_some() && signed_in_user(&s, &headers).is_none() {
        return redirect(&s, "/auth-sign-in", None);
    }
    if rest == "ws" {
        return match ws {
            Ok(ws) => {
                let name = s.name.clone();
                ws.on_upgrade(move |socket| echo(socket, name))
            }
            Err(_) => tagged(&s, StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n"),
        };
    }
    tagged(&s, StatusCode::OK, format!("session {key} on backend {}: /{rest}\n", s.name))
}

async fn session_root(
    state: State<Shared>,
    Path(key): Path<String>,
    headers: axum::http::HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    session_page(state, Path((key, String::new())), headers, ws).await
}

async fn headers(State(s): State<Shared>, req: Request) -> Response {
    let mut map = serde_json::Map::new();
    for (name, value) in req.headers() {
        map.insert(
            name.as_str().to_string(),
            serde_json::Value::String(value.to_str().unwrap_or("<binary>").to_string()),
        );
    }
    let body = serde_json::json!({ "backend": s.name, "method": req.method().as_str(), "uri": req.uri().to_string(), "headers": map });
    tagged(&s, StatusCode::OK, body.to_string())
}

async fn ws_root(State(s): State<Shared>, ws: WebSocketUpgrade) -> Response {
    let name = s.name.clone();
    ws.on_upgrade(move |socket| echo(socket, name))
}

async fn echo(mut socket: WebSocket, name: String) {
    if socket.send(Message::Text(format!("hello from {name}").into())).await.is_err() {
        return;
    }
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(t) => Message::Text(t),
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => return,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}

#[derive(Deserialize)]
struct SseParams {
    events: Option<u32>,
    interval_ms: Option<u64>,
}

async fn sse(State(s): State<Shared>, Query(p): Query<SseParams>) -> Response {
    let events = p.events.unwrap_or(5);
    let interval = Duration::from_millis(p.interval_ms.unwrap_or(100));
    let name = s.name.clone();
    let stream = futures::stream::unfold(0u32, move |i| {
        let name = name.clone();
        async move {
            if i >= events {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            Some((Ok::<_, Infallible>(Bytes::from(format!("id: {i}\ndata: event {i} from {name}\n\n"))), i + 1))
        }
    });
    let mut resp = tagged(&s, StatusCode::OK, Body::from_stream(stream));
    resp.headers_mut().insert("content-type", HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

#[derive(Deserialize)]
struct DownloadParams {
    bytes: Option<u64>,
}

/// Deterministic content: byte i is `i % 251`.
async fn download(State(s): State<Shared>, Query(p): Query<DownloadParams>) -> Response {
    let total = p.bytes.unwrap_or(1 << 20);
    const CHUNK: u64 = 64 * 1024;
    let stream = futures::stream::unfold(0u64, move |sent| async move {
        if sent >= total {
            return None;
        }
        let n = CHUNK.min(total - sent);
        let chunk: Vec<u8> = (sent..sent + n).map(|i| (i % 251) as u8).collect();
        Some((Ok::<_, Infallible>(Bytes::from(chunk)), sent + n))
    });
    let mut resp = tagged(&s, StatusCode::OK, Body::from_stream(stream));
    resp.headers_mut().insert("content-length", HeaderValue::from(total));
    resp
}

async fn upload(State(s): State<Shared>, req: Request) -> Response {
    let mut body = req.into_body().into_data_stream();
    let mut hasher = Sha256::new();
    let mut bytes: u64 = 0;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                bytes += c.len() as u64;
                hasher.update(&c);
            }
            Err(e) => return tagged(&s, StatusCode::BAD_REQUEST, format!("upload failed: {e}\n")),
        }
    }
    let body = serde_json::json!({ "bytes": bytes, "sha256": hex::encode(hasher.finalize()), "backend": s.name });
    tagged(&s, StatusCode::OK, body.to_string())
}

async fn status(State(s): State<Shared>, Path(code): Path<u16>) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    tagged(&s, code, format!("status {code} from {}\n", s.name))
}

/// What a hostile app behind the IDE server could answer: a 503 carrying
/// sessionlb's internal backend-down marker.
async fn forged_backend_down(State(s): State<Shared>) -> Response {
    let mut resp = tagged(&s, StatusCode::SERVICE_UNAVAILABLE, "pretending the backend is down\n");
    resp.headers_mut().insert("x-sessionlb-backend-down", HeaderValue::from_static("1"));
    resp
}

async fn fallback(State(s): State<Shared>, req: Request) -> Response {
    tagged(&s, StatusCode::OK, format!("backend {}: {}\n", s.name, req.uri().path()))
}

fn usage() -> ! {
    eprintln!(
        "usage: sessionlb-demo-backend --listen ADDR:PORT --name NAME [--secure-cookie-key-file PATH] [--tls-cert FILE --tls-key FILE]"
    );
    std::process::exit(64)
}

/// Serve `app` over TLS with the certificate chain and key in these PEM files.
async fn serve_tls(listener: tokio::net::TcpListener, app: Router, cert: &str, key: &str) {
    use pingora::tls::{ServerConfig, TlsAcceptor, load_certs_and_key_files};
    let (chain, private) = match load_certs_and_key_files(cert, key) {
        Ok(Some(pair)) => pair,
        other => {
            eprintln!("cannot read --tls-cert {cert} / --tls-key {key}: {other:?}");
            std::process::exit(1)
        }
    };
    pingora::tls::install_default_crypto_provider();
    let config = ServerConfig::builder().with_no_client_auth().with_single_cert(chain, private).unwrap_or_else(|e| {
        eprintln!("--tls-key does not go with --tls-cert: {e}");
        std::process::exit(1)
    });
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

fn main() {
    let mut listen: Option<SocketAddr> = None;
    let mut name = String::from("backend");
    let mut key_file: Option<String> = None;
    let (mut tls_cert, mut tls_key) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().and_then(|v| v.parse().ok()).or_else(|| usage()),
            "--name" => name = args.next().unwrap_or_else(|| usage()),
            "--secure-cookie-key-file" => key_file = Some(args.next().unwrap_or_else(|| usage())),
            "--tls-cert" => tls_cert = Some(args.next().unwrap_or_else(|| usage())),
            "--tls-key" => tls_key = Some(args.next().unwrap_or_else(|| usage())),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let listen = listen.unwrap_or_else(|| "127.0.0.1:8788".parse().expect("literal"));
    let sign_in = key_file.map(|path| match sessionlb::config::key::SecureKey::load(std::path::Path::new(&path)) {
        Ok(key) => sessionlb::proxy::identity::workbench_mac(&key),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    });
    let state = Arc::new(Backend { name, keys: Mutex::new(HashSet::new()), sign_in });
    let app = Router::new()
        .route("/", get(root))
        .route("/auth-sign-in", get(sign_in_page))
        .route("/auth-do-sign-in", post(do_sign_in))
        .route("/bench", get(bench))
        .route("/new-session", get(new_session))
        .route("/s/{key}", any(session_root))
        .route("/s/{key}/", any(session_root))
        .route("/s/{key}/{*rest}", any(session_page))
        .route("/headers", any(headers))
        .route("/ws", get(ws_root))
        .route("/sse", get(sse))
        .route("/download", get(download))
        .route("/upload", post(upload))
        .route("/status/{code}", any(status))
        .route("/forged-backend-down", any(forged_backend_down))
        .fallback(fallback)
        .with_state(state);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap_or_else(|e| {
            eprintln!("cannot listen on {listen}: {e}");
            std::process::exit(1)
        });
        match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => {
                eprintln!("demo backend listening on {listen} (https)");
                serve_tls(listener, app, &cert, &key).await;
            }
            (None, None) => {
                eprintln!("demo backend listening on {listen}");
                axum::serve(listener, app).await.expect("server");
            }
            _ => usage(),
        }
    });
}
