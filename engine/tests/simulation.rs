//! Seeded simulation of a source and a destination wired by an in-memory lossy pipe on virtual
//! time (engine spec "Tests"; STYLE 10). The workload mixes aligned and unaligned writes and
//! write-zeroes, takes random CPs, and injects faults: link drops, corrupted bytes on the wire,
//! partial sends, out-of-order commits, source crashes (torn entries, lost unflushed primary
//! writes) and destination crashes. Along the way it asserts the ack rule (a completion only
//! for a write the destination has logged); after quiescing it asserts mirror == primary byte for
//! byte and that every completed write's data is present; a promotion after a source crash must
//! hold every completed write, and the stale source is then rejected.
//!
//! Devices are asynchronous (invariant 8): every op completes after a random virtual delay, in
//! random order; a write lands at submission or at completion; a flush makes durable what
//! completed before it; with faults on, ops fail at random (the engine retries) and a crash
//! cuts the power of the crashed side's devices mid-op. After every CP the destination applied,
//! before any source crash, the mirror is checked to be the primary as of the end of that CP,
//! byte for byte (invariant 7: the point-in-time mirror), although writes went on.
//!
//! `SIM_SEEDS=N` runs N seeds (default 50); `SIM_SEED=S` runs one seed.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use nvmirror_engine::device::{DeviceOpId, DeviceOpKind};
use nvmirror_engine::geometry::{RING_BYTES_MIN, SECTOR_SIZE};
use nvmirror_engine::wire::{frame_length, MESSAGE_HEADER_BYTES};
use nvmirror_engine::{
    BlockDevice, CpMode, Destination, DestinationConfig, DeviceCompletion, DeviceError, DeviceOp,
    DeviceRequest, Source, SourceConfig, SourceEvent, WriteRefused, WriteSlot,
};

const VOLUME: [u8; 16] = *b"nvmirror-sim-vol";
const NAMESPACE_BYTES: u64 = 256 * 1024;
const NAMESPACES: usize = 2;
const SECTORS: usize = (NAMESPACE_BYTES / SECTOR_SIZE as u64) as usize;
const STEPS: u64 = 2500;
const QUIESCE_STEPS_MAX: u64 = 100_000;
const QUEUE_DEPTH: usize = 24;
const RECEIVE_TIMEOUT_US: u64 = 5000;
/// Device ops in flight per namespace (small, so the bound is exercised).
const DEVICE_QUEUE_DEPTH: u32 = 4;
/// A device op completes within this much virtual time.
const DEVICE_DELAY_US_MAX: u64 = 60;
/// With faults on, this many ops per million fail.
const DEVICE_FAULTS_PER_MILLION: u64 = 4000;

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

/// An op submitted to a [`SimDevice`] and not yet completed.
struct PendingOp {
    id: DeviceOpId,
    kind: DeviceOpKind,
    offset_bytes: u64,
    length_bytes: u64,
    /// A write's data (empty: zeroes), not yet on the medium unless `landed`.
    data: Vec<u8>,
    landed: bool,
    ready_at_us: u64,
    fail: bool,
    /// A flush: what it makes durable (sectors and their bytes at submission).
    durable: Vec<(usize, Vec<u8>)>,
}

/// A namespace with a volatile write cache: writes are durable only after a flush that was
/// submitted once they completed.
struct DeviceState {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Written and completed, not flushed yet.
    unflushed: Vec<bool>,
    pending: Vec<PendingOp>,
    rng: Rng,
    clock: Rc<Cell<u64>>,
    faults: Rc<Cell<bool>>,
    read_buffer: Vec<u8>,
}

#[derive(Clone)]
struct SimDevice(Rc<RefCell<DeviceState>>);

impl SimDevice {
    fn new(seed: u64, clock: Rc<Cell<u64>>, faults: Rc<Cell<bool>>) -> Self {
        let bytes = NAMESPACE_BYTES as usize;
        Self(Rc::new(RefCell::new(DeviceState {
            durable: vec![0; bytes],
            current: vec![0; bytes],
            unflushed: vec![false; SECTORS],
            pending: Vec::new(),
            rng: Rng::new(seed),
            clock,
            faults,
            read_buffer: Vec::new(),
        })))
    }
    /// A power loss: ops in flight land or not, then each unflushed sector survives or not.
    fn crash(&self, rng: &mut Rng) {
        let mut state = self.0.borrow_mut();
        let state = &mut *state;
        for op in std::mem::take(&mut state.pending) {
            if op.kind == DeviceOpKind::Write && !op.landed && !op.fail && rng.below(2) == 0 {
                apply(&mut state.current, &mut state.unflushed, &op);
            }
        }
        for sector in 0..SECTORS {
            if state.unflushed[sector] {
                let range = sector * SECTOR_SIZE..(sector + 1) * SECTOR_SIZE;
                if rng.below(2) == 0 {
                    state.durable[range.clone()].copy_from_slice(&state.current[range]);
                } else {
                    state.current[range.clone()].copy_from_slice(&state.durable[range]);
                }
                state.unflushed[sector] = false;
            }
        }
    }
    fn contents(&self) -> Vec<u8> {
        self.0.borrow().current.clone()
    }
    fn is_idle(&self) -> bool {
        self.0.borrow().pending.is_empty()
    }
}

/// Puts a write's bytes on the medium (marked unflushed).
fn apply(current: &mut [u8], unflushed: &mut [bool], op: &PendingOp) {
    let start = op.offset_bytes as usize;
    let end = start + op.length_bytes as usize;
    if op.data.is_empty() {
        current[start..end].fill(0);
    } else {
        current[start..end].copy_from_slice(&op.data);
    }
    unflushed[start / SECTOR_SIZE..end / SECTOR_SIZE].fill(true);
}

impl BlockDevice for SimDevice {
    fn size_bytes(&self) -> u64 {
        NAMESPACE_BYTES
    }
    fn submit(&mut self, op: DeviceOp<'_>) {
        let mut state = self.0.borrow_mut();
        let state = &mut *state;
        let (start, end) = op.request.range();
        assert_eq!(start % SECTOR_SIZE as u64, 0);
        assert_eq!(end % SECTOR_SIZE as u64, 0);
        assert!(end <= NAMESPACE_BYTES, "an op inside the namespace");
        let kind = op.request.kind();
        // No two ops in flight overlap where one writes (the engine's ordering rule).
        for other in &state.pending {
            let overlap =
                other.offset_bytes < end && start < other.offset_bytes + other.length_bytes;
            assert!(
                !(overlap && (kind == DeviceOpKind::Write || other.kind == DeviceOpKind::Write)),
                "overlapping ops in flight: {kind:?} {start}..{end} and {:?} at {}",
                other.kind,
                other.offset_bytes
            );
        }
        let data = match op.request {
            DeviceRequest::Write { data, .. } => data.to_vec(),
            _ => Vec::new(),
        };
        let fail = state.faults.get() && state.rng.chance(DEVICE_FAULTS_PER_MILLION);
        let durable = if kind == DeviceOpKind::Flush {
            (0..SECTORS)
                .filter(|&sector| state.unflushed[sector])
                .map(|sector| {
                    let range = sector * SECTOR_SIZE..(sector + 1) * SECTOR_SIZE;
                    (sector, state.current[range].to_vec())
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut pending = PendingOp {
            id: op.id,
            kind,
            offset_bytes: start,
            length_bytes: end - start,
            data,
            landed: false,
            ready_at_us: state.clock.get() + state.rng.below(DEVICE_DELAY_US_MAX),
            fail,
            durable,
        };
        if kind == DeviceOpKind::Write && !fail && state.rng.below(2) == 0 {
            apply(&mut state.current, &mut state.unflushed, &pending);
            pending.landed = true;
        }
        state.pending.push(pending);
    }
    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize {
        let now = self.0.borrow().clock.get();
        let mut count = 0;
        loop {
            let op = {
                let mut state = self.0.borrow_mut();
                let state = &mut *state;
                let ready: Vec<usize> = (0..state.pending.len())
                    .filter(|&i| state.pending[i].ready_at_us <= now)
                    .collect();
                if ready.is_empty() {
                    return count;
                }
                let pick = ready[state.rng.below(ready.len() as u64) as usize];
                let op = state.pending.swap_remove(pick);
                if !op.fail {
                    match op.kind {
                        DeviceOpKind::Write if !op.landed => {
                            apply(&mut state.current, &mut state.unflushed, &op)
                        }
                        DeviceOpKind::Flush => {
                            for (sector, bytes) in &op.durable {
                                let range = sector * SECTOR_SIZE..(sector + 1) * SECTOR_SIZE;
                                state.durable[range].copy_from_slice(bytes);
                            }
                        }
                        DeviceOpKind::Read => {
                            let start = op.offset_bytes as usize;
                            let end = start + op.length_bytes as usize;
                            state.read_buffer.clear();
                            let bytes = state.current[start..end].to_vec();
                            state.read_buffer.extend_from_slice(&bytes);
                        }
                        DeviceOpKind::Write => {}
                    }
                }
                op
            };
            let buffer = std::mem::take(&mut self.0.borrow_mut().read_buffer);
            let result = if op.fail {
                Err(DeviceError {
                    kind: std::io::ErrorKind::Other,
                    errno: Some(5),
                })
            } else if op.kind == DeviceOpKind::Read {
                Ok(&buffer[..])
            } else {
                Ok(&[][..])
            };
            complete(DeviceCompletion { id: op.id, result });
            self.0.borrow_mut().read_buffer = buffer;
            count += 1;
        }
    }
    fn inflight_count(&self) -> usize {
        self.0.borrow().pending.len()
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

struct WriteRecord {
    zeroes: bool,
    completed: bool,
    /// The entry's seq (its WriteId).
    seq: u64,
}

/// What the host did: every write and, per sector, the writes that covered it in seq order.
struct Model {
    writes: Vec<WriteRecord>,
    history: Vec<Vec<Vec<u64>>>,
}

impl Model {
    fn new() -> Self {
        Self {
            writes: vec![WriteRecord {
                zeroes: true,
                completed: true,
                seq: 0,
            }],
            history: vec![vec![Vec::new(); SECTORS]; NAMESPACES],
        }
    }
    fn add(&mut self, nsid: u32, lba: u64, sectors: u64, zeroes: bool, seq: u64) -> u64 {
        let number = self.writes.len() as u64;
        self.writes.push(WriteRecord {
            zeroes,
            completed: false,
            seq,
        });
        for sector in lba..lba + sectors {
            self.history[nsid as usize - 1][sector as usize].push(number);
        }
        number
    }
    /// Invariant 7: every sector holds exactly the last write with seq <= `last_seq` covering
    /// it (zeroes for none). Valid while seq order is issue order (no source crash yet).
    fn check_point_in_time(&self, nsid: u32, image: &[u8], last_seq: u64, what: &str) {
        for (sector, history) in self.history[nsid as usize - 1].iter().enumerate() {
            let expected = history
                .iter()
                .rev()
                .find(|&&n| self.writes[n as usize].seq <= last_seq)
                .map_or(0, |&n| if self.writes[n as usize].zeroes { 0 } else { n });
            let bytes = &image[sector * SECTOR_SIZE..(sector + 1) * SECTOR_SIZE];
            let found = identify(bytes, sector as u64);
            assert_eq!(
                found,
                Some(expected),
                "{what}: ns {nsid} sector {sector} is not as of seq {last_seq}"
            );
        }
    }

    /// Every sector holds the last completed write covering it, or a later write.
    fn check(&self, nsid: u32, image: &[u8], what: &str) {
        for (sector, history) in self.history[nsid as usize - 1].iter().enumerate() {
            let bytes = &image[sector * SECTOR_SIZE..(sector + 1) * SECTOR_SIZE];
            let found = identify(bytes, sector as u64)
                .unwrap_or_else(|| panic!("{what}: ns {nsid} sector {sector}: garbage"));
            let from = history
                .iter()
                .rposition(|&n| self.writes[n as usize].completed)
                .map_or(0, |p| p);
            let allowed = if history.iter().any(|&n| self.writes[n as usize].completed) {
                &history[from..]
            } else {
                &history[..]
            };
            let ok = if found == 0 {
                allowed.iter().any(|&n| self.writes[n as usize].zeroes)
                    || !history.iter().any(|&n| self.writes[n as usize].completed)
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

fn destination_config() -> DestinationConfig {
    DestinationConfig {
        volume_id: VOLUME,
        device_queue_depth: DEVICE_QUEUE_DEPTH,
    }
}

const SIZES: [u64; NAMESPACES] = [NAMESPACE_BYTES; NAMESPACES];

struct Sim {
    seed: u64,
    /// Virtual time the devices see.
    clock: Rc<Cell<u64>>,
    /// Device faults on (shared with the devices).
    device_faults: Rc<Cell<bool>>,
    source_crashes: u64,
    point_in_time_checks: u64,
    rng: Rng,
    now_us: u64,
    config: SourceConfig,
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
    faults: bool,
    completions: u64,
    crashes: u64,
    link_errors: u64,
    cps_completed: u64,
    /// When each receive buffer last got bytes (a stalled partial message means a corrupted
    /// length field: the runtime's receive timeout cuts the link).
    received_at_us: [u64; 2],
    /// Where each receive buffer holds a flipped byte. A flip outlives the fault phase: bytes
    /// corrupted before `drive_bounded` turns faults off may be delivered after.
    corrupted: [Vec<usize>; 2],
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mode = if rng.below(4) == 0 {
            CpMode::Naive
        } else {
            CpMode::References
        };
        let config = SourceConfig {
            volume_id: VOLUME,
            cp_interval_us: 200 + rng.below(5000),
            mode,
            device_queue_depth: DEVICE_QUEUE_DEPTH,
        };
        let clock = Rc::new(Cell::new(0));
        let device_faults = Rc::new(Cell::new(true));
        let device =
            |index: u64| SimDevice::new(seed ^ (index << 40), clock.clone(), device_faults.clone());
        let primaries: Vec<SimDevice> = (0..NAMESPACES as u64).map(device).collect();
        let mirrors: Vec<SimDevice> = (0..NAMESPACES as u64).map(|i| device(i + 16)).collect();
        let (source, report) =
            Source::open(config, vec![0; RING_BYTES_MIN as usize], &SIZES, 0).unwrap();
        assert!(report.formatted);
        let destination = Destination::open(
            destination_config(),
            vec![0; RING_BYTES_MIN as usize],
            &SIZES,
        )
        .unwrap();
        Self {
            seed,
            clock,
            device_faults,
            source_crashes: 0,
            point_in_time_checks: 0,
            rng,
            now_us: 0,
            config,
            source: Some(source),
            destination: Some(destination),
            primaries,
            mirrors,
            link_up: false,
            reconnect_at_us: 0,
            to_destination: Vec::new(),
            to_source: Vec::new(),
            model: Model::new(),
            pending: HashMap::new(),
            held: Vec::new(),
            faults: true,
            completions: 0,
            crashes: 0,
            link_errors: 0,
            cps_completed: 0,
            received_at_us: [0; 2],
            corrupted: [Vec::new(), Vec::new()],
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
        self.reconnect_at_us = self.now_us + 10 + self.rng.below(500);
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
                        // Fill only half now: a crash before the commit leaves a torn entry.
                        let half = data.len() / 2;
                        source.write_buffer(&slot)[..half].copy_from_slice(&data[..half]);
                        source.write_buffer(&slot)[half..].copy_from_slice(&data[half..]);
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
                let number = self.model.add(nsid, lba, sectors, zeroes, id.0);
                assert_eq!(number, number_next);
                assert!(
                    self.pending.insert(id.0, number).is_none(),
                    "seed {}: seq {} reused",
                    self.seed,
                    id.0
                );
                if let Some(slot) = held {
                    self.held.push((slot, number));
                }
            }
            Err(WriteRefused::Backpressure) => {}
            Err(other) => panic!("seed {}: write refused: {other:?}", self.seed),
        }
    }

    fn commit_held(&mut self, all: bool) {
        while !self.held.is_empty() {
            let index = self.rng.below(self.held.len() as u64) as usize;
            let (slot, _) = self.held.swap_remove(index);
            let now = self.now_us;
            self.source().commit_write(now, slot);
            if !all {
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
            if let Err(error) = result {
                assert!(
                    flipped,
                    "seed {}: link error on a message without a flipped byte: {error}",
                    self.seed
                );
                self.link_errors += 1;
                return self.cut_link();
            }
            if !to_destination {
                self.drain_source_events();
            }
        }
    }

    fn drain_source_events(&mut self) {
        while let Some(event) = self.source().poll_event() {
            match event {
                SourceEvent::WriteCompleted(id) => {
                    // The ack rule: the destination logged this write before it completed.
                    let logged = self.destination.as_ref().unwrap().logged_seq_max();
                    assert!(
                        logged.is_some_and(|seq| seq >= id.0),
                        "seed {}: write {} completed, destination logged {logged:?}",
                        self.seed,
                        id.0
                    );
                    let number = self.pending.remove(&id.0).unwrap_or_else(|| {
                        panic!("seed {}: unknown completion {}", self.seed, id.0)
                    });
                    let record = &mut self.model.writes[number as usize];
                    assert!(!record.completed);
                    record.completed = true;
                    self.completions += 1;
                }
                SourceEvent::LinkRejected(text) => panic!("seed {}: rejected: {text}", self.seed),
                // Injected device faults: the engine retries (checked by what follows).
                SourceEvent::DeviceFault(_) | SourceEvent::MirrorFailed { .. } => {}
                SourceEvent::CpCompleted { last_seq, .. } => {
                    self.cps_completed += 1;
                    if self.source_crashes == 0 {
                        for nsid in 1..=NAMESPACES as u32 {
                            let mirror = self.mirrors[nsid as usize - 1].contents();
                            self.model.check_point_in_time(
                                nsid,
                                &mirror,
                                last_seq,
                                &format!("seed {} mirror after a CP", self.seed),
                            );
                        }
                        self.point_in_time_checks += 1;
                    }
                }
                SourceEvent::LinkReady => {}
            }
        }
        while self.destination().poll_event().is_some() {}
    }

    fn crash_source(&mut self) {
        self.cut_link();
        let ring = self.source.take().unwrap().into_memory();
        self.held.clear();
        self.pending.clear();
        for primary in &self.primaries {
            primary.crash(&mut self.rng);
        }
        let (source, _) = Source::open(self.config, ring, &SIZES, self.now_us).unwrap();
        self.source = Some(source);
        self.crashes += 1;
        self.source_crashes += 1;
    }

    fn crash_destination(&mut self) {
        self.cut_link();
        let ring = self.destination.take().unwrap().into_memory();
        for mirror in &self.mirrors {
            mirror.crash(&mut self.rng);
        }
        self.destination = Some(Destination::open(destination_config(), ring, &SIZES).unwrap());
        self.crashes += 1;
    }

    /// Moves the device ops both sides emit to their devices and the completions back.
    fn pump_devices(&mut self) {
        let now = self.now_us;
        self.clock.set(now);
        for _ in 0..8 {
            let mut work = 0;
            let source = self.source.as_mut().unwrap();
            while let Some(op) = source.poll_device_op(now) {
                self.primaries[op.nsid as usize - 1].submit(op);
                work += 1;
            }
            let destination = self.destination.as_mut().unwrap();
            while let Some(op) = destination.poll_device_op(now) {
                self.mirrors[op.nsid as usize - 1].submit(op);
                work += 1;
            }
            for device in &mut self.primaries {
                work += device.poll_completions(&mut |c| source.handle_device_completion(now, c));
            }
            for device in &mut self.mirrors {
                work +=
                    device.poll_completions(&mut |c| destination.handle_device_completion(now, c));
            }
            if work == 0 {
                return;
            }
        }
    }

    fn devices_idle(&self) -> bool {
        self.primaries
            .iter()
            .chain(&self.mirrors)
            .all(SimDevice::is_idle)
    }

    fn step(&mut self, writes: bool) {
        self.now_us += 1 + self.rng.below(20);
        let now = self.now_us;
        if !self.link_up && now >= self.reconnect_at_us {
            self.link_up = true;
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
        self.source().handle_tick(now);
        self.pump_devices();
        if self.link_up {
            self.pump(true);
            self.deliver(true);
        }
        self.pump_devices();
        if self.link_up {
            self.pump(false);
            self.deliver(false);
        }
        self.drain_source_events();
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
        if self.rng.chance(700) {
            self.crash_source();
        }
        if self.rng.chance(700) {
            self.crash_destination();
        }
    }

    /// Drives the pair to quiescence: every write completed and CP'd on both sides, or panics.
    fn drive_bounded(&mut self) {
        self.faults = false;
        self.device_faults.set(false);
        for _ in 0..QUIESCE_STEPS_MAX {
            self.step(false);
            let idle = self.source.as_ref().unwrap().is_idle()
                && self.destination.as_ref().unwrap().tx_pending_bytes() == 0
                && self.devices_idle();
            if idle && self.pending.is_empty() && self.link_up {
                return;
            }
        }
        panic!(
            "seed {}: no quiescence after {QUIESCE_STEPS_MAX} steps ({} pending)",
            self.seed,
            self.pending.len()
        );
    }

    fn check_mirror(&self) {
        assert_eq!(
            self.source.as_ref().unwrap().cp_completed(),
            self.destination.as_ref().unwrap().cp_completed()
        );
        for nsid in 1..=NAMESPACES as u32 {
            let primary = self.primaries[nsid as usize - 1].contents();
            let mirror = self.mirrors[nsid as usize - 1].contents();
            let differs = primary
                .chunks(SECTOR_SIZE)
                .zip(mirror.chunks(SECTOR_SIZE))
                .position(|(a, b)| a != b);
            assert!(
                differs.is_none(),
                "seed {}: ns {nsid} mirror differs from primary at sector {differs:?}",
                self.seed
            );
            self.model
                .check(nsid, &primary, &format!("seed {} primary", self.seed));
        }
    }

    /// Source crash, then failover: the promoted mirror holds every completed write, and the
    /// old source is refused as stale.
    fn promote_check(mut self) {
        self.faults = false;
        self.device_faults.set(false);
        for _ in 0..300 {
            self.step(true);
        }
        let _source_ring = self.source.take().unwrap().into_memory();
        let destination = self.destination.take().unwrap();
        // The destination's host dies with it (its mirror ops in flight are cut), or it is
        // promoted once they finished.
        let destination = if self.rng.below(2) == 0 || !self.devices_idle() {
            let ring = destination.into_memory();
            for mirror in &self.mirrors {
                mirror.crash(&mut self.rng);
            }
            Destination::open(destination_config(), ring, &SIZES).unwrap()
        } else {
            destination
        };
        let mirror_ring_probe = self.mirrors.clone();
        let mut promotion = destination.promote().unwrap();
        for _ in 0..QUIESCE_STEPS_MAX {
            self.now_us += 1 + self.rng.below(20);
            self.clock.set(self.now_us);
            while let Some(op) = promotion.poll_device_op() {
                self.mirrors[op.nsid as usize - 1].submit(op);
            }
            for device in &mut self.mirrors {
                device.poll_completions(&mut |c| promotion.handle_device_completion(c));
            }
            if promotion.is_done() {
                break;
            }
        }
        assert!(
            promotion.is_done(),
            "seed {}: promotion never finished",
            self.seed
        );
        let (report, _) = promotion.finish().unwrap();
        assert_eq!(report.epoch, 2);
        for nsid in 1..=NAMESPACES as u32 {
            let mirror = mirror_ring_probe[nsid as usize - 1].contents();
            self.model.check(
                nsid,
                &mirror,
                &format!("seed {} promoted mirror", self.seed),
            );
        }
    }
}

/// Runs one seed; returns (crashes, link errors, CPs completed, references sent).
fn run_seed(seed: u64) -> [u64; 7] {
    let mut sim = Sim::new(seed);
    for _ in 0..STEPS {
        sim.step(true);
    }
    sim.drive_bounded();
    sim.check_mirror();
    assert!(sim.completions > 0, "seed {seed}: nothing completed");
    assert!(sim.cps_completed > 0, "seed {seed}: no CP completed");
    let source_counters = *sim.source.as_ref().unwrap().counters();
    let destination_counters = *sim.destination.as_ref().unwrap().counters();
    let totals = [
        sim.crashes,
        sim.link_errors,
        sim.cps_completed,
        source_counters.cp_reference_count,
        sim.point_in_time_checks,
        source_counters.device_error_count + destination_counters.device_error_count,
        source_counters.cp_failure_count,
    ];
    sim.promote_check();
    totals
}

#[test]
fn seeded_simulation() {
    let seeds: Vec<u64> = match (std::env::var("SIM_SEED"), std::env::var("SIM_SEEDS")) {
        (Ok(seed), _) => vec![seed.parse().expect("SIM_SEED is a number")],
        (_, Ok(count)) => (1..=count.parse().expect("SIM_SEEDS is a number")).collect(),
        _ => (1..=50).collect(),
    };
    let mut totals = [0u64; 7];
    for seed in &seeds {
        for (total, value) in totals.iter_mut().zip(run_seed(*seed)) {
            *total += value;
        }
    }
    let [crashes, link_errors, cps, references, point_in_time, device_errors, cp_failures] = totals;
    println!(
        "{} seeds: {crashes} crashes, {link_errors} link errors, {cps} CPs ({point_in_time} checked \
         point in time), {references} references, {device_errors} device errors, {cp_failures} \
         CPs failed by the mirror",
        seeds.len()
    );
    if seeds.len() >= 20 {
        assert!(
            crashes > 0 && link_errors > 0,
            "faults were injected: {totals:?}"
        );
        assert!(
            cps > seeds.len() as u64 && references > 0,
            "CPs ran with references: {totals:?}"
        );
        assert!(
            point_in_time > 0 && device_errors > 0 && cp_failures > 0,
            "point-in-time checks ran and device faults were injected: {totals:?}"
        );
    }
}
