//! The embedded pair, the seeded demo, the workload runner used by the process tests, and promotion.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvmirror_engine::counters::Counters;
use nvmirror_engine::device::BlockDevice;
use nvmirror_engine::geometry::BLOCK_SIZE;
use nvmirror_runtime::node::{
    Command, DestinationNode, FrontEnd, Hosted, NodeControl, PairNode, SourceEngine, SourceNode,
};
use nvmirror_runtime::remote::QueuePairHosts;
use nvmirror_runtime::workload::{Pattern, Planner, Workload};

use crate::config::{Config, CpModeConfig, Role};
use crate::setup::{self, Running};
use crate::Options;

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
        // Malloc namespaces start empty, so rings left by an earlier embedded run describe data
        // that no longer exists: start both rings afresh.
        let ring_files: Vec<_> = [&source, &destination]
            .iter()
            .flat_map(|config| {
                [&config.hugepage_dir, &config.fallback_dir]
                    .map(|dir| dir.join(config.ring_file_name()))
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

/// Runs until SIGINT/SIGTERM, printing counters on SIGUSR1. A source whose destination refuses
/// the link for good (another volume, version or geometry; a stale epoch) stops with that reason.
pub fn serve_until_stopped(
    controls: &[(&str, &NodeControl)],
    source: Option<&NodeControl>,
    signals: &crate::Signals,
    json: bool,
) -> Result<(), String> {
    while !signals.stop.load(Ordering::Acquire) {
        if signals.cp.swap(false, Ordering::AcqRel) {
            match source {
                Some(control) => control.send(Command::RequestCp)?,
                None => log::warn!("SIGUSR2: only a source starts consistency points"),
            }
        }
        if let Some(reason) = source.and_then(|control| control.rejected.lock().unwrap().clone()) {
            return Err(format!("replication stopped: {reason}"));
        }
        if signals.report.swap(false, Ordering::AcqRel) {
            for (_, control) in controls {
                if let Err(e) = control.send(Command::PublishCounters) {
                    log::warn!("{e}");
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            for (side, control) in controls {
                if let Some(counters) = control.counters.lock().unwrap().as_ref() {
                    print_counters(side, counters, json);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// Prints a side's counters. A closed standard output (the reader went away) must not turn a
/// clean shutdown into a panic, so write errors are ignored here.
pub fn print_counters(side: &str, counters: &Counters, json: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = if json {
        writeln!(
            out,
            "{{\"side\":\"{side}\",\"counters\":{}}}",
            counters.to_json()
        )
    } else {
        writeln!(
            out,
            "--- {side} counters ---\n{}",
            counters.to_text().trim_end()
        )
    };
}

pub struct DemoOptions {
    seed: u64,
    writes: u64,
    pattern: Pattern,
    mode: CpModeConfig,
    queue_depth: usize,
    cp_every_writes: u64,
    cores: Vec<usize>,
    json: bool,
}

impl DemoOptions {
    pub fn from(options: &mut Options) -> Result<DemoOptions, String> {
        let demo = DemoOptions {
            seed: options.number("--seed", 1)?,
            writes: options.number("--writes", 20_000)?,
            pattern: options
                .value("--pattern")?
                .as_deref()
                .unwrap_or("mixed")
                .parse()?,
            mode: match options.value("--mode")?.as_deref().unwrap_or("references") {
                "references" => CpModeConfig::References,
                "naive" => CpModeConfig::Naive,
                other => return Err(format!("--mode: '{other}' is not references or naive")),
            },
            queue_depth: options.number("--queue-depth", 32)? as usize,
            cp_every_writes: options.number("--cp-every", 4000)?,
            cores: options.cores()?,
            json: options.flag("--json"),
        };
        options.finish()?;
        if demo.queue_depth == 0 || demo.queue_depth > nvmirror_runtime::workload::QUEUE_DEPTH_MAX {
            return Err(format!(
                "--queue-depth must be 1..={}",
                nvmirror_runtime::workload::QUEUE_DEPTH_MAX
            ));
        }
        Ok(demo)
    }
}

/// `nvmirror demo`: the seeded workload through the embedded pair, then counters and a byte-for-byte check.
pub fn run_demo(options: DemoOptions) -> Result<(), String> {
    let stop = crate::signals()?.stop;
    let (source_config, destination_config) = embedded_configs(options.mode, &options.cores);
    let sizes = vec![EMBEDDED_NAMESPACE_MIB << 20; source_config.namespaces.len()];
    let (seed, writes, queue_depth, cp_every, pattern) = (
        options.seed,
        options.writes,
        options.queue_depth,
        options.cp_every_writes,
        options.pattern,
    );
    let started = std::time::Instant::now();
    let hosts = QueuePairHosts::default();
    let pair = EmbeddedPair::start((source_config, destination_config), &hosts, move |_| {
        Ok(Workload::new(
            Planner::new(pattern, seed, sizes),
            seed,
            queue_depth,
            writes,
            cp_every,
        ))
    })?;
    let control = pair.source_control.clone();
    setup::wait_until(&control, &stop, || control.synced.load(Ordering::Acquire))?;
    let elapsed = started.elapsed();
    let (source, destination) = pair.stop()?;
    let counters = *source.volume.source.counters();
    let destination_counters = *destination.destination.counters();
    let wire_bytes = source.link.counters.bytes_sent + source.link.counters.bytes_received;
    let equal = compare_images(source, destination)?;
    let host_bytes = counters.host_bytes_written.max(1);
    let ratio = wire_bytes as f64 / host_bytes as f64;
    if options.json {
        println!(
            "{{\"pattern\":\"{:?}\",\"mode\":\"{:?}\",\"seed\":{},\"writes\":{},\"host_bytes\":{},\"wire_bytes\":{},\"wire_per_host_byte\":{:.4},\"mirror_equals_primary\":{},\"seconds\":{:.3},\"source\":{},\"destination\":{}}}",
            options.pattern, options.mode, options.seed, options.writes, counters.host_bytes_written, wire_bytes, ratio,
            equal, elapsed.as_secs_f64(), counters.to_json(), destination_counters.to_json()
        );
    } else {
        println!(
            "nvmirror demo: {} {:?} writes (seed {}), CP mode {:?}, queue depth {}, {:.2} s",
            options.writes,
            options.pattern,
            options.seed,
            options.mode,
            options.queue_depth,
            elapsed.as_secs_f64()
        );
        print_counters("source", &counters, false);
        print_counters("destination", &destination_counters, false);
        println!("--- summary ---");
        println!(
            "host bytes written          {}",
            counters.host_bytes_written
        );
        println!("replication wire bytes      {wire_bytes} (both directions, all messages)");
        println!("wire bytes per host byte    {ratio:.4}");
        println!(
            "bytes saved by references   {}",
            counters.bytes_saved_by_references
        );
        println!(
            "mirror equals primary       {}",
            if equal { "yes" } else { "NO" }
        );
    }
    if !equal {
        return Err("the destination mirror differs from the source primary".into());
    }
    Ok(())
}

/// Compares every namespace of the source's primary with the destination's mirror.
fn compare_images(
    source: SourceNode<impl FrontEnd>,
    destination: DestinationNode,
) -> Result<bool, String> {
    const CHUNK_BYTES: usize = 256 * BLOCK_SIZE;
    let (_, mut primaries) = source.volume.source.into_parts();
    let (_, mut mirrors) = destination.destination.into_parts();
    let mut primary = vec![0u8; CHUNK_BYTES];
    let mut mirror = vec![0u8; CHUNK_BYTES];
    for (index, (primary_device, mirror_device)) in
        primaries.iter_mut().zip(mirrors.iter_mut()).enumerate()
    {
        let size_bytes = primary_device.size_bytes();
        let mut offset = 0u64;
        while offset < size_bytes {
            let length = CHUNK_BYTES.min((size_bytes - offset) as usize);
            primary_device
                .read_at(offset, &mut primary[..length])
                .map_err(|e| format!("primary read: {e}"))?;
            mirror_device
                .read_at(offset, &mut mirror[..length])
                .map_err(|e| format!("mirror read: {e}"))?;
            if primary[..length] != mirror[..length] {
                let first = (0..length).find(|i| primary[*i] != mirror[*i]).unwrap_or(0);
                log::error!(
                    "namespace {}: mirror differs from primary at byte {}",
                    index + 1,
                    offset + first as u64
                );
                return Ok(false);
            }
            offset += length as u64;
        }
    }
    Ok(true)
}

/// `nvmirror workload` / `nvmirror sync`: one source process with the seeded workload (or none),
/// exiting 0 once everything it wrote is durable on both sides.
pub fn run_workload(options: &mut Options, sync_only: bool) -> Result<(), String> {
    let path = options.required("--config")?;
    let seed = options.number("--seed", 1)?;
    let writes = if sync_only {
        0
    } else {
        options.number("--writes", 10_000)?
    };
    let pattern: Pattern = options
        .value("--pattern")?
        .as_deref()
        .unwrap_or("mixed")
        .parse()?;
    let queue_depth = options.number("--queue-depth", 16)? as usize;
    let cp_every = options.number("--cp-every", 2000)?;
    let ack_log = options.value("--ack-log")?;
    let json = options.flag("--json");
    options.finish()?;
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    if config.role != Role::Source {
        return Err(format!(
            "{}: role must be source for this command",
            path.display()
        ));
    }
    let stop = crate::signals()?.stop;
    let running = setup::spawn_source(config, move |source: &SourceEngine| {
        let mut workload = Workload::new(
            Planner::new(pattern, seed, source.namespace_sizes_bytes().to_vec()),
            seed,
            queue_depth,
            writes,
            cp_every,
        );
        if let Some(path) = ack_log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("--ack-log {path}: {e}"))?;
            workload = workload.with_ack_log(Box::new(std::io::BufWriter::new(file)));
        }
        Ok(workload)
    })?;
    let control = running.control.clone();
    setup::wait_until(&control, &stop, || control.synced.load(Ordering::Acquire))?;
    let node = running.stop()?;
    print_counters("source", node.volume.source.counters(), json);
    Ok(())
}

/// `nvmirror promote`: the destination's failover step.
pub fn promote(config: &Config) -> Result<(), String> {
    if config.role != Role::Destination {
        return Err("promote takes a destination's config".into());
    }
    let destination = setup::open_destination(config)?;
    let report = destination.promote().map_err(|e| format!("promote: {e}"))?;
    println!(
        "nvmirror promote: {} log entries ({} bytes) newer than CP {} replayed onto the mirror; epoch is now {}",
        report.entries_replayed, report.bytes_replayed, report.cp_completed, report.epoch
    );
    Ok(())
}
