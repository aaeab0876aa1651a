//! `nvmirror spdk`: the SPDK runtime (built with `--features spdk`). SPDK's application runs
//! with SPDK's own options (`-m`, `-s`, `-c CONFIG.json`, `-r RPC_SOCKET`, ...), its nvmf
//! target included; nvmirror adds the `bdev_nvmirror` module and these JSON-RPC methods:
//!
//! - `bdev_nvmirror_create {name, role, volume, peer | listen, namespace: [{kind: "bdev",
//!   bdev: NAME}], ...}`: the same keys as a node's TOML config. A source exports one
//!   replicated bdev per namespace (`name`, or `name`n1, n2, ... for several), which
//!   `nvmf_subsystem_add_ns` hands to hosts; a destination exports none (its mirrors are
//!   claimed so nothing else writes them).
//! - `bdev_nvmirror_delete {name}`, `bdev_nvmirror_get_bdevs [{name}]`.
//! - `nvmirror_get_stats {name}`, `nvmirror_cp {name, wait, timeout_ms}`,
//!   `nvmirror_set_policy {name, policy}`, `nvmirror_attach {name, peer}`,
//!   `nvmirror_checksum {name}` (size and CRC32C of each namespace's device: primary or mirror).
//! - `nvmirror_promote {name, peer}` (online failover), `nvmirror_discard_changes {create
//!   params}` (after a split brain, on a deleted volume's metadata).
//!
//! Each volume's node is polled on the app thread by an SPDK poller; its link runs over SPDK's
//! sock layer; its namespaces are SPDK bdevs. A volume whose base bdevs do not exist yet waits
//! for them (as SPDK's raid and passthru do) and starts once SPDK registers the last one, so a
//! JSON config may name them in any order; SPDK's `save_config` lists every volume's
//! `bdev_nvmirror_create` (destinations first).

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvmirror_engine::generation::FLAG_RESYNC_TARGET;
use nvmirror_engine::liveness::PeerLossPolicy;
use nvmirror_nvmf::Backend;
use nvmirror_runtime::management::node_status_json;
use nvmirror_runtime::node::{Command, DestinationNode, Node, NodeControl, SourceNode};
use nvmirror_runtime::reactor::monotonic_us;
use nvmirror_spdk::app::{self, Outcome};
use nvmirror_spdk::dma::Registered;
use nvmirror_spdk::rpc::{self, Responder, INTERNAL_ERROR, INVALID_PARAMS};
use nvmirror_spdk::runner::RunningNode;
use nvmirror_spdk::sock::SockTransport;
use nvmirror_spdk::vbdev::{self, BdevFrontEnd, BdevSpec, ExportedBdev, Inbox};
use serde_json::{json, Map, Value};

use crate::config::{Config, NamespaceConfig, Role};
use crate::setup;

type RpcResult = Result<Value, (i32, String)>;

/// How long a shutdown waits for each source's last CP.
const SHUTDOWN_CP_TIMEOUT_US: u64 = 10_000_000;
/// `nvmirror_cp` with `wait` gives up after this long unless `timeout_ms` says otherwise.
const CP_WAIT_TIMEOUT_MS_DEFAULT: u64 = 30_000;

enum Running {
    Source(RunningNode<SourceNode<BdevFrontEnd>>),
    Destination(RunningNode<DestinationNode>),
}

impl Running {
    fn control(&self) -> &Arc<NodeControl> {
        match self {
            Running::Source(node) => &node.control,
            Running::Destination(node) => &node.control,
        }
    }

    fn role(&self) -> &'static str {
        match self {
            Running::Source(_) => "source",
            Running::Destination(_) => "destination",
        }
    }

    /// Publishes the node's counters now (the caller is on the node's thread).
    fn publish(&self) -> nvmirror_engine::counters::Counters {
        let now = monotonic_us();
        match self {
            Running::Source(node) => node.with(|n| n.handle_command(now, Command::PublishCounters)),
            Running::Destination(node) => {
                node.with(|n| n.handle_command(now, Command::PublishCounters))
            }
        }
        self.control()
            .counters
            .lock()
            .unwrap()
            .expect("published just now")
    }
}

/// One volume of this process. Fields drop in order: the node (and its ring) before the ring's
/// DMA registration.
struct Volume {
    name: String,
    config: Config,
    /// The create params, for `save_config`-style listing.
    params: Value,
    running: Running,
    exported: Vec<ExportedBdev>,
    inbox: Inbox,
    _registration: Option<Registered>,
}

/// A volume created before its base bdevs exist: it starts once SPDK has them all.
struct Pending {
    name: String,
    config: Config,
    params: Value,
    /// Why its last start failed (it waits to be deleted or for its bdevs to come back).
    error: Option<String>,
}

impl Pending {
    fn missing(&self) -> Vec<String> {
        bdev_names(&self.config)
            .into_iter()
            .filter(|bdev| !nvmirror_spdk::module::bdev_exists(bdev))
            .collect()
    }
}

thread_local! {
    static VOLUMES: RefCell<Vec<Volume>> = const { RefCell::new(Vec::new()) };
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

/// The thread the RPC methods run on (SPDK's app thread), where VOLUMES and PENDING live; set
/// by the first `bdev_nvmirror_create`.
static APP_THREAD: std::sync::OnceLock<nvmirror_spdk::thread::Thread> = std::sync::OnceLock::new();

/// Runs the SPDK application with `args` (SPDK's options, after the `spdk` command word).
pub fn run(args: &[String]) -> Result<(), String> {
    for (method, handler) in METHODS {
        // RUNTIME only: a JSON config calls STARTUP methods before the bdev subsystem exists.
        rpc::register(method, rpc::RUNTIME, *handler);
    }
    nvmirror_spdk::module::set_hooks(nvmirror_spdk::module::ModuleHooks {
        config: saved_calls,
        bdev_registered,
        bdev_removed,
    })?;
    let mut argv = vec!["nvmirror spdk".to_string()];
    argv.extend(args.iter().cloned());
    let outcome = app::run("nvmirror", &argv, || {
        app::on_shutdown(shutdown);
        let count = VOLUMES.with(|volumes| volumes.borrow().len());
        let waiting = PENDING.with(|list| list.borrow().len());
        log::info!(
            "nvmirror on {} ready: {count} volume(s) from the JSON config{}; bdev_nvmirror_create adds more",
            nvmirror_spdk::spdk_version(),
            if waiting > 0 {
                format!(", {waiting} waiting for base bdevs")
            } else {
                String::new()
            }
        );
    })?;
    match outcome {
        Outcome::Help => {
            println!(
                "\nnvmirror's methods (rpc.py --plugin nvmirror_rpc ...): {}",
                METHODS
                    .iter()
                    .map(|(m, _)| *m)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Outcome::Stopped(0) => Ok(()),
        Outcome::Stopped(rc) => Err(format!("the SPDK application stopped with {rc}")),
    }
}

const METHODS: &[(&str, rpc::Handler)] = &[
    ("bdev_nvmirror_create", |p, r| r.answer(create(p))),
    ("bdev_nvmirror_delete", delete),
    ("bdev_nvmirror_get_bdevs", |p, r| r.answer(get_bdevs(p))),
    ("nvmirror_get_stats", |p, r| r.answer(get_stats(p))),
    ("nvmirror_set_policy", |p, r| r.answer(set_policy(p))),
    ("nvmirror_attach", |p, r| r.answer(attach(p))),
    ("nvmirror_cp", cp),
    ("nvmirror_checksum", checksum),
    ("nvmirror_promote", promote),
    ("nvmirror_discard_changes", |p, r| {
        r.answer(discard_changes(p))
    }),
];

fn invalid(message: impl Into<String>) -> (i32, String) {
    (INVALID_PARAMS, message.into())
}

fn internal(message: impl Into<String>) -> (i32, String) {
    (INTERNAL_ERROR, message.into())
}

/// The params object, with only `known` keys.
fn object(params: Option<Value>, known: &[&str]) -> Result<Map<String, Value>, (i32, String)> {
    let map = match params {
        None => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(invalid("params must be an object")),
    };
    if let Some(unknown) = map.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(invalid(format!(
            "unknown param '{unknown}' (known: {})",
            known.join(", ")
        )));
    }
    Ok(map)
}

fn required_str(map: &Map<String, Value>, key: &str) -> Result<String, (i32, String)> {
    map.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| invalid(format!("'{key}' (a string) is required")))
}

/// Runs `f` on the volume named in params.
fn with_volume<R>(
    name: &str,
    f: impl FnOnce(&Volume) -> Result<R, (i32, String)>,
) -> Result<R, (i32, String)> {
    VOLUMES.with(|volumes| {
        let volumes = volumes.borrow();
        let volume = volumes
            .iter()
            .find(|volume| volume.name == name)
            .ok_or_else(|| {
                invalid(format!(
                    "no nvmirror volume '{name}' (bdev_nvmirror_get_bdevs lists them)"
                ))
            })?;
        f(volume)
    })
}

/// A volume's name, config and params from `bdev_nvmirror_create`'s params (the keys of a
/// node's TOML config plus `name`), checked for the SPDK runtime; `method` names the call in
/// errors.
fn volume_config(
    params: Option<Value>,
    method: &str,
) -> Result<(String, Config, Value), (i32, String)> {
    let params = params.ok_or_else(|| invalid("params are required"))?;
    let Value::Object(mut map) = params.clone() else {
        return Err(invalid("params must be an object"));
    };
    let name = map
        .remove("name")
        .and_then(|name| name.as_str().map(str::to_string))
        .ok_or_else(|| invalid("'name' (a string) is required"))?;
    if map.contains_key("cores") || map.contains_key("idle") {
        return Err(invalid(
            "'cores' and 'idle' are the embedded runtime's: SPDK's reactors run where its -m core mask says",
        ));
    }
    let mut config: Config = serde_json::from_value(Value::Object(map))
        .map_err(|e| invalid(format!("{method}: {e}")))?;
    // Unused here (SPDK places its threads), and checked against this process's CPUs: one
    // it may run on.
    let cpus = crate::cores::CpuSet::of_this_process();
    if let Some(&core) = cpus.allowed.first().or(cpus.online.first()) {
        config.cores = vec![core];
    }
    config
        .validate()
        .map_err(|e| invalid(format!("{method}: {e}")))?;
    if config.target.is_some() {
        return Err(invalid(
            "'target': the SPDK runtime exports through SPDK's nvmf target (nvmf_subsystem_add_ns with the nvmirror bdev)",
        ));
    }
    if let Some(index) = config
        .namespaces
        .iter()
        .position(|namespace| !matches!(namespace, NamespaceConfig::Bdev { .. }))
    {
        return Err(invalid(format!(
            "namespace[{index}]: the SPDK runtime's namespaces are SPDK bdevs (kind = \"bdev\", bdev = NAME)"
        )));
    }
    Ok((name, config, params))
}

/// The first volume of this process, running or waiting for its bdevs, whose name and config
/// `matches`.
fn volume_where(matches: impl Fn(&str, &Config) -> bool) -> Option<String> {
    VOLUMES
        .with(|volumes| first_where(&volumes.borrow(), |v| (&v.name, &v.config), &matches))
        .or_else(|| {
            PENDING.with(|list| first_where(&list.borrow(), |p| (&p.name, &p.config), &matches))
        })
}

/// The name of the first of `items` (each a name and config, as `parts` gives them) that
/// `matches`.
fn first_where<T>(
    items: &[T],
    parts: impl Fn(&T) -> (&String, &Config),
    matches: impl Fn(&str, &Config) -> bool,
) -> Option<String> {
    items
        .iter()
        .map(parts)
        .find_map(|(name, config)| matches(name, config).then(|| name.clone()))
}

fn create(params: Option<Value>) -> RpcResult {
    let (name, config, params) = volume_config(params, "bdev_nvmirror_create")?;
    if volume_where(|other, _| other == name).is_some() {
        return Err(invalid(format!("nvmirror volume '{name}' exists")));
    }
    if retiring_where(|other, _| other == name).is_some() {
        return Err(invalid(format!(
            "nvmirror volume '{name}' is still stopping (its device I/O in flight completes first): try again"
        )));
    }
    if let Some(thread) = nvmirror_spdk::thread::Thread::current() {
        let _ = APP_THREAD.set(thread);
    }
    let pending = Pending {
        name: name.clone(),
        config,
        params,
        error: None,
    };
    let missing = pending.missing();
    if !missing.is_empty() {
        log::info!(
            "{name}: waiting for base bdev(s) {}: the volume starts once SPDK has them",
            missing.join(", ")
        );
        PENDING.with(|list| list.borrow_mut().push(pending));
        return Ok(json!(name));
    }
    let volume = start_volume(name.clone(), pending.config, pending.params)?;
    VOLUMES.with(|volumes| volumes.borrow_mut().push(volume));
    Ok(json!(name))
}

/// `nvmirror_discard_changes {the volume's bdev_nvmirror_create params}`: after a split brain,
/// the operator gives up this node's changes. The volume must be deleted first
/// (`bdev_nvmirror_delete`): its metadata forgets its generations and bitmap, so when it is
/// created again as a destination the handshake gives it a full sync from the other side.
fn discard_changes(params: Option<Value>) -> RpcResult {
    let (name, config, _) = volume_config(params, "nvmirror_discard_changes")?;
    let metadata = config.metadata_file();
    let uses = |other: &str, c: &Config| other == name || c.metadata_file() == metadata;
    if let Some(user) = volume_where(uses).or_else(|| retiring_where(uses)) {
        return Err(invalid(format!(
            "nvmirror volume '{user}' uses this name or metadata file: bdev_nvmirror_delete it first"
        )));
    }
    let said = crate::attach::discard_changes(&config).map_err(internal)?;
    log::warn!("{name}: {said}");
    Ok(json!({"name": name, "volume": config.volume, "discarded": said}))
}

/// The module saw a bdev registered (on whatever thread registered it): volumes that waited
/// for it start on the app thread, once the registration is through.
fn bdev_registered(_name: &str) {
    let Some(&thread) = APP_THREAD.get() else {
        return; // no volume was ever created: none waits
    };
    if let Err(reason) = nvmirror_spdk::thread::send(thread, start_ready) {
        log::error!("nvmirror: cannot start the volumes waiting for bdevs: {reason}");
    }
}

/// A base bdev is going away (an NVMe SSD hot-removed, a `bdev_*_delete`): as SPDK's passthru
/// does, each volume on it is deleted, its exported bdevs unregistered (SPDK's nvmf target then
/// removes their namespaces), so the removal completes instead of waiting for ever on our
/// descriptors. Every write a source acknowledged is in its ring and on the destination: a
/// later start replays and resends it.
fn bdev_removed(name: &str) {
    let Some(&thread) = APP_THREAD.get() else {
        return;
    };
    let name = name.to_string();
    let sent = nvmirror_spdk::thread::send(thread, move || {
        let on_it: Vec<Volume> = VOLUMES.with(|volumes| {
            let mut volumes = volumes.borrow_mut();
            let (on_it, others) = std::mem::take(&mut *volumes)
                .into_iter()
                .partition(|volume| bdev_names(&volume.config).contains(&name));
            *volumes = others;
            on_it
        });
        for volume in on_it {
            let what = match volume.config.role {
                Role::Source => {
                    "its primary; every write it acknowledged is in its ring and on its destination"
                }
                Role::Destination => "its mirror; its source has lost this destination",
            };
            log::error!(
                "{}: bdev {name} is being removed ({what}): the volume is deleted, its bdevs unregistered",
                volume.name
            );
            remove(volume, true, |_| {});
        }
    });
    if let Err(reason) = sent {
        log::error!("nvmirror: base bdev removal: {reason}");
    }
}

/// Starts every waiting volume whose base bdevs all exist now (on the app thread).
fn start_ready() {
    let ready: Vec<Pending> = PENDING.with(|list| {
        let mut list = list.borrow_mut();
        let (ready, waiting) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|p| p.error.is_none() && p.missing().is_empty());
        *list = waiting;
        ready
    });
    for mut pending in ready {
        let name = pending.name.clone();
        match start_volume(name.clone(), pending.config.clone(), pending.params.clone()) {
            Ok(volume) => VOLUMES.with(|volumes| volumes.borrow_mut().push(volume)),
            Err((_, reason)) => {
                log::error!(
                    "{name}: its base bdevs are there, but it did not start: {reason} (bdev_nvmirror_delete it)"
                );
                pending.error = Some(reason);
                PENDING.with(|list| list.borrow_mut().push(pending));
            }
        }
    }
}

/// `save_config`: a `bdev_nvmirror_create` per volume, destinations first (a source in the
/// same process then finds its destination listening), waiting ones included.
fn saved_calls() -> Vec<String> {
    let mut calls: Vec<(bool, Value)> = VOLUMES.with(|volumes| {
        volumes
            .borrow()
            .iter()
            .map(|v| (v.config.role == Role::Source, v.params.clone()))
            .collect()
    });
    PENDING.with(|list| {
        calls.extend(
            list.borrow()
                .iter()
                .map(|p| (p.config.role == Role::Source, p.params.clone())),
        )
    });
    calls.sort_by_key(|(source, _)| *source);
    calls
        .into_iter()
        .map(|(_, params)| json!({"method": "bdev_nvmirror_create", "params": params}).to_string())
        .collect()
}

/// Opens a volume's ring, devices and metadata, builds its node and starts polling it; a
/// source also exports its bdevs.
fn start_volume(name: String, config: Config, params: Value) -> Result<Volume, (i32, String)> {
    let ring = setup::open_ring(&config).map_err(internal)?;
    let registration = match Registered::new(ring.as_ref()) {
        Ok(registration) => Some(registration),
        Err(reason) => {
            log::warn!(
                "{name}: the NVRAM ring is not registered with SPDK ({reason}): writes to devices are copied into DMA buffers"
            );
            None
        }
    };
    let control = NodeControl::new().map_err(|e| internal(format!("node mailbox: {e}")))?;
    let inbox = Inbox::default();
    let mut exported = Vec::new();
    let running = match config.role {
        Role::Source => {
            let (source, primaries, metadata_device) =
                setup::open_source_on(&config, ring).map_err(internal)?;
            let peer = config.peer.expect("validated: a source has a peer");
            let front_inbox = inbox.clone();
            let node = SourceNode::new(
                Arc::new(SockTransport),
                source,
                primaries,
                metadata_device,
                peer,
                Box::new(move |_| Ok(BdevFrontEnd::new(front_inbox))),
                control.clone(),
            );
            let count = config.namespaces.len() as u32;
            for nsid in 1..=count {
                let info = node.volume.namespace(nsid).expect("an opened namespace");
                let spec = BdevSpec {
                    name: if count == 1 {
                        name.clone()
                    } else {
                        format!("{name}n{nsid}")
                    },
                    nsid,
                    size_bytes: info.size_bytes,
                    uuid: info.uuid,
                    write_cache: config.volatile_write_cache(),
                };
                match vbdev::export(&spec, &inbox) {
                    Ok(bdev) => exported.push(bdev),
                    Err(reason) => {
                        exported.into_iter().for_each(ExportedBdev::unregister);
                        return Err(internal(reason));
                    }
                }
            }
            Running::Source(
                RunningNode::start(&format!("nvmirror_{name}"), node, control).map_err(internal)?,
            )
        }
        Role::Destination => {
            let (destination, mirrors, metadata_device) =
                setup::open_destination_on(&config, ring).map_err(internal)?;
            let listen = config.listen.expect("validated: a destination listens");
            let node = DestinationNode::new(
                Arc::new(SockTransport),
                destination,
                mirrors,
                metadata_device,
                listen,
                control.clone(),
            )
            .map_err(|e| internal(e.to_string()))?;
            Running::Destination(
                RunningNode::start(&format!("nvmirror_{name}"), node, control).map_err(internal)?,
            )
        }
    };
    log::info!(
        "{name}: {} of volume {} on {}{}",
        running.role(),
        config.volume,
        bdev_names(&config).join(", "),
        if exported.is_empty() {
            String::new()
        } else {
            format!(
                "; exports {}",
                exported
                    .iter()
                    .map(|b| b.name().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    Ok(Volume {
        name,
        config,
        params,
        running,
        exported,
        inbox,
        _registration: registration,
    })
}

fn bdev_names(config: &Config) -> Vec<String> {
    config
        .namespaces
        .iter()
        .filter_map(|namespace| match namespace {
            NamespaceConfig::Bdev { bdev } => Some(bdev.clone()),
            _ => None,
        })
        .collect()
}

/// Stops a volume's node and fails what still waits or comes; `unregister`: removes its bdevs
/// too (at shutdown SPDK's bdev layer does that after the nvmf target let go of them). `then`
/// runs once the node let go of its devices ([`RunningNode::stop`]), with the error to report
/// when it could not (its device ops never completed: the node is leaked and its base bdevs
/// stay claimed until the process ends).
fn remove(volume: Volume, unregister: bool, then: impl FnOnce(Result<(), String>) + 'static) {
    let Volume {
        name,
        config,
        running,
        exported,
        inbox,
        _registration: registration,
        ..
    } = volume;
    let label = name.clone();
    inbox.close();
    if unregister {
        for bdev in exported {
            bdev.unregister();
        }
    }
    RETIRING.with(|list| list.borrow_mut().push((name.clone(), config)));
    // The ring's DMA registration goes after the node (and its ring).
    let done = move |result: Result<(), String>| {
        match &result {
            Ok(()) => {
                drop(registration);
                log::info!("{name}: stopped");
            }
            // The leaked node's ring stays registered for DMA with it.
            Err(_) => std::mem::forget(registration),
        }
        RETIRING.with(|list| list.borrow_mut().retain(|(n, _)| *n != name));
        then(result);
    };
    match running {
        Running::Source(node) => node.stop(&label, RETIRE_TIMEOUT_US, done),
        Running::Destination(node) => node.stop(&label, RETIRE_TIMEOUT_US, done),
    }
}

/// How long a stopped node waits for its device ops before it is leaked rather than freed.
const RETIRE_TIMEOUT_US: u64 = 10_000_000;

thread_local! {
    /// The volumes whose stopped nodes wait for their device ops (shutdown waits for them; a
    /// create or discard on their name or metadata waits too).
    static RETIRING: RefCell<Vec<(String, Config)>> = const { RefCell::new(Vec::new()) };
}

/// A stopping volume's name that `matches` (its name and config).
fn retiring_where(matches: impl Fn(&str, &Config) -> bool) -> Option<String> {
    RETIRING.with(|list| first_where(&list.borrow(), |(name, config)| (name, config), matches))
}

/// Takes volume `name` out of the registry.
fn take_volume(name: &str) -> Result<Volume, (i32, String)> {
    let volume = VOLUMES.with(|volumes| {
        let mut volumes = volumes.borrow_mut();
        let index = volumes.iter().position(|volume| volume.name == name);
        index.map(|index| volumes.remove(index))
    });
    volume.ok_or_else(|| invalid(format!("no nvmirror volume '{name}'")))
}

/// `bdev_nvmirror_delete {name}`: answered once the volume's node let go of its bdevs (so a
/// create right after may claim them again).
fn delete(params: Option<Value>, responder: Responder) {
    let volume = (|| {
        let map = object(params, &["name"])?;
        let name = required_str(&map, "name")?;
        let waiting = PENDING.with(|list| {
            let mut list = list.borrow_mut();
            let index = list.iter().position(|p| p.name == name);
            index.map(|index| list.remove(index))
        });
        if waiting.is_some() {
            log::info!("{name}: deleted (it waited for its base bdevs)");
            return Ok(None);
        }
        take_volume(&name).map(Some)
    })();
    match volume {
        Ok(Some(volume)) => remove(volume, true, move |stopped| match stopped {
            Ok(()) => responder.ok(json!(true)),
            Err(message) => responder.error(INTERNAL_ERROR, &message),
        }),
        Ok(None) => responder.ok(json!(true)),
        Err((code, message)) => responder.error(code, &message),
    }
}

fn get_bdevs(params: Option<Value>) -> RpcResult {
    let map = object(params, &["name"])?;
    let only = map.get("name").and_then(Value::as_str).map(str::to_string);
    VOLUMES.with(|volumes| {
        let volumes = volumes.borrow();
        let mut out = Vec::new();
        for volume in volumes.iter() {
            if only.as_ref().is_some_and(|name| *name != volume.name) {
                continue;
            }
            let counters = volume.running.publish();
            let control = volume.running.control();
            let mut status = node_status_json(volume.running.role(), control, &counters);
            status["name"] = json!(volume.name);
            status["volume"] = json!(volume.config.volume);
            status["settled"] = json!(control.settled.load(Ordering::Acquire));
            status["state"] = json!("running");
            status["base_bdevs"] = json!(bdev_names(&volume.config));
            status["bdevs"] = json!(volume
                .exported
                .iter()
                .map(|bdev| bdev.name().to_string())
                .collect::<Vec<_>>());
            status["params"] = volume.params.clone();
            out.push(status);
        }
        PENDING.with(|list| {
            for pending in list.borrow().iter() {
                if only.as_ref().is_some_and(|name| *name != pending.name) {
                    continue;
                }
                out.push(json!({
                    "name": pending.name,
                    "volume": pending.config.volume,
                    "role": if pending.config.role == Role::Source { "source" } else { "destination" },
                    "settled": false,
                    "state": if pending.error.is_some() { "failed" } else { "waiting for base bdevs" },
                    "waiting_for": pending.missing(),
                    "error": pending.error,
                    "base_bdevs": bdev_names(&pending.config),
                    "bdevs": [],
                    "params": pending.params,
                }));
            }
        });
        if let Some(name) = only {
            if out.is_empty() {
                return Err(invalid(format!("no nvmirror volume '{name}'")));
            }
        }
        Ok(Value::Array(out))
    })
}

fn get_stats(params: Option<Value>) -> RpcResult {
    let map = object(params, &["name"])?;
    let name = required_str(&map, "name")?;
    with_volume(&name, |volume| {
        let counters = volume.running.publish();
        let fields: Value =
            serde_json::from_str(&counters.to_json()).map_err(|e| internal(e.to_string()))?;
        Ok(json!({"name": name, "role": volume.running.role(), "counters": fields}))
    })
}

fn send_to_source(volume: &Volume, command: Command) -> Result<(), (i32, String)> {
    match &volume.running {
        Running::Source(node) => {
            node.with(|n| n.handle_command(monotonic_us(), command));
            Ok(())
        }
        Running::Destination(_) => Err(invalid(format!(
            "'{}' is a destination: only a source takes this",
            volume.name
        ))),
    }
}

fn set_policy(params: Option<Value>) -> RpcResult {
    let map = object(params, &["name", "policy"])?;
    let name = required_str(&map, "name")?;
    let policy = match required_str(&map, "policy")?.as_str() {
        "suspend" => PeerLossPolicy::Suspend,
        "fail" => PeerLossPolicy::Fail,
        "degrade" => PeerLossPolicy::Degrade,
        other => {
            return Err(invalid(format!(
                "policy '{other}': one of suspend, fail, degrade"
            )))
        }
    };
    with_volume(&name, |volume| {
        send_to_source(volume, Command::SetPeerLossPolicy(policy))
    })?;
    Ok(json!({"policy": policy.name()}))
}

fn attach(params: Option<Value>) -> RpcResult {
    let map = object(params, &["name", "peer"])?;
    let name = required_str(&map, "name")?;
    let peer: std::net::SocketAddr = required_str(&map, "peer")?
        .parse()
        .map_err(|_| invalid("'peer' is not an address like 127.0.0.1:4800"))?;
    with_volume(&name, |volume| {
        send_to_source(volume, Command::Attach(peer))
    })?;
    Ok(json!({"peer": peer.to_string()}))
}

/// `nvmirror_cp {name, wait, timeout_ms}`: starts a CP; with `wait`, answers once every write
/// completed before the request is durable on both sides.
fn cp(params: Option<Value>, responder: Responder) {
    let started = (|| {
        let map = object(params, &["name", "wait", "timeout_ms"])?;
        let name = required_str(&map, "name")?;
        let wait = map.get("wait").and_then(Value::as_bool).unwrap_or(false);
        let timeout_ms = map
            .get("timeout_ms")
            .and_then(Value::as_u64)
            .unwrap_or(CP_WAIT_TIMEOUT_MS_DEFAULT);
        let control = with_volume(&name, |volume| {
            send_to_source(volume, Command::RequestCp)?;
            Ok(volume.running.control().clone())
        })?;
        Ok::<_, (i32, String)>((wait, timeout_ms, control))
    })();
    let (wait, timeout_ms, control) = match started {
        Ok(started) => started,
        Err((code, message)) => return responder.error(code, &message),
    };
    let needed = control.cp_requested_number.load(Ordering::Acquire);
    if !wait {
        return responder.ok(json!({"requested": true, "cp_number": needed}));
    }
    let deadline = monotonic_us() + timeout_ms * 1000;
    let mut responder = Some(responder);
    let registered = nvmirror_spdk::thread::poll_until(move || {
        let durable = control.cp_durable_number.load(Ordering::Acquire);
        if durable >= needed {
            responder
                .take()
                .expect("answered once")
                .ok(json!({"requested": true, "cp_number": durable}));
            return true;
        }
        if monotonic_us() >= deadline {
            responder.take().expect("answered once").error(
                INTERNAL_ERROR,
                &format!("no CP completed within {timeout_ms} ms (is the destination reachable?); the writes stay in the NVRAM ring"),
            );
            return true;
        }
        false
    });
    if let Err(reason) = registered {
        log::error!("nvmirror_cp: {reason}");
    }
}

/// `nvmirror_checksum {name}`: size and CRC32C of every namespace device of the volume.
fn checksum(params: Option<Value>, responder: Responder) {
    let bdevs = (|| {
        let map = object(params, &["name"])?;
        let name = required_str(&map, "name")?;
        with_volume(&name, |volume| {
            Ok((name.clone(), bdev_names(&volume.config)))
        })
    })();
    let (name, bdevs) = match bdevs {
        Ok(found) => found,
        Err((code, message)) => return responder.error(code, &message),
    };
    next_checksum(name, bdevs, Vec::new(), responder);
}

fn next_checksum(name: String, mut bdevs: Vec<String>, mut done: Vec<Value>, responder: Responder) {
    if bdevs.is_empty() {
        return responder.ok(json!({"name": name, "namespaces": done}));
    }
    let bdev = bdevs.remove(0);
    let nsid = done.len() + 1;
    let responder = RefCell::new(Some(responder));
    let reading = bdev.clone();
    let started = nvmirror_spdk::bdev::checksum(&reading, move |result| {
        let responder = responder.borrow_mut().take().expect("once");
        match result {
            Ok((bytes, crc)) => {
                done.push(json!({"nsid": nsid, "bdev": bdev, "bytes": bytes, "crc32c": format!("{crc:08x}")}));
                next_checksum(name, bdevs, done, responder);
            }
            Err(reason) => responder.error(INTERNAL_ERROR, &reason),
        }
    });
    if let Err(reason) = started {
        log::error!("nvmirror_checksum: {reason}");
    }
}

/// At shutdown: sources take a last CP (at most [`SHUTDOWN_CP_TIMEOUT_US`]), then every volume
/// is removed and SPDK's subsystems finish.
fn shutdown(end: Box<dyn FnOnce()>) {
    let sources: Vec<Arc<NodeControl>> = VOLUMES.with(|volumes| {
        volumes
            .borrow()
            .iter()
            .filter_map(|volume| match &volume.running {
                Running::Source(node) => {
                    node.with(|n| n.handle_command(monotonic_us(), Command::Finish));
                    Some(node.control.clone())
                }
                Running::Destination(_) => None,
            })
            .collect()
    });
    log::info!(
        "nvmirror: stopping; {} source(s) take a last CP",
        sources.len()
    );
    let deadline = monotonic_us() + SHUTDOWN_CP_TIMEOUT_US;
    let mut end = Some(end);
    let mut removed = false;
    let finish = move || {
        if !removed {
            let synced = sources
                .iter()
                .all(|control| control.synced.load(Ordering::Acquire));
            if !synced && monotonic_us() < deadline {
                return false;
            }
            if !synced {
                log::warn!(
                    "nvmirror: no last CP within {} s: unsynced writes stay in the NVRAM ring and are resent at the next start",
                    SHUTDOWN_CP_TIMEOUT_US / 1_000_000
                );
            }
            PENDING.with(|list| list.borrow_mut().clear());
            let volumes = VOLUMES.with(|volumes| std::mem::take(&mut *volumes.borrow_mut()));
            volumes
                .into_iter()
                .for_each(|volume| remove(volume, false, |_| {}));
            removed = true;
        }
        // Their nodes go once their device ops completed (RETIRE_TIMEOUT_US at most).
        if RETIRING.with(|list| !list.borrow().is_empty()) {
            return false;
        }
        // The waiter poller (running this) and the nodes' poller go once this call returns:
        // SPDK's app thread exits only when its pollers are gone.
        if let Some(thread) = nvmirror_spdk::thread::Thread::current() {
            if let Err(reason) = nvmirror_spdk::thread::send(thread, || {
                nvmirror_spdk::thread::stop_waiting();
                nvmirror_spdk::runner::stop_polling();
            }) {
                log::warn!("nvmirror: {reason}");
            }
        }
        (end.take().expect("once"))();
        true
    };
    if let Err(reason) = nvmirror_spdk::thread::poll_until(finish) {
        log::error!("nvmirror: {reason}; stopping at once");
    }
}

/// `nvmirror_promote {name, peer}`: failover of a destination whose source is lost. Its node
/// stops taking the source, replays the log entries newer than its last CP onto its mirror,
/// takes a new generation (durable before the log records the replay, so the stale former
/// source is refused if it comes back) and serves the volume as its source: it exports its
/// bdev(s) under the volume's name and replicates to `peer` (default: the config's
/// `promote_peer`), under the `degrade` policy unless the config says otherwise, so writes go
/// on while no destination is attached. The answer comes once the new source serves.
fn promote(params: Option<Value>, responder: Responder) {
    let prepared = (|| {
        let map = object(params, &["name", "peer"])?;
        let name = required_str(&map, "name")?;
        let volume = take_volume(&name)?;
        let peer = match map.get("peer").and_then(Value::as_str) {
            Some(peer) => Some(
                peer.parse()
                    .map_err(|_| invalid("'peer' is not an address like 127.0.0.1:4800")),
            ),
            None => volume.config.promote_peer.map(Ok),
        };
        let give_back = |volume: Volume, error: (i32, String)| {
            VOLUMES.with(|volumes| volumes.borrow_mut().push(volume));
            Err(error)
        };
        if volume.running.role() != "destination" {
            return give_back(volume, invalid(format!("'{name}' is a source already")));
        }
        // Refused while it runs, so the destination is not even interrupted (the engine
        // refuses it again below, should a resync begin in between).
        volume.running.publish();
        let generations = *volume.running.control().generations.lock().unwrap();
        if generations.is_some_and(|g| g.flags & FLAG_RESYNC_TARGET != 0) {
            return give_back(
                volume,
                invalid(format!(
                    "'{name}' is being resynced from its source: its mirror is not a consistent image, so it is not promoted; it goes on as a destination"
                )),
            );
        }
        let peer: std::net::SocketAddr = match peer {
            Some(Ok(peer)) => peer,
            Some(Err(error)) => return give_back(volume, error),
            None => {
                return give_back(
                    volume,
                    invalid("'peer' (where the new destination will listen) is required: no promote_peer in the config"),
                )
            }
        };
        Ok((name, volume, peer))
    })();
    let (name, volume, peer) = match prepared {
        Ok(prepared) => prepared,
        Err((code, message)) => return responder.error(code, &message),
    };
    let config = volume.config.clone();
    let destination_params = volume.params.clone();
    // The destination's devices, metadata file and ring are reopened once its node let go.
    remove(volume, false, move |stopped| match stopped {
        Ok(()) => promote_stopped(name, config, destination_params, peer, responder),
        Err(message) => responder.error(
            INTERNAL_ERROR,
            &format!("not promoted: the destination's devices cannot be reopened: {message}"),
        ),
    });
}

/// The rest of `nvmirror_promote`, once the destination's node stopped and was dropped.
fn promote_stopped(
    name: String,
    config: Config,
    destination_params: Value,
    peer: std::net::SocketAddr,
    responder: Responder,
) {
    let mut params = destination_params.clone();
    let source_config = Config {
        role: Role::Source,
        listen: None,
        peer: Some(peer),
        promote_peer: None,
        peer_loss_policy: Some(
            config
                .peer_loss_policy
                .unwrap_or(crate::config::PeerLossPolicyConfig::Degrade),
        ),
        ..config.clone()
    };
    params["role"] = json!("source");
    params["peer"] = json!(peer.to_string());
    if let Some(map) = params.as_object_mut() {
        map.remove("listen");
        map.remove("promote_peer");
    }
    let started = (|| {
        let (destination, mirrors, metadata_device) =
            setup::open_destination(&config).map_err(internal)?;
        let generation = nvmirror_runtime::metadata_file::random_nonzero_u64()
            .map_err(|e| internal(format!("promote: random generation: {e}")))?;
        let promotion = destination
            .promote(generation)
            .map_err(|e| internal(format!("promote: {e}")))?;
        Ok::<_, (i32, String)>((promotion, mirrors, metadata_device))
    })();
    let (promotion, mut mirrors, metadata_device) = match started {
        Ok(started) => started,
        Err((code, message)) => {
            // Nothing changed on disk (the generation is taken only by a promotion that
            // starts): the node goes on as the destination it was.
            let message = match start_volume(name.clone(), config.clone(), destination_params) {
                Ok(volume) => {
                    VOLUMES.with(|volumes| volumes.borrow_mut().push(volume));
                    format!("{message}; it goes on as a destination")
                }
                Err((_, restart)) => format!(
                    "{message}; and it could not start again as a destination ({restart}): create it again"
                ),
            };
            log::error!("{name}: promotion refused: {message}");
            return responder.error(code, &message);
        }
    };
    let mut responder = Some(responder);
    let mut slot = Some(promotion);
    let mut metadata_slot = Some(metadata_device);
    let done = move || {
        use nvmirror_engine::device::BlockDevice;
        let promotion = slot.as_mut().expect("polled until finished");
        while let Some(op) = promotion.poll_device_op() {
            mirrors[op.nsid as usize - 1].submit(op);
        }
        let metadata_device = metadata_slot.as_mut().expect("polled until finished");
        while let Some(op) = promotion.poll_metadata_op() {
            metadata_device.submit(op);
        }
        for mirror in mirrors.iter_mut() {
            mirror.poll_completions(&mut |c| promotion.handle_device_completion(c));
        }
        metadata_device.poll_completions(&mut |c| promotion.handle_metadata_completion(c));
        if !promotion.is_done() {
            return false;
        }
        let responder = responder.take().expect("answered once");
        // The devices, the metadata file and the ring go before the source opens them again.
        mirrors.clear();
        metadata_slot.take();
        let finished = slot.take().expect("finished once").finish();
        let report = match finished {
            Ok((report, _ring, _metadata)) => report,
            Err(e) => {
                responder.error(INTERNAL_ERROR, &format!("promote: {e}"));
                return true;
            }
        };
        log::info!(
            "{name}: promoted: {} log entries ({} bytes) newer than CP {} replayed onto the mirror; generation is now {} (was {})",
            report.entries_replayed,
            report.bytes_replayed,
            report.cp_completed,
            nvmirror_engine::generation::Hex(report.generation),
            nvmirror_engine::generation::Hex(report.previous_generation)
        );
        match start_volume(name.clone(), source_config.clone(), params.clone()) {
            Ok(volume) => {
                // The operator's decision: this node is the pair's authority now.
                if let Running::Source(node) = &volume.running {
                    node.with(|n| n.handle_command(monotonic_us(), Command::Settle));
                }
                let bdevs: Vec<String> = volume
                    .exported
                    .iter()
                    .map(|b| b.name().to_string())
                    .collect();
                VOLUMES.with(|volumes| volumes.borrow_mut().push(volume));
                responder.ok(json!({
                    "name": name, "role": "source", "bdevs": bdevs,
                    "generation": nvmirror_engine::generation::Hex(report.generation).to_string(),
                    "entries_replayed": report.entries_replayed,
                    "peer": peer.to_string(),
                }));
            }
            Err((code, message)) => responder.error(
                code,
                &format!("promoted, but the source did not start: {message}"),
            ),
        }
        true
    };
    if let Err(reason) = nvmirror_spdk::thread::poll_until(done) {
        log::error!("nvmirror_promote: {reason}");
    }
}
