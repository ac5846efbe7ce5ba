//! A short run of the cluster-scale harness (`bench/scale.sh`, issue 12) at
//! 5 nodes: it must run end to end on this checkout's debug binaries, and
//! what it reports must be consistent — every new user placed exactly once,
//! every busy request answered by its session's node, every placement seen
//! by the observer nodes, every node connected to PostgreSQL, changes written
//! straight into the registry reaching every node, the bulk load
//! absorbed by every node, and the joining node routing a bulk user with no
//! placement. Figures (latencies, memory) are benchmarks, not asserted here.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::node::free_port;

/// `target/debug/examples/scale_driver`: `scripts/test.sh` builds the
/// examples (`cargo build --examples`) before it runs the tests.
fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_sessionlb")).parent().expect("target dir").to_path_buf()
}

#[test]
fn scale_harness_runs_at_five_nodes_and_reports_consistent_figures() {
    let bins = driver_dir();
    assert!(
        bins.join("examples/scale_driver").exists(),
        "{} is missing: build the examples (cargo build --examples)",
        bins.join("examples/scale_driver").display()
    );
    let out = tempfile::tempdir().unwrap();
    let (nodes, sessions, rate, storm) = (5, 2000, 40, 3);
    let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/scale.sh"))
        .env("BINARIES", &bins)
        .env("OUT", out.path())
        .env("NODES", nodes.to_string())
        .env("SESSIONS", sessions.to_string())
        .env("RATE", rate.to_string())
        .env("STORM", storm.to_string())
        .env("BUSY", "20")
        .env("BUSY_INTERVAL_MS", "250")
        .env("OBSERVERS", "1")
        .env("REST", "2")
        .env("NOTIFY", "40")
        .env("QUIET_TIMEOUT", "0")
        // Free ports, so that runs of other checkouts do not collide.
        .env("PORT", free_port("127.0.0.1").to_string())
        .env("BACKEND_PORT", free_port("127.0.0.1").to_string())
        .env("FIRST_HOST", (100 + rand::random::<u8>() % 100).to_string())
        .status()
        .expect("run bench/scale.sh");
    assert!(status.success(), "bench/scale.sh failed: {status}");

    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap()).unwrap();
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    let get = |path: &str| -> &serde_json::Value {
        path.split('.').fold(&results, |v, k| v.get(k).unwrap_or_else(|| panic!("results.json has no {path}")))
    };
    let n = |path: &str| get(path).as_f64().unwrap_or_else(|| panic!("{path} is not a number: {}", get(path)));

    // At rest, every node holds at least one connection (its LISTEN).
    assert_eq!(n("rest-empty.nodes"), nodes as f64);
    assert!(n("rest-empty.pg_connections.per_node_min") >= 1.0, "{summary}");
    assert!(n("rest-empty.pg_connections.total") >= nodes as f64, "{summary}");
    // Every new user of the storm placed exactly one session, and the nodes counted them.
    let users = n("storm.users");
    assert_eq!(users, (rate * storm) as f64);
    assert_eq!(n("storm.placements_ok"), users, "{summary}");
    assert_eq!(n("storm.placed_by_nodes"), users, "{summary}");
    assert_eq!(n("storm.placement.n"), users);
    // Busy sessions stayed on their node's backend.
    assert_eq!(get("storm.busy_checked"), &serde_json::json!(true));
    assert!(n("storm.busy_requests") > 0.0);
    assert_eq!(n("storm.busy_errors"), 0.0, "{summary}");
    assert_eq!(n("storm.busy_misrouted"), 0.0, "{summary}");
    // The observer learned of every placement.
    assert_eq!(n("storm.notification_unseen"), 0.0, "{summary}");
    assert_eq!(n("storm.notification_lag.n"), users);
    // Changes written straight into the registry reached every node.
    assert_eq!(n("notify.count"), 40.0);
    assert_eq!(n("notify.nodes_behind"), 0.0, "{summary}");
    // Every node absorbed the bulk load; the joining node holds it and routes by it.
    assert_eq!(n("bulk.sessions_after"), sessions as f64);
    assert_eq!(n("rest-full.view_sessions.min"), sessions as f64, "{summary}");
    assert!(n("join.sessions") >= sessions as f64);
    assert_eq!(get("join.routed_ok"), &serde_json::json!(true), "{summary}");
    assert_eq!(n("join.placements_on_join_node"), 0.0);
    for section in ["Placement storm", "At rest: empty registry", "Broadcast cost", "Bulk load", "joins a cluster"] {
        assert!(summary.contains(section), "summary.md lacks {section:?}:\n{summary}");
    }
}
