//! Sizes and limits of the engine, as named constants with their relations checked at compile time.

/// The unit of host addressing (an NVMe LBA of the exported namespaces).
pub const SECTOR_SIZE: usize = 512;
/// The unit of consistency-point mirroring: a block is either wholly or partially modified.
pub const BLOCK_SIZE: usize = 4096;
/// Sectors in one block.
pub const SECTORS_PER_BLOCK: u64 = (BLOCK_SIZE / SECTOR_SIZE) as u64;
/// The largest single host write the volume accepts.
pub const WRITE_BYTES_MAX: usize = 1 << 20;

const _: () = assert!(BLOCK_SIZE % SECTOR_SIZE == 0);
const _: () = assert!(WRITE_BYTES_MAX % BLOCK_SIZE == 0);
