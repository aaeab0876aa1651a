//! Degraded writes and the resync (invariant 9; DRBD's bitmap resync is the model, with the
//! patent's references applied to it).
//!
//! Degrade. Under `peer_loss_policy = "degrade"` a lost peer does not stop the volume: the source
//! takes a new generation (unless its bitmap already counts changes since the peer's), marks the
//! extents of every entry still in the ring (the peer may lack any of them), and from then on
//! marks every committed write's extents. A write completes once it is committed and its mark is
//! durable in the node metadata ([`crate::metadata`]); a frozen CP completes once its entries
//! landed on the primary and were flushed, without the destination. Entries whose transfer the
//! destination had acknowledged are remembered as references (a block's latest content is in a
//! transfer the destination holds); a later write to the block forgets it.
//!
//! Resync. When the peer returns behind us (its current generation is our bitmap's base, or it
//! holds nothing: the initial sync), the handshake settles on a resync: every marked extent is
//! sent in ResyncTables, one table in flight at a time, each answered once the destination wrote
//! and flushed it. References go first, before any transfer of the new session (the new
//! session's transfers overwrite the destination's old log); the rest is read from the primary
//! as device ops. Host writes are synchronous again as soon as the references are through.
//! Ordering: a ResyncTable is staged only while no CP is being committed or ready to commit,
//! and a CP commits only while no ResyncTable is staged or unacknowledged; each side applies in
//! arrival order. So a host write newer than a resync read reaches the mirror in a CP after that
//! read's table, and older resync data never overwrites it. An extent's bit is cleared once its
//! table is acknowledged. At the end the destination takes our generation (ResyncDone) and the
//! bitmap counts nothing again.

use std::collections::{HashMap, VecDeque};

use super::cp_state::{CpPhase, FlushState};
use super::{LinkState, Source, SourceEvent, WriteId};
use crate::cp::{Descriptor, DescriptorEntry};
use crate::device::{DeviceError, DeviceOp, DeviceRequest};
use crate::error::{LinkError, ProtocolError};
use crate::generation::{Hex, ResyncKind};
use crate::geometry::{
    half_of_cp, BLOCK_SIZE, DESCRIPTORS_PER_TABLE, SECTOR_SIZE as SECTOR, TABLE_DATA_BLOCKS_MAX,
};
use crate::liveness::PeerLostReason;
use crate::ring::RingStore;
use crate::transfer::TransferId;
use crate::wire::{self, Control, MessageKind, Segment};

use super::apply::{SourceOp, DEVICE_RETRY_BACKOFF_US};

/// How often resync progress is logged.
pub const RESYNC_PROGRESS_LOG_US: u64 = 5_000_000;

/// A block's latest content in a transfer the destination acknowledged: (transfer, block).
type LogReference = (TransferId, u32);

/// A resync in progress, as a runtime publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncStatus {
    pub kind: ResyncKind,
    /// When it started, on the clock of `handle_tick`.
    pub started_us: u64,
    /// Bytes of the extents resynced so far (their bits are clear), and of those marked when it
    /// started. Extents marked while it runs add to `bytes_done` but not to `bytes_total`.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The references into the destination's old log are through (host writes flow again).
    pub references_done: bool,
}

impl ResyncStatus {
    /// Percent done (at most 100), MiB/s since the start, and the seconds left at that rate
    /// (`None` before any byte was resynced).
    pub fn rates(&self, now_us: u64) -> (f64, f64, Option<f64>) {
        let percent = (100.0 * self.bytes_done as f64 / self.bytes_total.max(1) as f64).min(100.0);
        let elapsed_s = now_us.saturating_sub(self.started_us) as f64 / 1e6;
        let bytes_per_s = self.bytes_done as f64 / elapsed_s.max(1e-6);
        let left = self.bytes_total.saturating_sub(self.bytes_done) as f64;
        let eta_s = (bytes_per_s > 0.0).then(|| left / bytes_per_s);
        (percent, bytes_per_s / (1 << 20) as f64, eta_s)
    }
}

/// Writes go on without the destination.
#[derive(Debug)]
pub(super) struct Degrade {
    /// Every committed entry up to this seq has its extents marked.
    marked_through_seq: u64,
    /// Marked writes whose mark is not durable yet: (seq, mark sequence), in seq order.
    waiting: VecDeque<(u64, u64)>,
    /// The metadata change that took the new generation (nothing completes before it is durable).
    generation_seq: u64,
}

/// Where the resync stands.
#[derive(Debug)]
pub(super) struct Resync {
    kind: ResyncKind,
    /// The next bitmap bit to look at.
    cursor_bit: u64,
    /// References are all acknowledged: transfers flow (the destination's old log may go).
    references_done: bool,
    /// The destination's last ResyncMarks came: its own changed extents are marked here too.
    marks_done: bool,
    /// The table being read or sent: its descriptors and the extents it covers.
    entries: Vec<DescriptorEntry>,
    extents: Vec<(u32, u64, u64)>,
    /// Data blocks of the table (one per Data descriptor, in order).
    blocks: Vec<u8>,
    data: Vec<(u32, u64)>,
    reads_submitted: usize,
    reads_completed: usize,
    read_failed: bool,
    /// Bumped per table: reads of a dropped table are told apart.
    generation: u32,
    /// The table is queued and awaits its ResyncAck.
    awaiting: Option<u64>,
    next_number: u64,
    retry_at_us: u64,
    done_sent: bool,
    started_us: u64,
    bytes_total: u64,
    bytes_done: u64,
    last_log_us: u64,
    /// Rate limit: the bytes sent may not run ahead of `rate × elapsed`.
    rate_bytes_per_s: u64,
    /// Every entry a resync read may have seen on the primary (and every degraded write) has a
    /// seq up to this one: ResyncDone waits until all of them are in completed CPs, so the mirror
    /// it declares consistent is the primary as of a CP end, holding every completed write.
    seen_through_seq: u64,
}

impl Resync {
    /// `generation`: the first table generation, past every one an earlier resync used (its
    /// reads may still be in flight).
    fn new(
        kind: ResyncKind,
        now_us: u64,
        bytes_total: u64,
        rate_bytes_per_s: u64,
        generation: u32,
        seen_through_seq: u64,
    ) -> Self {
        Resync {
            kind,
            cursor_bit: 0,
            references_done: false,
            marks_done: false,
            entries: Vec::with_capacity(DESCRIPTORS_PER_TABLE),
            extents: Vec::with_capacity(DESCRIPTORS_PER_TABLE),
            blocks: vec![0; TABLE_DATA_BLOCKS_MAX * BLOCK_SIZE],
            data: Vec::with_capacity(TABLE_DATA_BLOCKS_MAX),
            reads_submitted: 0,
            reads_completed: 0,
            read_failed: false,
            generation,
            awaiting: None,
            next_number: 1,
            retry_at_us: 0,
            done_sent: false,
            started_us: now_us,
            bytes_total,
            bytes_done: 0,
            last_log_us: now_us,
            rate_bytes_per_s,
            seen_through_seq,
        }
    }

    fn staged(&self) -> bool {
        !self.entries.is_empty()
    }

    fn status(&self) -> ResyncStatus {
        ResyncStatus {
            kind: self.kind,
            started_us: self.started_us,
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
            references_done: self.references_done,
        }
    }

    fn drop_table(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.entries.clear();
        self.extents.clear();
        self.data.clear();
        self.reads_submitted = 0;
        self.reads_completed = 0;
        self.read_failed = false;
        self.awaiting = None;
    }
}

/// splitmix64: the engine's generations come from the runtime's seed, deterministically.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<M: RingStore> Source<M> {
    /// A random non-zero generation no side holds.
    fn fresh_generation(&mut self) -> u64 {
        loop {
            let generation = next_random(&mut self.random_state);
            let ours = self.metadata.generations();
            if generation != 0 && generation != ours.current && !ours.in_history(generation) {
                return generation;
            }
        }
    }

    /// Writes are degraded (complete without the destination).
    pub fn is_degraded(&self) -> bool {
        self.degrade.is_some()
    }

    /// The resync in progress: (bytes done, bytes total), if one runs.
    pub fn resync_progress(&self) -> Option<(u64, u64)> {
        self.resync
            .as_ref()
            .map(|resync| (resync.bytes_done, resync.bytes_total))
    }

    /// The resync in progress as `nvmirror status` shows it, if one runs.
    pub fn resync_status(&self) -> Option<ResyncStatus> {
        self.resync.as_ref().map(Resync::status)
    }

    /// The peer is lost under `degrade`: a new generation, every entry in the ring marked, the
    /// references the destination can still resolve noted; writes complete once marked.
    pub(super) fn enter_degrade(&mut self, now_us: u64) {
        assert!(self.degrade.is_none());
        if self.metadata.generations().current == 0 {
            // No handshake ever settled here. A peer that took our proposal (a first handshake
            // whose half here was lost in a crash) holds it: the bitmap counts changes since it.
            // A fresh peer gets a full sync: these devices are no longer identical.
            let proposed = self.metadata.proposed_generation();
            log::warn!(
                "source: degraded before any handshake settled; taking the proposed generation \
                 {} as the bitmap's base, assume_identical no longer applies",
                Hex(proposed)
            );
            let _ = self.metadata.adopt(proposed, false);
            let _ = self
                .metadata
                .set_flag(crate::generation::FLAG_ASSUME_IDENTICAL_CONSUMED, true);
        }
        let generations = *self.metadata.generations();
        let generation_seq = if generations.bitmap_base == 0 {
            let generation = self.fresh_generation();
            log::warn!(
                "source: degraded: writes go on without the destination; new generation {} (the \
                 destination holds {}; the bitmap counts changes since it)",
                Hex(generation),
                Hex(generations.current)
            );
            self.metadata.new_generation(generation)
        } else {
            log::warn!(
                "source: degraded: writes go on without the destination; generation {} already \
                 counts changes since {}",
                Hex(generations.current),
                Hex(generations.bitmap_base)
            );
            0
        };
        self.generations_seq = self.metadata.last_seq();
        self.counters.degrade_count += 1;
        self.note_references();
        let first_seq = self
            .halves_in_order()
            .into_iter()
            .filter(|&half| {
                self.cps[half].phase != CpPhase::Free && self.ring.reserved_slots(half) > 0
            })
            .map(|half| self.cps[half].first_seq)
            .min()
            .unwrap_or(self.ring.next_seq());
        // Every entry in the ring now: the references were taken from these very entries, so
        // marking them forgets none (later writes do, in `tick_degrade`).
        let through = self.committed_through_seq();
        let mut waiting =
            VecDeque::with_capacity(2 * self.ring.geometry().half_header_slots as usize);
        for seq in first_seq..=through {
            self.mark_entry(seq, &mut waiting);
        }
        self.degrade = Some(Degrade {
            marked_through_seq: through.max(first_seq.saturating_sub(1)),
            waiting,
            generation_seq,
        });
        self.tick_degrade(now_us);
    }

    /// Every block the ring holds whose latest content is in a transfer the destination
    /// acknowledged on the session just lost (so it holds it, unless it lost its log).
    fn note_references(&mut self) {
        let mut references: HashMap<(u32, u64), Option<LogReference>> = HashMap::new();
        for half in self.halves_in_order() {
            let state = &self.cps[half];
            if state.phase == CpPhase::Free {
                continue;
            }
            for index in 0..state.transfers.len() {
                let record = *state.transfers.get(index);
                let acked = index < state.acked_ever;
                for slot in record.first_slot..record.first_slot + record.entry_count {
                    if slot >= self.ring.committed_slots(half) {
                        break;
                    }
                    let header = self.ring.entry_header(half, slot);
                    let start = header.offset_bytes();
                    let end = start + u64::from(header.length_bytes);
                    let block_size = BLOCK_SIZE as u64;
                    for block in start / block_size..end.div_ceil(block_size) {
                        let whole = block * block_size >= start && (block + 1) * block_size <= end;
                        let reference = (acked && whole && !header.is_zeroes()).then(|| {
                            let position = u64::from(header.data_offset - record.base_offset)
                                + (block * block_size - start);
                            (record.id, (position / block_size) as u32)
                        });
                        references.insert((header.nsid, block), reference);
                    }
                }
            }
        }
        self.degraded_references = references
            .into_iter()
            .filter_map(|(block, reference)| reference.map(|r| (block, r)))
            .collect();
        self.degraded_references.sort_unstable();
        self.assert_one_reference_per_block();
    }

    /// `degraded_references` names a block once: `forget_references` removes one entry per
    /// block a write changed, so a second one would survive it and send the mirror a stale
    /// block that the data pass then skips as "taken as a reference" (simulation seed 11915).
    /// Checked in release builds too: it runs only when references are noted or put back.
    fn assert_one_reference_per_block(&self) {
        assert!(
            self.degraded_references
                .windows(2)
                .all(|pair| pair[0].0 != pair[1].0),
            "a block named twice among the resync's references"
        );
    }

    /// Every tick while degraded: marks the newly committed entries and completes the writes
    /// whose marks are durable.
    pub(super) fn tick_degrade(&mut self, _now_us: u64) {
        let Some(mut degrade) = self.degrade.take() else {
            return;
        };
        let through = self.committed_through_seq();
        for seq in degrade.marked_through_seq + 1..=through {
            let header = self.mark_entry(seq, &mut degrade.waiting);
            self.forget_references(header.nsid, header.offset_bytes(), header.length_bytes);
        }
        degrade.marked_through_seq = degrade.marked_through_seq.max(through);
        let durable = self.metadata.durable_through();
        if durable >= degrade.generation_seq {
            while degrade
                .waiting
                .front()
                .is_some_and(|&(_, mark_seq)| mark_seq <= durable)
            {
                degrade.waiting.pop_front();
            }
            // Marked entries, not the ring's committed prefix: a CP may have completed on the
            // primary and released its half while their marks were still being written.
            let complete_through = degrade
                .waiting
                .front()
                .map_or(degrade.marked_through_seq, |&(seq, _)| seq - 1);
            // Invariant 9: a write completes without the destination only once its extents'
            // marks (and the new generation) are durable.
            assert!(
                complete_through <= degrade.marked_through_seq
                    && durable >= degrade.generation_seq
                    && degrade
                        .waiting
                        .front()
                        .is_none_or(|&(_, mark_seq)| mark_seq > durable),
                "a degraded write completes only once durably marked (invariant 9)"
            );
            for seq in self.completed_through_seq + 1..=complete_through {
                self.events
                    .push_back(SourceEvent::WriteCompleted(WriteId(seq)));
                self.counters.degraded_write_count += 1;
            }
            self.completed_through_seq = self.completed_through_seq.max(complete_through);
        }
        self.degrade = Some(degrade);
    }

    /// Marks the extents of entry `seq`; a mark not yet durable joins `waiting`.
    fn mark_entry(
        &mut self,
        seq: u64,
        waiting: &mut VecDeque<(u64, u64)>,
    ) -> crate::ring::EntryHeader {
        let header = self.entry_header_of_seq(seq);
        let mark = self.metadata.mark(
            header.nsid,
            header.lba,
            u64::from(header.length_bytes).max(1),
        );
        if mark.seq != 0 {
            waiting.push_back((seq, mark.seq));
        }
        header
    }

    /// The new generation and the marks of every entry up to `seq` are durable: entries that
    /// leave the ring then are still known to differ after a crash (entries recovered from the
    /// ring completed in an earlier process, so their completion says nothing of their marks).
    fn degrade_marks_durable_through(&self, seq: u64) -> bool {
        let Some(degrade) = self.degrade.as_ref() else {
            return false;
        };
        let durable = self.metadata.durable_through();
        durable >= degrade.generation_seq
            && degrade.marked_through_seq >= seq
            && degrade
                .waiting
                .front()
                .is_none_or(|&(waiting_seq, mark_seq)| waiting_seq > seq || mark_seq <= durable)
    }

    /// A block's content changed: the destination's copy of it is not current any more.
    fn forget_references(&mut self, nsid: u32, start: u64, length_bytes: u32) {
        if self.degraded_references.is_empty() {
            return;
        }
        let block_size = BLOCK_SIZE as u64;
        let end = start + u64::from(length_bytes);
        for block in start / block_size..end.div_ceil(block_size) {
            if let Ok(at) = self
                .degraded_references
                .binary_search_by_key(&(nsid, block), |&(key, _)| key)
            {
                self.degraded_references.remove(at);
            }
        }
    }

    /// The header of the ring entry of `seq` (in one of the unreleased halves).
    fn entry_header_of_seq(&self, seq: u64) -> crate::ring::EntryHeader {
        for half in self.halves_in_order() {
            let state = &self.cps[half];
            if state.phase == CpPhase::Free || seq < state.first_seq {
                continue;
            }
            let slot = seq - state.first_seq;
            if slot < u64::from(self.ring.committed_slots(half)) {
                let header = self.ring.entry_header(half, slot as u32);
                assert_eq!(header.seq, seq);
                return header;
            }
        }
        unreachable!("seq {seq} is a committed entry of an unreleased half")
    }

    /// While degraded, a frozen CP completes on the primary alone once flushed and once the new
    /// generation and every mark of its entries are durable: releasing its entries earlier would
    /// leave blocks on the primary that no durable mark names after a crash (and lose the
    /// completions still waiting for a mark). Not while a handshake is under way once the Hello
    /// went out: it told the destination our last completed CP, and the HelloAck must find it
    /// unchanged (the CP then goes to the destination as any other). A Hello unanswered for
    /// `hello_grace_us` (a frozen destination's kernel accepts the connection and nothing more)
    /// is abandoned instead: the connection closes, the CP completes, and the hosts' writes go on
    /// rather than wait a peer timeout for every redial.
    pub(super) fn complete_cp_locally(&mut self, now_us: u64) {
        let hello_sent_us = match self.link {
            _ if self.degrade.is_none() => return,
            LinkState::Down | LinkState::Rejected => None,
            // `None`: not sent yet, and the Hello will carry the CP completed here.
            LinkState::HelloSent { sent_us } => sent_us,
            LinkState::Settling | LinkState::Ready => return,
        };
        let half = 1 - half_of_cp(self.active_cp);
        let state = &self.cps[half];
        let last_seq = state.first_seq + u64::from(self.ring.reserved_slots(half)) - 1;
        if state.phase != CpPhase::Frozen
            || state.flush != FlushState::Done
            || !self.degrade_marks_durable_through(last_seq)
        {
            return;
        }
        if let Some(sent_us) = hello_sent_us {
            let waited_us = now_us.saturating_sub(sent_us);
            // Once: the close is carried out after this tick, and the CP completes after it.
            if waited_us >= self.hello_grace_us && !self.liveness.close_requested() {
                log::warn!(
                    "source: the destination has not answered the Hello for {} ms while cp {} \
                     waits to complete without it: closing the connection, it is redialled",
                    waited_us / 1000,
                    state.cp_number
                );
                self.hello_grace_us = (self.hello_grace_us * 2).min(self.config.peer_timeout_us);
                self.counters.hello_abandoned_count += 1;
                self.declare_lost(now_us, PeerLostReason::HelloUnanswered { waited_us });
            }
            // Completes once the connection closed (`handle_disconnected`).
            return;
        }
        let cp_number = state.cp_number;
        log::debug!("source: cp {cp_number} completed on the primary alone (degraded)");
        self.complete_cp(now_us, cp_number);
    }

    /// When a degraded CP's wait for the HelloAck ends, if one waits.
    pub(super) fn hello_grace_deadline_us(&self) -> Option<u64> {
        match self.link {
            LinkState::HelloSent {
                sent_us: Some(sent_us),
            } if self.degrade.is_some() => Some(sent_us.saturating_add(self.hello_grace_us)),
            _ => None,
        }
    }

    /// A handshake found the pair in sync: marks without a base are a degrade's whose new
    /// generation never became durable (a crash lost it, the marks written before it survived).
    /// Invariant 9 then says no write they cover completed without the destination and no entry
    /// they cover left the ring (its halves wait for the generation too), and this session sends
    /// the ring's entries again: they count nothing the destination will lack. Kept, they would
    /// stay for ever (no resync clears them) and a later degrade would resync them for nothing.
    pub(super) fn forget_orphan_marks(&mut self) {
        let marked = self.metadata.marked_count();
        if marked == 0 || self.metadata.generations().bitmap_base != 0 {
            return;
        }
        // A degrade of this process gave the bitmap its base (a new generation counts changes
        // since the old one): marks without one can only be a crashed process's.
        assert!(
            self.degrade.is_none(),
            "a degraded source's bitmap has a base (invariant 9)"
        );
        log::info!(
            "source: {marked} bitmap extent(s) marked by a degrade whose generation was lost in a \
             crash: cleared (their entries are in the ring, sent again now)"
        );
        let _ = self.metadata.clear_all();
    }

    /// Ends the resync object (done, dropped, or replaced by a new one). Reads of its tables may
    /// still be in flight: the next resync's tables take later generations, so those reads
    /// never fill (or count towards) a table of the new one.
    pub(super) fn retire_resync(&mut self) -> Option<Resync> {
        let resync = self.resync.take()?;
        self.resync_generation_next = resync.generation.wrapping_add(1);
        Some(resync)
    }

    /// The handshake settled on a resync: the bitmap (or everything) goes to the destination.
    pub(super) fn start_resync(&mut self, now_us: u64, kind: ResyncKind) {
        let _ = self.retire_resync();
        if kind == ResyncKind::Full {
            let _ = self.metadata.mark_all();
        }
        let extent = self.metadata.extent_bytes();
        let bytes_total = self
            .metadata
            .iter_marked()
            .map(|(_, _, length)| length)
            .sum::<u64>();
        let _ = extent;
        let mut resync = Resync::new(
            kind,
            now_us,
            bytes_total,
            self.config.resync_rate_bytes_per_s,
            self.resync_generation_next,
            self.ring.next_seq() - 1,
        );
        if kind == ResyncKind::Full {
            self.degraded_references.clear();
        }
        self.applied_references.clear();
        resync.references_done = self.degraded_references.is_empty();
        log::warn!(
            "source: resync of the destination starts: {} ({} MiB marked{})",
            match kind {
                ResyncKind::Bitmap => "the extents changed since it was lost",
                ResyncKind::Full => "every extent (full sync)",
            },
            bytes_total >> 20,
            if self.degraded_references.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} blocks it still holds go as references first",
                    self.degraded_references.len()
                )
            }
        );
        self.counters.resync_count += 1;
        self.counters.resync_bytes_total = bytes_total;
        self.counters.resync_bytes_done = 0;
        self.resync = Some(resync);
    }

    /// Transfers wait while references into the destination's old log are outstanding.
    pub(super) fn transfers_held_for_resync(&self) -> bool {
        self.resync
            .as_ref()
            .is_some_and(|resync| !resync.references_done)
    }

    /// A ResyncTable is staged or unacknowledged: a CP must not commit now.
    pub(super) fn resync_table_out(&self) -> bool {
        self.resync.as_ref().is_some_and(|resync| resync.staged())
    }

    /// Some CP is committing or ready to commit: the resync waits for it.
    fn cp_wants_the_link(&self) -> bool {
        self.cps.iter().any(|state| {
            matches!(state.phase, CpPhase::Committing | CpPhase::AwaitingCpAck)
                || (state.phase == CpPhase::Frozen
                    && state.flush == FlushState::Done
                    && state.all_acked())
        })
    }

    /// Moves the resync along: stage the next table (references first, then marked extents
    /// read from the primary), queue it once read, finish with ResyncDone.
    pub(super) fn advance_resync(&mut self, now_us: u64) {
        if self.link != LinkState::Ready {
            return;
        }
        let Some(mut resync) = self.resync.take() else {
            return;
        };
        self.log_resync_progress(now_us, &mut resync);
        if resync.awaiting.is_none() && !resync.done_sent && now_us >= resync.retry_at_us {
            if resync.staged() {
                if resync.reads_completed == resync.data.len() {
                    if resync.read_failed {
                        resync.drop_table();
                        resync.retry_at_us = now_us + DEVICE_RETRY_BACKOFF_US;
                    } else {
                        self.queue_resync_table(&mut resync);
                    }
                }
            } else if !self.cp_wants_the_link() && self.rate_allows(now_us, &resync) {
                if !resync.references_done {
                    self.stage_references(&mut resync);
                } else if !resync.marks_done {
                    // The destination's own changes come first (they add extents).
                } else if !self.stage_extents(&mut resync) {
                    self.finish_resync(&mut resync);
                } else if resync.entries.is_empty() {
                    // Every block of these extents went as a reference: nothing to send.
                    self.clear_extents(&mut resync);
                }
            }
        }
        self.resync = Some(resync);
    }

    fn rate_allows(&self, now_us: u64, resync: &Resync) -> bool {
        if resync.rate_bytes_per_s == 0 {
            return true;
        }
        let elapsed_us = now_us.saturating_sub(resync.started_us).max(1);
        let allowed = u128::from(resync.rate_bytes_per_s) * u128::from(elapsed_us) / 1_000_000;
        u128::from(resync.bytes_done) < allowed.max(u128::from(BLOCK_SIZE as u64))
    }

    fn stage_references(&mut self, resync: &mut Resync) {
        let count = self.degraded_references.len().min(DESCRIPTORS_PER_TABLE);
        for ((nsid, block_index), (transfer_id, block_number)) in
            self.degraded_references.drain(..count)
        {
            resync.entries.push(DescriptorEntry {
                nsid,
                block_index,
                descriptor: Descriptor::Reference {
                    transfer_id,
                    block_number,
                },
            });
        }
        assert!(resync.staged(), "stage_references with references left");
    }

    /// Stages the blocks of the next marked extents (whole extents, as many as a table holds);
    /// false when no extent is marked any more.
    fn stage_extents(&mut self, resync: &mut Resync) -> bool {
        let mut found_any = false;
        let mut wrapped = false;
        loop {
            let Some((bit, nsid, offset, length)) = self.metadata.next_marked(resync.cursor_bit)
            else {
                // Never round again within one table: its extents are still marked.
                if found_any || wrapped || resync.cursor_bit == 0 {
                    break;
                }
                // Marks behind the cursor (set while the resync ran): go round again.
                wrapped = true;
                resync.cursor_bit = 0;
                continue;
            };
            let blocks = length.div_ceil(BLOCK_SIZE as u64) as usize;
            if resync.data.len() + blocks > TABLE_DATA_BLOCKS_MAX && found_any {
                break;
            }
            found_any = true;
            resync.cursor_bit = bit + 1;
            resync.extents.push((nsid, offset, length));
            let first = offset / BLOCK_SIZE as u64;
            for block in first..first + blocks as u64 {
                if resync.data.len() == TABLE_DATA_BLOCKS_MAX {
                    // An extent larger than a table: the rest of it goes in the next one.
                    resync.cursor_bit = bit;
                    resync.extents.pop();
                    break;
                }
                if self.applied_references.contains(&(nsid, block)) {
                    // The destination took this block's current content as a reference.
                    continue;
                }
                resync.entries.push(DescriptorEntry {
                    nsid,
                    block_index: block,
                    descriptor: Descriptor::Data,
                });
                resync.data.push((nsid, block));
            }
            if resync.data.len() == TABLE_DATA_BLOCKS_MAX {
                break;
            }
        }
        found_any
    }

    /// The next resync read of the staged table, if any (a device op on the primary).
    pub(super) fn next_resync_read(&mut self) -> Option<DeviceOp<'static>> {
        let resync = self.resync.as_ref()?;
        if resync.awaiting.is_some() || resync.reads_submitted == resync.data.len() {
            return None;
        }
        // A CP the destination already applied (its CpAck lost) is never sent again: until its
        // entries landed on the primary and it completed, a read could find older content there
        // (a recovered entry not yet applied again) and its table overwrite the newer block.
        if self
            .cps
            .iter()
            .any(|state| state.mirrored && state.phase != CpPhase::Free)
        {
            return None;
        }
        let index = resync.reads_submitted;
        let (nsid, block_index) = resync.data[index];
        let start = block_index * BLOCK_SIZE as u64;
        if !self.ops.has_room(nsid) || self.ops.overlaps(nsid, start, start + BLOCK_SIZE as u64) {
            return None;
        }
        let generation = resync.generation;
        let seen_through_seq = self.ring.next_seq() - 1;
        let id = self.ops.start(
            nsid,
            SourceOp::ResyncRead {
                index: index as u16,
                generation,
                block_index,
            },
        );
        let resync = self.resync.as_mut().expect("checked");
        resync.reads_submitted += 1;
        // Whatever landed on the primary by now is an entry reserved by now.
        resync.seen_through_seq = resync.seen_through_seq.max(seen_through_seq);
        Some(DeviceOp {
            id,
            nsid,
            request: DeviceRequest::Read {
                offset_bytes: start,
                length_bytes: BLOCK_SIZE as u32,
            },
        })
    }

    pub(super) fn on_resync_read(
        &mut self,
        now_us: u64,
        nsid: u32,
        index: u16,
        generation: u32,
        block_index: u64,
        result: Result<&[u8], DeviceError>,
    ) {
        let Some(resync) = self.resync.as_mut() else {
            return;
        };
        if generation != resync.generation {
            return;
        }
        resync.reads_completed += 1;
        match result {
            Ok(data) => {
                let at = usize::from(index) * BLOCK_SIZE;
                resync.blocks[at..at + BLOCK_SIZE].copy_from_slice(data);
            }
            Err(error) => {
                resync.read_failed = true;
                self.counters.device_error_count += 1;
                log::error!(
                    "source: resync read of namespace {nsid} block {block_index} failed: {error}; \
                     retried in {} ms",
                    DEVICE_RETRY_BACKOFF_US / 1000
                );
            }
        }
        if resync.reads_completed == resync.data.len() {
            // Queued now rather than at the next tick.
            self.advance_resync(now_us.max(self.last_tick_us));
        }
    }

    fn queue_resync_table(&mut self, resync: &mut Resync) {
        let length = wire::table_bytes(resync.entries.iter().map(|e| e.descriptor));
        if !self.out.can_push(length, 1) {
            return;
        }
        let number = resync.next_number;
        let (start, _) = self
            .out
            .alloc_inline(length)
            .expect("checked with can_push");
        let message = self.out.inline_mut(start, length);
        let mut at = wire::encode_table_prefix_of(
            message,
            MessageKind::ResyncTable,
            number,
            &resync.entries,
        );
        let blocks = resync.data.len() * BLOCK_SIZE;
        message[at..at + blocks].copy_from_slice(&resync.blocks[..blocks]);
        at += blocks;
        assert_eq!(at, length, "a table is its prefix and its Data blocks");
        wire::seal_message(message);
        self.out.push(Segment::Inline {
            start: start as u32,
            len: length as u32,
        });
        for entry in &resync.entries {
            match entry.descriptor {
                Descriptor::Reference { .. } => self.counters.resync_reference_blocks += 1,
                Descriptor::Data => self.counters.resync_data_blocks += 1,
                Descriptor::Zeroes => {}
            }
        }
        self.counters.resync_wire_bytes += length as u64;
        resync.awaiting = Some(number);
        resync.next_number += 1;
    }

    /// Extents the destination may have changed that we lack (a former source attached as our
    /// destination): resynced too.
    pub(super) fn on_resync_marks(
        &mut self,
        marks: &crate::wire::ResyncMarksMessage<'_>,
    ) -> Result<(), LinkError> {
        let Some(resync) = self.resync.as_mut() else {
            return Err(ProtocolError::Resync {
                what: "ResyncMarks outside a resync",
            }
            .into());
        };
        if resync.marks_done {
            return Err(ProtocolError::Resync {
                what: "ResyncMarks after the last one",
            }
            .into());
        }
        let mut bytes = 0;
        for (nsid, offset, length) in marks.extents() {
            if crate::device::check_extent(&self.namespace_sizes_bytes, nsid, offset, length)
                .is_err()
                || offset % SECTOR as u64 != 0
            {
                return Err(ProtocolError::Resync {
                    what: "a ResyncMarks extent outside the namespaces",
                }
                .into());
            }
            let _ = self.metadata.mark(nsid, offset / SECTOR as u64, length);
            bytes += length;
        }
        let resync = self.resync.as_mut().expect("checked");
        resync.bytes_total += bytes;
        self.counters.resync_bytes_total = resync.bytes_total;
        if bytes > 0 {
            log::warn!(
                "source: the destination may differ in {} MiB it changed itself (a former \
                 source): resynced too",
                bytes.div_ceil(1 << 20)
            );
        }
        resync.marks_done = marks.last;
        Ok(())
    }

    /// The destination wrote and flushed (or failed) resync table `number`.
    pub(super) fn on_resync_ack(
        &mut self,
        now_us: u64,
        number: u64,
        failed: bool,
    ) -> Result<(), LinkError> {
        let Some(mut resync) = self.resync.take() else {
            return Err(ProtocolError::Resync {
                what: "a ResyncAck without a resync",
            }
            .into());
        };
        if resync.awaiting != Some(number) {
            self.resync = Some(resync);
            return Err(ProtocolError::Resync {
                what: "a ResyncAck for another table",
            }
            .into());
        }
        let references = resync
            .entries
            .iter()
            .any(|entry| matches!(entry.descriptor, Descriptor::Reference { .. }));
        if failed && references {
            // The destination cannot resolve them (it lost its log) or could not write them:
            // their blocks are marked, so they go as data read from the primary instead.
            log::warn!(
                "source: the destination could not take resync references; every marked block \
                 goes as data"
            );
            self.degraded_references.clear();
            resync.references_done = true;
            resync.drop_table();
        } else if failed {
            self.counters.cp_failure_count += 1;
            log::warn!(
                "source: the destination failed resync table {number} (mirror write error); \
                 retrying in {} ms",
                DEVICE_RETRY_BACKOFF_US / 1000
            );
            resync.drop_table();
            resync.retry_at_us = now_us + DEVICE_RETRY_BACKOFF_US;
        } else {
            for entry in &resync.entries {
                if let Descriptor::Reference { .. } = entry.descriptor {
                    self.applied_references
                        .insert((entry.nsid, entry.block_index));
                }
            }
            if references && self.degraded_references.is_empty() {
                resync.references_done = true;
            }
            self.clear_extents(&mut resync);
        }
        let resume = resync.references_done;
        self.resync = Some(resync);
        if resume {
            self.send_transfers();
        }
        Ok(())
    }

    /// The staged extents are on the mirror: their bits are cleared.
    fn clear_extents(&mut self, resync: &mut Resync) {
        let mut done = 0;
        for &(nsid, offset, length) in &resync.extents {
            let _ = self.metadata.clear(nsid, offset / SECTOR as u64, length);
            done += length;
        }
        resync.bytes_done += done;
        self.counters.resync_bytes_done = resync.bytes_done;
        resync.drop_table();
    }

    /// No extent is marked: once the clears are durable and every entry the resync may have
    /// read from the primary is in a completed CP (a CP is asked for), the destination takes our
    /// generation. Before that, the mirror may hold a resync block newer than the CPs it applied
    /// (not a point-in-time image) or lack a degraded write still on its way in a transfer.
    fn finish_resync(&mut self, resync: &mut Resync) {
        if self.metadata.marked_count() != 0 || !self.metadata.is_durable() {
            return;
        }
        let unreleased = self.halves_in_order().into_iter().any(|half| {
            let state = &self.cps[half];
            state.phase != CpPhase::Free
                && self.ring.reserved_slots(half) > 0
                && state.first_seq <= resync.seen_through_seq
        });
        if unreleased {
            self.cp_requested = true;
            return;
        }
        // The bitmap stops counting before the destination may take our generation: once it
        // did (we may not hear it: a lost ack, a crash), a degrade must take a new generation,
        // or its writes would be marked against a base the destination left and a handshake
        // would find the pair in sync. A destination that did not take it is resynced in full.
        if self.metadata.generations().bitmap_base != 0 {
            self.generations_seq = self.metadata.set_bitmap_base(0);
        }
        if !self.metadata.is_durable() {
            return;
        }
        let generation = self.metadata.generations().current;
        let control = Control::ResyncDone { generation };
        let length = control.encoded_bytes();
        if self
            .out
            .push_inline(length, |bytes| control.encode(bytes))
            .is_ok()
        {
            resync.done_sent = true;
        }
    }

    pub(super) fn on_resync_done_ack(
        &mut self,
        now_us: u64,
        generation: u64,
    ) -> Result<(), LinkError> {
        let expected = self.metadata.generations().current;
        let Some(resync) = self.retire_resync() else {
            return Err(ProtocolError::Resync {
                what: "a ResyncDoneAck without a resync",
            }
            .into());
        };
        if !resync.done_sent || generation != expected {
            self.resync = Some(resync);
            return Err(ProtocolError::Resync {
                what: "a ResyncDoneAck for another generation",
            }
            .into());
        }
        self.resync_finished(now_us, &resync);
        Ok(())
    }

    /// The destination holds our generation: the resync is over (told as an event, logged).
    pub(super) fn resync_finished(&mut self, now_us: u64, resync: &Resync) {
        let generation = self.metadata.generations().current;
        assert_eq!(
            self.metadata.generations().bitmap_base,
            0,
            "the bitmap's base went before ResyncDone"
        );
        let elapsed_us = now_us.saturating_sub(resync.started_us).max(1);
        log::warn!(
            "source: resync done ({}): {} MiB in {:.1} s ({:.1} MiB/s), {} blocks as references, \
             {} as data; the destination holds generation {}: in sync",
            match resync.kind {
                ResyncKind::Bitmap => "the marked extents",
                ResyncKind::Full => "full sync",
            },
            resync.bytes_done >> 20,
            elapsed_us as f64 / 1e6,
            resync.bytes_done as f64 / (1 << 20) as f64 / (elapsed_us as f64 / 1e6),
            self.counters.resync_reference_blocks,
            self.counters.resync_data_blocks,
            Hex(generation)
        );
        self.events.push_back(SourceEvent::ResyncDone {
            bytes: resync.bytes_done,
            duration_us: elapsed_us,
        });
    }

    fn log_resync_progress(&mut self, now_us: u64, resync: &mut Resync) {
        if now_us.saturating_sub(resync.last_log_us) < RESYNC_PROGRESS_LOG_US {
            return;
        }
        resync.last_log_us = now_us;
        let (percent, mib_s, eta_s) = resync.status().rates(now_us);
        log::info!(
            "source: resync {percent:.1}% ({} of {} MiB), {mib_s:.1} MiB/s, ETA {}",
            resync.bytes_done >> 20,
            resync.bytes_total >> 20,
            eta_s.map_or("unknown".to_string(), |s| format!("{s:.0} s"))
        );
    }

    /// A new session (or none): whatever table was out is sent again. References only hold
    /// on the session that followed the loss (the destination reuses its old log as soon as
    /// transfers flow again), so they are dropped once that session has moved past them.
    pub(super) fn reset_resync_session(&mut self) {
        if let Some(resync) = self.resync.as_mut() {
            let staged: Vec<_> = resync
                .entries
                .iter()
                .filter_map(|entry| match entry.descriptor {
                    Descriptor::Reference {
                        transfer_id,
                        block_number,
                    } => Some(((entry.nsid, entry.block_index), (transfer_id, block_number))),
                    _ => None,
                })
                .collect();
            resync.drop_table();
            resync.done_sent = false;
            resync.marks_done = false;
            if resync.references_done {
                self.degraded_references.clear();
            } else {
                self.degraded_references.extend(staged);
                self.degraded_references.sort_unstable();
                self.degraded_references.dedup();
                // A loss may have noted the references again already (`enter_degrade` can run
                // before the link's close resets the session): a block named with two log
                // places goes as data instead (it is marked), so one reference per block stays
                // true and a later write's `forget_references` leaves no stale copy behind.
                let conflicting: Vec<(u32, u64)> = self
                    .degraded_references
                    .windows(2)
                    .filter(|pair| pair[0].0 == pair[1].0)
                    .map(|pair| pair[0].0)
                    .collect();
                self.degraded_references
                    .retain(|(block, _)| conflicting.binary_search(block).is_err());
                self.assert_one_reference_per_block();
            }
        }
    }
}
