//! `metrics-address`: `/metrics` on a listener of its own, so that
//! Prometheus need not reach the public IDE port (which answers `/metrics`
//! only to loopback and cluster nodes). A Pingora service, so its socket is
//! handed over in a zero-downtime upgrade like the public one.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;

/// The metrics HTTP application: `GET /metrics`, nothing else.
pub struct MetricsApp;

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/metrics" => (200, "text/plain; version=0.0.4", crate::metrics::render().into_bytes()),
            _ => (404, "text/plain; charset=utf-8", b"not found: this listener serves /metrics\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .header("cache-control", "no-store")
            .body(body)
            .expect("a valid response")
    }
}

/// The listening service for `address`.
pub fn service(address: std::net::SocketAddr) -> Service<MetricsApp> {
    let mut service = Service::new("metrics".to_string(), MetricsApp);
    service.add_tcp(&address.to_string());
    service.threads = Some(1);
    service
}
