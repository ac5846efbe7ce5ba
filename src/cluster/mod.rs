//! The cluster: the registry (trait + PostgreSQL + SQLite), the node
//! lifecycle (start-up checks, check-ins, load reports, shutdown), address
//! resolution, change notifications and the in-memory view of nodes and
//! sessions that routing reads. It knows no HTTP.

pub mod address;
pub mod instrumented;
pub mod load;
pub mod model;
pub mod node;
pub mod pins;
pub mod postgres;
pub mod registry;
mod sql;
pub mod sqlite;
pub mod sync;
pub mod view;

pub use model::*;
pub use registry::{NewSession, Registry, RegistryError, RegistryOptions, connect, connect_with};
pub use view::ClusterView;
