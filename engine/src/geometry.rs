//! Sizes and limits of the engine, as named constants with their relations checked at compile time,
//! and [`RingGeometry`], the layout of the NVRAM ring (engine spec, "Ring format").
//!
//! Ring layout: `[superblock A | superblock B | half 0 | half 1]`, each half is
//! `[header area: half_header_slots × 64 B, rounded up to 4 KiB | data area: half_data_bytes]`.

/// The unit of host addressing (an NVMe LBA of the exported namespaces).
pub const SECTOR_SIZE: usize = 512;
/// The unit of consistency-point mirroring: a block is either wholly or partially modified.
pub const BLOCK_SIZE: usize = 4096;
/// Sectors in one block.
pub const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE / SECTOR_SIZE) as u64;
/// The largest single host write the volume accepts.
pub const WRITE_BYTES_MAX: usize = 1 << 20;
/// The largest single write-zeroes (NVMe allows 65536 sectors); one ZEROES entry, no data space.
pub const WRITE_ZEROES_BYTES_MAX: u64 = 65536 * SECTOR_SIZE as u64;

/// Ring memory comes in hugepages: its size is a multiple of this.
pub const RING_ALIGNMENT_BYTES: u64 = 2 << 20;
/// The smallest ring: each half must hold a [`WRITE_BYTES_MAX`] write with room to spare.
pub const RING_BYTES_MIN: u64 = 4 << 20;
/// The largest ring: data offsets inside a half are `u32`.
pub const RING_BYTES_MAX: u64 = 4 << 30;
/// One superblock copy.
pub const SUPERBLOCK_BYTES: u64 = 4096;
/// Both superblock copies (A at 0, B at 4096); the halves start after them.
pub const SUPERBLOCK_AREA_BYTES: u64 = 2 * SUPERBLOCK_BYTES;
/// One entry header in a half's header area.
pub const ENTRY_HEADER_BYTES: usize = 64;
/// The header area gets about 1/32 of a half: one 64 B header per 2 KiB of half.
pub const HALF_BYTES_PER_HEADER_SLOT: u64 = 2048;

/// Namespaces per volume.
pub const NAMESPACES_MAX: usize = 16;
/// Entries per data transfer.
pub const TRANSFER_ENTRIES_MAX: usize = 64;
/// Entry data bytes per data transfer (a single write always fits).
pub const TRANSFER_DATA_BYTES_MAX: usize = WRITE_BYTES_MAX;
/// Descriptors per DescriptorTable message.
pub const DESCRIPTORS_PER_TABLE: usize = 1024;
/// Data descriptors (each followed by a 4 KiB block) per DescriptorTable message.
pub const TABLE_DATA_BLOCKS_MAX: usize = 64;
/// The largest wire message (bounds the runtime's receive buffer).
pub const MESSAGE_BYTES_MAX: usize = 2 << 20;
/// The engine-owned send buffer for headers, small messages and CP data blocks.
pub const OUT_INLINE_BYTES: usize = 1 << 20;

const _: () = assert!(BLOCK_SIZE.is_multiple_of(SECTOR_SIZE));
const _: () = assert!(WRITE_BYTES_MAX.is_multiple_of(BLOCK_SIZE));
const _: () = assert!(WRITE_ZEROES_BYTES_MAX <= u32::MAX as u64);
const _: () = assert!(RING_BYTES_MIN.is_multiple_of(RING_ALIGNMENT_BYTES));
const _: () = assert!(RING_BYTES_MAX.is_multiple_of(RING_ALIGNMENT_BYTES));
// The smallest ring's half data area must hold the largest write plus alignment slack.
const _: () =
    assert!(RING_BYTES_MIN / 2 - RING_BYTES_MIN / 32 > (WRITE_BYTES_MAX + BLOCK_SIZE) as u64);
const _: () = assert!(RING_BYTES_MAX / 2 <= u32::MAX as u64);
const _: () = assert!(TRANSFER_DATA_BYTES_MAX >= WRITE_BYTES_MAX);
// A transfer message (headers + data) and a full descriptor table fit in one message.
const _: () =
    assert!(TRANSFER_DATA_BYTES_MAX + TRANSFER_ENTRIES_MAX * 64 + 64 <= MESSAGE_BYTES_MAX);
const _: () = assert!(
    TABLE_DATA_BLOCKS_MAX * BLOCK_SIZE + DESCRIPTORS_PER_TABLE * 32 + 64 <= OUT_INLINE_BYTES / 2
);
const _: () = assert!(OUT_INLINE_BYTES <= MESSAGE_BYTES_MAX);

/// A ring size that does not give a valid layout (checked at start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeometryError {
    /// Not a multiple of [`RING_ALIGNMENT_BYTES`].
    Unaligned { ring_bytes: u64 },
    /// Below [`RING_BYTES_MIN`] or above [`RING_BYTES_MAX`].
    OutOfRange { ring_bytes: u64 },
    /// Stored geometry that is not the one this ring size gives.
    Inconsistent,
}

impl std::fmt::Display for GeometryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unaligned { ring_bytes } => {
                write!(
                    f,
                    "ring size {ring_bytes} is not a multiple of {RING_ALIGNMENT_BYTES}"
                )
            }
            Self::OutOfRange { ring_bytes } => write!(
                f,
                "ring size {ring_bytes} outside {RING_BYTES_MIN}..={RING_BYTES_MAX}"
            ),
            Self::Inconsistent => write!(f, "stored ring geometry does not match the ring size"),
        }
    }
}

/// The layout of one NVRAM ring; both sides of a mirror must have equal geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingGeometry {
    pub ring_bytes: u64,
    pub half_header_slots: u32,
    pub half_data_bytes: u32,
}

impl RingGeometry {
    /// Computes the layout for `ring_bytes` of ring memory.
    pub fn for_ring_size(ring_bytes: u64) -> Result<Self, GeometryError> {
        if !ring_bytes.is_multiple_of(RING_ALIGNMENT_BYTES) {
            return Err(GeometryError::Unaligned { ring_bytes });
        }
        if !(RING_BYTES_MIN..=RING_BYTES_MAX).contains(&ring_bytes) {
            return Err(GeometryError::OutOfRange { ring_bytes });
        }
        let half_bytes = round_down((ring_bytes - SUPERBLOCK_AREA_BYTES) / 2, BLOCK_SIZE as u64);
        let slots = half_bytes / HALF_BYTES_PER_HEADER_SLOT;
        let header_area_bytes = round_up(slots * ENTRY_HEADER_BYTES as u64, BLOCK_SIZE as u64);
        let data_bytes = round_down(half_bytes - header_area_bytes, BLOCK_SIZE as u64);
        let geometry = Self {
            ring_bytes,
            half_header_slots: u32::try_from(slots).expect("slots bounded by RING_BYTES_MAX"),
            half_data_bytes: u32::try_from(data_bytes).expect("half bounded by RING_BYTES_MAX"),
        };
        assert!(geometry.half_offset(1) + geometry.half_bytes() <= ring_bytes);
        assert!(geometry.half_data_bytes as usize > WRITE_BYTES_MAX + BLOCK_SIZE);
        Ok(geometry)
    }

    /// Checks that a stored geometry is exactly the one its ring size gives.
    pub fn validate(&self) -> Result<(), GeometryError> {
        if Self::for_ring_size(self.ring_bytes)? == *self {
            Ok(())
        } else {
            Err(GeometryError::Inconsistent)
        }
    }

    /// Bytes of a half's header area (4 KiB aligned).
    pub fn header_area_bytes(&self) -> u64 {
        round_up(
            u64::from(self.half_header_slots) * ENTRY_HEADER_BYTES as u64,
            BLOCK_SIZE as u64,
        )
    }

    /// Bytes of one half (header area + data area).
    pub fn half_bytes(&self) -> u64 {
        self.header_area_bytes() + u64::from(self.half_data_bytes)
    }

    /// Ring offset of half `half` (0 or 1).
    pub fn half_offset(&self, half: usize) -> u64 {
        assert!(half < 2);
        SUPERBLOCK_AREA_BYTES + half as u64 * self.half_bytes()
    }

    /// Ring offset of header slot `slot` of half `half`.
    pub fn header_offset(&self, half: usize, slot: u32) -> u64 {
        assert!(slot < self.half_header_slots);
        self.half_offset(half) + u64::from(slot) * ENTRY_HEADER_BYTES as u64
    }

    /// Ring offset of the data area of half `half` (4 KiB aligned).
    pub fn data_area_offset(&self, half: usize) -> u64 {
        self.half_offset(half) + self.header_area_bytes()
    }
}

/// The half a CP number uses.
pub fn half_of_cp(cp_number: u64) -> usize {
    assert!(cp_number >= 1, "CP numbers start at 1");
    (cp_number % 2) as usize
}

/// The first and one-past-last block that namespace bytes `start..end` touch.
pub fn blocks_touched(start: u64, end: u64) -> (u64, u64) {
    (start / BLOCK_SIZE as u64, end.div_ceil(BLOCK_SIZE as u64))
}

/// Rounds `value` down to a multiple of `unit`.
pub const fn round_down(value: u64, unit: u64) -> u64 {
    value - value % unit
}

/// Rounds `value` up to a multiple of `unit`.
pub const fn round_up(value: u64, unit: u64) -> u64 {
    value.div_ceil(unit) * unit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_ring_layout() {
        let g = RingGeometry::for_ring_size(RING_BYTES_MIN).unwrap();
        assert_eq!(g.half_header_slots, 1022);
        assert_eq!(g.header_area_bytes(), 65536);
        assert_eq!(g.half_data_bytes, 2_027_520);
        assert_eq!(g.data_area_offset(0) % BLOCK_SIZE as u64, 0);
        assert_eq!(g.data_area_offset(1) % BLOCK_SIZE as u64, 0);
        assert!(g.data_area_offset(1) + u64::from(g.half_data_bytes) <= RING_BYTES_MIN);
        g.validate().unwrap();
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(
            RingGeometry::for_ring_size(RING_BYTES_MIN + 4096),
            Err(GeometryError::Unaligned {
                ring_bytes: RING_BYTES_MIN + 4096
            })
        );
        assert_eq!(
            RingGeometry::for_ring_size(2 << 20),
            Err(GeometryError::OutOfRange {
                ring_bytes: 2 << 20
            })
        );
        let mut g = RingGeometry::for_ring_size(8 << 20).unwrap();
        g.half_header_slots += 1;
        assert_eq!(g.validate(), Err(GeometryError::Inconsistent));
    }
}
