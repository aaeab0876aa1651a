//! The destination side's state machine (claims 6, 15, 16; engine spec "Destination"): it stores
//! each data transfer's entries in its own ring with the source's placement, records
//! transfer ID -> (half, base offset), acknowledges cumulatively, and at a CP resolves
//! references out of its own log into the mirror namespaces. `promote` is the failover.
//!
//! Call order: `open` (with the node's [`NodeMetadata`]); `handle_connected`; `handle_message` per whole framed message (an `Err`
//! is connection-fatal: flush the send queue best-effort, e.g. a queued Reject, then close);
//! submit every `poll_device_op` to its mirror namespace and hand each completion to
//! `handle_device_completion`; `tx_iovecs` + `tx_advance`; drain `poll_event`;
//! `handle_tick` every loop (heartbeats, the silence deadline) and close the link whenever
//! `poll_link_close` says so; `handle_disconnected` when the link drops; submit every
//! `poll_metadata_op` to the metadata device and hand its completions to
//! `handle_metadata_completion`. Mirror writes and flushes are device ops
//! (`mirror`): a slow mirror never delays a TransferAck, and a failing one fails the CP
//! (CpFailed; the source sends it again), never the link.
//!
//! The Hello's generations decide whether a session starts ([`crate::generation::settle`]): a
//! stale source, a split brain, or a pair that needs a sync is refused with a Reject naming both
//! generations. A generation this side adopts is durable in its metadata before the HelloAck.
//!
//! A new session (accepted Hello) rewinds both halves without erasing them: the source resends
//! every entry of its unreleased CPs from the halves' start with the same seq and placement, so
//! the bytes are overwritten identically, and a promotion meanwhile still finds every entry
//! this side acknowledged (invariant 4).

mod mirror;
mod resync;

use std::collections::VecDeque;
use std::io::IoSlice;

use crate::checksum::crc32c;
use crate::counters::Counters;
use crate::cp::Descriptor;
use crate::device::{check_extent, ExtentError, InflightOps};
use crate::error::{EngineError, LinkError, ProtocolError};
use crate::generation::{settle, Generations, Refusal, FLAG_ASSUME_IDENTICAL};
use crate::geometry::{
    half_of_cp, round_down, BLOCK_SIZE, DESCRIPTORS_PER_TABLE, OUT_INLINE_BYTES, SECTOR_SIZE,
    TABLE_DATA_BLOCKS_MAX,
};
use crate::liveness::{Liveness, PeerLostReason};
use crate::metadata::NodeMetadata;
use crate::open::{check_namespaces, open_or_format};
use crate::promotion::Promotion;
use crate::ring::{EntryRequest, NvramRing, RingStore};
use crate::source::{message_name, TABLE_WINDOW};
use crate::transfer::TransferId;
use crate::wire::{
    self, Control, DescriptorTableMessage, Hello, Message, OutQueue, RejectReason, TransferMessage,
    WireError,
};
use mirror::{DestinationOp, MirrorSource, MirrorWrite};

/// The destination's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationConfig {
    pub volume_id: [u8; 16],
    /// Device ops in flight per mirror namespace at most.
    pub device_queue_depth: u32,
    /// Silence for this long means the source is lost ([`crate::liveness`]).
    pub peer_timeout_us: u64,
    /// The operator declares the devices identical (freshly zeroed): a pair without shared
    /// history needs no full sync. Applied once per node metadata.
    pub assume_identical: bool,
}

/// What the destination tells the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestinationEvent {
    /// CP `cp_number` is durable in the mirror namespaces.
    CpApplied { cp_number: u64 },
    /// We refused the source's Hello (the reason text).
    PeerRejected(String),
    /// A mirror op failed (the CP it belongs to fails and is sent again).
    DeviceFault(crate::source::DeviceFault),
    /// The source went silent for a peer timeout: its connection is closed (it reconnects).
    PeerLost(PeerLostReason),
}

/// The destination state machine over ring memory `M`; its mirror namespaces are the
/// runtime's, reached through device ops.
pub struct Destination<M> {
    ring: NvramRing<M>,
    namespace_sizes_bytes: Vec<u64>,
    volume_id: [u8; 16],
    /// A Hello was accepted on the current link.
    in_session: bool,
    /// Per half: (transfer ID, base data offset) in arrival (= ID) order (claim 15).
    transfers: [Vec<(TransferId, u32)>; 2],
    descriptors_applied: u64,
    logged_seq_max: Option<u64>,
    pending_ack: Option<TransferId>,
    out: OutQueue,
    events: VecDeque<DestinationEvent>,
    counters: Counters,
    /// Device ops in flight and what each is for.
    ops: InflightOps<DestinationOp>,
    /// Mirror writes of received tables not yet submitted, in descriptor order.
    pending: VecDeque<MirrorWrite>,
    /// Data blocks of received tables until their mirror write completes, and the free ones.
    staging: Vec<u8>,
    staging_free: Vec<u16>,
    /// Per table of the CP being applied (in order): its table number and mirror writes still
    /// to complete; TableAcks go out cumulatively as the front ones finish.
    tables: VecDeque<(u64, u32)>,
    tables_received: u64,
    tables_done: u64,
    /// A mirror op of the CP being applied failed: it answers CpFailed at its CpCommit.
    cp_failed: bool,
    /// CpCommit came for this CP: flush once every mirror write completed.
    commit_pending: Option<u64>,
    /// Mirror flushes of the committing CP still out, and whether one failed.
    flushes_remaining: u32,
    flushes_issued: u32,
    flush_failed: bool,
    /// Bumped at every session: ops of an earlier one are told apart.
    session: u32,
    /// A Hello was accepted while mirror writes of the last session were in flight: its
    /// HelloAck goes out once they are done.
    hello_ack_pending: bool,
    /// Per namespace: a failure was logged and no op has succeeded since.
    failing: Vec<bool>,
    /// Heartbeats and the silence deadline of the current connection.
    liveness: Liveness,
    /// Bytes handed to the socket (the heartbeat clock watches it).
    sent_bytes: u64,
    /// This node's generations and bitmap.
    metadata: NodeMetadata,
    pub(crate) assume_identical: bool,
    /// The HelloAck carries our generations as they were when the Hello came, and goes out once
    /// the metadata is durable through this sequence (a generation we adopted).
    ack_generations: Generations,
    ack_metadata_seq: u64,
    /// The current session was settled on a resync (ResyncTables may come).
    resync_session: bool,
    /// The log of before the resync session is kept (references point into it) until the
    /// first transfer of the new session.
    old_log_kept: bool,
    /// The ResyncTable being applied.
    resync_apply: Option<resync::ResyncApply>,
    /// ResyncDone came: its answer waits for the adopted generation to be durable.
    resync_done_pending: Option<(u64, u64)>,
    /// ResyncMarks still to send, from this bitmap bit on.
    marks_cursor: Option<u64>,
}

/// Data blocks the destination stages: a full window of tables.
const STAGING_BLOCKS: usize = TABLE_WINDOW as usize * TABLE_DATA_BLOCKS_MAX;
const _: () = assert!(STAGING_BLOCKS <= u16::MAX as usize);

impl<M: RingStore> Destination<M> {
    /// Opens (or formats) the ring for mirrors of `namespace_sizes_bytes`; the log waits for
    /// the source's Hello (or a promotion).
    pub fn open(
        config: DestinationConfig,
        ring: M,
        namespace_sizes_bytes: &[u64],
        metadata: NodeMetadata,
    ) -> Result<Self, EngineError> {
        check_namespaces(namespace_sizes_bytes)?;
        assert_eq!(
            metadata.volume_id(),
            config.volume_id,
            "metadata opened for this volume"
        );
        assert!(
            (1..=crate::source::DEVICE_QUEUE_DEPTH_MAX).contains(&config.device_queue_depth),
            "device queue depth checked with the config"
        );
        let (ring, entries, formatted) = open_or_format(ring, config.volume_id)?;
        let slots = ring.geometry().half_header_slots as usize;
        log::info!(
            "destination: opened at cp {} generation {} ({} logged entries{})",
            ring.superblock().cp_completed,
            crate::generation::Hex(metadata.generations().current),
            entries.len(),
            if formatted { ", formatted" } else { "" }
        );
        let counters = Counters {
            ring_size_bytes: ring.geometry().ring_bytes,
            ..Counters::default()
        };
        let namespaces = namespace_sizes_bytes.len();
        Ok(Self {
            ring,
            namespace_sizes_bytes: namespace_sizes_bytes.to_vec(),
            volume_id: config.volume_id,
            in_session: false,
            transfers: [Vec::with_capacity(slots), Vec::with_capacity(slots)],
            descriptors_applied: 0,
            logged_seq_max: None,
            pending_ack: None,
            out: OutQueue::new(OUT_INLINE_BYTES, 4096),
            events: VecDeque::with_capacity(64),
            counters,
            ops: InflightOps::new(namespaces, config.device_queue_depth),
            pending: VecDeque::with_capacity(TABLE_WINDOW as usize * DESCRIPTORS_PER_TABLE),
            staging: vec![0; STAGING_BLOCKS * BLOCK_SIZE],
            staging_free: (0..STAGING_BLOCKS as u16).rev().collect(),
            tables: VecDeque::with_capacity(TABLE_WINDOW as usize),
            tables_received: 0,
            tables_done: 0,
            cp_failed: false,
            commit_pending: None,
            flushes_remaining: 0,
            flushes_issued: 0,
            flush_failed: false,
            session: 0,
            hello_ack_pending: false,
            failing: vec![false; namespaces],
            liveness: Liveness::new(config.peer_timeout_us),
            sent_bytes: 0,
            ack_generations: *metadata.generations(),
            metadata,
            assume_identical: config.assume_identical,
            ack_metadata_seq: 0,
            resync_session: false,
            old_log_kept: false,
            resync_apply: None,
            resync_done_pending: None,
            marks_cursor: None,
        })
    }

    pub fn handle_connected(&mut self, now_us: u64) {
        self.reset_session();
        self.liveness.on_connected(now_us, self.sent_bytes);
    }

    pub fn handle_disconnected(&mut self, _now_us: u64) {
        self.reset_session();
        self.liveness.on_disconnected();
    }

    fn reset_session(&mut self) {
        self.out.clear();
        self.in_session = false;
        self.resync_session = false;
        self.resync_apply = None;
        self.resync_done_pending = None;
        self.marks_cursor = None;
        self.pending_ack = None;
        self.hello_ack_pending = false;
        self.restart_cp();
    }

    /// Every loop: a source silent for a whole peer timeout is lost (logged, counted, told as an
    /// event; the runtime closes its connection at `poll_link_close`), otherwise a heartbeat goes
    /// out when nothing else did for a quarter of it.
    pub fn handle_tick(&mut self, now_us: u64) {
        self.push_resync_marks();
        if let Some(silent_us) = self.liveness.silence_expired(now_us) {
            let reason = PeerLostReason::Silent { silent_us };
            log::error!("destination: source lost: {reason}; closing its connection");
            self.counters.peer_lost_count += 1;
            self.events.push_back(DestinationEvent::PeerLost(reason));
            self.liveness.request_close(reason);
        } else if self.liveness.heartbeat_due(
            now_us,
            self.sent_bytes,
            self.out.pending_bytes() == 0,
        ) {
            self.push_control(Control::Heartbeat {
                peer_timeout_us: self.liveness.timeout_us(),
            });
            self.liveness.on_heartbeat_queued(now_us);
            self.counters.heartbeat_count += 1;
        }
    }

    /// Whether the runtime must close the link now (the source is lost), and why.
    #[must_use]
    pub fn poll_link_close(&mut self) -> Option<PeerLostReason> {
        self.liveness.poll_close()
    }

    /// When `handle_tick` next has timed work (a heartbeat, the silence deadline), if any.
    pub fn next_deadline_us(&self) -> Option<u64> {
        self.liveness.deadline_us()
    }

    /// Handles one whole framed message from the source.
    pub fn handle_message(&mut self, now_us: u64, message: &[u8]) -> Result<(), LinkError> {
        self.counters.wire_bytes_total += message.len() as u64;
        self.liveness.on_received(now_us);
        let result = match (self.in_session, wire::decode(message)?) {
            (_, Message::Heartbeat { peer_timeout_us }) => {
                self.liveness.on_heartbeat("destination", peer_timeout_us);
                Ok(())
            }
            (false, Message::Hello(hello)) => self.on_hello(&hello),
            (true, Message::Transfer(transfer)) => {
                self.counters.transfer_count += 1;
                self.counters.transfer_bytes += message.len() as u64;
                self.on_transfer(&transfer)
            }
            (true, Message::DescriptorTable(table)) => self.on_table(&table),
            (true, Message::ResyncTable(table)) => self.on_resync_table(&table),
            (true, Message::ResyncDone { generation }) => self.on_resync_done(generation),
            (
                true,
                Message::CpCommit {
                    cp_number,
                    descriptor_count,
                },
            ) => self.on_commit(cp_number, descriptor_count),
            (in_session, message) => Err(LinkError::Unexpected {
                message: message_name(&message),
                state: if in_session {
                    "in session"
                } else {
                    "awaiting Hello"
                },
            }),
        };
        self.counters.ring_used_bytes = self.ring.used_bytes();
        self.flush_pending_ack();
        result
    }

    /// The peer's bytes cannot be framed. Another protocol version is refused for good: a Reject
    /// naming both versions is queued (flushed before the caller closes), so both sides say why.
    /// Any other unreadable byte (a corrupted header) only closes the link; the source reconnects
    /// and resends.
    pub fn refuse_unframed(&mut self, error: WireError) -> LinkError {
        match error {
            WireError::BadVersion(version) => self.reject(
                RejectReason::Version,
                format!(
                    "source speaks protocol version {version}, this destination speaks {}",
                    wire::PROTOCOL_VERSION
                ),
            ),
            other => LinkError::Wire(other),
        }
    }

    fn reject(&mut self, reason: RejectReason, text: String) -> LinkError {
        log::error!("destination: rejecting source: {text}");
        let reject = Control::Reject {
            reason,
            text: &text,
        };
        let length = reject.encoded_bytes();
        let _ = self.out.push_inline(length, |bytes| reject.encode(bytes));
        self.events
            .push_back(DestinationEvent::PeerRejected(text.clone()));
        LinkError::RejectedPeer { reason, text }
    }

    /// This side asks for `assume_identical` and its metadata has not consumed it yet.
    fn assume_identical_flag(&self) -> u32 {
        let consumed = self.metadata.generations().flags
            & crate::generation::FLAG_ASSUME_IDENTICAL_CONSUMED
            != 0;
        if self.assume_identical && !consumed {
            FLAG_ASSUME_IDENTICAL
        } else {
            0
        }
    }

    /// Our generations as the HelloAck carries them.
    fn wire_generations(&self) -> Generations {
        let mut generations = *self.metadata.generations();
        generations.flags |= self.assume_identical_flag();
        generations
    }

    fn on_hello(&mut self, hello: &Hello) -> Result<(), LinkError> {
        if let Err((reason, text)) = self.check_hello(hello) {
            return Err(self.reject(reason, text));
        }
        let ours = self.wire_generations();
        let assume_identical = hello.generations.flags & ours.flags & FLAG_ASSUME_IDENTICAL != 0;
        let settlement = match settle(
            &hello.generations,
            &ours,
            assume_identical,
            hello.proposed_generation,
        ) {
            Ok(settlement) => settlement,
            Err((refusal, text)) => return Err(self.reject(reject_reason(refusal), text)),
        };
        if settlement.resync.is_none() {
            if let Err((reason, text)) = self.check_cp(hello) {
                return Err(self.reject(reason, text));
            }
        } else if hello.cp_completed + 1 < self.ring.superblock().cp_completed {
            // One CP ahead is a CP we applied whose CpAck was lost: the source completes it
            // at the HelloAck, resync or not.
            return Err(self.reject(
                RejectReason::CpMismatch,
                format!(
                    "source cp {} is behind destination cp {} in a resync",
                    hello.cp_completed,
                    self.ring.superblock().cp_completed
                ),
            ));
        }
        self.ack_generations = ours;
        self.ack_metadata_seq = 0;
        if settlement.destination_adopts {
            log::info!(
                "destination: taking the source's generation {}{}",
                crate::generation::Hex(settlement.generation),
                if settlement.assumed_identical {
                    " (assume_identical: the devices are declared identical)"
                } else {
                    ""
                }
            );
            self.ack_metadata_seq = self
                .metadata
                .adopt(settlement.generation, settlement.assumed_identical);
        }
        assert!(
            settlement.generation == hello.generations.current || settlement.source_adopts,
            "the pair settles on the source's generation unless the source adopts"
        );
        if settlement.resync.is_some() {
            self.begin_resync_session(hello.cp_completed);
        } else {
            self.old_log_kept = false;
            for half in 0..2 {
                self.ring.rewind_half(half);
                self.transfers[half].clear();
            }
        }
        self.restart_cp();
        self.logged_seq_max = None;
        self.in_session = true;
        // Mirror writes of the last session still hold staging blocks: the new session starts
        // (and may send tables) once they are done, so staging stays one window. An adopted
        // generation is durable before the source hears of it.
        self.hello_ack_pending = true;
        self.maybe_send_hello_ack();
        Ok(())
    }

    pub(crate) fn maybe_send_hello_ack(&mut self) {
        if self.hello_ack_pending
            && !self.mirror_writes_inflight()
            && self.metadata.durable_through() >= self.ack_metadata_seq
        {
            self.hello_ack_pending = false;
            let cp_completed = self.ring.superblock().cp_completed;
            self.push_control(Control::HelloAck {
                cp_completed,
                generations: self.ack_generations,
            });
            if self.resync_session {
                self.marks_cursor = Some(0);
                self.push_resync_marks();
            }
        }
    }

    /// The next write or flush for the node's metadata device.
    #[must_use]
    pub fn poll_metadata_op(&mut self) -> Option<crate::device::DeviceOp<'_>> {
        self.metadata.poll_device_op()
    }

    /// Takes the completion of a metadata op.
    pub fn handle_metadata_completion(&mut self, completion: crate::device::DeviceCompletion<'_>) {
        self.metadata.handle_device_completion(completion);
        self.maybe_send_hello_ack();
        self.maybe_send_resync_done_ack();
    }

    pub fn metadata(&self) -> &NodeMetadata {
        &self.metadata
    }

    fn check_hello(&self, hello: &Hello) -> Result<(), (RejectReason, String)> {
        if hello.protocol_version != u32::from(wire::PROTOCOL_VERSION) {
            return Err((
                RejectReason::Version,
                format!("protocol version {} unsupported", hello.protocol_version),
            ));
        }
        if hello.block_size as usize != BLOCK_SIZE || hello.sector_size as usize != SECTOR_SIZE {
            return Err((
                RejectReason::Geometry,
                format!(
                    "block/sector size {}/{}",
                    hello.block_size, hello.sector_size
                ),
            ));
        }
        if hello.volume_id != self.volume_id {
            return Err((RejectReason::Volume, "volume id mismatch".to_string()));
        }
        if hello.geometry != self.ring.geometry() {
            return Err((
                RejectReason::Geometry,
                format!(
                    "ring geometry {:?} != ours {:?}",
                    hello.geometry,
                    self.ring.geometry()
                ),
            ));
        }
        if hello.namespace_sizes() != self.namespace_sizes_bytes.as_slice() {
            return Err((
                RejectReason::Namespaces,
                format!(
                    "namespace sizes {:?} != mirrors {:?}",
                    hello.namespace_sizes(),
                    self.namespace_sizes_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The logs continue each other (checked once the generations agreed: a stale source is
    /// told it is stale, not that its CP differs).
    fn check_cp(&self, hello: &Hello) -> Result<(), (RejectReason, String)> {
        let ours = self.ring.superblock().cp_completed;
        if ours != hello.cp_completed && ours != hello.cp_completed + 1 {
            return Err((
                RejectReason::CpMismatch,
                format!(
                    "source cp {} vs destination cp {ours}: needs a full resync",
                    hello.cp_completed
                ),
            ));
        }
        Ok(())
    }

    fn on_transfer(&mut self, transfer: &TransferMessage<'_>) -> Result<(), LinkError> {
        self.drop_old_log();
        let header = transfer.header;
        let completed = self.ring.superblock().cp_completed;
        if header.cp_number != completed + 1 && header.cp_number != completed + 2 {
            return Err(ProtocolError::TransferForCp {
                cp_number: header.cp_number,
                cp_completed: completed,
            }
            .into());
        }
        let half = half_of_cp(header.cp_number);
        if ![0, header.cp_number].contains(&self.ring.half_cp(half)) {
            return Err(ProtocolError::TransferIntoHalf {
                cp_number: header.cp_number,
                half_cp: self.ring.half_cp(half),
            }
            .into());
        }
        if self.transfers[half]
            .last()
            .is_some_and(|&(last, _)| last >= header.transfer_id)
        {
            return Err(ProtocolError::TransferIdNotIncreasing {
                transfer_id: header.transfer_id.0,
            }
            .into());
        }
        if self.ring.reserved_slots(0) + self.ring.reserved_slots(1) == 0 {
            self.ring.set_next_seq(header.first_seq);
        } else if self.ring.next_seq() != header.first_seq {
            return Err(ProtocolError::TransferSeq {
                first_seq: header.first_seq,
                expected: self.ring.next_seq(),
            }
            .into());
        }
        // Every entry is checked (extent, data CRC) before any byte is stored: after a
        // reconnect the halves are rewound, not erased, so a resent entry lands on the bytes of
        // the entry acknowledged at that place before, and a promotion must still find those
        // intact. A mismatch leaves the log untouched, the transfer unacknowledged and the link
        // closed; the source resends it; nothing unverified is stored or applied (invariants 4, 5).
        for (index, (entry, data)) in transfer.entries().enumerate() {
            self.check_extent(
                entry.nsid,
                entry.lba * SECTOR_SIZE as u64,
                u64::from(entry.length_bytes),
            )?;
            if crc32c(data) != entry.data_crc {
                return Err(LinkError::DataCrc {
                    transfer_id: header.transfer_id.0,
                    entry_index: index as u32,
                });
            }
        }
        let mut base = None;
        for (entry, data) in transfer.entries() {
            let request = EntryRequest {
                cp_number: header.cp_number,
                transfer_id: header.transfer_id.0,
                nsid: entry.nsid,
                lba: entry.lba,
                length_bytes: entry.length_bytes,
                zeroes: entry.is_zeroes(),
            };
            let slot = self
                .ring
                .reserve(&request)
                .map_err(|_| ProtocolError::RingHalfFull)?;
            if slot.data_offset() != entry.data_offset {
                return Err(ProtocolError::Placement {
                    ours: slot.data_offset(),
                    sources: entry.data_offset,
                }
                .into());
            }
            // The log is read back at the CP, a ring half later: streamed past the cache.
            self.ring.store_data_streamed(&slot, 0, data);
            self.ring.commit_with_crc(&slot, entry.data_crc);
            base.get_or_insert(round_down(u64::from(entry.data_offset), BLOCK_SIZE as u64) as u32);
        }
        self.transfers[half].push((header.transfer_id, base.expect("transfers have entries")));
        self.logged_seq_max = Some(header.first_seq + u64::from(header.entry_count) - 1);
        self.pending_ack = Some(header.transfer_id);
        Ok(())
    }

    fn check_extent(
        &self,
        nsid: u32,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<(), LinkError> {
        check_extent(
            &self.namespace_sizes_bytes,
            nsid,
            offset_bytes,
            length_bytes,
        )
        .map_err(|error| {
            LinkError::Protocol(match error {
                ExtentError::NoNamespace => ProtocolError::NoNamespace { nsid },
                ExtentError::OutOfRange => ProtocolError::BeyondNamespace {
                    nsid,
                    offset_bytes,
                    length_bytes,
                },
            })
        })
    }

    /// A DescriptorTable: every descriptor is checked (extent; a reference resolved to its log
    /// bytes) before any is queued, then its mirror writes are queued as device ops and its Data
    /// blocks staged until they are written. A source keeps at most [`TABLE_WINDOW`] tables
    /// unacknowledged, so staging never runs out for a source that follows the protocol.
    fn on_table(&mut self, table: &DescriptorTableMessage<'_>) -> Result<(), LinkError> {
        if self.resync_apply.is_some() {
            return Err(ProtocolError::Resync {
                what: "a DescriptorTable while a ResyncTable is being applied",
            }
            .into());
        }
        let cp_number = self.ring.superblock().cp_completed + 1;
        if table.cp_number != cp_number || self.commit_pending.is_some() {
            return Err(ProtocolError::TableForCp {
                cp_number: table.cp_number,
                committing: cp_number,
            }
            .into());
        }
        if self.tables.len() >= TABLE_WINDOW as usize {
            return Err(ProtocolError::TableWindow.into());
        }
        let half = half_of_cp(cp_number);
        let table_number = self.tables_received;
        let queued_before = self.pending.len();
        let mut writes = 0;
        for (entry, data) in table.descriptors() {
            let offset_bytes = self.table_entry_offset(&entry, queued_before)?;
            let from = match entry.descriptor {
                Descriptor::Reference {
                    transfer_id,
                    block_number,
                } => {
                    self.counters.cp_reference_count += 1;
                    match resolve(
                        &self.ring,
                        &self.transfers[half],
                        half,
                        transfer_id,
                        block_number,
                    ) {
                        Ok(ring_offset) => MirrorSource::Log { ring_offset },
                        Err(error) => {
                            self.unqueue_from(queued_before);
                            return Err(error);
                        }
                    }
                }
                Descriptor::Data if self.cp_failed => {
                    // Not staged: the failed CP's writes are dropped below.
                    self.counters.cp_data_blocks += 1;
                    MirrorSource::Zeroes
                }
                Descriptor::Data => {
                    self.counters.cp_data_blocks += 1;
                    self.stage_data_block(data.expect("Data descriptors carry a block"))
                }
                Descriptor::Zeroes => {
                    self.counters.cp_zeroes_count += 1;
                    MirrorSource::Zeroes
                }
            };
            writes += 1;
            self.pending.push_back(MirrorWrite {
                nsid: entry.nsid,
                offset_bytes,
                from,
                table: table_number,
            });
        }
        if self.cp_failed {
            // The CP fails at its CpCommit anyway: nothing more of it is written.
            self.unqueue_from(queued_before);
            writes = 0;
        }
        self.tables_received += 1;
        self.tables.push_back((table_number, writes));
        self.descriptors_applied += u64::from(table.count);
        self.ack_done_tables();
        Ok(())
    }

    /// The byte offset of a table entry's block, checked against the namespaces. A bad entry
    /// drops the mirror writes its table queued so far (from `queued_before`, freeing their
    /// staging blocks) before the error ends the connection.
    fn table_entry_offset(
        &mut self,
        entry: &crate::cp::DescriptorEntry,
        queued_before: usize,
    ) -> Result<u64, LinkError> {
        let offset = entry
            .block_index
            .checked_mul(BLOCK_SIZE as u64)
            .ok_or_else(|| LinkError::from(ProtocolError::BlockIndexOverflow))
            .and_then(|offset| {
                self.check_extent(entry.nsid, offset, BLOCK_SIZE as u64)
                    .map(|()| offset)
            });
        if offset.is_err() {
            self.unqueue_from(queued_before);
        }
        offset
    }

    /// A Data descriptor's block, copied into a free staging block until its mirror write
    /// completes (the source keeps at most a window of tables unacknowledged, so one is free).
    fn stage_data_block(&mut self, data: &[u8]) -> MirrorSource {
        let block = self
            .staging_free
            .pop()
            .expect("a window of tables fits the staging blocks");
        let at = usize::from(block) * BLOCK_SIZE;
        self.staging[at..at + BLOCK_SIZE].copy_from_slice(data);
        MirrorSource::Staged { block }
    }

    /// Drops the queued mirror writes from position `from` on, freeing their staging blocks.
    fn unqueue_from(&mut self, from: usize) {
        while self.pending.len() > from {
            let write = self.pending.pop_back().expect("longer than from");
            if let MirrorSource::Staged { block } = write.from {
                self.staging_free.push(block);
            }
        }
    }

    /// CpCommit: once every mirror write of the CP completed, the mirrors are flushed (device
    /// ops) and the CP recorded and acknowledged, or failed (CpFailed) if a mirror op failed.
    fn on_commit(&mut self, cp_number: u64, descriptor_count: u64) -> Result<(), LinkError> {
        let expected_cp = self.ring.superblock().cp_completed + 1;
        if cp_number != expected_cp
            || descriptor_count != self.descriptors_applied
            || self.commit_pending.is_some()
        {
            return Err(ProtocolError::CpCommit {
                cp_number,
                descriptor_count,
                expected_cp,
                expected_count: self.descriptors_applied,
            }
            .into());
        }
        self.commit_pending = Some(cp_number);
        self.advance_commit();
        Ok(())
    }

    /// Forgets the CP being applied (a new session, or it failed): its tables come again.
    /// Ops in flight finish in the background; the next flush waits for them.
    fn restart_cp(&mut self) {
        self.unqueue_from(0);
        self.tables.clear();
        self.tables_received = 0;
        self.tables_done = 0;
        self.descriptors_applied = 0;
        self.cp_failed = false;
        self.commit_pending = None;
        // Flushes of an abandoned commit still complete; with the session bumped they are not
        // counted for the next one.
        self.session = self.session.wrapping_add(1);
        self.flushes_remaining = 0;
        self.flushes_issued = 0;
        self.flush_failed = false;
    }

    fn push_control(&mut self, control: Control<'_>) {
        let length = control.encoded_bytes();
        self.out
            .push_inline(length, |bytes| control.encode(bytes))
            .expect("the destination's queue holds only small messages");
        self.counters.ack_bytes += length as u64;
    }

    /// Queues the cumulative TransferAck if there is room (it is retried after `tx_advance`).
    /// The log's streamed stores are fenced first: no TransferAck is queued before the entries
    /// it acknowledges are ordered into the ring.
    fn flush_pending_ack(&mut self) {
        if let Some(transfer_id) = self.pending_ack {
            let ack = Control::TransferAck { transfer_id };
            if self.out.can_push(ack.encoded_bytes(), 1) {
                self.ring.fence_streamed();
                self.push_control(ack);
                self.pending_ack = None;
            }
        }
    }

    pub fn tx_iovecs<'a>(&'a self, out: &mut impl Extend<IoSlice<'a>>, max: usize) -> usize {
        self.out.tx_iovecs(&[], out, max)
    }

    pub fn tx_advance(&mut self, written: usize) {
        self.out.tx_advance(written);
        self.counters.wire_bytes_total += written as u64;
        self.sent_bytes += written as u64;
        self.flush_pending_ack();
    }

    pub fn tx_pending_bytes(&self) -> u64 {
        self.out.pending_bytes()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<DestinationEvent> {
        self.events.pop_front()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn cp_completed(&self) -> u64 {
        self.ring.superblock().cp_completed
    }

    /// The highest seq stored in this session (what a TransferAck may cover).
    pub fn logged_seq_max(&self) -> Option<u64> {
        self.logged_seq_max
    }

    /// Gives back the ring memory (a crash, or an orderly stop). Ops still in flight are the
    /// runtime's to finish or abandon.
    pub fn into_memory(self) -> M {
        self.ring.into_memory()
    }

    /// Failover: a [`Promotion`] that replays the log's entries newer than the last completed
    /// CP onto the mirrors (device ops, seq order), flushes, takes `new_generation` (random,
    /// non-zero) durably, and only then records the entries as completed (invariant 6). Wait for
    /// this side's ops in flight first.
    pub fn promote(self, new_generation: u64) -> Result<Promotion<M>, EngineError> {
        assert!(self.ops.is_empty(), "promote once the mirror ops finished");
        if self.metadata.generations().flags & crate::generation::FLAG_RESYNC_TARGET != 0 {
            return Err(EngineError::ResyncTarget {
                generation: self.metadata.generations().current,
            });
        }
        let sizes = self.namespace_sizes_bytes.clone();
        let depth = self.ops_depth();
        Promotion::new(
            self.ring.into_memory(),
            &sizes,
            depth,
            self.metadata,
            new_generation,
        )
    }
}

/// The Reject reason of a refused settlement.
pub(crate) fn reject_reason(refusal: Refusal) -> RejectReason {
    match refusal {
        Refusal::StaleSource => RejectReason::StaleSource,
        Refusal::SplitBrain => RejectReason::SplitBrain,
        Refusal::FullSyncRequired => RejectReason::FullSyncRequired,
        Refusal::ResyncRequired => RejectReason::ResyncRequired,
        Refusal::SameNode => RejectReason::SameNode,
    }
}

/// The ring offset of the 4 KiB of block `block_number` of `transfer_id` in our own log
/// (claim 15).
fn resolve<M: RingStore>(
    ring: &NvramRing<M>,
    transfers: &[(TransferId, u32)],
    half: usize,
    transfer_id: TransferId,
    block_number: u32,
) -> Result<u64, LinkError> {
    let index = transfers
        .binary_search_by_key(&transfer_id, |&(id, _)| id)
        .map_err(|_| ProtocolError::UnknownTransfer {
            transfer_id: transfer_id.0,
        })?;
    let position = u64::from(transfers[index].1) + u64::from(block_number) * BLOCK_SIZE as u64;
    if position + BLOCK_SIZE as u64 > u64::from(ring.data_cursor(half)) {
        return Err(ProtocolError::BeyondTransfer {
            transfer_id: transfer_id.0,
            block_number,
        }
        .into());
    }
    Ok(ring.geometry().data_area_offset(half) + position)
}
