//! The host side of one NVMe/TCP queue pair (NVMe/TCP 1.0 sections 3.3-3.6): a nonblocking socket,
//! preallocated command slots, a send queue of byte ranges flushed with one `writev` per poll, and a
//! receive buffer filled with one `read` per poll and parsed in place.
//!
//! Call order: [`QueuePair::connect`] (TCP + ICReq/ICResp, then slots are allocated), then per poll
//! [`QueuePair::poll_receive`] and [`QueuePair::flush`] once each; in between [`QueuePair::acquire`]
//! a slot, fill [`QueuePair::data_mut`], [`QueuePair::submit`] it, take completions with
//! [`QueuePair::take_done`] and [`QueuePair::release`] their slots. The slot index is the command's CID.
//! Write data goes in the capsule when it fits the target's in-capsule size, otherwise it waits for
//! R2T and leaves in H2CData PDUs of at most MAXH2CDATA bytes. C2HData with the SUCCESS flag completes
//! a read without a CapsuleResp. Read data lands in the slot's buffer unless the owner turned that
//! off with [`QueuePair::set_keep_read_data`] (its digest is still checked). No allocation after
//! `connect`.

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

mod handshake;
mod receive;
#[cfg(test)]
mod tests;

use handshake::{exchange_icreq, set_socket_buffers};

use nvmirror_nvmf::pdu::{
    self, Command, Completion, Fes, Framing, PduError, PduType, SglDescriptor, DIGEST_BYTES,
    PDA_MAX,
};

/// Room for any PDU prefix (header, header digest, padding up to PDO) the host sends.
const PREFIX_BYTES_MAX: usize = 128;
/// One PDU record in a slot's PDU area: a prefix and a data digest.
const PDU_STRIDE_BYTES: usize = PREFIX_BYTES_MAX + 8;
/// Byte ranges one data-carrying PDU queues: header, data, data digest.
const SEGMENTS_PER_PDU: usize = 3;
/// Most byte ranges handed to one `writev` (as SPDK's posix sock module).
const IOVEC_MAX: usize = 64;
/// The per-socket receive buffer, refilled by one read per poll.
const RECEIVE_BUFFER_BYTES: usize = 256 * 1024;
/// The smallest MAXH2CDATA a controller may announce (NVMe/TCP 1.0, ICResp).
const MAXH2CDATA_MIN: u32 = 4096;
/// Kernel socket buffers, as SPDK sizes them.
const SOCKET_BUFFER_BYTES: i32 = 2 * 1024 * 1024;

const _: () = assert!(
    Framing {
        header_digest: true,
        data_digest: true,
        pda: PDA_MAX
    }
    .data_offset(PduType::CapsuleCmd.shape().hlen as usize)
        <= PREFIX_BYTES_MAX
);
const _: () =
    assert!(pdu::HEADER_BYTES_MAX + pdu::TERM_REQ_ERROR_DATA_BYTES_MAX < RECEIVE_BUFFER_BYTES);
const _: () = assert!(255 < RECEIVE_BUFFER_BYTES, "any PDO-sized prefix fits");

/// Which way a command's data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirection {
    None,
    ToController(u32),
    FromController(u32),
}

/// A finished command: its slot (= CID) and completion (synthesized for a C2HData SUCCESS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub slot: u16,
    pub completion: Completion,
}

/// A connection-fatal error: the queue pair is unusable afterwards.
#[derive(Debug)]
pub enum QueueError {
    Io(std::io::Error),
    Closed,
    /// The target sent a malformed PDU; we answered with an H2CTermReq.
    Pdu(PduError),
    /// The target terminated the connection with a C2HTermReq.
    TermReq {
        fes: u16,
        fei: u32,
    },
    /// A well-formed PDU that does not fit the connection's state.
    Protocol(&'static str),
    /// ICResp refused what we asked for.
    Negotiation(String),
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The peer going away shows up as a reset or a broken pipe when we were the
            // ones writing at that moment: name it the same as an orderly close.
            QueueError::Io(error) if closed_by_peer(error) => {
                write!(f, "the target closed the connection ({error})")
            }
            QueueError::Io(error) => write!(f, "socket error: {error}"),
            QueueError::Closed => write!(f, "the target closed the connection"),
            QueueError::Pdu(error) => write!(f, "malformed PDU from the target: {error}"),
            QueueError::TermReq { fes, fei } => {
                let name = Fes::from_repr(*fes)
                    .map_or("unknown FES".to_string(), |fes| format!("{fes:?}"));
                write!(
                    f,
                    "the target sent C2HTermReq: FES {fes:#x} ({name}), FEI {fei:#x}"
                )
            }
            QueueError::Protocol(reason) => write!(f, "protocol error: {reason}"),
            QueueError::Negotiation(reason) => write!(f, "connection negotiation failed: {reason}"),
        }
    }
}

impl std::error::Error for QueueError {}

impl From<std::io::Error> for QueueError {
    fn from(error: std::io::Error) -> QueueError {
        QueueError::Io(error)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    Acquired,
    InFlight,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Area {
    Pdu,
    Data,
}

/// A byte range of one slot's buffers waiting to be written to the socket.
#[derive(Debug, Clone, Copy)]
struct Segment {
    slot: u16,
    area: Area,
    start: u32,
    end: u32,
}

#[derive(Debug)]
struct Slot {
    state: SlotState,
    direction: DataDirection,
    /// C2H bytes received so far (data arrives in order).
    received_bytes: u32,
    /// Segments of this slot still in the send queue.
    segments_queued: u32,
    data_digest_error: bool,
    /// Record 0: the CapsuleCmd; records 1..: H2CData PDUs answering the current R2T.
    pdu_area: Vec<u8>,
    data: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
enum Receive {
    Header,
    Data {
        slot: u16,
        offset: u32,
        remaining: u32,
        crc: u32,
        digest: bool,
        success: bool,
    },
    DataDigest {
        slot: u16,
        crc: u32,
        success: bool,
    },
}

/// The negotiated parameters of a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub header_digest: bool,
    pub data_digest: bool,
    pub cpda: u8,
    pub maxh2cdata: u32,
}

pub struct QueuePair {
    stream: TcpStream,
    qid: u16,
    negotiated: Negotiated,
    receive_framing: Framing,
    send_framing: Framing,
    in_capsule_bytes_max: u32,
    slots: Vec<Slot>,
    free: Vec<u16>,
    done: Vec<Done>,
    send: VecDeque<Segment>,
    receive_buffer: Vec<u8>,
    receive_start: usize,
    receive_end: usize,
    receive: Receive,
    /// Copy C2HData into the slot's buffer (off: the bytes are only digested and skipped).
    keep_read_data: bool,
}

impl QueuePair {
    /// Connects, exchanges ICReq/ICResp (HPDA 0, MAXR2T 0's based 0) and allocates `slot_count` slots
    /// with `data_bytes_max` of data each. The caller then sends the Fabrics Connect.
    pub fn connect(
        address: SocketAddr,
        qid: u16,
        slot_count: u16,
        data_bytes_max: u32,
        header_digest: bool,
        data_digest: bool,
        timeout: Duration,
    ) -> Result<QueuePair, QueueError> {
        assert!(slot_count > 0 && data_bytes_max > 0);
        let stream = TcpStream::connect_timeout(&address, timeout)?;
        stream.set_nodelay(true)?;
        set_socket_buffers(&stream);
        let negotiated = exchange_icreq(&stream, header_digest, data_digest, timeout)?;
        stream.set_nonblocking(true)?;
        let h2c_records = data_bytes_max.div_ceil(negotiated.maxh2cdata) as usize;
        let slots = (0..slot_count)
            .map(|_| Slot {
                state: SlotState::Free,
                direction: DataDirection::None,
                received_bytes: 0,
                segments_queued: 0,
                data_digest_error: false,
                pdu_area: vec![0; PDU_STRIDE_BYTES * (1 + h2c_records)],
                data: vec![0; data_bytes_max as usize],
            })
            .collect();
        let digests = Framing {
            header_digest: negotiated.header_digest,
            data_digest: negotiated.data_digest,
            pda: 0,
        };
        Ok(QueuePair {
            stream,
            qid,
            negotiated,
            receive_framing: digests,
            send_framing: Framing {
                pda: negotiated.cpda,
                ..digests
            },
            in_capsule_bytes_max: 0,
            slots,
            free: (0..slot_count).rev().collect(),
            done: Vec::with_capacity(slot_count as usize),
            // A slot queues either its capsule (header, data, digest) or, once that left, the
            // H2CData PDUs of one R2T (header, data, digest each): never both.
            send: VecDeque::with_capacity(
                slot_count as usize * SEGMENTS_PER_PDU * h2c_records.max(1),
            ),
            receive_buffer: vec![0; RECEIVE_BUFFER_BYTES],
            receive_start: 0,
            receive_end: 0,
            receive: Receive::Header,
            keep_read_data: true,
        })
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Write data up to this size goes in the capsule (from the target's IOCCSZ; admin Connect data
    /// always does, see [`QueuePair::submit`]).
    pub fn set_in_capsule_bytes_max(&mut self, bytes: u32) {
        self.in_capsule_bytes_max = bytes;
    }

    /// Whether read data is copied into the slot's buffer (on by default: admin commands need their
    /// data). Off, [`QueuePair::data`] of a finished read holds whatever was there before; data
    /// digests are still computed over the received bytes.
    pub fn set_keep_read_data(&mut self, keep: bool) {
        self.keep_read_data = keep;
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight_count(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn acquire(&mut self) -> Option<u16> {
        let slot = self.free.pop()?;
        let state = &mut self.slots[slot as usize].state;
        assert_eq!(*state, SlotState::Free);
        *state = SlotState::Acquired;
        Some(slot)
    }

    pub fn data(&self, slot: u16) -> &[u8] {
        &self.slots[slot as usize].data
    }

    pub fn data_mut(&mut self, slot: u16) -> &mut [u8] {
        &mut self.slots[slot as usize].data
    }

    /// Queues `command` (its CID and SGL are set here) with the data direction and length.
    /// `force_in_capsule` sends write data in the capsule regardless of the limit (Connect data).
    pub fn submit(
        &mut self,
        slot: u16,
        command: &mut Command,
        direction: DataDirection,
        force_in_capsule: bool,
    ) {
        let in_capsule_bytes_max = self.in_capsule_bytes_max;
        let framing = self.send_framing;
        let entry = &mut self.slots[slot as usize];
        assert_eq!(
            entry.state,
            SlotState::Acquired,
            "submit needs an acquired slot"
        );
        assert_eq!(entry.segments_queued, 0);
        let (sgl, in_capsule_bytes) = match direction {
            DataDirection::None => (SglDescriptor::Transport { length: 0 }, 0),
            DataDirection::ToController(length)
                if force_in_capsule || length <= in_capsule_bytes_max =>
            {
                (SglDescriptor::InCapsule { offset: 0, length }, length)
            }
            DataDirection::ToController(length) | DataDirection::FromController(length) => {
                (SglDescriptor::Transport { length }, 0)
            }
        };
        if let DataDirection::ToController(length) | DataDirection::FromController(length) =
            direction
        {
            assert!(
                length as usize <= entry.data.len(),
                "data larger than the slot"
            );
        }
        command.set_cid(slot).set_sgl(sgl);
        let prefix = pdu::encode_capsule_cmd(
            &mut entry.pdu_area[..PREFIX_BYTES_MAX],
            command,
            &framing,
            in_capsule_bytes as usize,
        );
        entry.state = SlotState::InFlight;
        entry.direction = direction;
        entry.received_bytes = 0;
        entry.data_digest_error = false;
        self.push_segment(slot, Area::Pdu, 0, prefix as u32);
        if in_capsule_bytes > 0 {
            self.push_data_with_digest(slot, 0, 0, in_capsule_bytes);
        }
    }

    /// The next finished command, if any. Its slot stays reserved until [`QueuePair::release`].
    pub fn take_done(&mut self) -> Option<Done> {
        self.done.pop()
    }

    pub fn release(&mut self, slot: u16) {
        let entry = &mut self.slots[slot as usize];
        assert!(
            matches!(entry.state, SlotState::Done | SlotState::Acquired),
            "release of a busy slot"
        );
        entry.state = SlotState::Free;
        self.free.push(slot);
    }

    fn push_segment(&mut self, slot: u16, area: Area, start: u32, end: u32) {
        assert!(
            self.send.len() < self.send.capacity(),
            "send queue sized at connect"
        );
        self.send.push_back(Segment {
            slot,
            area,
            start,
            end,
        });
        self.slots[slot as usize].segments_queued += 1;
    }

    /// Queues data bytes `start..start+length` of `slot` and, if negotiated, their digest kept in
    /// PDU record `record`.
    fn push_data_with_digest(&mut self, slot: u16, record: usize, start: u32, length: u32) {
        self.push_segment(slot, Area::Data, start, start + length);
        if self.send_framing.data_digest {
            let entry = &mut self.slots[slot as usize];
            let crc = pdu::crc32c(&entry.data[start as usize..(start + length) as usize]);
            let at = record * PDU_STRIDE_BYTES + PREFIX_BYTES_MAX;
            entry.pdu_area[at..at + DIGEST_BYTES].copy_from_slice(&crc.to_le_bytes());
            self.push_segment(slot, Area::Pdu, at as u32, (at + DIGEST_BYTES) as u32);
        }
    }

    /// Writes as much of the send queue as the socket takes, in one `writev` of up to 64 ranges.
    pub fn flush(&mut self) -> Result<usize, QueueError> {
        if self.send.is_empty() {
            return Ok(0);
        }
        let mut slices = [IoSlice::new(&[]); IOVEC_MAX];
        let mut count = 0;
        for segment in self.send.iter().take(IOVEC_MAX) {
            let entry = &self.slots[segment.slot as usize];
            let area = if segment.area == Area::Pdu {
                &entry.pdu_area
            } else {
                &entry.data
            };
            slices[count] = IoSlice::new(&area[segment.start as usize..segment.end as usize]);
            count += 1;
        }
        let written = match (&self.stream).write_vectored(&slices[..count]) {
            Ok(0) => return Err(QueueError::Closed),
            Ok(written) => written,
            Err(error) if would_block(&error) => return Ok(0),
            Err(error) => return Err(QueueError::Io(error)),
        };
        let mut left = written as u32;
        while left > 0 {
            let front = self
                .send
                .front_mut()
                .expect("written bytes came from queued segments");
            let length = front.end - front.start;
            if left < length {
                front.start += left;
                break;
            }
            left -= length;
            let slot = front.slot;
            self.send.pop_front();
            self.slots[slot as usize].segments_queued -= 1;
        }
        Ok(written)
    }

    /// Closes the connection (the controller tears the queue down when the socket closes).
    pub fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Socket errors that mean the other end closed or reset the connection.
fn closed_by_peer(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof
    )
}

pub(super) fn would_block(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}
