//! A queue pair's preallocated command slots and the per-queue state commands execute against.
//!
//! A [`Request`] carries one command from its CapsuleCmd to its CapsuleResp (or C2HData with SUCCESS):
//! its data buffer (in-capsule and admin data, read data), the backend write slot a write's data lands in,
//! and the headers it sends. All of it exists from Connect on; the hot path allocates nothing.

use std::sync::Arc;

use crate::controller::Controller;
use crate::pdu::{Command, Completion, Status, HEADER_BYTES_MAX};

/// Largest header a request sends (C2HData with the largest HPDA padding, or an R2T) plus its digest.
pub const REQUEST_HEADER_BYTES: usize = HEADER_BYTES_MAX;
/// A CapsuleResp with its header digest.
pub const RESPONSE_PDU_BYTES: usize = 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestState {
    Free,
    /// Receiving H2C data (in-capsule, or H2CData after an R2T).
    ReceivingData,
    /// Waiting for the backend to grant a write slot (Busy), R2T not sent yet.
    AwaitingWriteSlot,
    /// Waiting for H2CData PDUs after the R2T.
    AwaitingH2CData,
    /// A write whose data is all in the request's buffer, waiting for the backend to grant a
    /// write slot (Busy) to copy it into ([`crate::backend::Backend::ORDERED_WRITE_SLOTS`]).
    AwaitingWriteSlotWithData,
    /// Waiting for backend completions.
    Executing,
    /// An Asynchronous Event Request, held until an event occurs.
    Held,
    /// Its final PDU is queued for sending.
    Completing,
}

/// What executing a command produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send a CapsuleResp now.
    Respond(Completion),
    /// Send `data_bytes` of the request's buffer in C2HData, then the completion (or SUCCESS flag).
    RespondWithData(Completion, u32),
    /// Backend operations are outstanding; the completion is sent when the last one finishes.
    Pending,
    /// The backend said Busy: execute the command again on a later poll.
    Retry,
    /// Held (Asynchronous Event Request).
    Held,
}

pub struct Request<S> {
    pub state: RequestState,
    pub command: Command,
    pub data: Box<[u8]>,
    pub write_slot: Option<S>,
    /// H2C bytes expected and received so far.
    pub transfer_bytes: u32,
    pub received_bytes: u32,
    /// A status decided before the in-capsule data arrived (the data is drained, then this is sent).
    pub early_status: Option<Status>,
    pub tokens_pending: u16,
    /// When the outstanding backend operations finish, execute the command again instead of
    /// completing it: a deallocate with ranges left ([`crate::io`]).
    pub resume: bool,
    /// Blocks of a deallocate's ranges (in order) already handed to the backend.
    pub progress_blocks: u64,
    /// A read the backend finishes asynchronously: its token and length.
    pub read_pending: Option<(crate::backend::IoToken, u32)>,
    /// CRC32C of a write's whole data, when one data digest covered all of it (checked over
    /// the slot): handed to the backend so it need not checksum the data again.
    pub data_crc: Option<u32>,
    /// A write whose data is received into `data` and copied into a slot reserved once it is
    /// all in ([`crate::backend::Backend::ORDERED_WRITE_SLOTS`]).
    pub staged_write: bool,
    /// While its data is awaited: when the command fails for lack of it
    /// ([`crate::config::TargetConfig::data_timeout_ms`]).
    pub data_deadline_us: Option<u64>,
    pub status: Status,
    pub header: [u8; REQUEST_HEADER_BYTES],
    pub header_bytes: usize,
    pub data_bytes: u32,
    pub data_digest: [u8; 4],
    pub response: [u8; RESPONSE_PDU_BYTES],
    pub response_bytes: usize,
}

impl<S> Request<S> {
    pub fn new(data_bytes_max: usize) -> Request<S> {
        Request {
            state: RequestState::Free,
            command: Command::zeroed(),
            data: vec![0u8; data_bytes_max].into_boxed_slice(),
            write_slot: None,
            transfer_bytes: 0,
            received_bytes: 0,
            early_status: None,
            tokens_pending: 0,
            resume: false,
            progress_blocks: 0,
            read_pending: None,
            data_crc: None,
            staged_write: false,
            data_deadline_us: None,
            status: Status::SUCCESS,
            header: [0; REQUEST_HEADER_BYTES],
            header_bytes: 0,
            data_bytes: 0,
            data_digest: [0; 4],
            response: [0; RESPONSE_PDU_BYTES],
            response_bytes: 0,
        }
    }

    pub fn start(&mut self, command: Command) {
        assert_eq!(self.state, RequestState::Free);
        assert!(self.write_slot.is_none());
        self.command = command;
        self.transfer_bytes = 0;
        self.received_bytes = 0;
        self.early_status = None;
        self.tokens_pending = 0;
        self.resume = false;
        self.progress_blocks = 0;
        self.read_pending = None;
        self.data_crc = None;
        self.staged_write = false;
        self.data_deadline_us = None;
        self.status = Status::SUCCESS;
        self.data_bytes = 0;
    }
}

/// Queue-level state commands read and change: which queue this is and its controller.
pub struct QueueState {
    /// 0 = admin queue. Meaningful once `controller` is set.
    pub qid: u16,
    pub controller: Option<Arc<Controller>>,
    /// Entries (1's based) negotiated at Connect.
    pub sq_entries: u16,
    /// SQ head, advanced for every command received; reported as SQHD.
    pub sq_head: u16,
    pub sq_flow_control_disabled: bool,
    /// Request indices of outstanding Asynchronous Event Requests (admin queue), oldest first.
    pub async_event_requests: Vec<u16>,
    /// The controller's reset epoch when this I/O queue connected; a later reset closes it.
    pub reset_epoch: u32,
    pub in_capsule_data_bytes: u32,
    /// Budget of log lines about the host's bad commands on this queue pair.
    pub command_errors: crate::log_limit::LogLimit,
}

impl QueueState {
    pub fn new() -> QueueState {
        QueueState {
            qid: 0,
            controller: None,
            sq_entries: 1,
            sq_head: 0,
            sq_flow_control_disabled: false,
            async_event_requests: Vec::with_capacity(crate::config::AER_OUTSTANDING_MAX),
            reset_epoch: 0,
            in_capsule_data_bytes: crate::config::ADMIN_IN_CAPSULE_DATA_BYTES,
            command_errors: crate::log_limit::LogLimit::new(),
        }
    }

    pub fn advance_sq_head(&mut self) {
        self.sq_head = if self.sq_head + 1 >= self.sq_entries {
            0
        } else {
            self.sq_head + 1
        };
    }

    /// The completion for `cid` with the current SQHD.
    pub fn completion(&self, cid: u16, status: Status) -> Completion {
        let mut completion = Completion::new(cid, status);
        completion.sqhd = if self.sq_flow_control_disabled {
            0xffff
        } else {
            self.sq_head
        };
        completion.sqid = self.qid;
        completion
    }
}

impl Default for QueueState {
    fn default() -> Self {
        QueueState::new()
    }
}
