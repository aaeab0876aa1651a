//! The NVMe/TCP target as a front end of the replicated volume, and the unreplicated target.
//!
//! Host writes reach the engine through [`nvmirror_nvmf::Backend`], implemented by the
//! [`Volume`] (`crate::volume`): a write's slot is its reserved entry in the NVRAM ring, so the target receives the
//! host's data straight into the ring, and the command completes only when the engine reports the
//! write durable on both sides (invariant 1). Queue pairs are polled on the engine's reactor.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;

use nvmirror_engine::device::BlockDevice;
use nvmirror_nvmf::{Backend, DeviceBackend, Listener, NamespaceInfo, PollGroup, Target};

use crate::node::{Command, FrontEnd, Node, SourceEngine, Volume};
use crate::reactor::{Doorbell, Period, Poller, ACCEPT_POLL_PERIOD_US};
use crate::remote::{
    backend_namespaces, remote_links, QueuePairHosts, RemoteInit, RemoteLink, RemoteRouting,
    Routed, VolumeService,
};

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

    /// Responses of the commands whose backend operations finished, sent now (no socket read).
    pub fn poll_completions(&mut self, now_us: u64, backend: &mut B) -> usize {
        self.group.poll_completions(now_us, backend)
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

    fn poll_completions(&mut self, now_us: u64, volume: &mut Volume) -> usize {
        TargetServer::poll_completions(self, now_us, volume)
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
            uuid: crate::volume::namespace_uuid(source.volume_id(), nsid),
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

    /// The unreplicated target runs on the embedded reactor only, whose devices wait for
    /// their ops in their own drop: it has nothing to wait for here.
    fn device_ops_in_flight(&self) -> usize {
        0
    }

    fn reap_device_completions(&mut self) -> usize {
        0
    }
}
