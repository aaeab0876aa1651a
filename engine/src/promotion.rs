//! Failover of a destination (invariants 4 and 6): its log's entries newer than the last
//! completed CP are written to the mirror namespaces in seq order (device ops: an entry waits
//! while an earlier overlapping one is in flight), the mirrors are flushed, then the entries are
//! recorded as completed and the epoch bumped, so the mirror holds every acknowledged write and
//! a stale former source is refused.
//!
//! Call order: [`crate::Destination::promote`]; submit every `poll_device_op` and hand back each
//! completion until `is_done`; then `finish`. A failing mirror op stops the promotion with the
//! error (nothing is recorded: promoting again replays the same entries).

use crate::device::{DeviceCompletion, DeviceError, DeviceOp, DeviceRequest, InflightOps};
use crate::error::EngineError;
use crate::open::check_replay;
use crate::ring::{EntryHeader, NvramRing, RingStore};

/// What a promotion replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromoteReport {
    pub entries_replayed: u64,
    pub bytes_replayed: u64,
    pub cp_completed: u64,
    pub epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PromoteOp {
    Replay { start: u64, end: u64 },
    Flush,
}

/// A promotion in progress.
pub struct Promotion<M> {
    ring: NvramRing<M>,
    entries: Vec<EntryHeader>,
    /// Entries submitted so far (in seq order).
    next: usize,
    namespace_count: u32,
    ops: InflightOps<PromoteOp>,
    /// Flushes issued, once every entry landed.
    flushes_issued: u32,
    failure: Option<(u32, DeviceError)>,
    bytes_replayed: u64,
}

impl<M: RingStore> Promotion<M> {
    pub(crate) fn new(
        memory: M,
        namespace_sizes_bytes: &[u64],
        device_queue_depth: u32,
    ) -> Result<Self, EngineError> {
        let (ring, entries) = NvramRing::open(memory).map_err(EngineError::Ring)?;
        let bytes_replayed = check_replay(namespace_sizes_bytes, &entries)?;
        Ok(Promotion {
            ring,
            entries,
            next: 0,
            namespace_count: namespace_sizes_bytes.len() as u32,
            ops: InflightOps::new(namespace_sizes_bytes.len(), device_queue_depth),
            flushes_issued: 0,
            failure: None,
            bytes_replayed,
        })
    }

    /// The next replay write or flush to submit, if any.
    #[must_use]
    pub fn poll_device_op(&mut self) -> Option<DeviceOp<'_>> {
        if self.failure.is_some() {
            return None;
        }
        if self.next == self.entries.len() {
            return self.next_flush();
        }
        let header = self.entries[self.next];
        let start = header.offset_bytes();
        let end = start + u64::from(header.length_bytes);
        let overlaps = self.ops.iter().any(|(nsid, op)| {
            matches!(*op, PromoteOp::Replay { start: s, end: e } if nsid == header.nsid && s < end && start < e)
        });
        if overlaps || !self.ops.has_room(header.nsid) {
            return None;
        }
        self.next += 1;
        let id = self
            .ops
            .start(header.nsid, PromoteOp::Replay { start, end });
        Some(DeviceOp {
            id,
            nsid: header.nsid,
            request: self.ring.entry_write(&header),
        })
    }

    fn next_flush(&mut self) -> Option<DeviceOp<'static>> {
        let replaying = self
            .ops
            .iter()
            .any(|(_, op)| matches!(op, PromoteOp::Replay { .. }));
        if replaying || self.flushes_issued == self.namespace_count {
            return None;
        }
        self.flushes_issued += 1;
        let nsid = self.flushes_issued;
        let id = self.ops.start(nsid, PromoteOp::Flush);
        Some(DeviceOp {
            id,
            nsid,
            request: DeviceRequest::Flush,
        })
    }

    pub fn handle_device_completion(&mut self, completion: DeviceCompletion<'_>) {
        let (nsid, _) = self
            .ops
            .finish(completion.id)
            .expect("a completion of an op the promotion submitted, once");
        if let Err(error) = completion.result {
            log::error!("promote: mirror namespace {nsid}: {error}");
            self.failure.get_or_insert((nsid, error));
        }
    }

    /// Every entry was written and every mirror flushed, or an op failed.
    pub fn is_done(&self) -> bool {
        self.ops.is_empty()
            && (self.failure.is_some() || self.flushes_issued == self.namespace_count)
    }

    /// Records the replayed entries as completed and bumps the epoch; gives back the ring.
    pub fn finish(self) -> Result<(PromoteReport, M), EngineError> {
        assert!(self.is_done(), "finish once every op completed");
        if let Some((nsid, error)) = self.failure {
            return Err(EngineError::Device { nsid, error });
        }
        let mut ring = self.ring;
        if let Some(last) = self.entries.last() {
            let transfer_floor = self
                .entries
                .iter()
                .map(|e| e.transfer_id + 1)
                .max()
                .unwrap_or(0);
            ring.record_cp_completed(last.cp_number, transfer_floor);
            ring.release_half(0);
            ring.release_half(1);
        }
        let epoch = ring.superblock().epoch + 1;
        ring.set_epoch(epoch);
        log::info!(
            "destination: promoted at epoch {epoch}, replayed {} entries",
            self.entries.len()
        );
        let report = PromoteReport {
            entries_replayed: self.entries.len() as u64,
            bytes_replayed: self.bytes_replayed,
            cp_completed: ring.superblock().cp_completed,
            epoch,
        };
        Ok((report, ring.into_memory()))
    }
}
