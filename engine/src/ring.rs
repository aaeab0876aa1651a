//! The NVRAM ring: the on-ring format of log entries and the append / scan logic (claims 8, 10, 17:
//! "a log entry per write"; engine spec "Ring format"). The memory is whatever the runtime maps
//! (a hugetlbfs file surviving a process crash like NVRAM survives a controller reset).
//!
//! Appends are two-step so data can be received straight into the ring: [`NvramRing::reserve`],
//! fill [`NvramRing::data_mut`], [`NvramRing::commit`] (CRCs, header written last). Only the committed
//! prefix in seq order counts. [`NvramRing::open`] validates what a crash left and returns the
//! entries newer than the last completed CP, which the caller replays.
//!
//! Entry header (64 B, little endian):
//!
//! | offset | size | field                                                   |
//! |-------:|-----:|---------------------------------------------------------|
//! |      0 |    4 | magic `ENTRY_MAGIC`                                     |
//! |      4 |    2 | format version                                          |
//! |      6 |    2 | flags (`ENTRY_FLAG_ZEROES`: no data, sectors are zero)  |
//! |      8 |    8 | seq (global, +1 per entry, never reused)                |
//! |     16 |    8 | cp_number                                               |
//! |     24 |    8 | transfer_id                                             |
//! |     32 |    4 | nsid (1-based)                                          |
//! |     36 |    4 | length_bytes (multiple of 512)                          |
//! |     40 |    8 | lba (512 B sectors)                                     |
//! |     48 |    4 | data_offset (in the half's data area)                   |
//! |     52 |    4 | data_crc (CRC32C of the data; of nothing for ZEROES)    |
//! |     56 |    4 | padding, must be zero                                   |
//! |     60 |    4 | header_crc (CRC32C of bytes 0..60)                      |
//!
//! Superblock copy (4 KiB; bytes after 100 are zero and not covered):
//! magic "NVMRSUPR" @0, format version u32 @8, zero u32 @12, generation u64 @16, ring_bytes u64 @24,
//! half_header_slots u32 @32, half_data_bytes u32 @36, volume_id [16] @40, epoch u64 @56,
//! cp_completed u64 @64, transfer_id_floor u64 @72, seq_floor u64 @80, zero u64 @88,
//! crc u32 @96 (CRC32C of bytes 0..96). Generation g is written to copy `g % 2`, so an update always
//! overwrites the older copy and a torn update leaves the previous one intact.

use std::fmt;

use crate::checksum::{crc32c, le_u16, le_u32, le_u64};
use crate::geometry::{
    half_of_cp, RingGeometry, BLOCK_SIZE, ENTRY_HEADER_BYTES, SECTOR_SIZE, SUPERBLOCK_AREA_BYTES,
    SUPERBLOCK_BYTES, WRITE_BYTES_MAX, WRITE_ZEROES_BYTES_MAX,
};

/// "NVME" in little endian: an entry header.
pub const ENTRY_MAGIC: u32 = u32::from_le_bytes(*b"NVME");
/// The entry header format this code writes and reads.
pub const ENTRY_FORMAT_VERSION: u16 = 1;
/// Entry flag: the entry carries no data; its sectors are zero.
pub const ENTRY_FLAG_ZEROES: u16 = 1;
/// The superblock magic.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"NVMRSUPR";
/// The superblock format this code writes and reads.
pub const SUPERBLOCK_FORMAT_VERSION: u32 = 1;

const SUPERBLOCK_CRC_OFFSET: usize = 96;
const ENTRY_CRC_OFFSET: usize = 60;
const _: () = assert!(ENTRY_CRC_OFFSET + 4 == ENTRY_HEADER_BYTES);
const _: () = assert!(SUPERBLOCK_CRC_OFFSET + 4 <= SUPERBLOCK_BYTES as usize);

/// One log entry's header, as stored in a half's header area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    pub flags: u16,
    pub seq: u64,
    pub cp_number: u64,
    pub transfer_id: u64,
    pub nsid: u32,
    pub length_bytes: u32,
    pub lba: u64,
    pub data_offset: u32,
    pub data_crc: u32,
}

/// Why a stored entry header is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFault {
    /// All 64 bytes zero: a released or never-written slot.
    Empty,
    BadMagic,
    BadVersion,
    HeaderCrc,
    Padding,
    UnknownFlags,
    BadLength,
}

impl fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "empty slot",
            Self::BadMagic => "bad magic",
            Self::BadVersion => "unknown format version",
            Self::HeaderCrc => "header crc mismatch",
            Self::Padding => "nonzero padding",
            Self::UnknownFlags => "unknown flags",
            Self::BadLength => "bad length",
        })
    }
}

/// Bytes of data an entry with these flags and length carries (none for write-zeroes), in the
/// ring and on the wire alike.
pub(crate) fn entry_data_bytes(flags: u16, length_bytes: u32) -> u32 {
    if flags & ENTRY_FLAG_ZEROES != 0 {
        0
    } else {
        length_bytes
    }
}

impl EntryHeader {
    /// True if the entry means "these sectors are zero" and has no data.
    pub fn is_zeroes(&self) -> bool {
        self.flags & ENTRY_FLAG_ZEROES != 0
    }

    /// Bytes the entry occupies in the data area.
    pub fn data_bytes(&self) -> u32 {
        entry_data_bytes(self.flags, self.length_bytes)
    }

    /// Byte offset of the entry in its namespace.
    pub fn offset_bytes(&self) -> u64 {
        self.lba * SECTOR_SIZE as u64
    }

    /// Writes the 64-byte header, sealing it with its CRC.
    pub fn encode(&self, out: &mut [u8; ENTRY_HEADER_BYTES]) {
        out[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&ENTRY_FORMAT_VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.cp_number.to_le_bytes());
        out[24..32].copy_from_slice(&self.transfer_id.to_le_bytes());
        out[32..36].copy_from_slice(&self.nsid.to_le_bytes());
        out[36..40].copy_from_slice(&self.length_bytes.to_le_bytes());
        out[40..48].copy_from_slice(&self.lba.to_le_bytes());
        out[48..52].copy_from_slice(&self.data_offset.to_le_bytes());
        out[52..56].copy_from_slice(&self.data_crc.to_le_bytes());
        out[56..60].fill(0);
        let crc = crc32c(&out[..ENTRY_CRC_OFFSET]);
        out[ENTRY_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads and validates a 64-byte header (magic, version, CRC, padding, flags, length).
    pub fn decode(bytes: &[u8; ENTRY_HEADER_BYTES]) -> Result<Self, HeaderFault> {
        if bytes.iter().all(|&b| b == 0) {
            return Err(HeaderFault::Empty);
        }
        if le_u32(bytes, 0) != ENTRY_MAGIC {
            return Err(HeaderFault::BadMagic);
        }
        if le_u32(bytes, ENTRY_CRC_OFFSET) != crc32c(&bytes[..ENTRY_CRC_OFFSET]) {
            return Err(HeaderFault::HeaderCrc);
        }
        if le_u16(bytes, 4) != ENTRY_FORMAT_VERSION {
            return Err(HeaderFault::BadVersion);
        }
        if bytes[56..60] != [0; 4] {
            return Err(HeaderFault::Padding);
        }
        let header = Self {
            flags: le_u16(bytes, 6),
            seq: le_u64(bytes, 8),
            cp_number: le_u64(bytes, 16),
            transfer_id: le_u64(bytes, 24),
            nsid: le_u32(bytes, 32),
            length_bytes: le_u32(bytes, 36),
            lba: le_u64(bytes, 40),
            data_offset: le_u32(bytes, 48),
            data_crc: le_u32(bytes, 52),
        };
        if header.flags & !ENTRY_FLAG_ZEROES != 0 {
            return Err(HeaderFault::UnknownFlags);
        }
        if !entry_length_valid(header.length_bytes, header.is_zeroes()) {
            return Err(HeaderFault::BadLength);
        }
        Ok(header)
    }
}

/// True if `length_bytes` is a valid entry length (ZEROES entries may be longer: they hold no data).
pub fn entry_length_valid(length_bytes: u32, zeroes: bool) -> bool {
    let max = if zeroes {
        WRITE_ZEROES_BYTES_MAX
    } else {
        WRITE_BYTES_MAX as u64
    };
    length_bytes > 0
        && (length_bytes as usize).is_multiple_of(SECTOR_SIZE)
        && u64::from(length_bytes) <= max
}

/// The placement rule: the smallest offset ≥ `cursor` congruent to the write's offset modulo
/// 4 KiB, so every block an entry wholly covers sits block-aligned in the data area.
pub fn placement_offset(cursor: u64, lba: u64) -> u64 {
    let target = (lba * SECTOR_SIZE as u64) % BLOCK_SIZE as u64;
    let current = cursor % BLOCK_SIZE as u64;
    cursor + (target + BLOCK_SIZE as u64 - current) % BLOCK_SIZE as u64
}

/// The persistent state of a ring (one superblock copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    pub generation: u64,
    pub geometry: RingGeometry,
    pub volume_id: [u8; 16],
    pub epoch: u64,
    pub cp_completed: u64,
    /// Transfer IDs below this were used before (a restarted source starts at or above it).
    pub transfer_id_floor: u64,
    /// Seq numbers below this were used before.
    pub seq_floor: u64,
}

impl Superblock {
    fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), SUPERBLOCK_BYTES as usize);
        out.fill(0);
        out[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        out[8..12].copy_from_slice(&SUPERBLOCK_FORMAT_VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.generation.to_le_bytes());
        out[24..32].copy_from_slice(&self.geometry.ring_bytes.to_le_bytes());
        out[32..36].copy_from_slice(&self.geometry.half_header_slots.to_le_bytes());
        out[36..40].copy_from_slice(&self.geometry.half_data_bytes.to_le_bytes());
        out[40..56].copy_from_slice(&self.volume_id);
        out[56..64].copy_from_slice(&self.epoch.to_le_bytes());
        out[64..72].copy_from_slice(&self.cp_completed.to_le_bytes());
        out[72..80].copy_from_slice(&self.transfer_id_floor.to_le_bytes());
        out[80..88].copy_from_slice(&self.seq_floor.to_le_bytes());
        let crc = crc32c(&out[..SUPERBLOCK_CRC_OFFSET]);
        out[SUPERBLOCK_CRC_OFFSET..SUPERBLOCK_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let crc_ok =
            le_u32(bytes, SUPERBLOCK_CRC_OFFSET) == crc32c(&bytes[..SUPERBLOCK_CRC_OFFSET]);
        let header_ok = bytes[0..8] == SUPERBLOCK_MAGIC
            && le_u32(bytes, 8) == SUPERBLOCK_FORMAT_VERSION
            && le_u32(bytes, 12) == 0
            && le_u64(bytes, 88) == 0;
        if !(crc_ok && header_ok) {
            return None;
        }
        let mut volume_id = [0; 16];
        volume_id.copy_from_slice(&bytes[40..56]);
        Some(Self {
            generation: le_u64(bytes, 16),
            geometry: RingGeometry {
                ring_bytes: le_u64(bytes, 24),
                half_header_slots: le_u32(bytes, 32),
                half_data_bytes: le_u32(bytes, 36),
            },
            volume_id,
            epoch: le_u64(bytes, 56),
            cp_completed: le_u64(bytes, 64),
            transfer_id_floor: le_u64(bytes, 72),
            seq_floor: le_u64(bytes, 80),
        })
    }
}

/// Why a ring could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// Neither superblock copy is valid: the runtime formats a fresh ring.
    NoSuperblock,
    /// The superblock's geometry is not the one its ring size gives.
    Geometry(crate::geometry::GeometryError),
    /// The memory is not the size the superblock says.
    SizeMismatch { memory_bytes: u64, ring_bytes: u64 },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuperblock => f.write_str("no valid superblock"),
            Self::Geometry(error) => write!(f, "ring geometry: {error}"),
            Self::SizeMismatch {
                memory_bytes,
                ring_bytes,
            } => write!(
                f,
                "ring memory is {memory_bytes} bytes but the superblock says {ring_bytes}"
            ),
        }
    }
}

/// The half of the active CP has no header slot or data space left for the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingFull;

/// What an entry is, given to [`NvramRing::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRequest {
    pub cp_number: u64,
    pub transfer_id: u64,
    pub nsid: u32,
    pub lba: u64,
    pub length_bytes: u32,
    pub zeroes: bool,
}

/// A reserved, not yet committed entry.
#[derive(Debug, PartialEq, Eq)]
pub struct EntrySlot {
    half: usize,
    slot: u32,
    header: EntryHeader,
}

impl EntrySlot {
    pub fn half(&self) -> usize {
        self.half
    }
    pub fn slot(&self) -> u32 {
        self.slot
    }
    pub fn seq(&self) -> u64 {
        self.header.seq
    }
    pub fn data_offset(&self) -> u32 {
        self.header.data_offset
    }
    /// The header the commit will write (data_crc still zero).
    pub fn header(&self) -> &EntryHeader {
        &self.header
    }
}

/// In-memory cursors of one half.
#[derive(Debug)]
struct HalfState {
    /// The CP using the half; 0 = free.
    cp_number: u64,
    slots_used: u32,
    data_cursor: u32,
    first_seq: u64,
    committed: Vec<bool>,
    committed_prefix: u32,
}

impl HalfState {
    fn new(slots: u32) -> Self {
        Self {
            cp_number: 0,
            slots_used: 0,
            data_cursor: 0,
            first_seq: 0,
            committed: vec![false; slots as usize],
            committed_prefix: 0,
        }
    }

    fn reset(&mut self) {
        self.committed[..self.slots_used as usize].fill(false);
        self.cp_number = 0;
        self.slots_used = 0;
        self.data_cursor = 0;
        self.first_seq = 0;
        self.committed_prefix = 0;
    }
}

/// Memory an NVRAM ring can live in (the runtime's mapping, a `Vec<u8>` in tests).
pub trait RingStore: AsRef<[u8]> + AsMut<[u8]> {
    /// A hint that the bytes at `offset` are written soon: memory that can be prefetched starts
    /// fetching their cache line (an entry's header line was last touched a whole ring ago, and
    /// its store missed the cache: 3.5% of the embedded pair's core at QD32 in
    /// `NvramRing::commit_with_crc`, nearly all on that store). A no-op by default.
    fn prefetch_for_write(&self, _offset: usize) {}

    /// Stores `data` at `offset` for a reader that comes much later (a destination's log, read
    /// back at its CP a ring half later): memory that can bypass the cache does (non-temporal
    /// stores do not first read each line they overwrite), ordered by [`RingStore::fence_streamed`].
    fn store_streamed(&mut self, offset: usize, data: &[u8]) {
        self.as_mut()[offset..offset + data.len()].copy_from_slice(data);
    }

    /// Orders every earlier [`RingStore::store_streamed`] before the stores that follow.
    fn fence_streamed(&self) {}
}

impl RingStore for Vec<u8> {}

/// The NVRAM ring over memory `M` (the runtime's mapping, or a `Vec<u8>` in tests).
pub struct NvramRing<M> {
    memory: M,
    geometry: RingGeometry,
    superblock: Superblock,
    halves: [HalfState; 2],
    next_seq: u64,
}

impl<M: RingStore> NvramRing<M> {
    /// Writes a fresh superblock and empty header areas.
    pub fn format(mut memory: M, geometry: RingGeometry, volume_id: [u8; 16], epoch: u64) -> Self {
        geometry.validate().expect("format needs a valid geometry");
        assert_eq!(memory.as_ref().len() as u64, geometry.ring_bytes);
        memory.as_mut()[..SUPERBLOCK_AREA_BYTES as usize].fill(0);
        let superblock = Superblock {
            generation: 0,
            geometry,
            volume_id,
            epoch,
            cp_completed: 0,
            transfer_id_floor: 1,
            seq_floor: 1,
        };
        let mut ring = Self::with_superblock(memory, superblock);
        for half in 0..2 {
            ring.zero_headers_from(half, 0);
        }
        ring.write_superblock();
        ring
    }

    /// Validates the superblock and scans the halves of CPs `cp_completed + 1` and `+ 2`.
    /// Returns the ring (positioned after the valid entries, which it adopts) and those entries
    /// in seq order: what must be replayed. Header slots after the valid prefix are zeroed so a
    /// torn or stale header can never be mistaken for a later entry.
    pub fn open(memory: M) -> Result<(Self, Vec<EntryHeader>), RingError> {
        let superblock = Self::probe(memory.as_ref())?;
        let mut ring = Self::with_superblock(memory, superblock);
        let completed = superblock.cp_completed;
        let first = ring.scan_half(completed + 1, None);
        let second = match first.last() {
            Some(last) => ring.scan_half(completed + 2, Some(last.seq + 1)),
            None => Vec::new(),
        };
        ring.adopt(completed + 1, &first);
        ring.adopt(completed + 2, &second);
        let mut entries = first;
        entries.extend_from_slice(&second);
        // After the last valid entry (a torn reservation's seq was never transferred, so it is
        // reused: the sequence stays gap-free, which scan and the destination rely on).
        ring.next_seq = entries.last().map_or(superblock.seq_floor, |e| e.seq + 1);
        Ok((ring, entries))
    }

    /// Validates the superblock area of `bytes` and returns the newest valid superblock.
    pub fn probe(bytes: &[u8]) -> Result<Superblock, RingError> {
        if (bytes.len() as u64) < SUPERBLOCK_AREA_BYTES {
            return Err(RingError::NoSuperblock);
        }
        let copy_a = Superblock::decode(&bytes[..SUPERBLOCK_BYTES as usize]);
        let copy_b =
            Superblock::decode(&bytes[SUPERBLOCK_BYTES as usize..SUPERBLOCK_AREA_BYTES as usize]);
        let superblock = match (copy_a, copy_b) {
            (Some(a), Some(b)) => {
                if a.generation >= b.generation {
                    a
                } else {
                    b
                }
            }
            (Some(a), None) => a,
            (None, Some(b)) => b,
            (None, None) => return Err(RingError::NoSuperblock),
        };
        superblock
            .geometry
            .validate()
            .map_err(RingError::Geometry)?;
        if superblock.geometry.ring_bytes != bytes.len() as u64 {
            return Err(RingError::SizeMismatch {
                memory_bytes: bytes.len() as u64,
                ring_bytes: superblock.geometry.ring_bytes,
            });
        }
        Ok(superblock)
    }

    fn with_superblock(memory: M, superblock: Superblock) -> Self {
        let slots = superblock.geometry.half_header_slots;
        Self {
            memory,
            geometry: superblock.geometry,
            superblock,
            halves: [HalfState::new(slots), HalfState::new(slots)],
            next_seq: superblock.seq_floor.max(1),
        }
    }

    /// Reads the headers of `cp_number`'s half in slot order while they are valid and continue
    /// the sequence; the first invalid one ends the scan (with a warning unless it is a plain end).
    fn scan_half(&self, cp_number: u64, first_seq: Option<u64>) -> Vec<EntryHeader> {
        let half = half_of_cp(cp_number);
        let mut entries = Vec::new();
        let mut expected_seq = first_seq;
        let mut cursor = 0u64;
        for slot in 0..self.geometry.half_header_slots {
            let header = match EntryHeader::decode(&self.header_bytes(half, slot)) {
                Ok(header) => header,
                Err(HeaderFault::Empty) => break,
                Err(fault) => {
                    warn_torn(half, slot, expected_seq, &fault.to_string());
                    break;
                }
            };
            if header.cp_number != cp_number {
                log::debug!(
                    "ring: half {half} ends at slot {slot} (entry of cp {})",
                    header.cp_number
                );
                break;
            }
            if expected_seq.is_some_and(|seq| seq != header.seq) {
                warn_torn(half, slot, expected_seq, "seq discontinuity");
                break;
            }
            if let Err(reason) = self.check_entry_data(half, cursor, &header) {
                warn_torn(half, slot, Some(header.seq), reason);
                break;
            }
            if !header.is_zeroes() {
                cursor = u64::from(header.data_offset) + u64::from(header.length_bytes);
            }
            expected_seq = Some(header.seq + 1);
            entries.push(header);
        }
        entries
    }

    fn check_entry_data(
        &self,
        half: usize,
        cursor: u64,
        header: &EntryHeader,
    ) -> Result<(), &'static str> {
        let expected_offset = if header.is_zeroes() {
            cursor
        } else {
            placement_offset(cursor, header.lba)
        };
        if u64::from(header.data_offset) != expected_offset {
            return Err("misplaced data");
        }
        let end = u64::from(header.data_offset) + u64::from(header.data_bytes());
        if end > u64::from(self.geometry.half_data_bytes) {
            return Err("data out of range");
        }
        let start = (self.geometry.data_area_offset(half) + u64::from(header.data_offset)) as usize;
        let data = &self.memory.as_ref()[start..start + header.data_bytes() as usize];
        if crc32c(data) != header.data_crc {
            return Err("data crc mismatch");
        }
        Ok(())
    }

    /// Makes the scanned entries of `cp_number` the half's committed content.
    fn adopt(&mut self, cp_number: u64, entries: &[EntryHeader]) {
        let half = half_of_cp(cp_number);
        let state = &mut self.halves[half];
        state.reset();
        if let Some(first) = entries.first() {
            state.cp_number = cp_number;
            state.first_seq = first.seq;
            state.slots_used = entries.len() as u32;
            state.committed_prefix = entries.len() as u32;
            state.committed[..entries.len()].fill(true);
            state.data_cursor = entries
                .iter()
                .filter(|e| !e.is_zeroes())
                .map(|e| e.data_offset + e.length_bytes)
                .max()
                .unwrap_or(0);
        }
        let used = self.halves[half].slots_used;
        self.zero_headers_from(half, used);
    }

    fn zero_headers_from(&mut self, half: usize, slot: u32) {
        if slot >= self.geometry.half_header_slots {
            return;
        }
        let start = self.geometry.header_offset(half, slot) as usize;
        let end = self.geometry.data_area_offset(half) as usize;
        self.memory.as_mut()[start..end].fill(0);
    }

    fn header_bytes(&self, half: usize, slot: u32) -> [u8; ENTRY_HEADER_BYTES] {
        let start = self.geometry.header_offset(half, slot) as usize;
        let mut bytes = [0; ENTRY_HEADER_BYTES];
        bytes.copy_from_slice(&self.memory.as_ref()[start..start + ENTRY_HEADER_BYTES]);
        bytes
    }

    /// Reserves a header slot and data space in the half of `request.cp_number`.
    pub fn reserve(&mut self, request: &EntryRequest) -> Result<EntrySlot, RingFull> {
        assert!(entry_length_valid(request.length_bytes, request.zeroes));
        assert!(request.nsid >= 1);
        let half = half_of_cp(request.cp_number);
        let geometry = self.geometry;
        let state = &mut self.halves[half];
        assert!(
            state.cp_number == 0 || state.cp_number == request.cp_number,
            "half busy with another CP"
        );
        if state.slots_used == geometry.half_header_slots {
            return Err(RingFull);
        }
        let cursor = u64::from(state.data_cursor);
        let data_offset = if request.zeroes {
            cursor
        } else {
            placement_offset(cursor, request.lba)
        };
        let data_bytes = if request.zeroes {
            0
        } else {
            u64::from(request.length_bytes)
        };
        if data_offset + data_bytes > u64::from(geometry.half_data_bytes) {
            return Err(RingFull);
        }
        if state.slots_used == 0 {
            state.cp_number = request.cp_number;
            state.first_seq = self.next_seq;
        }
        let slot = state.slots_used;
        state.slots_used += 1;
        // The header is written at commit, after the entry's data: its line is fetched meanwhile.
        self.memory
            .prefetch_for_write(geometry.header_offset(half, slot) as usize);
        if !request.zeroes {
            state.data_cursor = (data_offset + data_bytes) as u32;
        }
        let header = EntryHeader {
            flags: if request.zeroes { ENTRY_FLAG_ZEROES } else { 0 },
            seq: self.next_seq,
            cp_number: request.cp_number,
            transfer_id: request.transfer_id,
            nsid: request.nsid,
            length_bytes: request.length_bytes,
            lba: request.lba,
            data_offset: data_offset as u32,
            data_crc: 0,
        };
        self.next_seq += 1;
        Ok(EntrySlot { half, slot, header })
    }

    /// Copies `data` into a reserved entry's data at `offset`. A plain copy, on purpose: the
    /// entry is read back at once (its CRC, the primary write, the send to the destination), so it
    /// must stay in the cache; streaming stores here tripled the CRC's share of the write path.
    pub fn store_data(&mut self, slot: &EntrySlot, offset: usize, data: &[u8]) {
        let start = self.store_start(slot, offset, data.len());
        self.memory.as_mut()[start..start + data.len()].copy_from_slice(data);
    }

    /// [`NvramRing::store_data`] with [`RingStore::store_streamed`]: for data this process
    /// reads back only much later. [`NvramRing::fence_streamed`] before it is reported stored.
    pub fn store_data_streamed(&mut self, slot: &EntrySlot, offset: usize, data: &[u8]) {
        let start = self.store_start(slot, offset, data.len());
        self.memory.store_streamed(start, data);
    }

    /// The ring offset of byte `offset` of a reserved entry's data, for a store of `length`.
    fn store_start(&self, slot: &EntrySlot, offset: usize, length: usize) -> usize {
        assert!(
            offset + length <= slot.header.data_bytes() as usize,
            "store past the entry"
        );
        self.data_start(slot) + offset
    }

    fn data_start(&self, slot: &EntrySlot) -> usize {
        (self.geometry.data_area_offset(slot.half) + u64::from(slot.header.data_offset)) as usize
    }

    /// Orders the streamed stores before whatever this thread stores or sends next.
    pub fn fence_streamed(&self) {
        self.memory.fence_streamed();
    }

    pub fn data_mut(&mut self, slot: &EntrySlot) -> &mut [u8] {
        let start = self.data_start(slot);
        &mut self.memory.as_mut()[start..start + slot.header.data_bytes() as usize]
    }

    /// Seals a reserved entry: data CRC, then the header. Returns the half's committed prefix
    /// (in slots) after the commit.
    pub fn commit(&mut self, slot: &EntrySlot) -> u32 {
        self.commit_with_crc(slot, self.data_crc(slot))
    }

    /// CRC32C of a reserved entry's data as it is now.
    pub fn data_crc(&self, slot: &EntrySlot) -> u32 {
        crc32c(self.slot_data(slot))
    }

    fn slot_data(&self, slot: &EntrySlot) -> &[u8] {
        let start = self.data_start(slot);
        &self.memory.as_ref()[start..start + slot.header.data_bytes() as usize]
    }

    /// Seals a reserved entry whose data CRC the caller already verified (the destination
    /// checks a transfer's data as received, before storing any of it).
    pub fn commit_with_crc(&mut self, slot: &EntrySlot, data_crc: u32) -> u32 {
        let state = &self.halves[slot.half];
        assert_eq!(
            state.cp_number, slot.header.cp_number,
            "slot of a released half"
        );
        assert_eq!(state.first_seq + u64::from(slot.slot), slot.header.seq);
        assert!(
            !state.committed[slot.slot as usize],
            "entry committed twice"
        );
        let mut header = slot.header;
        header.data_crc = data_crc;
        let mut bytes = [0; ENTRY_HEADER_BYTES];
        header.encode(&mut bytes);
        let header_start = self.geometry.header_offset(slot.half, slot.slot) as usize;
        self.memory.as_mut()[header_start..header_start + ENTRY_HEADER_BYTES]
            .copy_from_slice(&bytes);
        let state = &mut self.halves[slot.half];
        state.committed[slot.slot as usize] = true;
        while state.committed_prefix < state.slots_used
            && state.committed[state.committed_prefix as usize]
        {
            state.committed_prefix += 1;
        }
        state.committed_prefix
    }

    pub fn committed_slots(&self, half: usize) -> u32 {
        self.halves[half].committed_prefix
    }

    /// Slots of `half` reserved so far.
    pub fn reserved_slots(&self, half: usize) -> u32 {
        self.halves[half].slots_used
    }

    /// The CP using `half` (0 = free).
    pub fn half_cp(&self, half: usize) -> u64 {
        self.halves[half].cp_number
    }

    /// The data cursor of `half`: every entry's data lies below it.
    pub fn data_cursor(&self, half: usize) -> u32 {
        self.halves[half].data_cursor
    }

    /// The header of a committed entry.
    pub fn entry_header(&self, half: usize, slot: u32) -> EntryHeader {
        assert!(
            slot < self.halves[half].committed_prefix || self.halves[half].committed[slot as usize]
        );
        EntryHeader::decode(&self.header_bytes(half, slot)).expect("committed header is valid")
    }

    /// Frees `half` after its CP is durable on both sides (record the CP first: a crash between
    /// the two then leaves the entries in place, which a replay applies again harmlessly).
    pub fn release_half(&mut self, half: usize) {
        assert!(
            self.halves[half].cp_number <= self.superblock.cp_completed,
            "half of cp {} released before it was recorded complete (invariant 3)",
            self.halves[half].cp_number
        );
        self.halves[half].reset();
        let start = self.geometry.header_offset(half, 0) as usize;
        self.memory.as_mut()[start..start + ENTRY_HEADER_BYTES].fill(0);
    }

    /// Resets the cursors of `half` but keeps its bytes (the destination on a new session: the
    /// source resends the same entries from the half's start, overwriting them identically, and
    /// until then a promotion still finds every acknowledged entry).
    pub fn rewind_half(&mut self, half: usize) {
        self.halves[half].reset();
    }

    /// The seq the next reservation gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Sets the next seq (the destination follows the source's numbering). Only between entries.
    pub fn set_next_seq(&mut self, seq: u64) {
        assert!(seq >= 1);
        self.next_seq = seq;
    }

    /// Records that CP `cp_number` is durable on both sides (superblock update).
    pub fn record_cp_completed(&mut self, cp_number: u64, transfer_id_floor: u64) {
        assert!(cp_number >= self.superblock.cp_completed);
        self.superblock.cp_completed = cp_number;
        self.superblock.transfer_id_floor =
            self.superblock.transfer_id_floor.max(transfer_id_floor);
        self.superblock.seq_floor = self.superblock.seq_floor.max(self.next_seq);
        self.write_superblock();
    }

    /// Sets the epoch (promotion, or adopting a newer source's epoch).
    pub fn set_epoch(&mut self, epoch: u64) {
        assert!(
            epoch >= self.superblock.epoch,
            "the epoch never goes back (invariant 6)"
        );
        self.superblock.epoch = epoch;
        self.write_superblock();
    }

    fn write_superblock(&mut self) {
        self.superblock.generation += 1;
        let copy = (self.superblock.generation % 2) * SUPERBLOCK_BYTES;
        let superblock = self.superblock;
        superblock
            .encode(&mut self.memory.as_mut()[copy as usize..(copy + SUPERBLOCK_BYTES) as usize]);
    }

    /// The data of a (committed) entry.
    pub fn data(&self, header: &EntryHeader) -> &[u8] {
        let half = half_of_cp(header.cp_number);
        let start = self.geometry.data_area_offset(half) + u64::from(header.data_offset);
        self.bytes(start, header.data_bytes() as usize)
    }

    /// Any byte range of the ring (for zero-copy sends of entry data).
    pub fn bytes(&self, offset: u64, len: usize) -> &[u8] {
        &self.memory.as_ref()[offset as usize..offset as usize + len]
    }

    /// Header and data bytes in use in both halves.
    pub fn used_bytes(&self) -> u64 {
        self.halves
            .iter()
            .map(|h| u64::from(h.data_cursor) + u64::from(h.slots_used) * ENTRY_HEADER_BYTES as u64)
            .sum()
    }

    pub fn geometry(&self) -> RingGeometry {
        self.geometry
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// Gives the memory back (a process "crash" in tests, or promotion's fresh scan).
    /// The device write that puts entry `header` on its namespace: its data from the ring, or
    /// zeroes (what the source applies to its primary and a promotion replays onto a mirror).
    pub fn entry_write(&self, header: &EntryHeader) -> crate::device::DeviceRequest<'_> {
        if header.is_zeroes() {
            crate::device::DeviceRequest::WriteZeroes {
                offset_bytes: header.offset_bytes(),
                length_bytes: u64::from(header.length_bytes),
            }
        } else {
            crate::device::DeviceRequest::Write {
                offset_bytes: header.offset_bytes(),
                data: self.data(header),
            }
        }
    }

    /// The memory the ring lives in (the runtime persists it, per its medium).
    pub fn memory(&self) -> &M {
        &self.memory
    }

    pub fn into_memory(self) -> M {
        self.memory
    }
}

fn warn_torn(half: usize, slot: u32, seq: Option<u64>, reason: &str) {
    let seq = seq.map_or_else(|| "?".to_string(), |s| s.to_string());
    log::warn!("ring: scan of half {half} stops at slot {slot} (seq {seq}): torn entry: {reason}");
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
