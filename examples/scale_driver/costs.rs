//! CPU and memory over a window of time: every node, PostgreSQL (the
//! postmaster and its backends), the demo backends, this driver, and what
//! the rest of the machine used meanwhile (other people's work on a shared
//! machine shows up there, so a noisy figure can be recognised).

use std::time::Instant;

use serde_json::{Value, json};

use crate::cluster::Node;
use crate::procfs;
use crate::stats::{finite, spread};

/// Processes whose cost is reported.
#[derive(Debug, Clone)]
pub struct Processes {
    pub nodes: Vec<Node>,
    pub postgres: Option<u32>,
    pub backends: Vec<u32>,
    pub hz: f64,
}

/// Counters at the start of a window.
pub struct Window {
    t0: Instant,
    load_before: String,
    node_ticks: Vec<u64>,
    pg_ticks: u64,
    backend_ticks: u64,
    driver_ticks: u64,
    machine_ticks: u64,
}

/// What a window cost.
#[derive(Debug, Clone)]
pub struct Costs {
    pub seconds: f64,
    /// Per node, in % of one core.
    pub node_cpu: Vec<f64>,
    pub node_rss_mb: Vec<f64>,
    pub node_hwm_mb: Vec<f64>,
    pub node_threads: Vec<u64>,
    pub pg_cpu: f64,
    pub pg_rss_mb: f64,
    pub backends_cpu: f64,
    pub driver_cpu: f64,
    pub machine_cpu: f64,
    pub others_cpu: f64,
    pub load_before: String,
    pub load_after: String,
}

impl Processes {
    fn pg_pids(&self) -> Vec<u32> {
        self.postgres.map(procfs::with_children).unwrap_or_default()
    }

    pub fn start(&self) -> Window {
        Window {
            t0: Instant::now(),
            load_before: procfs::loadavg(),
            node_ticks: self.nodes.iter().map(|n| procfs::sample(n.pid).map_or(0, |s| s.ticks)).collect(),
            pg_ticks: procfs::ticks_of(&self.pg_pids()),
            backend_ticks: procfs::ticks_of(&self.backends),
            driver_ticks: procfs::ticks_of(&[std::process::id()]),
            machine_ticks: procfs::machine_busy_ticks(),
        }
    }

    /// Close a window: CPU since `w` (in % of one core), memory now.
    pub fn finish(&self, w: &Window) -> Costs {
        let secs = w.t0.elapsed().as_secs_f64();
        let pct = |ticks: u64| ticks as f64 / self.hz / secs * 100.0;
        let samples: Vec<procfs::ProcSample> =
            self.nodes.iter().map(|n| procfs::sample(n.pid).unwrap_or_default()).collect();
        let node_cpu: Vec<f64> =
            samples.iter().zip(&w.node_ticks).map(|(s, t0)| pct(s.ticks.saturating_sub(*t0))).collect();
        let pg_pids = self.pg_pids();
        let pg_cpu = pct(procfs::ticks_of(&pg_pids).saturating_sub(w.pg_ticks));
        let backends_cpu = pct(procfs::ticks_of(&self.backends).saturating_sub(w.backend_ticks));
        let driver_cpu = pct(procfs::ticks_of(&[std::process::id()]).saturating_sub(w.driver_ticks));
        let machine_cpu = pct(procfs::machine_busy_ticks().saturating_sub(w.machine_ticks));
        let ours = node_cpu.iter().sum::<f64>() + pg_cpu + backends_cpu + driver_cpu;
        Costs {
            seconds: secs,
            node_rss_mb: samples.iter().map(|s| s.rss_kb as f64 / 1024.0).collect(),
            node_hwm_mb: samples.iter().map(|s| s.hwm_kb as f64 / 1024.0).collect(),
            node_threads: samples.iter().map(|s| s.threads).collect(),
            node_cpu,
            pg_cpu,
            // PostgreSQL's processes share memory; the sum over-counts it, so report the largest one.
            pg_rss_mb: pg_pids.iter().filter_map(|p| procfs::sample(*p)).map(|s| s.rss_kb).max().unwrap_or(0) as f64
                / 1024.0,
            backends_cpu,
            driver_cpu,
            machine_cpu,
            others_cpu: (machine_cpu - ours).max(0.0),
            load_before: w.load_before.clone(),
            load_after: procfs::loadavg(),
        }
    }
}

impl Costs {
    /// Markdown lines.
    pub fn markdown(&self, what: &str) -> String {
        let (cmin, cmed, cmax) = spread(&self.node_cpu);
        let (rmin, rmed, rmax) = spread(&self.node_rss_mb);
        let total_nodes: f64 = self.node_cpu.iter().sum();
        let threads = self.node_threads.iter().copied().max().unwrap_or(0);
        format!(
            "- CPU {what} ({:.0} s, % of one core): per node min {cmin:.2} / median {cmed:.2} / max {cmax:.2}; \
             all {} nodes {total_nodes:.1}; PostgreSQL {:.1}; demo backends {:.1}; driver {:.1}; \
             rest of the machine {:.1} (machine {:.0} of {} cores × 100)\n\
             - RSS per node {what}: min {rmin:.1} / median {rmed:.1} / max {rmax:.1} MB (peak so far, max: {:.1} MB; \
             up to {threads} threads); PostgreSQL's largest process {:.1} MB\n\
             - machine load (1/5/15 min) before → after: {} → {}\n",
            self.seconds,
            self.node_cpu.len(),
            self.pg_cpu,
            self.backends_cpu,
            self.driver_cpu,
            self.others_cpu,
            self.machine_cpu,
            procfs::cpu_count(),
            self.node_hwm_mb.iter().copied().fold(0.0, f64::max),
            self.pg_rss_mb,
            self.load_before,
            self.load_after,
        )
    }

    pub fn json(&self) -> Value {
        let (cmin, cmed, cmax) = spread(&self.node_cpu);
        let (rmin, rmed, rmax) = spread(&self.node_rss_mb);
        json!({
            "seconds": finite(self.seconds),
            "node_cpu_pct": { "min": finite(cmin), "median": finite(cmed), "max": finite(cmax),
                              "sum": finite(self.node_cpu.iter().sum()), "each": self.node_cpu.iter().map(|v| finite(*v)).collect::<Vec<_>>() },
            "node_rss_mb": { "min": finite(rmin), "median": finite(rmed), "max": finite(rmax),
                             "each": self.node_rss_mb.iter().map(|v| finite(*v)).collect::<Vec<_>>() },
            "node_peak_rss_mb_max": finite(self.node_hwm_mb.iter().copied().fold(0.0, f64::max)),
            "node_threads_max": self.node_threads.iter().copied().max().unwrap_or(0),
            "postgres_cpu_pct": finite(self.pg_cpu),
            "postgres_largest_rss_mb": finite(self.pg_rss_mb),
            "backends_cpu_pct": finite(self.backends_cpu),
            "driver_cpu_pct": finite(self.driver_cpu),
            "machine_cpu_pct": finite(self.machine_cpu),
            "others_cpu_pct": finite(self.others_cpu),
            "cores": procfs::cpu_count(),
            "load_before": self.load_before,
            "load_after": self.load_after,
        })
    }
}
