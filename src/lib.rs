//! sessionlb: a session-aware load balancer for clusters of interactive
//! web-IDE servers (RStudio/Posit Workbench, Jupyter, code-server), built on
//! Pingora.
//!
//! Module map (the CLI and the proxy sit on top and use the rest):
//! - [`config`]: validated settings from TOML or a Workbench directory, key file checks.
//! - [`cluster`]: the registry (PostgreSQL / SQLite), node lifecycle, address
//!   resolution, change notifications and the in-memory cluster view.
//! - [`balancer`]: placement of new sessions, one balancer per file.
//! - [`lock`]: cross-node locks on shared storage.
//! - [`proxy`]: the Pingora data path.
//! - [`metrics`]: the Prometheus registry.
//! - [`ops`]: metrics listener, drain, zero-downtime upgrade, stop sequence, systemd.
//! - [`server`]: `serve` — the control runtime, the Pingora server, shutdown order.
//! - [`telemetry`]: logging and diagnostics.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod balancer;
pub mod cluster;
pub mod config;
pub mod lock;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod server;
pub mod telemetry;
