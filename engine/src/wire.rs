//! The replication wire protocol, version 3: message framing and codec (engine spec "Wire
//! protocol"; claims 10, 12, 15: data transfers with transfer IDs, references of transfer ID +
//! block number). [`decode`] validates everything and returns a typed [`WireError`], never panics.
//!
//! Message header (16 B, little endian): magic "NVMW" u32 @0, version u8 @4, kind u8 @5,
//! flags u16 @6 (zero), length u32 @8 (whole message incl. header), crc32c u32 @12.
//! CRC coverage: the header (crc field as zero) and the body, except for Transfer, where it covers
//! the header, the transfer header and the entry headers; the entry data are covered by each
//! entry's data_crc, which the destination verifies before storing anything.
//!
//! Bodies:
//! - Hello (128 B + 8 per namespace): protocol_version u32 @0, block_size u32 @4, sector_size
//!   u32 @8, mode u8 @12, namespace_count u8 @13, zero u16 @14, volume_id [16] @16, cp_completed
//!   u64 @32, ring_bytes u64 @40, half_header_slots u32 @48, half_data_bytes u32 @52,
//!   proposed_generation u64 @56 (non-zero: the generation a pair of fresh sides takes), the
//!   source's generations @64 (node_id u64, current u64, history 4 × u64, bitmap_base u64, flags
//!   u32, zero u32: 64 B, [`crate::generation::Generations`]), then namespace_count × size_bytes u64.
//! - HelloAck (72 B): cp_completed u64 @0, the destination's generations @8 (64 B) as they were
//!   when the Hello came, so both sides settle the same pair ([`crate::generation::settle`]).
//! - Reject: reason u32, UTF-8 text.
//! - Transfer: transfer_id u64, cp_number u64, first_seq u64, entry_count u32, then entry_count ×
//!   {nsid u32, flags u16, length_bytes u32, lba u64, data_offset u32, data_crc u32} (26 B), then
//!   the data of each non-ZEROES entry back to back.
//! - TransferAck: transfer_id u64 (cumulative).
//! - DescriptorTable: cp_number u64, count u32, then count × {kind u8, nsid u32, block_index u64}
//!   followed for a Reference by {transfer_id u64, block_number u32} (13 or 25 B), then 4 KiB per
//!   Data descriptor in order.
//! - CpCommit: cp_number u64, descriptor_count u64.   - CpAck: cp_number u64.
//! - TableAck: cp_number u64, tables u64.   - CpFailed: cp_number u64.
//! - Heartbeat: peer_timeout_us u64 (the sender's own peer timeout). Either side sends one when it
//!   has sent nothing for a quarter of its peer timeout, in any link state (before a Hello too), so
//!   a peer that stays silent for a whole timeout is lost whatever its socket says (a frozen
//!   process keeps its TCP connection open). Version 3 added it; a version-2 peer is refused.
//! - ResyncTable: the layout of a DescriptorTable with a resync number in place of the CP number:
//!   blocks of the source's marked extents, as Data (read from the primary) or as a Reference to
//!   a transfer the destination acknowledged before the peer was lost and still holds (version 5).
//! - ResyncAck: resync_number u64, failed u64 (0: written and flushed; 1: a mirror op failed).
//! - ResyncDone: generation u64 (the source's current: the destination takes it, the resync is
//!   over).   - ResyncDoneAck: generation u64 (taken, durably).
//! - ResyncMarks (destination to source, first in a resync session): last u32 (1 on the final
//!   one), count u32, then count × {nsid u32, offset_bytes u64, length_bytes u64}: extents the
//!   destination may have changed that the source lacks (a former source attached as the new
//!   destination: the writes of its ring that may never have reached the other side). The source
//!   resyncs them too, and finishes only after the last one came.

mod out_queue;

pub use crate::geometry::MESSAGE_BYTES_MAX;
pub use out_queue::{OutQueue, QueueFull, Segment};

use std::fmt;

use crate::checksum::{crc32c_with_zero_field, le_u16, le_u32, le_u64};
use crate::cp::{CpMode, Descriptor, DescriptorEntry};
use crate::generation::{Generations, GENERATIONS_BYTES};
use crate::geometry::{
    RingGeometry, BLOCK_SIZE, DESCRIPTORS_PER_TABLE, NAMESPACES_MAX, TRANSFER_ENTRIES_MAX,
};
use crate::ring::{entry_data_bytes, entry_length_valid, ENTRY_FLAG_ZEROES};
use crate::transfer::TransferId;

/// "NVMW" in little endian.
pub const WIRE_MAGIC: u32 = u32::from_le_bytes(*b"NVMW");
/// The protocol version this code speaks.
/// 3: Heartbeat. 4: generations replace the epoch in Hello and HelloAck. 5: resync.
pub const PROTOCOL_VERSION: u8 = 5;
pub const MESSAGE_HEADER_BYTES: usize = 16;
pub const HELLO_FIXED_BYTES: usize = HELLO_GENERATIONS_OFFSET + GENERATIONS_BYTES;
const HELLO_GENERATIONS_OFFSET: usize = 64;
pub const HELLO_ACK_BYTES: usize = 8 + GENERATIONS_BYTES;
pub const TRANSFER_HEADER_BYTES: usize = 28;
pub const WIRE_ENTRY_BYTES: usize = 26;
pub const TABLE_HEADER_BYTES: usize = 12;
pub const DESCRIPTOR_BYTES: usize = 13;
pub const REFERENCE_DESCRIPTOR_BYTES: usize = 25;
const CRC_OFFSET: usize = 12;
// The crc field is the header's last: `message_crc` covers the header with it as zero, then the body.
const _: () = assert!(CRC_OFFSET + 4 == MESSAGE_HEADER_BYTES);

const _: () = assert!(REFERENCE_DESCRIPTOR_BYTES <= 32);
const _: () = assert!(
    MESSAGE_HEADER_BYTES
        + TRANSFER_HEADER_BYTES
        + TRANSFER_ENTRIES_MAX * WIRE_ENTRY_BYTES
        + crate::geometry::TRANSFER_DATA_BYTES_MAX
        <= MESSAGE_BYTES_MAX
);

crate::wire_enum! {
    /// Message kinds.
    pub enum MessageKind: u8 {
        Hello = 1,
        HelloAck = 2,
        Reject = 3,
        Transfer = 4,
        TransferAck = 5,
        DescriptorTable = 6,
        CpCommit = 7,
        CpAck = 8,
        TableAck = 9,
        CpFailed = 10,
        Heartbeat = 11,
        ResyncTable = 12,
        ResyncAck = 13,
        ResyncDone = 14,
        ResyncDoneAck = 15,
        ResyncMarks = 16,
    }
}

crate::wire_enum! {
    /// Why a Hello was refused.
    pub enum RejectReason: u32 {
        Version = 1,
        Geometry = 2,
        Volume = 3,
        StaleSource = 4,
        CpMismatch = 5,
        Namespaces = 6,
        SplitBrain = 7,
        FullSyncRequired = 8,
        ResyncRequired = 9,
        SameNode = 10,
    }
}

/// A malformed message: connection-fatal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    Truncated {
        length: usize,
        needed: usize,
    },
    BadMagic,
    BadVersion(u8),
    UnknownKind(u8),
    BadFlags(u16),
    BadLength(u32),
    Crc {
        expected: u32,
        actual: u32,
    },
    BadBody {
        kind: MessageKind,
        reason: &'static str,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { length, needed } => {
                write!(f, "truncated message: {length} of {needed} bytes")
            }
            Self::BadMagic => f.write_str("bad message magic"),
            Self::BadVersion(version) => write!(f, "unsupported protocol version {version}"),
            Self::UnknownKind(kind) => write!(f, "unknown message kind {kind}"),
            Self::BadFlags(flags) => write!(f, "nonzero message flags {flags:#x}"),
            Self::BadLength(length) => write!(f, "bad message length {length}"),
            Self::Crc { expected, actual } => {
                write!(f, "message crc mismatch: {actual:#x} != {expected:#x}")
            }
            Self::BadBody { kind, reason } => write!(f, "bad {kind:?} body: {reason}"),
        }
    }
}

/// Hello: what the source tells the destination first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    pub block_size: u32,
    pub sector_size: u32,
    pub mode: CpMode,
    pub volume_id: [u8; 16],
    pub cp_completed: u64,
    pub geometry: RingGeometry,
    /// The source's fresh generation for a pair where neither side holds data.
    pub proposed_generation: u64,
    pub generations: Generations,
    pub namespace_count: u8,
    pub namespace_sizes_bytes: [u64; NAMESPACES_MAX],
}

impl Hello {
    pub fn namespace_sizes(&self) -> &[u64] {
        &self.namespace_sizes_bytes[..usize::from(self.namespace_count)]
    }
}

/// The fixed part of a Transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferHeader {
    pub transfer_id: TransferId,
    pub cp_number: u64,
    pub first_seq: u64,
    pub entry_count: u32,
}

/// An entry header as it travels in a Transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireEntry {
    pub nsid: u32,
    pub flags: u16,
    pub length_bytes: u32,
    pub lba: u64,
    pub data_offset: u32,
    pub data_crc: u32,
}

impl WireEntry {
    pub fn is_zeroes(&self) -> bool {
        self.flags & ENTRY_FLAG_ZEROES != 0
    }
    pub fn data_bytes(&self) -> u32 {
        entry_data_bytes(self.flags, self.length_bytes)
    }
    fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.nsid.to_le_bytes());
        out[4..6].copy_from_slice(&self.flags.to_le_bytes());
        out[6..10].copy_from_slice(&self.length_bytes.to_le_bytes());
        out[10..18].copy_from_slice(&self.lba.to_le_bytes());
        out[18..22].copy_from_slice(&self.data_offset.to_le_bytes());
        out[22..26].copy_from_slice(&self.data_crc.to_le_bytes());
    }
    fn decode(bytes: &[u8]) -> Self {
        Self {
            nsid: le_u32(bytes, 0),
            flags: le_u16(bytes, 4),
            length_bytes: le_u32(bytes, 6),
            lba: le_u64(bytes, 10),
            data_offset: le_u32(bytes, 18),
            data_crc: le_u32(bytes, 22),
        }
    }
}

/// A decoded Transfer borrowing the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferMessage<'a> {
    pub header: TransferHeader,
    entries: &'a [u8],
    data: &'a [u8],
}

impl<'a> TransferMessage<'a> {
    /// The entries with their data (empty for ZEROES), in order.
    pub fn entries(&self) -> impl Iterator<Item = (WireEntry, &'a [u8])> + 'a {
        let data = self.data;
        let mut data_at = 0usize;
        self.entries
            .chunks_exact(WIRE_ENTRY_BYTES)
            .map(move |bytes| {
                let entry = WireEntry::decode(bytes);
                let slice = &data[data_at..data_at + entry.data_bytes() as usize];
                data_at += slice.len();
                (entry, slice)
            })
    }
}

/// A decoded DescriptorTable borrowing the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorTableMessage<'a> {
    pub cp_number: u64,
    pub count: u32,
    descriptors: &'a [u8],
    data: &'a [u8],
}

impl<'a> DescriptorTableMessage<'a> {
    /// The descriptors, each Data one with its 4 KiB block.
    pub fn descriptors(&self) -> impl Iterator<Item = (DescriptorEntry, Option<&'a [u8]>)> + 'a {
        let (bytes, data) = (self.descriptors, self.data);
        let (mut at, mut data_at) = (0usize, 0usize);
        (0..self.count).map(move |_| {
            let (entry, size) = decode_descriptor(&bytes[at..]).expect("validated by decode");
            at += size;
            let block = (entry.descriptor == Descriptor::Data).then(|| {
                data_at += BLOCK_SIZE;
                &data[data_at - BLOCK_SIZE..data_at]
            });
            (entry, block)
        })
    }
}

/// A decoded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Hello(Hello),
    HelloAck {
        cp_completed: u64,
        generations: Generations,
    },
    Reject {
        reason: RejectReason,
        text: &'a str,
    },
    Transfer(TransferMessage<'a>),
    TransferAck {
        transfer_id: TransferId,
    },
    DescriptorTable(DescriptorTableMessage<'a>),
    CpCommit {
        cp_number: u64,
        descriptor_count: u64,
    },
    CpAck {
        cp_number: u64,
    },
    /// The destination wrote the mirror blocks of the first `tables` DescriptorTables of CP
    /// `cp_number` (the source keeps at most a window of tables unacknowledged).
    TableAck {
        cp_number: u64,
        tables: u64,
    },
    /// The destination could not write CP `cp_number` to its mirror; the source sends it again.
    CpFailed {
        cp_number: u64,
    },
    /// The sender is alive (it had nothing else to send); it declares us lost after its
    /// `peer_timeout_us` of silence.
    Heartbeat {
        peer_timeout_us: u64,
    },
    /// Blocks of the source's marked extents for the mirror (`cp_number` is the resync number).
    ResyncTable(DescriptorTableMessage<'a>),
    /// The destination wrote and flushed (or failed) resync table `resync_number`.
    ResyncAck {
        resync_number: u64,
        failed: bool,
    },
    /// Every marked extent is on the mirror: the destination takes `generation`.
    ResyncDone {
        generation: u64,
    },
    ResyncDoneAck {
        generation: u64,
    },
    ResyncMarks(ResyncMarksMessage<'a>),
}

/// Extents per ResyncMarks message at most.
pub const RESYNC_MARKS_PER_MESSAGE: usize = 1024;
const RESYNC_MARK_BYTES: usize = 20;

/// A decoded ResyncMarks message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncMarksMessage<'a> {
    pub last: bool,
    extents: &'a [u8],
}

impl<'a> ResyncMarksMessage<'a> {
    /// (nsid, offset_bytes, length_bytes) of each extent.
    pub fn extents(&self) -> impl Iterator<Item = (u32, u64, u64)> + 'a {
        self.extents
            .chunks_exact(RESYNC_MARK_BYTES)
            .map(|e| (le_u32(e, 0), le_u64(e, 4), le_u64(e, 12)))
    }
}

/// The bytes of a ResyncMarks message of `count` extents.
pub fn resync_marks_bytes(count: usize) -> usize {
    MESSAGE_HEADER_BYTES + 8 + count * RESYNC_MARK_BYTES
}

/// Encodes a whole ResyncMarks message into `out` ([`resync_marks_bytes`] long).
pub fn encode_resync_marks(out: &mut [u8], last: bool, extents: &[(u32, u64, u64)]) {
    assert!(extents.len() <= RESYNC_MARKS_PER_MESSAGE);
    assert_eq!(out.len(), resync_marks_bytes(extents.len()));
    encode_header(out, MessageKind::ResyncMarks, out.len());
    let body = &mut out[MESSAGE_HEADER_BYTES..];
    body[0..4].copy_from_slice(&u32::from(last).to_le_bytes());
    body[4..8].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (at, &(nsid, offset, length)) in extents.iter().enumerate() {
        let e = &mut body[8 + at * RESYNC_MARK_BYTES..8 + (at + 1) * RESYNC_MARK_BYTES];
        e[0..4].copy_from_slice(&nsid.to_le_bytes());
        e[4..12].copy_from_slice(&offset.to_le_bytes());
        e[12..20].copy_from_slice(&length.to_le_bytes());
    }
    seal(out);
}

/// For the runtime's receive loop: the full message length once the 16-byte header is there.
pub fn frame_length(buffer: &[u8]) -> Result<Option<usize>, WireError> {
    if buffer.len() < MESSAGE_HEADER_BYTES {
        return Ok(None);
    }
    check_header(buffer).map(|(_, length)| Some(length))
}

fn check_header(buffer: &[u8]) -> Result<(MessageKind, usize), WireError> {
    if le_u32(buffer, 0) != WIRE_MAGIC {
        return Err(WireError::BadMagic);
    }
    if buffer[4] != PROTOCOL_VERSION {
        return Err(WireError::BadVersion(buffer[4]));
    }
    let kind = MessageKind::from_repr(buffer[5]).ok_or(WireError::UnknownKind(buffer[5]))?;
    let flags = le_u16(buffer, 6);
    if flags != 0 {
        return Err(WireError::BadFlags(flags));
    }
    let length = le_u32(buffer, 8);
    if (length as usize) < MESSAGE_HEADER_BYTES || length as usize > MESSAGE_BYTES_MAX {
        return Err(WireError::BadLength(length));
    }
    Ok((kind, length as usize))
}

/// Decodes one whole message (exactly `message.len()` bytes).
pub fn decode(message: &[u8]) -> Result<Message<'_>, WireError> {
    if message.len() < MESSAGE_HEADER_BYTES {
        return Err(WireError::Truncated {
            length: message.len(),
            needed: MESSAGE_HEADER_BYTES,
        });
    }
    let (kind, length) = check_header(message)?;
    if length != message.len() {
        return Err(if length > message.len() {
            WireError::Truncated {
                length: message.len(),
                needed: length,
            }
        } else {
            WireError::BadLength(length as u32)
        });
    }
    let body = &message[MESSAGE_HEADER_BYTES..];
    let covered = match kind {
        MessageKind::Transfer => transfer_covered_bytes(body).min(message.len()),
        _ => message.len(),
    };
    let expected = le_u32(message, CRC_OFFSET);
    let actual = message_crc(&message[..covered]);
    if expected != actual {
        return Err(WireError::Crc { expected, actual });
    }
    decode_body(kind, body)
}

fn transfer_covered_bytes(body: &[u8]) -> usize {
    if body.len() < TRANSFER_HEADER_BYTES {
        return MESSAGE_HEADER_BYTES + body.len();
    }
    let count = le_u32(body, 24) as usize;
    MESSAGE_HEADER_BYTES
        + TRANSFER_HEADER_BYTES
        + count.min(TRANSFER_ENTRIES_MAX) * WIRE_ENTRY_BYTES
}

/// CRC of a message prefix whose header's crc field is taken as zero.
fn message_crc(covered: &[u8]) -> u32 {
    crc32c_with_zero_field(covered, CRC_OFFSET)
}

fn bad(kind: MessageKind, reason: &'static str) -> WireError {
    WireError::BadBody { kind, reason }
}

fn fixed(kind: MessageKind, body: &[u8], size: usize) -> Result<(), WireError> {
    if body.len() == size {
        Ok(())
    } else {
        Err(bad(kind, "wrong body length"))
    }
}

fn decode_body(kind: MessageKind, body: &[u8]) -> Result<Message<'_>, WireError> {
    match kind {
        MessageKind::Hello => decode_hello(body).map(Message::Hello),
        MessageKind::HelloAck => {
            fixed(kind, body, HELLO_ACK_BYTES)?;
            Ok(Message::HelloAck {
                cp_completed: le_u64(body, 0),
                generations: Generations::decode(&body[8..HELLO_ACK_BYTES])
                    .map_err(|reason| bad(kind, reason))?,
            })
        }
        MessageKind::Reject => {
            if body.len() < 4 {
                return Err(bad(kind, "wrong body length"));
            }
            let reason =
                RejectReason::from_repr(le_u32(body, 0)).ok_or(bad(kind, "unknown reason"))?;
            let text =
                std::str::from_utf8(&body[4..]).map_err(|_| bad(kind, "text is not UTF-8"))?;
            Ok(Message::Reject { reason, text })
        }
        MessageKind::Transfer => decode_transfer(body).map(Message::Transfer),
        MessageKind::TransferAck => {
            fixed(kind, body, 8)?;
            Ok(Message::TransferAck {
                transfer_id: TransferId(le_u64(body, 0)),
            })
        }
        MessageKind::DescriptorTable => decode_table(kind, body).map(Message::DescriptorTable),
        MessageKind::ResyncTable => decode_table(kind, body).map(Message::ResyncTable),
        MessageKind::ResyncAck => {
            fixed(kind, body, 16)?;
            let failed = match le_u64(body, 8) {
                0 => false,
                1 => true,
                _ => return Err(bad(kind, "status is not 0 or 1")),
            };
            Ok(Message::ResyncAck {
                resync_number: le_u64(body, 0),
                failed,
            })
        }
        MessageKind::ResyncMarks => {
            if body.len() < 8 {
                return Err(bad(kind, "wrong body length"));
            }
            let last = match le_u32(body, 0) {
                0 => false,
                1 => true,
                _ => return Err(bad(kind, "last is not 0 or 1")),
            };
            let count = le_u32(body, 4) as usize;
            if count > RESYNC_MARKS_PER_MESSAGE || body.len() != 8 + count * RESYNC_MARK_BYTES {
                return Err(bad(kind, "extent count does not match the length"));
            }
            let extents = &body[8..];
            if extents
                .chunks_exact(RESYNC_MARK_BYTES)
                .any(|e| le_u32(e, 0) == 0 || le_u64(e, 12) == 0)
            {
                return Err(bad(kind, "an extent without namespace or length"));
            }
            Ok(Message::ResyncMarks(ResyncMarksMessage { last, extents }))
        }
        MessageKind::ResyncDone | MessageKind::ResyncDoneAck => {
            fixed(kind, body, 8)?;
            let generation = le_u64(body, 0);
            if generation == 0 {
                return Err(bad(kind, "zero generation"));
            }
            Ok(if kind == MessageKind::ResyncDone {
                Message::ResyncDone { generation }
            } else {
                Message::ResyncDoneAck { generation }
            })
        }
        MessageKind::CpCommit => {
            fixed(kind, body, 16)?;
            Ok(Message::CpCommit {
                cp_number: le_u64(body, 0),
                descriptor_count: le_u64(body, 8),
            })
        }
        MessageKind::CpAck => {
            fixed(kind, body, 8)?;
            Ok(Message::CpAck {
                cp_number: le_u64(body, 0),
            })
        }
        MessageKind::TableAck => {
            fixed(kind, body, 16)?;
            Ok(Message::TableAck {
                cp_number: le_u64(body, 0),
                tables: le_u64(body, 8),
            })
        }
        MessageKind::CpFailed => {
            fixed(kind, body, 8)?;
            Ok(Message::CpFailed {
                cp_number: le_u64(body, 0),
            })
        }
        MessageKind::Heartbeat => {
            fixed(kind, body, 8)?;
            let peer_timeout_us = le_u64(body, 0);
            if peer_timeout_us == 0 {
                return Err(bad(kind, "zero peer timeout"));
            }
            Ok(Message::Heartbeat { peer_timeout_us })
        }
    }
}

fn decode_hello(body: &[u8]) -> Result<Hello, WireError> {
    let kind = MessageKind::Hello;
    if body.len() < HELLO_FIXED_BYTES {
        return Err(bad(kind, "wrong body length"));
    }
    let mode = match body[12] {
        0 => CpMode::References,
        1 => CpMode::Naive,
        _ => return Err(bad(kind, "unknown mode")),
    };
    let namespace_count = body[13];
    if namespace_count == 0 || usize::from(namespace_count) > NAMESPACES_MAX {
        return Err(bad(kind, "namespace count out of range"));
    }
    if body.len() != HELLO_FIXED_BYTES + 8 * usize::from(namespace_count) || le_u16(body, 14) != 0 {
        return Err(bad(kind, "wrong body length"));
    }
    let mut hello = Hello {
        protocol_version: le_u32(body, 0),
        block_size: le_u32(body, 4),
        sector_size: le_u32(body, 8),
        mode,
        volume_id: body[16..32].try_into().expect("16 bytes"),
        cp_completed: le_u64(body, 32),
        geometry: RingGeometry {
            ring_bytes: le_u64(body, 40),
            half_header_slots: le_u32(body, 48),
            half_data_bytes: le_u32(body, 52),
        },
        proposed_generation: le_u64(body, 56),
        generations: Generations::decode(&body[HELLO_GENERATIONS_OFFSET..HELLO_FIXED_BYTES])
            .map_err(|reason| bad(kind, reason))?,
        namespace_count,
        namespace_sizes_bytes: [0; NAMESPACES_MAX],
    };
    for (i, size) in hello.namespace_sizes_bytes[..usize::from(namespace_count)]
        .iter_mut()
        .enumerate()
    {
        *size = le_u64(body, HELLO_FIXED_BYTES + 8 * i);
    }
    if hello.proposed_generation == 0 {
        return Err(bad(kind, "zero proposed generation"));
    }
    Ok(hello)
}

fn decode_transfer(body: &[u8]) -> Result<TransferMessage<'_>, WireError> {
    let kind = MessageKind::Transfer;
    if body.len() < TRANSFER_HEADER_BYTES {
        return Err(bad(kind, "wrong body length"));
    }
    let header = TransferHeader {
        transfer_id: TransferId(le_u64(body, 0)),
        cp_number: le_u64(body, 8),
        first_seq: le_u64(body, 16),
        entry_count: le_u32(body, 24),
    };
    let count = header.entry_count as usize;
    if count == 0 || count > TRANSFER_ENTRIES_MAX {
        return Err(bad(kind, "entry count out of range"));
    }
    if header.transfer_id.0 == 0 || header.cp_number == 0 || header.first_seq == 0 {
        return Err(bad(kind, "zero transfer id, cp number or seq"));
    }
    let entries_end = TRANSFER_HEADER_BYTES + count * WIRE_ENTRY_BYTES;
    if body.len() < entries_end {
        return Err(bad(kind, "entries beyond the message"));
    }
    let entries = &body[TRANSFER_HEADER_BYTES..entries_end];
    let mut data_bytes = 0usize;
    for bytes in entries.chunks_exact(WIRE_ENTRY_BYTES) {
        let entry = WireEntry::decode(bytes);
        if entry.flags & !ENTRY_FLAG_ZEROES != 0 {
            return Err(bad(kind, "unknown entry flags"));
        }
        if !entry_length_valid(entry.length_bytes, entry.is_zeroes()) || entry.nsid == 0 {
            return Err(bad(kind, "bad entry length or nsid"));
        }
        data_bytes += entry.data_bytes() as usize;
    }
    if body.len() != entries_end + data_bytes {
        return Err(bad(kind, "data length does not match the entries"));
    }
    Ok(TransferMessage {
        header,
        entries,
        data: &body[entries_end..],
    })
}

fn decode_descriptor(bytes: &[u8]) -> Option<(DescriptorEntry, usize)> {
    if bytes.len() < DESCRIPTOR_BYTES {
        return None;
    }
    let (nsid, block_index) = (le_u32(bytes, 1), le_u64(bytes, 5));
    let (descriptor, size) = match bytes[0] {
        1 if bytes.len() >= REFERENCE_DESCRIPTOR_BYTES => (
            Descriptor::Reference {
                transfer_id: TransferId(le_u64(bytes, 13)),
                block_number: le_u32(bytes, 21),
            },
            REFERENCE_DESCRIPTOR_BYTES,
        ),
        2 => (Descriptor::Data, DESCRIPTOR_BYTES),
        3 => (Descriptor::Zeroes, DESCRIPTOR_BYTES),
        _ => return None,
    };
    Some((
        DescriptorEntry {
            nsid,
            block_index,
            descriptor,
        },
        size,
    ))
}

fn decode_table(kind: MessageKind, body: &[u8]) -> Result<DescriptorTableMessage<'_>, WireError> {
    if body.len() < TABLE_HEADER_BYTES {
        return Err(bad(kind, "wrong body length"));
    }
    let (cp_number, count) = (le_u64(body, 0), le_u32(body, 8));
    if count == 0 || count as usize > DESCRIPTORS_PER_TABLE {
        return Err(bad(kind, "descriptor count out of range"));
    }
    let mut at = TABLE_HEADER_BYTES;
    let mut data_blocks = 0usize;
    for _ in 0..count {
        let (entry, size) =
            decode_descriptor(&body[at..]).ok_or(bad(kind, "bad or truncated descriptor"))?;
        data_blocks += usize::from(entry.descriptor == Descriptor::Data);
        at += size;
    }
    if body.len() != at + data_blocks * BLOCK_SIZE {
        return Err(bad(kind, "data length does not match the descriptors"));
    }
    Ok(DescriptorTableMessage {
        cp_number,
        count,
        descriptors: &body[TABLE_HEADER_BYTES..at],
        data: &body[at..],
    })
}

/// Writes a message header with a zero crc field.
fn encode_header(out: &mut [u8], kind: MessageKind, length: usize) {
    assert!((MESSAGE_HEADER_BYTES..=MESSAGE_BYTES_MAX).contains(&length));
    out[0..4].copy_from_slice(&WIRE_MAGIC.to_le_bytes());
    out[4] = PROTOCOL_VERSION;
    out[5] = kind as u8;
    out[6..8].fill(0);
    out[8..12].copy_from_slice(&(length as u32).to_le_bytes());
    out[12..16].fill(0);
}

/// Seals a message whose crc-covered bytes are `covered` (header first).
fn seal(covered: &mut [u8]) {
    let crc = message_crc(covered);
    covered[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Body bytes of a Hello with `namespace_count` namespaces.
pub fn hello_body_bytes(namespace_count: usize) -> usize {
    HELLO_FIXED_BYTES + 8 * namespace_count
}

fn encode_hello_body(out: &mut [u8], hello: &Hello) {
    out.fill(0);
    out[0..4].copy_from_slice(&hello.protocol_version.to_le_bytes());
    out[4..8].copy_from_slice(&hello.block_size.to_le_bytes());
    out[8..12].copy_from_slice(&hello.sector_size.to_le_bytes());
    out[12] = match hello.mode {
        CpMode::References => 0,
        CpMode::Naive => 1,
    };
    out[13] = hello.namespace_count;
    out[16..32].copy_from_slice(&hello.volume_id);
    out[32..40].copy_from_slice(&hello.cp_completed.to_le_bytes());
    out[40..48].copy_from_slice(&hello.geometry.ring_bytes.to_le_bytes());
    out[48..52].copy_from_slice(&hello.geometry.half_header_slots.to_le_bytes());
    out[52..56].copy_from_slice(&hello.geometry.half_data_bytes.to_le_bytes());
    out[56..64].copy_from_slice(&hello.proposed_generation.to_le_bytes());
    hello
        .generations
        .encode(&mut out[HELLO_GENERATIONS_OFFSET..HELLO_FIXED_BYTES]);
    for (i, size) in hello.namespace_sizes().iter().enumerate() {
        out[HELLO_FIXED_BYTES + 8 * i..HELLO_FIXED_BYTES + 8 * i + 8]
            .copy_from_slice(&size.to_le_bytes());
    }
}

/// Bytes of a descriptor on the wire.
pub fn descriptor_bytes(descriptor: &Descriptor) -> usize {
    match descriptor {
        Descriptor::Reference { .. } => REFERENCE_DESCRIPTOR_BYTES,
        Descriptor::Data | Descriptor::Zeroes => DESCRIPTOR_BYTES,
    }
}

/// Writes one descriptor; returns its size.
pub fn encode_descriptor(out: &mut [u8], entry: &DescriptorEntry) -> usize {
    out[1..5].copy_from_slice(&entry.nsid.to_le_bytes());
    out[5..13].copy_from_slice(&entry.block_index.to_le_bytes());
    match entry.descriptor {
        Descriptor::Reference {
            transfer_id,
            block_number,
        } => {
            out[0] = 1;
            out[13..21].copy_from_slice(&transfer_id.0.to_le_bytes());
            out[21..25].copy_from_slice(&block_number.to_le_bytes());
            REFERENCE_DESCRIPTOR_BYTES
        }
        Descriptor::Data => {
            out[0] = 2;
            DESCRIPTOR_BYTES
        }
        Descriptor::Zeroes => {
            out[0] = 3;
            DESCRIPTOR_BYTES
        }
    }
}

/// The small, wholly inline messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control<'a> {
    Hello(&'a Hello),
    HelloAck {
        cp_completed: u64,
        generations: Generations,
    },
    Reject {
        reason: RejectReason,
        text: &'a str,
    },
    TransferAck {
        transfer_id: TransferId,
    },
    CpCommit {
        cp_number: u64,
        descriptor_count: u64,
    },
    CpAck {
        cp_number: u64,
    },
    TableAck {
        cp_number: u64,
        tables: u64,
    },
    CpFailed {
        cp_number: u64,
    },
    Heartbeat {
        peer_timeout_us: u64,
    },
    ResyncAck {
        resync_number: u64,
        failed: bool,
    },
    ResyncDone {
        generation: u64,
    },
    ResyncDoneAck {
        generation: u64,
    },
}

impl Control<'_> {
    /// The encoded length of the message.
    pub fn encoded_bytes(&self) -> usize {
        MESSAGE_HEADER_BYTES
            + match self {
                Self::Hello(hello) => hello_body_bytes(usize::from(hello.namespace_count)),
                Self::HelloAck { .. } => HELLO_ACK_BYTES,
                Self::CpCommit { .. } | Self::TableAck { .. } | Self::ResyncAck { .. } => 16,
                Self::Reject { text, .. } => 4 + text.len(),
                Self::TransferAck { .. }
                | Self::CpAck { .. }
                | Self::CpFailed { .. }
                | Self::Heartbeat { .. }
                | Self::ResyncDone { .. }
                | Self::ResyncDoneAck { .. } => 8,
            }
    }

    /// Encodes the whole message into `out` (exactly [`Control::encoded_bytes`] long).
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), self.encoded_bytes());
        let kind = match self {
            Self::Hello(_) => MessageKind::Hello,
            Self::HelloAck { .. } => MessageKind::HelloAck,
            Self::Reject { .. } => MessageKind::Reject,
            Self::TransferAck { .. } => MessageKind::TransferAck,
            Self::CpCommit { .. } => MessageKind::CpCommit,
            Self::CpAck { .. } => MessageKind::CpAck,
            Self::TableAck { .. } => MessageKind::TableAck,
            Self::CpFailed { .. } => MessageKind::CpFailed,
            Self::Heartbeat { .. } => MessageKind::Heartbeat,
            Self::ResyncAck { .. } => MessageKind::ResyncAck,
            Self::ResyncDone { .. } => MessageKind::ResyncDone,
            Self::ResyncDoneAck { .. } => MessageKind::ResyncDoneAck,
        };
        encode_header(out, kind, out.len());
        let body = &mut out[MESSAGE_HEADER_BYTES..];
        match *self {
            Self::Hello(hello) => encode_hello_body(body, hello),
            Self::HelloAck {
                cp_completed,
                generations,
            } => {
                body[0..8].copy_from_slice(&cp_completed.to_le_bytes());
                generations.encode(&mut body[8..HELLO_ACK_BYTES]);
            }
            Self::Reject { reason, text } => {
                body[0..4].copy_from_slice(&(reason as u32).to_le_bytes());
                body[4..].copy_from_slice(text.as_bytes());
            }
            Self::TransferAck { transfer_id } => body.copy_from_slice(&transfer_id.0.to_le_bytes()),
            Self::CpCommit {
                cp_number,
                descriptor_count,
            } => {
                body[0..8].copy_from_slice(&cp_number.to_le_bytes());
                body[8..16].copy_from_slice(&descriptor_count.to_le_bytes());
            }
            Self::CpAck { cp_number } | Self::CpFailed { cp_number } => {
                body.copy_from_slice(&cp_number.to_le_bytes())
            }
            Self::TableAck { cp_number, tables } => {
                body[0..8].copy_from_slice(&cp_number.to_le_bytes());
                body[8..16].copy_from_slice(&tables.to_le_bytes());
            }
            Self::Heartbeat { peer_timeout_us } => {
                assert!(peer_timeout_us > 0, "a peer timeout is positive");
                body.copy_from_slice(&peer_timeout_us.to_le_bytes())
            }
            Self::ResyncAck {
                resync_number,
                failed,
            } => {
                body[0..8].copy_from_slice(&resync_number.to_le_bytes());
                body[8..16].copy_from_slice(&u64::from(failed).to_le_bytes());
            }
            Self::ResyncDone { generation } | Self::ResyncDoneAck { generation } => {
                assert_ne!(generation, 0, "a generation is non-zero");
                body.copy_from_slice(&generation.to_le_bytes())
            }
        }
        seal(out);
    }
}

/// Bytes of a Transfer's crc-covered prefix (message header, transfer header, entry headers).
pub fn transfer_prefix_bytes(entry_count: usize) -> usize {
    MESSAGE_HEADER_BYTES + TRANSFER_HEADER_BYTES + entry_count * WIRE_ENTRY_BYTES
}

/// Encodes a Transfer's prefix; the message is this prefix followed by `data_bytes` of entry data.
pub fn encode_transfer_prefix(
    out: &mut [u8],
    header: &TransferHeader,
    entries: &[WireEntry],
    data_bytes: usize,
) {
    assert_eq!(header.entry_count as usize, entries.len());
    assert!(!entries.is_empty() && entries.len() <= TRANSFER_ENTRIES_MAX);
    assert_eq!(
        entries
            .iter()
            .map(|e| e.data_bytes() as usize)
            .sum::<usize>(),
        data_bytes
    );
    assert_eq!(out.len(), transfer_prefix_bytes(entries.len()));
    encode_header(out, MessageKind::Transfer, out.len() + data_bytes);
    let body = &mut out[MESSAGE_HEADER_BYTES..];
    body[0..8].copy_from_slice(&header.transfer_id.0.to_le_bytes());
    body[8..16].copy_from_slice(&header.cp_number.to_le_bytes());
    body[16..24].copy_from_slice(&header.first_seq.to_le_bytes());
    body[24..28].copy_from_slice(&header.entry_count.to_le_bytes());
    for (entry, bytes) in entries
        .iter()
        .zip(body[TRANSFER_HEADER_BYTES..].chunks_exact_mut(WIRE_ENTRY_BYTES))
    {
        entry.encode(bytes);
    }
    seal(out);
}

/// Bytes of a DescriptorTable holding `entries`.
pub fn table_bytes(entries: impl Iterator<Item = Descriptor>) -> usize {
    MESSAGE_HEADER_BYTES
        + TABLE_HEADER_BYTES
        + entries
            .map(|d| descriptor_bytes(&d) + if d == Descriptor::Data { BLOCK_SIZE } else { 0 })
            .sum::<usize>()
}

/// Writes a DescriptorTable's header fields and descriptors; returns where the data blocks
/// start. The caller fills the blocks and then calls [`seal_message`].
pub fn encode_table_prefix(out: &mut [u8], cp_number: u64, entries: &[DescriptorEntry]) -> usize {
    encode_table_prefix_of(out, MessageKind::DescriptorTable, cp_number, entries)
}

/// [`encode_table_prefix`] for a DescriptorTable or a ResyncTable (`number`: CP or resync).
pub fn encode_table_prefix_of(
    out: &mut [u8],
    kind: MessageKind,
    number: u64,
    entries: &[DescriptorEntry],
) -> usize {
    assert!(matches!(
        kind,
        MessageKind::DescriptorTable | MessageKind::ResyncTable
    ));
    let cp_number = number;
    assert!(!entries.is_empty() && entries.len() <= DESCRIPTORS_PER_TABLE);
    encode_header(out, kind, out.len());
    let body = &mut out[MESSAGE_HEADER_BYTES..];
    body[0..8].copy_from_slice(&cp_number.to_le_bytes());
    body[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    let mut at = TABLE_HEADER_BYTES;
    for entry in entries {
        at += encode_descriptor(&mut body[at..], entry);
    }
    MESSAGE_HEADER_BYTES + at
}

/// Seals a wholly inline message (crc over all of it).
pub fn seal_message(message: &mut [u8]) {
    assert_eq!(le_u32(message, 8) as usize, message.len());
    seal(message);
}

#[cfg(test)]
mod tests;
