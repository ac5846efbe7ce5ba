//! docs/workbench.md stays true: its marked blocks are applied and run on a
//! copy of fixture a (`<!-- doc-test: … -->` before a block says how), and
//! the README's drop-in command, unchanged, serves that directory — in a
//! network namespace of its own, where the node is 10.0.0.11:8787 as in the
//! guide and rserver (a demo backend) is on 127.0.0.1:8788.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::common::db::TestDb;
use crate::common::netns::Netns;
use crate::common::node::{DEMO_BACKEND, Proc, SESSIONLB, parse_list_nodes};
use crate::workbench::{Pg, Site, set_keys};

const DOC: &str = include_str!("../docs/workbench.md");
const README: &str = include_str!("../README.md");

/// A fenced block after a `<!-- doc-test: MARK -->` line.
struct Block {
    mark: String,
    lines: Vec<String>,
}

fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(mark) = line.strip_prefix("<!-- doc-test: ").and_then(|l| l.strip_suffix(" -->")) else { continue };
        let fence = lines.next().unwrap_or_default();
        assert!(fence.starts_with("```"), "doc-test {mark:?} must precede a fenced block, found {fence:?}");
        let body = lines.by_ref().take_while(|l| !l.starts_with("```")).map(str::to_string).collect();
        out.push(Block { mark: mark.to_string(), lines: body });
    }
    out
}

impl Block {
    /// The command of a console block, split as a shell would split it here (no quoting is used).
    fn command(&self) -> Vec<String> {
        let first = self.lines.first().and_then(|l| l.strip_prefix("$ ")).expect("a console block starts with `$ `");
        first.split_whitespace().map(str::to_string).collect()
    }

    fn output(&self) -> &[String] {
        &self.lines[1..]
    }
}

/// `line` matches `pattern`, where `…` stands for any text.
fn matches(line: &str, pattern: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    let [first, middle @ .., last] = parts.as_slice() else { return line == pattern };
    if !line.starts_with(first) || line.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &line[first.len()..];
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// The actual output shows the expected lines in order; a line of its own
/// `…` skips any number of lines. Host names and pids (`(host X, pid N)`)
/// differ between machines.
fn assert_shows(actual: &str, expected: &[String], what: &str) {
    let lines: Vec<&str> = actual.lines().collect();
    let mut i = 0;
    let mut skipping = false;
    for want in expected {
        if want == "…" {
            skipping = true;
            continue;
        }
        let want = match want.find("(host ") {
            Some(at) => format!("{}(host …, pid …){}", &want[..at], &want[at..][want[at..].find(')').unwrap() + 1..]),
            None => want.clone(),
        };
        loop {
            let Some(line) = lines.get(i) else {
                panic!("{what}: the documentation shows {want:?}, the command did not print it; it printed:\n{actual}")
            };
            i += 1;
            if matches(line, &want) {
                break;
            }
            assert!(
                skipping,
                "{what}: the documentation shows {want:?} where the command printed {line:?}; it printed:\n{actual}"
            );
        }
        skipping = false;
    }
}

/// Run a documented `sessionlb …` command on this machine, with the
/// guide's paths moved into the site.
fn run(etc: &Path, block: &Block) -> (bool, String) {
    let args = block.command();
    assert_eq!(args[0], "sessionlb", "{}", block.lines[0]);
    let args: Vec<String> = args[1..].iter().map(|a| a.replace("/etc/rstudio", etc.to_str().unwrap())).collect();
    let out = Command::new(SESSIONLB).args(&args).env("NO_COLOR", "1").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn expected(site: &Site, etc: &Path, block: &Block) -> Vec<String> {
    block
        .output()
        .iter()
        .map(|l| {
            l.replace("/etc/rstudio", etc.to_str().unwrap())
                .replace("/var/lib/rstudio-server", site.var().to_str().unwrap())
        })
        .collect()
}

fn block<'a>(all: &'a [Block], mark: &str, what: &str) -> &'a Block {
    all.iter()
        .find(|b| b.mark == mark && b.lines.iter().any(|l| l.contains(what)))
        .unwrap_or_else(|| panic!("docs/workbench.md has no doc-test: {mark} block with {what:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_workbench_md_steps_and_the_readme_drop_in_command_work_on_a_workbench_directory() {
    let all = blocks(DOC);
    assert!(all.len() >= 7, "doc-test blocks: {:?}", all.iter().map(|b| &b.mark).collect::<Vec<_>>());
    let site = Site::new();
    let etc = site.install("a-postgres", "node1");

    // 2. Before any change: refused, with the layout explained.
    let before = block(&all, "fails", "check-config");
    let (ok, out) = run(&etc, before);
    assert!(!ok, "{out}");
    assert_shows(&out, &expected(&site, &etc, before), "step 2");

    // 3. The edit of rserver.conf, as the guide shows it.
    let edit = block(&all, "edit rserver.conf", "www-port");
    let pairs: Vec<(&str, &str)> = edit.lines.iter().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(
        pairs.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        ["www-address", "www-port", "load-balancing-enabled"]
    );
    set_keys(&etc.join("rserver.conf"), &pairs);

    // 4. check-config, line by line as shown.
    let check = block(&all, "output", "check-config");
    let (ok, out) = run(&etc, check);
    assert!(ok, "{out}");
    assert_shows(&out, &expected(&site, &etc, check), "step 4");

    // 5. The README's drop-in command, unchanged, in a namespace where the
    // node is 10.0.0.11 and rserver listens on 127.0.0.1:8788. Only the
    // database is this test's (reached by its Unix socket).
    let readme_command = README
        .lines()
        .find(|l| l.trim() == "sessionlb --rstudio-config /etc/rstudio serve")
        .expect("README.md shows the drop-in command on a line of its own");
    let db = TestDb::postgres().await;
    let pg = Pg::of(&db);
    let socket = Pg::socket_dir(&db).await;
    set_keys(
        &etc.join("database.conf"),
        &[
            ("host", socket.to_str().unwrap()),
            ("port", &pg.port.to_string()),
            ("database", &pg.database),
            ("username", &pg.user),
        ],
    );
    let ns = Netns::create();
    let in_ns = |program: &str| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, program]);
        cmd
    };
    let out = in_ns("ip").args(["addr", "add", "10.0.0.11/32", "dev", "lo"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut backend = in_ns(DEMO_BACKEND);
    backend.args(["--listen", "127.0.0.1:8788", "--name", "rserver"]);
    let _backend = Proc::spawn("rserver (demo backend)", backend, site.path().join("backend.log"));
    let mut serve = in_ns(SESSIONLB);
    let args: Vec<String> =
        readme_command.split_whitespace().skip(1).map(|a| a.replace("/etc/rstudio", etc.to_str().unwrap())).collect();
    serve.args(&args).env("NO_COLOR", "1");
    let mut node = Proc::spawn("node 10.0.0.11", serve, site.path().join("node.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while ns.curl("http://127.0.0.1:8787/health").0 != 200 {
        assert!(node.is_running(), "the README's command exited; log:\n{}", node.log_text());
        assert!(Instant::now() < deadline, "not healthy after 30s; log:\n{}", node.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }

    // 6. The checks: list-nodes (here, with the same directory), the status
    // page (in the namespace), locktester from two processes.
    let list = block(&all, "run", "list-nodes");
    let (ok, out) = run(&etc, list);
    assert!(ok, "{out}");
    let header = out.lines().find(|l| l.starts_with("ID ")).unwrap();
    assert!(header.starts_with("ID  Host       IPv4       Port  Status  Last Seen"), "{out}");
    let rows = parse_list_nodes(&out);
    assert_eq!(
        rows.iter().map(|r| (r.address(), r.status.as_str())).collect::<Vec<_>>(),
        [("10.0.0.11:8787".into(), "Online")]
    );
    let status = block(&all, "run", "load-balancer/status");
    let url = status.command().into_iter().find(|a| a.starts_with("http")).unwrap();
    let (code, body) = ns.curl(&url);
    assert_eq!(code, 200, "{body}");
    assert!(body.lines().next().is_some_and(|l| matches(l, "10.0.0.11:8787  Load: …, …, …")), "{body}");
    assert!(matches(&status.output()[0], "10.0.0.11:8787  Load: …, …, …"), "the guide shows the same form");

    let first = block(&all, "locktester first", "locktester");
    let mut args = first.command();
    args.remove(0);
    let args: Vec<String> = args.iter().map(|a| a.replace("/etc/rstudio", etc.to_str().unwrap())).collect();
    let mut holder = Command::new(SESSIONLB);
    holder.args(&args).env("NO_COLOR", "1");
    let mut holder = Proc::spawn("locktester 1", holder, site.path().join("locktester-1.log"));
    let want = expected(&site, &etc, first);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !holder.log_text().contains("Press Ctrl+C to release.") {
        assert!(holder.is_running() && Instant::now() < deadline, "{}", holder.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_shows(&holder.log_text(), &want, "locktester on node 1");
    let second = block(&all, "locktester second", "locktester");
    let (ok, out) = run(&etc, second);
    assert!(ok, "{out}");
    assert_shows(&out, &expected(&site, &etc, second), "locktester on node 2");
    holder.signal(Signal::INT);
    assert!(holder.wait_exit(Duration::from_secs(20)).success(), "{}", holder.log_text());
    node.kill();
}

#[test]
fn the_output_patterns_of_the_guide_mean_what_they_say() {
    assert!(matches("pool-size = 6     # /x:9", "pool-size = 6 … # /x:9"));
    assert!(!matches("pool-size = 7     # /x:9", "pool-size = 6 … # /x:9"));
    assert!(matches("a", "a"));
    assert!(!matches("ab", "a"));
    assert_shows("one\ntwo\nthree\nfour\n", &["one".into(), "…".into(), "four".into()], "skip");
    let strict = std::panic::catch_unwind(|| assert_shows("one\ntwo\n", &["one".into(), "three".into()], "strict"));
    assert!(strict.is_err(), "a line that differs is not skipped without `…`");
    assert_shows("x (host n9, pid 1) y\n", &["x (host node1, pid 4242) y".into()], "host and pid");
}
