//! `nvmirror`: the synchronous NVMe-oF replication engine's command line.
//!
//! With no arguments it runs the embedded default, a source and a destination on loopback with
//! malloc namespaces; `--config FILE` runs one side as the file says; `demo` drives a seeded
//! workload through the embedded pair and prints what references saved on the wire.
#![forbid(unsafe_code)]

mod config;
mod cores;
mod demo;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use config::{Config, Role};
use nvmirror_runtime::remote::QueuePairHosts;

const USAGE: &str = "\
usage:
  nvmirror [--cores 0,1] [--listen ADDR] [--discovery-listen ADDR]
                                    run the embedded default (source + destination on loopback, malloc namespaces,
                                    NVMe/TCP target on 127.0.0.1:4420, discovery on 8009); one reactor on core 0
                                    unless --cores 0,1 gives each node its own; target queue pairs go round robin
                                    over the given cores
  nvmirror --no-replication [--cores 0[,1]] [--listen ADDR] [--discovery-listen ADDR]
                                    the same NVMe/TCP target over malloc, without replication
  nvmirror --config FILE [--json]   run one side (role = source | destination) as FILE says
  nvmirror demo [OPTIONS]           drive a seeded workload through the embedded pair and print the counters
      --seed N --writes N --pattern aligned|mixed --mode references|naive --queue-depth N
      --cp-every N (writes per CP) --cores 0,1 --json
  nvmirror workload --config FILE [--seed N --writes N --pattern aligned|mixed|disjoint
      --queue-depth N --cp-every N --ack-log FILE]
                                    run a source with the seeded workload, exit once it is durable on both sides
  nvmirror sync --config FILE       start a source, replay its ring, resend, take a CP, exit when in sync
  nvmirror promote --config FILE    failover: replay a destination's log onto its mirror, bump the epoch
  nvmirror version
Signals: SIGINT/SIGTERM stop (a source first takes a last CP; counters are printed),\nSIGUSR1 prints the counters, SIGUSR2 starts a consistency point.
Logging: RUST_LOG=debug|info|warn (default info).";

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("nvmirror: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let mut options = Options::parse(args)?;
    match options.command.as_deref() {
        None => {
            let json = options.flag("--json");
            match options.value("--config")? {
                Some(path) => {
                    options.finish()?;
                    run_configured(
                        &Config::load(std::path::Path::new(&path)).map_err(|e| e.to_string())?,
                        json,
                    )
                }
                None => {
                    let unreplicated = options.flag("--no-replication");
                    let cores = options.cores()?;
                    let listen = options.address("--listen")?;
                    let discovery = options.address("--discovery-listen")?;
                    options.finish()?;
                    let embedded = Embedded {
                        cores,
                        listen,
                        discovery,
                    };
                    if unreplicated {
                        run_unreplicated_target(&embedded)
                    } else {
                        run_embedded_default(&embedded, json)
                    }
                }
            }
        }
        Some("demo") => demo::run_demo(demo::DemoOptions::from(&mut options)?),
        Some("workload") | Some("sync") => {
            let sync_only = options.command.as_deref() == Some("sync");
            demo::run_workload(&mut options, sync_only)
        }
        Some("promote") => {
            let path = options.required("--config")?;
            options.finish()?;
            demo::promote(&Config::load(&path).map_err(|e| e.to_string())?)
        }
        Some("version") => {
            println!(
                "nvmirror {} ({}, replication protocol {})",
                env!("CARGO_PKG_VERSION"),
                env!("NVMIRROR_GIT_COMMIT"),
                nvmirror_engine::wire::PROTOCOL_VERSION
            );
            Ok(())
        }
        Some("help") | Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command '{other}'\n{USAGE}")),
    }
}

/// Flags set by signals: SIGINT/SIGTERM stop, SIGUSR1 prints the counters, SIGUSR2 starts a CP.
pub struct Signals {
    pub stop: Arc<AtomicBool>,
    pub report: Arc<AtomicBool>,
    pub cp: Arc<AtomicBool>,
}

pub fn signals() -> Result<Signals, String> {
    let flags = Signals {
        stop: Arc::new(AtomicBool::new(false)),
        report: Arc::new(AtomicBool::new(false)),
        cp: Arc::new(AtomicBool::new(false)),
    };
    let register = |signal, flag: &Arc<AtomicBool>| {
        signal_hook::flag::register(signal, flag.clone())
            .map_err(|e| format!("signal handler: {e}"))
    };
    register(signal_hook::consts::SIGINT, &flags.stop)?;
    register(signal_hook::consts::SIGTERM, &flags.stop)?;
    register(signal_hook::consts::SIGUSR1, &flags.report)?;
    register(signal_hook::consts::SIGUSR2, &flags.cp)?;
    Ok(flags)
}

/// How long a stopping source waits for its last CP.
const FINAL_CP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

fn run_configured(config: &Config, json: bool) -> Result<(), String> {
    let signals = signals()?;
    match config.role {
        Role::Destination => {
            let (running, address) = setup::spawn_destination(config.clone())?;
            println!(
                "nvmirror destination: volume '{}' accepting the source on {address}",
                config.volume
            );
            let served = demo::serve_until_stopped(
                &[("destination", &running.control)],
                None,
                &signals,
                json,
            );
            let node = running.stop()?;
            served?;
            demo::print_counters("destination", node.destination.counters(), json);
        }
        Role::Source => {
            // Queue pairs go round robin over every configured core: the source's reactor
            // on the first, a queue-pair reactor on each other one.
            let hosts = QueuePairHosts::default();
            let mut queue_pair_reactors = Vec::new();
            if config.target.is_some() {
                for &core in config.cores.iter().skip(1) {
                    queue_pair_reactors
                        .push(setup::spawn_queue_pair_reactor(config, core, &hosts)?);
                }
            }
            let running =
                setup::spawn_source(config.clone(), setup::target_front_end(config, hosts))?;
            println!(
                "nvmirror source: volume '{}' replicating to {}",
                config.volume,
                config.peer.expect("validated")
            );
            print_connect_lines(config, &config.cores);
            let served = demo::serve_until_stopped(
                &[("source", &running.control)],
                Some(&running.control),
                &signals,
                json,
            );
            if served.is_ok() {
                if let Err(e) = setup::finish(&running.control, FINAL_CP_TIMEOUT) {
                    log::warn!("source: {e}");
                }
            }
            let node = running.stop()?;
            for reactor in queue_pair_reactors {
                reactor.stop()?;
            }
            demo::print_counters("source", node.volume.source.counters(), json);
            served?;
        }
    }
    Ok(())
}

/// What the command line says of the embedded default: cores and the target's addresses.
struct Embedded {
    cores: Vec<usize>,
    listen: Option<std::net::SocketAddr>,
    discovery: Option<std::net::SocketAddr>,
}

impl Embedded {
    /// The embedded pair's configs with the addresses asked for.
    fn configs(&self) -> (Config, Config) {
        let (mut source, destination) =
            demo::embedded_configs(config::CpModeConfig::References, &self.cores);
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

fn run_embedded_default(embedded: &Embedded, json: bool) -> Result<(), String> {
    let signals = signals()?;
    let configs = embedded.configs();
    let source_config = configs.0.clone();
    let hosts = QueuePairHosts::default();
    let front_end = setup::target_front_end(&source_config, hosts.clone());
    let pair = demo::EmbeddedPair::start(configs, &hosts, front_end)?;
    println!(
        "nvmirror: embedded default running: source -> destination on {} (malloc namespaces). Ctrl-C stops.",
        pair.replication_address
    );
    print_connect_lines(&source_config, &embedded.cores);
    let served = demo::serve_until_stopped(
        &[
            ("source", &pair.source_control),
            ("destination", &pair.destination_control),
        ],
        Some(&pair.source_control),
        &signals,
        json,
    );
    if served.is_ok() {
        if let Err(e) = setup::finish(&pair.source_control, FINAL_CP_TIMEOUT) {
            log::warn!("source: {e}");
        }
    }
    let (source, destination) = pair.stop()?;
    demo::print_counters("source", source.volume.source.counters(), json);
    demo::print_counters("destination", destination.destination.counters(), json);
    served
}

/// The embedded default's target without replication (a baseline for benchmarks).
fn run_unreplicated_target(embedded: &Embedded) -> Result<(), String> {
    let signals = signals()?;
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
    print_connect_lines(&config, cores);
    let served = demo::serve_until_stopped(&[], None, &signals, false);
    running.stop()?;
    for reactor in queue_pair_reactors {
        reactor.stop()?;
    }
    served
}

/// What a user types to reach the target: `nvme connect` and SPDK's perf, the latter on a core
/// none of `reactor_cores` polls.
fn print_connect_lines(config: &Config, reactor_cores: &[usize]) {
    let Some(target) = &config.target else {
        return;
    };
    let cpus = cores::CpuSet::of_this_process();
    for subsystem in &target.subsystems {
        for listener in &target.listen {
            println!(
                "  connect a host: nvme connect -t tcp -a {} -s {} -n {}",
                listener.ip(),
                listener.port(),
                subsystem.nqn
            );
            println!(
                "  benchmark:      {}",
                perf_line(listener, &subsystem.nqn, &cpus, reactor_cores)
            );
        }
    }
    for discovery in &target.discovery_listen {
        println!(
            "  discovery:      nvme discover -t tcp -a {} -s {}",
            discovery.ip(),
            discovery.port()
        );
    }
}

/// The `spdk_nvme_perf` line for one listener. Without `-c` SPDK runs on core 0, which is the
/// default reactor's: both poll one core and perf measures a quarter of the target. So the line
/// names the first core no reactor uses, or, when every core has one, the last core, and says so.
fn perf_line(
    listener: &std::net::SocketAddr,
    nqn: &str,
    cpus: &cores::CpuSet,
    reactor_cores: &[usize],
) -> String {
    let (core, note) = match cpus.first_unused(reactor_cores) {
        Some(core) => (core, String::new()),
        None => {
            let core = *cpus.online.last().expect("at least one core is online");
            (
                core,
                format!(
                    "   # every core runs a reactor: perf shares core {core} with one, and both slow down"
                ),
            )
        }
    };
    format!(
        "spdk_nvme_perf -c {} -r 'trtype:TCP adrfam:IPv4 traddr:{} trsvcid:{} subnqn:{nqn}' -q 32 -o 4096 -w randwrite -t 10{note}",
        cores::spdk_core_mask(core),
        listener.ip(),
        listener.port(),
    )
}

/// A small command-line reader: `--key value` pairs and `--flag`s after an optional command word.
pub struct Options {
    pub command: Option<String>,
    rest: Vec<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let (command, rest) = match args.first() {
            Some(first) if !first.starts_with('-') => (Some(first.clone()), args[1..].to_vec()),
            Some(first) if first == "--help" || first == "-h" => {
                (Some("help".into()), args[1..].to_vec())
            }
            _ => (None, args.to_vec()),
        };
        Ok(Options { command, rest })
    }

    pub fn flag(&mut self, name: &str) -> bool {
        match self.rest.iter().position(|a| a == name) {
            Some(position) => {
                self.rest.remove(position);
                true
            }
            None => false,
        }
    }

    pub fn value(&mut self, name: &str) -> Result<Option<String>, String> {
        match self.rest.iter().position(|a| a == name) {
            Some(position) if position + 1 < self.rest.len() => {
                let value = self.rest.remove(position + 1);
                self.rest.remove(position);
                Ok(Some(value))
            }
            Some(_) => Err(format!("{name} needs a value")),
            None => Ok(None),
        }
    }

    pub fn required(&mut self, name: &str) -> Result<PathBuf, String> {
        self.value(name)?
            .map(PathBuf::from)
            .ok_or_else(|| format!("{name} FILE is required"))
    }

    pub fn address(&mut self, name: &str) -> Result<Option<std::net::SocketAddr>, String> {
        self.value(name)?
            .map(|text| {
                text.parse()
                    .map_err(|_| format!("{name}: '{text}' is not an address like 127.0.0.1:4420"))
            })
            .transpose()
    }

    pub fn number(&mut self, name: &str, default: u64) -> Result<u64, String> {
        match self.value(name)? {
            Some(text) => text
                .parse()
                .map_err(|_| format!("{name}: '{text}' is not a number")),
            None => Ok(default),
        }
    }

    /// `--cores 0,1`: the embedded pair's reactor cores (one core: both nodes share a reactor).
    pub fn cores(&mut self) -> Result<Vec<usize>, String> {
        let Some(text) = self.value("--cores")? else {
            // One reactor for the pair by default: on a small machine the other cores stay free
            // for hosts (a polled host sharing a core with a polled node starves both).
            return Ok(vec![0]);
        };
        let cores: Vec<usize> = text
            .split(',')
            .map(|core| {
                core.trim()
                    .parse()
                    .map_err(|_| format!("--cores: '{core}' is not a core number"))
            })
            .collect::<Result<_, _>>()?;
        if cores.is_empty() || cores.len() > 2 {
            return Err("--cores takes one or two core numbers (source, destination)".into());
        }
        cores::CpuSet::of_this_process()
            .check_and_warn("--cores", &cores)
            .map_err(|reason| format!("--cores: {reason}"))?;
        Ok(cores)
    }

    /// Rejects anything not consumed, so a typo never passes silently.
    pub fn finish(&self) -> Result<(), String> {
        match self.rest.first() {
            Some(unknown) => Err(format!("unknown argument '{unknown}'\n{USAGE}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_cores() -> cores::CpuSet {
        cores::CpuSet {
            online: vec![0, 1],
            allowed: vec![0, 1],
        }
    }

    #[test]
    fn perf_runs_on_a_core_no_reactor_uses() {
        let listener = "127.0.0.1:4420".parse().unwrap();
        let line = perf_line(&listener, NQN, &two_cores(), &[0]);
        assert!(line.starts_with("spdk_nvme_perf -c 0x2 -r 'trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.2026-11.io.nvmirror:vol0'"), "{line}");
        assert!(!line.contains('#'), "{line}");
        let line = perf_line(&listener, NQN, &two_cores(), &[1]);
        assert!(line.starts_with("spdk_nvme_perf -c 0x1 "), "{line}");
    }

    #[test]
    fn perf_on_a_reactor_core_says_so() {
        let listener = "127.0.0.1:4420".parse().unwrap();
        let line = perf_line(&listener, NQN, &two_cores(), &[0, 1]);
        assert!(line.starts_with("spdk_nvme_perf -c 0x2 "), "{line}");
        assert!(
            line.ends_with(
                "# every core runs a reactor: perf shares core 1 with one, and both slow down"
            ),
            "{line}"
        );
    }

    const NQN: &str = config::NQN_DEFAULT;
}
