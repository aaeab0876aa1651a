//! The source's write path (claims 8-9; engine spec "Source", host writes): range checks, ring
//! reservation with the transfer each entry joins and its dirty-map note. Committed entries go
//! to the primaries as device ops (`apply`).

use super::{logged_write, CpPhase, Source, WriteRefused};
use crate::device::check_extent;
use crate::geometry::{
    half_of_cp, round_down, BLOCK_SIZE, SECTOR_SIZE, TRANSFER_DATA_BYTES_MAX, TRANSFER_ENTRIES_MAX,
};
use crate::ring::{EntryRequest, EntrySlot, RingStore};
use crate::transfer::{LoggedWrite, TransferId, TransferRecord};

impl<M: RingStore> Source<M> {
    pub(super) fn check_range(
        &self,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<(), WriteRefused> {
        if nsid == 0 || nsid as usize > self.namespace_sizes_bytes.len() {
            return Err(WriteRefused::InvalidNamespace);
        }
        if length_bytes == 0 || !length_bytes.is_multiple_of(SECTOR_SIZE as u64) {
            return Err(WriteRefused::InvalidLength);
        }
        let offset_bytes = lba
            .checked_mul(SECTOR_SIZE as u64)
            .ok_or(WriteRefused::OutOfRange)?;
        check_extent(
            &self.namespace_sizes_bytes,
            nsid,
            offset_bytes,
            length_bytes,
        )
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
        if self.writes_fail() {
            return Err(WriteRefused::PeerLost);
        }
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
        if entry.slot() == 0 {
            state.first_seq = header.seq;
        }
        assert_eq!(state.first_seq + u64::from(entry.slot()), header.seq);
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
}
