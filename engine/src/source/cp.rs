//! The source's consistency-point driver (claims 13-14, 17; engine spec "Source", CPs): freezing
//! the active CP into the free half, flushing the primary once every transfer of the frozen CP is
//! acknowledged, emitting its descriptor tables (references to acknowledged transfers, data read
//! from the primary, zeroes) and CpCommit, and releasing the half on CpAck (invariants 2 and 3).

use super::{CpPhase, LinkState, Source, SourceEvent};
use crate::cp::{ConsistencyPoint, Descriptor};
use crate::device::BlockDevice;
use crate::error::LinkError;
use crate::geometry::{half_of_cp, BLOCK_SIZE};
use crate::ring::RingStore;
use crate::wire::{self, Control, Segment};

impl<M: RingStore, D: BlockDevice> Source<M, D> {
    /// Freezes the active CP and opens the next one, if the next half is free.
    pub(super) fn try_freeze(&mut self, now_us: u64) -> bool {
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

    pub(super) fn on_cp_ack(&mut self, now_us: u64, cp_number: u64) -> Result<(), LinkError> {
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
    pub(super) fn complete_cp(&mut self, now_us: u64, cp_number: u64) {
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

    /// Moves the CP in flight along: flush once all its transfers are acked, then descriptor
    /// tables as the send queue has room, then CpCommit.
    pub(super) fn advance_cp(&mut self, _now_us: u64) {
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
}
