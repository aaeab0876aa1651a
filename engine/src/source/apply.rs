//! The source's device I/O (invariants 7 and 8): committed entries become primary writes in
//! seq order, a frozen CP's primary flush and its Data-block reads are device ops too, and each
//! completion is handled whenever the device finishes it.
//!
//! Ordering. Entries are submitted in global seq order (older half first); an entry waits while
//! an earlier op overlapping its range on the same namespace is in flight, so overlapping writes
//! land in seq order however the device reorders. An aborted reservation is read back from the
//! primary when it reaches the head, under the same rule.
//!
//! Point in time (invariant 7). A CP's Data blocks are read from the primary after every entry
//! of that CP landed; an entry of the next CP that touches such a block waits until the CP is
//! complete, so the read sees the primary exactly as of the end of its CP. Waiting (rather than
//! a copy-before-write of the block) needs no buffer that grows with the CP and costs nothing
//! when no block travels as Data (aligned writes, the common case); the entries that wait are
//! in the NVRAM ring, so host writes keep completing. The wait lasts until the CpAck (not only
//! until the reads are done) because a CP the mirror fails is planned and read again.
//!
//! Failures. A failed primary write rewinds the apply cursor to the failed entry and retries
//! after a back-off (re-applying the entries after it is idempotent and keeps the order); a
//! failed flush or Data read is retried the same way. Each is counted and reported once per
//! failing streak of its namespace with the namespace and LBA; nothing acknowledged depends on
//! it (the ring holds the entries until their CP completed on both sides).

use super::cp_state::FlushState;
use super::{CpPhase, DeviceFault, Source, SourceEvent};
use crate::cp::DescriptorEntry;
use crate::device::{
    DeviceCompletion, DeviceError, DeviceOp, DeviceOpId, DeviceOpKind, DeviceRequest, InflightOps,
};
use crate::geometry::{blocks_touched, BLOCK_SIZE, TABLE_DATA_BLOCKS_MAX};
use crate::ring::{EntryHeader, RingStore};
use crate::transfer::key_hash;

/// How long a failed op waits before it is tried again.
pub const DEVICE_RETRY_BACKOFF_US: u64 = 100_000;

/// What a source device op is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceOp {
    /// Writes entry `slot` of `half` (seq `seq`) to bytes `start..end` of its namespace.
    Apply {
        half: u8,
        slot: u32,
        seq: u64,
        start: u64,
        end: u64,
    },
    /// Reads the primary's content of an aborted reservation into its ring slot.
    AbortedRead {
        half: u8,
        slot: u32,
        start: u64,
        end: u64,
    },
    /// Flushes one primary for the CP of `half`.
    Flush { half: u8 },
    /// Reads Data block `index` of the staged table of `generation` (a table dropped since,
    /// by a new session or a failed read, ignores it).
    DataRead {
        index: u16,
        generation: u32,
        block_index: u64,
    },
    /// Reads block `index` of the staged ResyncTable of `generation` from the primary.
    ResyncRead {
        index: u16,
        generation: u32,
        block_index: u64,
    },
}

impl SourceOp {
    /// The op writes an entry of `half` to the primary.
    pub(super) fn writes_half(&self, half: usize) -> bool {
        matches!(*self, Self::Apply { half: h, .. } | Self::AbortedRead { half: h, .. } if usize::from(h) == half)
    }

    /// The namespace byte range the op touches while in flight (empty for a flush).
    fn range(&self) -> (u64, u64) {
        match *self {
            Self::Apply { start, end, .. } | Self::AbortedRead { start, end, .. } => (start, end),
            // A read of a table dropped since (a new session) may still be out when the next
            // CP writes the block: writes wait for it like for any overlapping op.
            Self::DataRead { block_index, .. } | Self::ResyncRead { block_index, .. } => (
                block_index * BLOCK_SIZE as u64,
                (block_index + 1) * BLOCK_SIZE as u64,
            ),
            Self::Flush { .. } => (0, 0),
        }
    }
}

/// The source's device ops in flight, with a counting filter of the blocks they touch: an
/// entry to apply is checked against every op in flight (ordering, above), and the scan of
/// them per entry was 2.9% of the embedded pair's core at QD32 (`perf record`) where nearly
/// every check finds no overlap. A filter bucket counts the ops in flight touching a block
/// that hashes to it; all buckets of a range empty means no op overlaps it, and only a range
/// whose buckets are not all empty (or an op too wide to count by block) is scanned.
#[derive(Debug)]
pub(crate) struct SourceOps {
    ops: InflightOps<SourceOp>,
    buckets: Vec<u32>,
    /// Ops in flight whose range spans more than [`FILTER_SPAN_BLOCKS_MAX`] blocks.
    wide: u32,
}

/// Filter buckets (a power of two): 16 KiB, kept in cache by the checks themselves.
const FILTER_BUCKETS: usize = 4096;
/// An op over more blocks than this is not counted block by block (a scan checks it).
const FILTER_SPAN_BLOCKS_MAX: u64 = 16;

impl SourceOps {
    pub fn new(namespace_count: usize, depth: u32) -> Self {
        SourceOps {
            ops: InflightOps::new(namespace_count, depth),
            buckets: vec![0; FILTER_BUCKETS],
            wide: 0,
        }
    }

    pub fn start(&mut self, nsid: u32, purpose: SourceOp) -> DeviceOpId {
        self.count(nsid, &purpose, true);
        self.ops.start(nsid, purpose)
    }

    pub fn finish(&mut self, id: DeviceOpId) -> Option<(u32, SourceOp)> {
        let (nsid, purpose) = self.ops.finish(id)?;
        self.count(nsid, &purpose, false);
        Some((nsid, purpose))
    }

    pub fn has_room(&self, nsid: u32) -> bool {
        self.ops.has_room(nsid)
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, &SourceOp)> + '_ {
        self.ops.iter()
    }

    /// An op on `nsid` overlapping `start..end` is in flight.
    pub fn overlaps(&self, nsid: u32, start: u64, end: u64) -> bool {
        if self.ops.count_on(nsid) == 0 || start >= end {
            return false;
        }
        let (first, last) = blocks_touched(start, end);
        let filtered_out = self.wide == 0
            && last - first <= FILTER_SPAN_BLOCKS_MAX
            && (first..last).all(|block| self.buckets[bucket(nsid, block)] == 0);
        !filtered_out
            && self.ops.iter().any(|(op_nsid, op)| {
                let (op_start, op_end) = op.range();
                op_nsid == nsid && op_start < end && start < op_end
            })
    }

    fn count(&mut self, nsid: u32, purpose: &SourceOp, add: bool) {
        let (start, end) = purpose.range();
        if start >= end {
            return;
        }
        let (first, last) = blocks_touched(start, end);
        let counted = if last - first > FILTER_SPAN_BLOCKS_MAX {
            step(&mut self.wide, add)
        } else {
            (first..last).all(|block| step(&mut self.buckets[bucket(nsid, block)], add))
        };
        assert!(counted, "an op finished that the filter never counted");
    }
}

/// Counts one up or down; false if it would go below zero.
fn step(count: &mut u32, add: bool) -> bool {
    match (add, count.checked_sub(1)) {
        (true, _) => *count += 1,
        (false, Some(less)) => *count = less,
        (false, None) => return false,
    }
    true
}

fn bucket(nsid: u32, block: u64) -> usize {
    (key_hash(nsid, block) >> 32) as usize & (FILTER_BUCKETS - 1)
}

/// A DescriptorTable whose Data blocks are being read from the primary before it is queued:
/// its descriptors, one staging block per Data descriptor (allocated at start), and the reads
/// still out.
#[derive(Debug)]
pub(crate) struct StagedTable {
    pub entries: Vec<DescriptorEntry>,
    pub blocks: Vec<u8>,
    /// (nsid, block index) of each Data descriptor, in order.
    pub data: Vec<(u32, u64)>,
    /// Data reads submitted so far, and completed.
    pub submitted: usize,
    pub completed: usize,
    pub failed: bool,
    /// The table is staged for the CP of this half (none staged: `None`).
    pub half: Option<usize>,
    pub extent: Option<crate::cp::TableExtent>,
    /// Bumped by every `clear`: reads of a dropped table are told apart.
    pub generation: u32,
}

impl StagedTable {
    pub fn new() -> Self {
        StagedTable {
            entries: Vec::with_capacity(crate::geometry::DESCRIPTORS_PER_TABLE),
            blocks: vec![0; TABLE_DATA_BLOCKS_MAX * BLOCK_SIZE],
            data: Vec::with_capacity(TABLE_DATA_BLOCKS_MAX),
            submitted: 0,
            completed: 0,
            failed: false,
            half: None,
            extent: None,
            generation: 0,
        }
    }

    pub fn clear(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.entries.clear();
        self.data.clear();
        self.submitted = 0;
        self.completed = 0;
        self.failed = false;
        self.half = None;
        self.extent = None;
    }

    /// Every Data read came back (successfully or not).
    pub fn is_read(&self) -> bool {
        self.half.is_some() && self.completed == self.data.len()
    }
}

impl<M: RingStore> Source<M> {
    /// The next device op to submit, if any: a CP flush, a Data-block read, or the next primary
    /// write. Submit it to namespace `op.nsid` before calling into the source again.
    #[must_use]
    pub fn poll_device_op(&mut self, now_us: u64) -> Option<DeviceOp<'_>> {
        if let Some(op) = self.next_flush_op(now_us) {
            return Some(op);
        }
        if let Some(op) = self.next_data_read(now_us) {
            return Some(op);
        }
        if let Some(op) = self.next_resync_read() {
            return Some(op);
        }
        self.next_apply_op(now_us)
    }

    /// Takes the completion of an op from `poll_device_op`.
    pub fn handle_device_completion(&mut self, now_us: u64, completion: DeviceCompletion<'_>) {
        let (nsid, op) = self
            .ops
            .finish(completion.id)
            .expect("a completion of an op the source submitted, once");
        let result = completion.result;
        if result.is_ok() {
            self.failing[nsid as usize - 1] = false;
        }
        match op {
            SourceOp::Apply {
                half, slot, start, ..
            } => {
                if let Err(error) = result {
                    let header = self.ring.entry_header(usize::from(half), slot);
                    self.report_fault(now_us, nsid, DeviceOpKind::Write, start, &header, error);
                    self.rewind_apply(usize::from(half), slot);
                    self.apply_retry_at_us = now_us + DEVICE_RETRY_BACKOFF_US;
                }
            }
            SourceOp::AbortedRead {
                half, slot, start, ..
            } => self.on_aborted_read(now_us, nsid, usize::from(half), slot, start, result),
            SourceOp::Flush { half } => self.on_flush(now_us, nsid, usize::from(half), result),
            SourceOp::DataRead {
                index, generation, ..
            } => {
                if generation == self.staged.generation {
                    self.on_data_read(now_us, nsid, index, result);
                }
            }
            SourceOp::ResyncRead {
                index,
                generation,
                block_index,
            } => self.on_resync_read(now_us, nsid, index, generation, block_index, result),
        }
    }

    /// Every committed entry up to this seq is on the primary (what [`Source::read_gate`]
    /// waits for).
    pub fn landed_through_seq(&self) -> u64 {
        let mut oldest_unlanded = None;
        for (_, op) in self.ops.iter() {
            if let SourceOp::Apply { seq, .. } = *op {
                oldest_unlanded = Some(oldest_unlanded.map_or(seq, |o: u64| o.min(seq)));
            }
        }
        let cursor = self
            .halves_in_order()
            .into_iter()
            .find(|&half| self.cps[half].applied_slots < self.ring.reserved_slots(half))
            .map_or(self.ring.next_seq(), |half| {
                self.cps[half].first_seq + u64::from(self.cps[half].applied_slots)
            });
        oldest_unlanded.map_or(cursor, |seq| seq.min(cursor)) - 1
    }

    /// The op after the last one submitted of `half`'s entries, in global seq order.
    fn next_apply_op(&mut self, now_us: u64) -> Option<DeviceOp<'_>> {
        if now_us < self.apply_retry_at_us {
            return None;
        }
        for half in self.halves_in_order() {
            let slot = self.cps[half].applied_slots;
            if slot < self.ring.committed_slots(half) {
                let seq = self.cps[half].first_seq + u64::from(slot);
                let header = match self.next_apply.take() {
                    Some(header) if header.seq == seq => header,
                    _ => self.ring.entry_header(half, slot),
                };
                return self.start_apply(half, slot, header);
            }
            if let Some(index) = self
                .aborted
                .iter()
                .position(|entry| entry.half() == half && entry.slot() == slot)
            {
                return self.start_aborted_read(half, index);
            }
            if slot < self.ring.reserved_slots(half) {
                return None;
            }
        }
        None
    }

    fn start_apply(&mut self, half: usize, slot: u32, header: EntryHeader) -> Option<DeviceOp<'_>> {
        let start = header.offset_bytes();
        let end = start + u64::from(header.length_bytes);
        if !self.ops.has_room(header.nsid)
            || self.ops.overlaps(header.nsid, start, end)
            || self.held_for_point_in_time(half, &header)
        {
            self.next_apply = Some(header);
            return None;
        }
        assert_eq!(
            self.cps[half].first_seq + u64::from(slot),
            header.seq,
            "a half's entries have consecutive seqs"
        );
        self.cps[half].applied_slots += 1;
        let id = self.ops.start(
            header.nsid,
            SourceOp::Apply {
                half: half as u8,
                slot,
                seq: header.seq,
                start,
                end,
            },
        );
        Some(DeviceOp {
            id,
            nsid: header.nsid,
            request: self.ring.entry_write(&header),
        })
    }

    fn start_aborted_read(&mut self, half: usize, index: usize) -> Option<DeviceOp<'_>> {
        let header = *self.aborted[index].header();
        let start = header.offset_bytes();
        let end = start + u64::from(header.length_bytes);
        let reading = self
            .ops
            .iter()
            .any(|(_, op)| matches!(*op, SourceOp::AbortedRead { half: h, slot, .. } if usize::from(h) == half && slot == self.aborted[index].slot()));
        if reading || !self.ops.has_room(header.nsid) || self.ops.overlaps(header.nsid, start, end)
        {
            return None;
        }
        let id = self.ops.start(
            header.nsid,
            SourceOp::AbortedRead {
                half: half as u8,
                slot: self.aborted[index].slot(),
                start,
                end,
            },
        );
        Some(DeviceOp {
            id,
            nsid: header.nsid,
            request: DeviceRequest::Read {
                offset_bytes: start,
                length_bytes: header.length_bytes,
            },
        })
    }

    /// The primary's current content of an aborted reservation came back: commit the entry with
    /// it (a write that changes nothing). If it cannot be read the entry stays aborted and
    /// uncommitted (its slot holds a host's partial data or old ring bytes, which must never be
    /// applied, sent or replayed) and is read again after the back-off.
    fn on_aborted_read(
        &mut self,
        now_us: u64,
        nsid: u32,
        half: usize,
        slot: u32,
        start: u64,
        result: Result<&[u8], DeviceError>,
    ) {
        let index = self
            .aborted
            .iter()
            .position(|entry| entry.half() == half && entry.slot() == slot)
            .expect("an aborted entry stays listed while its read is in flight");
        let header = *self.aborted[index].header();
        match result {
            Ok(data) => {
                assert_eq!(data.len(), header.length_bytes as usize);
                self.ring
                    .data_mut(&self.aborted[index])
                    .copy_from_slice(data);
                let entry = self.aborted.swap_remove(index);
                self.ring.commit(&entry);
            }
            Err(error) => {
                self.report_fault(now_us, nsid, DeviceOpKind::Read, start, &header, error);
                self.apply_retry_at_us = now_us + DEVICE_RETRY_BACKOFF_US;
            }
        }
    }

    /// An entry of the active CP that writes a block the CP in flight still reads as Data.
    fn held_for_point_in_time(&self, half: usize, header: &EntryHeader) -> bool {
        let older = &self.cps[1 - half];
        if half != super::half_of_cp(self.active_cp) || !older.reads_primary {
            return false;
        }
        let start = header.offset_bytes();
        let (first, end) = blocks_touched(start, start + u64::from(header.length_bytes));
        (first..end).any(|block| older.holds_block(self.config.mode, header.nsid, block))
    }

    /// A primary write of entry `slot` of `half` failed: everything from it on is applied again
    /// (in order; entries after it that landed are rewritten with the same bytes).
    fn rewind_apply(&mut self, half: usize, slot: u32) {
        let [older, newer] = self.halves_in_order();
        if half == older {
            self.cps[older].applied_slots = self.cps[older].applied_slots.min(slot);
            self.cps[newer].applied_slots = 0;
        } else {
            self.cps[newer].applied_slots = self.cps[newer].applied_slots.min(slot);
        }
    }

    /// The CP in flight has every entry landed and acknowledged: flush each primary once
    /// (the flushes are queued together and issued as each namespace has room).
    fn next_flush_op(&mut self, now_us: u64) -> Option<DeviceOp<'static>> {
        let half = 1 - super::half_of_cp(self.active_cp);
        if self.cps[half].flush == FlushState::NotStarted && self.ready_to_flush(half, now_us) {
            let namespaces = self.namespace_sizes_bytes.len() as u32;
            self.cps[half].flush = FlushState::InFlight {
                remaining: namespaces,
            };
            self.pending_flushes.clear();
            self.pending_flushes.extend((1..=namespaces).rev());
        }
        let &nsid = self.pending_flushes.last()?;
        if !self.ops.has_room(nsid) {
            return None;
        }
        self.pending_flushes.pop();
        let id = self.ops.start(nsid, SourceOp::Flush { half: half as u8 });
        Some(DeviceOp {
            id,
            nsid,
            request: DeviceRequest::Flush,
        })
    }

    /// Every entry of the frozen CP of `half` was acknowledged and landed on its primary.
    fn ready_to_flush(&self, half: usize, now_us: u64) -> bool {
        let state = &self.cps[half];
        // Degraded, nobody acknowledges: the CP completes on the primary alone.
        let acked =
            state.all_acked() || (self.degrade.is_some() && self.link != super::LinkState::Ready);
        state.phase == CpPhase::Frozen
            && acked
            && state.applied_slots == self.ring.reserved_slots(half)
            && now_us >= self.cp_retry_at_us
            && !self.ops.iter().any(
                |(_, op)| matches!(*op, SourceOp::Apply { half: h, .. } if usize::from(h) == half),
            )
    }

    fn on_flush(
        &mut self,
        now_us: u64,
        nsid: u32,
        half: usize,
        result: Result<&[u8], DeviceError>,
    ) {
        let FlushState::InFlight { remaining } = self.cps[half].flush else {
            unreachable!("a flush completes while its CP's flush is in flight");
        };
        if let Err(error) = result {
            self.report(
                now_us,
                DeviceFault {
                    nsid,
                    kind: DeviceOpKind::Flush,
                    offset_bytes: 0,
                    length_bytes: 0,
                    error,
                    purpose: "CP flush",
                },
            );
            self.cps[half].flush_failed = true;
        }
        if remaining > 1 {
            self.cps[half].flush = FlushState::InFlight {
                remaining: remaining - 1,
            };
            return;
        }
        if std::mem::take(&mut self.cps[half].flush_failed) {
            self.cps[half].flush = FlushState::NotStarted;
            self.cp_retry_at_us = now_us + DEVICE_RETRY_BACKOFF_US;
        } else {
            self.cps[half].flush = FlushState::Done;
        }
    }

    /// The next Data read of the staged table, if one is due.
    fn next_data_read(&mut self, now_us: u64) -> Option<DeviceOp<'static>> {
        let staged = &self.staged;
        if staged.half.is_none()
            || staged.submitted == staged.data.len()
            || now_us < self.cp_retry_at_us
        {
            return None;
        }
        let (nsid, block_index) = staged.data[staged.submitted];
        if !self.ops.has_room(nsid) {
            return None;
        }
        let index = self.staged.submitted as u16;
        self.staged.submitted += 1;
        let generation = self.staged.generation;
        let id = self.ops.start(
            nsid,
            SourceOp::DataRead {
                index,
                generation,
                block_index,
            },
        );
        Some(DeviceOp {
            id,
            nsid,
            request: DeviceRequest::Read {
                offset_bytes: block_index * BLOCK_SIZE as u64,
                length_bytes: BLOCK_SIZE as u32,
            },
        })
    }

    fn on_data_read(
        &mut self,
        now_us: u64,
        nsid: u32,
        index: u16,
        result: Result<&[u8], DeviceError>,
    ) {
        let index = usize::from(index);
        let (_, block_index) = self.staged.data[index];
        match result {
            Ok(data) => {
                assert_eq!(data.len(), BLOCK_SIZE);
                self.staged.blocks[index * BLOCK_SIZE..(index + 1) * BLOCK_SIZE]
                    .copy_from_slice(data);
            }
            Err(error) => {
                self.report(
                    now_us,
                    DeviceFault {
                        nsid,
                        kind: DeviceOpKind::Read,
                        offset_bytes: block_index * BLOCK_SIZE as u64,
                        length_bytes: BLOCK_SIZE as u64,
                        error,
                        purpose: "CP data read",
                    },
                );
                self.staged.failed = true;
            }
        }
        self.staged.completed += 1;
    }

    fn report_fault(
        &mut self,
        now_us: u64,
        nsid: u32,
        kind: DeviceOpKind,
        offset_bytes: u64,
        header: &EntryHeader,
        error: DeviceError,
    ) {
        let purpose = match kind {
            DeviceOpKind::Read => "read for an aborted write",
            _ => "primary write",
        };
        self.report(
            now_us,
            DeviceFault {
                nsid,
                kind,
                offset_bytes,
                length_bytes: u64::from(header.length_bytes),
                error,
                purpose,
            },
        );
    }

    /// Counts a fault, logs the first of a namespace's failing streak, and tells the runtime.
    pub(super) fn report(&mut self, _now_us: u64, fault: DeviceFault) {
        self.counters.device_error_count += 1;
        let failing = &mut self.failing[fault.nsid as usize - 1];
        if !*failing {
            log::error!(
                "source: primary {fault}; retrying every {} ms",
                DEVICE_RETRY_BACKOFF_US / 1000
            );
            *failing = true;
        } else {
            log::debug!("source: primary {fault}");
        }
        self.events.push_back(SourceEvent::DeviceFault(fault));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(start: u64, end: u64) -> SourceOp {
        SourceOp::Apply {
            half: 0,
            slot: 0,
            seq: 1,
            start,
            end,
        }
    }

    /// What the filter must answer: the plain scan it short-cuts.
    fn scan(ops: &SourceOps, nsid: u32, start: u64, end: u64) -> bool {
        ops.iter().any(|(op_nsid, op)| {
            let (op_start, op_end) = op.range();
            op_nsid == nsid && op_start < end && start < op_end
        })
    }

    #[test]
    fn the_block_filter_answers_as_the_scan_does_as_ops_start_and_finish() {
        let block = BLOCK_SIZE as u64;
        let mut ops = SourceOps::new(2, 64);
        let mut live = Vec::new();
        let mut rng = crate::test_rng::Rng(0x2545_F491_4F6C_DD1D);
        let mut next = || rng.next();
        let (mut overlapping, mut checks) = (0, 0);
        for round in 0..20_000u64 {
            let nsid = 1 + (next() % 2) as u32;
            // Blocks of a small space (so ranges overlap often) at sector granularity, some of
            // them wider than the filter counts, and flushes (empty ranges).
            let start = (next() % 512) * block + (next() % 8) * 512;
            let length = match next() % 10 {
                0 => 0,
                1 => (FILTER_SPAN_BLOCKS_MAX + 1 + next() % 40) * block,
                _ => 512 * (1 + next() % 16),
            };
            let op = if length == 0 {
                SourceOp::Flush { half: 0 }
            } else {
                apply(start, start + length)
            };
            if ops.has_room(nsid) && round % 3 != 2 {
                live.push(ops.start(nsid, op));
            } else if !live.is_empty() {
                let index = (next() % live.len() as u64) as usize;
                ops.finish(live.swap_remove(index)).expect("live op");
            }
            let (query_start, query_length) = ((next() % 520) * block, 512 * (1 + next() % 24));
            let expected = scan(&ops, nsid, query_start, query_start + query_length);
            assert_eq!(
                ops.overlaps(nsid, query_start, query_start + query_length),
                expected,
                "round {round}: nsid {nsid}, {query_start}+{query_length}"
            );
            overlapping += usize::from(expected);
            checks += 1;
        }
        assert!(overlapping > checks / 10 && overlapping < checks * 9 / 10);
        for id in live.drain(..) {
            ops.finish(id).expect("live op");
        }
        assert!(ops.is_empty() && ops.wide == 0);
        assert!(ops.buckets.iter().all(|&count| count == 0));
    }
}
