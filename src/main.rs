//! `nvmirror`: the synchronous NVMe-oF replication engine's command line.
//!
//! With no arguments it runs the embedded default, a source and a destination on loopback with
//! malloc namespaces; `--config FILE` runs one side as the file says; `demo` drives a seeded
//! workload through the embedded pair and prints what references saved on the wire.
#![forbid(unsafe_code)]

mod attach;
mod config;
mod cores;
mod demo;
mod embedded;
mod manage;
mod promote;
mod serve;
mod setup;
#[cfg(feature = "spdk")]
mod spdk_app;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

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
      --seed N --writes N --pattern aligned|mixed|hotspot --mode references|naive --queue-depth N
      --cp-every N (writes per CP) --cores 0,1 --json
  nvmirror workload --config FILE [--seed N --writes N --pattern aligned|mixed|disjoint|hotspot
      --queue-depth N --cp-every N --ack-log FILE]
                                    run a source with the seeded workload, exit once it is durable on both sides
  nvmirror sync --config FILE       start a source, replay its ring, resend, take a CP, exit when in sync
  nvmirror promote --config FILE    failover: replay a destination's log onto its mirror, take a new generation;
                                    online when the destination runs (it then serves the volume as the source:
                                    its config needs a [target] section and promote_peer)
  nvmirror status|stats [--socket PATH | --config FILE] [--json]
                                    a running process's state / counters over its management socket
                                    (JSON-RPC 2.0; default /var/tmp/nvmirror.sock, the embedded default's)
  nvmirror cp [--wait] [--timeout-ms N] [--socket PATH | --config FILE]
                                    start a consistency point; --wait returns once every write completed
                                    before it is on both sides' namespaces
  nvmirror set-policy suspend|fail|degrade [--socket PATH | --config FILE]
                                    change a running source's peer-loss policy
  nvmirror attach ADDR:PORT [--socket PATH | --config FILE]
                                    a running source replicates to the destination at ADDR:PORT from now on
                                    (e.g. the old source, started as a destination after a promotion)
  nvmirror discard-changes --config FILE
                                    after a split brain: this (stopped) node forgets its data's generations,
                                    so it takes a full sync from the other side when next attached
  nvmirror rpc METHOD ['{\"param\": value}'] [--socket PATH | --config FILE]
                                    call any management method (rpc_get_methods lists them)
  nvmirror spdk [SPDK app options: -m MASK -s MIB -c CONFIG.json -r RPC_SOCKET ...]
                                    the SPDK runtime (built with --features spdk): SPDK's nvmf target with the
                                    bdev_nvmirror module; volumes come from bdev_nvmirror_create (JSON config or rpc.py)
  nvmirror version
Signals: SIGINT/SIGTERM stop (a source first takes a last CP; counters are printed),\nSIGUSR1 prints the counters, SIGUSR2 starts a consistency point.
Logging: RUST_LOG=debug|info|warn (default info).";

/// `nvmirror spdk [SPDK options]`: the SPDK runtime, when built with it.
#[cfg(feature = "spdk")]
fn run_spdk(args: &[String]) -> Result<(), String> {
    spdk_app::run(args)
}

#[cfg(not(feature = "spdk"))]
fn run_spdk(_args: &[String]) -> Result<(), String> {
    Err(
        "this nvmirror was built without the SPDK runtime: build with `cargo build --release \
         --features spdk` and SPDK_DIR pointing at an installed SPDK (see the README)"
            .into(),
    )
}

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
    if args.first().map(String::as_str) == Some("spdk") {
        return run_spdk(&args[1..]);
    }
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
                    let rpc_socket = options.value("--rpc-socket")?.map(PathBuf::from);
                    options.finish()?;
                    let embedded = embedded::Embedded {
                        cores,
                        listen,
                        discovery,
                        rpc_socket,
                    };
                    if unreplicated {
                        embedded::run_unreplicated_target(&embedded)
                    } else {
                        embedded::run_embedded_default(&embedded, json)
                    }
                }
            }
        }
        Some("demo") => demo::run_demo(demo::DemoOptions::from(&mut options)?),
        Some("workload") | Some("sync") => {
            let sync_only = options.command.as_deref() == Some("sync");
            workload::run_workload(&mut options, sync_only)
        }
        Some("promote") => {
            let path = options.required("--config")?;
            options.finish()?;
            promote::promote_command(&Config::load(&path).map_err(|e| e.to_string())?)
        }
        Some(command @ ("status" | "stats" | "cp" | "set-policy" | "attach" | "rpc")) => {
            let command = command.to_string();
            manage::run_client(&command, &mut options)
        }
        Some("discard-changes") => {
            let path = options.required("--config")?;
            options.finish()?;
            let said = attach::discard_changes(&Config::load(&path).map_err(|e| e.to_string())?)?;
            println!("nvmirror discard-changes: {said}");
            Ok(())
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

fn run_configured(config: &Config, json: bool) -> Result<(), String> {
    let signals = serve::signals()?;
    match config.role {
        Role::Destination => loop {
            if run_destination(config, &signals, json)? == serve::Served::Stopped {
                break;
            }
            // The operator promoted this node: it is the pair's source from now on, unless
            // the promotion is refused (a half-resynced mirror): then it is a destination again.
            match promote::promote(config) {
                Ok(()) => {
                    *nvmirror_runtime::management::LAST_PROMOTE_ERROR
                        .lock()
                        .unwrap() = None;
                    let source = config.promoted_source()?;
                    println!(
                        "nvmirror: promoted: serving volume '{}' as its source",
                        config.volume
                    );
                    run_source(&source, &signals, json, true)?;
                    break;
                }
                Err(e) => {
                    log::error!("online promotion refused: {e}; serving as the destination again");
                    *nvmirror_runtime::management::LAST_PROMOTE_ERROR
                        .lock()
                        .unwrap() = Some(e);
                }
            }
        },
        Role::Source => run_source(config, &signals, json, false)?,
    }
    Ok(())
}

/// Runs a destination until a signal stops it or the operator promotes it.
fn run_destination(
    config: &Config,
    signals: &serve::Signals,
    json: bool,
) -> Result<serve::Served, String> {
    if config.promote_peer.is_some() {
        // Checked now, not when the operator needs it.
        config.promoted_source()?;
    }
    let (running, address) = setup::spawn_destination(config.clone())?;
    println!(
        "nvmirror destination: volume '{}' accepting the source on {address}",
        config.volume
    );
    let management = manage::start_server(
        &config.rpc_socket_path(),
        &config.volume,
        &[("destination", &running.control, &running.control)],
    );
    let management = match management {
        Ok(server) => server,
        Err(e) => {
            running.stop()?;
            return Err(e);
        }
    };
    let served = serve::serve_until_stopped(
        &[("destination", &running.control, &running.control)],
        None,
        signals,
        json,
    );
    let node = running.stop()?;
    drop(management);
    serve::print_counters("destination", node.destination.counters(), json);
    served
}

/// Runs a source until a signal stops it (a last CP first). `settled`: serve hosts at once (a
/// node just promoted is the pair's authority), else only once a handshake settled the role.
fn run_source(
    config: &Config,
    signals: &serve::Signals,
    json: bool,
    settled: bool,
) -> Result<(), String> {
    // Queue pairs go round robin over every configured core: the source's reactor on the
    // first, a queue-pair reactor on each other one.
    let hosts = QueuePairHosts::default();
    let mut queue_pair_reactors = Vec::new();
    if config.target.is_some() {
        for &core in config.cores.iter().skip(1) {
            queue_pair_reactors.push(setup::spawn_queue_pair_reactor(config, core, &hosts)?);
        }
    }
    let running = setup::spawn_source(config.clone(), setup::target_front_end(config, hosts))?;
    println!(
        "nvmirror source: volume '{}' replicating to {}",
        config.volume,
        config.peer.expect("validated")
    );
    let management = manage::start_server(
        &config.rpc_socket_path(),
        &config.volume,
        &[("source", &running.control, &running.control)],
    );
    let _management = match management {
        Ok(server) => server,
        Err(e) => {
            running.stop()?;
            for reactor in queue_pair_reactors {
                reactor.stop()?;
            }
            return Err(e);
        }
    };
    if settled {
        running
            .control
            .send(nvmirror_runtime::node::Command::Settle)?;
    }
    // Hosts are told where to connect only once the handshake settled this source's role: a
    // stale or split source never opens its listener (a refusal ends below).
    if let Ok(true) = setup::wait_settled(&running.control, &signals.stop) {
        serve::print_connect_lines(config, &config.cores);
    }
    let served = serve::serve_until_stopped(
        &[("source", &running.control, &running.control)],
        Some(&running.control),
        signals,
        json,
    );
    if served.is_ok() {
        if let Err(e) = setup::finish(&running.control, serve::FINAL_CP_TIMEOUT) {
            log::warn!("source: {e}");
        }
    }
    let node = running.stop()?;
    for reactor in queue_pair_reactors {
        reactor.stop()?;
    }
    serve::print_counters("source", node.volume.source.counters(), json);
    served.map(|_| ())
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

    /// The next word that is not an option (`nvmirror rpc METHOD PARAMS`).
    pub fn positional(&mut self) -> Option<String> {
        let position = self.rest.iter().position(|a| !a.starts_with("--"))?;
        Some(self.rest.remove(position))
    }

    /// Rejects anything not consumed, so a typo never passes silently.
    pub fn finish(&self) -> Result<(), String> {
        match self.rest.first() {
            Some(unknown) => Err(format!("unknown argument '{unknown}'\n{USAGE}")),
            None => Ok(()),
        }
    }
}
