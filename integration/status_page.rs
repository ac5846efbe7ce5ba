//! The HTML status page in a real browser: Debian's headless Chromium loads
//! `/load-balancer/status` from a running 3-node cluster (it asks for
//! `text/html` like any browser), the rendered DOM must show every node and
//! every session, and a screenshot is kept under the test's output
//! (`target/tmp/status-page/`). `scripts/test.sh` installs Chromium when it
//! is missing; without it this test fails rather than skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::cluster::{Browser, Cluster, ClusterOptions, NAMES};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Run headless Chromium with a fresh profile under `dir`; its stdout.
fn chromium(dir: &Path, args: &[String]) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run the tests with scripts/test.sh (it installs Debian's `chromium`), or apt-get install chromium"
    );
    let profile = tempfile::tempdir_in(dir).unwrap();
    let out = dir.join(format!("chromium-{}.out", rand::random::<u32>()));
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium {args:?} failed: {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::read_to_string(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_renders_every_node_and_session_of_a_three_node_cluster() {
    let c = Cluster::start(ClusterOptions {
        extra: "[identity]\ntrusted-cidrs = [\"127.0.0.0/8\"]\n".into(),
        ..Default::default()
    })
    .await;
    // Sessions on every node: signed-in users, and sessions the backends
    // created for anonymous browsers (each of which B gave a pin).
    for user in ["ann", "bob", "cy", "dora", "<script>alert(1)</script>"] {
        assert_eq!(Browser::as_user(user).get(&c.nodes[0].url("/")).await.status, 200);
    }
    for _ in 0..4 {
        let mut anonymous = Browser::new();
        let minted: serde_json::Value =
            serde_json::from_str(&anonymous.get(&c.nodes[1].url("/new-session")).await.body).unwrap();
        let url = c.nodes[1].url(minted["url"].as_str().unwrap());
        assert_eq!(anonymous.get(&url).await.status, 200);
    }
    let sessions = c.registry.list_sessions().await.unwrap();
    assert_eq!(sessions.len(), 9, "{sessions:?}");
    for (i, name) in NAMES.iter().enumerate() {
        let id = c.node_id(i).await;
        assert!(sessions.iter().any(|s| s.node_id == Some(id)), "no session on {name}");
    }
    // One session moves (as after a failover): the page lists it.
    let moved = &sessions[0];
    let (from, to) = (
        moved.node_id.unwrap(),
        if moved.node_id == Some(c.node_id(2).await) { c.node_id(0).await } else { c.node_id(2).await },
    );
    c.registry.move_session(&moved.key, Some(from), to).await.unwrap();

    let out: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&out).unwrap();
    let url = c.nodes[0].url("/load-balancer/status?refresh=30");
    // The move reaches A by notification.
    crate::common::eventually(Duration::from_secs(5), "A to hear of the move", || async {
        let html =
            reqwest::Client::new().get(&url).header("accept", "text/html").send().await.ok()?.text().await.ok()?;
        html.contains(&format!("data-move=\"{}\"", moved.key)).then_some(())
    })
    .await;

    let (dir, dom_args) = (out.clone(), vec!["--dump-dom".to_string(), url.clone()]);
    let dom = tokio::task::spawn_blocking(move || chromium(&dir, &dom_args)).await.unwrap();
    std::fs::write(out.join("dom.html"), &dom).unwrap();
    assert!(dom.contains("<title>sessionlb status"), "not the HTML page:\n{dom}");
    assert!(dom.contains("http-equiv=\"refresh\" content=\"30\""), "{dom}");
    for node in &c.nodes {
        assert!(dom.contains(&format!("data-node=\"{}\"", node.address())), "node {} missing:\n{dom}", node.address());
    }
    // B's row ends with the 4 pins it issued (no registry session for them).
    let b_row = dom.split(&format!("<tr data-node=\"{}\"", c.nodes[1].address())).nth(1).unwrap();
    let b_row = &b_row[..b_row.find("</tr>").unwrap()];
    assert!(b_row.ends_with("<td class=\"num\">4</td>"), "B's row: {b_row}");
    // Chromium serializes attribute values with these escaped.
    let attribute = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    for s in c.registry.list_sessions().await.unwrap() {
        let on = c.nodes[c.index_of(s.node_id.unwrap()).await.unwrap()].address();
        assert!(
            dom.contains(&format!("data-session=\"{}\" data-on=\"{on}\"", attribute(&s.key))),
            "session {} on {on} missing:\n{dom}",
            s.key
        );
    }
    for user in ["ann", "bob", "cy", "dora"] {
        assert!(dom.contains(&format!("data-user=\"{user}\"")), "user {user} missing");
    }
    assert!(dom.contains(&format!("data-move=\"{}\"", moved.key)), "the move is missing");
    // A user name is text, never markup (the page shares the IDE's origin).
    assert!(!dom.contains("<script>alert(1)</script>") && dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));

    let shot = out.join("screenshot.png");
    let _ = std::fs::remove_file(&shot);
    let (dir, shot_args) =
        (out.clone(), vec![format!("--screenshot={}", shot.display()), "--window-size=1280,1100".into(), url]);
    tokio::task::spawn_blocking(move || chromium(&dir, &shot_args)).await.unwrap();
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "{} bytes", png.len());
    eprintln!("status page screenshot: {}", shot.display());
}
