//! Verify mode: self-describing sectors and the table of the latest completed write per I/O block.
//!
//! Every 512-byte sector written in verify mode describes itself (layout, little endian):
//!
//! | bytes    | field                                                     |
//! |----------|-----------------------------------------------------------|
//! | 0..4     | magic `NVMP`                                              |
//! | 4..8     | reserved, zero                                            |
//! | 8..16    | LBA of this sector                                        |
//! | 16..24   | run id (random per run: stale data of other runs fails)   |
//! | 24..32   | sequence number of the write (per-run, per I/O block)     |
//! | 32..508  | filler derived from (LBA, run id, sequence)               |
//! | 508..512 | CRC32C of bytes 0..508                                    |
//!
//! [`VerifyTable`] keeps, per I/O block, the sequence of the latest completed write and whether an
//! I/O is in flight on it: the driver never issues two I/Os to one block at once, so a read must
//! return exactly the latest completed write.

use crate::workload::Rng;

pub const SECTOR_BYTES: usize = 512;
const MAGIC: u32 = u32::from_le_bytes(*b"NVMP");
const CRC_OFFSET: usize = SECTOR_BYTES - 4;
const FILLER_OFFSET: usize = 32;
/// Largest verify table (one entry per I/O block); limits the range verify mode covers.
pub const VERIFY_BLOCKS_MAX: u64 = 1 << 24;

const _: () = assert!((CRC_OFFSET - FILLER_OFFSET).is_multiple_of(4));

/// What one sector says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorStamp {
    pub lba: u64,
    pub run_id: u64,
    pub sequence: u64,
}

impl std::fmt::Display for SectorStamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lba {} run {:#x} seq {}",
            self.lba, self.run_id, self.sequence
        )
    }
}

/// A sector that is not what the latest completed write put there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub lba: u64,
    pub expected: SectorStamp,
    pub found: Found,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A well-formed sector with other identity.
    Stamp(SectorStamp),
    /// Magic or CRC wrong: not a sector this tool wrote (or a torn/corrupted one).
    Garbage {
        magic: u32,
        crc_stored: u32,
        crc_computed: u32,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verify mismatch at LBA {}: expected {}, found ",
            self.lba, self.expected
        )?;
        match self.found {
            Found::Stamp(stamp) => write!(f, "{stamp}"),
            Found::Garbage { magic, crc_stored, crc_computed } => write!(
                f,
                "garbage (magic {magic:#010x}, crc stored {crc_stored:#010x}, computed {crc_computed:#010x})"
            ),
        }
    }
}

fn filler_seed(stamp: &SectorStamp) -> u64 {
    stamp.lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stamp.run_id ^ stamp.sequence.rotate_left(32)
}

fn stamp_sector(sector: &mut [u8], stamp: &SectorStamp) {
    sector[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    sector[4..8].fill(0);
    sector[8..16].copy_from_slice(&stamp.lba.to_le_bytes());
    sector[16..24].copy_from_slice(&stamp.run_id.to_le_bytes());
    sector[24..32].copy_from_slice(&stamp.sequence.to_le_bytes());
    let mut rng = Rng::new(filler_seed(stamp));
    for word in sector[FILLER_OFFSET..CRC_OFFSET].chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next_u64().to_le_bytes()[..word.len()]);
    }
    let crc = crc32c::crc32c(&sector[..CRC_OFFSET]);
    sector[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
}

/// Fills `buffer` (whole sectors) with the self-describing content of a write starting at `first_lba`.
pub fn stamp_block(buffer: &mut [u8], first_lba: u64, run_id: u64, sequence: u64) {
    assert!(buffer.len().is_multiple_of(SECTOR_BYTES));
    for (index, sector) in buffer.chunks_exact_mut(SECTOR_BYTES).enumerate() {
        stamp_sector(
            sector,
            &SectorStamp {
                lba: first_lba + index as u64,
                run_id,
                sequence,
            },
        );
    }
}

fn read_sector(sector: &[u8]) -> Found {
    let le32 = |at: usize| u32::from_le_bytes(sector[at..at + 4].try_into().expect("4 bytes"));
    let le64 = |at: usize| u64::from_le_bytes(sector[at..at + 8].try_into().expect("8 bytes"));
    let magic = le32(0);
    let crc_stored = le32(CRC_OFFSET);
    let crc_computed = crc32c::crc32c(&sector[..CRC_OFFSET]);
    if magic != MAGIC || crc_stored != crc_computed {
        return Found::Garbage {
            magic,
            crc_stored,
            crc_computed,
        };
    }
    Found::Stamp(SectorStamp {
        lba: le64(8),
        run_id: le64(16),
        sequence: le64(24),
    })
}

/// The stamp of a sector this tool wrote, `None` for anything else.
pub fn read_stamp(sector: &[u8]) -> Option<SectorStamp> {
    match read_sector(sector) {
        Found::Stamp(stamp) => Some(stamp),
        Found::Garbage { .. } => None,
    }
}

/// Checks every sector of a read of `buffer` at `first_lba` against the expected write.
/// The CRC covers the filler, so a correct stamp with wrong filler is reported as garbage.
pub fn check_block(
    buffer: &[u8],
    first_lba: u64,
    run_id: u64,
    sequence: u64,
) -> Result<(), Mismatch> {
    assert!(buffer.len().is_multiple_of(SECTOR_BYTES));
    for (index, sector) in buffer.chunks_exact(SECTOR_BYTES).enumerate() {
        let lba = first_lba + index as u64;
        let expected = SectorStamp {
            lba,
            run_id,
            sequence,
        };
        let found = read_sector(sector);
        if found != Found::Stamp(expected) {
            return Err(Mismatch {
                lba,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// Per I/O block: the latest completed write's sequence (0 = not written in this run) and a busy bit;
/// for `--ack-state`, also the latest acknowledged and the latest issued write.
#[derive(Debug)]
pub struct VerifyTable {
    sequences: Vec<u64>,
    busy: Vec<bool>,
    sequence_next: u64,
    /// The latest write the target acknowledged (0: none).
    acked: Vec<u64>,
    /// The latest write issued (acknowledged, failed or in flight; 0: none).
    attempted: Vec<u64>,
}

impl VerifyTable {
    pub fn new(block_count: u64) -> VerifyTable {
        assert!(block_count > 0 && block_count <= VERIFY_BLOCKS_MAX);
        let count = block_count as usize;
        VerifyTable {
            sequences: vec![0; count],
            busy: vec![false; count],
            sequence_next: 1,
            acked: vec![0; count],
            attempted: vec![0; count],
        }
    }

    pub fn is_busy(&self, block: u64) -> bool {
        self.busy[block as usize]
    }

    /// Marks `block` busy; for a write returns the new sequence it carries.
    pub fn begin_write(&mut self, block: u64) -> u64 {
        assert!(!self.busy[block as usize], "two I/Os on one block");
        self.busy[block as usize] = true;
        let sequence = self.sequence_next;
        self.sequence_next += 1;
        self.attempted[block as usize] = sequence;
        sequence
    }

    /// Marks `block` busy for a read; returns the sequence the read must find (0 = never written).
    pub fn begin_read(&mut self, block: u64) -> u64 {
        assert!(!self.busy[block as usize], "two I/Os on one block");
        self.busy[block as usize] = true;
        self.sequences[block as usize]
    }

    /// The write completed: `sequence` is now the content (a failed write leaves the block unknown).
    pub fn end_write(&mut self, block: u64, sequence: Option<u64>) {
        assert!(self.busy[block as usize]);
        self.busy[block as usize] = false;
        self.sequences[block as usize] = sequence.unwrap_or(UNKNOWN);
        if let Some(sequence) = sequence {
            self.acked[block as usize] = sequence;
        }
    }

    /// What a crash check needs: per block written in this run, (block, acked, attempted).
    pub fn ack_state(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.attempted
            .iter()
            .zip(&self.acked)
            .enumerate()
            .filter(|(_, (attempted, _))| **attempted != 0)
            .map(|(block, (attempted, acked))| (block as u64, *acked, *attempted))
    }

    pub fn end_read(&mut self, block: u64) {
        assert!(self.busy[block as usize]);
        self.busy[block as usize] = false;
    }
}

/// Sequence of a block whose last write failed: its content is unknown and reads are not checked.
pub const UNKNOWN: u64 = u64::MAX;

/// Whether a read expecting `sequence` can be checked (the block was written and not left unknown).
pub fn checkable(sequence: u64) -> bool {
    sequence != 0 && sequence != UNKNOWN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_block_checks_and_every_corruption_is_caught() {
        let mut block = vec![0u8; 4096];
        stamp_block(&mut block, 80, 0xABCD, 7);
        assert_eq!(check_block(&block, 80, 0xABCD, 7), Ok(()));
        let wrong_sequence = check_block(&block, 80, 0xABCD, 8).unwrap_err();
        assert_eq!(wrong_sequence.lba, 80);
        assert_eq!(
            wrong_sequence.found,
            Found::Stamp(SectorStamp {
                lba: 80,
                run_id: 0xABCD,
                sequence: 7
            })
        );
        assert!(check_block(&block, 88, 0xABCD, 7).is_err(), "wrong LBA");
        assert!(check_block(&block, 80, 0xABCE, 7).is_err(), "wrong run");
        for offset in [0, 5, 9, 17, 25, 100, 509] {
            let mut corrupt = block.clone();
            corrupt[SECTOR_BYTES * 3 + offset] ^= 0x40;
            let mismatch = check_block(&corrupt, 80, 0xABCD, 7).unwrap_err();
            assert_eq!(mismatch.lba, 83, "offset {offset}");
            assert!(
                matches!(mismatch.found, Found::Garbage { .. }),
                "offset {offset}"
            );
        }
        assert!(format!("{wrong_sequence}").contains("LBA 80"));
    }

    #[test]
    fn table_tracks_latest_completed_write() {
        let mut table = VerifyTable::new(4);
        assert_eq!(table.begin_read(2), 0);
        table.end_read(2);
        let first = table.begin_write(2);
        assert!(table.is_busy(2) && !table.is_busy(1));
        table.end_write(2, Some(first));
        let second = table.begin_write(2);
        assert!(second > first);
        table.end_write(2, None);
        assert!(!checkable(table.begin_read(2)));
        table.end_read(2);
        let third = table.begin_write(2);
        table.end_write(2, Some(third));
        assert_eq!(table.begin_read(2), third);
        assert!(checkable(third));
    }

    #[test]
    #[should_panic(expected = "two I/Os on one block")]
    fn overlapping_io_is_a_programmer_error() {
        let mut table = VerifyTable::new(1);
        table.begin_write(0);
        table.begin_read(0);
    }
}
