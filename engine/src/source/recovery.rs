//! Source start and crash recovery (engine spec "Source::open"): open or format the ring, check
//! the entries newer than the last completed CP against the namespaces, and rebuild the transfer
//! tables and dirty maps from the entry headers so the entries are applied to the primaries
//! again (as device ops, in seq order, before their CP flushes), resent, and then mirrored with
//! references exactly as if the process had never stopped.

use super::{logged_write, CpPhase, Source, SourceConfig};
use crate::error::EngineError;
use crate::geometry::{half_of_cp, round_down, BLOCK_SIZE};
use crate::open::{check_namespaces, check_replay, open_or_format};
use crate::ring::{EntryHeader, RingStore};
use crate::transfer::{TransferId, TransferRecord};

/// What `Source::open` found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The ring had no valid superblock and was formatted.
    pub formatted: bool,
    /// Entries newer than the last completed CP, applied to the primaries again after open.
    pub entries_replayed: u64,
    pub bytes_replayed: u64,
    pub cp_completed: u64,
    pub epoch: u64,
}

impl<M: RingStore> Source<M> {
    /// Opens (or formats) the ring for primaries of `namespace_sizes_bytes`; rebuilds dirty maps
    /// / transfer tables from the entries newer than the last completed CP, so they are applied
    /// to the primaries again (device ops from `poll_device_op`, in seq order), resent and then
    /// CP'd with references.
    pub fn open(
        config: SourceConfig,
        ring: M,
        namespace_sizes_bytes: &[u64],
        metadata: crate::metadata::NodeMetadata,
        now_us: u64,
    ) -> Result<(Self, RecoveryReport), EngineError> {
        check_namespaces(namespace_sizes_bytes)?;
        assert!(
            (1..=super::DEVICE_QUEUE_DEPTH_MAX).contains(&config.device_queue_depth),
            "device queue depth checked with the config"
        );
        let (ring, entries, formatted) = open_or_format(ring, config.volume_id)?;
        let bytes_replayed = check_replay(namespace_sizes_bytes, &entries)?;
        let report = RecoveryReport {
            formatted,
            entries_replayed: entries.len() as u64,
            bytes_replayed,
            cp_completed: ring.superblock().cp_completed,
            epoch: ring.superblock().epoch,
        };
        let mut source = Self::build(now_us, config, ring, namespace_sizes_bytes, metadata);
        source.rebuild(&entries, now_us);
        log::info!(
            "source: opened at cp {} generation {}, {} entries ({} bytes) to apply again",
            report.cp_completed,
            crate::generation::Hex(source.metadata.generations().current),
            report.entries_replayed,
            report.bytes_replayed
        );
        Ok((source, report))
    }

    /// Recreates the CP states of the recovered entries: CP c+1 frozen (flushed once its entries
    /// landed again), CP c+2 (if it has entries) active, else a fresh active CP. No entry is
    /// applied yet: the apply cursor of both halves starts at their first slot.
    fn rebuild(&mut self, entries: &[EntryHeader], now_us: u64) {
        let completed = self.ring.superblock().cp_completed;
        let first = completed + 1;
        for cp_number in [first, first + 1] {
            let cp_entries: Vec<&EntryHeader> = entries
                .iter()
                .filter(|e| e.cp_number == cp_number)
                .collect();
            if cp_entries.is_empty() {
                continue;
            }
            let state = &mut self.cps[half_of_cp(cp_number)];
            state.activate(cp_number);
            state.started_us = now_us;
            state.first_seq = cp_entries[0].seq;
            for (slot, header) in cp_entries.iter().enumerate() {
                let starts_transfer = state.transfers.is_empty()
                    || state.transfers.get(state.transfers.len() - 1).id
                        != TransferId(header.transfer_id);
                if starts_transfer {
                    state.transfers.push(TransferRecord {
                        id: TransferId(header.transfer_id),
                        first_seq: header.seq,
                        first_slot: slot as u32,
                        entry_count: 0,
                        data_bytes: 0,
                        base_offset: round_down(u64::from(header.data_offset), BLOCK_SIZE as u64)
                            as u32,
                    });
                }
                let table_index = state.transfers.len() - 1;
                let record = state.transfers.get_mut(table_index);
                record.entry_count += 1;
                record.data_bytes += header.data_bytes();
                let write = logged_write(header, table_index, record.base_offset);
                state
                    .dirty
                    .note_write(&write)
                    .expect("recovered entries fit the dirty map they came from");
                self.next_transfer_id = self.next_transfer_id.max(header.transfer_id + 1);
            }
            assert_eq!(state.applied_slots, 0);
        }
        let first_state = &mut self.cps[half_of_cp(first)];
        if first_state.phase == CpPhase::Active {
            first_state.freeze(now_us, self.config.mode);
            first_state.recovered = true;
            self.active_cp = first + 1;
        } else {
            self.active_cp = first;
        }
        let active = &mut self.cps[half_of_cp(self.active_cp)];
        if active.phase == CpPhase::Free {
            active.activate(self.active_cp);
            active.started_us = now_us;
        }
    }
}
