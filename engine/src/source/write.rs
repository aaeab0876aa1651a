//! The source's write path (claims 8-9; engine spec "Source", host writes): range checks, ring
//! reservation with the transfer each entry joins and its dirty-map note, and write-through of the
//! committed prefix onto the primary namespaces in seq order (aborted reservations committed as
//! a rewrite of the primary's current content). A failing primary stops CPs, never writes.

use super::{apply_entry, logged_write, CpPhase, Source, SourceEvent, WriteRefused};
use crate::device::{check_extent, BlockDevice};
use crate::geometry::{
    half_of_cp, round_down, BLOCK_SIZE, SECTOR_SIZE, TRANSFER_DATA_BYTES_MAX, TRANSFER_ENTRIES_MAX,
};
use crate::ring::{EntryRequest, EntrySlot, RingStore};
use crate::transfer::{LoggedWrite, TransferId, TransferRecord};

impl<M: RingStore, D: BlockDevice> Source<M, D> {
    pub(super) fn check_range(
        &self,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<(), WriteRefused> {
        if nsid == 0 || nsid as usize > self.primaries.len() {
            return Err(WriteRefused::InvalidNamespace);
        }
        if length_bytes == 0 || !length_bytes.is_multiple_of(SECTOR_SIZE as u64) {
            return Err(WriteRefused::InvalidLength);
        }
        let offset_bytes = lba
            .checked_mul(SECTOR_SIZE as u64)
            .ok_or(WriteRefused::OutOfRange)?;
        check_extent(&self.primaries, nsid, offset_bytes, length_bytes)
            .map_err(|_| WriteRefused::OutOfRange)
    }

    pub(super) fn reserve_entry(
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
        // Recovery and freezing always leave the half that takes new entries active.
        assert_eq!(state.phase, CpPhase::Active, "entries go to the active CP");
        assert_eq!(state.cp_number, header.cp_number);
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
    pub(super) fn apply_committed(&mut self) {
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
                if !self.commit_aborted(index) {
                    // The entry's bytes are unknown: nothing after it is applied or sent.
                    return;
                }
                return self.apply_committed();
            }
            if self.cps[half].applied_slots < self.ring.reserved_slots(half) {
                return;
            }
        }
    }

    /// Commits aborted entry `index` with the primary's current content of its range. If that
    /// content cannot be read the entry stays aborted and uncommitted (its slot holds a host's
    /// partial data or old ring bytes, which must never be applied, sent or replayed) and
    /// applying stops there; returns whether it was committed.
    fn commit_aborted(&mut self, index: usize) -> bool {
        let header = *self.aborted[index].header();
        let primary = &mut self.primaries[header.nsid as usize - 1];
        let data = self.ring.data_mut(&self.aborted[index]);
        if let Err(error) = primary.read_at(header.offset_bytes(), data) {
            self.fail_device(format!(
                "primary namespace {}: read for an aborted write: {error}",
                header.nsid
            ));
            return false;
        }
        let entry = self.aborted.swap_remove(index);
        self.ring.commit(&entry);
        true
    }

    pub(super) fn fail_device(&mut self, text: String) {
        if self.device_failed {
            log::debug!("source: {text}");
            return;
        }
        log::error!("source: {text}; consistency points stop");
        {
            self.device_failed = true;
            self.events.push_back(SourceEvent::DeviceFailed(text));
        }
    }
}
