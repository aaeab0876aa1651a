//! NVMe over TCP for nvmirror: the PDU codec ([`pdu`]) shared with host-side tools, and the embedded
//! target (fabrics, admin, I/O and discovery) that exports a [`backend::Backend`] to NVMe/TCP hosts.
//!
//! Call order: [`target::Target::new`] with a validated [`config::TargetConfig`], then
//! [`target::Target::bind_listeners`]; each reactor owns a [`poll_group::PollGroup`], hands it accepted
//! streams round robin with `add_connection`, and calls `poll(now_us, &mut backend)` in its loop.
#![forbid(unsafe_code)]

pub mod admin;
pub mod async_event;
pub mod backend;
pub mod config;
mod connection;
pub mod controller;
pub mod discovery;
mod dispatch;
mod fabrics;
pub mod identify;
pub mod io;
pub mod log_limit;
pub mod log_page;
pub mod pdu;
pub mod poll_group;
pub mod request;
mod send;
pub mod spec;
pub mod target;
pub mod token_table;

pub use backend::{Backend, BackendError, DeviceBackend, IoToken, NamespaceInfo};
pub use config::{SubsystemConfig, TargetConfig};
pub use poll_group::PollGroup;
pub use target::{Listener, Target};
