//! The configuration file (TOML) and its checks.
//!
//! Every value is checked at start; a bad one stops the process with an error that names the key
//! and the reason. With no file, [`Config::embedded_default`] describes the local pair the README
//! starts: a source and a destination on loopback with malloc namespaces.

use std::net::SocketAddr;
use std::path::PathBuf;

use nvmirror_engine::PeerLossPolicy;
use nvmirror_runtime::bdev::{FaultAction, FaultOps, FaultRule};
use nvmirror_runtime::ring_memory::RingMedium;
use serde::Deserialize;

/// Smallest ring: two halves of 2 MiB hugepages each.
pub const RING_MIB_MIN: u64 = 4;
/// Largest ring (it lives in hugepage memory).
pub const RING_MIB_MAX: u64 = 16 * 1024;
pub const RING_MIB_DEFAULT: u64 = 64;
pub const CP_INTERVAL_MS_DEFAULT: u64 = 10_000;
/// Where management sockets go by default (SPDK's is `/var/tmp/spdk.sock`).
pub const RPC_SOCKET_DIR: &str = "/var/tmp";
/// The embedded default's management socket.
pub const RPC_SOCKET_EMBEDDED: &str = "/var/tmp/nvmirror.sock";
/// `sun_path` holds 108 bytes with its terminating zero.
pub const RPC_SOCKET_PATH_BYTES_MAX: usize = 107;
/// `peer_timeout_ms`: silence (no heartbeat, no ack) for this long means the peer is lost.
pub const PEER_TIMEOUT_MS_DEFAULT: u64 = nvmirror_engine::PEER_TIMEOUT_US_DEFAULT / 1000;
/// Below this a busy reactor or a scheduling hiccup (heartbeats go every quarter of it) would
/// look like a lost peer.
pub const PEER_TIMEOUT_MS_MIN: u64 = 200;
/// Above this a lost peer holds host writes longer than any host's I/O timeout (Linux: 30 s).
pub const PEER_TIMEOUT_MS_MAX: u64 = 60_000;
const _: () = assert!(
    PEER_TIMEOUT_MS_MIN <= PEER_TIMEOUT_MS_DEFAULT
        && PEER_TIMEOUT_MS_DEFAULT <= PEER_TIMEOUT_MS_MAX
);
pub use nvmirror_engine::source::{DEVICE_QUEUE_DEPTH_DEFAULT, DEVICE_QUEUE_DEPTH_MAX};

fn default_device_queue_depth() -> u32 {
    DEVICE_QUEUE_DEPTH_DEFAULT
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Destination,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpModeConfig {
    /// Wholly overwritten blocks travel as references at CP time (the patent's method).
    References,
    /// Every dirty block travels as data at CP time (for comparison).
    Naive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleConfig {
    /// Spin forever: lowest latency, a whole core per reactor.
    Busy,
    /// Spin briefly, then sleep on the sockets: lets processes share cores.
    Adaptive,
}

/// `ring_medium`: what the NVRAM ring lives on, and so what an acknowledged or flushed write
/// survives (the README's table). Absent: hugetlbfs in `hugepage_dir` when hugepages are free,
/// else a regular file in `fallback_dir` with a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RingMediumConfig {
    /// A file on the hugetlbfs mount `hugepage_dir`; refused at start if it is not one or has too
    /// few free pages. Survives a process crash, not a reboot.
    Hugetlbfs,
    /// A regular file in `ring_dir` (default `fallback_dir`), msync'ed where a Flush needs it.
    File,
    /// A file in `ring_dir` on a file system mounted `-o dax` over persistent memory, mapped with
    /// `MAP_SYNC` (refused at start if the mapping is not possible); cache lines flushed.
    Dax,
}

impl RingMediumConfig {
    pub fn medium(self) -> RingMedium {
        match self {
            RingMediumConfig::Hugetlbfs => RingMedium::Hugetlbfs,
            RingMediumConfig::File => RingMedium::File,
            RingMediumConfig::Dax => RingMedium::Dax,
        }
    }
}

/// `peer_loss_policy`: what a source does with host writes while its destination is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerLossPolicyConfig {
    /// Writes are held until the destination returns (the default).
    Suspend,
    /// Writes fail with a path error once the destination is lost; reads are served.
    Fail,
    /// Writes continue on the source alone, their extents marked in the persistent bitmap; the
    /// destination is resynced when it returns.
    Degrade,
}

impl PeerLossPolicyConfig {
    /// The engine's policy.
    pub fn policy(self) -> PeerLossPolicy {
        match self {
            PeerLossPolicyConfig::Suspend => PeerLossPolicy::Suspend,
            PeerLossPolicyConfig::Fail => PeerLossPolicy::Fail,
            PeerLossPolicyConfig::Degrade => PeerLossPolicy::Degrade,
        }
    }
}

/// Whether the engine persists each ring entry (`RingMemory::persist`) before it acknowledges the
/// write. Not yet: the engine's append path has no such hook, so a Flush always has work to do.
pub const ENTRIES_PERSISTED_BEFORE_ACK: bool = false;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum NamespaceConfig {
    /// Memory (hugepage-backed where possible); contents vanish with the process.
    Malloc { size_mib: u64 },
    /// A file or block device; created with `size_mib` when missing.
    File {
        path: PathBuf,
        size_mib: Option<u64>,
    },
    /// `base` (a malloc or file namespace) with the `[[namespace.fault]]` rules applied to its
    /// ops: for tests and benches of a slow, failing or corrupting device.
    Faulty {
        base: Box<NamespaceConfig>,
        #[serde(default, rename = "fault")]
        faults: Vec<FaultConfig>,
    },
    /// An SPDK bdev (malloc, NVMe, AIO, ...) by name: only in the SPDK runtime (`nvmirror spdk`,
    /// built with `--features spdk`), where `bdev_nvmirror_create` opens and claims it.
    Bdev { bdev: String },
}

/// `op` of a `[[namespace.fault]]`: which op kinds the rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultOpConfig {
    Read,
    /// Writes and write-zeroes.
    Write,
    Flush,
    All,
}

/// `action` of a `[[namespace.fault]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultActionConfig {
    /// Complete with EIO without performing the op.
    Fail,
    /// Hold the completion back `delay_us` after submission.
    Delay,
    /// Flip a byte of a read's data.
    Corrupt,
}

/// `[[namespace.fault]]`: one fault rule of a `kind = "faulty"` namespace (see
/// [`nvmirror_runtime::bdev::FaultRule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    pub op: FaultOpConfig,
    pub action: FaultActionConfig,
    /// Required by `action = "delay"`, refused by the others.
    pub delay_us: Option<u64>,
    #[serde(default = "default_every")]
    pub every: u64,
    pub lba_min: Option<u64>,
    pub lba_max: Option<u64>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
}

fn default_every() -> u64 {
    1
}

impl FaultConfig {
    /// The runtime's rule; the error is (field, reason).
    pub fn rule(&self) -> Result<FaultRule, (&'static str, String)> {
        let action = match (self.action, self.delay_us) {
            (FaultActionConfig::Delay, Some(delay_us)) => FaultAction::Delay { delay_us },
            (FaultActionConfig::Delay, None) => {
                return Err(("delay_us", "action = \"delay\" needs delay_us".into()))
            }
            (_, Some(_)) => {
                return Err(("delay_us", "only action = \"delay\" takes delay_us".into()))
            }
            (FaultActionConfig::Fail, None) => FaultAction::Fail,
            (FaultActionConfig::Corrupt, None) => FaultAction::Corrupt,
        };
        let ops = match self.op {
            FaultOpConfig::Read => FaultOps::Read,
            FaultOpConfig::Write => FaultOps::Write,
            FaultOpConfig::Flush => FaultOps::Flush,
            FaultOpConfig::All => FaultOps::All,
        };
        let rule = FaultRule {
            ops,
            action,
            every: self.every,
            lba_min: self.lba_min,
            lba_max: self.lba_max,
            from_ms: self.from_ms,
            to_ms: self.to_ms,
        };
        rule.check()?;
        Ok(rule)
    }
}

impl NamespaceConfig {
    /// Checks one namespace; errors name keys under `key` (`namespace[0]`).
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        match self {
            NamespaceConfig::Malloc { size_mib } if *size_mib == 0 => {
                Err(bad(format!("{key}.size_mib"), "must be at least 1"))
            }
            NamespaceConfig::Malloc { .. } => Ok(()),
            NamespaceConfig::File { path, size_mib } => {
                if path.as_os_str().is_empty() {
                    return Err(bad(format!("{key}.path"), "must not be empty"));
                }
                if *size_mib == Some(0) {
                    return Err(bad(format!("{key}.size_mib"), "must be at least 1"));
                }
                Ok(())
            }
            NamespaceConfig::Bdev { bdev } if bdev.is_empty() => {
                Err(bad(format!("{key}.bdev"), "must name an SPDK bdev"))
            }
            NamespaceConfig::Bdev { .. } => Ok(()),
            NamespaceConfig::Faulty { base, faults } => {
                if matches!(
                    **base,
                    NamespaceConfig::Faulty { .. } | NamespaceConfig::Bdev { .. }
                ) {
                    return Err(bad(
                        format!("{key}.base"),
                        "must be a malloc or file namespace",
                    ));
                }
                base.validate(&format!("{key}.base"))?;
                for (index, fault) in faults.iter().enumerate() {
                    fault.rule().map_err(|(field, reason)| {
                        bad(format!("{key}.fault[{index}].{field}"), reason)
                    })?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub role: Role,
    /// Names the replicated volume; both sides must agree (the handshake checks its id).
    #[serde(default = "default_volume")]
    pub volume: String,
    /// Destination: where it accepts the source. Source: unused.
    pub listen: Option<SocketAddr>,
    /// Source: the destination's replication address.
    pub peer: Option<SocketAddr>,
    /// Where the NVRAM ring file lives (a hugetlbfs mount).
    #[serde(default = "default_hugepage_dir")]
    pub hugepage_dir: PathBuf,
    /// Where the ring goes when no hugepages are free (a regular file: survives a crash, not a power loss).
    #[serde(default = "default_fallback_dir")]
    pub fallback_dir: PathBuf,
    /// What the ring lives on; absent: hugetlbfs when pages are free, else a regular file.
    #[serde(default)]
    pub ring_medium: Option<RingMediumConfig>,
    /// The directory of a `file` ring (default `fallback_dir`) or a `dax` ring (required).
    pub ring_dir: Option<PathBuf>,
    #[serde(default = "default_ring_mib")]
    pub ring_size_mib: u64,
    /// Cores for this node's reactors; the first one runs the replication engine.
    #[serde(default = "default_cores")]
    pub cores: Vec<usize>,
    #[serde(default = "default_idle")]
    pub idle: IdleConfig,
    #[serde(default = "default_cp_interval")]
    pub cp_interval_ms: u64,
    #[serde(default = "default_cp_mode")]
    pub cp_mode: CpModeConfig,
    /// Device operations in flight per namespace at most (primary or mirror).
    #[serde(default = "default_device_queue_depth")]
    pub device_queue_depth: u32,
    /// Both roles: the peer is lost after this long without a word from it (heartbeats go every
    /// quarter of it). Configure both sides alike.
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout_ms: u64,
    /// Source only: what host writes do while the destination is lost (default `suspend`).
    pub peer_loss_policy: Option<PeerLossPolicyConfig>,
    /// Source only: a resync sends at most this many MiB/s (0: as fast as it goes).
    #[serde(default)]
    pub resync_rate_mib_s: u64,
    /// The node's metadata file (generations, dirty bitmap): on the node's own persistent
    /// storage, never on hugetlbfs. Default: `nvmirror-<volume>.meta` in `ring_dir`, else in
    /// `fallback_dir`. The same file whatever the role, so a promoted destination restarted as
    /// a source keeps its generations.
    pub metadata_path: Option<PathBuf>,
    /// Both devices are known identical (freshly zeroed): a pair that shares no history starts
    /// without a full sync. Needed on both sides; applied once per metadata file.
    #[serde(default)]
    pub assume_identical: bool,
    /// Bytes per bit of the dirty bitmap (a power of two; used when the metadata is formatted).
    #[serde(default = "default_bitmap_extent_bytes")]
    pub bitmap_extent_bytes: u64,
    #[serde(rename = "namespace")]
    pub namespaces: Vec<NamespaceConfig>,
    /// Source only: the NVMe/TCP target exporting the replicated namespaces to hosts.
    pub target: Option<TargetSection>,
    /// The JSON-RPC management socket (default [`Config::rpc_socket_default`]).
    pub rpc_socket: Option<PathBuf>,
    /// Destination only: the address its own destination will listen on once this node is
    /// promoted online (`nvmirror promote` on the running process): the old source, attached
    /// as the new destination. With a `[target]` section, which a destination serves only once
    /// promoted.
    pub promote_peer: Option<SocketAddr>,
}

/// `[target]`: listeners and subsystems of the embedded NVMe/TCP target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    #[serde(default = "default_target_listen")]
    pub listen: Vec<SocketAddr>,
    /// Extra listeners that serve only the discovery subsystem (every listener serves it too).
    #[serde(default = "default_discovery_listen")]
    pub discovery_listen: Vec<SocketAddr>,
    #[serde(default = "default_in_capsule")]
    pub in_capsule_data_bytes: u32,
    #[serde(default = "default_queue_depth")]
    pub queue_depth_max: u16,
    #[serde(default = "default_io_queues")]
    pub io_queues_max: u16,
    #[serde(default = "default_kato")]
    pub keep_alive_timeout_ms: u32,
    #[serde(rename = "subsystem")]
    pub subsystems: Vec<SubsystemSection>,
}

/// `[[target.subsystem]]`: one NVMe subsystem and the namespaces it exports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemSection {
    pub nqn: String,
    #[serde(default = "default_serial")]
    pub serial: String,
    #[serde(default = "default_model")]
    pub model: String,
    /// Host NQNs allowed to connect; empty with `allow_any_host = true` lets everyone in.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub allow_any_host: bool,
    /// Namespace numbers (1-based, in `[[namespace]]` order) this subsystem exports.
    pub namespaces: Vec<u32>,
}

pub const NQN_DEFAULT: &str = "nqn.2026-11.io.nvmirror:vol0";

fn default_target_listen() -> Vec<SocketAddr> {
    vec!["127.0.0.1:4420".parse().expect("literal address")]
}
fn default_discovery_listen() -> Vec<SocketAddr> {
    vec!["127.0.0.1:8009".parse().expect("literal address")]
}
fn default_in_capsule() -> u32 {
    8192
}
fn default_queue_depth() -> u16 {
    128
}
fn default_io_queues() -> u16 {
    16
}
fn default_kato() -> u32 {
    120_000
}
fn default_serial() -> String {
    "NVMIRROR00000001".into()
}
fn default_model() -> String {
    "nvmirror replicated volume".into()
}

impl TargetSection {
    /// The default target: one subsystem exporting every namespace to any host on 127.0.0.1:4420.
    pub fn embedded_default(namespace_count: usize) -> TargetSection {
        TargetSection {
            listen: default_target_listen(),
            discovery_listen: default_discovery_listen(),
            in_capsule_data_bytes: default_in_capsule(),
            queue_depth_max: default_queue_depth(),
            io_queues_max: default_io_queues(),
            keep_alive_timeout_ms: default_kato(),
            subsystems: vec![SubsystemSection {
                nqn: NQN_DEFAULT.into(),
                serial: default_serial(),
                model: default_model(),
                hosts: Vec::new(),
                allow_any_host: true,
                namespaces: (1..=namespace_count as u32).collect(),
            }],
        }
    }

    /// The target's own configuration, checked by the target crate (its error names the field).
    pub fn to_target_config(
        &self,
        namespace_count: usize,
    ) -> Result<nvmirror_nvmf::TargetConfig, ConfigError> {
        for (index, subsystem) in self.subsystems.iter().enumerate() {
            if let Some(nsid) = subsystem
                .namespaces
                .iter()
                .find(|n| **n == 0 || **n as usize > namespace_count)
            {
                return Err(bad(
                    format!("target.subsystem[{index}].namespaces"),
                    format!("namespace {nsid} does not exist (there are {namespace_count})"),
                ));
            }
        }
        let config = nvmirror_nvmf::TargetConfig {
            subsystems: self
                .subsystems
                .iter()
                .map(|s| nvmirror_nvmf::SubsystemConfig {
                    nqn: s.nqn.clone(),
                    serial: s.serial.clone(),
                    model: s.model.clone(),
                    allow_any_host: s.allow_any_host,
                    allowed_hosts: s.hosts.clone(),
                    namespaces: s.namespaces.clone(),
                })
                .collect(),
            listeners: self.listen.clone(),
            discovery_listeners: self.discovery_listen.clone(),
            in_capsule_data_bytes: self.in_capsule_data_bytes,
            queue_depth_max: self.queue_depth_max,
            io_queues_max: self.io_queues_max,
            keep_alive_timeout_ms_default: self.keep_alive_timeout_ms,
            recv_budget_pdus: nvmirror_nvmf::config::RECV_BUDGET_PDUS_DEFAULT,
            volatile_write_cache: nvmirror_nvmf::config::VOLATILE_WRITE_CACHE_DEFAULT,
            data_timeout_ms: nvmirror_nvmf::config::DATA_TIMEOUT_MS_DEFAULT,
        };
        config.validate().map_err(|reason| {
            let (field, why) = reason.split_once(':').unwrap_or(("", reason.as_str()));
            bad(format!("target.{}", field.trim()), why.trim().to_string())
        })?;
        Ok(config)
    }
}

fn default_bitmap_extent_bytes() -> u64 {
    nvmirror_engine::metadata::BITMAP_EXTENT_BYTES_DEFAULT
}

fn default_volume() -> String {
    "vol0".into()
}
fn default_hugepage_dir() -> PathBuf {
    "/dev/hugepages".into()
}
fn default_fallback_dir() -> PathBuf {
    std::env::temp_dir().join("nvmirror")
}
fn default_ring_mib() -> u64 {
    RING_MIB_DEFAULT
}
fn default_cores() -> Vec<usize> {
    vec![0]
}
fn default_idle() -> IdleConfig {
    IdleConfig::Adaptive
}
fn default_cp_interval() -> u64 {
    CP_INTERVAL_MS_DEFAULT
}
fn default_peer_timeout() -> u64 {
    PEER_TIMEOUT_MS_DEFAULT
}
fn default_cp_mode() -> CpModeConfig {
    CpModeConfig::References
}

/// A configuration error: the key and why it is wrong.
#[derive(Debug)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "config key '{}': {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// Parses and checks a configuration file's text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // Values inside a tagged table (a namespace) come without a useful span: find the
            // word the message quotes instead.
            let key = e
                .span()
                .map(|span| key_at(text, span.start))
                .filter(|key| key != "(file)")
                .or_else(|| quoted_offset(text, e.message()).map(|at| key_at(text, at)))
                .unwrap_or_else(|| "(file)".into());
            bad(key, e.message().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("(file)", format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.volume.is_empty() || self.volume.len() > 64 {
            return Err(bad("volume", "must be 1 to 64 characters"));
        }
        if self.volume.contains('/') {
            return Err(bad("volume", "must not contain '/' (it names files)"));
        }
        if self
            .rpc_socket
            .as_ref()
            .is_some_and(|path| path.as_os_str().len() > RPC_SOCKET_PATH_BYTES_MAX)
        {
            return Err(bad(
                "rpc_socket",
                format!("a Unix socket path has at most {RPC_SOCKET_PATH_BYTES_MAX} bytes"),
            ));
        }
        match self.role {
            Role::Source if self.peer.is_none() => {
                return Err(bad(
                    "peer",
                    "a source needs the destination's address (e.g. \"127.0.0.1:4800\")",
                ))
            }
            Role::Destination if self.listen.is_none() => {
                return Err(bad(
                    "listen",
                    "a destination needs an address to accept the source on",
                ))
            }
            _ => {}
        }
        if !(RING_MIB_MIN..=RING_MIB_MAX).contains(&self.ring_size_mib)
            || !self.ring_size_mib.is_multiple_of(2)
        {
            return Err(bad(
                "ring_size_mib",
                format!("must be an even number of MiB from {RING_MIB_MIN} to {RING_MIB_MAX} (2 MiB hugepages), got {}", self.ring_size_mib),
            ));
        }
        self.validate_ring_medium()?;
        if self.cores.is_empty() {
            return Err(bad("cores", "needs at least one core"));
        }
        crate::cores::CpuSet::of_this_process()
            .check_and_warn("cores", &self.cores)
            .map_err(|reason| bad("cores", reason))?;
        if self.cp_interval_ms == 0 || self.cp_interval_ms > 3_600_000 {
            return Err(bad("cp_interval_ms", "must be from 1 ms to one hour"));
        }
        if !(PEER_TIMEOUT_MS_MIN..=PEER_TIMEOUT_MS_MAX).contains(&self.peer_timeout_ms) {
            return Err(bad(
                "peer_timeout_ms",
                format!(
                    "must be from {PEER_TIMEOUT_MS_MIN} to {PEER_TIMEOUT_MS_MAX} ms, got {}",
                    self.peer_timeout_ms
                ),
            ));
        }
        if self.peer_loss_policy.is_some() && self.role == Role::Destination {
            return Err(bad(
                "peer_loss_policy",
                "only a source has a peer-loss policy (its host writes wait for the destination)",
            ));
        }
        if !(1..=DEVICE_QUEUE_DEPTH_MAX).contains(&self.device_queue_depth) {
            return Err(bad(
                "device_queue_depth",
                format!("must be from 1 to {DEVICE_QUEUE_DEPTH_MAX}"),
            ));
        }
        if self.namespaces.is_empty() {
            return Err(bad("namespace", "at least one [[namespace]] is needed"));
        }
        nvmirror_engine::metadata::check_extent_bytes(self.bitmap_extent_bytes)
            .map_err(|reason| bad("bitmap_extent_bytes", reason))?;
        if self
            .metadata_path
            .as_ref()
            .is_some_and(|path| path.as_os_str().is_empty() || path.ends_with("/"))
        {
            return Err(bad("metadata_path", "must name a file"));
        }
        if let Some(target) = &self.target {
            // A destination's target serves hosts only once it is promoted online.
            target.to_target_config(self.namespaces.len())?;
        }
        if self.promote_peer.is_some() && self.role == Role::Source {
            return Err(bad(
                "promote_peer",
                "only a destination is promoted (a source's destination is 'peer')",
            ));
        }
        for (index, namespace) in self.namespaces.iter().enumerate() {
            namespace.validate(&format!("namespace[{index}]"))?;
        }
        Ok(())
    }

    fn validate_ring_medium(&self) -> Result<(), ConfigError> {
        match (self.ring_medium, &self.ring_dir) {
            (Some(RingMediumConfig::Dax), None) => Err(bad(
                "ring_dir",
                "ring_medium = \"dax\" needs ring_dir, a directory on a file system mounted -o dax",
            )),
            (None | Some(RingMediumConfig::Hugetlbfs), Some(_)) => Err(bad(
                "ring_dir",
                "only a ring_medium = \"file\" or \"dax\" ring lives in ring_dir \
                 (a hugetlbfs ring lives in hugepage_dir)",
            )),
            (_, Some(dir)) if dir.as_os_str().is_empty() => {
                Err(bad("ring_dir", "must not be empty"))
            }
            _ => Ok(()),
        }
    }

    /// The configured medium and the directory its ring file lives in; `None`: the default
    /// placement (hugetlbfs in `hugepage_dir`, else a regular file in `fallback_dir`).
    pub fn ring_placement(&self) -> Option<(RingMedium, &std::path::Path)> {
        let medium = self.ring_medium?;
        let dir = match medium {
            RingMediumConfig::Hugetlbfs => &self.hugepage_dir,
            RingMediumConfig::File => self.ring_dir.as_ref().unwrap_or(&self.fallback_dir),
            RingMediumConfig::Dax => self.ring_dir.as_ref().expect("validated: dax has ring_dir"),
        };
        Some((medium.medium(), dir))
    }

    /// What the target's Identify VWC says: a volatile write cache is present when a Flush has
    /// work to do before acknowledged writes survive a power loss on this ring's medium. The
    /// default placement is hugetlbfs or a regular file, which answer alike.
    pub fn volatile_write_cache(&self) -> bool {
        let medium = self
            .ring_medium
            .map_or(RingMedium::Hugetlbfs, RingMediumConfig::medium);
        medium.volatile_write_cache(ENTRIES_PERSISTED_BEFORE_ACK)
    }

    /// The source's peer-loss policy (`suspend` unless configured).
    pub fn peer_loss_policy(&self) -> PeerLossPolicy {
        self.peer_loss_policy
            .unwrap_or(PeerLossPolicyConfig::Suspend)
            .policy()
    }

    /// What a destination runs as once promoted online: a source over its mirror namespaces,
    /// serving its `[target]`, replicating to `promote_peer` with the `degrade` policy unless
    /// another is set (the old source is gone: writes go on, marked for its resync).
    pub fn promoted_source(&self) -> Result<Config, String> {
        assert_eq!(self.role, Role::Destination);
        let peer = self.promote_peer.ok_or(
            "an online promotion needs promote_peer (the address the old source will listen on \
             once attached as the new destination) in the destination's config",
        )?;
        if self.target.is_none() {
            return Err(
                "an online promotion needs a [target] section in the destination's config (the \
                 subsystem NQN and serial hosts reconnect to)"
                    .into(),
            );
        }
        Ok(Config {
            role: Role::Source,
            listen: None,
            peer: Some(peer),
            promote_peer: None,
            peer_loss_policy: Some(
                self.peer_loss_policy
                    .unwrap_or(PeerLossPolicyConfig::Degrade),
            ),
            rpc_socket: Some(self.rpc_socket_path()),
            ..self.clone()
        })
    }

    /// The 16-byte volume identity both sides compare in the handshake: derived from the name.
    pub fn volume_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        let first = crc32c::crc32c(self.volume.as_bytes());
        let second = crc32c::crc32c_append(first, b"nvmirror-volume");
        let third = crc32c::crc32c_append(second, self.volume.as_bytes());
        let fourth = crc32c::crc32c_append(third, b"id");
        for (chunk, word) in id.chunks_mut(4).zip([first, second, third, fourth]) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        id
    }

    /// Where the node's metadata lives (see `metadata_path`).
    pub fn metadata_file(&self) -> PathBuf {
        self.metadata_path.clone().unwrap_or_else(|| {
            self.ring_dir
                .as_ref()
                .unwrap_or(&self.fallback_dir)
                .join(format!("nvmirror-{}.meta", self.volume))
        })
    }

    /// The ring file's name: one per role and volume, so a pair can share a hugepage mount.
    pub fn ring_file_name(&self) -> String {
        let role = match self.role {
            Role::Source => "source",
            Role::Destination => "destination",
        };
        format!("nvmirror-{}-{role}.ring", self.volume)
    }

    /// The embedded default: what `nvmirror` with no arguments runs (one side of it).
    /// Where the management socket is unless `rpc_socket` says: beside SPDK's default
    /// (`/var/tmp/spdk.sock`), one per volume and role so a source and a destination of one
    /// volume can run on one machine.
    pub fn rpc_socket_default(&self) -> PathBuf {
        PathBuf::from(format!(
            "{RPC_SOCKET_DIR}/nvmirror-{}-{}.sock",
            self.volume,
            match self.role {
                Role::Source => "source",
                Role::Destination => "destination",
            }
        ))
    }

    /// The management socket this config names or its default.
    pub fn rpc_socket_path(&self) -> PathBuf {
        self.rpc_socket
            .clone()
            .unwrap_or_else(|| self.rpc_socket_default())
    }

    pub fn embedded_default(role: Role, replication: SocketAddr, core: usize) -> Config {
        Config {
            role,
            volume: default_volume(),
            listen: (role == Role::Destination).then_some(replication),
            peer: (role == Role::Source).then_some(replication),
            hugepage_dir: default_hugepage_dir(),
            fallback_dir: default_fallback_dir(),
            ring_medium: None,
            ring_dir: None,
            ring_size_mib: RING_MIB_DEFAULT,
            cores: vec![core],
            idle: IdleConfig::Adaptive,
            cp_interval_ms: CP_INTERVAL_MS_DEFAULT,
            cp_mode: CpModeConfig::References,
            device_queue_depth: DEVICE_QUEUE_DEPTH_DEFAULT,
            peer_timeout_ms: PEER_TIMEOUT_MS_DEFAULT,
            peer_loss_policy: None,
            resync_rate_mib_s: 0,
            // Per role: both nodes of the embedded pair share one directory.
            metadata_path: Some(default_fallback_dir().join(format!(
                "nvmirror-{}-{}.meta",
                default_volume(),
                match role {
                    Role::Source => "source",
                    Role::Destination => "destination",
                }
            ))),
            // Both malloc namespaces are created zeroed by this process at every start: they are
            // identical by construction (and the pair's metadata is removed at start with them).
            assume_identical: true,
            bitmap_extent_bytes: default_bitmap_extent_bytes(),
            namespaces: vec![NamespaceConfig::Malloc { size_mib: 256 }],
            target: (role == Role::Source).then(|| TargetSection::embedded_default(1)),
            rpc_socket: Some(PathBuf::from(RPC_SOCKET_EMBEDDED)),
            promote_peer: None,
        }
    }
}

/// Where the first word a deserializer message quotes (`` unknown field `odds` ``, `` unknown
/// variant `trim` ``) stands in `text` as a key (`odds =`) or a string value (`"trim"`).
fn quoted_offset(text: &str, message: &str) -> Option<usize> {
    let word = message.split('`').nth(1).filter(|word| !word.is_empty())?;
    let as_value = format!("\"{word}\"");
    text.lines()
        .scan(0, |start, line| {
            let line_start = *start;
            *start += line.len() + 1;
            Some((line_start, line))
        })
        .find(|(_, line)| {
            let key = line.split('=').next().unwrap_or("").trim();
            key == word || line.split('=').nth(1).is_some_and(|v| v.trim() == as_value)
        })
        .map(|(start, _)| start)
}

/// The dotted key around byte `offset` of a TOML text (best effort: the line's key and its table).
fn key_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.rsplit('\n').next().unwrap_or("");
    let rest = &text[before.len() - line.len()..];
    let this_line = rest.lines().next().unwrap_or("");
    let key = this_line.split('=').next().unwrap_or("").trim();
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').to_string());
    match (table, key.is_empty() || key.starts_with('[')) {
        (Some(table), false) => format!("{table}.{key}"),
        (None, false) => key.to_string(),
        (Some(table), true) => table,
        (None, true) => "(file)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = r#"
role = "source"
peer = "127.0.0.1:4800"
ring_size_mib = 8
[[namespace]]
kind = "malloc"
size_mib = 16
"#;

    #[test]
    fn a_good_file_parses() {
        let config = Config::parse(SOURCE).unwrap();
        assert_eq!(config.role, Role::Source);
        assert_eq!(config.ring_size_mib, 8);
        assert_eq!(
            config.namespaces,
            vec![NamespaceConfig::Malloc { size_mib: 16 }]
        );
        assert_eq!(config.cp_interval_ms, CP_INTERVAL_MS_DEFAULT);
    }

    #[test]
    fn errors_name_the_key() {
        let odd_ring = SOURCE.replace("ring_size_mib = 8", "ring_size_mib = 7");
        assert_eq!(Config::parse(&odd_ring).unwrap_err().key, "ring_size_mib");
        let wrong_type = SOURCE.replace("ring_size_mib = 8", "ring_size_mib = \"big\"");
        assert_eq!(Config::parse(&wrong_type).unwrap_err().key, "ring_size_mib");
        let no_peer = SOURCE.replace("peer = \"127.0.0.1:4800\"", "");
        assert_eq!(Config::parse(&no_peer).unwrap_err().key, "peer");
        let bad_addr = SOURCE.replace("127.0.0.1:4800", "localhost");
        assert_eq!(Config::parse(&bad_addr).unwrap_err().key, "peer");
        let unknown = format!("{SOURCE}\nsurprise = 1\n");
        let error = Config::parse(&unknown).unwrap_err();
        assert!(error.reason.contains("surprise"), "{error}");
        let zero = SOURCE.replace("size_mib = 16", "size_mib = 0");
        assert_eq!(
            Config::parse(&zero).unwrap_err().key,
            "namespace[0].size_mib"
        );
        let core = SOURCE.replace("ring_size_mib = 8", "ring_size_mib = 8\ncores = [999]");
        assert_eq!(Config::parse(&core).unwrap_err().key, "cores");
        let depth = |n: u32| {
            Config::parse(&SOURCE.replace(
                "ring_size_mib = 8",
                &format!("ring_size_mib = 8\ndevice_queue_depth = {n}"),
            ))
        };
        assert_eq!(depth(0).unwrap_err().key, "device_queue_depth");
        assert_eq!(depth(1025).unwrap_err().key, "device_queue_depth");
        assert_eq!(depth(64).unwrap().device_queue_depth, 64);
        assert_eq!(Config::parse(SOURCE).unwrap().device_queue_depth, 32);
    }

    #[test]
    fn peer_timeout_and_loss_policy_parse_and_are_checked() {
        let with = |lines: &str| Config::parse(&format!("{lines}\n{SOURCE}"));
        let default = with("").unwrap();
        assert_eq!(default.peer_timeout_ms, 3000);
        assert_eq!(default.peer_loss_policy(), PeerLossPolicy::Suspend);
        let fail = with("peer_loss_policy = \"fail\"\npeer_timeout_ms = 1000").unwrap();
        assert_eq!(fail.peer_loss_policy(), PeerLossPolicy::Fail);
        assert_eq!(fail.peer_timeout_ms, 1000);
        let suspend = with("peer_loss_policy = \"suspend\"").unwrap();
        assert_eq!(suspend.peer_loss_policy(), PeerLossPolicy::Suspend);
        for timeout in [0, PEER_TIMEOUT_MS_MIN - 1, PEER_TIMEOUT_MS_MAX + 1] {
            let error = with(&format!("peer_timeout_ms = {timeout}")).unwrap_err();
            assert_eq!(error.key, "peer_timeout_ms", "{error}");
            assert!(error.reason.contains("200 to 60000"), "{error}");
        }
        let degrade = with("peer_loss_policy = \"degrade\"\nresync_rate_mib_s = 50").unwrap();
        assert_eq!(degrade.peer_loss_policy(), PeerLossPolicy::Degrade);
        assert_eq!(degrade.resync_rate_mib_s, 50);
        let unknown = with("peer_loss_policy = \"panic\"").unwrap_err();
        assert_eq!(unknown.key, "peer_loss_policy");
        assert!(
            unknown.reason.contains("suspend") && unknown.reason.contains("fail"),
            "{unknown}"
        );
        let wrong_type = with("peer_timeout_ms = \"3s\"").unwrap_err();
        assert_eq!(wrong_type.key, "peer_timeout_ms");
        let destination = SOURCE
            .replace("role = \"source\"", "role = \"destination\"")
            .replace("peer = ", "listen = ");
        let policy_on_destination =
            Config::parse(&format!("peer_loss_policy = \"fail\"\n{destination}")).unwrap_err();
        assert_eq!(policy_on_destination.key, "peer_loss_policy");
        assert_eq!(
            Config::parse(&format!("peer_timeout_ms = 500\n{destination}"))
                .unwrap()
                .peer_timeout_ms,
            500
        );
    }

    #[test]
    fn metadata_keys_parse_with_defaults_and_are_checked() {
        let config = Config::parse(SOURCE).unwrap();
        assert!(!config.assume_identical, "never assumed unless asked");
        assert_eq!(config.bitmap_extent_bytes, 64 << 10);
        assert_eq!(
            config.metadata_file(),
            config
                .fallback_dir
                .join(format!("nvmirror-{}.meta", config.volume)),
            "role-independent: a promoted destination started as a source finds it"
        );
        let keyed = |key: &str| {
            Config::parse(
                &SOURCE.replace("ring_size_mib = 8", &format!("ring_size_mib = 8\n{key}")),
            )
        };
        let explicit =
            keyed("metadata_path = \"/var/lib/nvmirror/v.meta\"\nassume_identical = true").unwrap();
        assert_eq!(
            explicit.metadata_file(),
            PathBuf::from("/var/lib/nvmirror/v.meta")
        );
        assert!(explicit.assume_identical);
        for bad in ["bitmap_extent_bytes = 3000", "bitmap_extent_bytes = 2048"] {
            assert_eq!(keyed(bad).unwrap_err().key, "bitmap_extent_bytes", "{bad}");
        }
        assert_eq!(
            keyed("metadata_path = \"\"").unwrap_err().key,
            "metadata_path"
        );
        assert_eq!(
            keyed("bitmap_extent_bytes = 4096")
                .unwrap()
                .bitmap_extent_bytes,
            4096
        );
    }

    #[test]
    fn ring_medium_parses_and_its_directory_is_checked() {
        let with = |lines: &str| Config::parse(&format!("{lines}\n{SOURCE}"));
        let default = with("").unwrap();
        assert_eq!(default.ring_medium, None);
        assert_eq!(default.ring_placement(), None);
        let file = with("ring_medium = \"file\"\nfallback_dir = \"/var/tmp/f\"").unwrap();
        assert_eq!(
            file.ring_placement(),
            Some((RingMedium::File, std::path::Path::new("/var/tmp/f")))
        );
        let file = with("ring_medium = \"file\"\nring_dir = \"/var/lib/r\"").unwrap();
        assert_eq!(
            file.ring_placement(),
            Some((RingMedium::File, std::path::Path::new("/var/lib/r")))
        );
        let huge = with("ring_medium = \"hugetlbfs\"\nhugepage_dir = \"/mnt/huge\"").unwrap();
        assert_eq!(
            huge.ring_placement(),
            Some((RingMedium::Hugetlbfs, std::path::Path::new("/mnt/huge")))
        );
        let dax = with("ring_medium = \"dax\"\nring_dir = \"/mnt/pmem\"").unwrap();
        assert_eq!(
            dax.ring_placement(),
            Some((RingMedium::Dax, std::path::Path::new("/mnt/pmem")))
        );
        assert_eq!(with("ring_medium = \"dax\"").unwrap_err().key, "ring_dir");
        assert_eq!(with("ring_dir = \"/x\"").unwrap_err().key, "ring_dir");
        let hugetlbfs_dir = with("ring_medium = \"hugetlbfs\"\nring_dir = \"/x\"");
        assert_eq!(hugetlbfs_dir.unwrap_err().key, "ring_dir");
        let unknown = with("ring_medium = \"nvram\"").unwrap_err();
        assert_eq!(unknown.key, "ring_medium");
        assert!(unknown.reason.contains("dax"), "{unknown}");
    }

    #[test]
    fn every_medium_reports_a_volatile_write_cache_while_entries_are_not_persisted_at_append() {
        for medium in [
            "",
            "ring_medium = \"file\"",
            "ring_medium = \"dax\"\nring_dir = \"/d\"",
        ] {
            let config = Config::parse(&format!("{medium}\n{SOURCE}")).unwrap();
            assert!(config.volatile_write_cache(), "{medium}");
        }
    }

    #[test]
    fn target_section_parses_and_is_checked() {
        let with_target = format!(
            "{SOURCE}\n[target]\nlisten = [\"127.0.0.1:4420\"]\n[[target.subsystem]]\nnqn = \"nqn.2026-11.io.nvmirror:t\"\nallow_any_host = true\nnamespaces = [1]\n"
        );
        let config = Config::parse(&with_target).unwrap();
        let target = config.target.as_ref().unwrap().to_target_config(1).unwrap();
        assert_eq!(target.subsystems[0].namespaces, vec![1]);
        let missing_namespace = with_target.replace("namespaces = [1]", "namespaces = [2]");
        assert_eq!(
            Config::parse(&missing_namespace).unwrap_err().key,
            "target.subsystem[0].namespaces"
        );
        let bad_capsule =
            with_target.replace("[target]\n", "[target]\nin_capsule_data_bytes = 7\n");
        assert_eq!(
            Config::parse(&bad_capsule).unwrap_err().key,
            "target.in_capsule_data_bytes"
        );
    }

    const FAULTY: &str = r#"
role = "destination"
listen = "127.0.0.1:4800"
ring_size_mib = 8
[[namespace]]
kind = "faulty"
base = { kind = "file", path = "/var/tmp/m.img", size_mib = 16 }
[[namespace.fault]]
op = "all"
action = "delay"
delay_us = 2000
[[namespace.fault]]
op = "write"
action = "fail"
every = 3
lba_min = 8
lba_max = 15
from_ms = 100
to_ms = 600
"#;

    #[test]
    fn faulty_namespaces_parse_into_rules() {
        let config = Config::parse(FAULTY).unwrap();
        let NamespaceConfig::Faulty { base, faults } = &config.namespaces[0] else {
            panic!("{:?}", config.namespaces);
        };
        assert_eq!(
            **base,
            NamespaceConfig::File {
                path: "/var/tmp/m.img".into(),
                size_mib: Some(16)
            }
        );
        let delay = faults[0].rule().unwrap();
        assert_eq!(delay.ops, FaultOps::All);
        assert_eq!(delay.action, FaultAction::Delay { delay_us: 2000 });
        assert_eq!((delay.every, delay.lba_min, delay.from_ms), (1, None, None));
        let fail = faults[1].rule().unwrap();
        assert_eq!(fail.action, FaultAction::Fail);
        assert_eq!(
            (fail.every, fail.lba_min, fail.lba_max),
            (3, Some(8), Some(15))
        );
        assert_eq!((fail.from_ms, fail.to_ms), (Some(100), Some(600)));
        let malloc = FAULTY.replace(
            "base = { kind = \"file\", path = \"/var/tmp/m.img\", size_mib = 16 }",
            "base = { kind = \"malloc\", size_mib = 4 }",
        );
        assert!(Config::parse(&malloc).is_ok());
    }

    #[test]
    fn faulty_namespace_errors_name_the_key() {
        let key = |text: String| Config::parse(&text).unwrap_err().key;
        assert_eq!(
            key(FAULTY.replace("delay_us = 2000", "")),
            "namespace[0].fault[0].delay_us"
        );
        assert_eq!(
            key(FAULTY.replace("every = 3", "every = 3\ndelay_us = 5")),
            "namespace[0].fault[1].delay_us"
        );
        assert_eq!(
            key(FAULTY.replace("every = 3", "every = 0")),
            "namespace[0].fault[1].every"
        );
        assert_eq!(
            key(FAULTY.replace("lba_max = 15", "lba_max = 7")),
            "namespace[0].fault[1].lba_max"
        );
        assert_eq!(
            key(FAULTY.replace("to_ms = 600", "to_ms = 50")),
            "namespace[0].fault[1].to_ms"
        );
        assert_eq!(
            key(FAULTY.replace("size_mib = 16", "size_mib = 0")),
            "namespace[0].base.size_mib"
        );
        let unknown_op =
            Config::parse(&FAULTY.replace("op = \"all\"", "op = \"trim\"")).unwrap_err();
        assert_eq!(unknown_op.key, "namespace.fault.op", "{unknown_op}");
        let unknown_key =
            Config::parse(&FAULTY.replace("every = 3", "every = 3\nodds = 2")).unwrap_err();
        assert!(unknown_key.reason.contains("odds"), "{unknown_key}");
        assert_eq!(unknown_key.key, "namespace.fault.odds");
        let nested = FAULTY.replace(
            "base = { kind = \"file\", path = \"/var/tmp/m.img\", size_mib = 16 }",
            "base = { kind = \"faulty\", base = { kind = \"malloc\", size_mib = 4 } }",
        );
        assert_eq!(key(nested), "namespace[0].base");
    }

    #[test]
    fn volume_ids_differ_by_name_and_are_stable() {
        let a = Config::parse(SOURCE).unwrap();
        let b = Config::parse(&format!("volume = \"other\"\n{SOURCE}")).unwrap();
        assert_ne!(a.volume_id(), b.volume_id());
        assert_eq!(a.volume_id(), Config::parse(SOURCE).unwrap().volume_id());
    }
}
