//! The source's per-CP state: its transfer ID structure and dirty map (claim 14), where its
//! transfers stand on the link, and where the CP itself stands. One per ring half, allocated at
//! start and reused.

use crate::cp::{ConsistencyPoint, CpMode};
use crate::transfer::{DirtyMap, TransferId, TransferRecord, TransferTable};

/// DescriptorTables a source sends ahead of the destination's TableAcks: the destination then
/// stages at most this many tables' Data blocks while its mirror writes are in flight, and never
/// has to stop reading the link (which carries the next CP's transfers) for a slow mirror.
pub const TABLE_WINDOW: u64 = 2;

/// Where the flush of a CP's primary writes stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlushState {
    NotStarted,
    /// Flush ops in flight (one per namespace).
    InFlight {
        remaining: u32,
    },
    Done,
}

/// Where a CP stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CpPhase {
    /// The half is not in use.
    Free,
    /// Host writes go here.
    Active,
    /// No more writes; waiting for every transfer to be acknowledged.
    Frozen,
    /// Primary flushed; descriptor tables are being queued (at most [`TABLE_WINDOW`] ahead of
    /// the destination's TableAcks).
    Committing,
    /// CpCommit queued; waiting for CpAck.
    AwaitingCpAck,
}

#[derive(Debug)]
pub(super) struct CpState {
    pub cp_number: u64,
    pub phase: CpPhase,
    pub transfers: TransferTable,
    pub dirty: DirtyMap,
    /// The last transfer still takes entries.
    pub open_transfer: bool,
    /// Transfers queued on this link session (a prefix of the table).
    pub sent_count: u32,
    /// Transfers acknowledged on this link session (a prefix of the sent ones).
    pub acked_count: u32,
    /// Transfers the destination acknowledged on any session (a prefix of the table): it holds
    /// them in its log unless it lost it.
    pub acked_ever: u32,
    /// Entries written to the primaries (a prefix of the half's slots).
    pub applied_slots: u32,
    pub started_us: u64,
    pub frozen_us: u64,
    /// The half or the dirty map ran out of room: freeze as soon as possible.
    pub full: bool,
    /// The primaries were flushed after every entry of this CP landed.
    pub flush: FlushState,
    /// A flush of the attempt in flight failed: the CP flushes again after the back-off.
    pub flush_failed: bool,
    pub planner: Option<ConsistencyPoint>,
    /// Some dirty block of this CP travels as Data, read from the primary: until the CP is
    /// complete, a later CP's write must not reach those blocks (invariant 7).
    pub reads_primary: bool,
    /// DescriptorTables queued on this session, and acknowledged by the destination.
    pub tables_sent: u64,
    pub tables_acked: u64,
    /// The seq of the half's first entry (slot 0); seqs are consecutive along the half.
    pub first_seq: u64,
    /// Rebuilt from the ring at start (its primary was flushed before the crash, if it was sent).
    pub recovered: bool,
    /// The destination said it completed this CP: it completes once the primary is flushed.
    pub mirrored: bool,
}

impl CpState {
    pub fn new(transfers_max: usize, dirty_blocks_max: usize) -> Self {
        Self {
            cp_number: 0,
            phase: CpPhase::Free,
            transfers: TransferTable::with_capacity(transfers_max),
            dirty: DirtyMap::with_capacity(dirty_blocks_max),
            open_transfer: false,
            sent_count: 0,
            acked_count: 0,
            acked_ever: 0,
            applied_slots: 0,
            started_us: 0,
            frozen_us: 0,
            full: false,
            flush: FlushState::NotStarted,
            flush_failed: false,
            planner: None,
            reads_primary: false,
            tables_sent: 0,
            tables_acked: 0,
            first_seq: 0,
            recovered: false,
            mirrored: false,
        }
    }

    pub fn activate(&mut self, cp_number: u64) {
        assert_eq!(self.phase, CpPhase::Free);
        assert!(self.transfers.is_empty() && self.dirty.is_empty());
        self.cp_number = cp_number;
        self.phase = CpPhase::Active;
    }

    pub fn close_open_transfer(&mut self) {
        self.open_transfer = false;
    }

    pub fn freeze(&mut self, now_us: u64, mode: CpMode) {
        assert_eq!(self.phase, CpPhase::Active);
        self.close_open_transfer();
        self.phase = CpPhase::Frozen;
        self.frozen_us = now_us;
        self.full = false;
        self.dirty.settle();
        self.reads_primary =
            (0..self.dirty.len()).any(|index| mode.reads_primary(self.dirty.get(index).2));
    }

    /// A later CP's write to `block_index` of `nsid` must wait: this CP still has to read the
    /// block from the primary as Data.
    pub fn holds_block(&self, mode: CpMode, nsid: u32, block_index: u64) -> bool {
        self.reads_primary
            && self.phase != CpPhase::Active
            && self
                .dirty
                .lookup(nsid, block_index)
                .is_some_and(|buffer| mode.reads_primary(buffer))
    }

    /// Forgets the CP (it is durable on both sides).
    pub fn release(&mut self) {
        self.transfers.clear();
        self.dirty.clear();
        self.cp_number = 0;
        self.phase = CpPhase::Free;
        self.open_transfer = false;
        self.sent_count = 0;
        self.acked_count = 0;
        self.acked_ever = 0;
        self.applied_slots = 0;
        self.started_us = 0;
        self.frozen_us = 0;
        self.full = false;
        self.flush = FlushState::NotStarted;
        self.flush_failed = false;
        self.planner = None;
        self.reads_primary = false;
        self.first_seq = 0;
        self.recovered = false;
        self.mirrored = false;
        self.tables_sent = 0;
        self.tables_acked = 0;
    }

    /// A new link session: the destination starts over, so everything is resent and the CP's
    /// descriptors are planned again.
    pub fn reset_session(&mut self) {
        // A CP the destination completed is never sent again.
        let held = if self.mirrored {
            self.transfers.len()
        } else {
            0
        };
        self.sent_count = held;
        self.acked_count = held;
        self.restart_tables();
    }

    /// The CP's descriptors are planned and sent again from the first (a new session, or the
    /// destination failed the CP).
    pub fn restart_tables(&mut self) {
        if matches!(self.phase, CpPhase::Committing | CpPhase::AwaitingCpAck) {
            self.phase = CpPhase::Frozen;
            self.planner = None;
        }
        self.tables_sent = 0;
        self.tables_acked = 0;
    }

    fn closed_count(&self) -> u32 {
        self.transfers.len() - u32::from(self.open_transfer)
    }

    /// The table index of the next closed transfer to send.
    pub fn next_unsent_closed(&self) -> Option<u32> {
        (self.sent_count < self.closed_count()).then_some(self.sent_count)
    }

    /// Some transfer (closed or open) has not been sent yet.
    pub fn has_unsent(&self) -> bool {
        self.sent_count < self.transfers.len()
    }

    /// The oldest sent transfer still awaiting its ack.
    pub fn next_unacked_sent(&self) -> Option<TransferRecord> {
        (self.acked_count < self.sent_count).then(|| *self.transfers.get(self.acked_count))
    }

    /// Every transfer of the CP is closed and acknowledged on this session.
    pub fn all_acked(&self) -> bool {
        !self.open_transfer && self.acked_count == self.transfers.len()
    }

    /// `transfer_id` is one of this CP's transfers sent on this session and not acknowledged yet.
    pub fn awaiting_ack(&self, transfer_id: TransferId) -> bool {
        self.transfers
            .index_of(transfer_id)
            .is_some_and(|index| (self.acked_count..self.sent_count).contains(&index))
    }

    /// `transfer_id` is one of this CP's transfers acknowledged on this session.
    pub fn transfer_acked(&self, transfer_id: TransferId) -> bool {
        self.transfers
            .index_of(transfer_id)
            .is_some_and(|index| index < self.acked_count)
    }
}
