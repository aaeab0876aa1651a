//! The engine's side of remote queue pairs: the round-robin hand-off and the service that
//! executes their operations against the backend, plus [`Routed`] for a backend that is not
//! the volume.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::Arc;

use nvmirror_nvmf::{Backend, BackendError, IoToken, NamespaceInfo};

use super::{
    Done, Op, OpKind, RemoteLink, RemoteRoutes, RemoteWaiter, REMOTE_ROUTES_RESERVED, REMOTE_SLOTS,
};

use crate::reactor::Doorbell;

/// A backend whose write completions can be routed to queue pairs on other reactors: the
/// replicated [`crate::volume::Volume`] and, for the unreplicated target, [`Routed`].
pub trait RemoteRouting: Backend {
    /// Token `token`'s completion goes to `waiter` instead of [`Backend::poll_completion`].
    fn wait_remote(&mut self, token: IoToken, waiter: RemoteWaiter);
    /// The next routed completion.
    fn pop_remote_done(&mut self) -> Option<RemoteWaiter>;
}

/// The engine's side: hands accepted connections round robin (this reactor first), executes
/// what remote queue pairs ask against the backend, and answers when writes are durable.
pub struct VolumeService {
    links: Vec<RemoteLink>,
    next_hand_off: usize,
    /// Operations the backend refused with back-pressure, retried first and in order.
    pending: VecDeque<Op>,
}

impl VolumeService {
    pub fn new(links: Vec<RemoteLink>) -> Self {
        VolumeService {
            pending: VecDeque::with_capacity(REMOTE_SLOTS * links.len()),
            links,
            next_hand_off: 0,
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
    pub fn poll<B: RemoteRouting>(&mut self, now_us: u64, backend: &mut B) -> usize {
        if self.links.is_empty() {
            return 0;
        }
        let mut work = 0;
        while let Some(waiter) = backend.pop_remote_done() {
            let mut buffer = waiter.buffer;
            let result = match (waiter.read, buffer.as_mut()) {
                (Some((token, length)), Some(buffer)) => {
                    let result =
                        backend.finish_read(IoToken(token), &mut buffer[..length as usize]);
                    if let Err(error) = result {
                        log::error!("read for a remote queue pair failed: {error:?}");
                    }
                    result
                }
                _ => waiter.result,
            };
            self.answer(
                waiter.remote,
                Done {
                    slot: waiter.slot,
                    buffer,
                    result,
                },
            );
            work += 1;
        }
        while let Some(op) = self.pending.pop_front() {
            if let Err(op) = self.execute(now_us, backend, op) {
                self.pending.push_front(op);
                return work;
            }
            work += 1;
        }
        while let Some(op) = self.links[0].ops.pop() {
            work += 1;
            if let Err(op) = self.execute(now_us, backend, op) {
                self.pending.push_back(op);
                break;
            }
        }
        work
    }

    /// Runs one operation; back-pressure (Busy) gives it back.
    fn execute<B: RemoteRouting>(
        &mut self,
        now_us: u64,
        backend: &mut B,
        op: Op,
    ) -> Result<(), Op> {
        // A write or write-zeroes starts at the backend and completes later (its token);
        // a read is served at once.
        let started = match &op.kind {
            OpKind::Write {
                nsid,
                lba,
                length,
                buffer,
            } => backend
                .reserve_write(now_us, *nsid, *lba, *length)
                .map(|write| {
                    backend.fill_write(&write, 0, &buffer[..*length as usize]);
                    Some(backend.commit_write(now_us, write))
                }),
            OpKind::Zeroes {
                nsid,
                lba,
                length_bytes,
            } => backend
                .write_zeroes(now_us, *nsid, *lba, *length_bytes)
                .map(Some),
            OpKind::Read {
                nsid, lba, length, ..
            } => backend.start_read(now_us, *nsid, *lba, *length),
        };
        let (remote, slot) = (op.remote, op.slot);
        match started {
            Err(BackendError::Busy) => Err(op),
            Ok(Some(token)) => {
                let read = match &op.kind {
                    OpKind::Read { length, .. } => Some((token.0, *length)),
                    _ => None,
                };
                let buffer = op.kind.into_buffer();
                backend.wait_remote(
                    token,
                    RemoteWaiter {
                        remote,
                        slot,
                        buffer,
                        read,
                        result: Ok(()),
                    },
                );
                Ok(())
            }
            Ok(None) => {
                let OpKind::Read {
                    nsid,
                    lba,
                    length,
                    mut buffer,
                } = op.kind
                else {
                    unreachable!("only reads are served at once")
                };
                // A read the backend serves at once.
                let result = backend.read(nsid, lba, &mut buffer[..length as usize]);
                if let Err(error) = result {
                    log::error!("read for a remote queue pair failed: {error:?}");
                }
                self.reply(remote, slot, Some(buffer), result)
            }
            // The destination is lost under the fail policy: the path error goes back to the
            // remote queue pair's host.
            Err(BackendError::PathInaccessible) => {
                let buffer = op.kind.into_buffer();
                self.reply(remote, slot, buffer, Err(BackendError::PathInaccessible))
            }
            // The remote backend checked namespace, range and length against the same sizes
            // before sending: any other refusal here is a programmer error, not an I/O error
            // to log and swallow.
            Err(error) => {
                panic!("a remote write the remote backend admitted was refused: {error:?}")
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

    /// The operations mailbox, for the reactor to arm before it sleeps.
    pub fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        if let Some(link) = self.links.first() {
            out.push(link.ops.clone());
        }
    }

    /// Operations refused with back-pressure are retried without waiting for a wake-up.
    pub fn next_deadline_us(&self) -> Option<u64> {
        (!self.pending.is_empty()).then_some(0)
    }
}

/// A backend made routable: its completions for remote queue pairs are set aside for the
/// [`VolumeService`], the rest go to this reactor's poll group as before (the unreplicated
/// target's backend).
pub struct Routed<B> {
    inner: B,
    routes: RemoteRoutes,
    local: VecDeque<(IoToken, Result<(), BackendError>)>,
}

impl<B: Backend> Routed<B> {
    pub fn new(inner: B) -> Self {
        Routed {
            inner,
            routes: RemoteRoutes::default(),
            local: VecDeque::with_capacity(REMOTE_ROUTES_RESERVED),
        }
    }

    /// Sorts what the backend completed: routed completions aside, the rest kept in order.
    fn pump(&mut self) {
        while let Some((token, result)) = self.inner.poll_completion() {
            if !self.routes.complete(token.0, result) {
                self.local.push_back((token, result));
            }
        }
    }
}

impl<B: Backend> RemoteRouting for Routed<B> {
    fn wait_remote(&mut self, token: IoToken, waiter: RemoteWaiter) {
        self.routes.wait(token.0, waiter);
    }
    fn pop_remote_done(&mut self) -> Option<RemoteWaiter> {
        self.pump();
        self.routes.pop_done()
    }
}

impl<B: Backend> Backend for Routed<B> {
    type WriteSlot = B::WriteSlot;
    const ORDERED_WRITE_SLOTS: bool = B::ORDERED_WRITE_SLOTS;

    fn namespace(&self, nsid: u32) -> Option<NamespaceInfo> {
        self.inner.namespace(nsid)
    }
    fn reserve_write(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<B::WriteSlot, BackendError> {
        self.inner.reserve_write(now_us, nsid, lba, length_bytes)
    }
    fn write_buffer(&mut self, slot: &B::WriteSlot) -> &mut [u8] {
        self.inner.write_buffer(slot)
    }
    fn fill_write(&mut self, slot: &B::WriteSlot, offset: usize, data: &[u8]) {
        self.inner.fill_write(slot, offset, data)
    }
    fn commit_write(&mut self, now_us: u64, slot: B::WriteSlot) -> IoToken {
        self.inner.commit_write(now_us, slot)
    }
    fn commit_write_verified(&mut self, now_us: u64, slot: B::WriteSlot, data_crc: u32) -> IoToken {
        self.inner.commit_write_verified(now_us, slot, data_crc)
    }
    fn abort_write(&mut self, now_us: u64, slot: B::WriteSlot) -> IoToken {
        self.inner.abort_write(now_us, slot)
    }
    fn write_zeroes(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<IoToken, BackendError> {
        self.inner.write_zeroes(now_us, nsid, lba, length_bytes)
    }
    fn read(&mut self, nsid: u32, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.inner.read(nsid, lba, buf)
    }
    fn start_read(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<Option<IoToken>, BackendError> {
        self.inner.start_read(now_us, nsid, lba, length_bytes)
    }
    fn finish_read(&mut self, token: IoToken, buf: &mut [u8]) -> Result<(), BackendError> {
        self.inner.finish_read(token, buf)
    }
    fn abandon(&mut self, token: IoToken) {
        self.inner.abandon(token)
    }
    fn flush(&mut self, now_us: u64, nsid: u32) -> Result<IoToken, BackendError> {
        self.inner.flush(now_us, nsid)
    }
    fn poll_completion(&mut self) -> Option<(IoToken, Result<(), BackendError>)> {
        self.pump();
        self.local.pop_front()
    }
}

/// The namespaces a backend exports, as remote queue pairs report them (nsid = index + 1).
pub fn backend_namespaces(backend: &impl Backend) -> Vec<NamespaceInfo> {
    (1..).map_while(|nsid| backend.namespace(nsid)).collect()
}
