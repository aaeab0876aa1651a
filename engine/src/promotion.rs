//! Failover of a destination (invariants 4 and 6): its log's entries newer than the last
//! completed CP are written to the mirror namespaces in seq order (device ops: an entry waits
//! while an earlier overlapping one is in flight), the mirrors are flushed, the node takes a new
//! generation (durable in its metadata), and only then are the entries recorded as completed. So
//! the mirror holds every acknowledged write, and the former source, whose generation is now in
//! this node's history, is refused as stale. A crash before the generation is durable leaves the
//! log as it was: promoting again replays the same entries.
//!
//! Call order: [`crate::Destination::promote`]; submit every `poll_device_op` to the mirrors and
//! every `poll_metadata_op` to the metadata device, hand back each completion, until `is_done`;
//! then `finish`. A failing mirror op stops the promotion with the error (nothing is recorded).

use crate::device::{DeviceCompletion, DeviceError, DeviceOp, DeviceRequest, InflightOps};
use crate::error::EngineError;
use crate::metadata::NodeMetadata;
use crate::open::check_replay;
use crate::ring::{EntryHeader, NvramRing, RingStore};

/// What a promotion replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromoteReport {
    pub entries_replayed: u64,
    pub bytes_replayed: u64,
    pub cp_completed: u64,
    pub epoch: u64,
    /// The generation taken, and the one before it (now in the history).
    pub generation: u64,
    pub previous_generation: u64,
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
    metadata: NodeMetadata,
    new_generation: u64,
    previous_generation: u64,
    /// The new generation's sequence in the metadata, once taken (after the mirror flushes).
    generation_seq: Option<u64>,
}

impl<M: RingStore> Promotion<M> {
    pub(crate) fn new(
        memory: M,
        namespace_sizes_bytes: &[u64],
        device_queue_depth: u32,
        metadata: NodeMetadata,
        new_generation: u64,
    ) -> Result<Self, EngineError> {
        assert_ne!(new_generation, 0, "a generation is non-zero");
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
            previous_generation: metadata.generations().current,
            metadata,
            new_generation,
            generation_seq: None,
        })
    }

    /// The next metadata write or flush (the new generation, once the mirrors are flushed).
    #[must_use]
    pub fn poll_metadata_op(&mut self) -> Option<DeviceOp<'_>> {
        let mirrors_done = self.ops.is_empty() && self.flushes_issued == self.namespace_count;
        if self.failure.is_none() && mirrors_done && self.generation_seq.is_none() {
            self.generation_seq = Some(self.metadata.new_generation(self.new_generation));
        }
        self.metadata.poll_device_op()
    }

    pub fn handle_metadata_completion(&mut self, completion: DeviceCompletion<'_>) {
        self.metadata.handle_device_completion(completion);
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

    /// Every entry was written, every mirror flushed and the new generation is durable; or a
    /// mirror op failed.
    pub fn is_done(&self) -> bool {
        if !self.ops.is_empty() {
            return false;
        }
        self.failure.is_some()
            || self
                .generation_seq
                .is_some_and(|seq| self.metadata.durable_through() >= seq)
    }

    /// Records the replayed entries as completed; gives back the ring and the metadata.
    pub fn finish(self) -> Result<(PromoteReport, M, NodeMetadata), EngineError> {
        assert!(self.is_done(), "finish once every op completed");
        if let Some((nsid, error)) = self.failure {
            return Err(EngineError::Device { nsid, error });
        }
        assert_eq!(self.metadata.generations().current, self.new_generation);
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
        // The epoch still counts promotions in the ring (for logs); generations decide.
        let epoch = ring.superblock().epoch + 1;
        ring.set_epoch(epoch);
        log::info!(
            "destination: promoted to generation {} (was {}), replayed {} entries",
            crate::generation::Hex(self.new_generation),
            crate::generation::Hex(self.previous_generation),
            self.entries.len()
        );
        let report = PromoteReport {
            entries_replayed: self.entries.len() as u64,
            bytes_replayed: self.bytes_replayed,
            cp_completed: ring.superblock().cp_completed,
            epoch,
            generation: self.new_generation,
            previous_generation: self.previous_generation,
        };
        Ok((report, ring.into_memory(), self.metadata))
    }
}
