//! Data transfers and buffer descriptors on the source (claims 3-5, 12-14: "a transfer ID structure"
//! and "a buffer descriptor for each block" holding the index of the transfer ID and the block
//! number within the transfer).
//!
//! A transfer is a run of consecutive entries of one CP. Its data base is its first entry's
//! data offset rounded down to 4 KiB; a block the entry wholly covers sits at
//! `base + block_number × 4096` in the half's data area, on the source and (same placement rule,
//! same half start) on the destination. Both tables are allocated at start and cleared per CP.

use crate::geometry::{BLOCK_SIZE, SECTOR_SIZE};

/// A data transfer's unique, monotonically increasing ID (starts at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransferId(pub u64);

/// One data transfer of a CP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferRecord {
    pub id: TransferId,
    pub first_seq: u64,
    pub first_slot: u32,
    pub entry_count: u32,
    /// Data bytes of its entries (what travels after the entry headers).
    pub data_bytes: u32,
    /// The data offset its block numbers count from (4 KiB aligned).
    pub base_offset: u32,
}

/// The transfer ID structure of one CP: table index -> transfer (claim 14).
#[derive(Debug)]
pub struct TransferTable {
    records: Vec<TransferRecord>,
}

impl TransferTable {
    /// A table that holds `capacity` transfers without allocating again.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            records: Vec::with_capacity(capacity),
        }
    }

    /// Appends a transfer and returns its table index.
    pub fn push(&mut self, record: TransferRecord) -> u32 {
        assert!(
            self.records.len() < self.records.capacity(),
            "transfer table sized at start"
        );
        assert!(self.records.last().is_none_or(|last| last.id < record.id));
        assert_eq!(record.base_offset as usize % BLOCK_SIZE, 0);
        self.records.push(record);
        (self.records.len() - 1) as u32
    }

    pub fn get(&self, index: u32) -> &TransferRecord {
        &self.records[index as usize]
    }

    /// The table index of `id` (IDs increase along the table).
    pub fn index_of(&self, id: TransferId) -> Option<u32> {
        self.records
            .binary_search_by_key(&id, |record| record.id)
            .ok()
            .map(|index| index as u32)
    }

    pub fn get_mut(&mut self, index: u32) -> &mut TransferRecord {
        &mut self.records[index as usize]
    }

    pub fn len(&self) -> u32 {
        self.records.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn clear(&mut self) {
        self.records.clear();
    }
}

/// What the source knows about one dirty block of the current CP (claim 14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferDescriptor {
    /// The latest write wholly covered the block: it travels as a Reference.
    Whole { table_index: u32, block_number: u32 },
    /// The latest write covered only part of it: it travels as Data.
    Partial,
    /// The latest write was a write-zeroes covering all of it.
    Zeroes,
}

/// A logged write as the dirty map sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggedWrite {
    pub nsid: u32,
    pub lba: u64,
    pub length_bytes: u32,
    pub zeroes: bool,
    pub table_index: u32,
    /// The entry's data offset minus its transfer's base offset.
    pub offset_in_transfer: u32,
}

impl LoggedWrite {
    /// The first and one-past-last block the write touches.
    pub fn block_range(&self) -> (u64, u64) {
        let start = self.lba * SECTOR_SIZE as u64;
        crate::geometry::blocks_touched(start, start + u64::from(self.length_bytes))
    }
}

/// A well-mixed hash of a (namespace, block) key (Fibonacci hashing): its high 32 bits pick a
/// slot of a power-of-two table.
pub(crate) fn key_hash(nsid: u32, block_index: u64) -> u64 {
    (u64::from(nsid) << 48 ^ block_index).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// 32 bits of a key's hash, half of them not among the slot position's bits (keys that collide
/// on a slot still differ here but for one in 2^16).
fn fingerprint(hash: u64) -> u32 {
    (hash >> 16) as u32
}

/// The dirty map is full: the CP must start before more writes enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyMapFull;

/// (nsid, block_index) -> [`BufferDescriptor`] for one CP: an open-addressing table allocated
/// at start, iterated in first-dirtied order by the CP planner.
#[derive(Debug)]
pub struct DirtyMap {
    keys: Vec<(u32, u64)>,
    values: Vec<BufferDescriptor>,
    positions: Vec<u32>,
    /// Per slot: 0 = empty, else the key's fingerprint (high 32 bits) and its index + 1 (low
    /// 32). A probe compares fingerprints in the table and reads `keys` only on a match: every
    /// write touches a random slot, and a second random read (`keys[index]`) for each occupied
    /// slot it passed was most of the map's cost (`perf annotate` of the embedded pair at QD32:
    /// 72% of `note_write` on the slot load, 21% on the key compare).
    table: Vec<u64>,
    /// Writes noted but not yet in the table ([`DirtyMap::settle`]), and the blocks they touch.
    pending: Vec<LoggedWrite>,
    pending_blocks: usize,
}

/// Noted writes entered into the table together. A write's slot is at a random place of a
/// table far larger than the caches; entered one at a time, each slot's miss stalled the write
/// path on its own (`note_write` was 6% of the embedded pair's core at QD32). Entered in a
/// batch, their slots are loaded first, independently of each other, so the misses overlap.
const PENDING_WRITES_MAX: usize = 32;

impl DirtyMap {
    /// A map for up to `capacity` dirty blocks.
    pub fn with_capacity(capacity: usize) -> Self {
        assert!(capacity > 0 && capacity < u32::MAX as usize / 4);
        // At most two thirds full: probe chains stay short when the map fills, and the table
        // (touched at a random slot by every write) stays half the size a 2x sizing gave it on
        // the default ring (64K slots for 40K blocks, not 128K).
        // More slots than keys always: a probe always ends at an empty one.
        let slots = (capacity + capacity / 2 + 1).next_power_of_two();
        assert!(slots > capacity);
        Self {
            keys: Vec::with_capacity(capacity),
            values: Vec::with_capacity(capacity),
            positions: Vec::with_capacity(capacity),
            table: vec![0; slots],
            pending: Vec::with_capacity(PENDING_WRITES_MAX),
            pending_blocks: 0,
        }
    }

    /// Dirty blocks (of a settled map).
    pub fn len(&self) -> usize {
        self.assert_settled();
        self.keys.len()
    }

    /// No write noted since the last clear.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.pending.is_empty()
    }

    /// Blocks that can still become dirty, at least (a block that pending writes touch twice
    /// is counted twice until they settle).
    pub fn free(&self) -> usize {
        self.keys.capacity() - self.keys.len() - self.pending_blocks
    }

    /// The `index`-th dirty block (first-dirtied order): (nsid, block_index, descriptor).
    pub fn get(&self, index: usize) -> (u32, u64, BufferDescriptor) {
        self.assert_settled();
        let (nsid, block_index) = self.keys[index];
        (nsid, block_index, self.values[index])
    }

    /// The descriptor of a block, if dirty.
    pub fn lookup(&self, nsid: u32, block_index: u64) -> Option<BufferDescriptor> {
        self.assert_settled();
        match self.probe(key_hash(nsid, block_index), nsid, block_index) {
            (_, Some(index)) => Some(self.values[index]),
            (_, None) => None,
        }
    }

    fn assert_settled(&self) {
        assert!(
            self.pending.is_empty(),
            "the dirty map is read only once settled"
        );
    }

    /// Notes a write: the descriptors of every block it touches are updated (the rule of claims
    /// 13-14: a whole overwrite makes the block a reference, a partial one makes it data) by the
    /// next [`DirtyMap::settle`] at the latest, in the order the writes were noted. All or
    /// nothing: a write that may not fit is refused at once.
    pub fn note_write(&mut self, write: &LoggedWrite) -> Result<(), DirtyMapFull> {
        let (first, end) = write.block_range();
        if (end - first) as usize > self.free() {
            return Err(DirtyMapFull);
        }
        if self.pending.len() == PENDING_WRITES_MAX {
            self.settle();
        }
        self.pending.push(*write);
        self.pending_blocks += (end - first) as usize;
        Ok(())
    }

    /// Enters every pending write into the table: their first slots are loaded together (the
    /// loads do not depend on each other, so their cache misses overlap), then each write is
    /// entered in order. The map must be settled before it is read (a CP settles it as it
    /// freezes).
    pub fn settle(&mut self) {
        let mut touched = 0u64;
        for write in &self.pending {
            let (first, _) = write.block_range();
            touched ^= self.table[self.slot_of(key_hash(write.nsid, first))];
        }
        std::hint::black_box(touched);
        for index in 0..self.pending.len() {
            let write = self.pending[index];
            self.enter(&write);
        }
        self.pending.clear();
        self.pending_blocks = 0;
    }

    fn enter(&mut self, write: &LoggedWrite) {
        let (first, end) = write.block_range();
        let write_start = write.lba * SECTOR_SIZE as u64;
        let write_end = write_start + u64::from(write.length_bytes);
        for block_index in first..end {
            let block_start = block_index * BLOCK_SIZE as u64;
            let whole = block_start >= write_start && block_start + BLOCK_SIZE as u64 <= write_end;
            let descriptor = match (whole, write.zeroes) {
                (false, _) => BufferDescriptor::Partial,
                (true, true) => BufferDescriptor::Zeroes,
                (true, false) => {
                    let position =
                        u64::from(write.offset_in_transfer) + (block_start - write_start);
                    assert_eq!(
                        position % BLOCK_SIZE as u64,
                        0,
                        "placement keeps whole blocks aligned"
                    );
                    BufferDescriptor::Whole {
                        table_index: write.table_index,
                        block_number: (position / BLOCK_SIZE as u64) as u32,
                    }
                }
            };
            self.set(write.nsid, block_index, descriptor);
        }
    }

    fn set(&mut self, nsid: u32, block_index: u64, descriptor: BufferDescriptor) {
        let hash = key_hash(nsid, block_index);
        match self.probe(hash, nsid, block_index) {
            (_, Some(index)) => self.values[index] = descriptor,
            (position, None) => {
                assert!(self.keys.len() < self.keys.capacity());
                self.keys.push((nsid, block_index));
                self.values.push(descriptor);
                self.positions.push(position as u32);
                self.table[position] = u64::from(fingerprint(hash)) << 32 | self.keys.len() as u64;
            }
        }
    }

    /// The slot a key of hash `hash` probes first.
    fn slot_of(&self, hash: u64) -> usize {
        (hash >> 32) as usize & (self.table.len() - 1)
    }

    /// (slot position, key index if present) of the key of hash `hash`.
    fn probe(&self, hash: u64, nsid: u32, block_index: u64) -> (usize, Option<usize>) {
        let mut position = self.slot_of(hash);
        let wanted = fingerprint(hash);
        loop {
            match self.table[position] {
                0 => return (position, None),
                stored if (stored >> 32) as u32 == wanted => {
                    let index = (stored as u32) as usize - 1;
                    if self.keys[index] == (nsid, block_index) {
                        return (position, Some(index));
                    }
                }
                _ => {}
            }
            position = (position + 1) & (self.table.len() - 1);
        }
    }

    /// Forgets every dirty block (after the CP completed).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.pending_blocks = 0;
        for &position in &self.positions {
            self.table[position as usize] = 0;
        }
        self.keys.clear();
        self.values.clear();
        self.positions.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Notes and settles, for tests that read the map right after.
    fn note(map: &mut DirtyMap, write: &LoggedWrite) {
        map.note_write(write).unwrap();
        map.settle();
    }

    fn write(
        lba: u64,
        length_bytes: u32,
        table_index: u32,
        offset_in_transfer: u32,
    ) -> LoggedWrite {
        LoggedWrite {
            nsid: 1,
            lba,
            length_bytes,
            zeroes: false,
            table_index,
            offset_in_transfer,
        }
    }

    #[test]
    fn partial_then_whole_becomes_reference() {
        let mut map = DirtyMap::with_capacity(16);
        note(&mut map, &write(2, 1024, 0, 1024));
        assert_eq!(map.lookup(1, 0), Some(BufferDescriptor::Partial));
        note(&mut map, &write(0, 4096, 1, 8192));
        assert_eq!(
            map.lookup(1, 0),
            Some(BufferDescriptor::Whole {
                table_index: 1,
                block_number: 2
            })
        );
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn whole_then_partial_becomes_data() {
        let mut map = DirtyMap::with_capacity(16);
        note(&mut map, &write(8, 8192, 0, 0));
        assert_eq!(
            map.lookup(1, 2),
            Some(BufferDescriptor::Whole {
                table_index: 0,
                block_number: 1
            })
        );
        note(&mut map, &write(17, 512, 0, 4096 * 2 + 512));
        assert_eq!(
            map.lookup(1, 1),
            Some(BufferDescriptor::Whole {
                table_index: 0,
                block_number: 0
            })
        );
        assert_eq!(map.lookup(1, 2), Some(BufferDescriptor::Partial));
    }

    #[test]
    fn unaligned_write_covers_whole_middle_blocks_only() {
        let mut map = DirtyMap::with_capacity(16);
        // Bytes 3584..12800: blocks 0 and 3 partial, blocks 1 and 2 whole.
        note(&mut map, &write(7, 9216, 3, 3584));
        assert_eq!(map.lookup(1, 0), Some(BufferDescriptor::Partial));
        assert_eq!(
            map.lookup(1, 1),
            Some(BufferDescriptor::Whole {
                table_index: 3,
                block_number: 1
            })
        );
        assert_eq!(
            map.lookup(1, 2),
            Some(BufferDescriptor::Whole {
                table_index: 3,
                block_number: 2
            })
        );
        assert_eq!(map.lookup(1, 3), Some(BufferDescriptor::Partial));
        assert_eq!(map.lookup(1, 4), None);
        let zeroes = LoggedWrite {
            zeroes: true,
            ..write(8, 4096, 0, 0)
        };
        note(&mut map, &zeroes);
        assert_eq!(map.lookup(1, 1), Some(BufferDescriptor::Zeroes));
    }

    #[test]
    fn a_full_map_finds_every_block_as_a_model_map_does() {
        // Filled to capacity (the table's highest load), across namespaces and twice over after
        // a clear: every probe chain passes other keys' slots.
        let capacity = 1000;
        let mut map = DirtyMap::with_capacity(capacity);
        for round in 0..2u64 {
            let mut model = std::collections::HashMap::new();
            for i in 0..capacity as u64 {
                let nsid = 1 + (i % 3) as u32;
                let block_index = (i * 7919 + round * 13) % 100_003;
                let whole = LoggedWrite {
                    nsid,
                    ..write(block_index * 8, 4096, i as u32, 0)
                };
                map.note_write(&whole).unwrap();
                model.insert((nsid, block_index), i as u32);
            }
            map.settle();
            assert_eq!(map.len(), model.len());
            assert_eq!(map.free(), 0);
            for (&(nsid, block_index), &table_index) in &model {
                assert_eq!(
                    map.lookup(nsid, block_index),
                    Some(BufferDescriptor::Whole {
                        table_index,
                        block_number: 0
                    })
                );
            }
            assert_eq!(map.lookup(4, 0), None);
            assert_eq!(map.lookup(1, 100_003), None);
            map.clear();
            assert!(map.is_empty());
        }
    }

    #[test]
    fn writes_settled_in_batches_leave_the_map_writes_settled_one_by_one_leave() {
        // Overwrites of the same blocks (whole, partial, zeroes, across namespaces) within one
        // batch and across the batches the map settles by itself: order is kept.
        let mut batched = DirtyMap::with_capacity(4096);
        let mut one_by_one = DirtyMap::with_capacity(4096);
        let mut rng = crate::test_rng::Rng(0x2545_F491_4F6C_DD1D);
        let mut next = || rng.next();
        for i in 0..(PENDING_WRITES_MAX as u32 * 5 + 3) {
            let sectors = [1, 8, 8, 16, 3][(next() % 5) as usize];
            let lba = next() % 96;
            // Placed as the ring places data: whole blocks at whole-block offsets.
            let offset = (next() % 8) as u32 * 4096 + (lba % 8) as u32 * 512;
            let written = LoggedWrite {
                nsid: 1 + (next() % 2) as u32,
                zeroes: next() % 7 == 0,
                ..write(lba, sectors * 512, i, offset)
            };
            batched.note_write(&written).unwrap();
            note(&mut one_by_one, &written);
        }
        batched.settle();
        assert_eq!(batched.len(), one_by_one.len());
        for index in 0..batched.len() {
            assert_eq!(batched.get(index), one_by_one.get(index));
        }
        for nsid in 1..=2 {
            for block in 0..16 {
                assert_eq!(batched.lookup(nsid, block), one_by_one.lookup(nsid, block));
            }
        }
    }

    #[test]
    #[should_panic(expected = "read only once settled")]
    fn an_unsettled_map_is_not_read() {
        let mut map = DirtyMap::with_capacity(16);
        map.note_write(&write(0, 4096, 0, 0)).unwrap();
        let _ = map.lookup(1, 0);
    }

    #[test]
    fn keys_of_one_fingerprint_stay_apart() {
        // Two blocks whose fingerprints are equal (found by the birthday bound, in about 2^16
        // tries): the table's fingerprint match alone must not take one for the other.
        // Neighbouring blocks never collide (the hash is a bijection and these bits of it
        // differ for them), so the search walks blocks spread over 2^40.
        let mut seen = std::collections::HashMap::new();
        let mut rng = crate::test_rng::Rng(0x9E37_79B9_7F4A_7C15);
        let (a, b) = (0..1u64 << 22)
            .map(|_| rng.next() & ((1 << 40) - 1))
            .find_map(|block| {
                seen.insert(fingerprint(key_hash(1, block)), block)
                    .map(|earlier| (earlier, block))
            })
            .expect("a 32-bit fingerprint collides within 2^22 keys");
        assert_ne!(a, b);
        let mut map = DirtyMap::with_capacity(4);
        note(&mut map, &write(a * 8, 4096, 1, 0));
        assert_eq!(map.lookup(1, b), None);
        note(&mut map, &write(b * 8, 4096, 2, 0));
        assert_eq!(map.len(), 2);
        for (block, table_index) in [(a, 1), (b, 2)] {
            assert_eq!(
                map.lookup(1, block),
                Some(BufferDescriptor::Whole {
                    table_index,
                    block_number: 0
                })
            );
        }
    }

    #[test]
    fn a_map_of_one_block_still_answers_for_others() {
        let mut map = DirtyMap::with_capacity(1);
        note(&mut map, &write(0, 4096, 0, 0));
        assert_eq!(map.lookup(1, 1), None);
        assert_eq!(map.note_write(&write(8, 4096, 0, 0)), Err(DirtyMapFull));
    }

    #[test]
    fn capacity_is_all_or_nothing_and_clear_resets() {
        let mut map = DirtyMap::with_capacity(3);
        note(&mut map, &write(0, 8192, 0, 0));
        assert_eq!(map.note_write(&write(16, 8192, 0, 8192)), Err(DirtyMapFull));
        assert_eq!(map.len(), 2);
        map.clear();
        assert!(map.is_empty());
        assert_eq!(map.lookup(1, 0), None);
        note(&mut map, &write(16, 8192, 0, 0));
        assert_eq!(
            map.get(1),
            (
                1,
                3,
                BufferDescriptor::Whole {
                    table_index: 0,
                    block_number: 1
                }
            )
        );
        let other_namespace = LoggedWrite {
            nsid: 2,
            ..write(16, 512, 0, 0)
        };
        note(&mut map, &other_namespace);
        assert_eq!(map.lookup(2, 2), Some(BufferDescriptor::Partial));
        assert_eq!(
            map.lookup(1, 2),
            Some(BufferDescriptor::Whole {
                table_index: 0,
                block_number: 0
            })
        );
    }
}
