//! Bringing up and shutting down an NVMe-oF controller over its admin queue (NVMe over Fabrics 1.1
//! section 3.3 Connect, 3.4 properties; NVMe Base 2.0 section 3.5.1 initialization, 3.6 shutdown).
//!
//! [`Controller::connect`] runs the host initialization sequence: ICReq, Fabrics Connect of the admin
//! queue (host NQN, KATO), Property Get CAP/VS, Property Set CC.EN=1, poll CSTS.RDY, Identify
//! controller. Then the caller identifies the namespace, sets the number of queues and connects the
//! I/O queues. During the run [`Controller::poll_keep_alive`] sends Keep Alive every KATO/2;
//! [`Controller::shutdown`] sets CC.SHN and waits for CSTS.SHST. Admin commands run one at a time,
//! polled with a deadline; a rejected command is a [`SetupError`] with its status decoded.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nvmirror_nvmf::admin::feature;
use nvmirror_nvmf::controller::property;
use nvmirror_nvmf::identify::{CNS_CONTROLLER, CNS_NAMESPACE, IDENTIFY_BYTES};
use nvmirror_nvmf::pdu::{
    admin_opcode, Command, Completion, ConnectData, Status, CONNECT_DATA_BYTES,
};

use crate::queue_pair::{DataDirection, QueueError, QueuePair};
use crate::status::describe_status;

/// Admin queue entries we ask for (Connect SQSIZE is 0's based).
const ADMIN_QUEUE_ENTRIES: u16 = 32;
/// Admin commands in flight at once: one command plus a keep-alive.
const ADMIN_SLOTS: u16 = 2;
/// Identify data and Connect data both fit.
const ADMIN_DATA_BYTES: u32 = IDENTIFY_BYTES as u32;
/// Keep-alive timeout we ask for; Keep Alive goes out every half of it.
pub const KATO_MS: u32 = 10_000;
/// Deadline of one admin command (and of connecting a socket).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for CSTS.SHST to report shutdown complete.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

const CC_ENABLE: u64 = 1;
/// CC.IOSQES = 6 (64-byte SQE), CC.IOCQES = 4 (16-byte CQE).
const CC_QUEUE_ENTRY_SIZES: u64 = (6 << 16) | (4 << 20);
const CC_SHUTDOWN_NORMAL: u64 = 1 << 14;
const CSTS_READY: u64 = 1;
const CSTS_FATAL: u64 = 1 << 1;
const CSTS_SHUTDOWN_COMPLETE: u64 = 2 << 2;
const CSTS_SHUTDOWN_MASK: u64 = 3 << 2;
/// Connect CNTLID asking for a dynamic controller.
const CNTLID_DYNAMIC: u16 = 0xffff;

const _: () = assert!(CONNECT_DATA_BYTES as u32 <= ADMIN_DATA_BYTES);

/// Why the controller could not be brought up (or shut down).
#[derive(Debug)]
pub enum SetupError {
    Queue {
        qid: u16,
        error: QueueError,
    },
    Rejected {
        command: &'static str,
        status: Status,
        detail: String,
    },
    Timeout(&'static str),
    Unsupported(String),
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::Queue { qid, error } => write!(f, "queue {qid}: {error}"),
            SetupError::Rejected {
                command,
                status,
                detail,
            } => {
                write!(f, "{command} rejected: {}{detail}", describe_status(status))
            }
            SetupError::Timeout(what) => write!(f, "timed out waiting for {what}"),
            SetupError::Unsupported(what) => write!(f, "unsupported target: {what}"),
        }
    }
}

impl std::error::Error for SetupError {}

/// What the host needs from CAP, VS and Identify Controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    pub cntlid: u16,
    pub version: u32,
    /// CAP.MQES + 1: the largest queue the controller accepts.
    pub queue_entries_max: u32,
    pub serial: String,
    pub model: String,
    /// Write data up to this size may travel in the capsule (from IOCCSZ; 0 = never).
    pub in_capsule_bytes_max: u32,
    /// Largest transfer (from MDTS); `None` = no limit.
    pub transfer_bytes_max: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceGeometry {
    pub size_lbas: u64,
    pub lba_bytes: u32,
}

/// How to reach the controller.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub address: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Connect CATTR bit 2: lets the target use C2HData SUCCESS (SPDK's hosts default to off).
    pub disable_sq_flow_control: bool,
}

pub struct Controller {
    admin: QueuePair,
    options: ConnectOptions,
    info: ControllerInfo,
    keep_alive_next: Instant,
    keep_alive_slot: Option<u16>,
}

impl Controller {
    pub fn connect(options: &ConnectOptions) -> Result<Controller, SetupError> {
        let admin = QueuePair::connect(
            options.address,
            0,
            ADMIN_SLOTS,
            ADMIN_DATA_BYTES,
            options.header_digest,
            options.data_digest,
            ADMIN_TIMEOUT,
        )
        .map_err(|error| SetupError::Queue { qid: 0, error })?;
        let placeholder = ControllerInfo {
            cntlid: CNTLID_DYNAMIC,
            version: 0,
            queue_entries_max: 0,
            serial: String::new(),
            model: String::new(),
            in_capsule_bytes_max: 0,
            transfer_bytes_max: None,
        };
        let mut controller = Controller {
            admin,
            options: options.clone(),
            info: placeholder,
            keep_alive_next: Instant::now() + Duration::from_millis(u64::from(KATO_MS / 2)),
            keep_alive_slot: None,
        };
        let cntlid = fabrics_connect(
            &mut controller.admin,
            options,
            CNTLID_DYNAMIC,
            ADMIN_QUEUE_ENTRIES - 1,
            KATO_MS,
        )?;
        controller.info = controller.enable(cntlid)?;
        Ok(controller)
    }

    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    /// CAP, VS, CC.EN = 1, wait for CSTS.RDY, Identify Controller.
    fn enable(&mut self, cntlid: u16) -> Result<ControllerInfo, SetupError> {
        let cap = self.property_get(property::CAP, true)?;
        let version = self.property_get(property::VS, false)? as u32;
        let ready_timeout = Duration::from_millis(500 * ((cap >> 24) & 0xff).max(1));
        let cc = self.property_get(property::CC, false)?;
        if cc & CC_ENABLE == 0 {
            self.property_set(property::CC, cc | CC_ENABLE | CC_QUEUE_ENTRY_SIZES)?;
        }
        self.wait_csts(CSTS_READY, CSTS_READY, ready_timeout, "CSTS.RDY")?;
        let data = self.identify(CNS_CONTROLLER, 0)?;
        let page_bytes_min = 1u64 << (12 + ((cap >> 48) & 0xf));
        let mdts = data[77];
        let ioccsz_bytes = u32::from_le_bytes(data[1792..1796].try_into().expect("4 bytes")) * 16;
        let icdoff = u16::from_le_bytes([data[1800], data[1801]]);
        Ok(ControllerInfo {
            cntlid,
            version,
            queue_entries_max: (cap & 0xffff) as u32 + 1,
            serial: ascii_field(&data[4..24]),
            model: ascii_field(&data[24..64]),
            in_capsule_bytes_max: if icdoff == 0 {
                ioccsz_bytes.saturating_sub(64)
            } else {
                0
            },
            transfer_bytes_max: (mdts != 0)
                .then(|| (page_bytes_min << mdts).min(u64::from(u32::MAX)) as u32),
        })
    }

    pub fn identify_namespace(&mut self, nsid: u32) -> Result<NamespaceGeometry, SetupError> {
        let data = self.identify(CNS_NAMESPACE, nsid)?;
        let size_lbas = u64::from_le_bytes(data[0..8].try_into().expect("8 bytes"));
        if size_lbas == 0 {
            return Err(SetupError::Unsupported(format!(
                "namespace {nsid} is not active (NSZE 0)"
            )));
        }
        let format = (data[26] & 0x0f) as usize;
        let lba_format = u32::from_le_bytes(
            data[128 + 4 * format..132 + 4 * format]
                .try_into()
                .expect("4 bytes"),
        );
        let lba_bytes = 1u32 << ((lba_format >> 16) & 0xff);
        Ok(NamespaceGeometry {
            size_lbas,
            lba_bytes,
        })
    }

    /// Identify with `cns` (controller or namespace) for `nsid`; returns the Identify data.
    fn identify(&mut self, cns: u8, nsid: u32) -> Result<&[u8], SetupError> {
        let name = match cns {
            CNS_CONTROLLER => "Identify Controller",
            CNS_NAMESPACE => "Identify Namespace",
            other => panic!("Identify CNS {other:#04x} is not one the host sends"),
        };
        let mut identify = Command::zeroed();
        identify
            .set_opcode(admin_opcode::IDENTIFY)
            .set_nsid(nsid)
            .set_cdw(10, u32::from(cns));
        let (_, data) = self.execute(
            name,
            identify,
            DataDirection::FromController(ADMIN_DATA_BYTES),
        )?;
        assert_eq!(data.len(), IDENTIFY_BYTES);
        Ok(data)
    }

    /// Set Features Number of Queues; returns how many I/O queue pairs the controller granted.
    pub fn set_queue_count(&mut self, count: u16) -> Result<u16, SetupError> {
        assert!(count > 0);
        let mut set_features = Command::zeroed();
        let count_0based = u32::from(count - 1);
        set_features
            .set_opcode(admin_opcode::SET_FEATURES)
            .set_cdw(10, u32::from(feature::NUMBER_OF_QUEUES));
        set_features.set_cdw(11, count_0based | (count_0based << 16));
        let (completion, _) = self.execute(
            "Set Features (Number of Queues)",
            set_features,
            DataDirection::None,
        )?;
        let submission_queues = (completion.dw0 & 0xffff) + 1;
        let completion_queues = (completion.dw0 >> 16) + 1;
        Ok(submission_queues
            .min(completion_queues)
            .min(u32::from(count)) as u16)
    }

    /// Opens I/O queue `qid` with `queue_depth` usable slots (SQSIZE = depth + 1 entries).
    pub fn connect_io_queue(
        &self,
        qid: u16,
        queue_depth: u16,
        data_bytes_max: u32,
    ) -> Result<QueuePair, SetupError> {
        assert!(qid > 0 && u32::from(queue_depth) < self.info.queue_entries_max);
        let options = &self.options;
        let queue_error = |error| SetupError::Queue { qid, error };
        let mut queue = QueuePair::connect(
            options.address,
            qid,
            queue_depth,
            data_bytes_max.max(CONNECT_DATA_BYTES as u32),
            options.header_digest,
            options.data_digest,
            ADMIN_TIMEOUT,
        )
        .map_err(queue_error)?;
        fabrics_connect(&mut queue, options, self.info.cntlid, queue_depth, 0)?;
        queue.set_in_capsule_bytes_max(self.info.in_capsule_bytes_max);
        Ok(queue)
    }

    /// Keeps the association alive during a run: sends Keep Alive every KATO/2 and collects its answer.
    pub fn poll_keep_alive(&mut self, now: Instant) -> Result<(), SetupError> {
        let queue_error = |error| SetupError::Queue { qid: 0, error };
        if self.keep_alive_slot.is_none() {
            if now < self.keep_alive_next {
                return Ok(());
            }
            let slot = self
                .admin
                .acquire()
                .expect("an admin slot is free between commands");
            let mut keep_alive = Command::zeroed();
            keep_alive.set_opcode(admin_opcode::KEEP_ALIVE);
            self.admin
                .submit(slot, &mut keep_alive, DataDirection::None, false);
            self.keep_alive_slot = Some(slot);
            self.keep_alive_next = now + Duration::from_millis(u64::from(KATO_MS / 2));
        }
        self.admin.flush().map_err(queue_error)?;
        self.admin.poll_receive().map_err(queue_error)?;
        while let Some(done) = self.admin.take_done() {
            assert_eq!(
                Some(done.slot),
                self.keep_alive_slot,
                "only keep-alive is in flight during a run"
            );
            self.admin.release(done.slot);
            self.keep_alive_slot = None;
            if !done.completion.status.is_success() {
                let status = done.completion.status;
                return Err(SetupError::Rejected {
                    command: "Keep Alive",
                    status,
                    detail: String::new(),
                });
            }
        }
        Ok(())
    }

    /// CC.SHN = normal shutdown, wait for CSTS.SHST = complete, close the admin queue.
    pub fn shutdown(mut self) -> Result<(), SetupError> {
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        while let Some(slot) = self.keep_alive_slot {
            self.poll_keep_alive(Instant::now())?;
            if self.keep_alive_slot == Some(slot) && Instant::now() > deadline {
                return Err(SetupError::Timeout("Keep Alive completion"));
            }
        }
        let cc = self.property_get(property::CC, false)?;
        self.property_set(property::CC, (cc & !(3 << 14)) | CC_SHUTDOWN_NORMAL)?;
        self.wait_csts(
            CSTS_SHUTDOWN_MASK,
            CSTS_SHUTDOWN_COMPLETE,
            SHUTDOWN_TIMEOUT,
            "CSTS.SHST",
        )?;
        self.admin.close();
        Ok(())
    }

    fn wait_csts(
        &mut self,
        mask: u64,
        value: u64,
        timeout: Duration,
        what: &'static str,
    ) -> Result<(), SetupError> {
        let deadline = Instant::now() + timeout;
        loop {
            let csts = self.property_get(property::CSTS, false)?;
            if csts & CSTS_FATAL != 0 {
                return Err(SetupError::Unsupported(format!(
                    "controller fatal status (CSTS {csts:#x})"
                )));
            }
            if csts & mask == value {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SetupError::Timeout(what));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn property_get(&mut self, offset: u32, eight_bytes: bool) -> Result<u64, SetupError> {
        let (completion, _) = self.execute(
            "Property Get",
            Command::property_get(0, offset, eight_bytes),
            DataDirection::None,
        )?;
        Ok(u64::from(completion.dw0) | (u64::from(completion.dw1) << 32))
    }

    fn property_set(&mut self, offset: u32, value: u64) -> Result<(), SetupError> {
        self.execute(
            "Property Set",
            Command::property_set(0, offset, false, value),
            DataDirection::None,
        )?;
        Ok(())
    }

    fn execute(
        &mut self,
        name: &'static str,
        mut command: Command,
        direction: DataDirection,
    ) -> Result<(Completion, &[u8]), SetupError> {
        let slot = self
            .admin
            .acquire()
            .expect("admin commands run one at a time");
        self.admin.submit(slot, &mut command, direction, false);
        let completion = wait_for(&mut self.admin, slot, name)?;
        self.admin.release(slot);
        if !completion.status.is_success() {
            return Err(SetupError::Rejected {
                command: name,
                status: completion.status,
                detail: String::new(),
            });
        }
        Ok((completion, self.admin.data(slot)))
    }
}

/// Polls `queue` until `slot` completes; the only command in flight on a queue during setup.
fn wait_for(
    queue: &mut QueuePair,
    slot: u16,
    what: &'static str,
) -> Result<Completion, SetupError> {
    let qid = queue.qid();
    let deadline = Instant::now() + ADMIN_TIMEOUT;
    loop {
        queue
            .flush()
            .map_err(|error| SetupError::Queue { qid, error })?;
        let read = queue
            .poll_receive()
            .map_err(|error| SetupError::Queue { qid, error })?;
        if let Some(done) = queue.take_done() {
            assert_eq!(done.slot, slot, "one command in flight during setup");
            return Ok(done.completion);
        }
        if Instant::now() > deadline {
            return Err(SetupError::Timeout(what));
        }
        if read == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Fabrics Connect on `queue` (admin when its qid is 0); returns the controller ID.
fn fabrics_connect(
    queue: &mut QueuePair,
    options: &ConnectOptions,
    cntlid: u16,
    sqsize_0based: u16,
    kato_ms: u32,
) -> Result<u16, SetupError> {
    let slot = queue.acquire().expect("a fresh queue has free slots");
    let data = ConnectData {
        hostid: host_id(&options.hostnqn),
        cntlid,
        subnqn: options.subnqn.clone(),
        hostnqn: options.hostnqn.clone(),
    };
    data.encode_into(queue.data_mut(slot));
    let cattr = if options.disable_sq_flow_control {
        nvmirror_nvmf::pdu::CONNECT_CATTR_DISABLE_SQ_FLOW_CONTROL
    } else {
        0
    };
    let mut command = Command::connect(0, queue.qid(), sqsize_0based, cattr, kato_ms);
    queue.submit(
        slot,
        &mut command,
        DataDirection::ToController(CONNECT_DATA_BYTES as u32),
        true,
    );
    let completion = wait_for(queue, slot, "Connect response")?;
    queue.release(slot);
    if !completion.status.is_success() {
        let detail = connect_error_detail(&completion);
        return Err(SetupError::Rejected {
            command: "Fabrics Connect",
            status: completion.status,
            detail,
        });
    }
    Ok((completion.dw0 & 0xffff) as u16)
}

/// Connect Invalid Parameters locates the bad field in dw0 (Fabrics 1.1 figure 21, as Linux nvmet
/// and SPDK encode it): IPO in bits 15:0 (byte offset), IATTR in bits 23:16 (1 = in the Connect data).
fn connect_error_detail(completion: &Completion) -> String {
    let status = completion.status;
    if status.sct.to_bits() != 1 || status.sc != 0x82 {
        return String::new();
    }
    let in_data = (completion.dw0 >> 16) & 0xff == 1;
    let offset = completion.dw0 & 0xffff;
    let field = match (in_data, offset) {
        (true, 0) => " (HOSTID)",
        (true, 16) => " (CNTLID)",
        (true, 256) => " (SUBNQN)",
        (true, 512) => " (HOSTNQN)",
        (false, 42) => " (QID)",
        (false, 44) => " (SQSIZE)",
        (false, 48) => " (KATO)",
        _ => "",
    };
    let place = if in_data {
        "Connect data"
    } else {
        "Connect command"
    };
    format!("; invalid parameter in {place} at byte {offset}{field}")
}

/// A stable host identifier from the host NQN (its UUID when it is a uuid NQN).
fn host_id(hostnqn: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Some(uuid) = hostnqn.split("uuid:").nth(1) {
        let hex: Vec<u8> = uuid.bytes().filter(u8::is_ascii_hexdigit).collect();
        if hex.len() == 32 {
            for (byte, pair) in id.iter_mut().zip(hex.chunks_exact(2)) {
                *byte =
                    u8::from_str_radix(std::str::from_utf8(pair).expect("hex"), 16).expect("hex");
            }
            return id;
        }
    }
    for (index, chunk) in id.chunks_exact_mut(4).enumerate() {
        chunk.copy_from_slice(
            &crc32c::crc32c_append(index as u32, hostnqn.as_bytes()).to_le_bytes(),
        );
    }
    id
}

fn ascii_field(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmirror_nvmf::pdu::CommandSpecificStatus;

    #[test]
    fn host_id_from_uuid_nqn_and_otherwise_stable() {
        let id = host_id("nqn.2014-08.org.nvmexpress:uuid:6e766d69-7272-6f72-2d70-657266000001");
        assert_eq!(id[..4], [0x6e, 0x76, 0x6d, 0x69]);
        assert_eq!(id[15], 0x01);
        assert_eq!(host_id("nqn.x"), host_id("nqn.x"));
        assert_ne!(host_id("nqn.x"), host_id("nqn.y"));
    }

    #[test]
    fn connect_error_names_the_offending_field() {
        let mut completion =
            Completion::new(3, CommandSpecificStatus::ConnectInvalidParameters.into());
        completion.dw0 = (1 << 16) | 256;
        assert!(connect_error_detail(&completion).contains("Connect data at byte 256 (SUBNQN)"));
        completion.dw0 = 44;
        assert!(connect_error_detail(&completion).contains("Connect command at byte 44 (SQSIZE)"));
        let other = Completion::new(3, CommandSpecificStatus::ConnectInvalidHost.into());
        assert_eq!(connect_error_detail(&other), "");
    }
}
