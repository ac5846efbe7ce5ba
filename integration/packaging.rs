//! What ships around the binary: the systemd unit (checked by
//! `systemd-analyze verify` where it is installed), the Dockerfile's health
//! check (run against a real node) and its dependency-caching layer, and
//! `scripts/quickstart.sh` (the README's first command) in a network
//! namespace of its own, so that its fixed ports collide with nothing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use rustix::process::Signal;
use tokio_tungstenite::tungstenite::Message;

use crate::common::cluster::{Cluster, ClusterOptions, TRUST_LOOPBACK, session_on};
use crate::common::netns::Netns;
use crate::common::node::SESSIONLB;
use crate::common::{eventually, eventually_sync};

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// `key=value` settings of a unit file's `[Service]` section.
fn service_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .skip_while(|l| l.trim() != "[Service]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect()
}

#[test]
fn the_systemd_unit_is_notify_unprivileged_sandboxed_and_verifies() {
    let unit = repo_file("conf/sessionlb.service");
    let settings = service_settings(&unit);
    let get = |key: &str| settings.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    assert_eq!(get("Type"), Some("notify"));
    assert_eq!(get("NotifyAccess"), Some("all"), "the upgraded process must be able to become the main process");
    assert_eq!(get("User"), Some("sessionlb"));
    assert_eq!(get("ExecReload"), Some("/bin/kill -HUP $MAINPID"));
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("ReadWritePaths", "/var/lib/sessionlb"),
    ] {
        assert_eq!(get(key), Some(value), "{key}");
    }
    // Stopping waits for the drain (default 5 minutes) and more.
    assert_eq!(get("TimeoutStopSec"), Some("6min"));
    let exec = get("ExecStart").unwrap();
    assert!(exec.starts_with("/usr/local/bin/sessionlb ") && exec.ends_with(" serve"), "{exec}");

    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze is not installed: the unit's syntax is not verified here");
        return;
    };
    // Verified as installed, with the binary this test built in its place.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sessionlb.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/sessionlb", SESSIONLB)).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&copy).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Warnings (unknown keys, bad values) do not change the exit code.
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify:\n{stderr}");
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}

/// The Dockerfile's `HEALTHCHECK ... CMD [...]`, as arguments.
fn docker_healthcheck() -> Vec<String> {
    let dockerfile = repo_file("Dockerfile");
    let joined = dockerfile.replace("\\\n", " ");
    let line = joined.lines().find(|l| l.starts_with("HEALTHCHECK")).expect("a HEALTHCHECK");
    let cmd = &line[line.find("CMD").expect("CMD in HEALTHCHECK") + 3..];
    serde_json::from_str(cmd.trim()).expect("HEALTHCHECK CMD in exec form (a JSON array)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_docker_healthcheck_passes_for_a_serving_node_and_fails_while_it_drains() {
    let mut args = docker_healthcheck();
    assert_eq!(args[0], "/usr/local/bin/sessionlb");
    let c = Cluster::start(ClusterOptions {
        extra: TRUST_LOOPBACK.into(),
        per_node: ["drain-timeout = \"30s\"".into(), String::new(), String::new()],
        ..Default::default()
    })
    .await;
    // The image's paths, pointed at this node.
    args[0] = SESSIONLB.into();
    for a in args.iter_mut() {
        if a == "/etc/sessionlb/sessionlb.toml" {
            *a = c.nodes[0].config.display().to_string();
        }
    }
    let check = move || Command::new(&args[0]).args(&args[1..]).output().unwrap();
    let out = check();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"status\":\"ok\""));

    // Draining (a WebSocket keeps the node from stopping): unhealthy.
    let b = session_on(&c, 0).await;
    let mut ws = b.websocket(&c.nodes[0]).await;
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::Text("hello from A".into()));
    c.nodes[0].proc.signal(Signal::TERM);
    let out = eventually(Duration::from_secs(10), "the health check to fail", || {
        let out = check();
        async move { (!out.status.success()).then_some(out) }
    })
    .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"status\":\"draining\""));
    drop(ws);
}

#[test]
fn the_docker_dependency_layer_stubs_every_cargo_target() {
    let manifest: toml::Table = toml::from_str(&repo_file("Cargo.toml")).unwrap();
    let mut targets: Vec<String> = Vec::new();
    for kind in ["bin", "test", "bench"] {
        for t in manifest.get(kind).and_then(|v| v.as_array()).into_iter().flatten() {
            let name = t["name"].as_str().unwrap();
            let default = match kind {
                "bench" => format!("benches/{name}.rs"),
                "test" => format!("tests/{name}.rs"),
                _ => format!("src/bin/{name}.rs"),
            };
            targets.push(t.get("path").and_then(|p| p.as_str()).map_or(default, str::to_string));
        }
    }
    let dockerfile = repo_file("Dockerfile");
    let stubs: Vec<&str> = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("&& for f in "))
        .and_then(|l| l.split("; do").next())
        .expect("the stub loop")
        .split_whitespace()
        .collect();
    for target in &targets {
        assert!(stubs.contains(&target.as_str()), "the Dockerfile's dependency layer does not stub {target}");
    }
    let lib = manifest["lib"]["path"].as_str().unwrap();
    assert!(dockerfile.contains(&format!("touch {lib}")));
    // Patched crates ([patch.crates-io] paths) must be there before the
    // dependency build resolves them.
    let dependency_build = dockerfile.find("&& cargo build").expect("the dependency build");
    for (name, patch) in
        manifest.get("patch").and_then(|p| p.get("crates-io")).and_then(|p| p.as_table()).into_iter().flatten()
    {
        let path = patch["path"].as_str().unwrap();
        let top = path.split('/').next().unwrap();
        let copied =
            dockerfile.find(&format!("COPY {top} ./{top}")).unwrap_or_else(|| panic!("{name}: {top}/ is not copied"));
        assert!(copied < dependency_build, "{name}: {top}/ is copied after the dependency build");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_script_runs_a_node_in_front_of_the_demo_backend_and_stops_both() {
    let ns = Netns::create();
    let state = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(SESSIONLB).parent().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/quickstart.sh");
    let log = state.path().join("quickstart.log");
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(&script)
        .arg("--state-dir")
        .arg(state.path().join("state"))
        .env("SESSIONLB_BIN_DIR", bin_dir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .process_group(0)
        .spawn()
        .unwrap();
    let _group = KillGroupOnDrop(child.id() as i32);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    // The README's address, inside the namespace: the demo backend answers through sessionlb.
    let (code, body) = eventually_sync(Duration::from_secs(30), "the quick start to answer", || {
        assert!(child.try_wait().unwrap().is_none(), "quickstart.sh exited:\n{}", text());
        let (code, body) = ns.curl("http://127.0.0.1:8787/");
        (code != 0).then_some((code, body))
    });
    assert_eq!((code, body.as_str()), (200, "backend demo\n"), "{}", text());
    let (code, body) = ns.curl("http://127.0.0.1:9787/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("sessionlb_node_sessions"));
    assert!(state.path().join("state/secure-cookie-key").exists());

    // SIGTERM to the script stops the node and the backend.
    rustix::process::kill_process(rustix::process::Pid::from_raw(child.id() as i32).unwrap(), Signal::TERM).unwrap();
    let status = eventually_sync(Duration::from_secs(30), "quickstart.sh to stop", || child.try_wait().unwrap());
    assert!(status.success(), "{status}:\n{}", text());
    for port in [8787, 8788] {
        let (code, _) = ns.curl(&format!("http://127.0.0.1:{port}/"));
        assert_eq!(code, 0, "port {port} still answers:\n{}", text());
    }
}

/// A process group (a script and what it started): killed on drop.
struct KillGroupOnDrop(i32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0) {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
        }
    }
}
