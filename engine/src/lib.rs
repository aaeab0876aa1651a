//! nvmirror's engine core: the replication method of the patent claims, sans IO.
//!
//! Events go in (`handle_*` with the time as `now_us`), actions come out (`poll_*`, the send queue);
//! block devices are reached through device ops and their completions ([`device`]). No sockets, threads or clocks live here,
//! so the same core is driven by the embedded runtime, an SPDK runtime and the seeded simulation.
#![forbid(unsafe_code)]

pub mod checksum;
pub mod counters;
pub mod cp;
pub mod destination;
pub mod device;
pub mod error;
pub mod generation;
pub mod geometry;
pub mod liveness;
pub mod metadata;
mod open;
pub mod promotion;
pub mod ring;
pub mod source;
#[cfg(test)]
mod test_rng;
pub mod transfer;
pub mod wire;
pub mod wire_enum;

pub use counters::Counters;
pub use destination::{Destination, DestinationConfig, DestinationEvent};
pub use device::{BlockDevice, DeviceCompletion, DeviceError, DeviceOp, DeviceOpId, DeviceRequest};
pub use error::{EngineError, LinkError, ProtocolError};
pub use liveness::{PeerLossPolicy, PeerLostReason, PeerState, PEER_TIMEOUT_US_DEFAULT};
pub use promotion::{PromoteReport, Promotion};
pub use source::{
    CpMode, DeviceFault, ReadError, RecoveryReport, Source, SourceConfig, SourceEvent, WriteId,
    WriteRefused, WriteSlot,
};
