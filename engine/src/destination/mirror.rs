//! The destination's device I/O (claims 6, 15, 16; invariants 7 and 8): the mirror writes of
//! received DescriptorTables (a reference's block straight from the log, a Data block from
//! staging, zeroes) and the mirror flush of a committed CP, as device ops.
//!
//! Within one CP every block has one descriptor, so its mirror writes never overlap and may
//! complete in any order; a CP's flush waits for every mirror write in flight, of this session
//! or an earlier one, so nothing of an older attempt lands after it. A failed mirror op fails
//! its CP: the remaining writes of the CP are dropped, and its CpCommit is answered with
//! CpFailed (the source plans the CP again); the link stays up and the log keeps every entry.

use super::{Destination, DestinationEvent};
use crate::device::{DeviceCompletion, DeviceError, DeviceOp, DeviceOpKind, DeviceRequest};
use crate::geometry::{half_of_cp, BLOCK_SIZE};
use crate::ring::RingStore;
use crate::source::DeviceFault;
use crate::wire::Control;

/// Where a mirror block's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MirrorSource {
    /// Our own log, at this ring offset (a reference).
    Log {
        ring_offset: u64,
    },
    /// Staging block `block` (a Data descriptor).
    Staged {
        block: u16,
    },
    Zeroes,
}

/// One queued mirror write: a 4 KiB block of namespace `nsid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MirrorWrite {
    pub nsid: u32,
    pub offset_bytes: u64,
    pub from: MirrorSource,
    /// The table (of the CP being applied) it came with.
    pub table: u64,
}

/// What a destination device op is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DestinationOp {
    Mirror {
        session: u32,
        table: u64,
        staged: Option<u16>,
        offset_bytes: u64,
    },
    Flush {
        session: u32,
    },
    /// A mirror flush of the ResyncTable being applied.
    ResyncFlush {
        session: u32,
    },
}

impl<M: RingStore> Destination<M> {
    /// The next device op to submit to its mirror namespace, if any.
    #[must_use]
    pub fn poll_device_op(&mut self, _now_us: u64) -> Option<DeviceOp<'_>> {
        if let Some(op) = self.next_flush() {
            return Some(op);
        }
        if let Some(op) = self.next_resync_flush() {
            return Some(op);
        }
        let write = *self.pending.front()?;
        if !self.ops.has_room(write.nsid) {
            return None;
        }
        self.pending.pop_front();
        let staged = match write.from {
            MirrorSource::Staged { block } => Some(block),
            _ => None,
        };
        let id = self.ops.start(
            write.nsid,
            DestinationOp::Mirror {
                session: self.session,
                table: write.table,
                staged,
                offset_bytes: write.offset_bytes,
            },
        );
        let request = match write.from {
            MirrorSource::Log { ring_offset } => DeviceRequest::Write {
                offset_bytes: write.offset_bytes,
                data: self.ring.bytes(ring_offset, BLOCK_SIZE),
            },
            MirrorSource::Staged { block } => {
                let at = usize::from(block) * BLOCK_SIZE;
                DeviceRequest::Write {
                    offset_bytes: write.offset_bytes,
                    data: &self.staging[at..at + BLOCK_SIZE],
                }
            }
            MirrorSource::Zeroes => DeviceRequest::WriteZeroes {
                offset_bytes: write.offset_bytes,
                length_bytes: BLOCK_SIZE as u64,
            },
        };
        Some(DeviceOp {
            id,
            nsid: write.nsid,
            request,
        })
    }

    /// Takes the completion of an op from `poll_device_op`.
    pub fn handle_device_completion(&mut self, now_us: u64, completion: DeviceCompletion<'_>) {
        let (nsid, op) = self
            .ops
            .finish(completion.id)
            .expect("a completion of an op the destination submitted, once");
        let error = completion.result.err();
        if error.is_none() {
            self.failing[nsid as usize - 1] = false;
        }
        match op {
            DestinationOp::Mirror {
                session,
                table,
                staged,
                offset_bytes,
            } => {
                if let Some(block) = staged {
                    self.staging_free.push(block);
                }
                match error {
                    Some(error) => {
                        self.report(now_us, nsid, DeviceOpKind::Write, offset_bytes, error)
                    }
                    None => self.counters.mirror_bytes_written += BLOCK_SIZE as u64,
                }
                if session == self.session && table == super::resync::RESYNC_TABLE {
                    self.on_resync_written(error.is_some());
                } else if session == self.session {
                    self.on_mirror_written(table, error.is_some());
                }
                self.maybe_send_hello_ack();
            }
            DestinationOp::Flush { session } => {
                if let Some(error) = error {
                    self.report(now_us, nsid, DeviceOpKind::Flush, 0, error);
                }
                if session == self.session {
                    assert!(self.flushes_remaining > 0);
                    self.flushes_remaining -= 1;
                    self.flush_failed |= error.is_some();
                }
            }
            DestinationOp::ResyncFlush { session } => {
                if let Some(error) = error {
                    self.report(now_us, nsid, DeviceOpKind::Flush, 0, error);
                }
                if session == self.session {
                    self.on_resync_flushed(error.is_some());
                }
            }
        }
        self.advance_commit();
    }

    fn on_mirror_written(&mut self, table: u64, failed: bool) {
        if failed && !self.cp_failed {
            self.cp_failed = true;
            // The CP fails at its CpCommit: nothing more of it is written.
            self.unqueue_from(0);
            for entry in &mut self.tables {
                entry.1 = 0;
            }
        }
        if let Some(entry) = self.tables.iter_mut().find(|entry| entry.0 == table) {
            entry.1 = entry.1.saturating_sub(1);
        }
        self.ack_done_tables();
    }

    /// Cumulative TableAck for the tables whose mirror writes all completed, in order.
    pub(super) fn ack_done_tables(&mut self) {
        let before = self.tables_done;
        while self
            .tables
            .front()
            .is_some_and(|&(_, remaining)| remaining == 0)
        {
            self.tables.pop_front();
            self.tables_done += 1;
        }
        if self.tables_done > before {
            let cp_number = self.ring.superblock().cp_completed + 1;
            self.push_control(Control::TableAck {
                cp_number,
                tables: self.tables_done,
            });
        }
    }

    /// A mirror op of any session is in flight.
    pub(super) fn mirror_writes_inflight(&self) -> bool {
        self.ops
            .iter()
            .any(|(_, op)| matches!(op, DestinationOp::Mirror { .. }))
    }

    /// The committing CP's next flush, once every mirror write of it completed.
    fn next_flush(&mut self) -> Option<DeviceOp<'static>> {
        self.commit_pending?;
        let namespaces = self.namespace_sizes_bytes.len() as u32;
        if self.cp_failed
            || self.flushes_issued == namespaces
            || !self.pending.is_empty()
            || self.mirror_writes_inflight()
        {
            return None;
        }
        let nsid = self.flushes_issued + 1;
        if !self.ops.has_room(nsid) {
            return None;
        }
        self.flushes_issued += 1;
        self.flushes_remaining += 1;
        let id = self.ops.start(
            nsid,
            DestinationOp::Flush {
                session: self.session,
            },
        );
        Some(DeviceOp {
            id,
            nsid,
            request: DeviceRequest::Flush,
        })
    }

    /// Finishes the committing CP once its writes and flushes are done: recorded and
    /// acknowledged (its log half released), or failed.
    pub(super) fn advance_commit(&mut self) {
        let Some(cp_number) = self.commit_pending else {
            return;
        };
        if !self.pending.is_empty() || self.mirror_writes_inflight() {
            return;
        }
        let namespaces = self.namespace_sizes_bytes.len() as u32;
        if !self.cp_failed && (self.flushes_issued < namespaces || self.flushes_remaining > 0) {
            return;
        }
        if self.cp_failed || self.flush_failed {
            self.counters.cp_failure_count += 1;
            log::warn!(
                "destination: cp {cp_number} failed on the mirror; the source sends it again"
            );
            self.push_control(Control::CpFailed { cp_number });
            self.restart_cp();
            return;
        }
        let half = half_of_cp(cp_number);
        let transfer_floor = self.transfers[half].last().map_or(0, |&(id, _)| id.0 + 1);
        self.ring.record_cp_completed(cp_number, transfer_floor);
        self.ring.release_half(half);
        self.transfers[half].clear();
        self.counters.cp_count += 1;
        self.push_control(Control::CpAck { cp_number });
        self.events
            .push_back(DestinationEvent::CpApplied { cp_number });
        self.restart_cp();
    }

    fn report(
        &mut self,
        _now_us: u64,
        nsid: u32,
        kind: DeviceOpKind,
        offset_bytes: u64,
        error: DeviceError,
    ) {
        let fault = DeviceFault {
            nsid,
            kind,
            offset_bytes,
            length_bytes: if kind == DeviceOpKind::Flush {
                0
            } else {
                BLOCK_SIZE as u64
            },
            error,
            purpose: if kind == DeviceOpKind::Flush {
                "mirror flush"
            } else {
                "mirror write"
            },
        };
        self.counters.device_error_count += 1;
        let failing = &mut self.failing[nsid as usize - 1];
        if !*failing {
            log::error!("destination: mirror {fault}; the CP fails and is sent again");
            *failing = true;
        } else {
            log::debug!("destination: mirror {fault}");
        }
        self.events.push_back(DestinationEvent::DeviceFault(fault));
    }

    /// Device ops in flight per namespace at most.
    pub(super) fn ops_depth(&self) -> u32 {
        self.ops.depth()
    }

    /// Every device op finished (what a promotion, or a stop, waits for).
    pub fn device_ops_idle(&self) -> bool {
        self.ops.is_empty()
    }
}
