//! Operations: what an SRE runs a node with beside the data path — the
//! metrics listener and the metrics read at scrape time (process, cluster
//! gauges), per-request accounting, the drain on stop, the zero-downtime
//! upgrade, the stop sequence, systemd notifications, the configuration
//! reload and the access log.

pub mod access_log;
pub mod cluster_metrics;
pub mod drain;
pub mod metrics_listener;
pub mod process_metrics;
pub mod reload;
pub mod stop;
pub mod systemd;
pub mod traffic;
pub mod upgrade;
