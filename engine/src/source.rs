//! The source side's state machine (claims 8-10, 13-14, 17; engine spec "Source"): host writes
//! become ring entries, entries travel in data transfers, a write completes once the destination
//! acknowledged its transfer, and consistency points mirror dirty blocks as references or data.
//!
//! Call order (the runtime's reactor loop): `open` once; per host write `reserve_write`, fill
//! `write_buffer`, `commit_write` (or `write` / `write_zeroes`); on link events
//! `handle_connected` / `handle_message` (one whole framed message) / `handle_disconnected`;
//! every loop `handle_tick`, then `tx_iovecs` + `tx_advance`, then drain `poll_event`.
//!
//! Write-through: a committed entry (in seq order) is written to the primary namespace at once,
//! so reads are served from the primary; the CP makes the primary durable with `flush` before it
//! tells the destination anything about the CP, and a crash replays the ring onto the primary.

mod cp_state;
pub(crate) mod recovery;

pub use crate::cp::CpMode;
pub use recovery::RecoveryReport;

use std::collections::VecDeque;
use std::io::IoSlice;

use crate::counters::Counters;
use crate::cp::{ConsistencyPoint, Descriptor, DescriptorEntry};
use crate::device::BlockDevice;
use crate::error::LinkError;
use crate::geometry::{
    half_of_cp, round_down, BLOCK_SIZE, DESCRIPTORS_PER_TABLE, OUT_INLINE_BYTES, SECTOR_SIZE,
    TRANSFER_DATA_BYTES_MAX, TRANSFER_ENTRIES_MAX, WRITE_BYTES_MAX, WRITE_ZEROES_BYTES_MAX,
};
use crate::ring::{EntryHeader, EntryRequest, EntrySlot, NvramRing, RingStore};
use crate::transfer::{LoggedWrite, TransferId, TransferRecord};
use crate::wire::{self, Control, Hello, Message, OutQueue, Segment, TransferHeader, WireEntry};
use cp_state::{CpPhase, CpState};

/// The source's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceConfig {
    pub volume_id: [u8; 16],
    pub cp_interval_us: u64,
    pub mode: CpMode,
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
}

/// Why a host read failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    InvalidNamespace,
    OutOfRange,
    InvalidLength,
    Device(std::io::ErrorKind),
}

/// What the source tells the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// The write is in the ring and the destination acknowledged its transfer.
    WriteCompleted(WriteId),
    CpCompleted {
        cp_number: u64,
        duration_us: u64,
    },
    /// The destination accepted our Hello; transfers flow.
    LinkReady,
    /// The destination refused our Hello (the reason text); do not reconnect blindly.
    LinkRejected(String),
    /// A primary namespace failed; CPs stop (the ring keeps every write), writes still complete.
    DeviceFailed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    Down,
    HelloSent,
    Ready,
    Rejected,
}

/// The source state machine over ring memory `M` and primary namespaces `D`.
pub struct Source<M, D: BlockDevice> {
    config: SourceConfig,
    ring: NvramRing<M>,
    primaries: Vec<D>,
    cps: [CpState; 2],
    active_cp: u64,
    cp_requested: bool,
    next_transfer_id: u64,
    link: LinkState,
    out: OutQueue,
    /// Completions were emitted for every seq up to this one.
    completed_through_seq: u64,
    /// Seqs below this were written by an earlier process: no completion events.
    recovered_seq_end: u64,
    events: VecDeque<SourceEvent>,
    counters: Counters,
    device_failed: bool,
    wire_entries: Vec<WireEntry>,
    table_entries: Vec<DescriptorEntry>,
    zero_block: Vec<u8>,
    namespace_sizes_bytes: Vec<u64>,
    /// Reserved writes whose data never came: committed as no-ops when their turn comes.
    aborted: Vec<EntrySlot>,
}

impl<M: RingStore, D: BlockDevice> Source<M, D> {
    fn build(config: SourceConfig, ring: NvramRing<M>, primaries: Vec<D>) -> Self {
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
            recovered_seq_end: ring.next_seq(),
            events: VecDeque::with_capacity(2 * slots),
            counters,
            device_failed: false,
            wire_entries: Vec::with_capacity(TRANSFER_ENTRIES_MAX),
            table_entries: Vec::with_capacity(DESCRIPTORS_PER_TABLE),
            zero_block: vec![0; 64 * 1024],
            namespace_sizes_bytes: primaries.iter().map(|p| p.size_bytes()).collect(),
            aborted: Vec::with_capacity(TRANSFER_ENTRIES_MAX),
            ring,
            primaries,
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
    pub fn commit_write(&mut self, _now_us: u64, slot: WriteSlot) {
        self.ring.commit(&slot.entry);
        self.counters.host_write_count += 1;
        self.counters.host_bytes_written += u64::from(slot.entry.header().length_bytes);
        self.apply_committed();
    }

    /// Gives up a reserved write whose data never arrived (the host connection died). The
    /// slot cannot be skipped (only the committed prefix counts), so once every earlier entry
    /// is on the primary, its range is read back from the primary into the entry and committed:
    /// a write of the current content, which changes nothing. Its WriteId still completes.
    pub fn abort_write(&mut self, _now_us: u64, slot: WriteSlot) {
        self.aborted.push(slot.entry);
        self.apply_committed();
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

    /// Reads from the primary namespace (which holds every committed write).
    pub fn read(&mut self, nsid: u32, lba: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        self.check_range(nsid, lba, buf.len() as u64)
            .map_err(|refused| match refused {
                WriteRefused::InvalidNamespace => ReadError::InvalidNamespace,
                WriteRefused::OutOfRange => ReadError::OutOfRange,
                _ => ReadError::InvalidLength,
            })?;
        self.primaries[nsid as usize - 1]
            .read_at(lba * SECTOR_SIZE as u64, buf)
            .map_err(|error| ReadError::Device(error.kind()))
    }

    fn check_range(&self, nsid: u32, lba: u64, length_bytes: u64) -> Result<(), WriteRefused> {
        if nsid == 0 || nsid as usize > self.primaries.len() {
            return Err(WriteRefused::InvalidNamespace);
        }
        if length_bytes == 0 || !length_bytes.is_multiple_of(SECTOR_SIZE as u64) {
            return Err(WriteRefused::InvalidLength);
        }
        let size = self.primaries[nsid as usize - 1].size_bytes();
        let end = lba
            .checked_mul(SECTOR_SIZE as u64)
            .and_then(|start| start.checked_add(length_bytes));
        match end {
            Some(end) if end <= size => Ok(()),
            _ => Err(WriteRefused::OutOfRange),
        }
    }

    fn reserve_entry(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
        zeroes: bool,
    ) -> Result<EntrySlot, WriteRefused> {
        for _ in 0..2 {
            let cp_number = self.active_cp;
            let half = half_of_cp(cp_number);
            let blocks = {
                let (first, end) = LoggedWrite {
                    nsid,
                    lba,
                    length_bytes,
                    zeroes,
                    table_index: 0,
                    offset_in_transfer: 0,
                }
                .block_range();
                (end - first) as usize
            };
            let request = EntryRequest {
                cp_number,
                transfer_id: 0,
                nsid,
                lba,
                length_bytes,
                zeroes,
            };
            if blocks <= self.cps[half].dirty.free() {
                let transfer_id = self.transfer_for_next_entry(half, length_bytes, zeroes);
                if let Ok(entry) = self.ring.reserve(&EntryRequest {
                    transfer_id,
                    ..request
                }) {
                    self.note_reserved(half, &entry);
                    return Ok(entry);
                }
            }
            self.cps[half].full = true;
            if !self.try_freeze(now_us) {
                break;
            }
        }
        self.counters.backpressure_count += 1;
        Err(WriteRefused::Backpressure)
    }

    /// The transfer the next entry of `half` joins (opening a new one when the open one is full).
    fn transfer_for_next_entry(&mut self, half: usize, length_bytes: u32, zeroes: bool) -> u64 {
        let data_bytes = if zeroes { 0 } else { length_bytes };
        let state = &mut self.cps[half];
        if state.open_transfer {
            let record = state.transfers.get(state.transfers.len() - 1);
            let fits = (record.entry_count as usize) < TRANSFER_ENTRIES_MAX
                && record.data_bytes as usize + data_bytes as usize <= TRANSFER_DATA_BYTES_MAX;
            if fits {
                return record.id.0;
            }
            state.close_open_transfer();
        }
        self.next_transfer_id
    }

    fn note_reserved(&mut self, half: usize, entry: &EntrySlot) {
        let header = *entry.header();
        let state = &mut self.cps[half];
        if state.phase == CpPhase::Free {
            state.activate(header.cp_number);
        }
        if !state.open_transfer {
            assert_eq!(header.transfer_id, self.next_transfer_id);
            self.next_transfer_id += 1;
            state.transfers.push(TransferRecord {
                id: TransferId(header.transfer_id),
                first_seq: header.seq,
                first_slot: entry.slot(),
                entry_count: 0,
                data_bytes: 0,
                base_offset: round_down(u64::from(header.data_offset), BLOCK_SIZE as u64) as u32,
            });
            state.open_transfer = true;
        }
        let table_index = state.transfers.len() - 1;
        let record = state.transfers.get_mut(table_index);
        assert_eq!(record.id.0, header.transfer_id);
        assert_eq!(record.first_seq + u64::from(record.entry_count), header.seq);
        record.entry_count += 1;
        record.data_bytes += header.data_bytes();
        let write = logged_write(&header, table_index, record.base_offset);
        state
            .dirty
            .note_write(&write)
            .expect("dirty map capacity checked before reserving");
    }

    /// Applies newly committed entries to the primaries in global seq order: the committed
    /// prefix of the older half, and the newer half's only once the older one is all applied.
    fn apply_committed(&mut self) {
        for half in self.halves_in_order() {
            while self.cps[half].applied_slots < self.ring.committed_slots(half) {
                let header = self.ring.entry_header(half, self.cps[half].applied_slots);
                if let Err(error) =
                    apply_entry(&self.ring, &mut self.primaries, &self.zero_block, &header)
                {
                    self.fail_device(format!("primary namespace {}: {error}", header.nsid));
                }
                self.cps[half].applied_slots += 1;
            }
            let next = self.cps[half].applied_slots;
            if let Some(index) = self
                .aborted
                .iter()
                .position(|e| e.half() == half && e.slot() == next)
            {
                self.commit_aborted(index);
                return self.apply_committed();
            }
            if self.cps[half].applied_slots < self.ring.reserved_slots(half) {
                return;
            }
        }
    }

    /// Commits aborted entry `index` with the primary's current content of its range.
    fn commit_aborted(&mut self, index: usize) {
        let entry = self.aborted.swap_remove(index);
        let header = *entry.header();
        let primary = &mut self.primaries[header.nsid as usize - 1];
        if let Err(error) = primary.read_at(header.offset_bytes(), self.ring.data_mut(&entry)) {
            self.fail_device(format!(
                "primary namespace {}: read for an aborted write: {error}",
                header.nsid
            ));
        }
        self.ring.commit(&entry);
    }

    fn fail_device(&mut self, text: String) {
        log::error!("source: {text}; consistency points stop");
        if !self.device_failed {
            self.device_failed = true;
            self.events.push_back(SourceEvent::DeviceFailed(text));
        }
    }

    // ---- link -------------------------------------------------------------------------

    /// The link is up: queue Hello.
    pub fn handle_connected(&mut self, _now_us: u64) {
        self.out.clear();
        self.reset_session();
        self.link = LinkState::HelloSent;
        let hello = self.hello();
        let control = Control::Hello(&hello);
        let length = control.encoded_bytes();
        self.out
            .push_inline(length, |bytes| control.encode(bytes))
            .expect("an empty queue holds a Hello");
    }

    /// The link is down: drop the send queue; everything unacknowledged is resent after the
    /// next HelloAck.
    pub fn handle_disconnected(&mut self, _now_us: u64) {
        self.out.clear();
        self.reset_session();
        if self.link != LinkState::Rejected {
            self.link = LinkState::Down;
        }
    }

    fn reset_session(&mut self) {
        for state in &mut self.cps {
            state.reset_session();
        }
    }

    fn hello(&self) -> Hello {
        let mut namespace_sizes_bytes = [0; crate::geometry::NAMESPACES_MAX];
        for (size, primary) in namespace_sizes_bytes.iter_mut().zip(&self.primaries) {
            *size = primary.size_bytes();
        }
        Hello {
            protocol_version: u32::from(wire::PROTOCOL_VERSION),
            block_size: BLOCK_SIZE as u32,
            sector_size: SECTOR_SIZE as u32,
            mode: self.config.mode,
            volume_id: self.config.volume_id,
            epoch: self.ring.superblock().epoch,
            cp_completed: self.ring.superblock().cp_completed,
            geometry: self.ring.geometry(),
            namespace_count: self.primaries.len() as u8,
            namespace_sizes_bytes,
        }
    }

    /// Handles one whole framed message from the destination.
    pub fn handle_message(&mut self, now_us: u64, message: &[u8]) -> Result<(), LinkError> {
        self.counters.wire_bytes_total += message.len() as u64;
        self.counters.ack_bytes += message.len() as u64;
        match (self.link, wire::decode(message)?) {
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
                LinkState::HelloSent,
                Message::HelloAck {
                    cp_completed,
                    epoch,
                },
            ) => self.on_hello_ack(now_us, cp_completed, epoch),
            (LinkState::Ready, Message::TransferAck { transfer_id }) => {
                self.on_transfer_ack(transfer_id)
            }
            (LinkState::Ready, Message::CpAck { cp_number }) => self.on_cp_ack(now_us, cp_number),
            (state, message) => Err(LinkError::Unexpected {
                message: message_name(&message),
                state: link_state_name(state),
            }),
        }
    }

    fn on_hello_ack(
        &mut self,
        now_us: u64,
        destination_cp: u64,
        epoch: u64,
    ) -> Result<(), LinkError> {
        let superblock = *self.ring.superblock();
        if epoch != superblock.epoch {
            return Err(LinkError::Protocol(format!(
                "HelloAck epoch {epoch} != ours {}",
                superblock.epoch
            )));
        }
        if destination_cp == superblock.cp_completed + 1 {
            // The destination applied and recorded CP c+1 but its CpAck was lost: it is durable on
            // both sides (our primary was flushed before the CP was sent, or at recovery).
            let half = half_of_cp(destination_cp);
            let state = &self.cps[half];
            if state.cp_number != destination_cp
                || matches!(state.phase, CpPhase::Free | CpPhase::Active)
            {
                return Err(LinkError::Protocol(format!(
                    "destination completed cp {destination_cp} we never committed"
                )));
            }
            self.complete_cp(now_us, destination_cp);
        } else if destination_cp != superblock.cp_completed {
            return Err(LinkError::Protocol(format!(
                "destination cp {destination_cp} vs ours {}",
                superblock.cp_completed
            )));
        }
        self.link = LinkState::Ready;
        self.events.push_back(SourceEvent::LinkReady);
        self.send_transfers();
        Ok(())
    }

    /// The halves in send order: the CP in flight (if any) first, then the active one.
    fn halves_in_order(&self) -> [usize; 2] {
        let active = half_of_cp(self.active_cp);
        [1 - active, active]
    }

    fn on_transfer_ack(&mut self, transfer_id: TransferId) -> Result<(), LinkError> {
        let mut matched = false;
        for half in self.halves_in_order() {
            while let Some(record) = self.cps[half].next_unacked_sent() {
                if record.id > transfer_id {
                    break;
                }
                self.cps[half].acked_count += 1;
                matched |= record.id == transfer_id;
                self.complete_writes(half, &record);
            }
        }
        if matched {
            Ok(())
        } else {
            Err(LinkError::Protocol(format!(
                "ack of transfer {} that is not awaiting an ack",
                transfer_id.0
            )))
        }
    }

    /// Emits WriteCompleted for the writes of an acknowledged transfer (invariant 1).
    fn complete_writes(&mut self, half: usize, record: &TransferRecord) {
        let last_seq = record.first_seq + u64::from(record.entry_count) - 1;
        assert!(
            record.first_slot + record.entry_count <= self.ring.committed_slots(half),
            "acked entries are in the ring"
        );
        let first = record
            .first_seq
            .max(self.completed_through_seq + 1)
            .max(self.recovered_seq_end);
        for seq in first..=last_seq {
            self.events
                .push_back(SourceEvent::WriteCompleted(WriteId(seq)));
        }
        self.completed_through_seq = self.completed_through_seq.max(last_seq);
    }

    fn on_cp_ack(&mut self, now_us: u64, cp_number: u64) -> Result<(), LinkError> {
        let half = half_of_cp(cp_number.max(1));
        let state = &self.cps[half];
        if state.cp_number != cp_number || state.phase != CpPhase::AwaitingCpAck {
            return Err(LinkError::Protocol(format!(
                "CpAck for cp {cp_number} that is not awaiting one"
            )));
        }
        self.complete_cp(now_us, cp_number);
        Ok(())
    }

    /// CP `cp_number` is durable on both sides: record it, then release its half (invariant 3).
    fn complete_cp(&mut self, now_us: u64, cp_number: u64) {
        let half = half_of_cp(cp_number);
        let state = &mut self.cps[half];
        assert!(
            state.flushed,
            "the primary is durable before a CP completes"
        );
        assert_eq!(state.cp_number, cp_number);
        let duration_us = now_us.saturating_sub(state.frozen_us);
        self.ring
            .record_cp_completed(cp_number, self.next_transfer_id);
        self.ring.release_half(half);
        state.release();
        self.counters.record_cp_duration(duration_us);
        self.counters.ring_used_bytes = self.ring.used_bytes();
        self.events.push_back(SourceEvent::CpCompleted {
            cp_number,
            duration_us,
        });
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
    }

    pub fn tx_pending_bytes(&self) -> u64 {
        self.out.pending_bytes()
    }

    // ---- time and CPs -----------------------------------------------------------------

    /// Cheap, every reactor loop: closes the open transfer, starts a CP on timer / request /
    /// full half, sends ready transfers, advances the CP in flight.
    pub fn handle_tick(&mut self, now_us: u64) {
        let active = half_of_cp(self.active_cp);
        self.cps[active].close_open_transfer();
        let state = &self.cps[active];
        let timer_due = now_us.saturating_sub(state.started_us) >= self.config.cp_interval_us;
        if self.ring.reserved_slots(active) == 0 {
            self.cp_requested = false;
        } else if state.full || self.cp_requested || timer_due {
            self.try_freeze(now_us);
        }
        self.send_transfers();
        self.advance_cp(now_us);
        self.counters.ring_used_bytes = self.ring.used_bytes();
    }

    /// Asks for a CP as soon as possible (no-op when nothing was written).
    pub fn request_cp(&mut self, _now_us: u64) {
        self.cp_requested = true;
    }

    /// Freezes the active CP and opens the next one, if the next half is free.
    fn try_freeze(&mut self, now_us: u64) -> bool {
        let active = half_of_cp(self.active_cp);
        if self.cps[1 - active].phase != CpPhase::Free || self.cps[active].phase != CpPhase::Active
        {
            return false;
        }
        self.cps[active].freeze(now_us);
        self.cp_requested = false;
        self.active_cp += 1;
        self.cps[1 - active].activate(self.active_cp);
        self.cps[1 - active].started_us = now_us;
        true
    }

    /// Queues closed, fully committed transfers in order (the CP in flight first).
    fn send_transfers(&mut self) {
        if self.link != LinkState::Ready {
            return;
        }
        for half in self.halves_in_order() {
            while let Some(index) = self.cps[half].next_unsent_closed() {
                let record = *self.cps[half].transfers.get(index);
                if record.first_slot + record.entry_count > self.ring.committed_slots(half) {
                    return;
                }
                let prefix = wire::transfer_prefix_bytes(record.entry_count as usize);
                if !self.out.can_push(prefix, 1 + record.entry_count as usize) {
                    return;
                }
                self.queue_transfer(half, &record);
                self.cps[half].sent_count += 1;
            }
            if self.cps[half].has_unsent() {
                return;
            }
        }
    }

    fn queue_transfer(&mut self, half: usize, record: &TransferRecord) {
        self.wire_entries.clear();
        for slot in record.first_slot..record.first_slot + record.entry_count {
            let header = self.ring.entry_header(half, slot);
            assert_eq!(header.transfer_id, record.id.0);
            self.wire_entries.push(WireEntry {
                nsid: header.nsid,
                flags: header.flags,
                length_bytes: header.length_bytes,
                lba: header.lba,
                data_offset: header.data_offset,
                data_crc: header.data_crc,
            });
        }
        let header = TransferHeader {
            transfer_id: record.id,
            cp_number: self.cps[half].cp_number,
            first_seq: record.first_seq,
            entry_count: record.entry_count,
        };
        let prefix = wire::transfer_prefix_bytes(self.wire_entries.len());
        let (start, _) = self
            .out
            .alloc_inline(prefix)
            .expect("checked with can_push");
        wire::encode_transfer_prefix(
            self.out.inline_mut(start, prefix),
            &header,
            &self.wire_entries,
            record.data_bytes as usize,
        );
        self.out.push(Segment::Inline {
            start: start as u32,
            len: prefix as u32,
        });
        let data_area = self.ring.geometry().data_area_offset(half);
        for entry in self.wire_entries.iter().filter(|e| !e.is_zeroes()) {
            self.out.push(Segment::Ring {
                offset: data_area + u64::from(entry.data_offset),
                len: entry.length_bytes,
            });
        }
        self.counters.transfer_count += 1;
        self.counters.transfer_bytes += (prefix + record.data_bytes as usize) as u64;
    }

    /// Moves the CP in flight along: flush once all its transfers are acked, then descriptor
    /// tables as the send queue has room, then CpCommit.
    fn advance_cp(&mut self, _now_us: u64) {
        let half = 1 - half_of_cp(self.active_cp);
        if self.link != LinkState::Ready || self.device_failed {
            return;
        }
        if self.cps[half].phase == CpPhase::Frozen && self.cps[half].all_acked() {
            assert_eq!(
                self.cps[half].applied_slots,
                self.ring.reserved_slots(half),
                "acked entries are applied"
            );
            if !self.cps[half].flushed {
                for nsid in 0..self.primaries.len() {
                    if let Err(error) = self.primaries[nsid].flush() {
                        self.fail_device(format!("primary namespace {}: flush: {error}", nsid + 1));
                        return;
                    }
                }
                self.cps[half].flushed = true;
            }
            let cp_number = self.cps[half].cp_number;
            self.cps[half].phase = CpPhase::Committing;
            self.cps[half].planner = Some(ConsistencyPoint::new(cp_number, self.config.mode));
        }
        while self.cps[half].phase == CpPhase::Committing {
            if !self.queue_next_table(half) {
                return;
            }
        }
    }

    /// Queues the next DescriptorTable (or the CpCommit); false if the queue is full.
    fn queue_next_table(&mut self, half: usize) -> bool {
        let state = &self.cps[half];
        let planner = state
            .planner
            .as_ref()
            .expect("committing CPs have a planner");
        let Some(extent) = planner.next_table(&state.dirty, &state.transfers) else {
            let commit = Control::CpCommit {
                cp_number: state.cp_number,
                descriptor_count: planner.emitted() as u64,
            };
            let length = commit.encoded_bytes();
            if self
                .out
                .push_inline(length, |bytes| commit.encode(bytes))
                .is_err()
            {
                return false;
            }
            self.cps[half].phase = CpPhase::AwaitingCpAck;
            return true;
        };
        self.table_entries.clear();
        for index in extent.first..extent.first + extent.count {
            let entry = planner.plan(&state.dirty, &state.transfers, index);
            if let Descriptor::Reference { transfer_id, .. } = entry.descriptor {
                // Invariant 2: the destination holds that transfer (acked in this session).
                assert!(
                    state.transfer_acked(transfer_id),
                    "reference to an unacknowledged transfer"
                );
            }
            self.table_entries.push(entry);
        }
        let length = wire::table_bytes(self.table_entries.iter().map(|e| e.descriptor));
        if !self.out.can_push(length, 1) {
            return false;
        }
        let cp_number = state.cp_number;
        let (start, mark) = self
            .out
            .alloc_inline(length)
            .expect("checked with can_push");
        let message = self.out.inline_mut(start, length);
        let mut at = wire::encode_table_prefix(message, cp_number, &self.table_entries);
        let mut failure = None;
        for entry in self
            .table_entries
            .iter()
            .filter(|e| e.descriptor == Descriptor::Data)
        {
            let offset = entry.block_index * BLOCK_SIZE as u64;
            let primary = &mut self.primaries[entry.nsid as usize - 1];
            if let Err(error) = primary.read_at(offset, &mut message[at..at + BLOCK_SIZE]) {
                failure = Some(format!(
                    "primary namespace {}: read for CP: {error}",
                    entry.nsid
                ));
                break;
            }
            at += BLOCK_SIZE;
        }
        if let Some(text) = failure {
            self.out.undo_alloc(mark);
            self.fail_device(text);
            return false;
        }
        wire::seal_message(message);
        self.out.push(Segment::Inline {
            start: start as u32,
            len: length as u32,
        });
        self.count_descriptors();
        self.cps[half]
            .planner
            .as_mut()
            .expect("committing")
            .advance(&extent);
        true
    }

    fn count_descriptors(&mut self) {
        for entry in &self.table_entries {
            let size = wire::descriptor_bytes(&entry.descriptor) as u64;
            match entry.descriptor {
                Descriptor::Reference { .. } => {
                    self.counters.cp_reference_count += 1;
                    self.counters.cp_reference_bytes += size;
                    self.counters.bytes_saved_by_references += BLOCK_SIZE as u64 - size;
                }
                Descriptor::Data => {
                    self.counters.cp_data_blocks += 1;
                    self.counters.cp_data_bytes += size + BLOCK_SIZE as u64;
                }
                Descriptor::Zeroes => self.counters.cp_zeroes_count += 1,
            }
        }
    }

    /// Takes the next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Nothing pending: no unreleased entries, nothing queued to send.
    pub fn is_idle(&self) -> bool {
        self.ring.reserved_slots(0) == 0
            && self.ring.reserved_slots(1) == 0
            && self.out.pending_bytes() == 0
    }

    /// When `handle_tick` next has timed work (the CP timer), if any.
    pub fn next_deadline_us(&self) -> Option<u64> {
        let active = half_of_cp(self.active_cp);
        (self.ring.reserved_slots(active) > 0).then(|| {
            self.cps[active]
                .started_us
                .saturating_add(self.config.cp_interval_us)
        })
    }

    /// The size of each namespace (index nsid - 1).
    pub fn namespace_sizes_bytes(&self) -> &[u64] {
        &self.namespace_sizes_bytes
    }

    pub fn volume_id(&self) -> [u8; 16] {
        self.config.volume_id
    }

    /// The last CP durable on both sides.
    pub fn cp_completed(&self) -> u64 {
        self.ring.superblock().cp_completed
    }

    /// Gives back the ring memory and primaries (a crash, or an orderly stop).
    pub fn into_parts(self) -> (M, Vec<D>) {
        (self.ring.into_memory(), self.primaries)
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

/// Writes one entry to its namespace (data from the ring, or zeroes).
pub(crate) fn apply_entry<M: RingStore, D: BlockDevice>(
    ring: &NvramRing<M>,
    devices: &mut [D],
    zero_block: &[u8],
    header: &EntryHeader,
) -> std::io::Result<()> {
    let device = &mut devices[header.nsid as usize - 1];
    if !header.is_zeroes() {
        return device.write_at(header.offset_bytes(), ring.data(header));
    }
    let mut offset = header.offset_bytes();
    let end = offset + u64::from(header.length_bytes);
    while offset < end {
        let chunk = (end - offset).min(zero_block.len() as u64) as usize;
        device.write_at(offset, &zero_block[..chunk])?;
        offset += chunk as u64;
    }
    Ok(())
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
    }
}

fn link_state_name(state: LinkState) -> &'static str {
    match state {
        LinkState::Down => "link down",
        LinkState::HelloSent => "awaiting HelloAck",
        LinkState::Ready => "ready",
        LinkState::Rejected => "rejected",
    }
}

#[cfg(test)]
mod tests;
