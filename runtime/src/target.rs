//! The NVMe/TCP target as a front end of the replicated volume, and the unreplicated target.
//!
//! Host writes reach the engine through [`nvmirror_nvmf::Backend`], implemented here by the
//! [`Volume`]: a write's slot is its reserved entry in the NVRAM ring, so the target receives the
//! host's data straight into the ring, and the command completes only when the engine reports the
//! write durable on both sides (invariant 1). Queue pairs are polled on the engine's reactor.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;

use nvmirror_engine::device::BlockDevice;
use nvmirror_engine::source::{ReadError, WriteRefused, WriteSlot};
use nvmirror_nvmf::{
    Backend, BackendError, DeviceBackend, IoToken, Listener, NamespaceInfo, PollGroup, Target,
};

use crate::node::{Command, FrontEnd, Node, SourceEngine, Volume};
use crate::reactor::{Doorbell, Period, Poller, ACCEPT_POLL_PERIOD_US};
use crate::remote::{
    backend_namespaces, remote_links, QueuePairHosts, RemoteInit, RemoteLink, RemoteRouting,
    Routed, VolumeService,
};
use crate::volume::{FlushError, StartReadError};

fn backend_error(refused: WriteRefused) -> BackendError {
    match refused {
        WriteRefused::Backpressure => BackendError::Busy,
        WriteRefused::InvalidNamespace => BackendError::InvalidNamespace,
        WriteRefused::OutOfRange | WriteRefused::InvalidLength => BackendError::OutOfRange,
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
fn namespace_uuid(volume_id: [u8; 16], nsid: u32) -> [u8; 16] {
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
            Err(FlushError::Io(error)) => {
                log::error!("flush: persisting the NVRAM ring failed: {error}");
                Err(BackendError::Io)
            }
        }
    }

    fn poll_completion(&mut self) -> Option<IoToken> {
        self.pop_token().map(IoToken)
    }
}

/// One target on its reactor, whatever the backend: the listeners, the round-robin hand-off
/// of what they accept (to this reactor's poll group and, in turn, to the queue-pair reactors
/// of `remote`, [`crate::remote`]), the [`VolumeService`] answering those, and the poll group.
pub struct TargetServer<B: Backend> {
    listeners: Vec<Listener>,
    accept: Period,
    service: VolumeService,
    group: PollGroup<B>,
}

impl<B: RemoteRouting> TargetServer<B> {
    /// Binds every listener of `target` (I/O and discovery); `remote` links the queue-pair
    /// reactors on the other configured cores (none: every queue pair is polled here).
    pub fn new(target: Arc<Target>, remote: Vec<RemoteLink>) -> std::io::Result<Self> {
        Ok(TargetServer {
            listeners: target.bind_listeners()?,
            accept: Period::new(ACCEPT_POLL_PERIOD_US),
            service: VolumeService::new(remote),
            group: PollGroup::new(target),
        })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(Listener::local_addr).collect()
    }

    /// One pass: accept (at most once per [`ACCEPT_POLL_PERIOD_US`]), serve the remote queue
    /// pairs, poll this reactor's own.
    pub fn poll(&mut self, now_us: u64, backend: &mut B) -> usize {
        let mut work = 0;
        if self.accept.due(now_us) {
            for listener in &mut self.listeners {
                while let Some(stream) = listener.poll_accept() {
                    if let Some(stream) = self.service.hand_off(stream) {
                        self.group.add_connection(stream, now_us);
                    }
                    work += 1;
                }
            }
        }
        work += self.service.poll(now_us, backend);
        work + self.group.poll(now_us, backend)
    }

    pub fn wait_fds(&self, out: &mut Vec<RawFd>) {
        out.extend(self.listeners.iter().map(Listener::raw_fd));
        self.group.raw_fds(out);
    }

    pub fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        self.service.doorbells(out);
    }

    pub fn next_deadline_us(&self) -> Option<u64> {
        self.service.next_deadline_us()
    }
}

/// Links a target's queue-pair reactors (`hosts`) and sends each its share; returns the links
/// for this reactor's [`VolumeService`].
fn link_hosts(
    target: &Arc<Target>,
    namespaces: Vec<NamespaceInfo>,
    hosts: &QueuePairHosts,
) -> std::io::Result<Vec<RemoteLink>> {
    let inboxes = hosts.inboxes();
    let links = remote_links(inboxes.len())?;
    for (inbox, link) in inboxes.iter().zip(&links) {
        let init = RemoteInit {
            target: target.clone(),
            link: link.clone(),
            namespaces: namespaces.clone(),
        };
        if inbox.send(init).is_err() {
            return Err(std::io::Error::other(
                "a queue-pair reactor was set up twice",
            ));
        }
    }
    Ok(links)
}

/// The NVMe/TCP target as the replicated volume's front end (the volume is the source node's).
pub type TargetFrontEnd = TargetServer<Volume>;

impl FrontEnd for TargetFrontEnd {
    fn poll(&mut self, now_us: u64, volume: &mut Volume) -> usize {
        TargetServer::poll(self, now_us, volume)
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        TargetServer::wait_fds(self, out)
    }

    fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        TargetServer::doorbells(self, out)
    }

    fn next_deadline_us(&self) -> Option<u64> {
        TargetServer::next_deadline_us(self)
    }
}

/// The namespaces of a volume as the target reports them (nsid = index + 1).
pub fn volume_namespaces(source: &SourceEngine) -> Vec<NamespaceInfo> {
    source
        .namespace_sizes_bytes()
        .iter()
        .zip(1..)
        .map(|(&size_bytes, nsid)| NamespaceInfo {
            size_bytes,
            uuid: namespace_uuid(source.volume_id(), nsid),
        })
        .collect()
}

/// Builds the target's front end on the source's reactor and sends every queue-pair reactor
/// in `hosts` its share (round robin: this reactor first, then each host in turn).
pub fn build_target_front_end(
    target: Arc<Target>,
    source: &SourceEngine,
    hosts: &QueuePairHosts,
) -> std::io::Result<TargetFrontEnd> {
    let links = link_hosts(&target, volume_namespaces(source), hosts)?;
    TargetFrontEnd::new(target, links)
}

/// The unreplicated target: the same NVMe/TCP front end over plain block devices, for the
/// "without replication" side of the benchmarks; its queue pairs go round robin too.
pub struct PlainTarget<D: BlockDevice> {
    server: TargetServer<Routed<DeviceBackend<D>>>,
    backend: Routed<DeviceBackend<D>>,
}

impl<D: BlockDevice> PlainTarget<D> {
    /// Binds the listeners and sends every queue-pair reactor in `hosts` its share.
    pub fn new(
        target: Arc<Target>,
        devices: Vec<D>,
        hosts: &QueuePairHosts,
    ) -> std::io::Result<Self> {
        let backend = Routed::new(DeviceBackend::new(devices));
        let links = link_hosts(&target, backend_namespaces(&backend), hosts)?;
        Ok(PlainTarget {
            server: TargetServer::new(target, links)?,
            backend,
        })
    }

    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.server.local_addrs()
    }
}

impl<D: BlockDevice> Poller for PlainTarget<D> {
    fn poll(&mut self, now_us: u64) -> usize {
        self.server.poll(now_us, &mut self.backend)
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.server.wait_fds(out);
    }

    fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        self.server.doorbells(out);
    }

    fn next_deadline_us(&self) -> Option<u64> {
        self.server.next_deadline_us()
    }
}

impl<D: BlockDevice> Node for PlainTarget<D> {
    /// No replication, no CPs: only the counters request means anything, and they have none.
    fn handle_command(&mut self, _now_us: u64, command: Command) {
        log::debug!("unreplicated target: {command:?} ignored");
    }
}
