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
    /// This node's mirror is half resynced (a mix of two points in time): not promoted.
    ResyncTarget {
        generation: u64,
    },
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ring(error) => write!(f, "ring: {error}"),
            Self::Geometry(error) => write!(f, "ring geometry: {error}"),
            Self::VolumeMismatch => f.write_str("the ring belongs to another volume"),
            Self::ResyncTarget { generation } => write!(
                f,
                "this node's mirror is being resynced from its source (it still holds generation \
                 {} and a mix of newer blocks): not a consistent image, so it is not promoted",
                crate::generation::Hex(*generation)
            ),
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
    Protocol(ProtocolError),
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
            Self::Protocol(error) => write!(f, "protocol: {error}"),
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

/// How a peer's valid message contradicted the protocol (connection-fatal, STYLE 4): one
/// variant per rule, with the values that broke it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    // Source side: the destination's messages.
    TableAckOutOfRange {
        cp_number: u64,
        tables: u64,
        tables_sent: u64,
        cp_in_flight: u64,
    },
    NotAwaitingCpAck {
        message: &'static str,
        cp_number: u64,
    },
    CompletedUncommittedCp {
        cp_number: u64,
    },
    HelloAckCp {
        theirs: u64,
        ours: u64,
    },
    AckNotAwaited {
        transfer_id: u64,
    },
    // Destination side: the source's messages.
    TransferForCp {
        cp_number: u64,
        cp_completed: u64,
    },
    TransferIntoHalf {
        cp_number: u64,
        half_cp: u64,
    },
    TransferIdNotIncreasing {
        transfer_id: u64,
    },
    TransferSeq {
        first_seq: u64,
        expected: u64,
    },
    RingHalfFull,
    Placement {
        ours: u32,
        sources: u32,
    },
    NoNamespace {
        nsid: u32,
    },
    BeyondNamespace {
        nsid: u32,
        offset_bytes: u64,
        length_bytes: u64,
    },
    TableForCp {
        cp_number: u64,
        committing: u64,
    },
    TableWindow,
    /// A resync message out of place (which one, and why).
    Resync {
        what: &'static str,
    },
    BlockIndexOverflow,
    CpCommit {
        cp_number: u64,
        descriptor_count: u64,
        expected_cp: u64,
        expected_count: u64,
    },
    UnknownTransfer {
        transfer_id: u64,
    },
    BeyondTransfer {
        transfer_id: u64,
        block_number: u32,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::TableAckOutOfRange {
                cp_number,
                tables,
                tables_sent,
                cp_in_flight,
            } => write!(
                f,
                "TableAck of {tables} tables of cp {cp_number} (sent {tables_sent} of cp {cp_in_flight})"
            ),
            Self::NotAwaitingCpAck { message, cp_number } => {
                write!(f, "{message} for cp {cp_number} that is not awaiting one")
            }
            Self::CompletedUncommittedCp { cp_number } => {
                write!(f, "destination completed cp {cp_number} we never committed")
            }
            Self::HelloAckCp { theirs, ours } => write!(f, "destination cp {theirs} vs ours {ours}"),
            Self::AckNotAwaited { transfer_id } => {
                write!(f, "ack of transfer {transfer_id} that is not awaiting an ack")
            }
            Self::TransferForCp {
                cp_number,
                cp_completed,
            } => write!(f, "transfer for cp {cp_number} at cp {cp_completed}"),
            Self::TransferIntoHalf { cp_number, half_cp } => {
                write!(f, "transfer for cp {cp_number} into a half of cp {half_cp}")
            }
            Self::TransferIdNotIncreasing { transfer_id } => {
                write!(f, "transfer id {transfer_id} not increasing")
            }
            Self::TransferSeq {
                first_seq,
                expected,
            } => write!(f, "transfer seq {first_seq} != expected {expected}"),
            Self::RingHalfFull => f.write_str("destination ring half full"),
            Self::Placement { ours, sources } => write!(f, "placement {ours} != source's {sources}"),
            Self::NoNamespace { nsid } => write!(f, "namespace {nsid} does not exist"),
            Self::BeyondNamespace {
                nsid,
                offset_bytes,
                length_bytes,
            } => write!(
                f,
                "namespace {nsid}: {length_bytes} bytes at {offset_bytes} beyond its end"
            ),
            Self::TableForCp {
                cp_number,
                committing,
            } => write!(f, "descriptors for cp {cp_number} while committing cp {committing}"),
            Self::Resync { what } => write!(f, "resync: {what}"),
            Self::TableWindow => write!(
                f,
                "more than {} DescriptorTables unacknowledged",
                crate::source::TABLE_WINDOW
            ),
            Self::BlockIndexOverflow => f.write_str("block index overflow"),
            Self::CpCommit {
                cp_number,
                descriptor_count,
                expected_cp,
                expected_count,
            } => write!(
                f,
                "CpCommit cp {cp_number} with {descriptor_count} descriptors; expected cp {expected_cp} with {expected_count}"
            ),
            Self::UnknownTransfer { transfer_id } => {
                write!(f, "reference to unknown transfer {transfer_id}")
            }
            Self::BeyondTransfer {
                transfer_id,
                block_number,
            } => write!(f, "reference to block {block_number} beyond transfer {transfer_id}"),
        }
    }
}

impl From<ProtocolError> for LinkError {
    fn from(error: ProtocolError) -> Self {
        Self::Protocol(error)
    }
}

impl From<WireError> for LinkError {
    fn from(error: WireError) -> Self {
        Self::Wire(error)
    }
}
