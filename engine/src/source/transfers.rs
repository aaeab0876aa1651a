//! The source's link session and data transfers (claims 8-10; engine spec "Source", link): the
//! Hello / HelloAck handshake (including a CP the destination completed whose CpAck was lost),
//! sending closed, fully committed transfers in order with entry data straight from ring memory,
//! and completing host writes when their transfer is acknowledged (invariant 1).

use super::cp_state::FlushState;
use super::{CpPhase, LinkState, Source, SourceEvent, WriteId};
use crate::error::{LinkError, ProtocolError};
use crate::generation::{
    settle, Generations, Hex, FLAG_ASSUME_IDENTICAL, FLAG_ASSUME_IDENTICAL_CONSUMED,
};
use crate::geometry::{half_of_cp, BLOCK_SIZE, SECTOR_SIZE};
use crate::ring::RingStore;
use crate::transfer::{TransferId, TransferRecord};
use crate::wire::{self, Hello, Segment, TransferHeader, WireEntry};

impl<M: RingStore> Source<M> {
    pub(super) fn reset_session(&mut self) {
        for state in &mut self.cps {
            state.reset_session();
        }
        self.staged.clear();
        self.reset_resync_session();
    }

    pub(super) fn hello(&self) -> Hello {
        let mut namespace_sizes_bytes = [0; crate::geometry::NAMESPACES_MAX];
        for (size, &ours) in namespace_sizes_bytes
            .iter_mut()
            .zip(&self.namespace_sizes_bytes)
        {
            *size = ours;
        }
        Hello {
            protocol_version: u32::from(wire::PROTOCOL_VERSION),
            block_size: BLOCK_SIZE as u32,
            sector_size: SECTOR_SIZE as u32,
            mode: self.config.mode,
            volume_id: self.config.volume_id,
            proposed_generation: self.metadata.proposed_generation(),
            generations: self.wire_generations(),
            cp_completed: self.ring.superblock().cp_completed,
            geometry: self.ring.geometry(),
            namespace_count: self.namespace_sizes_bytes.len() as u8,
            namespace_sizes_bytes,
        }
    }

    /// Our generations as the Hello carries them (with our `assume_identical` wish).
    fn wire_generations(&self) -> Generations {
        let mut generations = *self.metadata.generations();
        if self.config.assume_identical && generations.flags & FLAG_ASSUME_IDENTICAL_CONSUMED == 0 {
            generations.flags |= FLAG_ASSUME_IDENTICAL;
        }
        generations
    }

    pub(super) fn on_hello_ack(
        &mut self,
        now_us: u64,
        destination_cp: u64,
        destination: &Generations,
    ) -> Result<(), LinkError> {
        // The destination settled the same pair (our Hello, its generations as they were) and
        // accepted it; we settle it too, so a refusal stands on both sides whatever a peer says.
        let ours = self.wire_generations();
        let assume_identical = ours.flags & destination.flags & FLAG_ASSUME_IDENTICAL != 0;
        let settlement = match settle(
            &ours,
            destination,
            assume_identical,
            self.metadata.proposed_generation(),
        ) {
            Ok(settlement) => settlement,
            Err((refusal, text)) => {
                self.link = LinkState::Rejected;
                log::error!("source: refusing the destination: {text}");
                self.events
                    .push_back(SourceEvent::LinkRejected(text.clone()));
                return Err(LinkError::RejectedPeer {
                    reason: crate::destination::reject_reason(refusal),
                    text,
                });
            }
        };
        let superblock = *self.ring.superblock();
        if destination_cp == superblock.cp_completed + 1 {
            // The destination applied and recorded CP c+1 but its CpAck was lost: it is durable on
            // the mirror, and on our primary once flushed (before the CP was sent, or, for a CP
            // recovered from the ring, once its entries landed again).
            let half = half_of_cp(destination_cp);
            let state = &mut self.cps[half];
            // Only a CP that was flushed (in this process or before its crash) can have been
            // committed and so applied over there; anything else is the peer's error, never a
            // reason to trip complete_cp's asserts.
            if state.cp_number != destination_cp
                || matches!(state.phase, CpPhase::Free | CpPhase::Active)
                || (state.flush != FlushState::Done && !state.recovered)
            {
                return Err(ProtocolError::CompletedUncommittedCp {
                    cp_number: destination_cp,
                }
                .into());
            }
            if state.flush == FlushState::Done {
                self.complete_cp(now_us, destination_cp);
            } else {
                // Completed over there: nothing of it is sent again; it completes here once its
                // entries landed on the primary and were flushed.
                state.mirrored = true;
                state.restart_tables();
                state.sent_count = state.transfers.len();
                state.acked_count = state.sent_count;
            }
        } else if destination_cp != superblock.cp_completed {
            return Err(ProtocolError::HelloAckCp {
                theirs: destination_cp,
                ours: superblock.cp_completed,
            }
            .into());
        }
        if settlement.source_adopts {
            log::info!(
                "source: taking generation {}{}",
                Hex(settlement.generation),
                if settlement.assumed_identical {
                    " (assume_identical: the devices are declared identical)"
                } else {
                    ""
                }
            );
        }
        if settlement.source_adopts || settlement.assumed_identical {
            // Also when the destination took our generation: our metadata records the key used.
            self.settle_seq = self
                .metadata
                .adopt(settlement.generation, settlement.assumed_identical);
        }
        if let Some(kind) = settlement.resync {
            self.start_resync(now_us, kind);
        } else if let Some(resync) = self.retire_resync() {
            // It took our generation at a ResyncDone whose ack we never heard.
            self.resync_finished(now_us, &resync);
        } else {
            self.forget_orphan_marks();
        }
        // Transfers flow once every generation change of ours is durable (`handle_tick`).
        self.link = LinkState::Settling;
        self.hello_grace_us = super::hello_grace_least_us(&self.config);
        if self.metadata.durable_through() >= self.settle_seq {
            self.become_ready(now_us);
        }
        Ok(())
    }

    /// Generations settled and durable: transfers flow, and the role is settled (a runtime
    /// serves hosts from the first LinkReady on).
    pub(super) fn become_ready(&mut self, now_us: u64) {
        self.link = LinkState::Ready;
        // Writes are synchronous again: entries of the degraded time are resent and mirrored by
        // their CPs (their extents are in the bitmap anyway); while references into the
        // destination's old log are outstanding, new writes wait in the ring for their transfers.
        self.degrade = None;
        self.on_peer_ready(now_us);
        self.events.push_back(SourceEvent::LinkReady);
        self.send_transfers();
    }

    /// A cumulative TransferAck: checked first (the transfer was sent and awaits its ack),
    /// only then are the writes of it and every earlier transfer completed (invariant 1).
    pub(super) fn on_transfer_ack(
        &mut self,
        now_us: u64,
        transfer_id: TransferId,
    ) -> Result<(), LinkError> {
        let halves = self.halves_in_order();
        if !halves
            .into_iter()
            .any(|half| self.cps[half].awaiting_ack(transfer_id))
        {
            return Err(ProtocolError::AckNotAwaited {
                transfer_id: transfer_id.0,
            }
            .into());
        }
        for half in halves {
            while let Some(record) = self.cps[half].next_unacked_sent() {
                if record.id > transfer_id {
                    break;
                }
                let state = &mut self.cps[half];
                state.acked_count += 1;
                state.acked_ever = state.acked_ever.max(state.acked_count);
                self.complete_writes(half, &record);
            }
        }
        self.on_ack_progress(now_us);
        Ok(())
    }

    /// Emits WriteCompleted for the writes of an acknowledged transfer (invariant 1).
    fn complete_writes(&mut self, half: usize, record: &TransferRecord) {
        let last_seq = record.first_seq + u64::from(record.entry_count) - 1;
        assert!(
            record.first_slot + record.entry_count <= self.ring.committed_slots(half),
            "acked entries are in the ring"
        );
        // Entries at or below completed_through_seq completed before (an earlier session, or
        // before a restart: it starts at the recovered ring's end).
        let first = record.first_seq.max(self.completed_through_seq + 1);
        for seq in first..=last_seq {
            self.events
                .push_back(SourceEvent::WriteCompleted(WriteId(seq)));
        }
        self.completed_through_seq = self.completed_through_seq.max(last_seq);
    }

    /// Queues closed, fully committed transfers in order (the CP in flight first).
    pub(super) fn send_transfers(&mut self) {
        if self.link != LinkState::Ready || self.transfers_held_for_resync() {
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
}
