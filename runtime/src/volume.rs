//! The replicated volume as front ends see it: the source engine, its primary namespace devices,
//! the writes that became durable on both sides since the front end last looked, and host reads.
//!
//! The volume moves the engine's device ops to the primaries and their completions back
//! (invariant 8: the reactor never waits on a device). A host read goes to the primary once
//! every write completed to a host before it arrived has landed there
//! ([`nvmirror_engine::Source::read_gate`]); on a device that reads memory it is then served at
//! once, otherwise it is a device op of its own whose completion the volume routes itself.
//!
//! The volume is the NVMe/TCP target's [`nvmirror_nvmf::Backend`] (a write's slot is its
//! reserved NVRAM ring entry) and routes completions of queue pairs on other reactors
//! ([`crate::remote::RemoteRouting`]); both impls live here, at the end of the file.

use std::collections::VecDeque;

use nvmirror_engine::device::{
    BlockDevice, DeviceCompletion, DeviceError, DeviceOp, DeviceOpId, DeviceRequest, RUNTIME_OP_BIT,
};
use nvmirror_engine::geometry::SECTOR_SIZE;
use nvmirror_engine::source::{ReadError, WriteId, WriteRefused, WriteSlot};
use nvmirror_nvmf::{Backend, BackendError, IoToken, NamespaceInfo};

use crate::node::{Device, SourceEngine};
use crate::remote::{RemoteRoutes, RemoteRouting, RemoteWaiter};
use crate::ring_memory::RingMedium;

/// Tokens of operations that complete at once (flush) live above every write id.
const IMMEDIATE_TOKEN_BASE: u64 = 1 << 63;
/// Tokens of host reads that go through a device op: this bit, a use count, and the slot.
const READ_TOKEN_BIT: u64 = 1 << 62;
/// In the completed queue only: the operation failed with a path error (the destination is
/// lost under the `fail` policy). Write ids and read tokens stay below it.
const FAILED_BIT: u64 = 1 << 61;
/// Host reads waiting or in flight at most; more are answered Busy (retried, never failed).
pub const HOST_READS_MAX: usize = 256;

/// Write completions a source front end has not collected yet: more than the ring can hold in flight.
pub const COMPLETIONS_MAX: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    /// Waiting for the writes it must see to land (seq).
    Gated(u64),
    Submitted,
    Done(Result<(), DeviceError>),
}

/// One host read slot; `token` 0: free.
#[derive(Debug)]
struct HostRead {
    token: u64,
    nsid: u32,
    offset_bytes: u64,
    length_bytes: u32,
    state: ReadState,
    /// Abandoned while its op was in flight: freed when that completes.
    abandoned: bool,
    /// The read's data once done; the buffer stays with the slot for its next read.
    data: Vec<u8>,
}

/// Host reads of the volume that need a device op: slots allocated at start.
#[derive(Debug)]
struct HostReads {
    slots: Vec<HostRead>,
    /// Reads waiting for their writes to land (the pass skips the scan when there are none).
    gated: usize,
    uses: Vec<u32>,
    free: Vec<u16>,
}

impl HostReads {
    fn new() -> Self {
        HostReads {
            slots: (0..HOST_READS_MAX)
                .map(|_| HostRead {
                    token: 0,
                    nsid: 0,
                    offset_bytes: 0,
                    length_bytes: 0,
                    state: ReadState::Submitted,
                    abandoned: false,
                    data: Vec::new(),
                })
                .collect(),
            gated: 0,
            uses: vec![0; HOST_READS_MAX],
            free: (0..HOST_READS_MAX as u16).rev().collect(),
        }
    }

    fn slot_of(token: u64) -> usize {
        (token & 0xFFFF) as usize
    }

    /// The live read of `token`.
    fn get(&mut self, token: u64) -> Option<&mut HostRead> {
        self.slots
            .get_mut(Self::slot_of(token))
            .filter(|read| read.token != 0 && read.token == token)
    }

    fn release(&mut self, token: u64) {
        let slot = Self::slot_of(token);
        assert_eq!(self.slots[slot].token, token);
        self.slots[slot].token = 0;
        self.slots[slot].abandoned = false;
        self.free.push(slot as u16);
    }
}

/// What a host's Flush does, by the ring medium (invariant 10, the README's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// The ring does not survive power loss (hugetlbfs): a Flush takes a CP, so every write
    /// acknowledged before it is on both sides' namespaces, written and flushed.
    TakeCp,
    /// The ring survives power loss once persisted (a file: msync; DAX: cache lines flushed):
    /// a Flush persists the ring.
    PersistRing,
    /// Completes at once (the operator said the ring is non-volatile as it is).
    Immediate,
}

impl FlushPolicy {
    /// What a Flush must do for writes to survive what `medium` promises (the README's table).
    pub fn for_medium(medium: RingMedium) -> FlushPolicy {
        if medium.is_volatile() {
            FlushPolicy::TakeCp
        } else {
            FlushPolicy::PersistRing
        }
    }
}

/// The replicated volume (see the module doc).
pub struct Volume {
    pub source: SourceEngine,
    primaries: Vec<Device>,
    /// Completed write ids and tokens of operations that completed at once (flush), in order.
    completed: VecDeque<u64>,
    immediate_count: u64,
    /// Writes of queue pairs on other reactors, by write id ([`crate::remote`]).
    remote: RemoteRoutes,
    /// The last write id completed: ids complete once each, in ascending order (invariant 1
    /// is the engine's; this is its edge).
    completed_through: u64,
    reads: HostReads,
    flush_policy: FlushPolicy,
    /// Flushes waiting for a CP: (token, the CP that must complete).
    flushes: VecDeque<(u64, u64)>,
}

/// Flushes waiting for their CP at most (more are answered Busy).
pub const FLUSHES_WAITING_MAX: usize = 1024;

impl Volume {
    pub fn new(source: SourceEngine, primaries: Vec<Device>) -> Self {
        assert_eq!(
            source.namespace_sizes_bytes(),
            primaries.iter().map(|d| d.size_bytes()).collect::<Vec<_>>(),
            "the engine was opened with its primaries' sizes"
        );
        let source_medium = source.ring_memory().medium();
        Volume {
            source,
            primaries,
            completed: VecDeque::with_capacity(COMPLETIONS_MAX),
            immediate_count: 0,
            remote: RemoteRoutes::default(),
            completed_through: 0,
            reads: HostReads::new(),
            flush_policy: FlushPolicy::for_medium(source_medium),
            flushes: VecDeque::with_capacity(FLUSHES_WAITING_MAX),
        }
    }

    /// Sets what a Flush does (the ring medium decides; see [`FlushPolicy`]).
    pub fn set_flush_policy(&mut self, policy: FlushPolicy) {
        self.flush_policy = policy;
    }

    /// A host's Flush: its token completes once every write completed before it survives what
    /// the ring medium promises ([`FlushPolicy`]).
    pub fn start_flush(&mut self, now_us: u64) -> Result<u64, FlushError> {
        match self.flush_policy {
            FlushPolicy::Immediate => Ok(self.complete_now()),
            FlushPolicy::PersistRing => {
                self.source
                    .ring_memory()
                    .sync_all()
                    .map_err(|error| FlushError::Io(error.to_string()))?;
                Ok(self.complete_now())
            }
            FlushPolicy::TakeCp if self.source.writes_fail() => Err(FlushError::PathInaccessible),
            FlushPolicy::TakeCp => {
                let cp = self.source.cp_for_completed_writes();
                if cp <= self.source.cp_completed() {
                    return Ok(self.complete_now());
                }
                if self.flushes.len() == FLUSHES_WAITING_MAX {
                    return Err(FlushError::Busy);
                }
                self.source.request_cp(now_us);
                self.immediate_count += 1;
                let token = IMMEDIATE_TOKEN_BASE | self.immediate_count;
                self.flushes.push_back((token, cp));
                Ok(token)
            }
        }
    }

    /// Completes the flushes whose CP completed; fails them all while writes fail (their CP
    /// cannot complete without the destination).
    fn complete_flushes(&mut self) {
        if self.source.writes_fail() {
            while let Some((token, _)) = self.flushes.pop_front() {
                push_token(&mut self.completed, token | FAILED_BIT);
            }
            return;
        }
        let completed = self.source.cp_completed();
        while let Some(&(token, cp)) = self.flushes.front() {
            if cp > completed {
                break;
            }
            self.flushes.pop_front();
            push_token(&mut self.completed, token);
        }
        if !self.flushes.is_empty() {
            // Later writes may have opened a new CP; the flush's CP must still be taken.
            self.source.request_cp(0);
        }
    }

    pub fn primaries(&self) -> &[Device] {
        &self.primaries
    }

    pub(crate) fn primaries_mut(&mut self) -> &mut [Device] {
        &mut self.primaries
    }

    /// Gives back the engine and the primaries (a stop).
    pub fn into_parts(self) -> (SourceEngine, Vec<Device>) {
        (self.source, self.primaries)
    }

    /// Submits the engine's device ops and due host reads, and hands back every completion.
    pub fn pump_devices(&mut self, now_us: u64) -> usize {
        let mut work = self.submit_engine_ops(now_us);
        work += self.submit_ready_reads();
        let Volume {
            source,
            primaries,
            reads,
            completed,
            remote,
            ..
        } = self;
        for device in primaries.iter_mut() {
            work += device.poll_completions(&mut |completion| {
                if completion.id.is_runtime() {
                    finish_host_read(reads, completed, remote, completion);
                } else {
                    source.handle_device_completion(now_us, completion);
                }
            });
        }
        work += self.submit_engine_ops(now_us);
        if !self.flushes.is_empty() {
            self.complete_flushes();
        }
        work
    }

    fn submit_engine_ops(&mut self, now_us: u64) -> usize {
        let mut work = 0;
        while let Some(op) = self.source.poll_device_op(now_us) {
            self.primaries[op.nsid as usize - 1].submit(op);
            work += 1;
        }
        work
    }

    /// An op completes on the next poll with no fd to announce it, or a read waits its turn.
    pub fn needs_poll(&self) -> bool {
        crate::node::devices_need_poll(&self.primaries) || self.reads.gated > 0
    }

    /// The earliest time a primary needs a poll on a timer (held completions), if any.
    pub fn devices_deadline_us(&self) -> Option<u64> {
        crate::node::devices_deadline_us(&self.primaries)
    }

    fn submit_ready_reads(&mut self) -> usize {
        if self.reads.gated == 0 {
            return 0;
        }
        let landed = self.source.landed_through_seq();
        let mut work = 0;
        for read in self.reads.slots.iter_mut().filter(|read| read.token != 0) {
            match read.state {
                ReadState::Gated(seq) if seq <= landed => {}
                _ => continue,
            }
            read.state = ReadState::Submitted;
            self.reads.gated -= 1;
            self.primaries[read.nsid as usize - 1].submit(DeviceOp {
                id: DeviceOpId(RUNTIME_OP_BIT | read.token),
                nsid: read.nsid,
                request: DeviceRequest::Read {
                    offset_bytes: read.offset_bytes,
                    length_bytes: read.length_bytes,
                },
            });
            work += 1;
        }
        work
    }

    /// Starts a host read: `None` when it can be served at once with [`Volume::read_now`]
    /// (the writes it must see landed and the device reads memory), else the token that
    /// completes once its data is in.
    pub fn start_read(
        &mut self,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<Option<u64>, StartReadError> {
        let gate = self
            .source
            .read_gate(nsid, lba, u64::from(length_bytes))
            .map_err(StartReadError::Refused)?;
        let device = &self.primaries[nsid as usize - 1];
        if gate <= self.source.landed_through_seq() && device.can_read_now() {
            return Ok(None);
        }
        let Some(slot) = self.reads.free.pop() else {
            return Err(StartReadError::Busy);
        };
        let slot = usize::from(slot);
        self.reads.uses[slot] = (self.reads.uses[slot] + 1) & 0x3FFF_FFFF;
        let token = READ_TOKEN_BIT | u64::from(self.reads.uses[slot]) << 16 | slot as u64;
        let read = &mut self.reads.slots[slot];
        read.token = token;
        read.nsid = nsid;
        read.offset_bytes = lba * SECTOR_SIZE as u64;
        read.length_bytes = length_bytes;
        read.state = ReadState::Gated(gate);
        read.abandoned = false;
        self.reads.gated += 1;
        Ok(Some(token))
    }

    /// Serves a read [`Volume::start_read`] answered `None` for.
    pub fn read_now(&mut self, nsid: u32, lba: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        self.source.read_gate(nsid, lba, buf.len() as u64)?;
        match self.primaries[nsid as usize - 1].read_now(lba * SECTOR_SIZE as u64, buf) {
            Some(result) => result.map_err(ReadError::Device),
            None => unreachable!("read_now only where start_read said the device reads at once"),
        }
    }

    /// Copies a completed read's data into `buf` and frees it.
    pub fn finish_read(&mut self, token: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let read = self
            .reads
            .get(token)
            .expect("finish_read of a live read token");
        let ReadState::Done(result) = read.state else {
            unreachable!("finish_read of a read that is {:?}", read.state);
        };
        if result.is_ok() {
            buf.copy_from_slice(&read.data[..buf.len()]);
        }
        self.reads.release(token);
        result.map_err(ReadError::Device)
    }

    /// A read token whose connection closed: its slot is freed now, or when its op completes.
    pub fn abandon_read(&mut self, token: u64) {
        let Some(read) = self.reads.get(token) else {
            return;
        };
        match read.state {
            ReadState::Submitted => read.abandoned = true,
            ReadState::Gated(_) => {
                self.reads.gated -= 1;
                self.reads.release(token);
            }
            ReadState::Done(_) => self.reads.release(token),
        }
    }

    /// Routes write `id`'s completion to a queue pair on another reactor instead of the
    /// front end's own completions.
    pub(crate) fn wait_remote(&mut self, token: u64, waiter: RemoteWaiter) {
        assert!(
            token & READ_TOKEN_BIT != 0 || token > self.completed_through,
            "routed before it completes"
        );
        self.remote.wait(token, waiter);
    }

    pub(crate) fn pop_remote_done(&mut self) -> Option<RemoteWaiter> {
        self.remote.pop_done()
    }

    /// The oldest write that completed (`Ok`: durable on both sides) or failed (`Err`: a path
    /// error, the destination is lost) and was not collected yet.
    pub fn pop_completed(&mut self) -> Option<(WriteId, Result<(), BackendError>)> {
        self.pop_token()
            .map(|(token, result)| (WriteId(token), result))
    }

    pub(crate) fn pop_token(&mut self) -> Option<(u64, Result<(), BackendError>)> {
        self.completed.pop_front().map(split_token)
    }

    /// Completes an operation that needs no replication and returns its token, from a range
    /// write ids never reach.
    pub(crate) fn complete_now(&mut self) -> u64 {
        self.immediate_count += 1;
        assert!(
            self.immediate_count < FAILED_BIT,
            "immediate tokens stay below the failed bit"
        );
        let token = IMMEDIATE_TOKEN_BASE | self.immediate_count;
        push_token(&mut self.completed, token);
        token
    }

    /// Write `id` completes with a path error (the destination is lost under `fail`).
    pub(crate) fn push_failed(&mut self, id: WriteId) {
        self.push_finished(id, Err(BackendError::PathInaccessible));
    }

    pub(crate) fn push_completed(&mut self, id: WriteId) {
        self.push_finished(id, Ok(()));
    }

    fn push_finished(&mut self, id: WriteId, result: Result<(), BackendError>) {
        assert!(
            id.0 < FAILED_BIT,
            "write ids stay below the failed, read and immediate token bits"
        );
        assert!(
            id.0 > self.completed_through,
            "write {} completed twice or out of order (after {})",
            id.0,
            self.completed_through
        );
        self.completed_through = id.0;
        if !self.remote.complete(id.0, result) {
            let failed = if result.is_err() { FAILED_BIT } else { 0 };
            push_token(&mut self.completed, id.0 | failed);
        }
    }
}

/// A completed-queue entry as (token, result).
fn split_token(entry: u64) -> (u64, Result<(), BackendError>) {
    if entry & FAILED_BIT != 0 {
        (entry & !FAILED_BIT, Err(BackendError::PathInaccessible))
    } else {
        (entry, Ok(()))
    }
}

/// Why a host's Flush could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushError {
    Busy,
    Io(String),
    /// The destination is lost under the `fail` policy: no CP can complete.
    PathInaccessible,
}

/// Why a host read could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartReadError {
    Refused(ReadError),
    /// Every read slot is in use: retry later.
    Busy,
}

fn push_token(completed: &mut VecDeque<u64>, token: u64) {
    assert!(
        completed.len() < COMPLETIONS_MAX,
        "front end stopped collecting completions"
    );
    completed.push_back(token);
}

fn finish_host_read(
    reads: &mut HostReads,
    completed: &mut VecDeque<u64>,
    remote: &mut RemoteRoutes,
    completion: DeviceCompletion<'_>,
) {
    let token = completion.id.0 & !RUNTIME_OP_BIT;
    let read = reads
        .get(token)
        .expect("a host read completes into its slot");
    assert_eq!(read.state, ReadState::Submitted);
    if read.abandoned {
        reads.release(token);
        return;
    }
    read.state = ReadState::Done(completion.result.map(|data| {
        read.data.clear();
        read.data.extend_from_slice(data);
    }));
    if !remote.complete(token, Ok(())) {
        push_token(completed, token);
    }
}

// ---- the volume behind the NVMe/TCP target ----------------------------------------------

fn backend_error(refused: WriteRefused) -> BackendError {
    match refused {
        WriteRefused::Backpressure => BackendError::Busy,
        WriteRefused::InvalidNamespace => BackendError::InvalidNamespace,
        WriteRefused::OutOfRange | WriteRefused::InvalidLength => BackendError::OutOfRange,
        WriteRefused::PeerLost => BackendError::PathInaccessible,
    }
}

fn read_error(error: ReadError) -> BackendError {
    match error {
        ReadError::InvalidNamespace => BackendError::InvalidNamespace,
        ReadError::OutOfRange | ReadError::InvalidLength => BackendError::OutOfRange,
        ReadError::Device(error) => {
            log::error!("read from the primary failed: {error}");
            BackendError::Io
        }
    }
}

/// A namespace's stable UUID: the volume id with the namespace id folded in.
pub(crate) fn namespace_uuid(volume_id: [u8; 16], nsid: u32) -> [u8; 16] {
    let mut uuid = volume_id;
    for (byte, extra) in uuid[12..].iter_mut().zip(nsid.to_be_bytes()) {
        *byte ^= extra;
    }
    // RFC 4122 variant and a "version 8" (custom) marker, so hosts see a well-formed UUID.
    uuid[6] = (uuid[6] & 0x0f) | 0x80;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    uuid
}

impl Backend for Volume {
    type WriteSlot = WriteSlot;
    /// Writes complete in ring order: a reserved entry holds back every later one until it is
    /// committed, so nvmf reserves it only once the write's data is all in.
    const ORDERED_WRITE_SLOTS: bool = true;

    fn namespace(&self, nsid: u32) -> Option<NamespaceInfo> {
        let sizes = self.source.namespace_sizes_bytes();
        let size_bytes = *sizes.get((nsid as usize).checked_sub(1)?)?;
        Some(NamespaceInfo {
            size_bytes,
            uuid: namespace_uuid(self.source.volume_id(), nsid),
        })
    }

    fn reserve_write(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<WriteSlot, BackendError> {
        self.source
            .reserve_write(now_us, nsid, lba, length_bytes)
            .map_err(backend_error)
    }

    fn write_buffer(&mut self, slot: &WriteSlot) -> &mut [u8] {
        self.source.write_buffer(slot)
    }

    fn fill_write(&mut self, slot: &WriteSlot, offset: usize, data: &[u8]) {
        self.source.fill_write(slot, offset, data);
    }

    fn commit_write(&mut self, now_us: u64, slot: WriteSlot) -> IoToken {
        let id = slot.id();
        self.source.commit_write(now_us, slot);
        IoToken(id.0)
    }

    fn commit_write_verified(&mut self, now_us: u64, slot: WriteSlot, data_crc: u32) -> IoToken {
        let id = slot.id();
        self.source.commit_write_verified(now_us, slot, data_crc);
        IoToken(id.0)
    }

    fn abort_write(&mut self, now_us: u64, slot: WriteSlot) -> IoToken {
        let id = slot.id();
        self.source.abort_write(now_us, slot);
        IoToken(id.0)
    }

    fn write_zeroes(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<IoToken, BackendError> {
        let id = self
            .source
            .write_zeroes(now_us, nsid, lba, length_bytes)
            .map_err(backend_error)?;
        Ok(IoToken(id.0))
    }

    fn read(&mut self, nsid: u32, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.read_now(nsid, lba, buf).map_err(read_error)
    }

    /// A read goes to the primary once the writes it must see landed there: at once on a
    /// memory device (`Ok(None)`, then [`Backend::read`]), else as a device op of its own.
    fn start_read(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<Option<IoToken>, BackendError> {
        match Volume::start_read(self, nsid, lba, length_bytes) {
            Ok(token) => Ok(token.map(IoToken)),
            Err(StartReadError::Busy) => Err(BackendError::Busy),
            Err(StartReadError::Refused(error)) => Err(read_error(error)),
        }
    }

    fn finish_read(&mut self, token: IoToken, buf: &mut [u8]) -> Result<(), BackendError> {
        Volume::finish_read(self, token.0, buf).map_err(read_error)
    }

    fn abandon(&mut self, token: IoToken) {
        self.abandon_read(token.0);
    }

    /// Completes once every write completed before it survives what the ring medium
    /// promises ([`crate::volume::FlushPolicy`]): on a volatile ring, after a CP.
    fn flush(&mut self, now_us: u64, nsid: u32) -> Result<IoToken, BackendError> {
        // nvmf resolves the broadcast nsid to an attached namespace before calling.
        if self.namespace(nsid).is_none() {
            return Err(BackendError::InvalidNamespace);
        }
        match self.start_flush(now_us) {
            Ok(token) => Ok(IoToken(token)),
            Err(FlushError::Busy) => Err(BackendError::Busy),
            Err(FlushError::PathInaccessible) => Err(BackendError::PathInaccessible),
            Err(FlushError::Io(error)) => {
                log::error!("flush: persisting the NVRAM ring failed: {error}");
                Err(BackendError::Io)
            }
        }
    }

    fn poll_completion(&mut self) -> Option<(IoToken, Result<(), BackendError>)> {
        self.pop_token()
            .map(|(token, result)| (IoToken(token), result))
    }
}

impl RemoteRouting for Volume {
    fn wait_remote(&mut self, token: IoToken, waiter: RemoteWaiter) {
        Volume::wait_remote(self, token.0, waiter)
    }
    fn pop_remote_done(&mut self) -> Option<RemoteWaiter> {
        Volume::pop_remote_done(self)
    }
}
