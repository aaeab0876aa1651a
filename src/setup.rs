//! Turns a checked [`Config`] into running nodes: ring memory, namespace devices, engine state
//! machines, and the reactor threads that poll them.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use nvmirror_engine::destination::{Destination, DestinationConfig};
use nvmirror_engine::device::BlockDevice;
use nvmirror_engine::source::{CpMode, Source, SourceConfig};
use nvmirror_nvmf::Target;
use nvmirror_runtime::bdev::{open_file_namespace, FaultyDevice, Immediate, MallocDevice};
use nvmirror_runtime::link::TcpTransport;
use nvmirror_runtime::metadata_file::{open_metadata_file, MetadataFile};
use nvmirror_runtime::node::{
    Command, DestinationNode, Device, FrontEnd, Hosted, Node, NodeControl, PairNode, SourceEngine,
    SourceNode,
};
use nvmirror_runtime::reactor::{self, IdlePolicy, Poller, Reactor, ReactorConfig};
use nvmirror_runtime::remote::{QueuePairHost, QueuePairHosts};
use nvmirror_runtime::ring_memory::{RingMedium, RingMemory};
use nvmirror_runtime::target::{build_target_front_end, PlainTarget, TargetFrontEnd};

use crate::config::{Config, CpModeConfig, IdleConfig, NamespaceConfig};

const MIB: u64 = 1 << 20;

/// Opens (creating where asked) the namespace devices of a config.
pub fn open_namespaces(config: &Config) -> Result<Vec<Device>, String> {
    let mut devices: Vec<Device> = Vec::with_capacity(config.namespaces.len());
    for (index, namespace) in config.namespaces.iter().enumerate() {
        let device = open_namespace(namespace, config.device_queue_depth)
            .map_err(|e| format!("namespace[{index}]: {e}"))?;
        devices.push(device);
    }
    Ok(devices)
}

fn open_namespace(namespace: &NamespaceConfig, queue_depth: u32) -> Result<Device, String> {
    Ok(match namespace {
        NamespaceConfig::Malloc { size_mib } => Box::new(Immediate::new(
            MallocDevice::new(size_mib * MIB)
                .map_err(|e| format!("cannot allocate {size_mib} MiB: {e}"))?,
        )),
        // io_uring with O_DIRECT; an I/O thread where io_uring is not available.
        NamespaceConfig::File { path, size_mib } => open_file_namespace(
            path,
            size_mib.map(|mib| mib * MIB),
            size_mib.is_some(),
            queue_depth,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?,
        NamespaceConfig::Bdev { bdev } => open_bdev(bdev)?,
        NamespaceConfig::Faulty { base, faults } => {
            let rules = faults
                .iter()
                .map(|fault| fault.rule().expect("checked at start"))
                .collect();
            log::warn!("a faulty namespace: {faults:?} applied to {base:?}");
            Box::new(FaultyDevice::new(open_namespace(base, queue_depth)?, rules))
        }
    })
}

/// An SPDK bdev as a namespace, on the SPDK runtime's thread.
#[cfg(feature = "spdk")]
fn open_bdev(name: &str) -> Result<Device, String> {
    Ok(Box::new(nvmirror_spdk::bdev::BdevDevice::open(name)?))
}

#[cfg(not(feature = "spdk"))]
fn open_bdev(name: &str) -> Result<Device, String> {
    Err(format!(
        "kind = \"bdev\" ({name}) is an SPDK bdev: only the SPDK runtime serves it (build with \
         --features spdk and run `nvmirror spdk -c CONFIG.json` with bdev_nvmirror_create)"
    ))
}

/// Maps the node's NVRAM ring on its configured medium, or by default on hugepages (a regular
/// file with a warning when none are free).
pub fn open_ring(config: &Config) -> Result<RingMemory, String> {
    let size_bytes = config.ring_size_mib * MIB;
    let memory = match config.ring_placement() {
        None => {
            std::fs::create_dir_all(&config.fallback_dir)
                .map_err(|e| format!("fallback_dir {}: {e}", config.fallback_dir.display()))?;
            RingMemory::open(
                &config.hugepage_dir,
                &config.fallback_dir,
                &config.ring_file_name(),
                size_bytes,
            )
            .map(|(memory, _)| memory)
            .map_err(|e| format!("NVRAM ring: {e}"))?
        }
        Some((medium, dir)) => {
            if medium == RingMedium::File {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("ring directory {}: {e}", dir.display()))?;
            }
            RingMemory::open_on(medium, dir, &config.ring_file_name(), size_bytes).map_err(|e| {
                format!("config key 'ring_medium': cannot place the NVRAM ring on {medium}: {e}")
            })?
        }
    };
    let medium = memory.medium();
    log::info!(
        "{:?} ring: {} MiB on {medium} at {}: an entry survives a process crash{}",
        config.role,
        config.ring_size_mib,
        memory
            .path()
            .map_or("(memory)".into(), |p| p.display().to_string()),
        if medium.survives_power_loss() {
            ", and a power loss once persisted (a Flush)"
        } else {
            ", not a power loss (only a CP makes it durable)"
        }
    );
    Ok(memory)
}

pub fn reactor_config(config: &Config, name: &str) -> ReactorConfig {
    let idle = match config.idle {
        IdleConfig::Busy => IdlePolicy::BusyPoll,
        IdleConfig::Adaptive => IdlePolicy::Adaptive {
            spin_us: 200,
            max_sleep_us: 10_000,
        },
    };
    ReactorConfig {
        name: name.into(),
        core: config.cores.first().copied(),
        idle,
    }
}

/// The namespace sizes of opened devices (what the engine is opened with).
pub fn sizes(devices: &[Device]) -> Vec<u64> {
    devices.iter().map(|device| device.size_bytes()).collect()
}

/// Opens (formatting the first time) the node's metadata file for its opened namespaces.
pub fn open_metadata(config: &Config, devices: &[Device]) -> Result<MetadataFile, String> {
    open_metadata_file(
        &config.metadata_file(),
        config.volume_id(),
        &config.volume,
        &sizes(devices),
        config.bitmap_extent_bytes,
    )
}

/// What a node opens at start: its engine, namespace devices and metadata device.
pub type Opened<E> = (E, Vec<Device>, Device);

pub fn open_source(config: &Config) -> Result<Opened<SourceEngine>, String> {
    open_source_on(config, open_ring(config)?)
}

/// A source on a ring the caller mapped (the SPDK runtime registers it for DMA first).
pub fn open_source_on(config: &Config, ring: RingMemory) -> Result<Opened<SourceEngine>, String> {
    let source_config = SourceConfig {
        volume_id: config.volume_id(),
        cp_interval_us: config.cp_interval_ms * 1000,
        mode: match config.cp_mode {
            CpModeConfig::References => CpMode::References,
            CpModeConfig::Naive => CpMode::Naive,
        },
        device_queue_depth: config.device_queue_depth,
        peer_timeout_us: config.peer_timeout_ms * 1000,
        peer_loss_policy: config.peer_loss_policy(),
        generation_seed: nvmirror_runtime::metadata_file::random_nonzero_u64()
            .map_err(|e| format!("/dev/urandom: {e}"))?,
        resync_rate_bytes_per_s: config.resync_rate_mib_s * (1 << 20),
        assume_identical: config.assume_identical,
    };
    let primaries = open_namespaces(config)?;
    let mut metadata = open_metadata(config, &primaries)?;
    crate::attach::note_running_as_source(&mut metadata.metadata, &mut *metadata.device)?;
    let (source, recovery) = Source::open(
        source_config,
        ring,
        &sizes(&primaries),
        metadata.metadata,
        reactor::monotonic_us(),
    )
    .map_err(|e| format!("source: {e}"))?;
    log::info!(
        "source: the destination is lost after {} ms without a word from it \
         (peer_timeout_ms); then peer_loss_policy = \"{}\" applies",
        config.peer_timeout_ms,
        config.peer_loss_policy().name()
    );
    if recovery.formatted {
        log::info!(
            "source: new NVRAM ring formatted (epoch {})",
            recovery.epoch
        );
    } else {
        log::info!(
            "source: ring replay: {} entries ({} bytes) newer than CP {} go onto the primary once the destination settled the generations (epoch {})",
            recovery.entries_replayed,
            recovery.bytes_replayed,
            recovery.cp_completed,
            recovery.epoch
        );
    }
    Ok((source, primaries, metadata.device))
}

pub fn open_destination(
    config: &Config,
) -> Result<Opened<nvmirror_runtime::node::DestinationEngine>, String> {
    open_destination_on(config, open_ring(config)?)
}

/// A destination on a ring the caller mapped (the SPDK runtime registers it for DMA first).
pub fn open_destination_on(
    config: &Config,
    ring: RingMemory,
) -> Result<Opened<nvmirror_runtime::node::DestinationEngine>, String> {
    let mirrors = open_namespaces(config)?;
    let mut metadata = open_metadata(config, &mirrors)?;
    crate::attach::attach_former_source(config, &mut metadata.metadata, &mut *metadata.device)?;
    let destination = Destination::open(
        DestinationConfig {
            volume_id: config.volume_id(),
            device_queue_depth: config.device_queue_depth,
            peer_timeout_us: config.peer_timeout_ms * 1000,
            assume_identical: config.assume_identical,
        },
        ring,
        &sizes(&mirrors),
        metadata.metadata,
    )
    .map_err(|e| format!("destination: {e}"))?;
    Ok((destination, mirrors, metadata.device))
}

/// The front end of a configured source: the NVMe/TCP target when `[target]` is set, else none.
/// Its queue pairs go round robin to the source's reactor and the queue-pair reactors in
/// `hosts` (registered before the source starts).
pub fn target_front_end(
    config: &Config,
    hosts: QueuePairHosts,
) -> impl FnOnce(&SourceEngine) -> Result<Option<TargetFrontEnd>, String> + Send + 'static {
    let target = config.target.clone();
    let namespace_count = config.namespaces.len();
    let volatile_write_cache = config.volatile_write_cache();
    move |source: &SourceEngine| {
        let Some(section) = target else {
            return Ok(None);
        };
        let mut target_config = section
            .to_target_config(namespace_count)
            .map_err(|e| e.to_string())?;
        target_config.volatile_write_cache = volatile_write_cache;
        let target = Target::new(target_config).map_err(|e| format!("NVMe/TCP target: {e}"))?;
        let front_end = build_target_front_end(target, source, &hosts)
            .map_err(|e| format!("NVMe/TCP target: {e}"))?;
        log::info!(
            "NVMe/TCP target listening on {:?}; queue pairs round robin over {} reactor(s)",
            front_end.local_addrs(),
            hosts.inboxes().len() + 1
        );
        Ok(Some(front_end))
    }
}

/// A node running on its reactor thread; joining it gives the node back (for checks and counters).
pub struct Running<N> {
    pub control: Arc<NodeControl>,
    pub thread: JoinHandle<Result<N, String>>,
}

impl<N> Running<N> {
    pub fn stop(self) -> Result<N, String> {
        self.control.request_stop();
        self.thread
            .join()
            .map_err(|_| "reactor thread panicked".to_string())?
    }
}

/// Asks a source to finish with a last CP and waits for it, at most `timeout`. Without a
/// destination that CP cannot complete: the writes stay in the ring and are replayed and resent
/// at the next start, so nothing acknowledged is lost; the caller is told.
pub fn finish(source: &NodeControl, timeout: std::time::Duration) -> Result<(), String> {
    source.send(Command::Finish)?;
    let started = std::time::Instant::now();
    while !source.synced.load(Ordering::Acquire) {
        if started.elapsed() > timeout {
            return Err(format!(
                "no final CP within {} s (destination unreachable?): unsynced writes stay in the NVRAM ring and are resent at the next start",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

/// Starts a reactor thread for the node `build` makes on that thread (rings, devices and sockets
/// are opened where they are used); returns once it is built, with what `build` reports.
fn spawn_node<N, R, B>(
    name: &str,
    reactor: ReactorConfig,
    build: B,
) -> Result<(Running<N>, R), String>
where
    N: Node + 'static,
    R: Send + 'static,
    B: FnOnce(&Arc<NodeControl>) -> Result<(N, R), String> + Send + 'static,
    N: Send,
{
    let control = NodeControl::new().map_err(|e| format!("node mailbox: {e}"))?;
    let node_control = control.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let node = match build(&node_control) {
                Ok((node, report)) => {
                    let _ = ready_tx.send(Ok(report));
                    node
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            let mut node = run_node(reactor, &node_control, node)?;
            node.handle_command(reactor::monotonic_us(), Command::PublishCounters);
            Ok(node)
        })
        .map_err(|e| format!("cannot start the {name} reactor: {e}"))?;
    let report = ready_rx
        .recv()
        .map_err(|_| format!("{name} reactor died at start"))??;
    Ok((Running { control, thread }, report))
}

/// A source node; its front end is made once the handshake settled its role (a stale or split
/// source never opens its listener).
fn build_source<F: FrontEnd>(
    config: &Config,
    peer: SocketAddr,
    make_front_end: impl FnOnce(&SourceEngine) -> Result<F, String> + Send + 'static,
    control: &Arc<NodeControl>,
) -> Result<SourceNode<F>, String> {
    let (source, primaries, metadata_device) = open_source(config)?;
    Ok(SourceNode::new(
        TcpTransport::shared(),
        source,
        primaries,
        metadata_device,
        peer,
        Box::new(make_front_end),
        control.clone(),
    ))
}

fn build_destination(
    config: &Config,
    control: &Arc<NodeControl>,
) -> Result<(DestinationNode, SocketAddr), String> {
    let listen = config.listen.expect("validated: a destination listens");
    let (destination, mirrors, metadata_device) = open_destination(config)?;
    let node = DestinationNode::new(
        TcpTransport::shared(),
        destination,
        mirrors,
        metadata_device,
        listen,
        control.clone(),
    )
    .map_err(|e| e.to_string())?;
    let address = node.local_addr().expect("a destination listens");
    Ok((node, address))
}

/// Starts a source node on its own reactor thread. `make_front_end` runs on that thread.
pub fn spawn_source<F, M>(
    config: Config,
    make_front_end: M,
) -> Result<Running<SourceNode<F>>, String>
where
    F: FrontEnd + Send + 'static,
    M: FnOnce(&SourceEngine) -> Result<F, String> + Send + 'static,
{
    let reactor = reactor_config(&config, "source");
    let peer = config.peer.expect("validated: a source has a peer");
    let (running, ()) = spawn_node("source", reactor, move |control| {
        Ok((build_source(&config, peer, make_front_end, control)?, ()))
    })?;
    Ok(running)
}

/// Starts a destination node on its own reactor thread; returns once it listens.
pub fn spawn_destination(config: Config) -> Result<(Running<DestinationNode>, SocketAddr), String> {
    let reactor = reactor_config(&config, "destination");
    spawn_node("destination", reactor, move |control| {
        build_destination(&config, control)
    })
}

/// A destination whose reactor also takes a share of a source's queue pairs (registered in
/// `hosts`): the embedded pair on two cores, one reactor per core.
pub fn spawn_destination_hosting(
    config: Config,
    hosts: &QueuePairHosts,
) -> Result<(Running<Hosted<DestinationNode>>, SocketAddr), String> {
    let reactor = reactor_config(&config, "destination");
    let (running, (address, inbox)) = spawn_node("destination", reactor, move |control| {
        let (node, address) = build_destination(&config, control)?;
        let queue_pairs = QueuePairHost::new().map_err(|e| format!("queue-pair mailbox: {e}"))?;
        let inbox = queue_pairs.inbox();
        Ok((Hosted { node, queue_pairs }, (address, inbox)))
    })?;
    hosts.add(inbox);
    Ok((running, address))
}

/// Starts a reactor on `core` that only polls queue pairs of a source's target (registered in
/// `hosts`; it serves once the source's front end exists).
pub fn spawn_queue_pair_reactor(
    config: &Config,
    core: usize,
    hosts: &QueuePairHosts,
) -> Result<Running<QueuePairHost>, String> {
    let mut reactor = reactor_config(config, "queue-pairs");
    reactor.core = Some(core);
    let (running, inbox) = spawn_node("queue-pairs", reactor, move |_control| {
        let host = QueuePairHost::new().map_err(|e| format!("queue-pair mailbox: {e}"))?;
        let inbox = host.inbox();
        Ok((host, inbox))
    })?;
    hosts.add(inbox);
    Ok(running)
}

/// A source and its destination running on one reactor.
pub struct RunningPair<F: FrontEnd> {
    pub pair: Running<PairNode<F>>,
    pub destination_control: Arc<NodeControl>,
    pub replication_address: SocketAddr,
}

/// Starts a source and its destination on ONE reactor (the source's core): on a machine with
/// few cores this leaves the others to hosts. Returns the pair's control (the source's), the
/// destination's, and the replication address.
pub fn spawn_pair_on_one_reactor<F, M>(
    source: Config,
    destination: Config,
    make_front_end: M,
) -> Result<RunningPair<F>, String>
where
    F: FrontEnd + Send + 'static,
    M: FnOnce(&SourceEngine) -> Result<F, String> + Send + 'static,
{
    let destination_control = NodeControl::new().map_err(|e| format!("node mailbox: {e}"))?;
    let node_destination_control = destination_control.clone();
    let reactor = reactor_config(&source, "pair");
    let (running, address) = spawn_node("pair", reactor, move |control| {
        let (destination, address) = build_destination(&destination, &node_destination_control)?;
        let source = build_source(&source, address, make_front_end, control)?;
        Ok((
            PairNode {
                source,
                destination,
            },
            address,
        ))
    })?;
    Ok(RunningPair {
        pair: running,
        destination_control,
        replication_address: address,
    })
}

/// Starts the NVMe/TCP target without replication over malloc namespaces: the baseline the
/// benchmarks compare the replicated volume with.
pub fn spawn_plain_target(
    config: Config,
    hosts: QueuePairHosts,
) -> Result<Running<PlainTarget<Device>>, String> {
    let reactor = reactor_config(&config, "target");
    let (running, ()) = spawn_node("target", reactor, move |_control| {
        let section = config.target.clone().ok_or("no [target] section")?;
        let target_config = section
            .to_target_config(config.namespaces.len())
            .map_err(|e| e.to_string())?;
        let target = Target::new(target_config).map_err(|e| format!("NVMe/TCP target: {e}"))?;
        let node = PlainTarget::new(target, open_namespaces(&config)?, &hosts)
            .map_err(|e| format!("NVMe/TCP target: {e}"))?;
        Ok((node, ()))
    })?;
    Ok(running)
}

/// Polls `node` on a reactor on this thread until `stop`; gives the node back afterwards.
fn run_node<N: Node + 'static>(
    config: ReactorConfig,
    control: &NodeControl,
    node: N,
) -> Result<N, String> {
    /// The reactor owns its pollers; sharing the node lets this thread take it back when it returns.
    struct Shared<N>(Rc<RefCell<N>>);
    impl<N: Poller> Poller for Shared<N> {
        fn poll(&mut self, now_us: u64) -> usize {
            self.0.borrow_mut().poll(now_us)
        }
        fn wait_fds(&self, out: &mut Vec<std::os::fd::RawFd>) {
            self.0.borrow().wait_fds(out)
        }
        fn next_deadline_us(&self) -> Option<u64> {
            self.0.borrow().next_deadline_us()
        }
        fn doorbells(&self, out: &mut Vec<Arc<dyn reactor::Doorbell>>) {
            self.0.borrow().doorbells(out)
        }
    }
    let node = Rc::new(RefCell::new(node));
    let name = config.name.clone();
    let mut reactor = Reactor::with_mailbox(config, control.mailbox());
    reactor.add_poller(Box::new(Shared(node.clone())));
    let commanded = node.clone();
    let stats = reactor.run(&control.stop, |command, now_us, _| {
        commanded.borrow_mut().handle_command(now_us, command)
    });
    drop(commanded);
    log::debug!("{name} reactor: {stats:?}");
    Ok(Rc::try_unwrap(node)
        .ok()
        .expect("the reactor dropped its pollers")
        .into_inner())
}

/// Waits until the source's role is settled (its front end serves), the peer refused the link,
/// or a stop is requested; `Ok(false)` for a stop.
pub fn wait_settled(control: &NodeControl, stop: &AtomicBool) -> Result<bool, String> {
    loop {
        if control.settled.load(Ordering::Acquire) {
            return Ok(true);
        }
        if let Some(reason) = control.rejected.lock().unwrap().clone() {
            return Err(format!("replication stopped: {reason}"));
        }
        if stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits until `done` holds, a stop is requested (signal), or the peer refused the link.
pub fn wait_until(
    control: &NodeControl,
    stop: &AtomicBool,
    done: impl Fn() -> bool,
) -> Result<(), String> {
    loop {
        if done() {
            return Ok(());
        }
        if let Some(reason) = control.rejected.lock().unwrap().clone() {
            return Err(format!("replication link refused: {reason}"));
        }
        if stop.load(Ordering::Acquire) {
            return Err("interrupted".into());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
