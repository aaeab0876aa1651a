//! The destination's side of a resync (invariant 9): a session the handshake settled on a
//! resync keeps the old log (the source's references point into it) until the first transfer
//! of the new session, adopts the source's CP numbering, and applies ResyncTables one at a time,
//! never while a CP is being applied: each block from the table (Data) or from the old log (a
//! Reference), all written, then every mirror flushed, then ResyncAck. This node is marked a
//! resync target (durably, before the first block is written) until ResyncDone hands it the
//! source's generation: a half-resynced mirror is no point-in-time image and is not promoted.

use super::mirror::{MirrorSource, MirrorWrite};
use super::Destination;
use crate::cp::Descriptor;
use crate::device::{DeviceOp, DeviceRequest};
use crate::error::{LinkError, ProtocolError};
use crate::generation::{Hex, FLAG_RESYNC_TARGET};
use crate::ring::RingStore;
use crate::wire::{
    encode_resync_marks, resync_marks_bytes, Control, DescriptorTableMessage,
    RESYNC_MARKS_PER_MESSAGE,
};

/// The `table` of a queued mirror write that belongs to the ResyncTable being applied.
pub(super) const RESYNC_TABLE: u64 = u64::MAX;

/// The ResyncTable being applied.
#[derive(Debug)]
pub(super) struct ResyncApply {
    pub number: u64,
    /// Mirror writes still to complete.
    pub remaining: u32,
    pub failed: bool,
    pub flushes_issued: u32,
    pub flushes_remaining: u32,
}

impl<M: RingStore> Destination<M> {
    /// The handshake settled on a resync: the old log stays for references, the CP numbering
    /// becomes the source's, and this node is a resync target from now on.
    pub(super) fn begin_resync_session(&mut self, source_cp_completed: u64) {
        let ours = self.ring.superblock().cp_completed;
        if source_cp_completed > ours {
            // The source completed CPs on its own; what our log holds of them comes again as
            // resync blocks. The halves are released at the first transfer, not now.
            let floor = self.ring.superblock().transfer_id_floor;
            self.ring.record_cp_completed(source_cp_completed, floor);
        }
        self.resync_session = true;
        self.old_log_kept = true;
        if self.metadata.generations().flags & FLAG_RESYNC_TARGET == 0 {
            log::warn!(
                "destination: resync from the source begins; this mirror is inconsistent until \
                 it ends (generation {} is kept until then)",
                Hex(self.metadata.generations().current)
            );
            let seq = self.metadata.set_flag(FLAG_RESYNC_TARGET, true);
            self.ack_metadata_seq = self.ack_metadata_seq.max(seq);
        }
    }

    /// In a resync session, right after the HelloAck: the extents this node changed itself that
    /// the source may lack, as many ResyncMarks as fit now (the rest at the next tick).
    pub(super) fn push_resync_marks(&mut self) {
        while let Some(cursor) = self.marks_cursor {
            let mut extents = Vec::with_capacity(RESYNC_MARKS_PER_MESSAGE);
            let mut next = cursor;
            while extents.len() < RESYNC_MARKS_PER_MESSAGE {
                match self.metadata.next_marked(next) {
                    Some((bit, nsid, offset, length)) => {
                        extents.push((nsid, offset, length));
                        next = bit + 1;
                    }
                    None => break,
                }
            }
            let last = extents.len() < RESYNC_MARKS_PER_MESSAGE
                || self.metadata.next_marked(next).is_none();
            let length = resync_marks_bytes(extents.len());
            if self
                .out
                .push_inline(length, |bytes| encode_resync_marks(bytes, last, &extents))
                .is_err()
            {
                return;
            }
            self.marks_cursor = (!last).then_some(next);
        }
    }

    /// The first transfer of a resync session: the old log is not referenced any more.
    pub(super) fn drop_old_log(&mut self) {
        if !self.old_log_kept {
            return;
        }
        self.old_log_kept = false;
        for half in 0..2 {
            if self.ring.half_cp(half) <= self.ring.superblock().cp_completed {
                self.ring.release_half(half);
            } else {
                self.ring.rewind_half(half);
            }
            self.transfers[half].clear();
        }
    }

    pub(super) fn on_resync_table(
        &mut self,
        table: &DescriptorTableMessage<'_>,
    ) -> Result<(), LinkError> {
        if !self.resync_session {
            return Err(ProtocolError::Resync {
                what: "a ResyncTable outside a resync session",
            }
            .into());
        }
        if self.resync_apply.is_some()
            || !self.tables.is_empty()
            || self.commit_pending.is_some()
            || self.tables_received != 0
        {
            return Err(ProtocolError::Resync {
                what: "a ResyncTable while a table or CP is being applied",
            }
            .into());
        }
        let queued_before = self.pending.len();
        let mut writes = 0;
        let mut references_missing = false;
        for (entry, data) in table.descriptors() {
            let offset_bytes = self.table_entry_offset(&entry, queued_before)?;
            let from = match entry.descriptor {
                Descriptor::Reference {
                    transfer_id,
                    block_number,
                } => match self.resolve_in_old_log(transfer_id, block_number) {
                    Some(ring_offset) => MirrorSource::Log { ring_offset },
                    None => {
                        references_missing = true;
                        break;
                    }
                },
                Descriptor::Data => {
                    self.stage_data_block(data.expect("Data descriptors carry a block"))
                }
                Descriptor::Zeroes => MirrorSource::Zeroes,
            };
            writes += 1;
            self.pending.push_back(MirrorWrite {
                nsid: entry.nsid,
                offset_bytes,
                from,
                table: RESYNC_TABLE,
            });
        }
        if references_missing {
            // Our old log is gone (a restart) or no longer holds them: nothing of the table is
            // written; the source sends those blocks as data.
            self.unqueue_from(queued_before);
            self.push_control(Control::ResyncAck {
                resync_number: table.cp_number,
                failed: true,
            });
            return Ok(());
        }
        self.counters.resync_blocks_applied += u64::from(writes);
        self.resync_apply = Some(ResyncApply {
            number: table.cp_number,
            remaining: writes,
            failed: false,
            flushes_issued: 0,
            flushes_remaining: 0,
        });
        Ok(())
    }

    /// The ring offset of a block of a transfer our old log holds (either half).
    fn resolve_in_old_log(
        &self,
        transfer_id: crate::transfer::TransferId,
        block_number: u32,
    ) -> Option<u64> {
        if !self.old_log_kept {
            return None;
        }
        (0..2).find_map(|half| {
            super::resolve(
                &self.ring,
                &self.transfers[half],
                half,
                transfer_id,
                block_number,
            )
            .ok()
        })
    }

    /// A resync mirror write completed.
    pub(super) fn on_resync_written(&mut self, failed: bool) {
        if let Some(apply) = self.resync_apply.as_mut() {
            apply.remaining -= 1;
            apply.failed |= failed;
        }
        self.advance_resync_apply();
    }

    pub(super) fn on_resync_flushed(&mut self, failed: bool) {
        if let Some(apply) = self.resync_apply.as_mut() {
            assert!(apply.flushes_remaining > 0);
            apply.flushes_remaining -= 1;
            apply.failed |= failed;
        }
        self.advance_resync_apply();
    }

    /// The next mirror flush of the resync table, once its writes are all done.
    pub(super) fn next_resync_flush(&mut self) -> Option<DeviceOp<'static>> {
        let namespaces = self.namespace_sizes_bytes.len() as u32;
        let apply = self.resync_apply.as_ref()?;
        if apply.remaining > 0 || apply.failed || apply.flushes_issued == namespaces {
            return None;
        }
        let nsid = apply.flushes_issued + 1;
        if !self.ops.has_room(nsid) {
            return None;
        }
        let session = self.session;
        let apply = self.resync_apply.as_mut().expect("checked");
        apply.flushes_issued += 1;
        apply.flushes_remaining += 1;
        let id = self
            .ops
            .start(nsid, super::mirror::DestinationOp::ResyncFlush { session });
        Some(DeviceOp {
            id,
            nsid,
            request: DeviceRequest::Flush,
        })
    }

    /// Answers the table once written and flushed (or failed).
    fn advance_resync_apply(&mut self) {
        let namespaces = self.namespace_sizes_bytes.len() as u32;
        let Some(apply) = self.resync_apply.as_ref() else {
            return;
        };
        let done = apply.remaining == 0
            && apply.flushes_remaining == 0
            && (apply.failed || apply.flushes_issued == namespaces);
        if done {
            let (number, failed) = (apply.number, apply.failed);
            self.resync_apply = None;
            self.push_control(Control::ResyncAck {
                resync_number: number,
                failed,
            });
        }
    }

    /// The source says the resync is done: take its generation (durably), then answer.
    pub(super) fn on_resync_done(&mut self, generation: u64) -> Result<(), LinkError> {
        if !self.resync_session || self.resync_apply.is_some() {
            return Err(ProtocolError::Resync {
                what: "a ResyncDone outside a resync or with a table in flight",
            }
            .into());
        }
        log::warn!(
            "destination: resync done; taking the source's generation {}: the mirror is \
             consistent again",
            Hex(generation)
        );
        let _ = self.metadata.adopt(generation, false);
        // What this node changed itself is overwritten by the source's content now.
        let _ = self.metadata.clear_all();
        let _ = self.metadata.set_bitmap_base(0);
        let seq = self.metadata.set_flag(FLAG_RESYNC_TARGET, false);
        self.resync_session = false;
        self.resync_done_pending = Some((generation, seq));
        self.maybe_send_resync_done_ack();
        Ok(())
    }

    pub(super) fn maybe_send_resync_done_ack(&mut self) {
        if let Some((generation, seq)) = self.resync_done_pending {
            if self.metadata.durable_through() >= seq {
                self.resync_done_pending = None;
                self.push_control(Control::ResyncDoneAck { generation });
            }
        }
    }
}
