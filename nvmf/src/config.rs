//! Target configuration: the subsystems, their namespaces and allowed hosts, the listeners and the
//! transport limits. Plain structs the binary fills from its TOML; [`TargetConfig::validate`] rejects a
//! bad value at start, naming the field.

use std::net::SocketAddr;

/// The well-known discovery subsystem NQN (NVMe Base 2.0 section 3.1.3.6).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Default in-capsule data size for I/O queues.
pub const IN_CAPSULE_DATA_BYTES_DEFAULT: u32 = 8192;
/// In-capsule data size of every admin queue (Connect data is 1024 bytes and travels in-capsule).
pub const ADMIN_IN_CAPSULE_DATA_BYTES: u32 = 8192;
/// Largest in-capsule data size an I/O queue may be configured with.
pub const IN_CAPSULE_DATA_BYTES_MAX: u32 = 64 * 1024;
/// Largest data transfer of one command (MDTS) and of one H2CData PDU (MAXH2CDATA).
pub const TRANSFER_BYTES_MAX: u32 = 128 * 1024;
/// Admin queue depth (entries); Fabrics requires at least 32.
pub const ADMIN_QUEUE_DEPTH: u16 = 32;
/// Largest configurable I/O queue depth.
pub const QUEUE_DEPTH_MAX: u16 = 1024;
/// Default per-connection, per-poll PDU budget (like Linux nvmet's NVMET_TCP_RECV_BUDGET).
pub const RECV_BUDGET_PDUS_DEFAULT: usize = 64;
/// Most outstanding Asynchronous Event Requests per controller (AERL + 1).
pub const AER_OUTSTANDING_MAX: usize = 4;
/// How long a command's data may take to arrive once the target asked for it (R2T) or its
/// capsule began, unless configured otherwise: then the command fails and its connection closes.
pub const DATA_TIMEOUT_MS_DEFAULT: u32 = 30_000;
/// Whether the target reports a volatile write cache unless configured otherwise.
pub const VOLATILE_WRITE_CACHE_DEFAULT: bool = true;
/// Most NQN bytes (Base 2.0: 223 bytes).
pub const NQN_BYTES_MAX: usize = 223;

const _: () = assert!(ADMIN_IN_CAPSULE_DATA_BYTES as usize >= crate::pdu::CONNECT_DATA_BYTES);
const _: () =
    assert!(TRANSFER_BYTES_MAX as usize <= crate::backend::DEVICE_BACKEND_WRITE_BYTES_MAX);
const _: () = assert!(IN_CAPSULE_DATA_BYTES_MAX <= TRANSFER_BYTES_MAX);
const _: () = assert!(AER_OUTSTANDING_MAX < ADMIN_QUEUE_DEPTH as usize);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemConfig {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: bool,
    pub allowed_hosts: Vec<String>,
    /// Backend nsids exported by this subsystem (the subsystem's NSIDs are the same numbers).
    pub namespaces: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    pub subsystems: Vec<SubsystemConfig>,
    pub listeners: Vec<SocketAddr>,
    pub discovery_listeners: Vec<SocketAddr>,
    pub in_capsule_data_bytes: u32,
    pub queue_depth_max: u16,
    pub io_queues_max: u16,
    pub keep_alive_timeout_ms_default: u32,
    pub recv_budget_pdus: usize,
    /// Report a volatile write cache (Identify Controller VWC, Get Features Volatile Write Cache):
    /// hosts then send Flush to make completed writes durable. Off when what a write completes
    /// into survives power loss by itself and Flush has nothing to add.
    pub volatile_write_cache: bool,
    /// A command whose data has not all arrived this long after the target asked for it is
    /// failed and its connection closed ([`crate::dispatch`]), so a host never holds a request
    /// (or a ring slot) for ever.
    pub data_timeout_ms: u32,
}

impl TargetConfig {
    /// A configuration with the defaults: listeners on 4420, discovery also on 8009.
    pub fn with_defaults(
        subsystems: Vec<SubsystemConfig>,
        address: std::net::IpAddr,
    ) -> TargetConfig {
        TargetConfig {
            subsystems,
            listeners: vec![SocketAddr::new(address, 4420)],
            discovery_listeners: vec![SocketAddr::new(address, 8009)],
            in_capsule_data_bytes: IN_CAPSULE_DATA_BYTES_DEFAULT,
            queue_depth_max: 128,
            io_queues_max: 16,
            keep_alive_timeout_ms_default: 120_000,
            recv_budget_pdus: RECV_BUDGET_PDUS_DEFAULT,
            volatile_write_cache: VOLATILE_WRITE_CACHE_DEFAULT,
            data_timeout_ms: DATA_TIMEOUT_MS_DEFAULT,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.listeners.is_empty() {
            return Err("listeners: at least one listener is required".into());
        }
        if !self.in_capsule_data_bytes.is_multiple_of(16)
            || self.in_capsule_data_bytes > IN_CAPSULE_DATA_BYTES_MAX
        {
            return Err(format!(
                "in_capsule_data_bytes: {} must be a multiple of 16 and at most {IN_CAPSULE_DATA_BYTES_MAX}",
                self.in_capsule_data_bytes
            ));
        }
        if !(2..=QUEUE_DEPTH_MAX).contains(&self.queue_depth_max) {
            return Err(format!(
                "queue_depth_max: {} must be in 2..={QUEUE_DEPTH_MAX}",
                self.queue_depth_max
            ));
        }
        if self.io_queues_max == 0 || self.io_queues_max == u16::MAX {
            return Err(format!(
                "io_queues_max: {} must be in 1..65535",
                self.io_queues_max
            ));
        }
        if self.keep_alive_timeout_ms_default == 0 {
            return Err("keep_alive_timeout_ms_default: must be positive".into());
        }
        if self.data_timeout_ms == 0 {
            return Err("data_timeout_ms: must be positive".into());
        }
        if self.recv_budget_pdus == 0 {
            return Err("recv_budget_pdus: must be positive".into());
        }
        for (index, subsystem) in self.subsystems.iter().enumerate() {
            subsystem
                .validate()
                .map_err(|reason| format!("subsystems[{index}].{reason}"))?;
            let duplicate = self.subsystems[..index]
                .iter()
                .any(|other| other.nqn == subsystem.nqn);
            if duplicate || subsystem.nqn == DISCOVERY_NQN {
                return Err(format!(
                    "subsystems[{index}].nqn: {} is used twice or reserved",
                    subsystem.nqn
                ));
            }
        }
        Ok(())
    }
}

impl SubsystemConfig {
    fn validate(&self) -> Result<(), String> {
        if self.nqn.is_empty() || self.nqn.len() > NQN_BYTES_MAX || !self.nqn.starts_with("nqn.") {
            return Err(format!(
                "nqn: {:?} must start with \"nqn.\" and be 1..={NQN_BYTES_MAX} bytes",
                self.nqn
            ));
        }
        if !self.serial.is_ascii() || self.serial.len() > 20 {
            return Err(format!(
                "serial: {:?} must be at most 20 ASCII characters",
                self.serial
            ));
        }
        if !self.model.is_ascii() || self.model.len() > 40 {
            return Err(format!(
                "model: {:?} must be at most 40 ASCII characters",
                self.model
            ));
        }
        if !self.allow_any_host && self.allowed_hosts.is_empty() {
            return Err(
                "allowed_hosts: empty while allow_any_host is false (no host could connect)".into(),
            );
        }
        if self.namespaces.is_empty()
            || self
                .namespaces
                .iter()
                .any(|&nsid| nsid == 0 || nsid == u32::MAX)
        {
            return Err(format!(
                "namespaces: {:?} must be non-empty valid NSIDs",
                self.namespaces
            ));
        }
        let mut sorted = self.namespaces.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.namespaces.len() {
            return Err("namespaces: an NSID is listed twice".into());
        }
        Ok(())
    }

    pub fn allows_host(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.allowed_hosts.iter().any(|host| host == hostnqn)
    }
}
