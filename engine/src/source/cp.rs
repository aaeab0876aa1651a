//! The source's consistency-point driver (claims 13-14, 17; engine spec "Source", CPs): freezing
//! the active CP into the free half; once every transfer of the frozen CP is acknowledged and
//! its primary writes landed and were flushed (`apply`), emitting its descriptor tables
//! (references to acknowledged transfers, Data blocks read from the primary as device ops,
//! zeroes) at most [`TABLE_WINDOW`] ahead of the destination's TableAcks, then CpCommit, and
//! releasing the half on CpAck (invariants 2 and 3). A CP the destination fails (its mirror
//! could not be written) is planned and sent again after a back-off.

use super::apply::DEVICE_RETRY_BACKOFF_US;
use super::cp_state::{FlushState, TABLE_WINDOW};
use super::{CpPhase, LinkState, Source, SourceEvent};
use crate::cp::{ConsistencyPoint, Descriptor};
use crate::error::{LinkError, ProtocolError};
use crate::geometry::{half_of_cp, BLOCK_SIZE};
use crate::ring::RingStore;
use crate::wire::{self, Control, Segment};

impl<M: RingStore> Source<M> {
    /// Freezes the active CP and opens the next one, if the next half is free.
    pub(super) fn try_freeze(&mut self, now_us: u64) -> bool {
        let active = half_of_cp(self.active_cp);
        if self.cps[1 - active].phase != CpPhase::Free || self.cps[active].phase != CpPhase::Active
        {
            return false;
        }
        self.cps[active].freeze(now_us, self.config.mode);
        self.cp_requested = false;
        self.active_cp += 1;
        self.cps[1 - active].activate(self.active_cp);
        self.cps[1 - active].started_us = now_us;
        true
    }

    pub(super) fn on_cp_ack(&mut self, now_us: u64, cp_number: u64) -> Result<(), LinkError> {
        self.check_awaiting_cp_ack(cp_number, "CpAck")?;
        self.complete_cp(now_us, cp_number);
        Ok(())
    }

    /// The destination could not write CP `cp_number` to its mirror: counted, reported, and
    /// the CP's tables are planned and sent again after the back-off (the link stays up; the
    /// ring keeps every entry of the CP meanwhile).
    pub(super) fn on_cp_failed(&mut self, now_us: u64, cp_number: u64) -> Result<(), LinkError> {
        self.check_awaiting_cp_ack(cp_number, "CpFailed")?;
        self.counters.cp_failure_count += 1;
        log::warn!(
            "source: the destination failed cp {cp_number} (mirror write error); retrying in {} ms",
            DEVICE_RETRY_BACKOFF_US / 1000
        );
        self.cps[half_of_cp(cp_number)].restart_tables();
        self.cp_retry_at_us = now_us + DEVICE_RETRY_BACKOFF_US;
        self.events
            .push_back(SourceEvent::MirrorFailed { cp_number });
        Ok(())
    }

    /// A cumulative TableAck: the destination wrote the mirror blocks of the first `tables`
    /// DescriptorTables of the CP in flight.
    pub(super) fn on_table_ack(&mut self, cp_number: u64, tables: u64) -> Result<(), LinkError> {
        let state = &mut self.cps[half_of_cp(cp_number.max(1))];
        let sending = matches!(state.phase, CpPhase::Committing | CpPhase::AwaitingCpAck);
        if state.cp_number != cp_number
            || !sending
            || tables > state.tables_sent
            || tables < state.tables_acked
        {
            return Err(ProtocolError::TableAckOutOfRange {
                cp_number,
                tables,
                tables_sent: state.tables_sent,
                cp_in_flight: state.cp_number,
            }
            .into());
        }
        state.tables_acked = tables;
        Ok(())
    }

    fn check_awaiting_cp_ack(&self, cp_number: u64, what: &'static str) -> Result<(), LinkError> {
        let state = &self.cps[half_of_cp(cp_number.max(1))];
        if state.cp_number != cp_number || state.phase != CpPhase::AwaitingCpAck {
            return Err(ProtocolError::NotAwaitingCpAck {
                message: what,
                cp_number,
            }
            .into());
        }
        Ok(())
    }

    /// CP `cp_number` is durable on both sides: record it, then release its half (invariant 3).
    pub(super) fn complete_cp(&mut self, now_us: u64, cp_number: u64) {
        let half = half_of_cp(cp_number);
        let state = &mut self.cps[half];
        assert_eq!(
            state.flush,
            FlushState::Done,
            "the primary is durable before a CP completes"
        );
        assert_eq!(state.cp_number, cp_number);
        assert!(
            !self.ops.iter().any(|(_, op)| op.writes_half(half)),
            "every entry of a completing CP landed on the primary (invariant 3)"
        );
        let state = &mut self.cps[half];
        let duration_us = now_us.saturating_sub(state.frozen_us);
        let last_seq =
            (state.first_seq + u64::from(self.ring.reserved_slots(half))).saturating_sub(1);
        self.ring
            .record_cp_completed(cp_number, self.next_transfer_id);
        self.ring.release_half(half);
        state.release();
        self.counters.record_cp_duration(duration_us);
        self.counters.ring_used_bytes = self.ring.used_bytes();
        self.events.push_back(SourceEvent::CpCompleted {
            cp_number,
            duration_us,
            last_seq,
        });
    }

    /// Moves the CP in flight along: once its primary is flushed (all transfers acked, all
    /// entries landed), descriptor tables as the window and the send queue have room, then
    /// CpCommit.
    pub(super) fn advance_cp(&mut self, now_us: u64) {
        let half = 1 - half_of_cp(self.active_cp);
        if self.link != LinkState::Ready {
            return;
        }
        let state = &self.cps[half];
        if state.phase == CpPhase::Frozen && state.flush == FlushState::Done && state.mirrored {
            let cp_number = state.cp_number;
            return self.complete_cp(now_us, cp_number);
        }
        if state.phase == CpPhase::Frozen
            && state.flush == FlushState::Done
            && state.all_acked()
            && now_us >= self.cp_retry_at_us
            && !self.resync_table_out()
        {
            assert_eq!(
                state.applied_slots,
                self.ring.reserved_slots(half),
                "a flushed CP's entries all landed"
            );
            let cp_number = state.cp_number;
            self.cps[half].phase = CpPhase::Committing;
            self.cps[half].planner = Some(ConsistencyPoint::new(cp_number, self.config.mode));
        }
        while self.cps[half].phase == CpPhase::Committing {
            if !self.queue_next_table(now_us, half) {
                return;
            }
        }
    }

    /// Queues the next DescriptorTable (or the CpCommit); false if it cannot now (the window
    /// or the send queue is full, or its Data blocks are still being read).
    fn queue_next_table(&mut self, now_us: u64, half: usize) -> bool {
        let state = &self.cps[half];
        if state.tables_sent - state.tables_acked >= TABLE_WINDOW {
            return false;
        }
        if self.staged.half == Some(half) {
            return self.queue_staged_table(now_us, half);
        }
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
        // Stage the table: its Data blocks are read from the primary as device ops first
        // (none: it is queued on this same call).
        self.staged.clear();
        self.staged.entries.extend_from_slice(&self.table_entries);
        self.staged.data.extend(
            self.table_entries
                .iter()
                .filter(|e| e.descriptor == Descriptor::Data)
                .map(|e| (e.nsid, e.block_index)),
        );
        assert_eq!(self.staged.data.len(), extent.data_blocks);
        self.staged.half = Some(half);
        self.staged.extent = Some(extent);
        self.queue_staged_table(now_us, half)
    }

    /// Queues the staged table once its Data blocks are all read (a failed read: the table is
    /// dropped and staged again after the back-off).
    fn queue_staged_table(&mut self, now_us: u64, half: usize) -> bool {
        if !self.staged.is_read() {
            return false;
        }
        if self.staged.failed {
            self.staged.clear();
            self.cp_retry_at_us = now_us + DEVICE_RETRY_BACKOFF_US;
            return false;
        }
        let entries = &self.staged.entries;
        let length = wire::table_bytes(entries.iter().map(|e| e.descriptor));
        if !self.out.can_push(length, 1) {
            return false;
        }
        let cp_number = self.cps[half].cp_number;
        let (start, _) = self
            .out
            .alloc_inline(length)
            .expect("checked with can_push");
        let message = self.out.inline_mut(start, length);
        let mut at = wire::encode_table_prefix(message, cp_number, entries);
        let blocks = self.staged.data.len() * BLOCK_SIZE;
        message[at..at + blocks].copy_from_slice(&self.staged.blocks[..blocks]);
        at += blocks;
        assert_eq!(at, length, "a table is its prefix and its Data blocks");
        wire::seal_message(message);
        self.out.push(Segment::Inline {
            start: start as u32,
            len: length as u32,
        });
        self.table_entries.clear();
        self.table_entries.extend_from_slice(&self.staged.entries);
        self.count_descriptors();
        let extent = self.staged.extent.expect("a staged table has its extent");
        self.staged.clear();
        let state = &mut self.cps[half];
        state.planner.as_mut().expect("committing").advance(&extent);
        state.tables_sent += 1;
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
