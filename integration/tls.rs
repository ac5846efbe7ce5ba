//! TLS between nodes (`ssl-enabled`): with verification against a private
//! CA (protocol `https`) and without (`https-no-verify`); a node speaking
//! another protocol is refused.

use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
use sessionlb::cluster::{NewSession, SessionKind};
use sessionlb::proxy::cookie;

use crate::common::cluster::{Browser, Cluster, ClusterOptions, NODE_IPS};
use crate::common::db::TestDb;
use crate::common::node::{ClusterFixture, list_nodes};
use crate::routing::sessionlb_now;

/// A CA, and one certificate for all three node IPs signed by it. Returns the CA's PEM.
fn make_pki(dir: &Path, sans: &[&str]) -> Vec<u8> {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans.iter().map(|ip| SanType::IpAddress(ip.parse().unwrap())).collect();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("node.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    ca.pem().into_bytes()
}

fn tls_keys(dir: &Path, verify: bool) -> String {
    format!(
        "ssl-enabled = true\nssl-certificate = \"{}\"\nssl-certificate-key = \"{}\"\nverify-ssl-certs = {verify}\n{}",
        dir.join("node.pem").display(),
        dir.join("node.key").display(),
        if verify { format!("ssl-ca-file = \"{}\"\n", dir.join("ca.pem").display()) } else { String::new() }
    )
}

async fn sticky_over_tls(c: &Cluster, mut browser: Browser) {
    let first = browser.get(&c.nodes[0].url("/")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let owner = first.backend().unwrap().to_string();
    // Served over https, the pin cookie is marked Secure (`cookie-secure`
    // follows `ssl-enabled`).
    let set = first.headers.get("set-cookie").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(set.starts_with("sessionlb-affinity=") && set.ends_with("; Secure"), "{set:?}");
    for i in 0..30 {
        let reply = browser.get(&c.nodes[i % 3].url("/tls")).await;
        assert_eq!(
            (reply.status, reply.backend()),
            (200, Some(owner.as_str())),
            "through {}",
            c.nodes[i % 3].address()
        );
    }
    // The status page gathered every node's report over TLS.
    let status: serde_json::Value =
        serde_json::from_str(&browser.get(&c.nodes[1].url("/load-balancer/status?format=json")).await.body).unwrap();
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n["reachable"] == true && n["counters"].is_object()), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_talk_https_verified_against_a_private_ca() {
    let pki = tempfile::tempdir().unwrap();
    let ca = make_pki(pki.path(), &NODE_IPS);
    let c = Cluster::start(ClusterOptions { extra: tls_keys(pki.path(), true), tls: true, ..Default::default() }).await;
    let listing = String::from_utf8_lossy(&c.admin(&["list-nodes"]).stdout).to_string();
    assert!(listing.contains("Protocol\nHttps\n"), "{listing}");
    sticky_over_tls(&c, Browser::trusting(&ca)).await;
    // A plain-http node cannot join this cluster.
    let mut spec = c.fx.spec("127.0.0.6", None);
    spec.extra = String::new();
    let mut plain = c.fx.spawn(&spec);
    assert!(!plain.proc.wait_exit(Duration::from_secs(20)).success());
    assert!(
        plain.proc.log_text().contains("protocol http differs from the cluster's https"),
        "{}",
        plain.proc.log_text()
    );
    let rows = list_nodes(&c.fx, &c.nodes[0].config);
    assert_eq!(rows.iter().find(|r| r.host == "127.0.0.6").unwrap().status, "Invalid secure cookie key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarding_refuses_a_peer_whose_certificate_does_not_name_it() {
    // Certificates name only A's address. Probes are off (a 1 h interval),
    // so A believes B reachable and must find out in the data path itself.
    // The session is an older version's (a v1 cookie and its row), which
    // keeps working until the cookie expires.
    let pki = tempfile::tempdir().unwrap();
    let ca = make_pki(pki.path(), &[NODE_IPS[0]]);
    let c = Cluster::start(ClusterOptions {
        extra: format!("health-check-interval = \"1h\"\n{}", tls_keys(pki.path(), true)),
        tls: true,
        ..Default::default()
    })
    .await;
    let (affinity, value) = cookie::issue_v1(&c.key(), sessionlb_now());
    let b_id = c.node_id(1).await;
    c.registry
        .place_session(&NewSession {
            key: affinity.session_key(),
            node_id: b_id,
            user_name: None,
            kind: SessionKind::Affinity,
        })
        .await
        .unwrap();
    crate::common::eventually(Duration::from_secs(5), "A to know the session", || async {
        c.nodes[0].health().await.filter(|h| h["sessions"] == 1).map(|_| ())
    })
    .await;
    let mut browser = Browser::trusting(&ca);
    browser.cookies.insert("sessionlb-affinity".into(), value);
    let reply = browser.get(&c.nodes[0].url("/")).await;
    // B's certificate does not name 127.0.0.3: the TLS handshake fails, the
    // request fails over, and the session moves off B.
    assert_eq!((reply.status, reply.backend()), (200, Some("A")), "{}", reply.body);
    let row = c.registry.get_session(affinity.session_key()).await.unwrap().unwrap();
    assert_eq!(row.node_id, Some(c.node_id(0).await));
    assert!(c.nodes[0].proc.log_text().contains("node unreachable (connect failed)"), "{}", c.nodes[0].proc.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_talk_https_without_verification_when_told() {
    let pki = tempfile::tempdir().unwrap();
    // A certificate naming none of the nodes: only https-no-verify accepts it.
    make_pki(pki.path(), &["192.0.2.1"]);
    let c =
        Cluster::start(ClusterOptions { extra: tls_keys(pki.path(), false), tls: true, ..Default::default() }).await;
    let listing = String::from_utf8_lossy(&c.admin(&["list-nodes"]).stdout).to_string();
    assert!(listing.contains("Protocol\nHttps no verify\n"), "{listing}");
    sticky_over_tls(&c, Browser::insecure()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unusable_tls_files_are_refused_before_the_node_comes_online() {
    let db = TestDb::postgres().await;
    let fx = ClusterFixture::new(&db.url);
    let (one, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    make_pki(one.path(), &[NODE_IPS[0]]);
    make_pki(other.path(), &[NODE_IPS[0]]);
    let missing = format!(
        "ssl-enabled = true\nssl-certificate = \"{}\"\nssl-certificate-key = \"{}\"\n",
        one.path().join("absent.pem").display(),
        one.path().join("node.key").display()
    );
    // A certificate with the key of another: Pingora would only find out
    // (and panic) when it starts listening, after the node came online.
    let mismatched = format!(
        "ssl-enabled = true\nssl-certificate = \"{}\"\nssl-certificate-key = \"{}\"\n",
        one.path().join("node.pem").display(),
        other.path().join("node.key").display()
    );
    for (extra, says) in [(missing, "cannot read them"), (mismatched, "the key does not go with the certificate")] {
        let mut spec = fx.spec(NODE_IPS[0], None);
        spec.extra = extra;
        let mut node = fx.spawn(&spec);
        let status = node.proc.wait_exit(Duration::from_secs(20));
        assert!(!status.success(), "serve must fail");
        let log = node.proc.log_text();
        assert!(log.contains("ssl-certificate") && log.contains(says), "{log}");
        let rows = list_nodes(&fx, &node.config);
        assert!(rows.iter().all(|r| r.status != "Online"), "a node that failed to start is listed Online: {rows:?}");
    }
}
