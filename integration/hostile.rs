//! Hostile input (issue 11): a table of forged, tampered, truncated,
//! oversized and non-UTF-8 cookies and forwarding headers, CR/LF and NUL in
//! headers, oversized heads and URIs, session keys with traversal and
//! encoded separators, request smuggling, and the status and node-info
//! endpoints from outside, each sent raw to a node of a running 3-node
//! cluster. Every case must get a clear error or be ignored (answered as an
//! anonymous request), and nothing may be lost: after each case the node
//! still runs, the signed-in user is still served by their backend through
//! every node, and the registry holds the same sessions.
//!
//! Run: `cargo nextest run --test integration -E 'test(/hostile::/)' --no-capture`
//! (prints the number of cases).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use sessionlb::proxy::{forward, identity};

use crate::common::cluster::{Browser, Cluster, ClusterOptions};
use crate::common::raw;

/// What a case must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Answered as an anonymous request would be (the cookie or header ignored).
    Ignored,
    /// Refused with one of these statuses.
    Refused(&'static [u16]),
    /// Refused with one of these statuses, or the connection closed without an answer.
    RefusedOrClosed(&'static [u16]),
}

struct Case {
    name: String,
    /// The raw request (HTTP/1.1, `Connection: close`).
    request: Vec<u8>,
    /// Source address of the connection (default 127.0.0.1).
    from: Option<&'static str>,
    expect: Expect,
}

/// A request for `path` with extra header lines (each without CRLF).
fn request(path: &str, host: &str, headers: &[Vec<u8>]) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n").into_bytes();
    for h in headers {
        r.extend_from_slice(h);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"\r\n");
    r
}

fn header(name: &str, value: &[u8]) -> Vec<u8> {
    let mut h = format!("{name}: ").into_bytes();
    h.extend_from_slice(value);
    h
}

fn cookie(name: &str, value: &[u8]) -> Vec<u8> {
    let mut v = format!("{name}=").into_bytes();
    v.extend_from_slice(value);
    header("Cookie", &v)
}

/// Change one character in the middle of `s`.
fn tamper(s: &str) -> String {
    let mut b = s.as_bytes().to_vec();
    let i = b.len() / 2;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

const CLIENT_ERRORS: &[u16] = &[400, 403, 404, 413, 414, 431, 494];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_gets_a_clear_error_or_is_ignored_and_nothing_is_lost() {
    // Administrators' address: 127.0.0.1 (the test client); other loopback
    // addresses are outsiders here.
    let c =
        Cluster::start(ClusterOptions { extra: "status-page-cidrs = [\"127.0.0.1\"]\n".into(), ..Default::default() })
            .await;
    let key = c.key();
    let mac = identity::workbench_mac(&key);
    let a = &c.nodes[0];
    let host = a.address();
    let addr: SocketAddr = host.parse().unwrap();

    // An existing session: a signed-in user (Workbench `user-id` cookie).
    let expires = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
    let ann_cookie = identity::sign_workbench_cookie(&mac, "ann", &expires);
    let mut ann = Browser::new();
    ann.cookies.insert("user-id".into(), ann_cookie.clone());
    let ann_backend = ann.get(&a.url("/")).await.backend().unwrap().to_string();
    // And an anonymous browser's pin.
    let mut anon = Browser::new();
    assert_eq!(anon.get(&a.url("/bench")).await.status, 200);
    let pin = anon.pin().expect("a pin").to_string();
    let sessions_before = c.registry.list_sessions().await.unwrap();
    assert_eq!(sessions_before.len(), 1, "{sessions_before:?}");

    let expired = identity::sign_workbench_cookie(&mac, "ann", "Wed, 08 Jun 2022 21:22:21 GMT");
    let other_key = identity::workbench_mac(&sessionlb::config::key::SecureKey::from_bytes(
        b"an-attacker's-own-key-0123456789\n".to_vec(),
    ));
    let (a_id, b_id) = (c.node_id(0).await, c.node_id(1).await);
    let line = |path: &'static str| forward::RequestLine { method: "GET", host: &host, path_and_query: path };
    let now = crate::security::now_ms();
    let signed_b_to_a = forward::sign(&key, b_id, a_id, now, "aff:x", Some("ann"), &line("/bench"));
    let mut cases: Vec<Case> = Vec::new();
    fn push(cases: &mut Vec<Case>, name: &str, request: Vec<u8>, expect: Expect) {
        cases.push(Case { name: name.into(), request, from: None, expect });
    }
    macro_rules! add {
        ($($arg:expr),* $(,)?) => { push(&mut cases, $($arg),*) };
    }

    // --- user-id cookies: ignored (the request is anonymous), never a session.
    let user_cookies: Vec<(&str, Vec<u8>)> = vec![
        (
            "user-id signed with another key",
            identity::sign_workbench_cookie(&other_key, "admin", &expires).into_bytes(),
        ),
        ("user-id for another user with ann's MAC", ann_cookie.replacen("ann", "admin", 1).into_bytes()),
        ("user-id tampered", tamper(&ann_cookie).into_bytes()),
        ("user-id truncated", ann_cookie.as_bytes()[..ann_cookie.len() / 2].to_vec()),
        ("user-id expired", expired.into_bytes()),
        ("user-id oversized (6 KiB)", format!("{}{}", "x".repeat(6 << 10), ann_cookie).into_bytes()),
        ("user-id non-UTF-8", b"\xff\xfeann|\xc3\x28|\x80".to_vec()),
        ("user-id empty parts", b"|||".to_vec()),
        ("user-id percent-encoded garbage", b"%ff%fe|%zz|%00".to_vec()),
    ];
    for (name, value) in user_cookies {
        add!(name, request("/bench", &host, &[cookie("user-id", &value)]), Expect::Ignored);
    }

    // --- pin (affinity) cookies: ignored (a new pin), never routing by themselves.
    let mut pin_other_node: Vec<&str> = pin.split('.').collect();
    let other_node = if pin_other_node[2] == "1" { "2" } else { "1" };
    pin_other_node[2] = other_node;
    let pin_cookies: Vec<(&str, Vec<u8>)> = vec![
        ("pin forged", b"v2.abc.1.1700000000.bm90LWEtbWFj".to_vec()),
        ("pin pointing at another node", pin_other_node.join(".").into_bytes()),
        ("pin tampered", tamper(&pin).into_bytes()),
        ("pin truncated", pin.as_bytes()[..pin.len() / 2].to_vec()),
        ("pin oversized (6 KiB)", format!("{pin}{}", "A".repeat(6 << 10)).into_bytes()),
        ("pin non-UTF-8", b"v2.\xff\xfe.1.2.\x80".to_vec()),
        ("pin with separators only", b"....".to_vec()),
    ];
    for (name, value) in pin_cookies {
        add!(name, request("/bench", &host, &[cookie("sessionlb-affinity", &value)]), Expect::Ignored);
    }
    add!(
        "a thousand cookies",
        request(
            "/bench",
            &host,
            &[header("Cookie", (0..1000).map(|i| format!("c{i}=v")).collect::<Vec<_>>().join("; ").as_bytes())],
        ),
        Expect::Ignored,
    );

    // --- forwarding headers: refused (403), never served as another node's request.
    let forward_headers: Vec<(&str, Vec<u8>)> = vec![
        ("forwarding header garbage", b"garbage".to_vec()),
        ("forwarding header signed with another key", {
            let k = sessionlb::config::key::SecureKey::from_bytes(b"an-attacker's-own-key-0123456789\n".to_vec());
            forward::sign(&k, b_id, a_id, now, "aff:x", Some("admin"), &line("/bench")).into_bytes()
        }),
        ("forwarding header tampered", tamper(&signed_b_to_a).into_bytes()),
        ("forwarding header truncated", signed_b_to_a.as_bytes()[..signed_b_to_a.len() - 10].to_vec()),
        ("forwarding header oversized (6 KiB)", format!("{signed_b_to_a}{}", "A".repeat(6 << 10)).into_bytes()),
        ("forwarding header non-UTF-8", b"v2;2;1;\xff\xfe;a;b;c".to_vec()),
        ("forwarding header of the old version", signed_b_to_a.replacen("v2;", "v1;", 1).into_bytes()),
        // Genuine, but sent from the client's address, not node B's.
        ("forwarding header genuine but not from its sender", signed_b_to_a.clone().into_bytes()),
    ];
    for (name, value) in forward_headers {
        add!(name, request("/bench", &host, &[header(forward::HEADER, &value)]), Expect::Refused(&[400, 403]));
    }

    // --- CR, LF and NUL inside headers; oversized heads and URIs; smuggling.
    add!(
        "bare CR in a header value",
        request("/bench", &host, &[b"X-Evil: a\rInjected: b".to_vec()]),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!(
        "NUL in a header value",
        request("/bench", &host, &[b"X-Evil: a\0b".to_vec()]),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!(
        "NUL in a cookie",
        request("/bench", &host, &[cookie("sessionlb-affinity", b"v2.a\0b.1.2.c")]),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!(
        "NUL in a header name",
        request("/bench", &host, &[b"X-E\0vil: a".to_vec()]),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!(
        "header line without a colon",
        request("/bench", &host, &[b"NoColonHere".to_vec()]),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!(
        "LF-only line endings with an injected header",
        b"GET /bench HTTP/1.1\nHost: x\nX-Sessionlb-Forward: x\nConnection: close\n\n".to_vec(),
        Expect::Refused(&[400, 403]),
    );
    add!(
        "a 2 MiB header",
        request("/bench", &host, &[header("X-Big", "a".repeat(2 << 20).as_bytes())]),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!(
        "2,000 headers",
        request("/bench", &host, &(0..2000).map(|i| header(&format!("X-H{i}"), b"v")).collect::<Vec<_>>()),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!(
        "a 1 MiB URI",
        request(&format!("/bench?{}", "q".repeat(1 << 20)), &host, &[]),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!(
        "a non-UTF-8 URI",
        b"GET /s/\xff\xfe/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!("Content-Length and Transfer-Encoding together", b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), Expect::RefusedOrClosed(&[200, 400]));
    add!(
        "two Content-Length headers",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\nConnection: close\r\n\r\nabcd"
            .to_vec(),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!(
        "a TLS hello on the plain port",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(),
        Expect::RefusedOrClosed(CLIENT_ERRORS),
    );
    add!(
        "CONNECT",
        b"CONNECT 127.0.0.1:5432 HTTP/1.1\r\nHost: 127.0.0.1:5432\r\n\r\n".to_vec(),
        Expect::RefusedOrClosed(&[400, 403, 405]),
    );

    // --- session keys with traversal and encoded separators: never a
    // registry row; the backend (which does not know them) answers 404.
    for path in [
        "/s/../../etc/passwd/",
        "/s/%2e%2e/",
        "/s/..%2F..%2Fetc/",
        "/s/a%2Fb/",
        "/s/a%00b/",
        "/s/a%0d%0aSet-Cookie:x/",
        "/s/.%2e/x",
        "/s/\\..\\/",
    ] {
        add!(&format!("session key {path}"), request(path, &host, &[]), Expect::Refused(&[400, 404]));
    }
    let long_key = format!("/s/{}/", "k".repeat(129));
    add!("session key of 129 characters", request(&long_key, &host, &[]), Expect::Refused(&[400, 404]));

    // --- the status page and node-info from outside.
    for path in ["/load-balancer/status", "/load-balancer/status?format=json", "/metrics"] {
        cases.push(Case {
            name: format!("{path} from 127.0.0.50"),
            request: request(path, &host, &[]),
            from: Some("127.0.0.50"),
            expect: Expect::Refused(&[403]),
        });
    }
    add!("node-info without a header", request("/load-balancer/node-info", &host, &[]), Expect::Refused(&[403]));
    let node_info = forward::sign(&key, b_id, a_id, now, "node-info", None, &line("/load-balancer/node-info"));
    add!(
        "node-info with a genuine header from the wrong address",
        request("/load-balancer/node-info", &host, &[header(forward::HEADER, node_info.as_bytes())]),
        Expect::Refused(&[403]),
    );

    let total = cases.len();
    println!("hostile input: {total} cases");
    let mut failures = Vec::new();
    for case in &cases {
        let reply = raw::send(addr, case.from, &case.request, Duration::from_secs(20)).await;
        let status = reply.as_ref().map_or(0, |r| r.status);
        let ok = match case.expect {
            Expect::Ignored => status == 200,
            Expect::Refused(allowed) => allowed.contains(&status),
            Expect::RefusedOrClosed(allowed) => status == 0 || allowed.contains(&status),
        };
        println!("  {:<60} {status:>3} {}", case.name, if ok { "ok" } else { "UNEXPECTED" });
        if !ok {
            failures.push(format!("{}: got {status}, expected {:?}", case.name, case.expect));
        }
        // Nothing lost: the node runs and serves the user from their backend,
        // and no session appeared or vanished.
        let reply = ann.get(&a.url("/")).await;
        assert_eq!(reply.backend(), Some(ann_backend.as_str()), "after {:?}: {reply:?}", case.name);
        let sessions = c.registry.list_sessions().await.unwrap();
        assert_eq!(sessions.len(), sessions_before.len(), "after {:?}: {sessions:?}", case.name);
    }
    assert!(failures.is_empty(), "{} of {total} cases failed:\n{}", failures.len(), failures.join("\n"));
    // Smuggling: with both Content-Length and Transfer-Encoding, the chunked
    // framing wins (an empty body, not the 4 bytes), the connection closes,
    // and the request hidden after the body is never answered (RFC 9112 §6.3).
    let smuggled = cases.iter().find(|c| c.name.starts_with("Content-Length and Transfer-Encoding")).unwrap();
    let reply = raw::send(addr, None, &smuggled.request, Duration::from_secs(20)).await.unwrap();
    if reply.status == 200 {
        assert!(reply.body_text().contains("\"bytes\":0"), "{reply:?}");
        assert!(!reply.body_text().contains("HTTP/1.1"), "a second response: {reply:?}");
    }
    // Every node still serves the user and the anonymous browser.
    for node in &c.nodes {
        assert_eq!(ann.get(&node.url("/")).await.backend(), Some(ann_backend.as_str()), "via {}", node.address());
        assert_eq!(anon.get(&node.url("/bench")).await.status, 200);
    }
    assert_eq!(anon.pin(), Some(pin.as_str()), "the anonymous browser kept its pin");
    let placed = |list: &[sessionlb::cluster::SessionRecord]| {
        list.iter().map(|s| (s.key.clone(), s.node_id)).collect::<Vec<_>>()
    };
    assert_eq!(placed(&c.registry.list_sessions().await.unwrap()), placed(&sessions_before));
    // The forgeries were counted.
    assert!(c.metric(a, "sessionlb_rejected_forwards_total").await >= 8.0);
    assert!(c.metric(a, "sessionlb_rejected_cookies_total").await >= 10.0);
}
