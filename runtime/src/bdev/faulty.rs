//! [`FaultyDevice`]: a namespace device that injects faults into another, for process tests and
//! benches of a slow, failing or stalled primary or mirror (the runtime counterpart of the
//! simulation's device faults; invariant 8: a slow device never blocks a reactor).
//!
//! Each [`FaultRule`] names an op kind, an action and which ops it selects: every `every`-th
//! matching op, inside an optional LBA range (512-byte LBAs, inclusive) and an optional time
//! window measured from when the device was opened. Actions:
//! - `Fail`: the op completes with `EIO` and is never given to the inner device;
//! - `Delay`: the completion is held back until `delay_us` after submission;
//! - `Corrupt`: one byte of a read's data is flipped (the data is copied aside first).
//!
//! A held completion is released by polling, never by sleeping: while any is held,
//! [`NamespaceDevice::next_deadline_us`] returns the earliest release so an adaptive reactor
//! wakes for it. [`FaultControl::stall_until_us`] holds every completion until a time (a
//! runtime stall of the whole device). Reads always go through the rules (`can_read_now` is
//! false).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nvmirror_engine::device::{
    BlockDevice, DeviceCompletion, DeviceError, DeviceOp, DeviceOpId, DeviceOpKind, DeviceRequest,
};
use nvmirror_engine::geometry::SECTOR_SIZE;

use super::NamespaceDevice;
use crate::reactor::{monotonic_us, Doorbell};

/// Completions held or tracked at once without allocating (above any device queue depth).
const HELD_PREALLOCATED: usize = 1024;

/// Which op kinds a rule applies to (a write-zeroes is a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOps {
    Read,
    Write,
    Flush,
    All,
}

impl FaultOps {
    fn matches(self, kind: DeviceOpKind) -> bool {
        match self {
            FaultOps::All => true,
            FaultOps::Read => kind == DeviceOpKind::Read,
            FaultOps::Write => kind == DeviceOpKind::Write,
            FaultOps::Flush => kind == DeviceOpKind::Flush,
        }
    }
}

/// What a rule does to the ops it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Complete with `EIO`; the op is not performed.
    Fail,
    /// Hold the completion until `delay_us` after submission.
    Delay { delay_us: u64 },
    /// Flip a byte of a read's data (no effect on other kinds).
    Corrupt,
}

/// One fault: which ops (kind, every N-th, LBA range, time window) and what happens to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    pub ops: FaultOps,
    pub action: FaultAction,
    /// Every N-th op the other conditions select (1: all of them).
    pub every: u64,
    /// The op touches an LBA at or above this (512-byte LBAs; a flush has no range and
    /// matches only rules without one).
    pub lba_min: Option<u64>,
    /// The op touches an LBA at or below this.
    pub lba_max: Option<u64>,
    /// Active from this many ms after the device opened.
    pub from_ms: Option<u64>,
    /// Active until this many ms after the device opened (exclusive).
    pub to_ms: Option<u64>,
}

impl FaultRule {
    /// A rule on `ops` that selects every op, any LBA, any time.
    pub fn new(ops: FaultOps, action: FaultAction) -> Self {
        FaultRule {
            ops,
            action,
            every: 1,
            lba_min: None,
            lba_max: None,
            from_ms: None,
            to_ms: None,
        }
    }

    /// Checks the rule; the error names the field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.every == 0 {
            return Err(("every", "must be at least 1".into()));
        }
        if let (Some(min), Some(max)) = (self.lba_min, self.lba_max) {
            if min > max {
                return Err(("lba_max", format!("is below lba_min ({min})")));
            }
        }
        if let (Some(from), Some(to)) = (self.from_ms, self.to_ms) {
            if from >= to {
                return Err(("to_ms", format!("must be after from_ms ({from})")));
            }
        }
        if let FaultAction::Delay { delay_us } = self.action {
            if delay_us == 0 || delay_us > 3_600_000_000 {
                return Err(("delay_us", "must be from 1 us to one hour".into()));
            }
        }
        Ok(())
    }

    /// The op (kind and byte range) at `elapsed_ms` after open falls under this rule, before
    /// counting.
    fn selects(&self, kind: DeviceOpKind, range: Option<(u64, u64)>, elapsed_ms: u64) -> bool {
        if !self.ops.matches(kind)
            || self.from_ms.is_some_and(|from| elapsed_ms < from)
            || self.to_ms.is_some_and(|to| elapsed_ms >= to)
        {
            return false;
        }
        if self.lba_min.is_none() && self.lba_max.is_none() {
            return true;
        }
        let Some((start_bytes, end_bytes)) = range else {
            return false;
        };
        let first_lba = start_bytes / SECTOR_SIZE as u64;
        let last_lba = (end_bytes / SECTOR_SIZE as u64).saturating_sub(1);
        self.lba_min.is_none_or(|min| last_lba >= min)
            && self.lba_max.is_none_or(|max| first_lba <= max)
    }
}

/// What a [`FaultyDevice`] is told from other threads, and what it did (atomics).
#[derive(Debug, Default)]
pub struct FaultControl {
    stall_until_us: AtomicU64,
    failed: AtomicU64,
    delayed: AtomicU64,
    corrupted: AtomicU64,
}

impl FaultControl {
    /// Holds every completion until [`monotonic_us`] reaches `until_us` (0: no stall).
    pub fn stall_until_us(&self, until_us: u64) {
        self.stall_until_us.store(until_us, Ordering::Release);
    }

    /// Ops failed, delayed and corrupted so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.failed.load(Ordering::Relaxed),
            self.delayed.load(Ordering::Relaxed),
            self.corrupted.load(Ordering::Relaxed),
        )
    }
}

/// What the rules decided for one op given to the inner device.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    id: DeviceOpId,
    release_us: u64,
    corrupt: bool,
}

/// A completion held back until `release_us`; a read's data copied into `data`.
#[derive(Debug)]
struct Held {
    id: DeviceOpId,
    release_us: u64,
    result: Result<(), DeviceError>,
    data: Vec<u8>,
}

/// A namespace device with [`FaultRule`]s applied to the ops given to `inner`.
pub struct FaultyDevice {
    inner: Box<dyn NamespaceDevice>,
    rules: Vec<FaultRule>,
    /// Ops each rule has selected so far (for `every`).
    selected: Vec<u64>,
    opened_us: u64,
    control: Arc<FaultControl>,
    /// Ops in the inner device a rule delays or corrupts (others pass straight through).
    tracked: Vec<Tracked>,
    held: Vec<Held>,
    /// Data buffers of released completions, reused.
    spare: Vec<Vec<u8>>,
}

fn eio() -> DeviceError {
    DeviceError {
        kind: std::io::ErrorKind::Other,
        errno: Some(libc::EIO),
    }
}

impl FaultyDevice {
    /// Wraps `inner`; the time windows of `rules` count from now. Panics on a rule that fails
    /// [`FaultRule::check`] (configs are checked at start).
    pub fn new(inner: Box<dyn NamespaceDevice>, rules: Vec<FaultRule>) -> Self {
        for rule in &rules {
            assert!(rule.check().is_ok(), "unchecked fault rule {rule:?}");
        }
        FaultyDevice {
            inner,
            selected: vec![0; rules.len()],
            rules,
            opened_us: monotonic_us(),
            control: Arc::new(FaultControl::default()),
            tracked: Vec::with_capacity(HELD_PREALLOCATED),
            held: Vec::with_capacity(HELD_PREALLOCATED),
            spare: Vec::new(),
        }
    }

    /// The handle other threads stall the device with and read its counts from.
    pub fn control(&self) -> Arc<FaultControl> {
        Arc::clone(&self.control)
    }

    /// Applies the rules to one op: (fail, delay_us, corrupt).
    fn decide(&mut self, kind: DeviceOpKind, range: Option<(u64, u64)>, now_us: u64) -> Decision {
        let elapsed_ms = now_us.saturating_sub(self.opened_us) / 1000;
        let mut decision = Decision::default();
        for (rule, selected) in self.rules.iter().zip(self.selected.iter_mut()) {
            if !rule.selects(kind, range, elapsed_ms) {
                continue;
            }
            *selected += 1;
            if !selected.is_multiple_of(rule.every) {
                continue;
            }
            match rule.action {
                FaultAction::Fail => decision.fail = true,
                FaultAction::Delay { delay_us } => {
                    decision.delay_us = decision.delay_us.max(delay_us)
                }
                FaultAction::Corrupt => decision.corrupt |= kind == DeviceOpKind::Read,
            }
        }
        decision
    }

    fn spare_buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Decision {
    fail: bool,
    delay_us: u64,
    corrupt: bool,
}

impl BlockDevice for FaultyDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn submit(&mut self, op: DeviceOp<'_>) {
        let now_us = monotonic_us();
        let kind = op.request.kind();
        let range = match op.request {
            DeviceRequest::Flush => None,
            _ => Some(op.request.range()),
        };
        let decision = self.decide(kind, range, now_us);
        let release_us = now_us + decision.delay_us;
        if decision.delay_us > 0 {
            self.control.delayed.fetch_add(1, Ordering::Relaxed);
        }
        if decision.fail {
            self.control.failed.fetch_add(1, Ordering::Relaxed);
            let data = self.spare_buffer();
            self.held.push(Held {
                id: op.id,
                release_us,
                result: Err(eio()),
                data,
            });
            return;
        }
        if decision.delay_us > 0 || decision.corrupt {
            assert!(
                self.tracked.iter().all(|tracked| tracked.id != op.id),
                "op {:?} submitted twice",
                op.id
            );
            self.tracked.push(Tracked {
                id: op.id,
                release_us,
                corrupt: decision.corrupt,
            });
        }
        self.inner.submit(op);
    }

    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize {
        let now_us = monotonic_us();
        let stall_until_us = self.control.stall_until_us.load(Ordering::Acquire);
        let FaultyDevice {
            inner,
            control,
            tracked,
            held,
            spare,
            ..
        } = self;
        let mut count = 0;
        inner.poll_completions(&mut |completion| {
            let rule = tracked
                .iter()
                .position(|t| t.id == completion.id)
                .map(|index| tracked.swap_remove(index));
            let release_us = rule.map_or(0, |t| t.release_us);
            let corrupt = rule.is_some_and(|t| t.corrupt) && completion.result.is_ok();
            if !corrupt && release_us <= now_us && stall_until_us <= now_us {
                complete(completion);
                count += 1;
                return;
            }
            let mut data = spare.pop().unwrap_or_default();
            data.clear();
            let result = completion.result.map(|bytes| data.extend_from_slice(bytes));
            if corrupt && !data.is_empty() {
                let middle = data.len() / 2;
                data[middle] ^= 0xFF;
                control.corrupted.fetch_add(1, Ordering::Relaxed);
            }
            held.push(Held {
                id: completion.id,
                release_us,
                result,
                data,
            });
        });
        // Completions that passed straight through were handed on above; the held ones whose
        // time has come follow.
        let mut index = 0;
        while index < held.len() {
            if held[index].release_us > now_us || stall_until_us > now_us {
                index += 1;
                continue;
            }
            let released = held.swap_remove(index);
            complete(DeviceCompletion {
                id: released.id,
                result: released.result.map(|()| &released.data[..]),
            });
            count += 1;
            spare.push(released.data);
        }
        count
    }

    fn inflight_count(&self) -> usize {
        self.inner.inflight_count() + self.held.len()
    }
}

impl NamespaceDevice for FaultyDevice {
    fn doorbell(&self) -> Option<Arc<dyn Doorbell>> {
        self.inner.doorbell()
    }

    fn next_deadline_us(&self) -> Option<u64> {
        // Ops an inner device without a doorbell holds complete on its next poll.
        let inner_now =
            (self.inner.doorbell().is_none() && self.inner.inflight_count() > 0).then_some(0);
        let stall_until_us = self.control.stall_until_us.load(Ordering::Acquire);
        let held = self
            .held
            .iter()
            .map(|held| held.release_us.max(stall_until_us))
            .min();
        [inner_now, held, self.inner.next_deadline_us()]
            .into_iter()
            .flatten()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmirror_engine::device::MemoryDevice;

    const SIZE_BYTES: usize = 64 * 1024;

    fn device(rules: Vec<FaultRule>) -> FaultyDevice {
        FaultyDevice::new(Box::new(MemoryDevice::new(SIZE_BYTES)), rules)
    }

    fn write(device: &mut FaultyDevice, id: u64, lba: u64, byte: u8) {
        device.submit(DeviceOp {
            id: DeviceOpId(id),
            nsid: 1,
            request: DeviceRequest::Write {
                offset_bytes: lba * SECTOR_SIZE as u64,
                data: &[byte; SECTOR_SIZE],
            },
        });
    }

    fn read(device: &mut FaultyDevice, id: u64, lba: u64) {
        device.submit(DeviceOp {
            id: DeviceOpId(id),
            nsid: 1,
            request: DeviceRequest::Read {
                offset_bytes: lba * SECTOR_SIZE as u64,
                length_bytes: SECTOR_SIZE as u32,
            },
        });
    }

    /// Every completion of one poll: (id, Ok(data) or the error).
    fn poll(device: &mut FaultyDevice) -> Vec<(u64, Result<Vec<u8>, DeviceError>)> {
        let mut out = Vec::new();
        let count = device.poll_completions(&mut |completion| {
            out.push((completion.id.0, completion.result.map(<[u8]>::to_vec)));
        });
        assert_eq!(count, out.len());
        out
    }

    /// Polls until something completes, as a reactor would (no sleeping in the device).
    fn poll_until_some(device: &mut FaultyDevice) -> Vec<(u64, Result<Vec<u8>, DeviceError>)> {
        let give_up_us = monotonic_us() + 5_000_000;
        loop {
            let out = poll(device);
            if !out.is_empty() {
                return out;
            }
            assert!(monotonic_us() < give_up_us, "nothing completed");
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }

    #[test]
    fn a_delayed_completion_is_held_for_its_delay_and_announced_by_a_deadline() {
        let mut device = device(vec![FaultRule::new(
            FaultOps::Write,
            FaultAction::Delay { delay_us: 20_000 },
        )]);
        let start_us = monotonic_us();
        write(&mut device, 1, 0, 7);
        assert!(poll(&mut device).is_empty());
        assert_eq!(device.inflight_count(), 1);
        let deadline = device
            .next_deadline_us()
            .expect("a held completion has a deadline");
        assert!(deadline >= start_us + 20_000, "{deadline} {start_us}");
        assert!(deadline <= monotonic_us() + 20_000);
        let done = poll_until_some(&mut device);
        assert!(monotonic_us() - start_us >= 20_000);
        assert_eq!(done, vec![(1, Ok(Vec::new()))]);
        assert_eq!(device.inflight_count(), 0);
        assert_eq!(device.next_deadline_us(), None);
        // Reads have no rule: they complete on the next poll.
        read(&mut device, 2, 0);
        assert_eq!(device.next_deadline_us(), Some(0));
        assert_eq!(poll(&mut device), vec![(2, Ok(vec![7; SECTOR_SIZE]))]);
        assert_eq!(device.control().counts(), (0, 1, 0));
    }

    #[test]
    fn failures_select_by_count_and_lba_and_are_not_performed() {
        let mut rule = FaultRule::new(FaultOps::Write, FaultAction::Fail);
        rule.every = 2;
        rule.lba_min = Some(8);
        rule.lba_max = Some(15);
        let mut device = device(vec![rule]);
        // LBA 0 is outside the range; LBA 8 is selected twice, the second time failed.
        write(&mut device, 1, 0, 1);
        write(&mut device, 2, 8, 2);
        write(&mut device, 3, 9, 3);
        write(&mut device, 4, 16, 4);
        let mut done = poll(&mut device);
        done.sort_by_key(|(id, _)| *id);
        assert_eq!(done.len(), 4);
        assert!(done[0].1.is_ok() && done[1].1.is_ok() && done[3].1.is_ok());
        assert_eq!(done[2].1.as_ref().unwrap_err().errno, Some(libc::EIO));
        read(&mut device, 5, 9);
        assert_eq!(
            poll(&mut device),
            vec![(5, Ok(vec![0; SECTOR_SIZE]))],
            "a failed write is not performed"
        );
        assert_eq!(device.control().counts(), (1, 0, 0));
    }

    #[test]
    fn a_window_bounds_a_rule_in_time() {
        let mut rule = FaultRule::new(FaultOps::All, FaultAction::Fail);
        rule.from_ms = Some(40);
        rule.to_ms = Some(80);
        let mut device = device(vec![rule]);
        let opened_us = device.opened_us;
        write(&mut device, 1, 0, 1);
        assert!(poll(&mut device)[0].1.is_ok(), "before the window");
        while monotonic_us() < opened_us + 50_000 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        write(&mut device, 2, 0, 1);
        assert!(poll(&mut device)[0].1.is_err(), "inside the window");
        while monotonic_us() < opened_us + 85_000 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        write(&mut device, 3, 0, 1);
        assert!(poll(&mut device)[0].1.is_ok(), "after the window");
    }

    #[test]
    fn corrupt_flips_one_byte_of_read_data_only() {
        let mut device = device(vec![FaultRule::new(FaultOps::All, FaultAction::Corrupt)]);
        write(&mut device, 1, 3, 0x5A);
        assert_eq!(poll(&mut device), vec![(1, Ok(Vec::new()))]);
        read(&mut device, 2, 3);
        let done = poll(&mut device);
        let data = done[0].1.as_ref().unwrap();
        let differing = data.iter().filter(|&&byte| byte != 0x5A).count();
        assert_eq!(differing, 1);
        assert_eq!(device.control().counts(), (0, 0, 1));
    }

    #[test]
    fn a_stall_holds_every_completion_until_it_ends() {
        let mut device = device(Vec::new());
        let control = device.control();
        let until_us = monotonic_us() + 30_000;
        control.stall_until_us(until_us);
        write(&mut device, 1, 0, 1);
        read(&mut device, 2, 0);
        assert!(poll(&mut device).is_empty());
        assert_eq!(device.inflight_count(), 2);
        assert_eq!(device.next_deadline_us(), Some(until_us));
        let mut done = poll_until_some(&mut device);
        assert!(monotonic_us() >= until_us);
        done.sort_by_key(|(id, _)| *id);
        assert_eq!(
            done,
            vec![(1, Ok(Vec::new())), (2, Ok(vec![1; SECTOR_SIZE]))]
        );
        assert_eq!(device.inflight_count(), 0);
    }

    #[test]
    fn rules_are_checked() {
        let mut rule = FaultRule::new(FaultOps::Read, FaultAction::Delay { delay_us: 0 });
        assert_eq!(rule.check().unwrap_err().0, "delay_us");
        rule.action = FaultAction::Fail;
        rule.every = 0;
        assert_eq!(rule.check().unwrap_err().0, "every");
        rule.every = 1;
        rule.lba_min = Some(9);
        rule.lba_max = Some(8);
        assert_eq!(rule.check().unwrap_err().0, "lba_max");
        rule.lba_max = None;
        rule.from_ms = Some(5);
        rule.to_ms = Some(5);
        assert_eq!(rule.check().unwrap_err().0, "to_ms");
    }
}
