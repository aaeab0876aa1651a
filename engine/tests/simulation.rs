//! Seeded simulation of a source and a destination wired by an in-memory lossy pipe on virtual
//! time (engine spec "Tests"; STYLE 10). The workload mixes aligned and unaligned writes and
//! write-zeroes, holds and aborts reservations, takes random CPs, and injects faults: link drops,
//! outages longer than the peer timeout, corrupted bytes on the wire, partial sends,
//! out-of-order commits, source crashes (torn entries, lost unflushed primary writes, in-flight
//! device writes landing or not) and destination crashes, device errors on reads, writes and
//! flushes of both sides, and frozen peers: nothing delivered in one or both directions for a
//! while, the connection left open (a SIGSTOPped process), which the sides' heartbeat and ack
//! deadlines must turn into a lost peer and a reconnect (a freeze longer than the peer timeout
//! that is not declared is a failure). A third of the seeds run the `fail` peer-loss policy:
//! writes failed while the peer is lost must never have completed, and stay in the ring for the
//! mirror.
//!
//! Another third run `degrade`: a write may then complete without the destination having logged
//! it only while the source is degraded, and only once every extent it touches is marked in the
//! durable image of the source's metadata (reopened from its device). CPs complete on the
//! primary alone; the returning destination is resynced (references first, then data read from
//! the primary), and both sides crash at every step of it (crashes come often while a resync
//! runs), a destination now and then without its log (a fresh ring: references fail over to
//! data). A fifth of all seeds form a fresh pair without `assume_identical` over primaries that
//! hold data: the initial full sync. Every seed that degraded or resynced must end, once
//! quiesced, with `ResyncDone`, one generation on both sides, an empty bitmap and the mirror
//! equal to the primary.
//!
//! The devices are asynchronous (`SimDevice`): every op completes after a random virtual delay,
//! in random order; a write reaches what reads see at submit or at completion (chosen per op);
//! a flush makes durable only what completed before it was submitted.
//!
//! Along the way it asserts the ack rule (above) and the point in time (invariant 7): whenever a
//! CP is applied on the mirror of a destination that is not a resync target (a resync target's
//! mirror mixes two points in time by design), each mirror namespace equals, byte for byte, the
//! image of every write of that CP and the earlier ones in seq order. After quiescing it asserts
//! mirror == primary == that image and that every completed write's data is present. Then the
//! source crashes and the destination is promoted (under `degrade`, half the time during or
//! after an outage): a resync target must refuse; a promoted mirror holds, per block, its last
//! acknowledged write or a later one, never older (writes acknowledged by a degraded source
//! alone excepted, until a resync brought them over: the destination never saw them).
//!
//! Half of the seeds whose promotion left the old source merely stale then fail back: the
//! promoted node runs as the source over its former mirrors (a fresh ring, its metadata reopened:
//! the promoted generation, whose bitmap counts changes since the old one), and the old source's
//! node (its primaries crashed with it) as its destination over its former primaries, on its own
//! metadata with the extents of its old ring's entries newer than its last completed CP marked
//! durably before it opens (what attach does: writes it took that may never have reached the
//! other side), on a fresh ring. The same harness drives the new pair (the devices and metadata
//! swap roles): host writes on the new source, which runs alone a while first, and every fault
//! above, crashes of either side included; once quiesced it must have ended its resync with
//! `ResyncDone`: one generation, no marks on either side (durably), the new mirror equal to the
//! new primary byte for byte, holding every write either pair acknowledged (or a later one).
//!
//! Each side has node metadata (generations, bitmap) on a metadata device with a volatile cache:
//! writes complete after a random delay and become durable only by a flush; a crash keeps or
//! loses each unflushed sector (its own crash safety is `metadata`'s property test). A crash
//! reopens each side's metadata from what survived; the promoted side's new generation refuses
//! the old source as stale, or as a split brain when it took a generation of its own.
//!
//! `SIM_SEEDS=N` runs N seeds (default 50); `SIM_SEED=S` runs one seed; `SIM_KEEP_GOING=1` runs
//! every seed and lists the failing ones at the end; `SIM_DEBUG=1` prints the engine's log and a
//! line per seed; `SIM_WATCH=nsid:sector` prints every device write of one sector;
//! `SIM_TIMING=1` prints each seed's run time by kind.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use nvmirror_engine::generation::FLAG_RESYNC_TARGET;
use nvmirror_engine::geometry::{RING_BYTES_MIN, SECTOR_SIZE};
use nvmirror_engine::metadata::{NodeMetadata, BITMAP_EXTENT_BYTES_DEFAULT};
use nvmirror_engine::ring::NvramRing;
use nvmirror_engine::wire::{frame_length, MESSAGE_HEADER_BYTES};
use nvmirror_engine::{
    CpMode, Destination, DestinationConfig, DestinationEvent, DeviceCompletion, DeviceError,
    DeviceOp, DeviceOpId, DeviceRequest, EngineError, PeerLossPolicy, PeerState, Source,
    SourceConfig, SourceEvent, WriteRefused, WriteSlot,
};

const VOLUME: [u8; 16] = *b"nvmirror-sim-vol";
const NAMESPACE_BYTES: u64 = 256 * 1024;
const NAMESPACES: usize = 2;
const SIZES: [u64; NAMESPACES] = [NAMESPACE_BYTES; NAMESPACES];
const SECTORS: usize = (NAMESPACE_BYTES / SECTOR_SIZE as u64) as usize;
const STEPS: u64 = 2500;
/// Steps of a degrade or initial-sync seed: their resyncs and crashes cost more per step (a
/// full sync starts over at every reconnect), so fewer keep 10,000 seeds within minutes.
const STEPS_RESYNC: u64 = 1500;
const QUIESCE_STEPS_MAX: u64 = 100_000;
/// Steps of the failback pair before it is quiesced.
const STEPS_FAILBACK: u64 = 800;
const QUEUE_DEPTH: usize = 24;
const RECEIVE_TIMEOUT_US: u64 = 5000;
/// The largest virtual time one step advances.
const STEP_US_MAX: u64 = 20;

/// `SIM_DEBUG` is set (read once: the lookup is not free on hot paths).
fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var("SIM_DEBUG").is_ok())
}

/// `SIM_WATCH=nsid:sector`: every device write of that sector is printed.
fn watched() -> Option<(u32, usize)> {
    static WATCH: std::sync::OnceLock<Option<(u32, usize)>> = std::sync::OnceLock::new();
    *WATCH.get_or_init(|| {
        let watch = std::env::var("SIM_WATCH").ok()?;
        let (nsid, sector) = watch.split_once(':').expect("SIM_WATCH=nsid:sector");
        Some((nsid.parse().unwrap(), sector.parse().unwrap()))
    })
}

/// The virtual time, for the debug logger.
static NOW_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// `SIM_DEBUG=1`: the engine's log lines on stderr, stamped with the virtual time.
struct DebugLogger;

impl log::Log for DebugLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let now = NOW_US.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!("DEBUG t {now}: {}", record.args());
        }
    }
    fn flush(&self) {}
}

/// xorshift64*: small, seeded, good enough for fault schedules.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

fn sectors_of(start: usize, len: usize) -> std::ops::Range<usize> {
    start / SECTOR_SIZE..(start + len) / SECTOR_SIZE
}

fn sector_range(sector: usize) -> std::ops::Range<usize> {
    sector * SECTOR_SIZE..(sector + 1) * SECTOR_SIZE
}

/// What a submitted op still has to do.
enum Pending {
    Read {
        start: usize,
        len: usize,
    },
    /// `early`: the bytes reached `current` at submit already.
    Write {
        start: usize,
        data: Vec<u8>,
        early: bool,
    },
    /// The sectors completed (and not yet durable) when the flush was submitted, with their
    /// content and generation then.
    Flush {
        sectors: Vec<(usize, u64)>,
        bytes: Vec<u8>,
    },
}

struct InflightOp {
    id: DeviceOpId,
    due_us: u64,
    pending: Pending,
}

/// Per op kind (read, write, flush), failures per million ops.
#[derive(Clone, Copy)]
struct FaultRates([u64; 3]);

impl FaultRates {
    const NONE: FaultRates = FaultRates([0; 3]);
    fn of(&self, pending: &Pending) -> u64 {
        match pending {
            Pending::Read { .. } => self.0[0],
            Pending::Write { .. } => self.0[1],
            Pending::Flush { .. } => self.0[2],
        }
    }
}

/// An asynchronous namespace with a volatile write cache. `current` is what reads see;
/// `completed` holds only what completed writes put there; `durable` what a power loss keeps
/// for sure. Ops complete after a random delay in random order.
struct SimDevice {
    name: &'static str,
    durable: Vec<u8>,
    current: Vec<u8>,
    completed: Vec<u8>,
    /// Per sector: `completed` may differ from `durable`.
    dirty: Vec<bool>,
    /// Per sector: bumped by every completed write.
    generation: Vec<u64>,
    inflight: Vec<InflightOp>,
    /// Overlapping ops in flight are a bug of the core (it orders them); mirrors may overlap a
    /// write with one of the same bytes (a retried CP's block while the failed one finishes).
    overlap_same_bytes_ok: bool,
    errors: u64,
}

impl SimDevice {
    fn new(name: &'static str, overlap_same_bytes_ok: bool) -> Self {
        let bytes = NAMESPACE_BYTES as usize;
        Self {
            name,
            durable: vec![0; bytes],
            current: vec![0; bytes],
            completed: vec![0; bytes],
            dirty: vec![false; SECTORS],
            generation: vec![0; SECTORS],
            inflight: Vec::new(),
            overlap_same_bytes_ok,
            errors: 0,
        }
    }

    fn submit(&mut self, seed: u64, op: DeviceOp<'_>, now_us: u64, rng: &mut Rng) {
        let (start, end) = op.request.range();
        let nsid = op.nsid;
        assert_eq!(start % SECTOR_SIZE as u64, 0);
        assert_eq!(end % SECTOR_SIZE as u64, 0);
        assert!(end <= NAMESPACE_BYTES);
        let (start, end) = (start as usize, end as usize);
        let pending = match op.request {
            DeviceRequest::Read { .. } => Pending::Read {
                start,
                len: end - start,
            },
            DeviceRequest::Write { data, .. } => Pending::Write {
                start,
                data: data.to_vec(),
                early: rng.below(2) == 0,
            },
            DeviceRequest::WriteZeroes { .. } => Pending::Write {
                start,
                data: vec![0; end - start],
                early: rng.below(2) == 0,
            },
            DeviceRequest::Flush => {
                let mut sectors = Vec::new();
                let mut bytes = Vec::new();
                for sector in 0..SECTORS {
                    if self.dirty[sector] {
                        sectors.push((sector, self.generation[sector]));
                        bytes.extend_from_slice(&self.completed[sector_range(sector)]);
                    }
                }
                Pending::Flush { sectors, bytes }
            }
        };
        if let Pending::Read { .. } | Pending::Write { .. } = pending {
            self.check_overlap(seed, start, end, &pending);
        }
        if let (Some((watched, sector)), Pending::Write { data, .. }) = (watched(), &pending) {
            if nsid == watched && (start..end).contains(&(sector * SECTOR_SIZE)) {
                let at = sector * SECTOR_SIZE - start;
                eprintln!(
                    "DEBUG t {now_us}: {} write of sector {sector} (bytes {start}..{end}): {:?}",
                    self.name,
                    identify(&data[at..at + SECTOR_SIZE], sector as u64)
                );
            }
        }
        // Mostly fast, now and then slow (a device's tail latency).
        let delay = if rng.below(20) == 0 {
            rng.below(1000)
        } else {
            rng.below(50)
        };
        self.inflight.push(InflightOp {
            id: op.id,
            due_us: now_us + 1 + delay,
            pending,
        });
    }

    fn check_overlap(&self, seed: u64, start: usize, end: usize, new: &Pending) {
        for op in &self.inflight {
            let (other_start, other_end, other_data) = match &op.pending {
                Pending::Read { start, len } => (*start, start + len, None),
                Pending::Write { start, data, .. } => (*start, start + data.len(), Some(data)),
                Pending::Flush { .. } => continue,
            };
            if other_start >= end || start >= other_end {
                continue;
            }
            let new_data = match new {
                Pending::Write { data, .. } => Some(data),
                _ => None,
            };
            let ok = match (new_data, other_data) {
                (None, None) => true,
                (Some(a), Some(b)) if self.overlap_same_bytes_ok => {
                    let (lo, hi) = (start.max(other_start), end.min(other_end));
                    a[lo - start..hi - start] == b[lo - other_start..hi - other_start]
                }
                _ => false,
            };
            let kind = |data: Option<&Vec<u8>>| if data.is_some() { "write" } else { "read" };
            assert!(
                ok,
                "seed {seed}: {}: {} at bytes {start}..{end} submitted while an overlapping \
                 {} at {other_start}..{other_end} is in flight",
                self.name,
                kind(new_data),
                kind(other_data)
            );
        }
    }

    /// A write's bytes as of its completion.
    fn land(&mut self, start: usize, data: &[u8]) {
        self.current[start..start + data.len()].copy_from_slice(data);
        self.completed[start..start + data.len()].copy_from_slice(data);
        for sector in sectors_of(start, data.len()) {
            self.dirty[sector] = true;
            self.generation[sector] += 1;
        }
    }

    /// Takes the ops due by `now_us`, in random order, completing each (or failing it at the
    /// per-kind rate of `faults`).
    fn take_due(
        &mut self,
        now_us: u64,
        rng: &mut Rng,
        faults: FaultRates,
    ) -> Vec<(DeviceOpId, Result<Vec<u8>, DeviceError>)> {
        let mut due = Vec::new();
        let mut index = 0;
        while index < self.inflight.len() {
            if self.inflight[index].due_us <= now_us {
                due.push(self.inflight.swap_remove(index));
            } else {
                index += 1;
            }
        }
        for i in (1..due.len()).rev() {
            due.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut done = Vec::with_capacity(due.len());
        for op in due {
            let fail = rng.chance(faults.of(&op.pending));
            let injected = DeviceError {
                kind: std::io::ErrorKind::Other,
                errno: Some(5),
            };
            let result = match op.pending {
                Pending::Read { start, len } => {
                    if fail {
                        Err(injected)
                    } else {
                        Ok(self.current[start..start + len].to_vec())
                    }
                }
                Pending::Write { start, data, early } => {
                    // A failed write's range may or may not hold its bytes.
                    if !fail || rng.below(2) == 0 {
                        self.land(start, &data);
                    } else if early {
                        let range = start..start + data.len();
                        let (current, completed) = (&mut self.current, &self.completed);
                        current[range.clone()].copy_from_slice(&completed[range]);
                    }
                    if fail {
                        Err(injected)
                    } else {
                        Ok(Vec::new())
                    }
                }
                Pending::Flush { sectors, bytes } => {
                    if !fail {
                        for (i, &(sector, generation)) in sectors.iter().enumerate() {
                            self.durable[sector_range(sector)]
                                .copy_from_slice(&bytes[sector_range(i)]);
                            if self.generation[sector] == generation {
                                self.dirty[sector] = false;
                            }
                        }
                        Ok(Vec::new())
                    } else {
                        Err(injected)
                    }
                }
            };
            if result.is_err() {
                self.errors += 1;
            }
            done.push((op.id, result));
        }
        done
    }

    /// A power loss: each sector of a write in flight lands or not; then each sector not known
    /// durable keeps its completed content or falls back to the durable one. Ops in flight are
    /// gone (nobody hears of them).
    fn crash(&mut self, rng: &mut Rng) {
        for op in std::mem::take(&mut self.inflight) {
            if let Pending::Write { start, data, .. } = op.pending {
                for sector in sectors_of(start, data.len()) {
                    let range = sector_range(sector);
                    let from = sector * SECTOR_SIZE - start;
                    if rng.below(2) == 0 {
                        self.completed[range.clone()]
                            .copy_from_slice(&data[from..from + SECTOR_SIZE]);
                        self.dirty[sector] = true;
                    }
                }
            }
        }
        for sector in 0..SECTORS {
            if self.dirty[sector] {
                let range = sector_range(sector);
                if rng.below(2) == 0 {
                    self.durable[range.clone()].copy_from_slice(&self.completed[range]);
                } else {
                    self.completed[range.clone()].copy_from_slice(&self.durable[range]);
                }
                self.dirty[sector] = false;
            }
        }
        self.current.copy_from_slice(&self.durable);
        self.completed.copy_from_slice(&self.durable);
    }

    /// What reads see.
    fn contents(&self) -> &[u8] {
        &self.current
    }
}

/// Hands `result` to a core as a completion.
fn completion(id: DeviceOpId, result: &Result<Vec<u8>, DeviceError>) -> DeviceCompletion<'_> {
    DeviceCompletion {
        id,
        result: match result {
            Ok(data) => Ok(&data[..]),
            Err(error) => Err(*error),
        },
    }
}

/// The content of sector `lba` written by write `number`.
fn sector_pattern(number: u64, lba: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&number.to_le_bytes());
    out[8..16].copy_from_slice(&lba.to_le_bytes());
    let key = number.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba.wrapping_mul(31);
    for (i, word) in out[16..].chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&key.wrapping_add(i as u64).to_le_bytes());
    }
}

/// Which write a sector's content came from: Some(0) = zeroes, Some(n) = write n.
fn identify(sector: &[u8], lba: u64) -> Option<u64> {
    if sector == [0; SECTOR_SIZE] {
        return Some(0);
    }
    let number = u64::from_le_bytes(sector[..8].try_into().unwrap());
    let mut expected = vec![0; SECTOR_SIZE];
    sector_pattern(number, lba, &mut expected);
    (expected == sector).then_some(number)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    /// Reserved, and committed or still to be (in the ring, or on its way there).
    Live,
    /// Given up (`abort_write`): a write of the primary's own content, i.e. nothing.
    Aborted,
    /// Never committed before a source crash (or after a torn one): it never existed.
    Dropped,
}

struct WriteRecord {
    nsid: u32,
    lba: u64,
    sectors: u64,
    zeroes: bool,
    completed: bool,
    seq: u64,
    /// The CP its entry belongs to (the source's active CP right after the reservation).
    cp: u64,
    fate: Fate,
    /// Completed while the source was degraded, and no resync finished since: only the source
    /// holds it (a promoted destination may lack it; a failover then loses it by design).
    degraded: bool,
}

/// What the host did: every write and, per sector, the writes that covered it in issue order
/// (= seq order among the writes that exist: a crash drops a seq suffix, and the seqs after it
/// are larger than every surviving one).
struct Model {
    writes: Vec<WriteRecord>,
    history: Vec<Vec<Vec<u64>>>,
    /// Write numbers per CP, in issue order.
    by_cp: HashMap<u64, Vec<u64>>,
    /// The primary as of the end of CP `image_cp` (every existing write of CPs up to it, in seq
    /// order): what the mirror must hold once that CP is applied.
    image: Vec<Vec<u8>>,
    image_cp: u64,
    cps_checked: u64,
}

impl Model {
    fn new() -> Self {
        Self {
            writes: vec![WriteRecord {
                nsid: 0,
                lba: 0,
                sectors: 0,
                zeroes: true,
                completed: true,
                seq: 0,
                cp: 0,
                fate: Fate::Live,
                degraded: false,
            }],
            history: vec![vec![Vec::new(); SECTORS]; NAMESPACES],
            by_cp: HashMap::new(),
            image: vec![vec![0; NAMESPACE_BYTES as usize]; NAMESPACES],
            image_cp: 0,
            cps_checked: 0,
        }
    }

    fn add(&mut self, nsid: u32, lba: u64, sectors: u64, zeroes: bool, seq: u64, cp: u64) -> u64 {
        let number = self.writes.len() as u64;
        assert!(cp > self.image_cp, "a write joins a CP not yet applied");
        self.writes.push(WriteRecord {
            nsid,
            lba,
            sectors,
            zeroes,
            completed: false,
            seq,
            cp,
            fate: Fate::Live,
            degraded: false,
        });
        for sector in lba..lba + sectors {
            self.history[nsid as usize - 1][sector as usize].push(number);
        }
        self.by_cp.entry(cp).or_default().push(number);
        number
    }

    /// Data the primary held before the pair was formed (the initial sync copies it): a completed
    /// write of CP 0, already in the image. Returns its number (its sectors' pattern).
    fn preexisting(&mut self, nsid: u32, lba: u64, sectors: u64) -> u64 {
        let number = self.writes.len() as u64;
        self.writes.push(WriteRecord {
            nsid,
            lba,
            sectors,
            zeroes: false,
            completed: true,
            seq: 0,
            cp: 0,
            fate: Fate::Live,
            degraded: false,
        });
        let image = &mut self.image[nsid as usize - 1];
        for sector in lba..lba + sectors {
            self.history[nsid as usize - 1][sector as usize].push(number);
            sector_pattern(number, sector, &mut image[sector_range(sector as usize)]);
        }
        number
    }

    /// Moves the image to the end of CP `cp_number` (the next one).
    fn advance_image(&mut self, seed: u64, cp_number: u64) {
        assert_eq!(
            cp_number,
            self.image_cp + 1,
            "seed {seed}: CP {cp_number} applied after CP {}",
            self.image_cp
        );
        self.image_cp = cp_number;
        let mut last_seq = 0;
        for number in self.by_cp.remove(&cp_number).unwrap_or_default() {
            let write = &self.writes[number as usize];
            if write.fate != Fate::Live {
                continue;
            }
            assert!(
                write.seq > last_seq,
                "seed {seed}: CP {cp_number} seqs in order"
            );
            last_seq = write.seq;
            let image = &mut self.image[write.nsid as usize - 1];
            for lba in write.lba..write.lba + write.sectors {
                let out = &mut image[sector_range(lba as usize)];
                if write.zeroes {
                    out.fill(0);
                } else {
                    sector_pattern(number, lba, out);
                }
            }
        }
    }

    /// Namespace `nsid` of `image` equals the model's image of CP `image_cp`, byte for byte.
    fn check_image(&self, nsid: u32, image: &[u8], what: &str) {
        let expected = &self.image[nsid as usize - 1];
        if expected[..] == image[..] {
            return;
        }
        let sector = expected
            .chunks(SECTOR_SIZE)
            .zip(image.chunks(SECTOR_SIZE))
            .position(|(a, b)| a != b)
            .unwrap();
        let range = sector_range(sector);
        panic!(
            "{what}: ns {nsid} is not the point-in-time image of CP {}: sector {sector} holds \
             {:?}, expected {:?} (history {:?})",
            self.image_cp,
            identify(&image[range.clone()], sector as u64),
            identify(&expected[range], sector as u64),
            self.describe(nsid, sector),
        );
    }

    /// (number, seq, cp, fate, completed) of the writes that covered a sector.
    fn describe(&self, nsid: u32, sector: usize) -> Vec<(u64, u64, u64, Fate, bool)> {
        self.history[nsid as usize - 1][sector]
            .iter()
            .map(|&n| {
                let w = &self.writes[n as usize];
                (n, w.seq, w.cp, w.fate, w.completed)
            })
            .collect()
    }

    /// Every sector holds the last completed write covering it, or a later write.
    fn check(&self, nsid: u32, image: &[u8], what: &str) {
        self.check_counting(nsid, image, what, true);
    }

    /// [`Model::check`]; `degraded`: writes completed while degraded (not resynced) count as
    /// completed (false after a failover: the destination never saw them, by design).
    fn check_counting(&self, nsid: u32, image: &[u8], what: &str, degraded: bool) {
        for (sector, history) in self.history[nsid as usize - 1].iter().enumerate() {
            let history: Vec<u64> = history
                .iter()
                .copied()
                .filter(|&n| self.writes[n as usize].fate == Fate::Live)
                .collect();
            let bytes = &image[sector_range(sector)];
            let found = identify(bytes, sector as u64)
                .unwrap_or_else(|| panic!("{what}: ns {nsid} sector {sector}: garbage"));
            let completed = |n: &u64| {
                let write = &self.writes[*n as usize];
                write.completed && (degraded || !write.degraded)
            };
            let allowed = match history.iter().rposition(completed) {
                Some(from) => &history[from..],
                None => &history[..],
            };
            let ok = if found == 0 {
                allowed.iter().any(|&n| self.writes[n as usize].zeroes)
                    || !history.iter().any(completed)
            } else {
                allowed.contains(&found)
            };
            assert!(
                ok,
                "{what}: ns {nsid} sector {sector} holds write {found}, allowed {allowed:?}"
            );
        }
    }
}

type SimSource = Source<Vec<u8>>;
type SimDestination = Destination<Vec<u8>>;

/// What a seed did, summed over seeds.
#[derive(Default, Clone, Copy, Debug)]
struct Totals {
    crashes: u64,
    link_errors: u64,
    cps_completed: u64,
    cps_checked: u64,
    references: u64,
    device_errors: u64,
    mirror_failures: u64,
    aborts: u64,
    freezes: u64,
    peers_lost: u64,
    writes_failed: u64,
    /// Times a source went on without its destination (`degrade`), and writes completed so.
    degrades: u64,
    degraded_writes: u64,
    /// CPs completed on the primary alone.
    local_cps: u64,
    /// `ResyncDone` events, and those of them that ended an initial full sync.
    resyncs_done: u64,
    full_syncs_done: u64,
    /// Resync blocks sent as references and as data (every source process's counters).
    resync_reference_blocks: u64,
    resync_data_blocks: u64,
    /// Crashes of either side while a resync was in progress.
    resync_crashes: u64,
    /// Destination restarts on a fresh ring (the log lost).
    lost_logs: u64,
    promotions: u64,
    /// Promotions refused because the destination was a resync target.
    refused_promotions: u64,
    /// Failbacks resynced to the end: the old source's node as the promoted node's destination.
    failbacks: u64,
    /// Extents the old source's ring marked on its node for a failback.
    failback_ring_marks: u64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.crashes += other.crashes;
        self.link_errors += other.link_errors;
        self.cps_completed += other.cps_completed;
        self.cps_checked += other.cps_checked;
        self.references += other.references;
        self.device_errors += other.device_errors;
        self.mirror_failures += other.mirror_failures;
        self.aborts += other.aborts;
        self.freezes += other.freezes;
        self.peers_lost += other.peers_lost;
        self.writes_failed += other.writes_failed;
        self.degrades += other.degrades;
        self.degraded_writes += other.degraded_writes;
        self.local_cps += other.local_cps;
        self.resyncs_done += other.resyncs_done;
        self.full_syncs_done += other.full_syncs_done;
        self.resync_reference_blocks += other.resync_reference_blocks;
        self.resync_data_blocks += other.resync_data_blocks;
        self.resync_crashes += other.resync_crashes;
        self.lost_logs += other.lost_logs;
        self.promotions += other.promotions;
        self.refused_promotions += other.refused_promotions;
        self.failbacks += other.failbacks;
        self.failback_ring_marks += other.failback_ring_marks;
    }
}

/// A side's metadata device with a volatile write cache: a write reaches `image` at submit and
/// `durable` only through a flush submitted after it completed; completions come after a random
/// virtual delay, in random order. A crash keeps each sector of every write not yet flushed or
/// not (a torn page is the metadata's to detect), so an engine that acknowledges before its mark
/// or generation is durable is caught by a later reopen.
#[derive(Default)]
struct MetadataDevice {
    image: Vec<u8>,
    durable: Vec<u8>,
    /// Writes not yet durable, in submit order: (offset, bytes, completed).
    volatile: Vec<(usize, Vec<u8>, bool)>,
    /// Ops in flight: (id, due time, what it does).
    inflight: Vec<(DeviceOpId, u64, MetadataPending)>,
}

#[derive(Clone, Copy)]
enum MetadataPending {
    /// The write's bytes at this offset.
    Write(usize),
    /// Makes durable every write completed before it.
    Flush,
}

impl MetadataDevice {
    fn formatted(
        node_id: u64,
        proposed_generation: u64,
        extent_bytes: u64,
    ) -> (NodeMetadata, Self) {
        let metadata =
            NodeMetadata::format(VOLUME, node_id, proposed_generation, &SIZES, extent_bytes)
                .unwrap();
        let image = metadata.image();
        let device = MetadataDevice {
            durable: image.clone(),
            image,
            ..MetadataDevice::default()
        };
        (metadata, device)
    }

    fn submit(&mut self, op: DeviceOp<'_>, now_us: u64, rng: &mut Rng) {
        let due_us = now_us
            + if rng.below(10) == 0 {
                rng.below(400)
            } else {
                rng.below(40)
            };
        let pending = match op.request {
            DeviceRequest::Write { offset_bytes, data } => {
                let at = offset_bytes as usize;
                self.image[at..at + data.len()].copy_from_slice(data);
                self.volatile.push((at, data.to_vec(), false));
                MetadataPending::Write(at)
            }
            DeviceRequest::Flush => MetadataPending::Flush,
            _ => panic!("metadata ops are writes and flushes"),
        };
        self.inflight.push((op.id, due_us, pending));
    }

    /// The completions due by `now_us`, in random order.
    fn take(&mut self, now_us: u64, rng: &mut Rng) -> Vec<DeviceOpId> {
        let mut due = Vec::new();
        let mut index = 0;
        while index < self.inflight.len() {
            if self.inflight[index].1 <= now_us {
                due.push(self.inflight.swap_remove(index));
            } else {
                index += 1;
            }
        }
        for i in (1..due.len()).rev() {
            due.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for &(_, _, pending) in &due {
            match pending {
                MetadataPending::Write(at) => {
                    let write = self
                        .volatile
                        .iter_mut()
                        .find(|w| w.0 == at && !w.2)
                        .expect("a write in flight is volatile");
                    write.2 = true;
                }
                MetadataPending::Flush => {
                    // The metadata flushes only once its batch's writes completed: everything
                    // completed is durable now (writes submitted after the flush are not).
                    let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.volatile)
                        .into_iter()
                        .partition(|w| w.2);
                    for (at, data, _) in done {
                        self.durable[at..at + data.len()].copy_from_slice(&data);
                    }
                    self.volatile = rest;
                }
            }
        }
        due.into_iter().map(|(id, _, _)| id).collect()
    }

    /// Power loss: each sector of each write not yet durable lands or not; ops in flight are
    /// gone.
    fn crash(&mut self, rng: &mut Rng) {
        self.inflight.clear();
        for (at, data, _) in std::mem::take(&mut self.volatile) {
            for (i, sector) in data.chunks(SECTOR_SIZE).enumerate() {
                if rng.below(2) == 0 {
                    let from = at + i * SECTOR_SIZE;
                    self.durable[from..from + sector.len()].copy_from_slice(sector);
                }
            }
        }
        self.image.copy_from_slice(&self.durable);
    }

    /// What the node would find at a start now, had it crashed (what is durable for sure).
    fn reopen_durable(&self) -> NodeMetadata {
        NodeMetadata::open(&self.durable, VOLUME, &SIZES).unwrap().0
    }

    /// What the node finds at its next start after an orderly stop (every write landed).
    fn reopen(&self) -> NodeMetadata {
        NodeMetadata::open(&self.image, VOLUME, &SIZES).unwrap().0
    }
}

fn metadata_completion(id: DeviceOpId) -> DeviceCompletion<'static> {
    DeviceCompletion {
        id,
        result: Ok(&[]),
    }
}

struct Sim {
    seed: u64,
    rng: Rng,
    now_us: u64,
    source_metadata: MetadataDevice,
    destination_metadata: MetadataDevice,
    config: SourceConfig,
    destination_config: DestinationConfig,
    source: Option<SimSource>,
    destination: Option<SimDestination>,
    primaries: Vec<SimDevice>,
    mirrors: Vec<SimDevice>,
    link_up: bool,
    reconnect_at_us: u64,
    to_destination: Vec<u8>,
    to_source: Vec<u8>,
    model: Model,
    /// seq -> write number, for writes of the current source process not yet completed.
    pending: HashMap<u64, u64>,
    held: Vec<(WriteSlot, u64)>,
    /// Seqs of writes aborted by the current source process.
    aborted: Vec<u64>,
    /// Write numbers reserved by the current source process.
    process_writes: Vec<u64>,
    faults: bool,
    device_fault_rates: FaultRates,
    completions: u64,
    totals: Totals,
    /// When each receive buffer last got bytes (a stalled partial message means a corrupted
    /// length field: the runtime's receive timeout cuts the link).
    received_at_us: [u64; 2],
    /// Where each receive buffer holds a flipped byte. A flip outlives the fault phase: bytes
    /// corrupted before `drive_bounded` turns faults off may be delivered after.
    corrupted: [Vec<usize>; 2],
    /// Per direction (index: to destination), nothing is delivered until then: a frozen peer.
    frozen_until_us: [u64; 2],
    /// A freeze of both directions longer than the peer timeout: (its start, the connection it
    /// froze). That connection must be closed by a side's deadline.
    long_freeze: Option<(u64, u64)>,
    /// Connections made so far (the current one's number).
    connections: u64,
    /// The pair starts fresh without `assume_identical` over a primary holding data: the first
    /// handshake settles on the initial full sync.
    full_sync: bool,
    /// A write completed degraded, a CP completed on the primary alone, or a resync started,
    /// and no `ResyncDone` came since: the quiesced pair must end with one. (A source that
    /// degraded and crashed before anything of it was durable comes back in sync.)
    resync_owed: bool,
    /// The current source process is degraded (as of its last drained event).
    degraded: bool,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mode = if rng.below(4) == 0 {
            CpMode::Naive
        } else {
            CpMode::References
        };
        let depths = [1, 2, 4, 8, 32];
        // Virtual microseconds: a step is 1..=20 us, so a few hundred steps per timeout.
        let peer_timeout_us = 1000 + rng.below(4000);
        let peer_loss_policy = match rng.below(3) {
            0 => PeerLossPolicy::Fail,
            1 => PeerLossPolicy::Degrade,
            _ => PeerLossPolicy::Suspend,
        };
        // A fifth of the seeds form a fresh pair over a primary that holds data.
        let full_sync = rng.below(5) == 0;
        let extent_bytes = [4096, 16 << 10, BITMAP_EXTENT_BYTES_DEFAULT][rng.below(3) as usize];
        let config = SourceConfig {
            volume_id: VOLUME,
            cp_interval_us: 200 + rng.below(5000),
            mode,
            device_queue_depth: depths[rng.below(depths.len() as u64) as usize],
            peer_timeout_us,
            peer_loss_policy,
            generation_seed: 0x5eed,
            resync_rate_bytes_per_s: 0,
            assume_identical: !full_sync,
        };
        let destination_config = DestinationConfig {
            volume_id: VOLUME,
            device_queue_depth: depths[rng.below(depths.len() as u64) as usize],
            peer_timeout_us,
            assume_identical: !full_sync,
        };
        let (source_metadata, source_metadata_device) = MetadataDevice::formatted(
            1 + rng.below(1 << 62),
            1 + rng.below(u64::MAX - 1),
            extent_bytes,
        );
        let (destination_metadata, destination_metadata_device) = MetadataDevice::formatted(
            (1 << 62) + 1 + rng.below(1 << 62),
            1 + rng.below(u64::MAX - 1),
            extent_bytes,
        );
        let device_fault_rates = if rng.below(3) == 0 {
            FaultRates::NONE
        } else {
            let mut rate = || [0, 300, 2000][rng.below(3) as usize];
            FaultRates([rate(), rate(), rate()])
        };
        let (source, report) = Source::open(
            config,
            vec![0; RING_BYTES_MIN as usize],
            &SIZES,
            source_metadata,
            0,
        )
        .unwrap();
        assert!(report.formatted);
        let destination = Destination::open(
            destination_config,
            vec![0; RING_BYTES_MIN as usize],
            &SIZES,
            destination_metadata,
        )
        .unwrap();
        let mut sim = Self {
            seed,
            rng,
            now_us: 0,
            source_metadata: source_metadata_device,
            destination_metadata: destination_metadata_device,
            config,
            destination_config,
            source: Some(source),
            destination: Some(destination),
            primaries: (0..NAMESPACES)
                .map(|_| SimDevice::new("primary", false))
                .collect(),
            mirrors: (0..NAMESPACES)
                .map(|_| SimDevice::new("mirror", true))
                .collect(),
            link_up: false,
            reconnect_at_us: 0,
            to_destination: Vec::new(),
            to_source: Vec::new(),
            model: Model::new(),
            pending: HashMap::new(),
            held: Vec::new(),
            aborted: Vec::new(),
            process_writes: Vec::new(),
            faults: true,
            device_fault_rates,
            completions: 0,
            totals: Totals::default(),
            received_at_us: [0; 2],
            corrupted: [Vec::new(), Vec::new()],
            frozen_until_us: [0; 2],
            long_freeze: None,
            connections: 0,
            full_sync,
            resync_owed: full_sync,
            degraded: false,
        };
        if full_sync {
            sim.preexisting_data();
        }
        sim
    }

    /// Writes of before the pair, on the primaries only (durable): the initial sync copies them.
    fn preexisting_data(&mut self) {
        for _ in 0..1 + self.rng.below(12) {
            let nsid = 1 + self.rng.below(NAMESPACES as u64) as u32;
            let sectors = 1 + self.rng.below(128);
            let lba = self.rng.below(SECTORS as u64 - sectors);
            let number = self.model.preexisting(nsid, lba, sectors);
            let primary = &mut self.primaries[nsid as usize - 1];
            for sector in lba..lba + sectors {
                let range = sector_range(sector as usize);
                sector_pattern(number, sector, &mut primary.durable[range.clone()]);
                primary.current[range.clone()].copy_from_slice(&primary.durable[range.clone()]);
                primary.completed[range.clone()].copy_from_slice(&primary.durable[range]);
            }
        }
    }

    fn source(&mut self) -> &mut SimSource {
        self.source.as_mut().unwrap()
    }

    fn destination(&mut self) -> &mut SimDestination {
        self.destination.as_mut().unwrap()
    }

    fn cut_link(&mut self) {
        if self.link_up {
            let now = self.now_us;
            self.source().handle_disconnected(now);
            self.destination().handle_disconnected(now);
        }
        self.link_up = false;
        self.to_destination.clear();
        self.to_source.clear();
        self.corrupted = [Vec::new(), Vec::new()];
        self.frozen_until_us = [0; 2];
        self.long_freeze = None;
        self.reconnect_at_us = self.now_us + 10 + self.rng.below(500);
    }

    /// The link goes down for longer than the peer timeout: the source declares the destination
    /// lost (and, under `degrade`, goes on alone and completes CPs on the primary alone).
    fn outage(&mut self) {
        self.cut_link();
        let timeout_us = self.config.peer_timeout_us;
        self.reconnect_at_us = self.now_us + timeout_us + self.rng.below(2 * timeout_us);
    }

    /// A peer freezes: nothing is delivered one way or both for a while, the connection stays
    /// open. Longer than the peer timeout in half the cases (a loss must follow).
    fn freeze_link(&mut self) {
        if !self.link_up || self.is_frozen(true) || self.is_frozen(false) {
            return;
        }
        let timeout_us = self.config.peer_timeout_us;
        let duration_us = if self.rng.below(2) == 0 {
            self.rng.below(timeout_us / 2)
        } else {
            timeout_us + 100 + self.rng.below(2 * timeout_us)
        };
        let until_us = self.now_us + duration_us;
        match self.rng.below(3) {
            0 => self.frozen_until_us[1] = until_us,
            1 => self.frozen_until_us[0] = until_us,
            _ => {
                self.frozen_until_us = [until_us; 2];
                if duration_us > timeout_us {
                    self.long_freeze = Some((self.now_us, self.connections));
                }
            }
        }
        self.totals.freezes += 1;
    }

    fn is_frozen(&self, to_destination: bool) -> bool {
        self.now_us < self.frozen_until_us[usize::from(to_destination)]
    }

    /// A side's deadline expired: it closes the connection (the other sees it closed).
    fn close_if_asked(&mut self) {
        if !self.link_up {
            return;
        }
        let source = self.source().poll_link_close();
        let destination = self.destination().poll_link_close();
        if source.is_some() || destination.is_some() {
            if debug() {
                eprintln!(
                    "DEBUG t {}: closed by a deadline: source {source:?} destination {destination:?}",
                    self.now_us
                );
            }
            self.cut_link();
        }
    }

    fn issue_write(&mut self) {
        let nsid = 1 + self.rng.below(NAMESPACES as u64) as u32;
        let kind = self.rng.below(10);
        let (lba, sectors) = match kind {
            0..=4 => (
                self.rng.below(SECTORS as u64 / 8 - 4) * 8,
                8 * (1 + self.rng.below(4)),
            ),
            5..=7 => (self.rng.below(SECTORS as u64 - 40), 1 + self.rng.below(32)),
            _ => (
                self.rng.below(SECTORS as u64 - 64) & !7,
                8 * (1 + self.rng.below(4)) - self.rng.below(2) * 3,
            ),
        };
        let zeroes = kind >= 8;
        let now = self.now_us;
        let number_next = self.model.writes.len() as u64;
        let result = if zeroes {
            self.source()
                .write_zeroes(now, nsid, lba, sectors * SECTOR_SIZE as u64)
                .map(|id| (id, None))
        } else {
            let mut data = vec![0; (sectors as usize) * SECTOR_SIZE];
            for (i, sector) in data.chunks_exact_mut(SECTOR_SIZE).enumerate() {
                sector_pattern(number_next, lba + i as u64, sector);
            }
            let hold = self.rng.below(8) == 0;
            let source = self.source.as_mut().unwrap();
            match source.reserve_write(now, nsid, lba, data.len() as u32) {
                Ok(slot) => {
                    let id = slot.id();
                    if hold {
                        // Half now, half later: a crash before the commit leaves a torn entry.
                        let half = data.len() / 2;
                        source.fill_write(&slot, 0, &data[..half]);
                        source.fill_write(&slot, half, &data[half..]);
                        Ok((id, Some(slot)))
                    } else {
                        source.write_buffer(&slot).copy_from_slice(&data);
                        source.commit_write(now, slot);
                        Ok((id, None))
                    }
                }
                Err(refused) => Err(refused),
            }
        };
        match result {
            Ok((id, held)) => {
                let cp = self.source.as_ref().unwrap().active_cp();
                let number = self.model.add(nsid, lba, sectors, zeroes, id.0, cp);
                assert_eq!(number, number_next);
                assert!(
                    self.pending.insert(id.0, number).is_none(),
                    "seed {}: seq {} reused",
                    self.seed,
                    id.0
                );
                self.process_writes.push(number);
                if let Some(slot) = held {
                    self.held.push((slot, number));
                }
            }
            Err(WriteRefused::Backpressure) => {}
            Err(WriteRefused::PeerLost) => assert!(
                self.source.as_ref().unwrap().writes_fail(),
                "seed {}: refused as lost while the policy does not fail writes",
                self.seed
            ),
            Err(other) => panic!("seed {}: write refused: {other:?}", self.seed),
        }
    }

    /// Commits (or, now and then, aborts) one held write, or all.
    fn commit_held(&mut self, all: bool) {
        while !self.held.is_empty() {
            let index = self.rng.below(self.held.len() as u64) as usize;
            let (slot, number) = self.held.swap_remove(index);
            let now = self.now_us;
            if self.rng.below(4) == 0 {
                // The host connection died mid-data: scribble over the rest; the core must
                // write the primary's own content instead.
                let source = self.source.as_mut().unwrap();
                let buffer = source.write_buffer(&slot);
                let half = buffer.len() / 2;
                buffer[half..].fill(0xEE);
                let seq = slot.id().0;
                source.abort_write(now, slot);
                self.model.writes[number as usize].fate = Fate::Aborted;
                self.aborted.push(seq);
                self.totals.aborts += 1;
            } else {
                self.source().commit_write(now, slot);
            }
            if !all {
                return;
            }
        }
    }

    /// Submits every device op both sides emit and hands back every completion due now (in
    /// random order), until nothing more happens at this instant.
    fn run_devices(&mut self) {
        let now = self.now_us;
        let rates = if self.faults {
            self.device_fault_rates
        } else {
            FaultRates::NONE
        };
        loop {
            let mut work = 0;
            let source = self.source.as_mut().unwrap();
            while let Some(op) = source.poll_device_op(now) {
                self.primaries[op.nsid as usize - 1].submit(self.seed, op, now, &mut self.rng);
                work += 1;
            }
            while let Some(op) = source.poll_metadata_op() {
                self.source_metadata.submit(op, now, &mut self.rng);
                work += 1;
            }
            let metadata_done = self.source_metadata.take(now, &mut self.rng);
            for &id in &metadata_done {
                source.handle_metadata_completion(metadata_completion(id));
                work += 1;
            }
            if !metadata_done.is_empty() {
                // A durable mark completes degraded writes now, while the source is degraded:
                // the ack rule must see them before a handshake ends the degrade.
                self.drain_source_events();
            }
            let destination = self.destination.as_mut().unwrap();
            while let Some(op) = destination.poll_device_op(now) {
                self.mirrors[op.nsid as usize - 1].submit(self.seed, op, now, &mut self.rng);
                work += 1;
            }
            while let Some(op) = destination.poll_metadata_op() {
                self.destination_metadata.submit(op, now, &mut self.rng);
                work += 1;
            }
            for id in self.destination_metadata.take(now, &mut self.rng) {
                destination.handle_metadata_completion(metadata_completion(id));
                work += 1;
            }
            for index in 0..NAMESPACES {
                let done = self.primaries[index].take_due(now, &mut self.rng, rates);
                for (id, result) in &done {
                    self.source
                        .as_mut()
                        .unwrap()
                        .handle_device_completion(now, completion(*id, result));
                    work += 1;
                }
                if !done.is_empty() {
                    self.drain_source_events();
                }
                for (id, result) in self.mirrors[index].take_due(now, &mut self.rng, rates) {
                    self.destination
                        .as_mut()
                        .unwrap()
                        .handle_device_completion(now, completion(id, &result));
                    self.drain_destination_events();
                    work += 1;
                }
            }
            if work == 0 {
                return;
            }
        }
    }

    /// Moves up to a random number of queued bytes from one side's send queue to the other's
    /// receive buffer, maybe corrupting one.
    fn pump(&mut self, to_destination: bool) {
        let mut bytes = Vec::new();
        {
            let mut slices = Vec::new();
            let described = if to_destination {
                self.source.as_ref().unwrap().tx_iovecs(&mut slices, 64)
            } else {
                self.destination
                    .as_ref()
                    .unwrap()
                    .tx_iovecs(&mut slices, 64)
            };
            if described == 0 {
                return;
            }
            let take = if self.rng.below(2) == 0 {
                described
            } else {
                1 + self.rng.below(described as u64) as usize
            };
            for slice in slices {
                let room = take - bytes.len();
                bytes.extend_from_slice(&slice[..slice.len().min(room)]);
                if bytes.len() == take {
                    break;
                }
            }
        }
        if self.faults && self.rng.chance(3000) {
            let at = self.rng.below(bytes.len() as u64) as usize;
            bytes[at] ^= 1 << self.rng.below(8);
            let buffered = if to_destination {
                self.to_destination.len()
            } else {
                self.to_source.len()
            };
            self.corrupted[usize::from(to_destination)].push(buffered + at);
        }
        self.received_at_us[usize::from(to_destination)] = self.now_us;
        if to_destination {
            self.source().tx_advance(bytes.len());
            self.to_destination.extend_from_slice(&bytes);
        } else {
            self.destination().tx_advance(bytes.len());
            self.to_source.extend_from_slice(&bytes);
        }
    }

    /// Hands every whole message in a receive buffer to its side; an error cuts the link, and
    /// is only allowed for a message that carries a flipped byte.
    fn deliver(&mut self, to_destination: bool) {
        let side = usize::from(to_destination);
        loop {
            let buffer = if to_destination {
                &self.to_destination
            } else {
                &self.to_source
            };
            let length = match frame_length(buffer) {
                Ok(Some(length)) if buffer.len() >= length => length,
                Ok(_) => return,
                Err(error) => {
                    assert!(
                        self.corrupted[side]
                            .iter()
                            .any(|&at| at < MESSAGE_HEADER_BYTES),
                        "seed {}: bad frame header without a flipped byte: {error}",
                        self.seed
                    );
                    return self.cut_link();
                }
            };
            let buffer = if to_destination {
                &mut self.to_destination
            } else {
                &mut self.to_source
            };
            let message = buffer[..length].to_vec();
            buffer.drain(..length);
            let corrupted = &mut self.corrupted[side];
            let flipped = corrupted.iter().any(|&at| at < length);
            corrupted.retain(|&at| at >= length);
            corrupted.iter_mut().for_each(|at| *at -= length);
            let now = self.now_us;
            let result = if to_destination {
                self.destination().handle_message(now, &message)
            } else {
                self.source().handle_message(now, &message)
            };
            if to_destination {
                self.drain_destination_events();
            }
            if let Err(error) = result {
                assert!(
                    flipped,
                    "seed {}: link error on a message without a flipped byte: {error}",
                    self.seed
                );
                self.totals.link_errors += 1;
                return self.cut_link();
            }
            if !to_destination {
                self.drain_source_events();
            }
        }
    }

    /// The point in time (invariant 7): the mirror as the destination applied CP `cp_number`.
    fn check_point_in_time(&mut self, cp_number: u64, what: &str) {
        for nsid in 1..=NAMESPACES as u32 {
            self.model.check_image(
                nsid,
                self.mirrors[nsid as usize - 1].contents(),
                &format!("seed {}: {what} {cp_number}: mirror", self.seed),
            );
        }
        self.model.cps_checked += 1;
    }

    /// The destination's mirror is a resync target's: mixed points in time by design, so the
    /// point-in-time check does not apply to it.
    fn destination_is_resync_target(&self) -> bool {
        let flags = self
            .destination
            .as_ref()
            .unwrap()
            .metadata()
            .generations()
            .flags;
        flags & FLAG_RESYNC_TARGET != 0
    }

    fn drain_destination_events(&mut self) {
        while let Some(event) = self.destination().poll_event() {
            match event {
                DestinationEvent::CpApplied { cp_number } => {
                    if debug() {
                        eprintln!(
                            "DEBUG t {}: destination applied cp {cp_number}",
                            self.now_us
                        );
                    }
                    // A destination that lost its log forgot which CPs it applied: the source
                    // sends the last one again, the same blocks.
                    let again = cp_number == self.model.image_cp && self.totals.lost_logs > 0;
                    if !again {
                        self.model.advance_image(self.seed, cp_number);
                    }
                    if !self.destination_is_resync_target() {
                        self.check_point_in_time(cp_number, "CpApplied");
                    }
                }
                DestinationEvent::PeerRejected(text) => {
                    panic!(
                        "seed {}: destination rejected the source: {text}",
                        self.seed
                    )
                }
                DestinationEvent::DeviceFault(_) => {}
                DestinationEvent::PeerLost(_) => self.totals.peers_lost += 1,
            }
        }
    }

    /// The ack rule for write `number`, completed now: the destination logged it, or the source
    /// is degraded and every extent of the write is marked in the durable image of its metadata.
    fn check_ack(&self, seq: u64, number: u64, durable: &mut Option<NodeMetadata>) -> bool {
        let source = self.source.as_ref().unwrap();
        if !source.is_degraded() {
            let logged = self.destination.as_ref().unwrap().logged_seq_max();
            assert!(
                logged.is_some_and(|logged| logged >= seq),
                "seed {}: write {seq} completed, destination logged {logged:?}, not degraded",
                self.seed
            );
            return false;
        }
        assert_eq!(self.config.peer_loss_policy, PeerLossPolicy::Degrade);
        let metadata = durable.get_or_insert_with(|| self.source_metadata.reopen_durable());
        let record = &self.model.writes[number as usize];
        for lba in record.lba..record.lba + record.sectors {
            assert!(
                metadata.is_marked(record.nsid, lba * SECTOR_SIZE as u64),
                "seed {}: degraded write {seq} (ns {} lba {lba}) completed before its mark was \
                 durable",
                self.seed,
                record.nsid
            );
        }
        true
    }

    fn drain_source_events(&mut self) {
        let mut durable = None;
        while let Some(event) = self.source().poll_event() {
            match event {
                SourceEvent::WriteCompleted(id) => {
                    let number = self.pending.remove(&id.0).unwrap_or_else(|| {
                        panic!("seed {}: unknown completion {}", self.seed, id.0)
                    });
                    let degraded = self.check_ack(id.0, number, &mut durable);
                    let record = &mut self.model.writes[number as usize];
                    assert!(!record.completed);
                    record.completed = true;
                    record.degraded = degraded;
                    self.totals.degraded_writes += u64::from(degraded);
                    self.resync_owed |= degraded;
                    self.completions += 1;
                }
                SourceEvent::LinkRejected(text) => panic!("seed {}: rejected: {text}", self.seed),
                SourceEvent::ResyncDone { .. } => self.on_resync_done(),
                SourceEvent::CpCompleted { cp_number, .. } => {
                    if debug() {
                        eprintln!("DEBUG t {}: source completed cp {cp_number}", self.now_us);
                    }
                    self.totals.cps_completed += 1;
                    if self.model.image_cp < cp_number {
                        // Completed on the primary alone: only a degraded source does that.
                        assert!(
                            self.source.as_ref().unwrap().is_degraded(),
                            "seed {}: source completed CP {cp_number}, destination applied {}",
                            self.seed,
                            self.model.image_cp
                        );
                        self.model.advance_image(self.seed, cp_number);
                        self.totals.local_cps += 1;
                        self.resync_owed = true;
                    } else if self.model.image_cp == cp_number
                        && !self.destination_is_resync_target()
                    {
                        self.check_point_in_time(cp_number, "CpCompleted");
                    }
                }
                SourceEvent::MirrorFailed { .. } => self.totals.mirror_failures += 1,
                SourceEvent::WriteFailed(id) => {
                    assert_eq!(
                        self.config.peer_loss_policy,
                        PeerLossPolicy::Fail,
                        "seed {}: write {} failed under the suspend policy",
                        self.seed,
                        id.0
                    );
                    let number = self
                        .pending
                        .remove(&id.0)
                        .unwrap_or_else(|| panic!("seed {}: unknown failure {}", self.seed, id.0));
                    // Failed, never acknowledged: the host may find either content there.
                    assert!(!self.model.writes[number as usize].completed);
                    self.totals.writes_failed += 1;
                }
                SourceEvent::PeerLost(_) => self.totals.peers_lost += 1,
                SourceEvent::LinkReady => {
                    // A source that crashed after its ResyncDone (before the ack) comes back
                    // to a destination holding its generation: in sync, the resync over.
                    let source = self.source.as_ref().unwrap();
                    let destination = self.destination.as_ref().unwrap();
                    let same = source.metadata().generations().current
                        == destination.metadata().generations().current;
                    if self.resync_owed
                        && same
                        && source.resync_progress().is_none()
                        && !self.destination_is_resync_target()
                    {
                        self.on_resync_done();
                    }
                }
                SourceEvent::DeviceFault(_) => {}
            }
        }
        let source = self.source.as_ref().unwrap();
        let degraded = source.is_degraded();
        if degraded && !self.degraded {
            self.totals.degrades += 1;
        }
        self.degraded = degraded;
        self.resync_owed |= source.resync_progress().is_some();
        self.drain_destination_events();
    }

    /// The resync finished: the destination holds the source's generation and is no resync
    /// target; the bitmap counts nothing; every degraded write is on the destination now.
    fn on_resync_done(&mut self) {
        let source = self.source.as_ref().unwrap();
        let destination = self.destination.as_ref().unwrap();
        let ours = source.metadata().generations();
        let theirs = destination.metadata().generations();
        assert_eq!(
            ours.current, theirs.current,
            "seed {}: resync done, generations differ",
            self.seed
        );
        assert_eq!(theirs.flags & FLAG_RESYNC_TARGET, 0, "seed {}", self.seed);
        assert_eq!(
            source.metadata().marked_count(),
            0,
            "seed {}: resync done with marked extents",
            self.seed
        );
        assert!(!source.is_degraded());
        for write in &mut self.model.writes {
            write.degraded = false;
        }
        self.resync_owed = false;
        self.totals.resyncs_done += 1;
        if self.full_sync && self.totals.full_syncs_done == 0 {
            self.totals.full_syncs_done = 1;
        }
    }

    /// The source process dies with its primaries' power: unflushed sectors and writes in
    /// flight survive or not; the ring (NVRAM) keeps its committed prefix.
    /// Adds the current source process's resync counters to the totals (a crash loses them).
    fn harvest_source_counters(&mut self) {
        let counters = self.source.as_ref().unwrap().counters();
        self.totals.resync_reference_blocks += counters.resync_reference_blocks;
        self.totals.resync_data_blocks += counters.resync_data_blocks;
        self.totals.references += counters.cp_reference_count;
    }

    /// A resync runs or is owed (crashes then hit its steps).
    fn resyncing(&self) -> bool {
        self.source.as_ref().unwrap().resync_progress().is_some()
            || self.destination_is_resync_target()
    }

    fn crash_source(&mut self) {
        if self.resyncing() {
            self.totals.resync_crashes += 1;
        }
        self.cut_link();
        self.harvest_source_counters();
        let ring = self.source.take().unwrap().into_memory();
        let held_low = self.held.iter().map(|(slot, _)| slot.id().0).min();
        // An aborted reservation not yet completed may or may not have been committed yet.
        let maybe_low = self
            .aborted
            .iter()
            .copied()
            .filter(|seq| self.pending.contains_key(seq))
            .chain(held_low)
            .min();
        self.held.clear();
        self.pending.clear();
        self.aborted.clear();
        for primary in &mut self.primaries {
            primary.crash(&mut self.rng);
        }
        self.source_metadata.crash(&mut self.rng);
        let metadata = self.source_metadata.reopen();
        let (source, _) = Source::open(self.config, ring, &SIZES, metadata, self.now_us).unwrap();
        self.degraded = false;
        // The recovered log ends at the seq before the first entry never committed.
        let end = source.read_gate(1, 0, SECTOR_SIZE as u64).unwrap();
        self.source = Some(source);
        if let Some(&last) = self.process_writes.last() {
            let max_seq = self.model.writes[last as usize].seq;
            let upper = held_low.map_or(max_seq, |seq| seq - 1);
            let lower = maybe_low.map_or(max_seq, |seq| seq - 1);
            assert!(
                lower <= end && end <= upper,
                "seed {}: recovered log ends at seq {end}, expected {lower}..={upper}",
                self.seed
            );
        }
        for &number in &self.process_writes {
            let record = &mut self.model.writes[number as usize];
            if record.seq > end {
                assert!(
                    !record.completed,
                    "seed {}: a completed write lost",
                    self.seed
                );
                record.fate = Fate::Dropped;
            }
        }
        self.process_writes.clear();
        self.totals.crashes += 1;
        if debug() {
            eprintln!(
                "DEBUG t {}: source crashed; reopened at cp {}",
                self.now_us,
                self.source.as_ref().unwrap().cp_completed()
            );
        }
    }

    /// The destination process dies with its mirrors' power. During a resync (or once the
    /// source moved on, so the next handshake settles on one) it may come back without its log
    /// (a fresh ring: a reboot of a volatile medium): references into it then fail over to data.
    fn crash_destination(&mut self) {
        if self.resyncing() {
            self.totals.resync_crashes += 1;
        }
        self.cut_link();
        if debug() {
            eprintln!("DEBUG t {}: destination crashes", self.now_us);
        }
        let mut ring = self.destination.take().unwrap().into_memory();
        for mirror in &mut self.mirrors {
            mirror.crash(&mut self.rng);
        }
        self.destination_metadata.crash(&mut self.rng);
        let metadata = self.destination_metadata.reopen();
        let source_generation = self.source_metadata.reopen_durable().generations().current;
        let resync_settles = metadata.generations().flags & FLAG_RESYNC_TARGET != 0
            || source_generation != metadata.generations().current;
        if resync_settles && self.rng.below(2) == 0 {
            ring = vec![0; RING_BYTES_MIN as usize];
            self.totals.lost_logs += 1;
            if debug() {
                eprintln!(
                    "DEBUG t {}: destination restarts without its log",
                    self.now_us
                );
            }
        }
        self.destination =
            Some(Destination::open(self.destination_config, ring, &SIZES, metadata).unwrap());
        self.totals.crashes += 1;
    }

    fn step(&mut self, writes: bool) {
        self.now_us += 1 + self.rng.below(STEP_US_MAX);
        let now = self.now_us;
        NOW_US.store(now, std::sync::atomic::Ordering::Relaxed);
        if !self.link_up && now >= self.reconnect_at_us {
            self.link_up = true;
            self.connections += 1;
            self.destination().handle_connected(now);
            self.source().handle_connected(now);
        }
        if writes {
            for _ in 0..self.rng.below(3) {
                if self.pending.len() < QUEUE_DEPTH {
                    self.issue_write();
                }
            }
            if self.rng.below(3) == 0 {
                self.commit_held(false);
            }
            if self.rng.chance(5000) {
                self.source().request_cp(now);
            }
        } else {
            self.commit_held(true);
            self.source().request_cp(now);
        }
        // Events are drained after every tick and message, so the ack rule sees the source's
        // degrade state as it was when the write completed.
        self.source().handle_tick(now);
        self.drain_source_events();
        self.destination().handle_tick(now);
        self.close_if_asked();
        self.run_devices();
        if self.link_up && !self.is_frozen(true) {
            self.pump(true);
            self.deliver(true);
        }
        if self.link_up && !self.is_frozen(false) {
            self.pump(false);
            self.deliver(false);
        }
        self.source().handle_tick(now);
        self.drain_source_events();
        self.close_if_asked();
        self.run_devices();
        self.drain_source_events();
        if let Some((since_us, connection)) = self.long_freeze {
            // Both directions frozen: both sides hear nothing, so within a peer timeout (and the
            // step that notices it) one of them must have closed that connection.
            let bound_us = since_us + self.config.peer_timeout_us + 2 * STEP_US_MAX;
            assert!(
                !(self.link_up && self.connections == connection && self.now_us > bound_us),
                "seed {}: a link frozen since {since_us} us is still up at {} us (peer timeout {} us)",
                self.seed,
                self.now_us,
                self.config.peer_timeout_us
            );
        }
        let stalled = [&self.to_source, &self.to_destination]
            .iter()
            .zip(self.received_at_us)
            .any(|(buffer, at)| !buffer.is_empty() && self.now_us - at > RECEIVE_TIMEOUT_US);
        if stalled {
            self.cut_link();
        }
        if self.faults {
            self.inject_faults();
        }
    }

    fn inject_faults(&mut self) {
        if self.rng.chance(1500) {
            self.cut_link();
        }
        if self.rng.chance(300) {
            self.outage();
        }
        // A resync is short: crashes come often while one runs, so every step of it is hit.
        let crash_rate = if self.resyncing() { 2500 } else { 700 };
        if self.rng.chance(crash_rate) {
            self.crash_source();
        }
        if self.rng.chance(crash_rate) {
            self.crash_destination();
        }
        if self.rng.chance(400) {
            self.freeze_link();
        }
    }

    /// Drives the pair to quiescence: every write completed and CP'd on both sides, or panics.
    fn drive_bounded(&mut self) {
        self.faults = false;
        for _ in 0..QUIESCE_STEPS_MAX {
            self.step(false);
            let idle = self.source.as_ref().unwrap().is_idle()
                && self.destination.as_ref().unwrap().tx_pending_bytes() == 0
                && self.destination.as_ref().unwrap().device_ops_idle();
            if idle && self.pending.is_empty() && self.link_up && self.in_sync() {
                return;
            }
        }
        panic!(
            "seed {}: no quiescence after {QUIESCE_STEPS_MAX} steps ({} pending)",
            self.seed,
            self.pending.len()
        );
    }

    /// Connected, not degraded, no resync running, one generation on both sides.
    fn in_sync(&self) -> bool {
        let source = self.source.as_ref().unwrap();
        let destination = self.destination.as_ref().unwrap();
        matches!(source.peer_state(), PeerState::Connected { .. })
            && !source.is_degraded()
            && source.resync_progress().is_none()
            && !self.destination_is_resync_target()
            && source.metadata().generations().current
                == destination.metadata().generations().current
    }

    /// After quiescing: whatever degraded or resynced ended with `ResyncDone`, the bitmap
    /// counts nothing (durably), and the destination holds the source's generation.
    fn check_resync_done(&self) {
        assert!(
            !self.resync_owed,
            "seed {}: the source degraded or resynced, and no ResyncDone came",
            self.seed
        );
        let source = self.source.as_ref().unwrap();
        assert_eq!(source.metadata().marked_count(), 0, "seed {}", self.seed);
        assert_eq!(
            source.metadata().generations().bitmap_base,
            0,
            "seed {}",
            self.seed
        );
        assert_eq!(
            self.source_metadata.reopen_durable().marked_count(),
            0,
            "seed {}: the cleared bitmap is durable",
            self.seed
        );
    }

    fn check_mirror(&self) {
        let cp_completed = self.source.as_ref().unwrap().cp_completed();
        assert_eq!(
            cp_completed,
            self.destination.as_ref().unwrap().cp_completed()
        );
        assert_eq!(cp_completed, self.model.image_cp, "seed {}", self.seed);
        for nsid in 1..=NAMESPACES as u32 {
            let primary = self.primaries[nsid as usize - 1].contents();
            let mirror = self.mirrors[nsid as usize - 1].contents();
            let differs = primary
                .chunks(SECTOR_SIZE)
                .zip(mirror.chunks(SECTOR_SIZE))
                .position(|(a, b)| a != b);
            if let Some(sector) = differs {
                let range = sector_range(sector);
                panic!(
                    "seed {}: ns {nsid} mirror differs from primary at sector {sector}: mirror \
                     {:?}, primary {:?} (history {:?})",
                    self.seed,
                    identify(&mirror[range.clone()], sector as u64),
                    identify(&primary[range], sector as u64),
                    self.model.describe(nsid, sector)
                );
            }
            self.model
                .check(nsid, primary, &format!("seed {} primary", self.seed));
            self.model.check_image(
                nsid,
                primary,
                &format!("seed {}: quiesced primary", self.seed),
            );
        }
    }

    /// Source crash, then failover: the promoted mirror holds every completed write (the
    /// promotion's replay and flush go through the asynchronous mirrors), and the old source
    /// is refused as stale. Under `degrade`, half the seeds fail over during or after an outage:
    /// a destination still lost holds every write but the degraded ones (only the source has
    /// those, by design), a resync target refuses promotion, a resynced one holds them all; the
    /// old source that moved on is refused as a split brain; a stale one, half the time, fails
    /// back (`failback`). Returns the seed's totals.
    fn promote_check(mut self) -> Totals {
        self.faults = false;
        if self.config.peer_loss_policy == PeerLossPolicy::Degrade && self.rng.below(2) == 0 {
            self.outage();
            let until_us = self.now_us + self.rng.below(self.reconnect_at_us - self.now_us + 2000);
            while self.now_us < until_us {
                self.step(true);
            }
        } else {
            for _ in 0..300 {
                self.step(true);
            }
        }
        self.cut_link();
        self.harvest_source_counters();
        let source_ring = self.source.take().unwrap().into_memory();
        self.source_metadata.crash(&mut self.rng);
        let mut destination = self.destination.take().unwrap();
        if self.rng.below(2) == 0 {
            let ring = destination.into_memory();
            for mirror in &mut self.mirrors {
                mirror.crash(&mut self.rng);
            }
            self.destination_metadata.crash(&mut self.rng);
            let metadata = self.destination_metadata.reopen();
            destination =
                Destination::open(self.destination_config, ring, &SIZES, metadata).unwrap();
        } else {
            // A promotion waits for the mirror ops in flight.
            for _ in 0..10_000 {
                if destination.device_ops_idle() {
                    break;
                }
                self.now_us += 10;
                let now = self.now_us;
                while let Some(op) = destination.poll_device_op(now) {
                    self.mirrors[op.nsid as usize - 1].submit(self.seed, op, now, &mut self.rng);
                }
                for mirror in &mut self.mirrors {
                    for (id, result) in mirror.take_due(now, &mut self.rng, FaultRates::NONE) {
                        destination.handle_device_completion(now, completion(id, &result));
                    }
                }
            }
            assert!(destination.device_ops_idle(), "seed {}", self.seed);
        }
        self.totals.cps_checked = self.model.cps_checked;
        self.totals.device_errors = self
            .primaries
            .iter()
            .chain(&self.mirrors)
            .map(|device| device.errors)
            .sum();
        let generation = 1 + self.rng.below(u64::MAX - 1);
        let resync_target = destination.metadata().generations().flags & FLAG_RESYNC_TARGET != 0;
        let mut promotion = match destination.promote(generation) {
            Err(EngineError::ResyncTarget { .. }) => {
                // A half-resynced mirror mixes two points in time: it is never promoted.
                assert!(resync_target, "seed {}: refused, not a target", self.seed);
                self.totals.refused_promotions += 1;
                return self.totals;
            }
            Err(error) => panic!("seed {}: promotion failed: {error}", self.seed),
            Ok(promotion) => {
                assert!(
                    !resync_target,
                    "seed {}: a resync target promoted",
                    self.seed
                );
                promotion
            }
        };
        for _ in 0..100_000 {
            if promotion.is_done() {
                break;
            }
            self.now_us += 1 + self.rng.below(50);
            let now = self.now_us;
            while let Some(op) = promotion.poll_device_op() {
                self.mirrors[op.nsid as usize - 1].submit(self.seed, op, now, &mut self.rng);
            }
            for mirror in &mut self.mirrors {
                for (id, result) in mirror.take_due(now, &mut self.rng, FaultRates::NONE) {
                    promotion.handle_device_completion(completion(id, &result));
                }
            }
            while let Some(op) = promotion.poll_metadata_op() {
                self.destination_metadata.submit(op, now, &mut self.rng);
            }
            for id in self.destination_metadata.take(now, &mut self.rng) {
                promotion.handle_metadata_completion(metadata_completion(id));
            }
        }
        assert!(promotion.is_done(), "seed {}: promotion stuck", self.seed);
        let (report, promoted_ring, _) = promotion.finish().unwrap();
        assert_eq!(report.generation, generation);
        self.totals.promotions += 1;
        // Per block: the last acknowledged write or a later one, never older (writes only the
        // degraded source acknowledged excepted: the destination never saw them).
        for nsid in 1..=NAMESPACES as u32 {
            self.model.check_counting(
                nsid,
                self.mirrors[nsid as usize - 1].contents(),
                &format!("seed {} promoted mirror", self.seed),
                false,
            );
        }
        // The old source comes back: the promoted side refuses it as stale, or, when it took a
        // generation of its own while degraded, as a split brain.
        let mut promoted = Destination::open(
            self.destination_config,
            promoted_ring,
            &SIZES,
            self.destination_metadata.reopen_durable(),
        )
        .unwrap();
        assert_eq!(promoted.metadata().generations().current, generation);
        let old_ring = source_ring.clone();
        let (mut old, _) = Source::open(
            self.config,
            source_ring,
            &SIZES,
            self.source_metadata.reopen(),
            self.now_us,
        )
        .unwrap();
        let common = promoted.metadata().generations().history[0];
        let moved_on = old.metadata().generations().current != common;
        if moved_on {
            assert_eq!(self.config.peer_loss_policy, PeerLossPolicy::Degrade);
            let own = old.metadata().generations().current;
            self.expect_refusal(&mut promoted, &mut old, "split brain", &[own, generation]);
            return self.totals;
        }
        self.expect_refusal(&mut promoted, &mut old, "stale source", &[generation]);
        if self.rng.below(2) == 0 {
            // Refused, the old source stops; the operator attaches it to the promoted side.
            drop((old, promoted));
            return self.failback(old_ring);
        }
        // The old source takes a generation of its own too (as the degrade policy would before an
        // unreplicated write): both moved on since the common generation, a split brain, refused
        // by the promoted side on a new link.
        let own = loop {
            let candidate = 1 + self.rng.below(u64::MAX - 1);
            if candidate != generation && candidate != common {
                break candidate;
            }
        };
        let seq = old.new_generation(own);
        while old.metadata().durable_through() < seq {
            self.now_us += 10;
            while let Some(op) = old.poll_metadata_op() {
                self.source_metadata.submit(op, self.now_us, &mut self.rng);
            }
            for id in self.source_metadata.take(self.now_us, &mut self.rng) {
                old.handle_metadata_completion(metadata_completion(id));
            }
        }
        assert_eq!(
            self.source_metadata.reopen_durable().generations().current,
            own
        );
        promoted.handle_disconnected(self.now_us);
        old.handle_disconnected(self.now_us);
        self.expect_refusal(&mut promoted, &mut old, "split brain", &[own, generation]);
        self.totals
    }

    /// Failback: the promoted node (its former mirrors now its primaries, its metadata carrying
    /// the promoted generation) runs as a source on a fresh ring; the old source's node (power
    /// lost with its process: its primaries crash) starts as its destination over its former
    /// primaries, on its own metadata with the extents of its old ring's entries (newer than its
    /// last completed CP) marked and durable, on a fresh ring. The new pair runs the harness
    /// (writes, faults, crashes of either side) and is quiesced: the resync ended with
    /// `ResyncDone`, one generation, no marks on either side, mirror == primary, and every write
    /// either pair acknowledged is there (or a later one).
    fn failback(mut self, old_ring: Vec<u8>) -> Totals {
        for primary in &mut self.primaries {
            primary.crash(&mut self.rng);
        }
        let (_, entries) = NvramRing::open(old_ring).unwrap();
        let mut metadata = self.source_metadata.reopen();
        for entry in &entries {
            let _ = metadata.mark(entry.nsid, entry.lba, u64::from(entry.length_bytes).max(1));
        }
        while !metadata.is_durable() {
            self.now_us += 10;
            while let Some(op) = metadata.poll_device_op() {
                self.source_metadata.submit(op, self.now_us, &mut self.rng);
            }
            for id in self.source_metadata.take(self.now_us, &mut self.rng) {
                metadata.handle_device_completion(metadata_completion(id));
            }
        }
        let durable = self.source_metadata.reopen_durable();
        for entry in &entries {
            assert!(
                durable.is_marked(entry.nsid, entry.lba * SECTOR_SIZE as u64),
                "seed {}: the old ring's marks are durable",
                self.seed
            );
        }
        self.totals.failback_ring_marks += metadata.marked_count();
        // The roles swap: the old source's node is the destination now.
        std::mem::swap(&mut self.primaries, &mut self.mirrors);
        std::mem::swap(&mut self.source_metadata, &mut self.destination_metadata);
        for (device, (name, overlap)) in self
            .primaries
            .iter_mut()
            .map(|d| (d, ("primary", false)))
            .chain(self.mirrors.iter_mut().map(|d| (d, ("mirror", true))))
        {
            assert!(device.inflight.is_empty(), "seed {}", self.seed);
            device.name = name;
            device.overlap_same_bytes_ok = overlap;
        }
        let generation = self.source_metadata.reopen().generations().current;
        let (source, report) = Source::open(
            self.config,
            vec![0; RING_BYTES_MIN as usize],
            &SIZES,
            self.source_metadata.reopen(),
            self.now_us,
        )
        .unwrap();
        assert!(report.formatted);
        let destination = Destination::open(
            self.destination_config,
            vec![0; RING_BYTES_MIN as usize],
            &SIZES,
            metadata,
        )
        .unwrap();
        self.source = Some(source);
        self.destination = Some(destination);
        self.held.clear();
        self.pending.clear();
        self.aborted.clear();
        self.process_writes.clear();
        self.degraded = false;
        self.full_sync = false;
        self.resync_owed = true;
        // The model goes on from the promoted image (every earlier write is in its history);
        // CPs count from the new source's fresh ring.
        for write in &mut self.model.writes {
            if write.degraded {
                // Only the old source had it, and the failback resyncs over it.
                write.completed = false;
                write.degraded = false;
            }
        }
        self.model.by_cp.clear();
        self.model.image_cp = self.source.as_ref().unwrap().cp_completed();
        for (image, primary) in self.model.image.iter_mut().zip(&self.primaries) {
            image.copy_from_slice(primary.contents());
        }
        // The new source runs alone a while before the old node is attached.
        self.reconnect_at_us = self.now_us + self.rng.below(2 * self.config.peer_timeout_us) + 10;
        self.faults = true;
        let resyncs_before = self.totals.resyncs_done;
        for _ in 0..STEPS_FAILBACK {
            self.step(true);
        }
        self.drive_bounded();
        self.check_mirror();
        self.check_resync_done();
        assert!(
            self.totals.resyncs_done > resyncs_before,
            "seed {}: failback without a resync",
            self.seed
        );
        let source = self.source.as_ref().unwrap();
        let destination = self.destination.as_ref().unwrap();
        let current = source.metadata().generations().current;
        assert_eq!(current, destination.metadata().generations().current);
        assert!(
            current == generation || self.config.peer_loss_policy == PeerLossPolicy::Degrade,
            "seed {}: only a degraded source takes a generation",
            self.seed
        );
        assert_eq!(
            destination.metadata().marked_count(),
            0,
            "seed {}",
            self.seed
        );
        assert_eq!(
            self.destination_metadata.reopen_durable().marked_count(),
            0,
            "seed {}: the failback's destination bitmap is cleared durably",
            self.seed
        );
        for nsid in 1..=NAMESPACES as u32 {
            self.model.check(
                nsid,
                self.mirrors[nsid as usize - 1].contents(),
                &format!("seed {} failback mirror", self.seed),
            );
        }
        self.harvest_source_counters();
        self.totals.cps_checked = self.model.cps_checked;
        self.totals.device_errors = self
            .primaries
            .iter()
            .chain(&self.mirrors)
            .map(|device| device.errors)
            .sum();
        self.totals.failbacks += 1;
        self.totals
    }

    /// On a new link, the promoted side refuses the old source's Hello naming `what` and the
    /// generations.
    fn expect_refusal(
        &self,
        promoted: &mut SimDestination,
        old: &mut SimSource,
        what: &str,
        generations: &[u64],
    ) {
        promoted.handle_connected(self.now_us);
        old.handle_connected(self.now_us);
        let mut slices = Vec::new();
        old.tx_iovecs(&mut slices, usize::MAX);
        let hello: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
        let length = frame_length(&hello).unwrap().unwrap();
        assert!(
            promoted
                .handle_message(self.now_us, &hello[..length])
                .is_err(),
            "seed {}: the promoted side accepted the old source",
            self.seed
        );
        let event = promoted.poll_event();
        let named = |text: &str| {
            text.contains(what)
                && generations
                    .iter()
                    .all(|g| text.contains(&format!("{g:016x}")))
        };
        assert!(
            matches!(&event, Some(DestinationEvent::PeerRejected(text)) if named(text)),
            "seed {}: the old source is refused as {what}: {event:?}",
            self.seed
        );
    }
}

/// Runs one seed; returns what it did.
fn run_seed(seed: u64) -> Totals {
    let started = std::time::Instant::now();
    let mut sim = Sim::new(seed);
    let kind = format!("{:?}/{}", sim.config.peer_loss_policy, sim.full_sync);
    let steps = if sim.full_sync || sim.config.peer_loss_policy == PeerLossPolicy::Degrade {
        STEPS_RESYNC
    } else {
        STEPS
    };
    for _ in 0..steps {
        sim.step(true);
    }
    let before = sim.totals.cps_completed;
    sim.drive_bounded();
    if debug() {
        eprintln!(
            "seed {seed}: policy {:?} full sync {} interval {} depth {}/{} cps {before} then {} \
             now {}us crashes {} dev errors {:?} degrades {} resyncs {}",
            sim.config.peer_loss_policy,
            sim.full_sync,
            sim.config.cp_interval_us,
            sim.config.device_queue_depth,
            sim.destination_config.device_queue_depth,
            sim.totals.cps_completed,
            sim.now_us,
            sim.totals.crashes,
            sim.device_fault_rates.0,
            sim.totals.degrades,
            sim.totals.resyncs_done
        );
    }
    sim.check_mirror();
    sim.check_resync_done();
    assert!(sim.completions > 0, "seed {seed}: nothing completed");
    assert!(sim.totals.cps_completed > 0, "seed {seed}: no CP completed");
    let quiesced = started.elapsed();
    let totals = sim.promote_check();
    if std::env::var("SIM_TIMING").is_ok() {
        eprintln!(
            "TIMING {kind} {} {}",
            quiesced.as_micros(),
            started.elapsed().as_micros()
        );
    }
    totals
}

/// Seeds beyond the 10,000 CI runs that found a bug, kept so it stays fixed: 11915, a block
/// named twice among a resync's references (a loss noted them again before the session's reset
/// put the staged table back), of which a later write forgot only one copy, so the mirror got
/// the stale block; 24738, 24840 and 27611, a crash right after a degrade that lost its new
/// generation but kept marks written after it, which no resync ever cleared (the handshake found
/// the pair in sync; it now forgets marks without a base).
const FOUND_SEEDS: &[u64] = &[11915, 24738, 24840, 27611];

#[test]
fn seeded_simulation() {
    let mut seeds: Vec<u64> = match (std::env::var("SIM_SEED"), std::env::var("SIM_SEEDS")) {
        (Ok(seed), _) => vec![seed.parse().expect("SIM_SEED is a number")],
        (_, Ok(count)) => (1..=count.parse().expect("SIM_SEEDS is a number")).collect(),
        _ => (1..=50).collect(),
    };
    if std::env::var("SIM_SEED").is_err() {
        // Seeds past CI's count that once failed, run every time.
        for &seed in FOUND_SEEDS {
            if !seeds.contains(&seed) {
                seeds.push(seed);
            }
        }
    }
    if debug() {
        let _ = log::set_logger(&DebugLogger);
        log::set_max_level(log::LevelFilter::Info);
    }
    // SIM_KEEP_GOING: run every seed and list the failing ones at the end.
    let keep_going = std::env::var("SIM_KEEP_GOING").is_ok();
    let mut totals = Totals::default();
    let mut failed = Vec::new();
    for &seed in &seeds {
        match catch_unwind(AssertUnwindSafe(|| run_seed(seed))) {
            Ok(seed_totals) => totals.add(&seed_totals),
            Err(_) if keep_going => failed.push(seed),
            Err(_) => panic!("seed {seed} failed (reproduce with SIM_SEED={seed})"),
        }
    }
    assert!(failed.is_empty(), "seeds failed: {failed:?}");
    eprintln!("{} seeds: {totals:?}", seeds.len());
    if seeds.len() >= 20 {
        assert!(
            totals.crashes > 0 && totals.link_errors > 0 && totals.device_errors > 0,
            "faults were injected: {totals:?}"
        );
        assert!(
            totals.cps_completed > seeds.len() as u64 && totals.references > 0,
            "CPs ran with references: {totals:?}"
        );
        assert!(
            totals.cps_checked >= totals.cps_completed && totals.aborts > 0,
            "every CP was checked at its point in time: {totals:?}"
        );
        assert!(
            totals.freezes > 0 && totals.peers_lost > 0,
            "frozen peers were declared lost: {totals:?}"
        );
    }
    if seeds.len() >= 200 {
        assert!(
            totals.degrades > 0
                && totals.degraded_writes > 0
                && totals.local_cps > 0
                && totals.resyncs_done > 0
                && totals.full_syncs_done > 0,
            "seeds degraded, resynced and ran the initial full sync: {totals:?}"
        );
        assert!(
            totals.resync_reference_blocks > 0
                && totals.resync_data_blocks > 0
                && totals.resync_crashes > 0
                && totals.lost_logs > 0,
            "resyncs sent references and data, and crashes hit them: {totals:?}"
        );
        assert!(
            totals.promotions > 0 && totals.refused_promotions > 0,
            "destinations were promoted, and resync targets refused: {totals:?}"
        );
        assert!(
            totals.failbacks > 0 && totals.failback_ring_marks > 0,
            "old sources failed back, their rings' writes marked: {totals:?}"
        );
    }
    // A third of the seeds run the fail policy, and only some of those lose their peer for
    // long enough with writes held: a few dozen seeds may fail none.
    if seeds.len() >= 200 {
        assert!(
            totals.writes_failed > 0,
            "the fail policy failed writes: {totals:?}"
        );
    }
}
