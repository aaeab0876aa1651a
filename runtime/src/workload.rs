//! A seeded built-in workload that writes through the volume API (the engine's `Source`).
//!
//! It is the front end of `nvmirror demo`, of the wire-efficiency benchmark and of the process
//! tests: the same seed gives the same writes, and every payload is derived from
//! (seed, write index), so a checker can recompute what any acknowledged write stored.

use nvmirror_engine::geometry::{BLOCK_SIZE, SECTOR_SIZE};
use nvmirror_engine::source::{WriteId, WriteRefused};

use crate::node::{FrontEnd, SourceEngine, Volume};

/// Largest write of the mixed pattern.
pub const MIXED_WRITE_BYTES_MAX: usize = 4 * BLOCK_SIZE;
/// Outstanding writes the workload keeps at most.
pub const QUEUE_DEPTH_MAX: usize = 256;

/// Which writes the workload issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// 4 KiB writes at random block-aligned offsets: every dirty block is wholly overwritten.
    Aligned,
    /// Random sector offsets and lengths (512 B .. 16 KiB), half of them unaligned, some write-zeroes.
    Mixed,
    /// Like Mixed, but writes never overlap (each takes the next free range): every acknowledged
    /// write must be found intact after a crash.
    Disjoint,
    /// 4 KiB aligned writes, [`HOTSPOT_HOT_PERCENT`] of them to a hot set of the first
    /// [`HOTSPOT_HOT_BLOCKS_PERCENT`] of each namespace's blocks, the rest to the other blocks:
    /// the workload whose repeated overwrites a CP coalesces into one mirror write per block.
    Hotspot,
}

/// Share of hotspot writes that go to the hot set.
pub const HOTSPOT_HOT_PERCENT: u64 = 90;
/// Share of a namespace's blocks in the hotspot pattern's hot set (its first blocks).
pub const HOTSPOT_HOT_BLOCKS_PERCENT: u64 = 10;

/// Blocks of the hotspot pattern's hot set in a namespace of `blocks` blocks (at least one).
pub fn hotspot_hot_blocks(blocks: u64) -> u64 {
    (blocks * HOTSPOT_HOT_BLOCKS_PERCENT / 100).max(1)
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "aligned" => Ok(Pattern::Aligned),
            "mixed" => Ok(Pattern::Mixed),
            "disjoint" => Ok(Pattern::Disjoint),
            "hotspot" => Ok(Pattern::Hotspot),
            other => Err(format!(
                "unknown pattern '{other}' (aligned, mixed, disjoint, hotspot)"
            )),
        }
    }
}

/// One write the workload issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedWrite {
    pub index: u64,
    pub nsid: u32,
    pub lba: u64,
    pub length_bytes: u32,
    pub zeroes: bool,
}

/// A small, fast, seeded generator (xorshift64*); not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..bound` (bound > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0);
        self.next_u64() % bound
    }
}

/// Fills `buf` with the payload of write `index` of the workload seeded with `seed`.
pub fn fill_payload(seed: u64, index: u64, buf: &mut [u8]) {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    for chunk in buf.chunks_mut(8) {
        let word = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// Plans the writes of a workload over namespaces of the given sizes (bytes).
pub struct Planner {
    pattern: Pattern,
    rng: Rng,
    namespace_sizes_bytes: Vec<u64>,
    next_index: u64,
    disjoint_cursor_bytes: Vec<u64>,
}

impl Planner {
    pub fn new(pattern: Pattern, seed: u64, namespace_sizes_bytes: Vec<u64>) -> Self {
        assert!(!namespace_sizes_bytes.is_empty());
        for size in &namespace_sizes_bytes {
            assert!(
                *size >= MIXED_WRITE_BYTES_MAX as u64 && size.is_multiple_of(BLOCK_SIZE as u64)
            );
        }
        let cursors = vec![0; namespace_sizes_bytes.len()];
        Planner {
            pattern,
            rng: Rng::new(seed),
            namespace_sizes_bytes,
            next_index: 0,
            disjoint_cursor_bytes: cursors,
        }
    }

    /// The next write, or `None` when a disjoint workload has filled every namespace.
    pub fn next_write(&mut self) -> Option<PlannedWrite> {
        let index = self.next_index;
        let namespace = self.rng.below(self.namespace_sizes_bytes.len() as u64) as usize;
        let size_bytes = self.namespace_sizes_bytes[namespace];
        let sector = SECTOR_SIZE as u64;
        let (offset_bytes, length_bytes, zeroes) = match self.pattern {
            Pattern::Aligned => {
                let blocks = size_bytes / BLOCK_SIZE as u64;
                (
                    self.rng.below(blocks) * BLOCK_SIZE as u64,
                    BLOCK_SIZE as u64,
                    false,
                )
            }
            Pattern::Hotspot => {
                let blocks = size_bytes / BLOCK_SIZE as u64;
                let hot = hotspot_hot_blocks(blocks);
                // A namespace is at least MIXED_WRITE_BYTES_MAX (4 blocks), so the cold set is
                // never empty.
                let block = if self.rng.below(100) < HOTSPOT_HOT_PERCENT {
                    self.rng.below(hot)
                } else {
                    hot + self.rng.below(blocks - hot)
                };
                (block * BLOCK_SIZE as u64, BLOCK_SIZE as u64, false)
            }
            Pattern::Mixed => {
                let length = self.mixed_length();
                let offset = if self.rng.below(2) == 0 {
                    self.rng
                        .below((size_bytes - length) / BLOCK_SIZE as u64 + 1)
                        * BLOCK_SIZE as u64
                } else {
                    self.rng.below((size_bytes - length) / sector + 1) * sector
                };
                (offset, length, self.rng.below(16) == 0)
            }
            Pattern::Disjoint => {
                let length = self.mixed_length();
                let cursor = &mut self.disjoint_cursor_bytes[namespace];
                let gap = self.rng.below(4) * sector;
                if *cursor + gap + length > size_bytes {
                    return None;
                }
                let offset = *cursor + gap;
                *cursor = offset + length;
                (offset, length, false)
            }
        };
        self.next_index += 1;
        Some(PlannedWrite {
            index,
            nsid: namespace as u32 + 1,
            lba: offset_bytes / sector,
            length_bytes: length_bytes as u32,
            zeroes,
        })
    }

    fn mixed_length(&mut self) -> u64 {
        let sectors_max = (MIXED_WRITE_BYTES_MAX / SECTOR_SIZE) as u64;
        if self.rng.below(2) == 0 {
            // Whole blocks, so a mixed workload still produces references.
            (1 + self.rng.below(4)) * BLOCK_SIZE as u64
        } else {
            (1 + self.rng.below(sectors_max)) * SECTOR_SIZE as u64
        }
    }
}

/// Where a finished write is recorded, so a checker can tell acknowledged writes from lost ones.
pub trait AckLog {
    fn record(&mut self, write: &PlannedWrite);
    /// Called once per poll that recorded anything (a line only counts once it is flushed).
    fn flush(&mut self);
}

impl<W: std::io::Write> AckLog for std::io::BufWriter<W> {
    fn record(&mut self, write: &PlannedWrite) {
        use std::io::Write;
        writeln!(
            self,
            "{} {} {} {} {}",
            write.index, write.nsid, write.lba, write.length_bytes, write.zeroes as u8
        )
        .expect("ack log write failed");
    }
    fn flush(&mut self) {
        std::io::Write::flush(self).expect("ack log flush failed");
    }
}

/// Parses one line written by the [`AckLog`] of a `BufWriter`.
pub fn parse_ack_line(line: &str) -> Option<PlannedWrite> {
    let mut fields = line.split_whitespace().map(|f| f.parse::<u64>().ok());
    let write = PlannedWrite {
        index: fields.next()??,
        nsid: fields.next()?? as u32,
        lba: fields.next()??,
        length_bytes: fields.next()?? as u32,
        zeroes: fields.next()?? != 0,
    };
    Some(write)
}

/// The workload as a source front end: keeps `queue_depth` writes outstanding through the
/// volume API, writes payloads straight into their ring slots, asks for a CP every
/// `cp_every_writes` writes, and finishes after `write_count` writes completed.
pub struct Workload {
    planner: Planner,
    seed: u64,
    queue_depth: usize,
    write_count: u64,
    cp_every_writes: u64,
    issued: u64,
    completed: u64,
    /// A write refused for back-pressure, retried first on the next poll.
    pending: Option<PlannedWrite>,
    /// In issue order; the volume completes writes in that order (ascending ids).
    outstanding: std::collections::VecDeque<(WriteId, PlannedWrite)>,
    ack_log: Option<Box<dyn AckLog + Send>>,
    ack_log_dirty: bool,
    exhausted: bool,
}

impl Workload {
    pub fn new(
        planner: Planner,
        seed: u64,
        queue_depth: usize,
        write_count: u64,
        cp_every_writes: u64,
    ) -> Self {
        assert!((1..=QUEUE_DEPTH_MAX).contains(&queue_depth));
        Workload {
            planner,
            seed,
            queue_depth,
            write_count,
            cp_every_writes,
            issued: 0,
            completed: 0,
            pending: None,
            outstanding: std::collections::VecDeque::with_capacity(queue_depth),
            ack_log: None,
            ack_log_dirty: false,
            exhausted: false,
        }
    }

    pub fn with_ack_log(mut self, log: Box<dyn AckLog + Send>) -> Self {
        self.ack_log = Some(log);
        self
    }

    pub fn completed(&self) -> u64 {
        self.completed
    }

    fn issue(
        &mut self,
        now_us: u64,
        source: &mut SourceEngine,
        write: PlannedWrite,
    ) -> Result<WriteId, WriteRefused> {
        if write.zeroes {
            return source.write_zeroes(now_us, write.nsid, write.lba, write.length_bytes as u64);
        }
        let slot = source.reserve_write(now_us, write.nsid, write.lba, write.length_bytes)?;
        fill_payload(self.seed, write.index, source.write_buffer(&slot));
        let id = slot.id();
        source.commit_write(now_us, slot);
        Ok(id)
    }
}

impl FrontEnd for Workload {
    fn poll(&mut self, now_us: u64, volume: &mut Volume) -> usize {
        let mut work = 0;
        while let Some((id, result)) = volume.pop_completed() {
            self.write_completed(id, result.is_ok());
            work += 1;
        }
        let source = &mut volume.source;
        while self.outstanding.len() < self.queue_depth && !self.exhausted {
            let write = match self.pending.take() {
                Some(write) => write,
                None if self.issued < self.write_count => match self.planner.next_write() {
                    Some(write) => write,
                    None => {
                        self.exhausted = true;
                        break;
                    }
                },
                None => break,
            };
            match self.issue(now_us, source, write) {
                Ok(id) => {
                    self.outstanding.push_back((id, write));
                    self.issued += 1;
                    work += 1;
                    if self.cp_every_writes > 0 && self.issued.is_multiple_of(self.cp_every_writes)
                    {
                        source.request_cp(now_us);
                    }
                }
                Err(WriteRefused::Backpressure) => {
                    self.pending = Some(write);
                    break;
                }
                Err(WriteRefused::PeerLost) => {
                    log::warn!("workload: write {write:?} refused: the destination is lost");
                    self.issued += 1;
                }
                Err(refused) => panic!("workload write {write:?} refused: {refused:?}"),
            }
        }
        if self.ack_log_dirty {
            if let Some(log) = self.ack_log.as_mut() {
                log.flush();
            }
            self.ack_log_dirty = false;
        }
        work
    }

    fn is_finished(&self) -> bool {
        let all_issued = self.exhausted || self.issued == self.write_count;
        all_issued && self.pending.is_none() && self.outstanding.is_empty()
    }
}

impl Workload {
    /// A write finished: acknowledged (`durable`), or failed (the peer is lost under the fail
    /// policy), which is never logged as acknowledged.
    fn write_completed(&mut self, id: WriteId, durable: bool) {
        let (oldest, write) = self
            .outstanding
            .pop_front()
            .unwrap_or_else(|| panic!("completion of unknown write {id:?}"));
        assert_eq!(oldest, id, "writes complete in the order they were issued");
        self.completed += 1;
        if !durable {
            log::warn!("workload: write {write:?} failed: the destination is lost");
            return;
        }
        if let Some(log) = self.ack_log.as_mut() {
            log.record(&write);
            self.ack_log_dirty = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_writes_and_payloads() {
        let mut a = Planner::new(Pattern::Mixed, 7, vec![1 << 20, 2 << 20]);
        let mut b = Planner::new(Pattern::Mixed, 7, vec![1 << 20, 2 << 20]);
        for _ in 0..1000 {
            assert_eq!(a.next_write(), b.next_write());
        }
        let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
        fill_payload(7, 3, &mut x);
        fill_payload(7, 3, &mut y);
        assert_eq!(x, y);
        fill_payload(7, 4, &mut y);
        assert_ne!(x, y);
    }

    #[test]
    fn writes_stay_inside_their_namespace_and_are_sector_sized() {
        let sizes = vec![1 << 20, 3 << 20];
        let mut planner = Planner::new(Pattern::Mixed, 11, sizes.clone());
        let mut unaligned = 0;
        for _ in 0..10_000 {
            let write = planner.next_write().unwrap();
            let end = write.lba * 512 + write.length_bytes as u64;
            assert!(end <= sizes[write.nsid as usize - 1]);
            assert_eq!(write.length_bytes % 512, 0);
            if !(write.lba * 512).is_multiple_of(4096) || !write.length_bytes.is_multiple_of(4096) {
                unaligned += 1;
            }
        }
        assert!(
            unaligned > 1000,
            "mixed pattern must include unaligned writes"
        );
    }

    #[test]
    fn hotspot_sends_about_90_percent_of_writes_to_a_tenth_of_the_blocks() {
        let sizes = vec![1 << 20, 4 << 20];
        let mut planner = Planner::new(Pattern::Hotspot, 13, sizes.clone());
        let mut hot = 0;
        let mut cold_blocks = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let write = planner.next_write().unwrap();
            let size = sizes[write.nsid as usize - 1];
            let offset = write.lba * 512;
            assert_eq!(write.length_bytes, 4096);
            assert!(offset.is_multiple_of(4096) && offset + 4096 <= size);
            assert!(!write.zeroes);
            let block = offset / 4096;
            if block < hotspot_hot_blocks(size / 4096) {
                hot += 1;
            } else {
                cold_blocks.insert((write.nsid, block));
            }
        }
        assert!((8_500..=9_500).contains(&hot), "{hot} of 10,000 writes hot");
        // The cold writes spread over the rest of the namespaces, not onto a few blocks.
        assert!(cold_blocks.len() > 500, "{} cold blocks", cold_blocks.len());
        assert_eq!(hotspot_hot_blocks(256), 25);
        assert_eq!(hotspot_hot_blocks(4), 1);
    }

    #[test]
    fn hotspot_is_deterministic_by_seed() {
        let plan = |seed| {
            let mut planner = Planner::new(Pattern::Hotspot, seed, vec![1 << 20, 2 << 20]);
            (0..1000)
                .map(|_| planner.next_write().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(plan(3), plan(3));
        assert_ne!(plan(3), plan(4));
        assert_eq!("hotspot".parse::<Pattern>(), Ok(Pattern::Hotspot));
    }

    #[test]
    fn disjoint_writes_never_overlap_and_end() {
        let mut planner = Planner::new(Pattern::Disjoint, 5, vec![1 << 20]);
        let mut end_prev = 0;
        let mut count = 0;
        while let Some(write) = planner.next_write() {
            assert!(write.lba * 512 >= end_prev);
            end_prev = write.lba * 512 + write.length_bytes as u64;
            count += 1;
        }
        assert!(count > 50);
    }
}
