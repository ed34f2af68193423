//! The Tandem relay as a library. `tandem-relay` (relay/) is thin glue over it: configuration, admin
//! commands, signals.
//!
//! * [`registry`]: the pure pairing state machine (slots, sessions, limits), tested without I/O.
//! * [`store`]: the store of organisations, technicians (token hashes), devices and the audit log:
//!   SQLite for a lone relay, PostgreSQL shared by the nodes of a cluster.
//! * [`directory`]: a cluster's slot directory (which node holds a code), in the shared store.
//! * [`server`]: the QUIC server (quinn) that drives the registry and forwards payloads blind.
//! * [`tcp`]: the TCP front (TLS over TCP, WebSocket) for clients whose network drops UDP.
//! * [`channel`]: relay channels, the session packets forwarded without the outer QUIC.
//! * [`devices`]: enrolled devices (presence), listed only to consoles of their organisation.
//! * [`metrics`]: Prometheus metrics, served with `/health` by a small HTTP listener.

pub mod channel;
pub mod devices;
pub mod directory;
mod http;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod store;
pub mod tcp;

pub use registry::Limits;
pub use server::{RelayHandle, ServerConfig, ServerError, Stats, start};
pub use store::Store;
pub use tcp::TcpConfig;
