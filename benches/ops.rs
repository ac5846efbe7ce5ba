//! What operations add to every proxied request (issue 10): the request
//! accounting of `ops::traffic` — four clock reads, the duration, connect and
//! time-to-first-byte histograms and the in-progress count — measured alone,
//! since it runs in the proxy phases of every request.
//!
//! cargo bench --bench ops

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pingora::http::RequestHeader;
use sessionlb::ops::traffic::RequestTiming;

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

criterion_group!(benches, bench);
criterion_main!(benches);
