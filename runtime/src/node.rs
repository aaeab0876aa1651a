//! Source and destination nodes: an engine state machine, its replication link and its front end,
//! polled together on one reactor.
//!
//! Everything a node owns lives on its reactor's thread. Other threads send it [`Command`]s through
//! the reactor's mailbox (a bounded lock-free queue) and read what it publishes in
//! [`NodeControl`], so the I/O path takes no lock.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvmirror_engine::counters::Counters;
use nvmirror_engine::destination::{Destination, DestinationEvent};
use nvmirror_engine::device::BlockDevice;
use nvmirror_engine::generation::Generations;
use nvmirror_engine::liveness::{PeerLossPolicy, PeerState};
use nvmirror_engine::source::{ResyncStatus, Source, SourceEvent};
use nvmirror_engine::wire;

use crate::bdev::NamespaceDevice;
#[cfg(doc)]
use crate::link::TcpTransport;
use crate::link::{IoVecs, Link, LinkEndpoint, Transport};
use crate::reactor::{Doorbell, Mailbox, Poller};
use crate::remote::QueuePairHost;
use crate::ring_memory::RingMemory;
pub use crate::volume::Volume;

/// A namespace device as the nodes hold it.
pub type Device = Box<dyn NamespaceDevice>;
pub type SourceEngine = Source<RingMemory>;
pub type DestinationEngine = Destination<RingMemory>;

/// Appends the doorbells of `devices` (those completing on other threads).
pub(crate) fn device_doorbells(devices: &[Device], out: &mut Vec<Arc<dyn Doorbell>>) {
    out.extend(devices.iter().filter_map(|device| device.doorbell()));
}

/// Some op of `devices` completes on the next poll with no fd and no deadline to announce it
/// (a device with a deadline is polled by [`devices_deadline_us`]).
pub(crate) fn devices_need_poll(devices: &[Device]) -> bool {
    devices.iter().any(|device| {
        device.inflight_count() > 0
            && device.next_deadline_us().is_none()
            && device.doorbell().is_none()
    })
}

/// The earliest time some device of `devices` needs a poll that no doorbell announces (a
/// completion held on a timer); `None` for devices that never ask.
pub(crate) fn devices_deadline_us(devices: &[Device]) -> Option<u64> {
    devices
        .iter()
        .filter_map(|device| device.next_deadline_us())
        .min()
}

/// What another thread can ask of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Start a consistency point now (source).
    RequestCp,
    /// Publish the counters in [`NodeControl::counters`].
    PublishCounters,
    /// Finish: take a last CP so the mirror is current, then report `synced` (source).
    Finish,
    /// Change the peer-loss policy (source).
    SetPeerLossPolicy(PeerLossPolicy),
    /// Serve hosts now, without waiting for a handshake (source): the operator's decision that
    /// this node is the pair's authority, e.g. right after its promotion.
    Settle,
    /// Replicate to the destination at this address from now on (source): the operator attached
    /// another node (e.g. the old source, after a promotion, as the new destination).
    Attach(SocketAddr),
}

/// Commands queued for a node at most; a full mailbox refuses more.
pub const COMMANDS_MAX: usize = 64;
/// A node publishes its state at least this often, unasked (its reactor wakes for it), so what
/// a reader finds without asking for a fresh publication is at most this old.
pub const PUBLISH_INTERVAL_US: u64 = 1_000_000;

/// How other threads steer a node: commands go through its mailbox; results are published here.
pub struct NodeControl {
    mailbox: Arc<Mailbox<Command>>,
    /// Ends the node's reactor loop (checked once per loop; the mailbox wakes a sleeping reactor).
    pub stop: AtomicBool,
    /// Consistency points completed (source) or applied (destination).
    pub cp_completed: AtomicU64,
    /// Set by a source once its front end finished (or [`Command::Finish`] came) and the last CP
    /// made everything durable on both sides.
    pub synced: AtomicBool,
    /// Set when the peer refused the link for good (version, geometry, volume, generations).
    pub rejected: Mutex<Option<String>>,
    /// Set by a source once the handshake settled its role (its generation is the pair's):
    /// only then does its front end exist, so a stale or split source never answers a host.
    pub settled: AtomicBool,
    /// Destination: the operator asked for an online promotion (`nvmirror_promote`); the
    /// process stops the node, promotes it and serves the volume as its source.
    pub promote_requested: AtomicBool,
    /// The latest counters, published on request and at shutdown.
    pub counters: Mutex<Option<Counters>>,
    /// Counts publications of `counters` and `link`, so a reader can wait for a fresh one.
    pub published: AtomicU64,
    /// The replication link as of the last publication.
    pub link: Mutex<LinkStatus>,
    /// Source: its view of the destination and its policy, as of the last publication.
    pub peer: Mutex<Option<PeerStatus>>,
    /// The node's generations (current, history, bitmap base, flags), as of the last
    /// publication.
    pub generations: Mutex<Option<Generations>>,
    /// Source: `RequestCp` commands taken, and the CP number that makes every write completed
    /// before the latest one durable on both sides (what `nvmirror_cp` waits for).
    pub cp_requests_seen: AtomicU64,
    pub cp_requested_number: AtomicU64,
    /// Source: the last CP number durable on both sides.
    pub cp_durable_number: AtomicU64,
}

/// A source's view of its destination, as published.
#[derive(Debug, Clone, Copy)]
pub struct PeerStatus {
    pub state: PeerState,
    pub policy: PeerLossPolicy,
    /// Writes complete without the destination (`degrade`), their extents marked.
    pub degraded: bool,
    /// The resync of the destination, while one runs.
    pub resync: Option<ResyncStatus>,
    /// The node's clock at the publication (the resync's rates are taken at it).
    pub now_us: u64,
}

/// The replication link of a node, as published.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkStatus {
    pub connected: bool,
    pub connects: u64,
    pub disconnects: u64,
}

impl NodeControl {
    pub fn new() -> std::io::Result<Arc<NodeControl>> {
        Ok(Arc::new(NodeControl {
            mailbox: Mailbox::new(COMMANDS_MAX)?,
            stop: AtomicBool::new(false),
            cp_completed: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            rejected: Mutex::new(None),
            settled: AtomicBool::new(false),
            promote_requested: AtomicBool::new(false),
            counters: Mutex::new(None),
            published: AtomicU64::new(0),
            link: Mutex::new(LinkStatus::default()),
            peer: Mutex::new(None),
            generations: Mutex::new(None),
            cp_requests_seen: AtomicU64::new(0),
            cp_requested_number: AtomicU64::new(0),
            cp_durable_number: AtomicU64::new(0),
        }))
    }

    /// Publishes a node's counters, generations and link state (on the node's reactor).
    pub fn publish(&self, counters: Counters, generations: Generations, link: &Link) {
        *self.counters.lock().unwrap() = Some(counters);
        *self.generations.lock().unwrap() = Some(generations);
        *self.link.lock().unwrap() = LinkStatus {
            connected: link.is_connected(),
            connects: link.counters.connects,
            disconnects: link.counters.disconnects,
        };
        self.published.fetch_add(1, Ordering::AcqRel);
    }

    pub fn mailbox(&self) -> Arc<Mailbox<Command>> {
        self.mailbox.clone()
    }

    /// Queues a command for the node; fails only when the node has not drained its mailbox.
    pub fn send(&self, command: Command) -> Result<(), String> {
        self.mailbox
            .send(command)
            .map_err(|command| format!("node mailbox full; {command:?} not sent"))
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.mailbox.wake();
    }
}

/// A node as its reactor drives it: polled work plus the commands of other threads.
pub trait Node: Poller {
    fn handle_command(&mut self, now_us: u64, command: Command);
    /// Device ops (primaries or mirrors, the metadata file) submitted and not completed yet.
    fn device_ops_in_flight(&self) -> usize;
    /// Takes the completions of device ops without acting on them. A stopped node waits for
    /// its devices this way before it is dropped where completions arrive on the node's own
    /// thread (SPDK), so no device goes on using a channel, a buffer or ring memory that the
    /// drop frees; a device's own drop cannot wait there. What is not acted on is what a crash
    /// at this moment leaves, which a start recovers (ring replay, metadata read back).
    fn reap_device_completions(&mut self) -> usize;
}

/// Device ops of `devices` submitted and not completed yet.
fn devices_in_flight(devices: &[Device]) -> usize {
    devices.iter().map(|device| device.inflight_count()).sum()
}

/// Takes the completions of `devices` without acting on them ([`Node::reap_device_completions`]).
fn reap_devices(devices: &mut [Device]) -> usize {
    devices
        .iter_mut()
        .map(|device| device.poll_completions(&mut |_| {}))
        .sum()
}

/// What feeds host I/O into a source: the NVMe/TCP target or the built-in workload.
pub trait FrontEnd {
    /// Issues (and re-issues after back-pressure) host I/O against the volume API and collects
    /// completions with [`Volume::pop_completed`]. Returns work done.
    fn poll(&mut self, now_us: u64, volume: &mut Volume) -> usize;
    /// Answers the host I/O that completed since the last poll, taking no new I/O in (a
    /// front end with nothing cheaper than [`FrontEnd::poll`] leaves them to it).
    fn poll_completions(&mut self, _now_us: u64, _volume: &mut Volume) -> usize {
        0
    }
    fn wait_fds(&self, _out: &mut Vec<RawFd>) {}
    /// Mailboxes the front end drains (see [`Poller::doorbells`]).
    fn doorbells(&self, _out: &mut Vec<Arc<dyn Doorbell>>) {}
    /// When the front end needs a poll that no readable fd announces (`Some(0)`: now).
    fn next_deadline_us(&self) -> Option<u64> {
        None
    }
    /// True once a finite front end (the workload) has issued everything and seen it complete.
    fn is_finished(&self) -> bool {
        false
    }
}

/// An optional front end: none takes no host I/O.
impl<F: FrontEnd> FrontEnd for Option<F> {
    fn poll(&mut self, now_us: u64, volume: &mut Volume) -> usize {
        match self {
            Some(front_end) => front_end.poll(now_us, volume),
            None => NoFrontEnd.poll(now_us, volume),
        }
    }
    fn poll_completions(&mut self, now_us: u64, volume: &mut Volume) -> usize {
        match self {
            Some(front_end) => front_end.poll_completions(now_us, volume),
            None => 0,
        }
    }
    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        if let Some(front_end) = self {
            front_end.wait_fds(out);
        }
    }
    fn next_deadline_us(&self) -> Option<u64> {
        self.as_ref().and_then(FrontEnd::next_deadline_us)
    }
    fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        if let Some(front_end) = self {
            front_end.doorbells(out);
        }
    }
    fn is_finished(&self) -> bool {
        self.as_ref().is_some_and(FrontEnd::is_finished)
    }
}

/// A front end for a source that takes no host I/O (the replication pair alone).
pub struct NoFrontEnd;

impl FrontEnd for NoFrontEnd {
    fn poll(&mut self, _now_us: u64, volume: &mut Volume) -> usize {
        assert!(
            volume.pop_completed().is_none(),
            "a write completed on a source without a front end"
        );
        0
    }
}

impl LinkEndpoint for SourceEngine {
    type Error = nvmirror_engine::LinkError;
    fn handle_connected(&mut self, now_us: u64) {
        Source::handle_connected(self, now_us)
    }
    fn handle_disconnected(&mut self, now_us: u64) {
        Source::handle_disconnected(self, now_us)
    }
    fn handle_message(&mut self, now_us: u64, message: &[u8]) -> Result<(), Self::Error> {
        Source::handle_message(self, now_us, message)
    }
    fn tx_iovecs<'a>(&'a self, out: &mut IoVecs<'a>, max: usize) -> usize {
        Source::tx_iovecs(self, out, max)
    }
    fn tx_advance(&mut self, bytes: usize) {
        Source::tx_advance(self, bytes)
    }
    fn tx_pending_bytes(&self) -> u64 {
        Source::tx_pending_bytes(self)
    }
    fn frame_length(buf: &[u8]) -> Result<Option<usize>, Self::Error> {
        wire::frame_length(buf).map_err(Into::into)
    }
    fn poll_close(&mut self) -> Option<String> {
        self.poll_link_close().map(|reason| reason.to_string())
    }
    fn session_ready(&self) -> bool {
        matches!(self.peer_state(), PeerState::Connected { .. })
    }
}

impl LinkEndpoint for DestinationEngine {
    type Error = nvmirror_engine::LinkError;
    fn handle_connected(&mut self, now_us: u64) {
        Destination::handle_connected(self, now_us)
    }
    fn handle_disconnected(&mut self, now_us: u64) {
        Destination::handle_disconnected(self, now_us)
    }
    fn handle_message(&mut self, now_us: u64, message: &[u8]) -> Result<(), Self::Error> {
        Destination::handle_message(self, now_us, message)
    }
    fn tx_iovecs<'a>(&'a self, out: &mut IoVecs<'a>, max: usize) -> usize {
        Destination::tx_iovecs(self, out, max)
    }
    fn tx_advance(&mut self, bytes: usize) {
        Destination::tx_advance(self, bytes)
    }
    fn tx_pending_bytes(&self) -> u64 {
        Destination::tx_pending_bytes(self)
    }
    fn frame_length(buf: &[u8]) -> Result<Option<usize>, Self::Error> {
        wire::frame_length(buf).map_err(Into::into)
    }
    fn refuse_unframed(&mut self, error: Self::Error) -> Self::Error {
        match error {
            nvmirror_engine::LinkError::Wire(wire_error) => {
                Destination::refuse_unframed(self, wire_error)
            }
            other => other,
        }
    }
    fn poll_close(&mut self) -> Option<String> {
        self.poll_link_close().map(|reason| reason.to_string())
    }
}

/// Builds a source's front end once its role is settled (the NVMe/TCP listener opens then).
pub type MakeFrontEnd<F> = Box<dyn FnOnce(&SourceEngine) -> Result<F, String> + Send>;

/// How often a source whose role is not settled yet says what it waits for.
pub const UNSETTLED_LOG_INTERVAL_US: u64 = 10_000_000;

/// The source side: host writes in, transfers and CPs out.
///
/// Until the first LinkReady (the handshake settled the generations) the node only talks to its
/// peer and its metadata: no front end exists (no listener, no host), and no op reaches the
/// primaries (the ring's replay waits), so a stale former source neither serves nor changes
/// anything.
pub struct SourceNode<F: FrontEnd> {
    pub volume: Volume,
    pub link: Link,
    pub front_end: Option<F>,
    make_front_end: Option<MakeFrontEnd<F>>,
    /// The node's metadata file (generations, bitmap) as a device.
    pub metadata_device: Device,
    peer: SocketAddr,
    unsettled_logged_us: u64,
    control: Arc<NodeControl>,
    /// The front end finished or a [`Command::Finish`] came: wind down with a last CP.
    finishing: bool,
    /// The clock of the latest poll or command, and of the latest publication.
    now_us: u64,
    published_us: u64,
    /// The last CP was asked for.
    final_cp_requested: bool,
}

impl<F: FrontEnd> SourceNode<F> {
    /// A source whose link runs over `transport` ([`TcpTransport`], or the SPDK runtime's
    /// sock layer).
    pub fn new(
        transport: Arc<dyn Transport>,
        source: SourceEngine,
        primaries: Vec<Device>,
        metadata_device: Device,
        peer: SocketAddr,
        make_front_end: MakeFrontEnd<F>,
        control: Arc<NodeControl>,
    ) -> Self {
        let link = Link::dial(transport, peer, wire::MESSAGE_BYTES_MAX);
        SourceNode {
            volume: Volume::new(source, primaries),
            link,
            front_end: None,
            make_front_end: Some(make_front_end),
            metadata_device,
            peer,
            unsettled_logged_us: 0,
            control,
            finishing: false,
            final_cp_requested: false,
            now_us: 0,
            published_us: 0,
        }
    }

    pub fn publish_counters(&mut self) {
        let source = &self.volume.source;
        *self.control.peer.lock().unwrap() = Some(PeerStatus {
            state: source.peer_state(),
            policy: source.peer_loss_policy(),
            degraded: source.is_degraded(),
            resync: source.resync_status(),
            now_us: self.now_us,
        });
        self.control.publish(
            *source.counters(),
            *source.metadata().generations(),
            &self.link,
        );
        self.published_us = self.now_us;
    }
}

impl<F: FrontEnd> SourceNode<F> {
    /// The first half of a pass, what a host write waits for: acknowledgements in (`read_link`),
    /// completions to the front end, new host I/O in, transfers closed and sent. A pass that
    /// calls [`SourceNode::poll_acknowledgements`] after its destinations reads the link there
    /// instead, once per pass: a read here as well found nothing nearly every time (a
    /// destination on this thread sends only when it runs) and stood in front of every host
    /// write, about 0.6 µs of a QD1 pass.
    pub fn poll_intake(&mut self, now_us: u64, read_link: bool) -> usize {
        self.now_us = now_us;
        let mut work = if read_link {
            self.link.poll(now_us, &mut self.volume.source)
        } else {
            self.link.poll_connect(now_us, &mut self.volume.source)
        };
        work += self.drain_events();
        work += self.front_end.poll(now_us, &mut self.volume);
        self.volume.source.handle_tick(now_us);
        work += self
            .link
            .close_if_requested(now_us, &mut self.volume.source);
        work + self.link.send(now_us, &mut self.volume.source)
    }

    /// Between the halves when the destination just ran on this thread: its TransferAcks are on
    /// the loopback socket already, so the writes they complete are answered in this pass. Reads
    /// the link whatever the source awaits: a pass that takes its intake unread
    /// ([`SourceNode::poll_intake`]) reads it only here.
    pub fn poll_acknowledgements(&mut self, now_us: u64) -> usize {
        let mut work = self.link.poll(now_us, &mut self.volume.source);
        work += self.drain_events();
        work + self.front_end.poll_completions(now_us, &mut self.volume)
    }

    /// The second half, what no acknowledgement waits for: metadata and primary device ops
    /// (a write completes once it is in both logs, not on the primary), counters, and what
    /// device completions queued for the destination.
    pub fn poll_devices(&mut self, now_us: u64) -> usize {
        self.now_us = now_us;
        let mut work = self.pump_metadata();
        if self.front_end.is_some() {
            work += self.volume.pump_devices(now_us);
        } else {
            self.log_unsettled(now_us);
        }
        work += self.drain_events();
        self.poll_control(now_us);
        work + self.link.send(now_us, &mut self.volume.source)
    }
}

impl<F: FrontEnd> Poller for SourceNode<F> {
    /// One reactor pass, ordered so a write needs as few passes as possible: the transfers of
    /// new writes are on the socket before the primary writes start.
    fn poll(&mut self, now_us: u64) -> usize {
        self.poll_intake(now_us, true) + self.poll_devices(now_us)
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.link.wait_fds(out);
        self.front_end.wait_fds(out);
    }

    fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        self.front_end.doorbells(out);
        device_doorbells(self.volume.primaries(), out);
        device_doorbells(std::slice::from_ref(&self.metadata_device), out);
    }

    fn next_deadline_us(&self) -> Option<u64> {
        // Unsent bytes (a full socket), ops of devices that complete on the next poll and the CP
        // timer need polls that no readable fd announces.
        if self.volume.source.tx_pending_bytes() > 0
            || self.volume.needs_poll()
            || devices_need_poll(std::slice::from_ref(&self.metadata_device))
        {
            return Some(0);
        }
        [
            self.front_end.next_deadline_us(),
            self.volume.source.next_deadline_us(),
            self.volume.devices_deadline_us(),
            self.link.next_deadline_us(),
            Some(self.published_us + PUBLISH_INTERVAL_US),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

impl<F: FrontEnd> Node for SourceNode<F> {
    fn handle_command(&mut self, now_us: u64, command: Command) {
        self.now_us = self.now_us.max(now_us);
        match command {
            Command::RequestCp => {
                let source = &mut self.volume.source;
                source.request_cp(now_us);
                self.control
                    .cp_requested_number
                    .store(source.cp_for_completed_writes(), Ordering::Release);
                self.control
                    .cp_durable_number
                    .fetch_max(source.cp_completed(), Ordering::AcqRel);
                self.control.cp_requests_seen.fetch_add(1, Ordering::AcqRel);
            }
            Command::PublishCounters => self.publish_counters(),
            Command::Finish => self.finishing = true,
            Command::SetPeerLossPolicy(policy) => {
                self.volume.source.set_peer_loss_policy(policy);
                self.publish_counters();
            }
            Command::Settle => {
                log::warn!("source: serving hosts without a handshake (operator)");
                self.settle();
            }
            Command::Attach(peer) => {
                log::warn!("source: replicating to {peer} from now on (operator)");
                self.link.set_peer(now_us, &mut self.volume.source, peer);
            }
        }
    }

    fn device_ops_in_flight(&self) -> usize {
        devices_in_flight(self.volume.primaries()) + self.metadata_device.inflight_count()
    }

    fn reap_device_completions(&mut self) -> usize {
        reap_devices(self.volume.primaries_mut())
            + reap_devices(std::slice::from_mut(&mut self.metadata_device))
    }
}

impl<F: FrontEnd> SourceNode<F> {
    /// Submits the engine's metadata ops and hands back their completions.
    fn pump_metadata(&mut self) -> usize {
        let mut work = 0;
        while let Some(op) = self.volume.source.poll_metadata_op() {
            self.metadata_device.submit(op);
            work += 1;
        }
        let source = &mut self.volume.source;
        work += self
            .metadata_device
            .poll_completions(&mut |completion| source.handle_metadata_completion(completion));
        work
    }

    fn log_unsettled(&mut self, now_us: u64) {
        if self.unsettled_logged_us == 0 {
            self.unsettled_logged_us = now_us.max(1);
        } else if now_us - self.unsettled_logged_us >= UNSETTLED_LOG_INTERVAL_US {
            self.unsettled_logged_us = now_us;
            log::warn!(
                "source: waiting for the destination at {} to compare generations; hosts are not served until it does",
                self.peer
            );
        }
    }

    /// The handshake settled our role: the front end (and its listener) starts now.
    fn settle(&mut self) {
        let Some(make) = self.make_front_end.take() else {
            return;
        };
        match make(&self.volume.source) {
            Ok(front_end) => {
                self.front_end = Some(front_end);
                log::info!(
                    "source: generation {} settled with the destination: serving hosts",
                    nvmirror_engine::generation::Hex(
                        self.volume.source.metadata().generations().current
                    )
                );
                self.control.settled.store(true, Ordering::Release);
            }
            Err(reason) => {
                log::error!("source: cannot start the front end: {reason}");
                *self.control.rejected.lock().unwrap() = Some(reason);
            }
        }
    }

    fn drain_events(&mut self) -> usize {
        let mut events = 0;
        while let Some(event) = self.volume.source.poll_event() {
            self.handle_event(event);
            events += 1;
        }
        events
    }

    fn handle_event(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::WriteCompleted(id) => self.volume.push_completed(id),
            SourceEvent::WriteFailed(id) => self.volume.push_failed(id),
            // Logged with its reason and counted by the engine; the counters show the state.
            SourceEvent::PeerLost(_) => self.publish_counters(),
            SourceEvent::CpCompleted { cp_number, .. } => {
                log::debug!("source: CP {cp_number} durable on both sides");
                self.control
                    .cp_durable_number
                    .fetch_max(cp_number, Ordering::AcqRel);
                self.control.cp_completed.fetch_add(1, Ordering::Release);
            }
            SourceEvent::LinkReady => {
                log::info!("source: replication link ready");
                self.settle();
            }
            // Logged (once per failing streak) and counted by the engine, which retries.
            SourceEvent::DeviceFault(fault) => log::debug!("source: {fault}"),
            // Logged with its figures by the engine.
            SourceEvent::ResyncDone { .. } => self.publish_counters(),
            SourceEvent::MirrorFailed { cp_number } => {
                log::debug!("source: the mirror failed cp {cp_number}; it is sent again")
            }
            SourceEvent::LinkRejected(reason) => {
                log::error!("source: the destination refused the link: {reason}");
                *self.control.rejected.lock().unwrap() = Some(reason);
            }
        }
    }

    fn poll_control(&mut self, now_us: u64) {
        if now_us.saturating_sub(self.published_us) >= PUBLISH_INTERVAL_US {
            self.publish_counters();
        }
        if (self.finishing || self.front_end.is_finished())
            && !self.control.synced.load(Ordering::Acquire)
        {
            if self.final_cp_requested && self.volume.source.is_idle() {
                self.publish_counters();
                self.control.synced.store(true, Ordering::Release);
            } else {
                // Asked again on every poll until idle: writes that hosts sent after the first
                // request (a front end still open while the node winds down) get a CP of their
                // own instead of leaving the last CP waiting for ever.
                self.volume.source.request_cp(now_us);
                self.final_cp_requested = true;
            }
        }
    }
}

/// The destination side: transfers into its local log, CPs into the mirror namespaces.
pub struct DestinationNode {
    pub destination: DestinationEngine,
    pub mirrors: Vec<Device>,
    /// The node's metadata file (generations, bitmap) as a device.
    pub metadata_device: Device,
    pub link: Link,
    control: Arc<NodeControl>,
    published_us: u64,
}

impl DestinationNode {
    /// A destination whose link runs over `transport` ([`TcpTransport`], or the SPDK runtime's
    /// sock layer).
    pub fn new(
        transport: Arc<dyn Transport>,
        destination: DestinationEngine,
        mirrors: Vec<Device>,
        metadata_device: Device,
        listen: SocketAddr,
        control: Arc<NodeControl>,
    ) -> std::io::Result<Self> {
        let link = Link::accept(transport, listen, wire::MESSAGE_BYTES_MAX)?;
        Ok(DestinationNode {
            destination,
            mirrors,
            metadata_device,
            link,
            control,
            published_us: 0,
        })
    }

    /// Submits the mirror ops the destination emits and hands back every completion.
    fn pump_devices(&mut self, now_us: u64) -> usize {
        let mut work = 0;
        while let Some(op) = self.destination.poll_device_op(now_us) {
            self.mirrors[op.nsid as usize - 1].submit(op);
            work += 1;
        }
        let destination = &mut self.destination;
        for mirror in &mut self.mirrors {
            work += mirror.poll_completions(&mut |completion| {
                destination.handle_device_completion(now_us, completion)
            });
        }
        while let Some(op) = self.destination.poll_device_op(now_us) {
            self.mirrors[op.nsid as usize - 1].submit(op);
            work += 1;
        }
        while let Some(op) = self.destination.poll_metadata_op() {
            self.metadata_device.submit(op);
            work += 1;
        }
        let destination = &mut self.destination;
        work += self
            .metadata_device
            .poll_completions(&mut |completion| destination.handle_metadata_completion(completion));
        work
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.link.local_addr()
    }

    pub fn publish_counters(&self) {
        self.control.publish(
            *self.destination.counters(),
            *self.destination.metadata().generations(),
            &self.link,
        );
    }
}

impl Node for DestinationNode {
    fn handle_command(&mut self, _now_us: u64, command: Command) {
        match command {
            Command::PublishCounters => self.publish_counters(),
            // A destination takes CPs when its source sends them, and has nothing to finish.
            Command::RequestCp
            | Command::Finish
            | Command::SetPeerLossPolicy(_)
            | Command::Settle
            | Command::Attach(_) => {}
        }
    }

    fn device_ops_in_flight(&self) -> usize {
        devices_in_flight(&self.mirrors) + self.metadata_device.inflight_count()
    }

    fn reap_device_completions(&mut self) -> usize {
        reap_devices(&mut self.mirrors)
            + reap_devices(std::slice::from_mut(&mut self.metadata_device))
    }
}

impl Poller for DestinationNode {
    fn poll(&mut self, now_us: u64) -> usize {
        let mut work = self.link.poll(now_us, &mut self.destination);
        self.destination.handle_tick(now_us);
        work += self.link.close_if_requested(now_us, &mut self.destination);
        work += self.pump_devices(now_us);
        if self.destination.tx_pending_bytes() > 0 {
            // Acknowledgements queued by device completions (TableAck, CpAck, CpFailed).
            work += self.link.send(now_us, &mut self.destination);
        }
        while let Some(event) = self.destination.poll_event() {
            work += 1;
            match event {
                DestinationEvent::CpApplied { cp_number, .. } => {
                    log::debug!("destination: CP {cp_number} applied to the mirror");
                    self.control.cp_completed.fetch_add(1, Ordering::Release);
                }
                DestinationEvent::PeerRejected(reason) => {
                    log::error!("destination: refused the source: {reason}");
                    *self.control.rejected.lock().unwrap() = Some(reason);
                }
                // Logged once per failing streak and counted by the engine.
                DestinationEvent::DeviceFault(fault) => log::debug!("destination: {fault}"),
                // Logged with its reason and counted by the engine; the source reconnects.
                DestinationEvent::PeerLost(_) => self.publish_counters(),
            }
        }
        if now_us.saturating_sub(self.published_us) >= PUBLISH_INTERVAL_US {
            self.published_us = now_us;
            self.publish_counters();
        }
        // Acknowledgements were flushed by the poll that received their transfers; events queue
        // nothing to send, so one receive and one send per loop suffice.
        work
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.link.wait_fds(out);
    }

    fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        device_doorbells(&self.mirrors, out);
        device_doorbells(std::slice::from_ref(&self.metadata_device), out);
    }

    fn next_deadline_us(&self) -> Option<u64> {
        if self.destination.tx_pending_bytes() > 0
            || devices_need_poll(&self.mirrors)
            || devices_need_poll(std::slice::from_ref(&self.metadata_device))
        {
            return Some(0);
        }
        [
            self.link.next_deadline_us(),
            devices_deadline_us(&self.mirrors),
            self.destination.next_deadline_us(),
            Some(self.published_us + PUBLISH_INTERVAL_US),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// A source and its destination polled by one reactor (the embedded pair on few cores).
pub struct PairNode<F: FrontEnd> {
    pub source: SourceNode<F>,
    pub destination: DestinationNode,
}

impl<F: FrontEnd> Poller for PairNode<F> {
    /// The destination takes the source's transfers (on the loopback socket the moment they
    /// were sent) and the source its acknowledgements, and the writes they complete are
    /// answered, before the source writes its primaries: a host write is acknowledged in the
    /// pass that received it.
    fn poll(&mut self, now_us: u64) -> usize {
        let mut work = self.source.poll_intake(now_us, false);
        work += self.destination.poll(now_us);
        work += self.source.poll_acknowledgements(now_us);
        work + self.source.poll_devices(now_us)
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.source.wait_fds(out);
        self.destination.wait_fds(out);
    }

    fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        self.source.doorbells(out);
        self.destination.doorbells(out);
    }

    fn next_deadline_us(&self) -> Option<u64> {
        match (
            self.source.next_deadline_us(),
            self.destination.next_deadline_us(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl<F: FrontEnd> Node for PairNode<F> {
    fn handle_command(&mut self, now_us: u64, command: Command) {
        self.source.handle_command(now_us, command);
        self.destination.handle_command(now_us, command);
    }

    fn device_ops_in_flight(&self) -> usize {
        self.source.device_ops_in_flight() + self.destination.device_ops_in_flight()
    }

    fn reap_device_completions(&mut self) -> usize {
        self.source.reap_device_completions() + self.destination.reap_device_completions()
    }
}

/// A queue-pair reactor of its own: no node, only a share of the target's queue pairs.
impl Node for QueuePairHost {
    fn handle_command(&mut self, _now_us: u64, command: Command) {
        log::debug!("queue-pair reactor: {command:?} ignored");
    }

    fn device_ops_in_flight(&self) -> usize {
        0
    }

    fn reap_device_completions(&mut self) -> usize {
        0
    }
}

/// A node and a share of a target's queue pairs on one reactor (one reactor per core).
pub struct Hosted<N> {
    pub node: N,
    pub queue_pairs: QueuePairHost,
}

impl<N: Poller> Poller for Hosted<N> {
    fn poll(&mut self, now_us: u64) -> usize {
        self.node.poll(now_us) + self.queue_pairs.poll(now_us)
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.node.wait_fds(out);
        self.queue_pairs.wait_fds(out);
    }

    fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        self.node.doorbells(out);
        self.queue_pairs.doorbells(out);
    }

    fn next_deadline_us(&self) -> Option<u64> {
        let queue_pairs = self.queue_pairs.next_deadline_us();
        match (self.node.next_deadline_us(), queue_pairs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl<N: Node> Node for Hosted<N> {
    fn handle_command(&mut self, now_us: u64, command: Command) {
        self.node.handle_command(now_us, command);
    }

    fn device_ops_in_flight(&self) -> usize {
        self.node.device_ops_in_flight()
    }

    fn reap_device_completions(&mut self) -> usize {
        self.node.reap_device_completions()
    }
}
