//! Integration tests: one binary (one link step) of modules that use real
//! PostgreSQL, real `sessionlb` processes and real HTTP/WebSocket backends.

mod backend_keys;
mod cluster_core;
mod common;
mod contracts;
mod failover;
mod faults;
mod fuzz_corpus;
mod hostile;
mod lifecycle;
mod lock;
mod metrics;
mod packaging;
mod passthrough;
mod pins;
mod registry;
mod registry_schema;
mod reload;
mod routing;
mod scale_smoke;
mod security;
mod sessions;
mod status_page;
mod tls;
mod workbench;
mod workbench_doc;
