//! A controller's shared state (NVMe-oF dynamic controller model, Fabrics section 3.3): the registers
//! reached by Property Get/Set (CAP, VS, CC, CSTS; Base 2.0 section 3.1.4), keep-alive and queue bookkeeping,
//! and its asynchronous events. The admin queue creates it at Connect; I/O queues on any poll group find it
//! through the [`crate::target::Target`] registry. Only atomics and two admin-path mutexes live here: the
//! I/O path reads `closed` and the reset epoch and stores the keep-alive time, nothing else.
//!
//! Clearing CC.EN resets the controller (Base 2.0 section 3.7.2; on NVMe/TCP deleting an I/O queue means
//! closing its connection): the reset epoch advances, every I/O queue connected before sees it on its
//! next poll and closes, the admin queue aborts its Asynchronous Event Requests, and CSTS.RDY clears once
//! the last of those I/O queues is released, so a host that waits for RDY = 0 can connect them again.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::async_event::{AsyncEvent, AsyncEvents};
use crate::config::TRANSFER_BYTES_MAX;

/// Property offsets (Base 2.0 figure 33).
pub mod property {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1c;
}

/// The NVMe version the controller reports (1.3: the feature set implemented here).
pub const VERSION: u32 = 0x0001_0300;
/// CAP.TO in 500 ms units.
pub const CAP_TIMEOUT_500MS: u64 = 20;
/// Memory page size the host must use (CAP.MPSMIN = 0: 4 KiB).
pub const PAGE_BYTES: u32 = 4096;
const _: () = assert!(TRANSFER_BYTES_MAX.is_multiple_of(PAGE_BYTES));

/// Keep Alive Support granularity (Identify Controller KAS, in 100 ms units): 1 s.
pub const KEEP_ALIVE_SUPPORT_100MS: u16 = 10;
/// The keep-alive time is stored at most this often. Every PDU of every queue of a host touches it, and
/// those queues run on several reactors: storing on each PDU would bounce the cache line at I/O rate.
/// The stored time may therefore lag the host's last PDU by up to this much, so expiry allows that
/// much on top of KATO: a host that talks within KATO is never timed out, a silent one is found at
/// most this much later.
pub const KEEP_ALIVE_TOUCH_GRANULARITY_US: u64 = 100_000;
const _: () = assert!(KEEP_ALIVE_TOUCH_GRANULARITY_US < KEEP_ALIVE_SUPPORT_100MS as u64 * 100_000);

const CC_EN: u32 = 1 << 0;
const CC_SHN_SHIFT: u32 = 14;
const CSTS_RDY: u32 = 1 << 0;
const CSTS_SHST_COMPLETE: u32 = 0b10 << 2;

/// Which kind of controller a Connect created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerKind {
    /// An I/O controller of `config.subsystems[index]`.
    Nvm {
        subsystem_index: usize,
    },
    Discovery,
}

/// What a CC write did to the controller's enable state.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CcEffect {
    /// EN 0 -> 1: the controller is ready at once.
    Enabled,
    /// EN 1 -> 0: a controller reset began; the admin queue aborts its Asynchronous Event Requests.
    Reset,
    /// EN unchanged.
    Unchanged,
}

/// Why an I/O queue Connect could not claim its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRefused {
    /// CC.EN or CSTS.RDY is 0 (disabled, or a reset in progress).
    NotReady,
    /// QID 0, beyond the granted queues, or already connected.
    InvalidQueue,
}

pub struct Controller {
    pub cntlid: u16,
    pub kind: ControllerKind,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// Keep-alive timeout, 0 = disabled.
    pub kato_ms: AtomicU32,
    pub keep_alive_last_us: AtomicU64,
    cc: AtomicU32,
    csts: AtomicU32,
    /// Set Features Number of Queues result: NSQA | NCQA << 16 (0's based).
    pub queue_count_granted: AtomicU32,
    pub async_event_config: AtomicU32,
    /// Set when the admin queue went away or keep-alive expired: every queue of the controller closes.
    pub closed: AtomicBool,
    /// Controller resets so far: an I/O queue connected under an older epoch closes.
    reset_epoch: AtomicU32,
    /// Also serializes CC writes with I/O queue claims and releases, so CSTS.RDY and the queue set agree.
    io_queues: Mutex<Vec<bool>>,
    async_events: Mutex<AsyncEvents>,
    /// Mirrors `async_events.has_pending()` so the admin queue polls without the lock.
    async_event_pending: AtomicBool,
    pub io_queues_max: u16,
    pub io_queue_depth_max: u16,
}

impl Controller {
    pub fn new(
        cntlid: u16,
        kind: ControllerKind,
        subnqn: String,
        hostnqn: String,
        hostid: [u8; 16],
        io_queues_max: u16,
        io_queue_depth_max: u16,
    ) -> Controller {
        let queues = u32::from(io_queues_max - 1);
        Controller {
            cntlid,
            kind,
            subnqn,
            hostnqn,
            hostid,
            kato_ms: AtomicU32::new(0),
            keep_alive_last_us: AtomicU64::new(0),
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            queue_count_granted: AtomicU32::new(queues | (queues << 16)),
            async_event_config: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            reset_epoch: AtomicU32::new(0),
            io_queues: Mutex::new(vec![false; io_queues_max as usize + 1]),
            async_events: Mutex::new(AsyncEvents::new()),
            async_event_pending: AtomicBool::new(false),
            io_queues_max,
            io_queue_depth_max,
        }
    }

    /// CAP (Base 2.0 figure 36): MQES, CQR, TO, CSS = NVM command set, MPSMIN = MPSMAX = 4 KiB.
    pub fn cap(&self) -> u64 {
        let mqes = u64::from(self.io_queue_depth_max - 1);
        mqes | (1 << 16) | (CAP_TIMEOUT_500MS << 24) | (1 << 37)
    }

    /// Enabled and ready: commands other than Fabrics ones execute, I/O queues may connect.
    pub fn is_ready(&self) -> bool {
        self.cc.load(Ordering::Acquire) & CC_EN != 0
            && self.csts.load(Ordering::Acquire) & CSTS_RDY != 0
    }

    /// Controller resets so far (see the module doc).
    pub fn reset_epoch(&self) -> u32 {
        self.reset_epoch.load(Ordering::Acquire)
    }

    /// Property Get; `None` for an offset the controller does not have (or a wrong size).
    pub fn property_get(&self, offset: u32, eight_bytes: bool) -> Option<u64> {
        match (offset, eight_bytes) {
            (property::CAP, true) => Some(self.cap()),
            (property::VS, false) => Some(u64::from(VERSION)),
            (property::CC, false) => Some(u64::from(self.cc.load(Ordering::Acquire))),
            (property::CSTS, false) => Some(u64::from(self.csts.load(Ordering::Acquire))),
            _ => None,
        }
    }

    /// Property Set of CC: enabling makes the controller ready at once; a shutdown notification
    /// completes at once (no volatile state here: writes complete only when durable); clearing EN resets
    /// (module doc), and CSTS.RDY stays 1 until the I/O queues connected before are released.
    pub fn set_cc(&self, value: u32) -> CcEffect {
        let queues = self.io_queues.lock().expect("queue table lock");
        let previous = self.cc.swap(value, Ordering::AcqRel);
        let effect = match (previous & CC_EN != 0, value & CC_EN != 0) {
            (false, true) => CcEffect::Enabled,
            (true, false) => CcEffect::Reset,
            _ => CcEffect::Unchanged,
        };
        let mut csts = self.csts.load(Ordering::Acquire);
        match effect {
            CcEffect::Enabled => csts |= CSTS_RDY,
            CcEffect::Reset => {
                self.reset_epoch.fetch_add(1, Ordering::AcqRel);
                if !queues.contains(&true) {
                    csts &= !CSTS_RDY;
                }
                self.with_async_events(AsyncEvents::reset);
            }
            CcEffect::Unchanged => {}
        }
        if (value >> CC_SHN_SHIFT) & 0b11 != 0 {
            csts |= CSTS_SHST_COMPLETE;
        } else if (previous >> CC_SHN_SHIFT) & 0b11 != 0 || value & CC_EN != 0 {
            csts &= !CSTS_SHST_COMPLETE;
        }
        self.csts.store(csts, Ordering::Release);
        effect
    }

    /// Records traffic from the host (keep-alive restart). Stores only when the stored time is older
    /// than [`KEEP_ALIVE_TOUCH_GRANULARITY_US`], so the I/O path mostly just reads a shared line.
    pub fn touch(&self, now_us: u64) {
        let last_us = self.keep_alive_last_us.load(Ordering::Relaxed);
        if now_us.saturating_sub(last_us) >= KEEP_ALIVE_TOUCH_GRANULARITY_US {
            self.keep_alive_last_us.store(now_us, Ordering::Relaxed);
        }
    }

    /// KATO passed without traffic, allowing for the lag of [`Controller::touch`].
    pub fn keep_alive_expired(&self, now_us: u64) -> bool {
        let kato_ms = self.kato_ms.load(Ordering::Relaxed);
        let last_us = self.keep_alive_last_us.load(Ordering::Relaxed);
        kato_ms != 0
            && now_us.saturating_sub(last_us)
                > u64::from(kato_ms) * 1000 + KEEP_ALIVE_TOUCH_GRANULARITY_US
    }

    /// Claims I/O queue `qid` for a Connect and returns the reset epoch the queue lives in.
    pub fn claim_io_queue(&self, qid: u16) -> Result<u32, ClaimRefused> {
        let granted = (self.queue_count_granted.load(Ordering::Relaxed) & 0xffff) as u16 + 1;
        let mut queues = self.io_queues.lock().expect("queue table lock");
        if !self.is_ready() {
            return Err(ClaimRefused::NotReady);
        }
        if qid == 0 || qid > granted || qid > self.io_queues_max || queues[qid as usize] {
            return Err(ClaimRefused::InvalidQueue);
        }
        queues[qid as usize] = true;
        Ok(self.reset_epoch())
    }

    /// The connection of I/O queue `qid` is gone; the last one to go completes a reset (CSTS.RDY = 0).
    pub fn release_io_queue(&self, qid: u16) {
        let mut queues = self.io_queues.lock().expect("queue table lock");
        assert!(
            queues[qid as usize],
            "released an I/O queue that was not connected"
        );
        queues[qid as usize] = false;
        if self.cc.load(Ordering::Acquire) & CC_EN == 0 && !queues.contains(&true) {
            self.csts.fetch_and(!CSTS_RDY, Ordering::AcqRel);
        }
    }

    pub fn io_queues_connected(&self) -> usize {
        self.io_queues
            .lock()
            .expect("queue table lock")
            .iter()
            .filter(|&&used| used)
            .count()
    }

    /// Runs `change` on the asynchronous event state (admin path), keeping the flag the admin queue
    /// polls in step.
    pub fn with_async_events<R>(&self, change: impl FnOnce(&mut AsyncEvents) -> R) -> R {
        let mut events = self.async_events.lock().expect("async event lock");
        let result = change(&mut events);
        self.async_event_pending
            .store(events.has_pending(), Ordering::Release);
        result
    }

    /// Namespace `nsid` changed: listed in the Changed Namespace List, notice raised if enabled.
    pub fn namespace_changed(&self, nsid: u32) {
        let config = self.async_event_config.load(Ordering::Relaxed);
        let raised = self.with_async_events(|events| events.namespace_changed(nsid, config));
        log::info!(
            "nvmf: controller {}: namespace {nsid} changed{}",
            self.cntlid,
            if raised { ", notice raised" } else { "" }
        );
    }

    /// The oldest queued event, for an outstanding Asynchronous Event Request.
    pub fn take_async_event(&self) -> Option<AsyncEvent> {
        if !self.async_event_pending.load(Ordering::Acquire) {
            return None;
        }
        self.with_async_events(AsyncEvents::next_event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_touch_stores_only_when_stale_and_expiry_allows_for_it() {
        let controller = Controller::new(
            1,
            ControllerKind::Discovery,
            String::new(),
            String::new(),
            [0; 16],
            2,
            128,
        );
        controller.kato_ms.store(300, Ordering::Relaxed);
        controller.touch(1_000_000);
        assert_eq!(
            controller.keep_alive_last_us.load(Ordering::Relaxed),
            1_000_000
        );
        controller.touch(1_000_000 + KEEP_ALIVE_TOUCH_GRANULARITY_US - 1);
        assert_eq!(
            controller.keep_alive_last_us.load(Ordering::Relaxed),
            1_000_000
        );
        // The host's last PDU came just under one granularity after the stored time: not expired
        // until KATO after that PDU.
        let last_pdu_us = 1_000_000 + KEEP_ALIVE_TOUCH_GRANULARITY_US - 1;
        assert!(!controller.keep_alive_expired(last_pdu_us + 300_000));
        assert!(controller
            .keep_alive_expired(1_000_000 + 300_000 + KEEP_ALIVE_TOUCH_GRANULARITY_US + 1));
        controller.touch(1_000_000 + KEEP_ALIVE_TOUCH_GRANULARITY_US);
        assert_eq!(
            controller.keep_alive_last_us.load(Ordering::Relaxed),
            1_000_000 + KEEP_ALIVE_TOUCH_GRANULARITY_US
        );
    }
}
