//! Integration tests: one binary (one link step) of modules that use real
//! PostgreSQL, real `sessionlb` processes and real HTTP/WebSocket backends.

mod common;
mod registry;
