//! Acquire+release latency of the shared-storage locks, both types, on a
//! local folder (a temporary directory).
//!
//! `cargo bench --bench locks`. Two shapes per type:
//! - `try_acquire+drop`: one synchronous attempt and release on the calling
//!   thread: the cost of the file protocol itself;
//! - `acquire+release`: the async API the routing code uses (each file
//!   operation on tokio's blocking pool).

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sessionlb::config::{LockSettings, LockType};
use sessionlb::lock::LockManager;

fn manager(dir: &std::path::Path, lock_type: LockType) -> LockManager {
    LockManager::new(dir, &LockSettings { lock_type, ..LockSettings::default() }).expect("lock manager")
}

fn locks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut group = c.benchmark_group("locks");
    group.measurement_time(Duration::from_secs(5));
    for (lock_type, label) in [(LockType::LinkBased, "linkbased"), (LockType::Advisory, "advisory")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = manager(dir.path(), lock_type);
        group.bench_function(format!("{label}/try_acquire+drop"), |b| {
            b.iter(|| {
                let guard = m.try_acquire("session-abc").expect("no error").expect("uncontended");
                drop(guard);
            })
        });
        group.bench_function(format!("{label}/acquire+release"), |b| {
            b.to_async(&rt).iter(|| async {
                let guard = m.acquire("session-abc", Instant::now() + Duration::from_secs(10)).await.expect("acquire");
                guard.release().await.expect("release");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, locks);
criterion_main!(benches);
