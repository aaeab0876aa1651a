//! The workload generator: which I/O comes next (read or write, at which I/O block).
//!
//! The exercised LBA range is cut into I/O blocks of `--io-size` bytes; every I/O covers exactly one
//! I/O block, so verify mode can keep one sequence number per block. Random patterns draw blocks
//! uniformly from a seeded generator (runs with the same `--seed` issue the same sequence);
//! sequential patterns walk the range from a per-connection start and wrap.

use crate::cli::Pattern;

/// splitmix64: small, fast, well-distributed; deterministic from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (Lemire's multiply-shift; the bias is below 2^-40 for our bounds).
    #[inline]
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0);
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
}

/// One I/O to issue: its kind and its I/O block (LBA = block * sectors per I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRequest {
    pub kind: IoKind,
    pub block: u64,
}

#[derive(Debug, Clone)]
pub struct Workload {
    random: bool,
    read_percent: u8,
    block_count: u64,
    cursor: u64,
    rng: Rng,
}

impl Workload {
    /// Connection `index` of `count` gets its own seed and, for sequential patterns, its own start
    /// so connections do not walk the same blocks in lock step.
    pub fn new(
        pattern: Pattern,
        read_percent: u8,
        block_count: u64,
        seed: u64,
        index: u16,
        count: u16,
    ) -> Workload {
        assert!(block_count > 0 && read_percent <= 100 && index < count);
        Workload {
            random: pattern.is_random(),
            read_percent: pattern.read_percent(read_percent),
            block_count,
            cursor: block_count * u64::from(index) / u64::from(count),
            rng: Rng::new(seed ^ (u64::from(index) << 48)),
        }
    }

    /// A sequential writer over the whole range, one block each: verify mode's fill and read-back.
    pub fn sweep(kind: IoKind, block_count: u64) -> Workload {
        let read_percent = if kind == IoKind::Read { 100 } else { 0 };
        Workload {
            random: false,
            read_percent,
            block_count,
            cursor: 0,
            rng: Rng::new(0),
        }
    }

    #[inline]
    pub fn next_request(&mut self) -> IoRequest {
        let kind = match self.read_percent {
            100 => IoKind::Read,
            0 => IoKind::Write,
            percent => {
                if self.rng.below(100) < u64::from(percent) {
                    IoKind::Read
                } else {
                    IoKind::Write
                }
            }
        };
        let block = if self.random {
            self.rng.below(self.block_count)
        } else {
            let block = self.cursor;
            self.cursor = if block + 1 == self.block_count {
                0
            } else {
                block + 1
            };
            block
        };
        IoRequest { kind, block }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_is_seeded_uniform_and_in_range() {
        let mut first = Workload::new(Pattern::RandRead, 70, 1000, 5, 0, 1);
        let mut second = Workload::new(Pattern::RandRead, 70, 1000, 5, 0, 1);
        let mut hits = [0u32; 10];
        for _ in 0..100_000 {
            let request = first.next_request();
            assert_eq!(request, second.next_request());
            assert_eq!(request.kind, IoKind::Read);
            hits[(request.block / 100) as usize] += 1;
        }
        assert!(
            hits.iter().all(|&h| (9_000..11_000).contains(&h)),
            "{hits:?}"
        );
        let mut other_seed = Workload::new(Pattern::RandRead, 70, 1000, 6, 0, 1);
        assert!((0..10).any(|_| other_seed.next_request() != first.next_request()));
    }

    #[test]
    fn sequential_wraps_and_connections_start_apart() {
        let mut workload = Workload::new(Pattern::Write, 70, 4, 1, 1, 2);
        let blocks: Vec<u64> = (0..5).map(|_| workload.next_request().block).collect();
        assert_eq!(blocks, [2, 3, 0, 1, 2]);
        let mut sweep = Workload::sweep(IoKind::Read, 3);
        assert_eq!(
            sweep.next_request(),
            IoRequest {
                kind: IoKind::Read,
                block: 0
            }
        );
    }

    #[test]
    fn mixed_pattern_honours_read_percent() {
        let mut workload = Workload::new(Pattern::RandReadWrite, 70, 100, 3, 0, 1);
        let reads = (0..100_000)
            .filter(|_| workload.next_request().kind == IoKind::Read)
            .count();
        assert!((69_000..71_000).contains(&reads), "{reads}");
        let mut writes_only = Workload::new(Pattern::RandWrite, 70, 100, 3, 0, 1);
        assert!((0..1000).all(|_| writes_only.next_request().kind == IoKind::Write));
    }
}
