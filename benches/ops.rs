//! What operations add to every proxied request (issue 10): the request
//! accounting of `ops::traffic` — four clock reads, the duration, connect and
//! time-to-first-byte histograms and the in-progress count — measured alone,
//! since it runs in the proxy phases of every request.
//!
//! The access log (`access-log`): what a request pays when it is off (one
//! atomic load) and on (queueing one entry; the writer thread formats and
//! writes it), and what the writer thread spends per line.
//!
//! cargo bench --bench ops

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pingora::http::RequestHeader;
use sessionlb::config::{AccessLogTarget, Config, LogFormat};
use sessionlb::ops::access_log::{AccessLog, Entry, Route, SessionKind};
use sessionlb::ops::traffic::RequestTiming;

fn entry() -> Entry {
    Entry {
        time: std::time::SystemTime::now(),
        client: Some("10.1.2.3".parse().unwrap()),
        method: http::Method::GET,
        path: "/s/5f3a9c/rpc/console_input".to_string(),
        status: 200,
        bytes: 1234,
        duration: std::time::Duration::from_micros(850),
        route: Route::Forwarded,
        node: Some(3),
        session: SessionKind::BackendKey,
    }
}

fn access_log(c: &mut Criterion) {
    let off = AccessLog::default();
    // Off, a request checks one flag (in `request_filter`) and builds no entry.
    c.bench_function("access log off: per request", |b| b.iter(|| black_box(black_box(&off).enabled())));
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Config::from_toml(std::path::Path::new("bench.toml"), "").unwrap().server;
    settings.access_log = AccessLogTarget::File(dir.path().join("access.log"));
    settings.access_log_format = LogFormat::Json;
    let on = AccessLog::default();
    on.reopen(&settings).unwrap();
    // On: the request builds its entry (the path copied, the clock read)
    // and queues it. Timed in batches of 1000 with a pause (not timed) between them for
    // the writer to catch up: a full queue would drop lines, which costs less.
    c.bench_function("access log on (json, file): queue one entry", |b| {
        b.iter_custom(|iters| {
            let mut total = std::time::Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(1000);
                let started = std::time::Instant::now();
                for _ in 0..n {
                    on.log(black_box(entry()));
                }
                total += started.elapsed();
                left -= n;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            total
        });
    });
    for format in [LogFormat::Plain, LogFormat::Json] {
        let e = entry();
        let mut out = Vec::with_capacity(256);
        c.bench_function(&format!("access log writer: format one {} line", format.as_str()), |b| {
            b.iter(|| {
                out.clear();
                black_box(&e).format(format, &mut out);
                black_box(out.len())
            })
        });
    }
}

fn bench(c: &mut Criterion) {
    sessionlb::metrics::init_series();
    let req = RequestHeader::build("GET", b"/rpc/console_input", None).unwrap();
    c.bench_function("request accounting: start, connect, first byte, respond, finish, drop", |b| {
        b.iter(|| {
            let mut t = RequestTiming::default();
            t.start();
            t.connecting(true);
            t.connected(false);
            t.first_byte();
            t.responding(black_box(200), &req);
            t.finish(0, 200);
            drop(black_box(t));
        })
    });
    c.bench_function("request accounting on a reused upstream connection", |b| {
        b.iter(|| {
            let mut t = RequestTiming::default();
            t.start();
            t.connecting(false);
            t.connected(true);
            t.first_byte();
            t.responding(black_box(200), &req);
            t.finish(1, 200);
            drop(black_box(t));
        })
    });
}

criterion_group!(benches, bench, access_log);
criterion_main!(benches);
