//! The engine's error domains (STYLE 4): [`EngineError`] stops a side from starting,
//! [`LinkError`] is connection-fatal (the runtime closes that link; the source resends after the
//! next connect). Programmer errors are `assert!`s; host command errors are
//! [`crate::source::WriteRefused`] / [`crate::source::ReadError`].

use std::fmt;

use crate::geometry::GeometryError;
use crate::ring::RingError;
use crate::wire::{RejectReason, WireError};

/// A side cannot start (or promote) with this ring, configuration or devices.
#[derive(Debug)]
pub enum EngineError {
    Ring(RingError),
    Geometry(GeometryError),
    /// The ring belongs to another volume.
    VolumeMismatch,
    /// No namespace, or more than [`crate::geometry::NAMESPACES_MAX`].
    NamespaceCount(usize),
    /// A namespace size that is zero or not a multiple of the block size.
    NamespaceSize {
        nsid: u32,
        size_bytes: u64,
    },
    /// A logged entry lies outside the namespaces it is replayed onto.
    EntryOutOfRange {
        nsid: u32,
        offset_bytes: u64,
        length_bytes: u32,
    },
    /// A block device failed during a promotion's replay.
    Device {
        nsid: u32,
        error: crate::device::DeviceError,
    },
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ring(error) => write!(f, "ring: {error}"),
            Self::Geometry(error) => write!(f, "ring geometry: {error}"),
            Self::VolumeMismatch => f.write_str("the ring belongs to another volume"),
            Self::NamespaceCount(count) => write!(f, "{count} namespaces (1..=16 supported)"),
            Self::NamespaceSize { nsid, size_bytes } => {
                write!(
                    f,
                    "namespace {nsid}: size {size_bytes} is not a positive multiple of 4096"
                )
            }
            Self::EntryOutOfRange {
                nsid,
                offset_bytes,
                length_bytes,
            } => write!(
                f,
                "a logged entry of {length_bytes} bytes at {offset_bytes} in namespace {nsid} lies outside the namespaces to replay it onto"
            ),
            Self::Device { nsid, error } => write!(f, "namespace {nsid}: device error: {error}"),
        }
    }
}

impl std::error::Error for EngineError {}

/// A connection-fatal condition: the runtime closes the link (after a best-effort flush of the
/// send queue, which may hold a Reject).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The bytes are not a valid message.
    Wire(WireError),
    /// A valid message that is not allowed now (`message` in `state`).
    Unexpected {
        message: &'static str,
        state: &'static str,
    },
    /// A valid message whose content contradicts the protocol.
    Protocol(String),
    /// An entry's data does not match its data_crc (never applied).
    DataCrc { transfer_id: u64, entry_index: u32 },
    /// The peer refused our Hello.
    RejectedByPeer { reason: RejectReason, text: String },
    /// We refused the peer's Hello (a Reject is queued).
    RejectedPeer { reason: RejectReason, text: String },
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Wire(error) => write!(f, "wire: {error}"),
            Self::Unexpected { message, state } => write!(f, "unexpected {message} while {state}"),
            Self::Protocol(text) => write!(f, "protocol: {text}"),
            Self::DataCrc {
                transfer_id,
                entry_index,
            } => {
                write!(
                    f,
                    "transfer {transfer_id} entry {entry_index}: data crc mismatch"
                )
            }
            Self::RejectedByPeer { reason, text } => {
                write!(f, "rejected by peer ({reason:?}): {text}")
            }
            Self::RejectedPeer { reason, text } => write!(f, "rejected peer ({reason:?}): {text}"),
        }
    }
}

impl std::error::Error for LinkError {}

impl From<WireError> for LinkError {
    fn from(error: WireError) -> Self {
        Self::Wire(error)
    }
}
