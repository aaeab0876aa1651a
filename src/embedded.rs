//! The embedded pair: a source and a destination in one process, linked over TCP on loopback with
//! malloc namespaces, on one reactor or one each. `nvmirror` with no arguments runs it behind the
//! NVMe/TCP target (or, with `--no-replication`, the target alone); `demo` drives a workload through it.

use std::net::SocketAddr;
use std::sync::Arc;

use nvmirror_runtime::node::{
    DestinationNode, FrontEnd, Hosted, NodeControl, PairNode, SourceEngine, SourceNode,
};
use nvmirror_runtime::remote::QueuePairHosts;

use crate::config::{Config, CpModeConfig, Role};
use crate::serve;
use crate::setup::{self, Running};

/// Namespace size of the embedded pair.
pub const EMBEDDED_NAMESPACE_MIB: u64 = 256;

/// The source and destination configs of the embedded default (malloc namespaces, loopback).
/// With one core both nodes share one reactor on it; with two or more, the source takes the
/// first and the destination the second.
pub fn embedded_configs(mode: CpModeConfig, cores: &[usize]) -> (Config, Config) {
    assert!(!cores.is_empty());
    let any_port: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let mut source = Config::embedded_default(Role::Source, any_port, cores[0]);
    let mut destination = Config::embedded_default(
        Role::Destination,
        any_port,
        *cores.get(1).unwrap_or(&cores[0]),
    );
    source.cp_mode = mode;
    destination.cp_mode = mode;
    (source, destination)
}

/// Where the embedded pair's nodes run.
enum Layout<F: FrontEnd + Send + 'static> {
    TwoReactors {
        source: Running<SourceNode<F>>,
        /// The destination's reactor also polls the target's queue pairs of its turn.
        destination: Running<Hosted<DestinationNode>>,
    },
    OneReactor(Running<PairNode<F>>),
}

/// A source and a destination in this process, on one reactor each or sharing one.
pub struct EmbeddedPair<F: FrontEnd + Send + 'static> {
    pub source_control: Arc<NodeControl>,
    pub destination_control: Arc<NodeControl>,
    /// The control whose mailbox reaches the destination: its own, or the pair's on one reactor.
    pub destination_commands: Arc<NodeControl>,
    pub replication_address: SocketAddr,
    layout: Layout<F>,
    /// Where the pair's rings may live; they hold nothing of value once the malloc namespaces are gone.
    ring_files: Vec<std::path::PathBuf>,
}

impl<F: FrontEnd + Send + 'static> EmbeddedPair<F> {
    /// Starts the pair; with two cores the destination's reactor registers in `hosts` to take
    /// its turn of the target's queue pairs (`make_front_end` runs after that).
    pub fn start<M>(
        (mut source, destination): (Config, Config),
        hosts: &QueuePairHosts,
        make_front_end: M,
    ) -> Result<Self, String>
    where
        M: FnOnce(&SourceEngine) -> Result<F, String> + Send + 'static,
    {
        // Malloc namespaces start empty, so rings and metadata left by an earlier embedded run
        // describe data that no longer exists: start both sides afresh (each config's
        // `assume_identical` says so for the fresh pair).
        let ring_files: Vec<_> = [&source, &destination]
            .iter()
            .flat_map(|config| {
                [
                    config.hugepage_dir.join(config.ring_file_name()),
                    config.fallback_dir.join(config.ring_file_name()),
                    config.metadata_file(),
                ]
            })
            .collect();
        for stale in &ring_files {
            if stale.exists() {
                std::fs::remove_file(stale).map_err(|e| format!("{}: {e}", stale.display()))?;
                log::info!(
                    "embedded: removed the ring of an earlier run at {}",
                    stale.display()
                );
            }
        }
        if source.cores == destination.cores {
            let setup::RunningPair {
                pair,
                destination_control,
                replication_address,
            } = setup::spawn_pair_on_one_reactor(source, destination, make_front_end)?;
            return Ok(EmbeddedPair {
                source_control: pair.control.clone(),
                destination_commands: pair.control.clone(),
                destination_control,
                replication_address,
                layout: Layout::OneReactor(pair),
                ring_files,
            });
        }
        let (destination, replication_address) =
            setup::spawn_destination_hosting(destination, hosts)?;
        source.peer = Some(replication_address);
        let source = setup::spawn_source(source, make_front_end)?;
        Ok(EmbeddedPair {
            source_control: source.control.clone(),
            destination_control: destination.control.clone(),
            destination_commands: destination.control.clone(),
            replication_address,
            layout: Layout::TwoReactors {
                source,
                destination,
            },
            ring_files,
        })
    }

    /// Stops both nodes and removes their ring files (the mappings stay valid until the nodes are
    /// dropped; the hugepages return to the pool then).
    pub fn stop(self) -> Result<(SourceNode<F>, DestinationNode), String> {
        for ring in &self.ring_files {
            if ring.exists() {
                if let Err(e) = std::fs::remove_file(ring) {
                    log::warn!("embedded: cannot remove {}: {e}", ring.display());
                }
            }
        }
        match self.layout {
            Layout::TwoReactors {
                source,
                destination,
            } => Ok((source.stop()?, destination.stop()?.node)),
            Layout::OneReactor(pair) => {
                let pair = pair.stop()?;
                Ok((pair.source, pair.destination))
            }
        }
    }
}

/// What the command line says of the embedded default: cores and the target's addresses.
pub struct Embedded {
    pub cores: Vec<usize>,
    pub listen: Option<std::net::SocketAddr>,
    pub discovery: Option<std::net::SocketAddr>,
    /// The management socket (default [`crate::config::RPC_SOCKET_EMBEDDED`]).
    pub rpc_socket: Option<std::path::PathBuf>,
}

impl Embedded {
    /// The embedded pair's configs with the addresses asked for.
    fn configs(&self) -> (Config, Config) {
        let (mut source, destination) = embedded_configs(CpModeConfig::References, &self.cores);
        let target = source
            .target
            .as_mut()
            .expect("the embedded source has a target");
        if let Some(listen) = self.listen {
            target.listen = vec![listen];
        }
        if let Some(discovery) = self.discovery {
            target.discovery_listen = vec![discovery];
        }
        (source, destination)
    }
}

pub fn run_embedded_default(embedded: &Embedded, json: bool) -> Result<(), String> {
    let signals = serve::signals()?;
    let configs = embedded.configs();
    let source_config = configs.0.clone();
    let hosts = QueuePairHosts::default();
    let front_end = setup::target_front_end(&source_config, hosts.clone());
    let pair = EmbeddedPair::start(configs, &hosts, front_end)?;
    println!(
        "nvmirror: embedded default running: source -> destination on {} (malloc namespaces). Ctrl-C stops.",
        pair.replication_address
    );
    let management = crate::manage::start_server(
        &embedded
            .rpc_socket
            .clone()
            .unwrap_or_else(|| source_config.rpc_socket_path()),
        &source_config.volume,
        &[
            ("source", &pair.source_control, &pair.source_control),
            (
                "destination",
                &pair.destination_control,
                &pair.destination_commands,
            ),
        ],
    );
    let _management = match management {
        Ok(server) => server,
        Err(e) => {
            pair.stop()?;
            return Err(e);
        }
    };
    if let Ok(true) = setup::wait_settled(&pair.source_control, &signals.stop) {
        serve::print_connect_lines(&source_config, &embedded.cores);
    }
    let served = serve::serve_until_stopped(
        &[
            ("source", &pair.source_control, &pair.source_control),
            (
                "destination",
                &pair.destination_control,
                &pair.destination_commands,
            ),
        ],
        Some(&pair.source_control),
        &signals,
        json,
    );
    if served.is_ok() {
        if let Err(e) = setup::finish(&pair.source_control, serve::FINAL_CP_TIMEOUT) {
            log::warn!("source: {e}");
        }
    }
    let (source, destination) = pair.stop()?;
    serve::print_counters("source", source.volume.source.counters(), json);
    serve::print_counters("destination", destination.destination.counters(), json);
    served.map(|_| ())
}

/// The embedded default's target without replication (a baseline for benchmarks).
pub fn run_unreplicated_target(embedded: &Embedded) -> Result<(), String> {
    let signals = serve::signals()?;
    let (config, _) = embedded.configs();
    let cores = &embedded.cores;
    // Queue pairs round robin over the given cores, as with replication.
    let hosts = QueuePairHosts::default();
    let queue_pair_reactors = cores
        .iter()
        .skip(1)
        .map(|&core| setup::spawn_queue_pair_reactor(&config, core, &hosts))
        .collect::<Result<Vec<_>, String>>()?;
    let running = setup::spawn_plain_target(config.clone(), hosts)?;
    println!(
        "nvmirror: NVMe/TCP target WITHOUT replication running (malloc namespace). Ctrl-C stops."
    );
    serve::print_connect_lines(&config, cores);
    let served = serve::serve_until_stopped(&[], None, &signals, false);
    running.stop()?;
    for reactor in queue_pair_reactors {
        reactor.stop()?;
    }
    served.map(|_| ())
}
