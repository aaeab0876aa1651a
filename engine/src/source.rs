//! The source side's state machine (claims 8-10, 13-14, 17; engine spec "Source"): host writes
//! become ring entries, entries travel in data transfers, a write completes once the destination
//! acknowledged its transfer, and consistency points mirror dirty blocks as references or data.
//!
//! Call order (the runtime's reactor loop): `open` once; per host write `reserve_write`, fill
//! `write_buffer`, `commit_write` (or `write` / `write_zeroes`); on link events
//! `handle_connected` / `handle_message` (one whole framed message) / `handle_disconnected`;
//! every loop `handle_tick`, then submit every `poll_device_op` to its namespace and hand each
//! device completion to `handle_device_completion`, then `tx_iovecs` + `tx_advance`, then
//! drain `poll_event`; close the link whenever `poll_link_close` says so (the peer is lost:
//! [`crate::liveness`]); every `poll_metadata_op` goes to the node's metadata device and its
//! completions to `handle_metadata_completion`. The source never touches a device itself
//! (invariant 8). The HelloAck's generations are settled as the destination settled them
//! ([`crate::generation::settle`]); LinkReady comes once a generation we adopted is durable, and
//! is the moment a runtime may start serving hosts.
//!
//! Write-through: a committed entry is written to its primary namespace as a device op, in seq
//! order (an entry waits while an earlier one overlapping it is in flight), so reads are served
//! from the primary once the writes they must see have landed ([`Source::read_gate`]); the CP
//! flushes the primary before it tells the destination anything about the CP, and a crash
//! re-applies the ring's entries newer than the last completed CP.
//!
//! This file holds the public types and the `Source` API; the work behind it is split by concern:
//! `write` (host write path), `apply` (device ops: primary writes, the point-in-time hold, CP
//! flush and data reads, retries), `transfers` (link session, transfers and their acks), `cp`
//! (consistency-point driving), `cp_state` (per-half CP state) and `recovery` (open).

mod apply;
mod cp;
mod cp_state;
mod peer;
mod recovery;
mod resync;
mod transfers;
mod write;

pub use crate::cp::CpMode;
pub use cp_state::TABLE_WINDOW;
pub use recovery::RecoveryReport;
pub use resync::ResyncStatus;

use std::collections::VecDeque;
use std::io::IoSlice;

use crate::counters::Counters;
use crate::cp::DescriptorEntry;
use crate::device::{DeviceError, DeviceOpKind};
use crate::error::LinkError;
use crate::geometry::{
    half_of_cp, BLOCK_SIZE, DESCRIPTORS_PER_TABLE, OUT_INLINE_BYTES, SECTOR_SIZE,
    TRANSFER_ENTRIES_MAX, WRITE_BYTES_MAX, WRITE_ZEROES_BYTES_MAX,
};
use crate::liveness::{Liveness, PeerLossPolicy, PeerLostReason, PeerState};
use crate::ring::{EntryHeader, EntrySlot, NvramRing, RingStore};
use crate::transfer::LoggedWrite;
use crate::wire::{self, Control, Message, OutQueue, WireEntry};
use apply::StagedTable;
use cp_state::{CpPhase, CpState};

/// The source's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceConfig {
    pub volume_id: [u8; 16],
    pub cp_interval_us: u64,
    pub mode: CpMode,
    /// Device ops in flight per primary namespace at most.
    pub device_queue_depth: u32,
    /// Silence (or ack silence) for this long means the destination is lost ([`crate::liveness`]).
    pub peer_timeout_us: u64,
    /// What host writes do while the destination is lost.
    pub peer_loss_policy: PeerLossPolicy,
    /// Seeds the generations this source takes on its own (degrade); random per process.
    pub generation_seed: u64,
    /// A resync sends at most this many bytes per second (0: as fast as it goes).
    pub resync_rate_bytes_per_s: u64,
    /// The operator declares both devices identical (freshly zeroed): a pair without shared
    /// history needs no full sync. Applied once per node metadata.
    pub assume_identical: bool,
}

/// The default [`SourceConfig::device_queue_depth`] (and the destination's).
pub const DEVICE_QUEUE_DEPTH_DEFAULT: u32 = 32;
/// The largest configurable device queue depth.
pub const DEVICE_QUEUE_DEPTH_MAX: u32 = 1024;
/// The least a degraded CP ready to complete waits for the HelloAck of a Hello already sent (it
/// told the destination our last completed CP, so completing one more abandons the handshake).
/// A live destination answers well within it; each abandoned handshake doubles the wait, up to
/// the peer timeout, so a slow one gets a long enough window, and a HelloAck resets it.
pub const DEGRADED_HELLO_GRACE_US_MIN: u64 = 50_000;

/// The grace a degraded CP gives a HelloAck after a handshake succeeded: the least, within the
/// peer timeout.
fn hello_grace_least_us(config: &SourceConfig) -> u64 {
    DEGRADED_HELLO_GRACE_US_MIN.min(config.peer_timeout_us)
}

/// A host write's identity: the seq of its ring entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WriteId(pub u64);

/// A reserved host write: fill [`Source::write_buffer`], then [`Source::commit_write`].
#[derive(Debug, PartialEq, Eq)]
pub struct WriteSlot {
    entry: EntrySlot,
}

impl WriteSlot {
    pub fn id(&self) -> WriteId {
        WriteId(self.entry.seq())
    }
}

/// Why a host write was not accepted (a command error, not a link or engine error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRefused {
    /// Both ring halves are busy: retry later (never a failure of the write).
    Backpressure,
    InvalidNamespace,
    OutOfRange,
    InvalidLength,
    /// The destination is lost and the policy is [`PeerLossPolicy::Fail`]: a path error.
    PeerLost,
}

/// Why a host read failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    InvalidNamespace,
    OutOfRange,
    InvalidLength,
    Device(DeviceError),
}

/// A device operation that failed, as the source reports it (once per failing streak of a
/// namespace in the log; every one in the counters). Nothing acknowledged is lost by it: the
/// entry stays in the ring and the op is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceFault {
    pub nsid: u32,
    pub kind: DeviceOpKind,
    /// Where on the namespace (0 for a flush).
    pub offset_bytes: u64,
    pub length_bytes: u64,
    pub error: DeviceError,
    /// What the op was for ("primary write", "CP flush", ...).
    pub purpose: &'static str,
}

impl std::fmt::Display for DeviceFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "namespace {}: {} ({}) of {} bytes at LBA {} failed: {}",
            self.nsid,
            self.kind,
            self.purpose,
            self.length_bytes,
            self.offset_bytes / SECTOR_SIZE as u64,
            self.error
        )
    }
}

/// What the source tells the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// The write is in the ring and the destination acknowledged its transfer.
    WriteCompleted(WriteId),
    /// The destination is lost under [`PeerLossPolicy::Fail`]: the write completes with a path
    /// error. It stays in the ring and reaches the destination when it returns.
    WriteFailed(WriteId),
    /// The destination was declared lost (logged once, counted in `peer_lost_count`).
    PeerLost(PeerLostReason),
    CpCompleted {
        cp_number: u64,
        duration_us: u64,
        /// The seq of the CP's last entry: the mirror is the primary as of this write.
        last_seq: u64,
    },
    /// The destination accepted our Hello; transfers flow.
    LinkReady,
    /// The destination refused our Hello (the reason text); do not reconnect blindly.
    LinkRejected(String),
    /// A primary op failed; it is retried (the ring keeps every write, writes still complete).
    DeviceFault(DeviceFault),
    /// The destination could not write CP `cp_number` to its mirror; the CP is retried.
    MirrorFailed { cp_number: u64 },
    /// The resync finished: the destination holds our generation, writes are synchronous.
    ResyncDone { bytes: u64, duration_us: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Down,
    /// Connected; the Hello went out at `sent_us`, or (`None`) waits for `generations_seq` to be
    /// durable.
    HelloSent {
        sent_us: Option<u64>,
    },
    /// HelloAck accepted; a generation we adopted is being made durable before transfers flow.
    Settling,
    Ready,
    Rejected,
}

/// The source state machine over ring memory `M`; its primary namespaces are the runtime's,
/// reached through device ops.
pub struct Source<M> {
    config: SourceConfig,
    ring: NvramRing<M>,
    cps: [CpState; 2],
    active_cp: u64,
    cp_requested: bool,
    next_transfer_id: u64,
    link: LinkState,
    out: OutQueue,
    /// Completions were emitted for every seq up to this one.
    completed_through_seq: u64,
    events: VecDeque<SourceEvent>,
    counters: Counters,
    wire_entries: Vec<WireEntry>,
    table_entries: Vec<DescriptorEntry>,
    namespace_sizes_bytes: Vec<u64>,
    /// Reserved writes whose data never came: committed as no-ops when their turn comes.
    aborted: Vec<EntrySlot>,
    /// Device ops in flight and what each is for.
    ops: apply::SourceOps,
    /// The descriptor table whose Data blocks are being read from the primary.
    staged: StagedTable,
    /// Primary writes wait until then after a failure (retry back-off).
    apply_retry_at_us: u64,
    /// The next entry to apply, decoded once while it waits for its device (at its queue depth,
    /// or an overlapping op in flight): an SPDK bdev completes on a later poll, and decoding
    /// (CRC) the same cold header at every poll cost about a sixth of the source's time at
    /// QD 32 (`perf record` of the nvmirror bdev: 5.8% of the core, the source node 37%).
    /// Its seq names it: a half reused holds later seqs, so a stale one is never taken.
    next_apply: Option<EntryHeader>,
    /// CP flushes and data reads wait until then after a failure.
    cp_retry_at_us: u64,
    /// Per namespace: a failure was logged and no op has succeeded since.
    failing: Vec<bool>,
    /// Namespaces whose CP flush is still to be issued (last = next).
    pending_flushes: Vec<u32>,
    /// Heartbeats and the silence deadline of the current connection.
    liveness: Liveness,
    peer: PeerState,
    /// Transfers have been awaiting an ack since then with no ack progress (the ack deadline).
    ack_waiting_since_us: Option<u64>,
    /// Bytes handed to the socket (the heartbeat clock watches it).
    sent_bytes: u64,
    /// This node's generations and bitmap.
    metadata: crate::metadata::NodeMetadata,
    /// While `Settling`: the link is ready once the metadata is durable through this.
    settle_seq: u64,
    /// The metadata sequence of our last change of generations (a Hello waits for it).
    generations_seq: u64,
    /// How long a degraded CP ready to complete on the primary alone waits for a HelloAck.
    hello_grace_us: u64,
    /// Writes complete without the destination (`degrade`).
    degrade: Option<resync::Degrade>,
    /// The destination is being resynced.
    resync: Option<resync::Resync>,
    /// The table generation the next resync starts at: past every earlier resync's tables.
    resync_generation_next: u32,
    /// Blocks whose latest content the destination holds in a transfer it acknowledged before
    /// it was lost, sorted: ((nsid, block), (transfer, block number)).
    degraded_references: Vec<((u32, u64), (crate::transfer::TransferId, u32))>,
    /// Blocks a resync sent as references: the data pass skips them.
    applied_references: std::collections::HashSet<(u32, u64)>,
    random_state: u64,
    /// The time of the last `handle_tick` (what work started by a device completion uses).
    last_tick_us: u64,
}

impl<M: RingStore> Source<M> {
    fn build(
        now_us: u64,
        config: SourceConfig,
        ring: NvramRing<M>,
        namespace_sizes_bytes: &[u64],
        metadata: crate::metadata::NodeMetadata,
    ) -> Self {
        assert_eq!(
            metadata.volume_id(),
            config.volume_id,
            "metadata of this volume"
        );
        let geometry = ring.geometry();
        let slots = geometry.half_header_slots as usize;
        let dirty_blocks_max = geometry.half_data_bytes as usize / BLOCK_SIZE + 2 * slots;
        let mut counters = Counters {
            ring_size_bytes: geometry.ring_bytes,
            ..Counters::default()
        };
        counters.ring_used_bytes = ring.used_bytes();
        Self {
            config,
            cps: [
                CpState::new(slots, dirty_blocks_max),
                CpState::new(slots, dirty_blocks_max),
            ],
            active_cp: ring.superblock().cp_completed + 1,
            cp_requested: false,
            next_transfer_id: ring.superblock().transfer_id_floor.max(1),
            link: LinkState::Down,
            out: OutQueue::new(OUT_INLINE_BYTES, 2 * slots + 1024),
            completed_through_seq: ring.next_seq() - 1,
            events: VecDeque::with_capacity(2 * slots),
            counters,
            wire_entries: Vec::with_capacity(TRANSFER_ENTRIES_MAX),
            table_entries: Vec::with_capacity(DESCRIPTORS_PER_TABLE),
            namespace_sizes_bytes: namespace_sizes_bytes.to_vec(),
            aborted: Vec::with_capacity(TRANSFER_ENTRIES_MAX),
            ops: apply::SourceOps::new(namespace_sizes_bytes.len(), config.device_queue_depth),
            staged: StagedTable::new(),
            apply_retry_at_us: 0,
            next_apply: None,
            cp_retry_at_us: 0,
            failing: vec![false; namespace_sizes_bytes.len()],
            pending_flushes: Vec::with_capacity(crate::geometry::NAMESPACES_MAX),
            liveness: Liveness::new(config.peer_timeout_us),
            peer: PeerState::Disconnected { since_us: now_us },
            ack_waiting_since_us: None,
            sent_bytes: 0,
            ring,
            metadata,
            settle_seq: 0,
            generations_seq: 0,
            hello_grace_us: hello_grace_least_us(&config),
            degrade: None,
            resync: None,
            resync_generation_next: 0,
            degraded_references: Vec::new(),
            applied_references: std::collections::HashSet::new(),
            random_state: config.generation_seed,
            last_tick_us: now_us,
        }
    }

    // ---- host writes -------------------------------------------------------------------

    /// Reserves ring space for a host write of `length_bytes` at `lba` (512 B sectors).
    pub fn reserve_write(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<WriteSlot, WriteRefused> {
        if length_bytes as usize > WRITE_BYTES_MAX {
            return Err(WriteRefused::InvalidLength);
        }
        self.check_range(nsid, lba, u64::from(length_bytes))?;
        self.reserve_entry(now_us, nsid, lba, length_bytes, false)
            .map(|entry| WriteSlot { entry })
    }

    /// Copies host data into a reserved write at `offset` (the target's in-capsule data).
    pub fn fill_write(&mut self, slot: &WriteSlot, offset: usize, data: &[u8]) {
        self.ring.store_data(&slot.entry, offset, data);
    }

    /// Where the host's data goes (ring memory).
    pub fn write_buffer(&mut self, slot: &WriteSlot) -> &mut [u8] {
        self.ring.data_mut(&slot.entry)
    }

    /// Seals the entry; the committed prefix goes to the primary and becomes sendable.
    pub fn commit_write(&mut self, now_us: u64, slot: WriteSlot) {
        let data_crc = self.ring.data_crc(&slot.entry);
        self.commit_write_verified(now_us, slot, data_crc);
    }

    /// [`Source::commit_write`] for data whose CRC32C the caller has already computed over the
    /// entry's bytes as they are now (an NVMe/TCP data digest checked over the ring slot), so the
    /// entry's data is not read once more to checksum it.
    pub fn commit_write_verified(&mut self, _now_us: u64, slot: WriteSlot, data_crc: u32) {
        self.ring.commit_with_crc(&slot.entry, data_crc);
        self.counters.host_write_count += 1;
        self.counters.host_bytes_written += u64::from(slot.entry.header().length_bytes);
    }

    /// Gives up a reserved write whose data never arrived (the host connection died). The
    /// slot cannot be skipped (only the committed prefix counts), so once every earlier entry
    /// overlapping it is on the primary, its range is read back from the primary into the entry
    /// (a device op) and committed: a write of the current content, which changes nothing. Its
    /// WriteId still completes.
    pub fn abort_write(&mut self, _now_us: u64, slot: WriteSlot) {
        self.aborted.push(slot.entry);
    }

    /// Reserve, copy and commit in one call.
    pub fn write(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        data: &[u8],
    ) -> Result<WriteId, WriteRefused> {
        let length_bytes = u32::try_from(data.len()).map_err(|_| WriteRefused::InvalidLength)?;
        let slot = self.reserve_write(now_us, nsid, lba, length_bytes)?;
        self.write_buffer(&slot).copy_from_slice(data);
        let id = slot.id();
        self.commit_write(now_us, slot);
        Ok(id)
    }

    /// Logs a write-zeroes (one entry without data).
    pub fn write_zeroes(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<WriteId, WriteRefused> {
        if length_bytes > WRITE_ZEROES_BYTES_MAX {
            return Err(WriteRefused::InvalidLength);
        }
        self.check_range(nsid, lba, length_bytes)?;
        let entry = self.reserve_entry(now_us, nsid, lba, length_bytes as u32, true)?;
        let slot = WriteSlot { entry };
        let id = slot.id();
        self.commit_write(now_us, slot);
        Ok(id)
    }

    /// Checks a host read of `length_bytes` at `lba` and returns the seq it must wait for:
    /// the read may go to the primary once [`Source::landed_through_seq`] reaches it, so it sees
    /// every write completed to a host before it arrived (those may still be on their way to
    /// the primary: a write completes when it is logged on both sides, not when it landed).
    pub fn read_gate(&self, nsid: u32, lba: u64, length_bytes: u64) -> Result<u64, ReadError> {
        self.check_range(nsid, lba, length_bytes)
            .map_err(|refused| match refused {
                WriteRefused::InvalidNamespace => ReadError::InvalidNamespace,
                WriteRefused::OutOfRange => ReadError::OutOfRange,
                _ => ReadError::InvalidLength,
            })?;
        Ok(self.completed_through_seq)
    }

    // ---- link -------------------------------------------------------------------------

    /// The link is up: queue Hello.
    pub fn handle_connected(&mut self, now_us: u64) {
        self.out.clear();
        self.reset_session();
        self.liveness.on_connected(now_us, self.sent_bytes);
        self.link = LinkState::HelloSent { sent_us: None };
        self.maybe_send_hello(now_us);
    }

    /// The Hello goes out once the generations it carries are durable: the destination acts on
    /// them at once (a resync session marks it a resync target and adopts our CP numbering), so
    /// a crash must not bring us back at generations it never saw.
    fn maybe_send_hello(&mut self, now_us: u64) {
        if self.link != (LinkState::HelloSent { sent_us: None })
            || self.metadata.durable_through() < self.generations_seq
        {
            return;
        }
        let hello = self.hello();
        let control = Control::Hello(&hello);
        let length = control.encoded_bytes();
        // Heartbeats queued while waiting fill no queue; else try again at the next tick.
        if self
            .out
            .push_inline(length, |bytes| control.encode(bytes))
            .is_ok()
        {
            self.link = LinkState::HelloSent {
                sent_us: Some(now_us),
            };
        }
    }

    /// The link is down: drop the send queue; everything unacknowledged is resent after the
    /// next HelloAck.
    pub fn handle_disconnected(&mut self, now_us: u64) {
        self.out.clear();
        self.reset_session();
        self.liveness.on_disconnected();
        if self.link != LinkState::Rejected {
            self.link = LinkState::Down;
        }
        if let PeerState::Connected { .. } = self.peer {
            log::warn!(
                "source: replication link down; the destination is lost unless a handshake \
                 succeeds within {} ms",
                self.config.peer_timeout_us / 1000
            );
            self.peer = PeerState::Disconnected { since_us: now_us };
        }
    }

    /// Handles one whole framed message from the destination.
    pub fn handle_message(&mut self, now_us: u64, message: &[u8]) -> Result<(), LinkError> {
        self.counters.wire_bytes_total += message.len() as u64;
        self.counters.ack_bytes += message.len() as u64;
        self.liveness.on_received(now_us);
        match (self.link, wire::decode(message)?) {
            (_, Message::Heartbeat { peer_timeout_us }) => {
                self.liveness.on_heartbeat("source", peer_timeout_us);
                Ok(())
            }
            (_, Message::Reject { reason, text }) => {
                self.link = LinkState::Rejected;
                log::error!("source: destination rejected us: {text}");
                self.events
                    .push_back(SourceEvent::LinkRejected(text.to_string()));
                Err(LinkError::RejectedByPeer {
                    reason,
                    text: text.to_string(),
                })
            }
            (
                LinkState::HelloSent { .. },
                Message::HelloAck {
                    cp_completed,
                    generations,
                },
            ) => self.on_hello_ack(now_us, cp_completed, &generations),
            (LinkState::Ready, Message::TransferAck { transfer_id }) => {
                self.on_transfer_ack(now_us, transfer_id)
            }
            (LinkState::Ready, Message::CpAck { cp_number }) => self.on_cp_ack(now_us, cp_number),
            (LinkState::Ready, Message::TableAck { cp_number, tables }) => {
                self.on_table_ack(cp_number, tables)
            }
            (LinkState::Ready, Message::CpFailed { cp_number }) => {
                self.on_cp_failed(now_us, cp_number)
            }
            (
                LinkState::Ready,
                Message::ResyncAck {
                    resync_number,
                    failed,
                },
            ) => self.on_resync_ack(now_us, resync_number, failed),
            (LinkState::Ready, Message::ResyncDoneAck { generation }) => {
                self.on_resync_done_ack(now_us, generation)
            }
            (LinkState::Ready | LinkState::Settling, Message::ResyncMarks(marks)) => {
                self.on_resync_marks(&marks)
            }
            (state, message) => Err(LinkError::Unexpected {
                message: message_name(&message),
                state: link_state_name(state),
            }),
        }
    }

    /// The halves in send order: the CP in flight (if any) first, then the active one.
    fn halves_in_order(&self) -> [usize; 2] {
        let active = half_of_cp(self.active_cp);
        [1 - active, active]
    }

    /// Gathers up to `max` slices of queued bytes (headers inline, entry data from ring memory).
    pub fn tx_iovecs<'a>(&'a self, out: &mut impl Extend<IoSlice<'a>>, max: usize) -> usize {
        self.out.tx_iovecs(
            self.ring.bytes(0, self.ring.geometry().ring_bytes as usize),
            out,
            max,
        )
    }

    /// `written` bytes of the queue went out.
    pub fn tx_advance(&mut self, written: usize) {
        self.out.tx_advance(written);
        self.counters.wire_bytes_total += written as u64;
        self.sent_bytes += written as u64;
    }

    pub fn tx_pending_bytes(&self) -> u64 {
        self.out.pending_bytes()
    }

    // ---- time and CPs -----------------------------------------------------------------

    /// Cheap, every reactor loop: closes the open transfer, starts a CP on timer / request /
    /// full half, sends ready transfers, advances the CP in flight.
    pub fn handle_tick(&mut self, now_us: u64) {
        self.last_tick_us = now_us;
        let active = half_of_cp(self.active_cp);
        self.cps[active].close_open_transfer();
        self.maybe_send_hello(now_us);
        if self.link == LinkState::Settling && self.metadata.durable_through() >= self.settle_seq {
            self.become_ready(now_us);
        }
        let state = &self.cps[active];
        let timer_due = now_us.saturating_sub(state.started_us) >= self.config.cp_interval_us;
        if self.ring.reserved_slots(active) == 0 {
            self.cp_requested = false;
        } else if state.full || self.cp_requested || timer_due {
            self.try_freeze(now_us);
        }
        self.send_transfers();
        self.advance_cp(now_us);
        self.tick_liveness(now_us);
        if self.config.peer_loss_policy == PeerLossPolicy::Degrade
            && self.peer.is_lost()
            && self.degrade.is_none()
        {
            self.enter_degrade(now_us);
        }
        self.tick_degrade(now_us);
        self.complete_cp_locally(now_us);
        self.advance_resync(now_us);
        self.counters.ring_used_bytes = self.ring.used_bytes();
    }

    /// When a retry back-off ends, if one is running (a device failed).
    fn retry_deadline_us(&self) -> Option<u64> {
        [self.apply_retry_at_us, self.cp_retry_at_us]
            .into_iter()
            .filter(|&at| at > 0)
            .min()
    }

    /// Asks for a CP as soon as possible (no-op when nothing was written).
    pub fn request_cp(&mut self, _now_us: u64) {
        self.cp_requested = true;
    }

    /// Takes the next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Nothing pending: no unreleased entries, nothing queued to send, no device op in flight.
    pub fn is_idle(&self) -> bool {
        self.ring.reserved_slots(0) == 0
            && self.ring.reserved_slots(1) == 0
            && self.out.pending_bytes() == 0
            && self.ops.is_empty()
    }

    /// When `handle_tick` next has timed work (the CP timer, a retry), if any.
    pub fn next_deadline_us(&self) -> Option<u64> {
        let active = half_of_cp(self.active_cp);
        let cp_timer = (self.ring.reserved_slots(active) > 0).then(|| {
            self.cps[active]
                .started_us
                .saturating_add(self.config.cp_interval_us)
        });
        [
            cp_timer,
            self.retry_deadline_us(),
            self.liveness_deadline_us(),
            self.hello_grace_deadline_us(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether the runtime must close the replication link now (the destination is lost), and why.
    #[must_use]
    pub fn poll_link_close(&mut self) -> Option<PeerLostReason> {
        self.liveness.poll_close()
    }

    /// The source's view of its destination.
    pub fn peer_state(&self) -> PeerState {
        self.peer
    }

    /// The peer-loss policy in force.
    pub fn peer_loss_policy(&self) -> PeerLossPolicy {
        self.config.peer_loss_policy
    }

    /// The operator changes the peer-loss policy of a running source. It applies at once: to a
    /// peer already lost (suspend -> fail fails the held writes at the next tick), and to a
    /// later loss. Writes already failed stay failed.
    pub fn set_peer_loss_policy(&mut self, policy: PeerLossPolicy) {
        if policy == self.config.peer_loss_policy {
            return;
        }
        log::warn!(
            "source: peer_loss_policy \"{}\" -> \"{}\" (operator){}",
            self.config.peer_loss_policy.name(),
            policy.name(),
            if self.peer.is_lost() {
                " while the destination is lost"
            } else {
                ""
            }
        );
        self.config.peer_loss_policy = policy;
        self.counters.policy_change_count += 1;
    }

    /// Host writes fail with a path error now (the peer is lost under the `fail` policy).
    pub fn writes_fail(&self) -> bool {
        self.config.peer_loss_policy == PeerLossPolicy::Fail && self.peer.is_lost()
    }

    /// The size of each namespace (index nsid - 1).
    pub fn namespace_sizes_bytes(&self) -> &[u64] {
        &self.namespace_sizes_bytes
    }

    pub fn volume_id(&self) -> [u8; 16] {
        self.config.volume_id
    }

    /// The CP new entries join: a write's CP is this, read right after it was reserved.
    pub fn active_cp(&self) -> u64 {
        self.active_cp
    }

    /// The last CP durable on both sides.
    pub fn cp_completed(&self) -> u64 {
        self.ring.superblock().cp_completed
    }

    /// The CP that must complete for every write completed so far to be on both sides'
    /// namespaces (primary and mirror written and flushed): what a Flush waits for on a
    /// volatile ring medium. `cp_completed()` when they already are.
    pub fn cp_for_completed_writes(&self) -> u64 {
        let seq = self.completed_through_seq;
        self.halves_in_order()
            .into_iter()
            .filter(|&half| {
                let state = &self.cps[half];
                let end = state.first_seq + u64::from(self.ring.reserved_slots(half));
                state.phase != CpPhase::Free && state.first_seq <= seq && seq < end
            })
            .map(|half| self.cps[half].cp_number)
            .next_back()
            .unwrap_or_else(|| self.cp_completed())
    }

    // ---- node metadata ------------------------------------------------------------------

    /// The next write or flush for the node's metadata device.
    #[must_use]
    pub fn poll_metadata_op(&mut self) -> Option<crate::device::DeviceOp<'_>> {
        self.metadata.poll_device_op()
    }

    /// Takes the completion of a metadata op (any order).
    pub fn handle_metadata_completion(&mut self, completion: crate::device::DeviceCompletion<'_>) {
        self.metadata.handle_device_completion(completion);
        // Degraded writes wait for their marks, a resync for its clears: both move on now, not
        // at the next tick (a reactor with nothing else to do may sleep until then).
        let now_us = self.last_tick_us;
        self.tick_degrade(now_us);
        self.advance_resync(now_us);
    }

    pub fn metadata(&self) -> &crate::metadata::NodeMetadata {
        &self.metadata
    }

    /// Takes `generation` (random, non-zero, new) as this node's current one: what a source
    /// does before its first write its peer will not see (the degrade policy). Returns the
    /// metadata sequence to wait for (`metadata().durable_through()`) before acknowledging it.
    pub fn new_generation(&mut self, generation: u64) -> u64 {
        self.generations_seq = self.metadata.new_generation(generation);
        self.generations_seq
    }

    /// Marks the extents of a write the peer will not see (degraded); durable once
    /// `metadata().durable_through() >= mark.seq`. Never called while the peer is connected.
    pub fn mark_unreplicated(
        &mut self,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> crate::metadata::Mark {
        self.metadata.mark(nsid, lba, length_bytes)
    }

    /// The ring's memory (the runtime persists it, per its medium).
    pub fn ring_memory(&self) -> &M {
        self.ring.memory()
    }

    /// Gives back the ring memory (a crash, or an orderly stop). Ops still in flight are the
    /// runtime's to finish or abandon; a reopened source re-applies what they carried.
    pub fn into_memory(self) -> M {
        self.ring.into_memory()
    }
}

/// The dirty-map view of an entry in transfer `table_index` with data base `base_offset`.
fn logged_write(header: &EntryHeader, table_index: u32, base_offset: u32) -> LoggedWrite {
    LoggedWrite {
        nsid: header.nsid,
        lba: header.lba,
        length_bytes: header.length_bytes,
        zeroes: header.is_zeroes(),
        table_index,
        offset_in_transfer: header.data_offset - base_offset,
    }
}

pub(crate) fn message_name(message: &Message<'_>) -> &'static str {
    match message {
        Message::Hello(_) => "Hello",
        Message::HelloAck { .. } => "HelloAck",
        Message::Reject { .. } => "Reject",
        Message::Transfer(_) => "Transfer",
        Message::TransferAck { .. } => "TransferAck",
        Message::DescriptorTable(_) => "DescriptorTable",
        Message::CpCommit { .. } => "CpCommit",
        Message::CpAck { .. } => "CpAck",
        Message::TableAck { .. } => "TableAck",
        Message::CpFailed { .. } => "CpFailed",
        Message::Heartbeat { .. } => "Heartbeat",
        Message::ResyncTable(_) => "ResyncTable",
        Message::ResyncAck { .. } => "ResyncAck",
        Message::ResyncDone { .. } => "ResyncDone",
        Message::ResyncDoneAck { .. } => "ResyncDoneAck",
        Message::ResyncMarks(_) => "ResyncMarks",
    }
}

fn link_state_name(state: LinkState) -> &'static str {
    match state {
        LinkState::Down => "link down",
        LinkState::HelloSent { .. } => "awaiting HelloAck",
        LinkState::Settling => "settling generations",
        LinkState::Ready => "ready",
        LinkState::Rejected => "rejected",
    }
}

#[cfg(test)]
mod tests;
