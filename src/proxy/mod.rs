//! The Pingora data path (first cut: built-in `/health`, everything else to
//! the local backend; session routing replaces the forwarding rule).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use crate::cluster::ClusterView;
use crate::cluster::node::VERSION;
use crate::config::Config;

/// The proxy service state shared by all requests.
pub struct Proxy {
    pub config: Arc<Config>,
    pub view: Arc<ClusterView>,
    pub node_address: String,
}

/// Per-request state.
#[derive(Default)]
pub struct RequestCtx {}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, _ctx: &mut RequestCtx) -> Result<bool> {
        if session.req_header().uri.path() == "/health" {
            let me = self.view.self_node();
            let body = serde_json::json!({
                "status": "ok",
                "node_id": self.view.self_id(),
                "node": self.node_address,
                "version": VERSION,
                "offline_mode": me.as_ref().is_some_and(|n| n.offline_mode),
                "cluster_nodes": self.view.nodes().nodes.len(),
                "sessions": self.view.session_count(),
            })
            .to_string();
            let mut resp = ResponseHeader::build(200, Some(3))?;
            resp.insert_header("content-type", "application/json")?;
            resp.insert_header("content-length", body.len().to_string())?;
            resp.insert_header("cache-control", "no-store")?;
            session.write_response_header(Box::new(resp), false).await?;
            session
                .write_response_body(Some(Bytes::from(body)), true)
                .await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(backend) = &self.config.node.backend else {
            return Err(Error::explain(
                ErrorType::HTTPStatus(503),
                "router node without a backend",
            ));
        };
        let mut peer = HttpPeer::new(backend.as_str(), false, String::new());
        peer.options.connection_timeout = self.config.proxy.timeout;
        if session.is_upgrade_req() {
            peer.options.read_timeout = None;
        }
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }
}
