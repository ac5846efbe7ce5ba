//! The standard Prometheus process metrics, read from `/proc/self` when
//! `/metrics` is scraped: `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_start_time_seconds`,
//! `process_threads` — the names every Prometheus client library uses, so
//! stock dashboards and alerts work.

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, IntGauge};

/// What `/proc/self/stat` says about this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStat {
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time after boot, in clock ticks.
    pub start_ticks: u64,
    pub threads: i64,
    pub vsize_bytes: u64,
    pub rss_pages: i64,
}

/// Parse `/proc/self/stat` (the command name may hold spaces and parentheses:
/// fields are counted after its last `)`).
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = &text[text.rfind(')')? + 1..];
    // After the name: field 3 (state) is index 0, so field n is index n - 3.
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        cpu_ticks: num(14)? + num(15)?,
        threads: num(20)? as i64,
        start_ticks: num(22)?,
        vsize_bytes: num(23)?,
        rss_pages: f.get(24 - 3)?.parse().ok()?,
    })
}

/// The system's boot time (`btime` in `/proc/stat`), in seconds since the epoch.
fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse().ok())
}

/// The collector; register it once with [`register`].
pub struct ProcessMetrics {
    cpu: Counter,
    /// CPU seconds already added to `cpu` (a counter only goes up by deltas).
    cpu_seen: Mutex<f64>,
    resident: IntGauge,
    virtual_bytes: IntGauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
    start_time: Gauge,
    threads: IntGauge,
    ticks: f64,
    page_size: i64,
    boot_time: Option<u64>,
}

impl Default for ProcessMetrics {
    fn default() -> Self {
        ProcessMetrics {
            cpu: Counter::new("process_cpu_seconds_total", "Total user and system CPU time spent in seconds")
                .expect("valid metric"),
            cpu_seen: Mutex::new(0.0),
            resident: IntGauge::new("process_resident_memory_bytes", "Resident memory size in bytes")
                .expect("valid metric"),
            virtual_bytes: IntGauge::new("process_virtual_memory_bytes", "Virtual memory size in bytes")
                .expect("valid metric"),
            open_fds: IntGauge::new("process_open_fds", "Number of open file descriptors").expect("valid metric"),
            max_fds: IntGauge::new("process_max_fds", "Maximum number of open file descriptors").expect("valid metric"),
            start_time: Gauge::new(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
            )
            .expect("valid metric"),
            threads: IntGauge::new("process_threads", "Number of OS threads in the process").expect("valid metric"),
            ticks: rustix::param::clock_ticks_per_second() as f64,
            page_size: rustix::param::page_size() as i64,
            boot_time: boot_time(),
        }
    }
}

impl ProcessMetrics {
    fn refresh(&self) {
        if let Some(stat) = std::fs::read_to_string("/proc/self/stat").ok().as_deref().and_then(parse_stat) {
            let cpu = stat.cpu_ticks as f64 / self.ticks;
            let mut seen = self.cpu_seen.lock();
            if cpu > *seen {
                self.cpu.inc_by(cpu - *seen);
                *seen = cpu;
            }
            self.resident.set(stat.rss_pages * self.page_size);
            self.virtual_bytes.set(stat.vsize_bytes as i64);
            self.threads.set(stat.threads);
            if let Some(boot) = self.boot_time {
                self.start_time.set(boot as f64 + stat.start_ticks as f64 / self.ticks);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle being read is one of them.
            self.open_fds.set(dir.count() as i64 - 1);
        }
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        self.max_fds.set(limit.current.map_or(-1, |n| n as i64));
    }
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.cpu.desc();
        d.extend(self.resident.desc());
        d.extend(self.virtual_bytes.desc());
        d.extend(self.open_fds.desc());
        d.extend(self.max_fds.desc());
        d.extend(self.start_time.desc());
        d.extend(self.threads.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        let mut f = self.cpu.collect();
        f.extend(self.resident.collect());
        f.extend(self.virtual_bytes.collect());
        f.extend(self.open_fds.collect());
        f.extend(self.max_fds.collect());
        f.extend(self.start_time.collect());
        f.extend(self.threads.collect());
        f
    }
}

/// Add the process metrics to the process's registry (once).
pub fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = crate::metrics::METRICS.registry.register(Box::new(ProcessMetrics::default())) {
            tracing::warn!(error = %e, "cannot register the process metrics");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (sess (lb) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 50 0 0 20 0 7 0 12345 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.cpu_ticks, 200);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_ticks, 12345);
        assert_eq!(s.vsize_bytes, 104_857_600);
        assert_eq!(s.rss_pages, 2560);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_measured() {
        let m = ProcessMetrics::default();
        let f = m.collect();
        let value = |name: &str| -> f64 {
            let fam = f.iter().find(|f| f.name() == name).unwrap();
            let metric = &fam.get_metric()[0];
            if fam.get_field_type() == prometheus::proto::MetricType::COUNTER {
                metric.get_counter().value()
            } else {
                metric.get_gauge().value()
            }
        };
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_threads") >= 1.0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let started = value("process_start_time_seconds");
        assert!(started <= now + 1.0 && started > now - 3600.0, "started {started}, now {now}");
    }
}
