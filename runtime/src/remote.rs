//! Queue pairs on reactors other than the volume's: the NVMe/TCP target hands accepted
//! connections round robin over the configured cores.
//!
//! The engine (ring, transfers, replication link) is single-threaded on its reactor. A queue
//! pair on another reactor reaches it through lock-free mailboxes (crossbeam `ArrayQueue` plus
//! an eventfd for a sleeping reactor): [`RemoteBackend`] on the queue pair's reactor, the
//! [`VolumeService`] on the engine's. The remote backend owns a fixed pool of buffers, allocated
//! once: a write's data is received into a pool buffer, the buffer itself (not a copy) moves to
//! the engine's reactor, which copies it into the write's NVRAM ring slot and commits it, and
//! the buffer comes back with the completion once the write is durable on both sides. That is
//! one copy more than on the engine's own reactor, where the data lands straight in the ring;
//! what the other reactor takes over is the host connection's socket work and PDU handling.
//! Reads go the same way (the engine fills the buffer from the primary).

use std::cell::Cell;
use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::RawFd;
use std::sync::Arc;

use nvmirror_engine::source::WriteRefused;
use nvmirror_nvmf::backend::LBA_BYTES;
use nvmirror_nvmf::{Backend, BackendError, IoToken, NamespaceInfo, PollGroup, Target};

use crate::node::Volume;
use crate::reactor::{Mailbox, Poller};

/// Operations a remote reactor may have outstanding at the engine (its buffer pool).
pub const REMOTE_SLOTS: usize = 256;
/// One pool buffer: the largest transfer of one command (MDTS).
pub const REMOTE_BUFFER_BYTES: usize = nvmirror_nvmf::config::TRANSFER_BYTES_MAX as usize;
/// Accepted connections waiting for a remote reactor to take them.
pub const REMOTE_STREAMS_MAX: usize = 64;
/// Tokens of operations a remote backend completes by itself (flush, an aborted write) carry
/// this bit; pool tokens never do.
const LOCAL_TOKEN_BIT: u64 = 1 << 63;

/// What a remote queue pair asks of the volume.
#[derive(Debug)]
pub enum OpKind {
    Write {
        nsid: u32,
        lba: u64,
        length: u32,
        buffer: Box<[u8]>,
    },
    Zeroes {
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    },
    Read {
        nsid: u32,
        lba: u64,
        length: u32,
        buffer: Box<[u8]>,
    },
}

/// An operation from remote reactor `remote`, pool slot `slot`.
#[derive(Debug)]
pub struct Op {
    pub remote: u16,
    pub slot: u16,
    pub kind: OpKind,
}

/// Who waits for a remote operation, and the buffer that goes back with its completion.
#[derive(Debug)]
pub struct RemoteWaiter {
    pub remote: u16,
    pub slot: u16,
    pub buffer: Option<Box<[u8]>>,
}

/// An operation finished: the slot, its buffer, and (for a read) whether the data is good.
#[derive(Debug)]
pub struct Done {
    pub slot: u16,
    pub buffer: Option<Box<[u8]>>,
    pub result: Result<(), BackendError>,
}

/// The mailboxes between the engine's reactor and one remote reactor.
#[derive(Clone)]
pub struct RemoteLink {
    /// Remote reactors -> engine (shared by all remote reactors of a volume).
    pub ops: Arc<Mailbox<Op>>,
    /// Engine -> this remote reactor.
    pub done: Arc<Mailbox<Done>>,
    /// Accepted connections for this remote reactor.
    pub streams: Arc<Mailbox<TcpStream>>,
    pub index: u16,
}

/// Creates the mailboxes for `count` remote reactors of one volume.
pub fn remote_links(count: usize) -> std::io::Result<Vec<RemoteLink>> {
    let ops = Mailbox::new((REMOTE_SLOTS * count).max(1))?;
    (0..count)
        .map(|index| {
            Ok(RemoteLink {
                ops: ops.clone(),
                done: Mailbox::new(REMOTE_SLOTS)?,
                streams: Mailbox::new(REMOTE_STREAMS_MAX)?,
                index: index as u16,
            })
        })
        .collect()
}

fn refused(refused: WriteRefused) -> BackendError {
    match refused {
        WriteRefused::Backpressure => BackendError::Busy,
        WriteRefused::InvalidNamespace => BackendError::InvalidNamespace,
        WriteRefused::OutOfRange | WriteRefused::InvalidLength => BackendError::OutOfRange,
    }
}

/// The engine's side: hands accepted connections round robin (this reactor first), executes
/// what remote queue pairs ask against the [`Volume`], and answers when writes are durable.
pub struct VolumeService {
    links: Vec<RemoteLink>,
    next_hand_off: usize,
    /// Operations the volume refused with back-pressure, retried first and in order.
    pending: VecDeque<Op>,
    armed: Cell<bool>,
}

impl VolumeService {
    pub fn new(links: Vec<RemoteLink>) -> Self {
        VolumeService {
            pending: VecDeque::with_capacity(REMOTE_SLOTS * links.len()),
            links,
            next_hand_off: 0,
            armed: Cell::new(false),
        }
    }

    /// Reactors taking queue pairs, this one included.
    pub fn reactor_count(&self) -> usize {
        self.links.len() + 1
    }

    /// Round robin: `Some(stream)` back means "yours" (this reactor's turn, or the remote
    /// reactor's queue is full).
    pub fn hand_off(&mut self, stream: TcpStream) -> Option<TcpStream> {
        let turn = self.next_hand_off % self.reactor_count();
        self.next_hand_off = self.next_hand_off.wrapping_add(1);
        if turn == 0 {
            return Some(stream);
        }
        let link = &self.links[turn - 1];
        let peer = stream.peer_addr().ok();
        match link.streams.send(stream) {
            Ok(()) => {
                log::info!("nvmf: connection from {peer:?} goes to queue-pair reactor {turn}");
                None
            }
            Err(stream) => Some(stream),
        }
    }

    /// Delivers completions and executes queued operations. Returns work done.
    pub fn poll(&mut self, now_us: u64, volume: &mut Volume) -> usize {
        if self.links.is_empty() {
            return 0;
        }
        if self.armed.replace(false) {
            self.links[0].ops.disarm();
        }
        let mut work = 0;
        while let Some(waiter) = volume.pop_remote_done() {
            self.answer(
                waiter.remote,
                Done {
                    slot: waiter.slot,
                    buffer: waiter.buffer,
                    result: Ok(()),
                },
            );
            work += 1;
        }
        while let Some(op) = self.pending.pop_front() {
            if let Err(op) = self.execute(now_us, volume, op) {
                self.pending.push_front(op);
                return work;
            }
            work += 1;
        }
        while let Some(op) = self.links[0].ops.pop() {
            work += 1;
            if let Err(op) = self.execute(now_us, volume, op) {
                self.pending.push_back(op);
                break;
            }
        }
        work
    }

    /// Runs one operation; back-pressure gives it back.
    fn execute(&mut self, now_us: u64, volume: &mut Volume, op: Op) -> Result<(), Op> {
        let Op { remote, slot, kind } = op;
        match kind {
            OpKind::Write {
                nsid,
                lba,
                length,
                buffer,
            } => match volume.source.reserve_write(now_us, nsid, lba, length) {
                Ok(write) => {
                    volume
                        .source
                        .fill_write(&write, 0, &buffer[..length as usize]);
                    let id = write.id();
                    volume.source.commit_write(now_us, write);
                    let waiter = RemoteWaiter {
                        remote,
                        slot,
                        buffer: Some(buffer),
                    };
                    volume.wait_remote(id, waiter);
                    Ok(())
                }
                Err(WriteRefused::Backpressure) => Err(Op {
                    remote,
                    slot,
                    kind: OpKind::Write {
                        nsid,
                        lba,
                        length,
                        buffer,
                    },
                }),
                Err(other) => {
                    // The remote backend checks ranges against the same namespace sizes.
                    log::error!("remote write refused by the volume: {other:?}");
                    self.reply(remote, slot, Some(buffer), Err(refused(other)))
                }
            },
            OpKind::Zeroes {
                nsid,
                lba,
                length_bytes,
            } => match volume.source.write_zeroes(now_us, nsid, lba, length_bytes) {
                Ok(id) => {
                    let waiter = RemoteWaiter {
                        remote,
                        slot,
                        buffer: None,
                    };
                    volume.wait_remote(id, waiter);
                    Ok(())
                }
                Err(WriteRefused::Backpressure) => Err(Op {
                    remote,
                    slot,
                    kind: OpKind::Zeroes {
                        nsid,
                        lba,
                        length_bytes,
                    },
                }),
                Err(other) => {
                    log::error!("remote write zeroes refused by the volume: {other:?}");
                    self.reply(remote, slot, None, Err(refused(other)))
                }
            },
            OpKind::Read {
                nsid,
                lba,
                length,
                mut buffer,
            } => {
                let result = volume
                    .source
                    .read(nsid, lba, &mut buffer[..length as usize])
                    .map_err(|error| {
                        log::error!("read for a remote queue pair failed: {error:?}");
                        BackendError::Io
                    });
                self.reply(remote, slot, Some(buffer), result)
            }
        }
    }

    /// Answers an operation at once (a read, or a refusal).
    fn reply(
        &self,
        remote: u16,
        slot: u16,
        buffer: Option<Box<[u8]>>,
        result: Result<(), BackendError>,
    ) -> Result<(), Op> {
        self.answer(
            remote,
            Done {
                slot,
                buffer,
                result,
            },
        );
        Ok(())
    }

    fn answer(&self, remote: u16, done: Done) {
        // The done mailbox holds a whole pool: every operation has its slot, so it never fills.
        self.links[remote as usize]
            .done
            .send(done)
            .expect("a remote reactor's done mailbox holds its whole pool");
    }

    pub fn wait_fds(&self, out: &mut Vec<RawFd>) {
        if let Some(link) = self.links.first() {
            out.push(link.ops.raw_fd());
        }
    }

    /// Arms the operations mailbox before the reactor sleeps; `Some(0)` if work already waits.
    pub fn next_deadline_us(&self) -> Option<u64> {
        let link = self.links.first()?;
        self.armed.set(true);
        (link.ops.arm() || !self.pending.is_empty()).then_some(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Reserved for a write whose data is arriving.
    Receiving,
    /// At the engine.
    InFlight {
        read: bool,
    },
    /// A read's data is back, waiting for `finish_read`.
    ReadDone,
}

struct PoolSlot {
    buffer: Option<Box<[u8]>>,
    generation: u64,
    state: SlotState,
    result: Result<(), BackendError>,
}

/// A reserved write of a remote queue pair: a pool slot.
#[derive(Debug, PartialEq, Eq)]
pub struct RemoteWriteSlot {
    slot: u16,
    nsid: u32,
    lba: u64,
    length: u32,
}

/// The volume as a queue pair on a remote reactor sees it (see the module documentation).
pub struct RemoteBackend {
    link: RemoteLink,
    namespaces: Vec<NamespaceInfo>,
    slots: Vec<PoolSlot>,
    free: Vec<u16>,
    /// Tokens completed here, without the engine.
    completed: VecDeque<IoToken>,
    local_count: u64,
}

impl RemoteBackend {
    /// `namespaces[i]` is nsid `i + 1`, as the volume reports them.
    pub fn new(link: RemoteLink, namespaces: Vec<NamespaceInfo>) -> Self {
        RemoteBackend {
            link,
            namespaces,
            slots: (0..REMOTE_SLOTS)
                .map(|_| PoolSlot {
                    buffer: Some(vec![0u8; REMOTE_BUFFER_BYTES].into_boxed_slice()),
                    generation: 0,
                    state: SlotState::Free,
                    result: Ok(()),
                })
                .collect(),
            free: (0..REMOTE_SLOTS as u16).rev().collect(),
            completed: VecDeque::with_capacity(REMOTE_SLOTS * 2),
            local_count: 0,
        }
    }

    fn check(&self, nsid: u32, lba: u64, length_bytes: u64) -> Result<(), BackendError> {
        let info = self.namespace(nsid).ok_or(BackendError::InvalidNamespace)?;
        let end = lba
            .checked_mul(u64::from(LBA_BYTES))
            .and_then(|offset| offset.checked_add(length_bytes))
            .ok_or(BackendError::OutOfRange)?;
        if end > info.size_bytes || length_bytes == 0 {
            return Err(BackendError::OutOfRange);
        }
        Ok(())
    }

    /// A free pool slot for a new operation, or Busy.
    fn take_slot(&mut self, state: SlotState) -> Result<u16, BackendError> {
        let slot = self.free.pop().ok_or(BackendError::Busy)?;
        let pool = &mut self.slots[slot as usize];
        pool.generation += 1;
        pool.state = state;
        Ok(slot)
    }

    fn token(&self, slot: u16) -> IoToken {
        IoToken(self.slots[slot as usize].generation << 16 | u64::from(slot))
    }

    /// The slot of a pool token, if it is that slot's current operation.
    fn slot_of(&self, token: IoToken) -> Option<u16> {
        if token.0 & LOCAL_TOKEN_BIT != 0 {
            return None;
        }
        let slot = (token.0 & 0xffff) as u16;
        (self.slots.get(slot as usize)?.generation == token.0 >> 16).then_some(slot)
    }

    fn release(&mut self, slot: u16) {
        self.slots[slot as usize].state = SlotState::Free;
        self.free.push(slot);
    }

    fn complete_here(&mut self) -> IoToken {
        self.local_count += 1;
        let token = IoToken(LOCAL_TOKEN_BIT | self.local_count);
        self.completed.push_back(token);
        token
    }

    fn send(&mut self, slot: u16, kind: OpKind) -> IoToken {
        let read = matches!(kind, OpKind::Read { .. });
        self.slots[slot as usize].state = SlotState::InFlight { read };
        let op = Op {
            remote: self.link.index,
            slot,
            kind,
        };
        // The operations mailbox holds every remote reactor's whole pool: it never fills.
        self.link
            .ops
            .send(op)
            .expect("the operations mailbox holds every pool");
        self.token(slot)
    }

    fn take_buffer(&mut self, slot: u16) -> Box<[u8]> {
        self.slots[slot as usize]
            .buffer
            .take()
            .expect("a free slot has its buffer")
    }
}

impl Backend for RemoteBackend {
    type WriteSlot = RemoteWriteSlot;

    fn namespace(&self, nsid: u32) -> Option<NamespaceInfo> {
        self.namespaces
            .get((nsid as usize).checked_sub(1)?)
            .copied()
    }

    fn reserve_write(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<RemoteWriteSlot, BackendError> {
        self.check(nsid, lba, u64::from(length_bytes))?;
        if length_bytes as usize > REMOTE_BUFFER_BYTES {
            return Err(BackendError::OutOfRange);
        }
        let slot = self.take_slot(SlotState::Receiving)?;
        Ok(RemoteWriteSlot {
            slot,
            nsid,
            lba,
            length: length_bytes,
        })
    }

    fn write_buffer(&mut self, slot: &RemoteWriteSlot) -> &mut [u8] {
        let pool = &mut self.slots[slot.slot as usize];
        assert_eq!(pool.state, SlotState::Receiving);
        &mut pool
            .buffer
            .as_mut()
            .expect("a receiving slot has its buffer")[..slot.length as usize]
    }

    fn commit_write(&mut self, _now_us: u64, slot: RemoteWriteSlot) -> IoToken {
        let buffer = self.take_buffer(slot.slot);
        let kind = OpKind::Write {
            nsid: slot.nsid,
            lba: slot.lba,
            length: slot.length,
            buffer,
        };
        self.send(slot.slot, kind)
    }

    /// Nothing reached the engine yet: the write simply never happened.
    fn abort_write(&mut self, _now_us: u64, slot: RemoteWriteSlot) -> IoToken {
        self.release(slot.slot);
        self.complete_here()
    }

    fn write_zeroes(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<IoToken, BackendError> {
        self.check(nsid, lba, length_bytes)?;
        let slot = self.take_slot(SlotState::InFlight { read: false })?;
        let kind = OpKind::Zeroes {
            nsid,
            lba,
            length_bytes,
        };
        Ok(self.send(slot, kind))
    }

    /// Never called: [`Backend::start_read`] always answers.
    fn read(&mut self, _nsid: u32, _lba: u64, _buf: &mut [u8]) -> Result<(), BackendError> {
        unreachable!("a remote backend reads through start_read")
    }

    fn start_read(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<Option<IoToken>, BackendError> {
        self.check(nsid, lba, u64::from(length_bytes))?;
        if length_bytes as usize > REMOTE_BUFFER_BYTES {
            return Err(BackendError::OutOfRange);
        }
        let slot = self.take_slot(SlotState::InFlight { read: true })?;
        let buffer = self.take_buffer(slot);
        let kind = OpKind::Read {
            nsid,
            lba,
            length: length_bytes,
            buffer,
        };
        Ok(Some(self.send(slot, kind)))
    }

    fn finish_read(&mut self, token: IoToken, buf: &mut [u8]) -> Result<(), BackendError> {
        let slot = self
            .slot_of(token)
            .expect("finish_read of a live read token");
        let pool = &self.slots[slot as usize];
        assert_eq!(pool.state, SlotState::ReadDone);
        let result = pool.result;
        if result.is_ok() {
            let length = buf.len();
            buf.copy_from_slice(&pool.buffer.as_ref().expect("read data")[..length]);
        }
        self.release(slot);
        result
    }

    fn abandon(&mut self, token: IoToken) {
        if let Some(slot) = self.slot_of(token) {
            if self.slots[slot as usize].state == SlotState::ReadDone {
                self.release(slot);
            }
        }
    }

    /// Like the volume: every completed write is non-volatile on both sides already.
    fn flush(&mut self, _now_us: u64, nsid: u32) -> Result<IoToken, BackendError> {
        if self.namespace(nsid).is_none() && nsid != u32::MAX {
            return Err(BackendError::InvalidNamespace);
        }
        Ok(self.complete_here())
    }

    fn poll_completion(&mut self) -> Option<IoToken> {
        if let Some(token) = self.completed.pop_front() {
            return Some(token);
        }
        let done = self.link.done.pop()?;
        let token = self.token(done.slot);
        let pool = &mut self.slots[done.slot as usize];
        if let Some(buffer) = done.buffer {
            pool.buffer = Some(buffer);
        }
        match pool.state {
            SlotState::InFlight { read: true } => {
                pool.state = SlotState::ReadDone;
                pool.result = done.result;
            }
            SlotState::InFlight { read: false } => {
                if let Err(error) = done.result {
                    // Ranges are checked here first with the volume's sizes: not expected.
                    log::error!("remote write failed at the volume: {error:?}");
                }
                self.release(done.slot);
            }
            state => panic!("completion for a pool slot in state {state:?}"),
        }
        Some(token)
    }
}

/// A remote reactor's share of the target: the queue pairs handed to it and their backend.
pub struct RemoteFrontEnd {
    group: PollGroup<RemoteBackend>,
    backend: RemoteBackend,
    armed: Cell<bool>,
}

impl RemoteFrontEnd {
    pub fn new(target: Arc<Target>, link: RemoteLink, namespaces: Vec<NamespaceInfo>) -> Self {
        RemoteFrontEnd {
            group: PollGroup::new(target),
            backend: RemoteBackend::new(link, namespaces),
            armed: Cell::new(false),
        }
    }

    pub fn connection_count(&self) -> usize {
        self.group.connection_count()
    }
}

impl Poller for RemoteFrontEnd {
    fn poll(&mut self, now_us: u64) -> usize {
        let link = &self.backend.link;
        if self.armed.replace(false) {
            link.done.disarm();
            link.streams.disarm();
        }
        let mut work = 0;
        while let Some(stream) = link.streams.pop() {
            self.group.add_connection(stream, now_us);
            work += 1;
        }
        work + self.group.poll(now_us, &mut self.backend)
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.backend.link.done.raw_fd());
        out.push(self.backend.link.streams.raw_fd());
        self.group.raw_fds(out);
    }

    fn next_deadline_us(&self) -> Option<u64> {
        self.armed.set(true);
        let link = &self.backend.link;
        let done = link.done.arm();
        let streams = link.streams.arm();
        (done || streams).then_some(0)
    }
}

/// What a queue-pair reactor needs once the target exists (sent from the engine's reactor).
pub struct RemoteInit {
    pub target: Arc<Target>,
    pub link: RemoteLink,
    pub namespaces: Vec<NamespaceInfo>,
}

/// The queue-pair reactors of one source, filled in before its front end is built: the front
/// end sends each one its [`RemoteInit`].
#[derive(Clone, Default)]
pub struct QueuePairHosts(Arc<std::sync::Mutex<Vec<Arc<Mailbox<RemoteInit>>>>>);

impl QueuePairHosts {
    pub fn add(&self, inbox: Arc<Mailbox<RemoteInit>>) {
        self.0.lock().unwrap().push(inbox);
    }

    pub fn inboxes(&self) -> Vec<Arc<Mailbox<RemoteInit>>> {
        self.0.lock().unwrap().clone()
    }
}

/// A reactor's share of a target's queue pairs; it starts serving when its [`RemoteInit`]
/// arrives. Polled alone (a queue-pair reactor) or beside another node on the same core.
pub struct QueuePairHost {
    inbox: Arc<Mailbox<RemoteInit>>,
    front_end: Option<RemoteFrontEnd>,
    armed: Cell<bool>,
}

impl QueuePairHost {
    pub fn new() -> std::io::Result<Self> {
        Ok(QueuePairHost {
            inbox: Mailbox::new(1)?,
            front_end: None,
            armed: Cell::new(false),
        })
    }

    pub fn inbox(&self) -> Arc<Mailbox<RemoteInit>> {
        self.inbox.clone()
    }

    /// Queue pairs polled here now.
    pub fn connection_count(&self) -> usize {
        self.front_end
            .as_ref()
            .map_or(0, RemoteFrontEnd::connection_count)
    }
}

impl Poller for QueuePairHost {
    fn poll(&mut self, now_us: u64) -> usize {
        if self.armed.replace(false) {
            self.inbox.disarm();
        }
        if let Some(init) = self.inbox.pop() {
            log::info!(
                "queue-pair reactor {} ready for the target's connections",
                init.link.index + 1
            );
            self.front_end = Some(RemoteFrontEnd::new(init.target, init.link, init.namespaces));
        }
        self.front_end
            .as_mut()
            .map_or(0, |front_end| front_end.poll(now_us))
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.inbox.raw_fd());
        if let Some(front_end) = &self.front_end {
            front_end.wait_fds(out);
        }
    }

    fn next_deadline_us(&self) -> Option<u64> {
        self.armed.set(true);
        if self.inbox.arm() {
            return Some(0);
        }
        self.front_end
            .as_ref()
            .and_then(RemoteFrontEnd::next_deadline_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE_BYTES: u64 = 1 << 20;

    fn backend() -> (RemoteBackend, RemoteLink) {
        let link = remote_links(1).unwrap().remove(0);
        let namespaces = vec![NamespaceInfo {
            size_bytes: SIZE_BYTES,
            uuid: [7; 16],
        }];
        (RemoteBackend::new(link.clone(), namespaces), link)
    }

    /// The engine's side of one operation: takes it, answers it (a read gets `fill` bytes).
    fn serve_one(link: &RemoteLink, fill: u8) -> (u16, OpKind) {
        let Op { slot, kind, .. } = link.ops.pop().expect("an operation reached the engine");
        let (kind, buffer) = match kind {
            OpKind::Write {
                nsid,
                lba,
                length,
                buffer,
            } => {
                let copy = buffer.clone();
                let kind = OpKind::Write {
                    nsid,
                    lba,
                    length,
                    buffer: copy,
                };
                (kind, Some(buffer))
            }
            OpKind::Read {
                nsid,
                lba,
                length,
                mut buffer,
            } => {
                buffer[..length as usize].fill(fill);
                let kind = OpKind::Read {
                    nsid,
                    lba,
                    length,
                    buffer: Box::new([]),
                };
                (kind, Some(buffer))
            }
            zeroes => (zeroes, None),
        };
        let result = Ok(());
        link.done
            .send(Done {
                slot,
                buffer,
                result,
            })
            .unwrap();
        (slot, kind)
    }

    #[test]
    fn a_write_moves_its_buffer_to_the_engine_and_completes_with_its_token() {
        let (mut backend, link) = backend();
        let slot = backend.reserve_write(0, 1, 8, 4096).unwrap();
        backend.write_buffer(&slot).fill(0xab);
        let token = backend.commit_write(0, slot);
        assert_eq!(backend.poll_completion(), None, "not durable yet");
        let (_, kind) = serve_one(&link, 0);
        match kind {
            OpKind::Write {
                nsid,
                lba,
                length,
                buffer,
            } => {
                assert_eq!((nsid, lba, length), (1, 8, 4096));
                assert!(buffer[..4096].iter().all(|&b| b == 0xab));
            }
            other => panic!("expected a write, got {other:?}"),
        }
        assert_eq!(backend.poll_completion(), Some(token));
        assert_eq!(
            backend.free.len(),
            REMOTE_SLOTS,
            "the slot and its buffer came back"
        );
    }

    #[test]
    fn a_read_hands_over_the_engines_data_once() {
        let (mut backend, link) = backend();
        let token = backend.start_read(0, 1, 0, 512).unwrap().unwrap();
        serve_one(&link, 0x5a);
        assert_eq!(backend.poll_completion(), Some(token));
        let mut data = [0u8; 512];
        backend.finish_read(token, &mut data).unwrap();
        assert!(data.iter().all(|&b| b == 0x5a));
        assert_eq!(backend.free.len(), REMOTE_SLOTS);

        // A read whose connection went away is abandoned: its slot is freed all the same.
        let token = backend.start_read(0, 1, 0, 512).unwrap().unwrap();
        serve_one(&link, 0);
        assert_eq!(backend.poll_completion(), Some(token));
        backend.abandon(token);
        assert_eq!(backend.free.len(), REMOTE_SLOTS);
    }

    #[test]
    fn ranges_are_checked_here_and_a_full_pool_is_busy() {
        let (mut backend, link) = backend();
        let lbas = SIZE_BYTES / u64::from(LBA_BYTES);
        assert_eq!(
            backend.reserve_write(0, 1, lbas - 1, 1024).unwrap_err(),
            BackendError::OutOfRange
        );
        assert_eq!(
            backend.start_read(0, 2, 0, 512).unwrap_err(),
            BackendError::InvalidNamespace
        );
        assert_eq!(
            backend.write_zeroes(0, 1, lbas, 512).unwrap_err(),
            BackendError::OutOfRange
        );
        let slots: Vec<_> = (0..REMOTE_SLOTS)
            .map(|i| backend.reserve_write(0, 1, i as u64, 512).unwrap())
            .collect();
        assert_eq!(
            backend.reserve_write(0, 1, 0, 512).unwrap_err(),
            BackendError::Busy
        );
        // An aborted write never reaches the engine and frees its slot at once.
        let first = slots.into_iter().next().unwrap();
        let token = backend.abort_write(0, first);
        assert!(link.ops.pop().is_none());
        assert_eq!(backend.poll_completion(), Some(token));
        assert!(backend.reserve_write(0, 1, 0, 512).is_ok());
    }
}
