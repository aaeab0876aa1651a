//! NVMe structures carried by NVMe/TCP capsules: the 64-byte submission queue entry ([`Command`]), the
//! 16-byte completion queue entry ([`Completion`]) with its [`Status`], SGL descriptors as NVMe/TCP uses
//! them, Fabrics commands and the Connect data (NVMe Base 2.0 sections 4.1-4.3, 4.6; Fabrics sections
//! 3.3, 6.3), and the opcode and status-code values.

/// Size of a submission queue entry.
pub const SQE_BYTES: usize = 64;
/// Size of a completion queue entry.
pub const CQE_BYTES: usize = 16;
/// Size of the Connect command's data (Fabrics, figure 20).
pub const CONNECT_DATA_BYTES: usize = 1024;
/// Size of an NQN field (NUL padded).
pub const NQN_FIELD_BYTES: usize = 256;

/// Admin command opcodes (Base 2.0, figure 141) that this codec names.
pub mod admin_opcode {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
    pub const FABRICS: u8 = 0x7f;
}

/// NVM command set I/O opcodes (NVM Command Set 1.0, figure 18).
pub mod io_opcode {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    pub const FABRICS: u8 = 0x7f;
}

nvmirror_engine::wire_enum! {
    /// Fabrics command types (FCTYPE, Fabrics 1.1 figure 8).
    pub enum FabricsType: u8 {
        PropertySet = 0x00,
        Connect = 0x01,
        PropertyGet = 0x04,
        AuthenticationSend = 0x05,
        AuthenticationReceive = 0x06,
        Disconnect = 0x08,
    }
}

/// Connect CATTR bit 2: the host disables SQ flow control (SQHD reserved, C2HData SUCCESS allowed).
pub const CONNECT_CATTR_DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;
/// Flags byte PSDT field (bits 7:6) value 01b: SGLs, the form NVMe over Fabrics requires.
pub const PSDT_SGL: u8 = 0b01;

/// Byte offsets inside the SQE, used as the IPO/FEI "offending field" of errors.
pub mod sqe_offset {
    pub const CONNECT_QID: u16 = 42;
    pub const CONNECT_SQSIZE: u16 = 44;
    pub const CONNECT_KATO: u16 = 48;
}

/// Byte offsets inside the Connect data, for IPO with IATTR = 1.
pub mod connect_data_offset {
    pub const HOSTID: u16 = 0;
    pub const CNTLID: u16 = 16;
    pub const SUBNQN: u16 = 256;
    pub const HOSTNQN: u16 = 512;
}

/// A 64-byte submission queue entry, kept as wire bytes with typed accessors.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Command([u8; SQE_BYTES]);

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("opcode", &self.opcode())
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .field("sgl", &self.sgl())
            .field("cdw10", &self.cdw(10))
            .finish()
    }
}

impl Command {
    pub fn zeroed() -> Command {
        Command([0; SQE_BYTES])
    }

    pub fn from_bytes(bytes: &[u8]) -> Command {
        Command(bytes[..SQE_BYTES].try_into().expect("64-byte SQE"))
    }

    pub fn as_bytes(&self) -> &[u8; SQE_BYTES] {
        &self.0
    }

    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    pub fn psdt(&self) -> u8 {
        self.0[1] >> 6
    }
    pub fn cid(&self) -> u16 {
        u16::from_le_bytes([self.0[2], self.0[3]])
    }
    pub fn nsid(&self) -> u32 {
        self.dword_at(4)
    }
    /// Command dword `index` (0..=15).
    pub fn cdw(&self, index: usize) -> u32 {
        assert!(index < 16);
        self.dword_at(index * 4)
    }
    /// The Fabrics command type (byte 4 of a Fabrics command, opcode 0x7f).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    pub fn sgl(&self) -> SglDescriptor {
        SglDescriptor::from_bytes(&self.0[24..40])
    }
    pub fn byte_at(&self, offset: usize) -> u8 {
        self.0[offset]
    }
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.0[offset], self.0[offset + 1]])
    }
    pub fn dword_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.0[offset..offset + 4].try_into().expect("4 bytes"))
    }
    pub fn u64_at(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.0[offset..offset + 8].try_into().expect("8 bytes"))
    }

    pub fn set_opcode(&mut self, opcode: u8) -> &mut Self {
        self.0[0] = opcode;
        self
    }
    pub fn set_cid(&mut self, cid: u16) -> &mut Self {
        self.0[2..4].copy_from_slice(&cid.to_le_bytes());
        self
    }
    pub fn set_nsid(&mut self, nsid: u32) -> &mut Self {
        self.set_dword_at(4, nsid)
    }
    pub fn set_cdw(&mut self, index: usize, value: u32) -> &mut Self {
        assert!(index < 16);
        self.set_dword_at(index * 4, value)
    }
    pub fn set_fctype(&mut self, fctype: FabricsType) -> &mut Self {
        self.0[4] = fctype as u8;
        self
    }
    /// Sets the data pointer and PSDT = SGL (fabrics commands must use SGLs).
    pub fn set_sgl(&mut self, sgl: SglDescriptor) -> &mut Self {
        self.0[1] = (self.0[1] & 0x3f) | (PSDT_SGL << 6);
        self.0[24..40].copy_from_slice(&sgl.to_bytes());
        self
    }
    pub fn set_byte_at(&mut self, offset: usize, value: u8) -> &mut Self {
        self.0[offset] = value;
        self
    }
    pub fn set_u16_at(&mut self, offset: usize, value: u16) -> &mut Self {
        self.0[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
        self
    }
    pub fn set_dword_at(&mut self, offset: usize, value: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        self
    }
    pub fn set_u64_at(&mut self, offset: usize, value: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
        self
    }

    /// A Connect command (Fabrics figure 19); its 1024 bytes of [`ConnectData`] travel in the capsule.
    pub fn connect(cid: u16, qid: u16, sqsize_0based: u16, cattr: u8, kato_ms: u32) -> Command {
        let mut command = Command::zeroed();
        command
            .set_opcode(admin_opcode::FABRICS)
            .set_cid(cid)
            .set_fctype(FabricsType::Connect);
        command.set_sgl(SglDescriptor::InCapsule {
            offset: 0,
            length: CONNECT_DATA_BYTES as u32,
        });
        command
            .set_u16_at(40, 0)
            .set_u16_at(42, qid)
            .set_u16_at(44, sqsize_0based);
        command.set_byte_at(46, cattr).set_dword_at(48, kato_ms);
        command
    }

    /// A Property Get (Fabrics figure 31): `eight_bytes` selects a 64-bit property.
    pub fn property_get(cid: u16, offset: u32, eight_bytes: bool) -> Command {
        let mut command = Command::zeroed();
        command
            .set_opcode(admin_opcode::FABRICS)
            .set_cid(cid)
            .set_fctype(FabricsType::PropertyGet);
        command
            .set_byte_at(40, eight_bytes as u8)
            .set_dword_at(44, offset);
        command
    }

    /// A Property Set (Fabrics figure 33).
    pub fn property_set(cid: u16, offset: u32, eight_bytes: bool, value: u64) -> Command {
        let mut command = Command::zeroed();
        command
            .set_opcode(admin_opcode::FABRICS)
            .set_cid(cid)
            .set_fctype(FabricsType::PropertySet);
        command
            .set_byte_at(40, eight_bytes as u8)
            .set_dword_at(44, offset)
            .set_u64_at(48, value);
        command
    }

    /// A Read or Write (`opcode`) of `block_count` 512-byte LBAs from `lba`, with data described by `sgl`.
    pub fn read_write(
        opcode: u8,
        cid: u16,
        nsid: u32,
        lba: u64,
        block_count: u32,
        sgl: SglDescriptor,
    ) -> Command {
        assert!((1..=1 << 16).contains(&block_count));
        let mut command = Command::zeroed();
        command
            .set_opcode(opcode)
            .set_cid(cid)
            .set_nsid(nsid)
            .set_sgl(sgl);
        command.set_u64_at(40, lba).set_cdw(12, block_count - 1);
        command
    }
}

/// An SGL descriptor in the forms NVMe/TCP uses (TCP 1.0 section 3.4; Base 2.0 section 4.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SglDescriptor {
    /// Data Block descriptor, Offset subtype (identifier 0x01): data in the capsule at `offset`.
    InCapsule { offset: u64, length: u32 },
    /// Transport SGL Data Block, transport-specific subtype (identifier 0x5A): data moves in
    /// H2CData/C2HData PDUs.
    Transport { length: u32 },
    /// Any other descriptor identifier (invalid for NVMe/TCP data).
    Other {
        identifier: u8,
        address: u64,
        length: u32,
    },
}

/// SGL identifier byte of a Data Block descriptor with the Offset subtype.
pub const SGL_ID_DATA_BLOCK_OFFSET: u8 = 0x01;
/// SGL identifier byte of a Transport SGL Data Block with the transport-specific subtype.
pub const SGL_ID_TRANSPORT_DATA_BLOCK: u8 = 0x5a;

impl SglDescriptor {
    pub fn from_bytes(bytes: &[u8]) -> SglDescriptor {
        let address = u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes"));
        let length = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        match bytes[15] {
            SGL_ID_DATA_BLOCK_OFFSET => SglDescriptor::InCapsule {
                offset: address,
                length,
            },
            SGL_ID_TRANSPORT_DATA_BLOCK => SglDescriptor::Transport { length },
            identifier => SglDescriptor::Other {
                identifier,
                address,
                length,
            },
        }
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let (address, length, identifier) = match *self {
            SglDescriptor::InCapsule { offset, length } => {
                (offset, length, SGL_ID_DATA_BLOCK_OFFSET)
            }
            SglDescriptor::Transport { length } => (0, length, SGL_ID_TRANSPORT_DATA_BLOCK),
            SglDescriptor::Other {
                identifier,
                address,
                length,
            } => (address, length, identifier),
        };
        let mut bytes = [0; 16];
        bytes[0..8].copy_from_slice(&address.to_le_bytes());
        bytes[8..12].copy_from_slice(&length.to_le_bytes());
        bytes[15] = identifier;
        bytes
    }

    pub fn length(&self) -> u32 {
        match *self {
            SglDescriptor::InCapsule { length, .. }
            | SglDescriptor::Transport { length }
            | SglDescriptor::Other { length, .. } => length,
        }
    }
}

/// The Connect command's data (Fabrics figure 20).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    /// 0xFFFF on the admin queue asks for a dynamic controller; an I/O queue names its controller.
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

impl ConnectData {
    /// Parses the 1024-byte data; an NQN that is not NUL-terminated UTF-8 reports its field offset.
    pub fn decode(bytes: &[u8]) -> Result<ConnectData, u16> {
        assert!(bytes.len() >= CONNECT_DATA_BYTES);
        Ok(ConnectData {
            hostid: bytes[0..16].try_into().expect("16 bytes"),
            cntlid: u16::from_le_bytes([bytes[16], bytes[17]]),
            subnqn: nqn_field(&bytes[256..512]).ok_or(connect_data_offset::SUBNQN)?,
            hostnqn: nqn_field(&bytes[512..768]).ok_or(connect_data_offset::HOSTNQN)?,
        })
    }

    pub fn encode_into(&self, bytes: &mut [u8]) {
        assert!(bytes.len() >= CONNECT_DATA_BYTES);
        assert!(self.subnqn.len() < NQN_FIELD_BYTES && self.hostnqn.len() < NQN_FIELD_BYTES);
        bytes[..CONNECT_DATA_BYTES].fill(0);
        bytes[0..16].copy_from_slice(&self.hostid);
        bytes[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        bytes[256..256 + self.subnqn.len()].copy_from_slice(self.subnqn.as_bytes());
        bytes[512..512 + self.hostnqn.len()].copy_from_slice(self.hostnqn.as_bytes());
    }
}

fn nqn_field(field: &[u8]) -> Option<String> {
    let end = field.iter().position(|&byte| byte == 0)?;
    std::str::from_utf8(&field[..end]).ok().map(str::to_owned)
}

/// Status code type (Base 2.0, figure 100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCodeType {
    Generic,
    CommandSpecific,
    MediaError,
    PathRelated,
    VendorSpecific,
    Reserved(u8),
}

impl StatusCodeType {
    pub fn to_bits(self) -> u8 {
        match self {
            StatusCodeType::Generic => 0,
            StatusCodeType::CommandSpecific => 1,
            StatusCodeType::MediaError => 2,
            StatusCodeType::PathRelated => 3,
            StatusCodeType::VendorSpecific => 7,
            StatusCodeType::Reserved(bits) => bits,
        }
    }
    pub fn from_bits(bits: u8) -> StatusCodeType {
        match bits & 7 {
            0 => StatusCodeType::Generic,
            1 => StatusCodeType::CommandSpecific,
            2 => StatusCodeType::MediaError,
            3 => StatusCodeType::PathRelated,
            7 => StatusCodeType::VendorSpecific,
            bits => StatusCodeType::Reserved(bits),
        }
    }
}

/// Generic command status values (Base 2.0 figure 102; NVM command set figure 21 for 0x80..).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GenericStatus {
    Success = 0x00,
    InvalidOpcode = 0x01,
    InvalidField = 0x02,
    CommandIdConflict = 0x03,
    DataTransferError = 0x04,
    InternalError = 0x06,
    AbortRequested = 0x07,
    /// The command's submission queue was deleted (a controller reset deletes them all).
    AbortedSqDeletion = 0x08,
    InvalidNamespaceOrFormat = 0x0b,
    CommandSequenceError = 0x0c,
    DataSglLengthInvalid = 0x0f,
    SglDescriptorTypeInvalid = 0x11,
    SglOffsetInvalid = 0x16,
    KeepAliveTimerExpired = 0x19,
    KeepAliveTimeoutInvalid = 0x1a,
    TransientTransportError = 0x22,
    LbaOutOfRange = 0x80,
    CapacityExceeded = 0x81,
    NamespaceNotReady = 0x82,
}

/// Command specific status values (Base 2.0 figure 103; Fabrics figure 12 for 0x80..).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CommandSpecificStatus {
    InvalidQueueIdentifier = 0x01,
    InvalidQueueSize = 0x02,
    AsyncEventRequestLimitExceeded = 0x05,
    InvalidLogPage = 0x09,
    FeatureIdNotSaveable = 0x0d,
    FeatureNotChangeable = 0x0e,
    FeatureNotNamespaceSpecific = 0x0f,
    ConnectIncompatibleFormat = 0x80,
    ConnectControllerBusy = 0x81,
    ConnectInvalidParameters = 0x82,
    ConnectRestartDiscovery = 0x83,
    ConnectInvalidHost = 0x84,
}

/// Path related status values (SCT 3h; Base 2.0 figure 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PathStatus {
    InternalPathError = 0x00,
    AsymmetricAccessPersistentLoss = 0x01,
    /// What a source answers a write with while its replica is lost under the `fail` policy.
    /// Linux's `nvme_decide_disposition` fails over (requeues on another path) any status whose
    /// type is Path Related (`nvme_is_path_error`: SCT 3h) with DNR clear, and this one is also
    /// in `nvme_is_ana_error` (an ANA-capable host re-reads the ANA log) and maps to
    /// BLK_STS_NEXUS, which `blk_path_error` counts as a path error for dm-multipath. Namespace
    /// Not Ready (a generic status) would only be retried on the same path.
    AsymmetricAccessInaccessible = 0x02,
    AsymmetricAccessTransition = 0x03,
    ControllerPathingError = 0x60,
    HostPathingError = 0x70,
}

/// A completion status: SCT/SC plus the DNR and More bits (phase is reserved on fabrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub sct: StatusCodeType,
    pub sc: u8,
    pub dnr: bool,
    pub more: bool,
}

impl Status {
    pub const SUCCESS: Status = Status {
        sct: StatusCodeType::Generic,
        sc: 0,
        dnr: false,
        more: false,
    };

    pub fn generic(code: GenericStatus) -> Status {
        // A command aborted with its queue may succeed when submitted again on a new one.
        let dnr = !matches!(
            code,
            GenericStatus::Success
                | GenericStatus::TransientTransportError
                | GenericStatus::AbortedSqDeletion
        );
        Status {
            sct: StatusCodeType::Generic,
            sc: code as u8,
            dnr,
            more: false,
        }
    }

    pub fn command_specific(code: CommandSpecificStatus) -> Status {
        Status {
            sct: StatusCodeType::CommandSpecific,
            sc: code as u8,
            dnr: true,
            more: false,
        }
    }

    /// A path status, DNR clear: the host may retry the command on another path (Base 2.0
    /// section 8.1.3 "Path Related Status").
    pub fn path(code: PathStatus) -> Status {
        Status {
            sct: StatusCodeType::PathRelated,
            sc: code as u8,
            dnr: false,
            more: false,
        }
    }

    pub fn is_success(&self) -> bool {
        self.sct == StatusCodeType::Generic && self.sc == 0
    }

    /// The 15 status bits above the phase bit, as in CQE dword 3 bits 31:17.
    pub fn to_field(&self) -> u16 {
        ((self.sc as u16) << 1)
            | ((self.sct.to_bits() as u16) << 9)
            | ((self.more as u16) << 14)
            | ((self.dnr as u16) << 15)
    }

    pub fn from_field(field: u16) -> Status {
        Status {
            sc: (field >> 1) as u8,
            sct: StatusCodeType::from_bits((field >> 9) as u8),
            more: field & (1 << 14) != 0,
            dnr: field & (1 << 15) != 0,
        }
    }
}

impl From<GenericStatus> for Status {
    fn from(code: GenericStatus) -> Status {
        Status::generic(code)
    }
}

impl From<CommandSpecificStatus> for Status {
    fn from(code: CommandSpecificStatus) -> Status {
        Status::command_specific(code)
    }
}

/// A 16-byte completion queue entry. `dw0`/`dw1` hold command-specific results (e.g. a Property Get
/// value spans both; a Connect response carries CNTLID or IATTR/IPO in `dw0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub phase: bool,
    pub status: Status,
}

impl Completion {
    pub fn new(cid: u16, status: Status) -> Completion {
        Completion {
            dw0: 0,
            dw1: 0,
            sqhd: 0,
            sqid: 0,
            cid,
            phase: false,
            status,
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> Completion {
        let field = u16::from_le_bytes([bytes[14], bytes[15]]);
        Completion {
            dw0: u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")),
            dw1: u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")),
            sqhd: u16::from_le_bytes([bytes[8], bytes[9]]),
            sqid: u16::from_le_bytes([bytes[10], bytes[11]]),
            cid: u16::from_le_bytes([bytes[12], bytes[13]]),
            phase: field & 1 != 0,
            status: Status::from_field(field & !1),
        }
    }

    pub fn write_to(&self, bytes: &mut [u8]) {
        bytes[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        bytes[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        bytes[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.cid.to_le_bytes());
        bytes[14..16].copy_from_slice(&(self.status.to_field() | self.phase as u16).to_le_bytes());
    }

    /// The Connect response's error locator (NVMe-oF, Connect response dword 0): IPO, the byte
    /// offset of the invalid parameter, in bits 15:0; IATTR in bits 23:16 (0 = in the command,
    /// 1 = in the Connect data), as Linux nvmet and SPDK lay it out.
    pub fn connect_invalid_parameter(cid: u16, in_data: bool, offset: u16) -> Completion {
        let mut completion =
            Completion::new(cid, CommandSpecificStatus::ConnectInvalidParameters.into());
        completion.dw0 = ((in_data as u32) << 16) | offset as u32;
        completion
    }
}
