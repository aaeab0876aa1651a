//! A controller's shared state (NVMe-oF dynamic controller model, Fabrics section 3.3): the registers
//! reached by Property Get/Set (CAP, VS, CC, CSTS; Base 2.0 section 3.1.4), keep-alive and queue bookkeeping.
//! The admin queue creates it at Connect; I/O queues on any poll group find it through the
//! [`crate::target::Target`] registry. Only atomics and one admin-path mutex live here: the I/O path reads
//! `closed` and stores the keep-alive time, nothing else.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

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
    io_queues: Mutex<Vec<bool>>,
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
            io_queues: Mutex::new(vec![false; io_queues_max as usize + 1]),
            io_queues_max,
            io_queue_depth_max,
        }
    }

    /// CAP (Base 2.0 figure 36): MQES, CQR, TO, CSS = NVM command set, MPSMIN = MPSMAX = 4 KiB.
    pub fn cap(&self) -> u64 {
        let mqes = u64::from(self.io_queue_depth_max - 1);
        mqes | (1 << 16) | (CAP_TIMEOUT_500MS << 24) | (1 << 37)
    }

    pub fn is_ready(&self) -> bool {
        self.csts.load(Ordering::Acquire) & CSTS_RDY != 0
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
    /// completes at once (no volatile state here: writes complete only when durable); clearing EN resets.
    pub fn set_cc(&self, value: u32) {
        let previous = self.cc.swap(value, Ordering::AcqRel);
        let mut csts = self.csts.load(Ordering::Acquire);
        if value & CC_EN != 0 {
            csts |= CSTS_RDY;
        } else {
            csts &= !CSTS_RDY;
        }
        if (value >> CC_SHN_SHIFT) & 0b11 != 0 {
            csts |= CSTS_SHST_COMPLETE;
        } else if (previous >> CC_SHN_SHIFT) & 0b11 != 0 || value & CC_EN != 0 {
            csts &= !CSTS_SHST_COMPLETE;
        }
        self.csts.store(csts, Ordering::Release);
    }

    /// Records traffic from the host (keep-alive restart).
    pub fn touch(&self, now_us: u64) {
        self.keep_alive_last_us.store(now_us, Ordering::Relaxed);
    }

    pub fn keep_alive_expired(&self, now_us: u64) -> bool {
        let kato_ms = self.kato_ms.load(Ordering::Relaxed);
        let last_us = self.keep_alive_last_us.load(Ordering::Relaxed);
        kato_ms != 0 && now_us.saturating_sub(last_us) > u64::from(kato_ms) * 1000
    }

    /// Claims I/O queue `qid` for a Connect; false if out of range or already connected.
    pub fn claim_io_queue(&self, qid: u16) -> bool {
        let granted = (self.queue_count_granted.load(Ordering::Relaxed) & 0xffff) as u16 + 1;
        let mut queues = self.io_queues.lock().expect("queue table lock");
        if qid == 0 || qid > granted || qid > self.io_queues_max || queues[qid as usize] {
            return false;
        }
        queues[qid as usize] = true;
        true
    }

    pub fn release_io_queue(&self, qid: u16) {
        let mut queues = self.io_queues.lock().expect("queue table lock");
        assert!(
            queues[qid as usize],
            "released an I/O queue that was not connected"
        );
        queues[qid as usize] = false;
    }

    pub fn io_queues_connected(&self) -> usize {
        self.io_queues
            .lock()
            .expect("queue table lock")
            .iter()
            .filter(|&&used| used)
            .count()
    }
}
