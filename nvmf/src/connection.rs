//! One NVMe/TCP queue pair on a socket: the receive state machine (NVMe/TCP 1.0 sections 3.3, 3.6).
//!
//! Receiving follows SPDK's shape: one large read per poll into a per-connection buffer, headers parsed
//! from it; while a data phase is pending the read goes straight into the destination (the backend's
//! write slot or the request's buffer) with the staging buffer behind it for the PDUs that follow.
//! A protocol error queues a C2HTermReq with its FES/FEI and closes the connection after flushing it;
//! a command error is an NVMe status. Sending and completions are in [`crate::send`].

use std::collections::VecDeque;
use std::io::{self, IoSliceMut, Read};
use std::net::{SocketAddr, TcpStream};

use crate::backend::Backend;
use crate::config::{ADMIN_IN_CAPSULE_DATA_BYTES, TRANSFER_BYTES_MAX};
use crate::pdu::{
    decode, CommonHeader, DataHeader, DataLocation, Direction, Fes, Framing, ICReq, ICResp, Pdu,
    PduError, COMMON_HEADER_BYTES, PDU_FORMAT_VERSION, TERM_REQ_ERROR_DATA_BYTES_MAX,
    TERM_REQ_PDU_BYTES_MAX,
};
use crate::poll_group::Context;
use crate::request::{Request, RequestState};
use crate::send::SendItem;

/// Receive staging buffer: room for many small PDUs per read. One read per pass, so this bounds
/// the writes a pass takes in: a queue of [`RECV_BATCH_WRITES`] 4 KiB in-capsule writes (a
/// capsule header and 4 KiB each) fits whole, and their transfer, acknowledgement and responses
/// are one syscall each for all of them. At 64 KiB a QD 32 host's writes took two passes, and
/// every per-pass syscall was paid twice.
pub const RECV_BUFFER_BYTES: usize = 256 * 1024;
/// The queue depth whose 4 KiB in-capsule writes [`RECV_BUFFER_BYTES`] takes in one read.
pub const RECV_BATCH_WRITES: usize = 32;
const _: () =
    assert!(RECV_BUFFER_BYTES >= RECV_BATCH_WRITES * (crate::pdu::HEADER_BYTES_MAX + 4096));
/// How long a closing connection may take to flush its TermReq before the socket is dropped.
pub const CLOSE_LINGER_US: u64 = 1_000_000;
/// How long a new connection may take to send its ICReq.
pub const ICREQ_TIMEOUT_US: u64 = 10_000_000;
/// How often a connection looks for commands whose data is overdue
/// ([`crate::config::TargetConfig::data_timeout_ms`]).
pub const DATA_TIMEOUT_CHECK_PERIOD_US: u64 = 50_000;
/// An idle, connected admin queue is read at most this often: it carries no I/O, and a receive
/// syscall per reactor pass on it would sit in front of every I/O completion.
pub const ADMIN_RECEIVE_PERIOD_US: u64 = 200;
const _: () = assert!(
    RECV_BUFFER_BYTES >= crate::pdu::HEADER_BYTES_MAX + ADMIN_IN_CAPSULE_DATA_BYTES as usize
);
/// The connection's own PDUs (ICResp, C2HTermReq) are built here: room for the longest.
pub const CONTROL_PDU_BYTES: usize = if TERM_REQ_PDU_BYTES_MAX > ICRESP_BYTES {
    TERM_REQ_PDU_BYTES_MAX
} else {
    ICRESP_BYTES
};
const ICRESP_BYTES: usize = crate::pdu::PduType::ICResp.shape().hlen as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    AwaitICReq {
        deadline_us: u64,
    },
    Ready,
    /// Flushing what is queued (a TermReq, maybe), then closed.
    Closing {
        deadline_us: u64,
    },
    Closed,
}

/// Where the bytes of the current data phase go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataTarget {
    WriteSlot,
    RequestBuffer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvState {
    Header,
    Data {
        index: u16,
        target: DataTarget,
        start: u32,
        offset: u32,
        end: u32,
        digest: bool,
    },
    DataDigest {
        index: u16,
        target: DataTarget,
        start: u32,
        end: u32,
    },
    /// An in-capsule write waits for a backend write slot; its data stays in the socket.
    AwaitWriteSlot {
        index: u16,
        location: DataLocation,
    },
}

enum Step {
    Progress,
    NeedBytes,
    Stop,
}

pub struct Connection<B: Backend> {
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) phase: Phase,
    /// What PDUs from the host carry (digests; CPDA 0).
    pub(crate) framing_receive: Framing,
    /// What PDUs to the host carry (digests; the host's HPDA).
    pub(crate) framing_send: Framing,
    recv: Box<[u8]>,
    recv_start: usize,
    recv_end: usize,
    pub(crate) recv_state: RecvState,
    pub(crate) queue: crate::request::QueueState,
    pub(crate) requests: Vec<Request<B::WriteSlot>>,
    pub(crate) free: Vec<u16>,
    /// Requests to execute again (backend Busy), in arrival order.
    pub(crate) retry: Vec<u16>,
    pub(crate) send: VecDeque<SendItem>,
    pub(crate) send_offset: usize,
    pub(crate) control: [u8; CONTROL_PDU_BYTES],
    pub(crate) control_bytes: usize,
    recv_budget_pdus: usize,
    /// Not read before this time (see [`ADMIN_RECEIVE_PERIOD_US`]).
    receive_due_us: u64,
    /// How long a command's data may take ([`crate::config::TargetConfig::data_timeout_ms`]).
    pub(crate) data_timeout_us: u64,
    /// Overdue data is looked for next at this time.
    data_check_due_us: u64,
}

impl<B: Backend> Connection<B> {
    pub fn new(
        stream: TcpStream,
        now_us: u64,
        recv_budget_pdus: usize,
        data_timeout_us: u64,
    ) -> io::Result<Connection<B>> {
        assert!(recv_budget_pdus > 0 && data_timeout_us > 0);
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        let requests = vec![Request::new(ADMIN_IN_CAPSULE_DATA_BYTES as usize)];
        Ok(Connection {
            stream,
            peer,
            phase: Phase::AwaitICReq {
                deadline_us: now_us + ICREQ_TIMEOUT_US,
            },
            framing_receive: Framing::PLAIN,
            framing_send: Framing::PLAIN,
            recv: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            recv_start: 0,
            recv_end: 0,
            recv_state: RecvState::Header,
            queue: crate::request::QueueState::new(),
            requests,
            free: vec![0],
            retry: Vec::with_capacity(1),
            send: VecDeque::with_capacity(8),
            send_offset: 0,
            control: [0; CONTROL_PDU_BYTES],
            control_bytes: 0,
            recv_budget_pdus,
            receive_due_us: 0,
            data_timeout_us,
            data_check_due_us: now_us + DATA_TIMEOUT_CHECK_PERIOD_US,
        })
    }

    /// Sizes the request pool for the queue Connect created (admin path: runs once per connection).
    pub(crate) fn provision(&mut self, entries: u16, data_bytes_max: usize) {
        assert!(self.requests.len() == 1 && entries >= 1);
        self.requests[0].data = vec![0u8; data_bytes_max].into_boxed_slice();
        self.requests.reserve_exact(entries as usize - 1);
        self.free.reserve_exact(entries as usize);
        for index in 1..entries {
            self.requests.push(Request::new(data_bytes_max));
            self.free.push(index);
        }
        self.free.reverse();
        self.retry.reserve_exact(entries as usize);
        self.send.reserve(entries as usize * 3 + 4);
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// A connection-fatal protocol error: log it, queue a C2HTermReq quoting the offending header
    /// (as much of it as `header` holds, at most [`TERM_REQ_ERROR_DATA_BYTES_MAX`]), close.
    pub(crate) fn fail(&mut self, error: PduError, header: &[u8], now_us: u64) {
        log::warn!("nvmf: {}: closing connection: {error}", self.peer);
        let term = crate::pdu::TermReq {
            fes: error.fes as u16,
            fei: error.fei,
        };
        let header = &header[..header.len().min(TERM_REQ_ERROR_DATA_BYTES_MAX)];
        self.control_bytes =
            term.encode_into(&mut self.control, crate::pdu::PduType::C2HTermReq, header);
        assert!(self.control_bytes <= TERM_REQ_PDU_BYTES_MAX);
        self.send.push_back(SendItem::Control);
        self.phase = Phase::Closing {
            deadline_us: now_us + CLOSE_LINGER_US,
        };
    }

    /// Fails the first command whose data is overdue and closes the connection; returns whether
    /// it did. Looked at every [`DATA_TIMEOUT_CHECK_PERIOD_US`].
    ///
    /// The command completes with Command Transient Transport Error (NVMe Base 2.0 figure 101,
    /// generic status 22h: the transport lost the command; DNR clear, so the host retries it).
    /// The connection cannot go on: the host may still send H2CData for the transfer tag (the
    /// request slot) this drops, which a later command may reuse. So a C2HTermReq follows, with
    /// PDU Sequence Error (NVMe/TCP 1.0 figure 27: the expected H2CData PDUs did not come), and
    /// the connection closes (NVMe/TCP 1.0 figure 28: the C2HTermReq a controller sends before it
    /// closes the connection). Its other requests are released at teardown, write slots aborted.
    pub(crate) fn poll_data_timeouts(&mut self, context: &mut Context<'_, B>) -> usize {
        if context.now_us < self.data_check_due_us || self.phase != Phase::Ready {
            return 0;
        }
        self.data_check_due_us = context.now_us + DATA_TIMEOUT_CHECK_PERIOD_US;
        let overdue = self.requests.iter().position(|request| {
            matches!(
                request.state,
                RequestState::AwaitingH2CData | RequestState::ReceivingData
            ) && request
                .data_deadline_us
                .is_some_and(|deadline_us| context.now_us >= deadline_us)
        });
        let Some(index) = overdue else {
            return 0;
        };
        let request = &mut self.requests[index];
        log::warn!(
            "nvmf: {}: cid {}: {} of {} data bytes arrived within {} ms",
            self.peer,
            request.command.cid(),
            request.received_bytes,
            request.transfer_bytes,
            self.data_timeout_us / 1000
        );
        request.data_deadline_us = None;
        if let Some(slot) = request.write_slot.take() {
            let _ignored: crate::backend::IoToken =
                context.backend.abort_write(context.now_us, slot);
        }
        let status = crate::pdu::GenericStatus::TransientTransportError.into();
        let completion = self.queue.completion(request.command.cid(), status);
        self.queue_response(index as u16, &completion);
        let error = PduError::new(Fes::PduSequenceError, "command data did not arrive in time");
        self.fail(error, &[], context.now_us);
        1
    }

    /// Closes without a TermReq (peer closed, socket error, controller gone).
    pub(crate) fn close(&mut self, reason: &str) {
        if self.phase != Phase::Closed {
            log::info!("nvmf: {}: connection closed: {reason}", self.peer);
        }
        self.phase = Phase::Closed;
    }

    /// Receives and handles up to the recv budget of PDUs with at most one read. Returns PDUs handled.
    /// [`Connection::poll_receive`], except that an idle admin queue is read only every
    /// [`ADMIN_RECEIVE_PERIOD_US`].
    pub fn poll_receive_paced(&mut self, context: &mut Context<'_, B>) -> usize {
        if context.now_us < self.receive_due_us {
            return 0;
        }
        let handled = self.poll_receive(context);
        let admin = self.queue.qid == 0 && self.queue.controller.is_some();
        if handled == 0 && admin && self.phase == Phase::Ready {
            self.receive_due_us = context.now_us + ADMIN_RECEIVE_PERIOD_US;
        }
        handled
    }

    pub fn poll_receive(&mut self, context: &mut Context<'_, B>) -> usize {
        let mut handled = 0;
        let mut read_done = false;
        while handled < self.recv_budget_pdus
            && matches!(self.phase, Phase::AwaitICReq { .. } | Phase::Ready)
        {
            match self.step(context) {
                Step::Progress => handled += 1,
                Step::Stop => break,
                Step::NeedBytes if read_done => break,
                Step::NeedBytes => {
                    read_done = true;
                    match self.read_once(context.backend) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(error) => {
                            self.close(&format!("read: {error}"));
                            break;
                        }
                    }
                }
            }
        }
        handled
    }

    /// One read: straight into the pending data destination (plus staging behind it), or into staging.
    fn read_once(&mut self, backend: &mut B) -> io::Result<usize> {
        let result = if let RecvState::Data {
            index,
            target,
            offset,
            end,
            ..
        } = self.recv_state
        {
            assert_eq!(
                self.recv_start, self.recv_end,
                "buffered bytes are consumed before a direct read"
            );
            self.recv_start = 0;
            self.recv_end = 0;
            let request = &mut self.requests[index as usize];
            let destination = match target {
                DataTarget::WriteSlot => {
                    backend.write_buffer(request.write_slot.as_ref().expect("write slot"))
                }
                DataTarget::RequestBuffer => &mut request.data[..],
            };
            let mut slices = [
                IoSliceMut::new(&mut destination[offset as usize..end as usize]),
                IoSliceMut::new(&mut self.recv),
            ];
            let result = self.stream.read_vectored(&mut slices);
            if let Ok(count) = result {
                let direct = count.min((end - offset) as usize);
                self.recv_end = count - direct;
                if let RecvState::Data { offset, .. } = &mut self.recv_state {
                    *offset += direct as u32;
                }
            }
            result
        } else {
            if self.recv_start > 0 {
                self.recv.copy_within(self.recv_start..self.recv_end, 0);
                self.recv_end -= self.recv_start;
                self.recv_start = 0;
            }
            let result = self.stream.read(&mut self.recv[self.recv_end..]);
            if let Ok(count) = result {
                self.recv_end += count;
            }
            result
        };
        match result {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection",
            )),
            Ok(count) => Ok(count),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(error) => Err(error),
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.recv[self.recv_start..self.recv_end]
    }

    fn step(&mut self, context: &mut Context<'_, B>) -> Step {
        match self.recv_state {
            RecvState::Header => self.step_header(context),
            RecvState::Data {
                index,
                target,
                start,
                offset,
                end,
                digest,
            } => {
                let available = self.recv_end - self.recv_start;
                let count = available.min((end - offset) as usize);
                if count > 0 {
                    let source = &self.recv[self.recv_start..self.recv_start + count];
                    let request = &mut self.requests[index as usize];
                    match target {
                        DataTarget::WriteSlot => context.backend.fill_write(
                            request.write_slot.as_ref().expect("write slot"),
                            offset as usize,
                            source,
                        ),
                        DataTarget::RequestBuffer => request.data
                            [offset as usize..offset as usize + count]
                            .copy_from_slice(source),
                    }
                    self.recv_start += count;
                }
                let offset = offset + count as u32;
                if offset < end {
                    self.recv_state = RecvState::Data {
                        index,
                        target,
                        start,
                        offset,
                        end,
                        digest,
                    };
                    return Step::NeedBytes;
                }
                if digest {
                    self.recv_state = RecvState::DataDigest {
                        index,
                        target,
                        start,
                        end,
                    };
                    return Step::Progress;
                }
                self.recv_state = RecvState::Header;
                self.data_received(index, true, context);
                Step::Progress
            }
            RecvState::DataDigest {
                index,
                target,
                start,
                end,
            } => {
                if self.recv_end - self.recv_start < 4 {
                    return Step::NeedBytes;
                }
                let received =
                    u32::from_le_bytes(self.buffered()[..4].try_into().expect("4 bytes"));
                self.recv_start += 4;
                let request = &mut self.requests[index as usize];
                let data = match target {
                    DataTarget::WriteSlot => &context
                        .backend
                        .write_buffer(request.write_slot.as_ref().expect("write slot"))[..],
                    DataTarget::RequestBuffer => &request.data[..],
                };
                let intact = crate::pdu::crc32c(&data[start as usize..end as usize]) == received;
                // One digest over a write's whole data is that data's CRC: the backend takes it
                // (a staged write's data is copied into its slot unchanged).
                let write = target == DataTarget::WriteSlot || request.staged_write;
                let whole = start == 0 && end == request.transfer_bytes;
                if intact && write && whole {
                    request.data_crc = Some(received);
                }
                if !intact {
                    self.queue.command_errors.log(
                        context.now_us,
                        log::Level::Warn,
                        format_args!("{}", self.peer),
                        format_args!("data digest error on cid {}", request.command.cid()),
                    );
                }
                self.recv_state = RecvState::Header;
                self.data_received(index, intact, context);
                Step::Progress
            }
            RecvState::AwaitWriteSlot { index, location } => {
                if self.retry_in_capsule_write(index, location, context) {
                    Step::Progress
                } else {
                    Step::Stop
                }
            }
        }
    }

    fn step_header(&mut self, context: &mut Context<'_, B>) -> Step {
        let buffered = self.recv_end - self.recv_start;
        if buffered < COMMON_HEADER_BYTES {
            return Step::NeedBytes;
        }
        let common = CommonHeader::parse(self.buffered());
        let checked = common.check(Direction::HostToController, &self.framing_receive);
        let location = match checked {
            Ok((_, location)) => location,
            Err(error) => {
                self.fail_quoting(error, self.recv_start, common.hlen, context.now_us);
                return Step::Stop;
            }
        };
        if buffered < common.header_bytes() {
            return Step::NeedBytes;
        }
        let header_end = self.recv_start + common.header_bytes();
        let decoded = decode(
            &self.recv[self.recv_start..header_end],
            Direction::HostToController,
            &self.framing_receive,
        );
        let pdu = match decoded {
            Ok((pdu, _)) => pdu,
            Err(error) => {
                self.fail_quoting(error, self.recv_start, common.hlen, context.now_us);
                return Step::Stop;
            }
        };
        // Padding between the header digest and PDO is skipped with the header.
        let consumed = if location.length > 0 {
            location.offset as usize
        } else {
            common.header_bytes()
        };
        if self.recv_end - self.recv_start < consumed {
            return Step::NeedBytes;
        }
        let header_start = self.recv_start;
        self.recv_start += consumed;
        // Handling a PDU reads nothing from the socket: its header is still in `recv`.
        if let Err(error) = self.handle_pdu(pdu, location, context) {
            self.fail_quoting(error, header_start, common.hlen, context.now_us);
            return Step::Stop;
        }
        Step::Progress
    }

    /// [`Connection::fail`] quoting the header that starts at `recv[start]`: up to `hlen` bytes,
    /// as many as were received.
    fn fail_quoting(&mut self, error: PduError, start: usize, hlen: u8, now_us: u64) {
        let mut quoted = [0u8; TERM_REQ_ERROR_DATA_BYTES_MAX];
        let length = (hlen as usize)
            .min(self.recv_end - start)
            .min(TERM_REQ_ERROR_DATA_BYTES_MAX);
        quoted[..length].copy_from_slice(&self.recv[start..start + length]);
        self.fail(error, &quoted[..length], now_us);
    }

    fn handle_pdu(
        &mut self,
        pdu: Pdu,
        location: DataLocation,
        context: &mut Context<'_, B>,
    ) -> Result<(), PduError> {
        if let Some(controller) = &self.queue.controller {
            controller.touch(context.now_us);
        }
        match (self.phase, pdu) {
            (Phase::AwaitICReq { .. }, Pdu::ICReq(icreq)) => {
                self.accept_icreq(icreq);
                Ok(())
            }
            (Phase::AwaitICReq { .. }, _) | (_, Pdu::ICReq(_)) => Err(PduError::new(
                Fes::PduSequenceError,
                "ICReq must be the first PDU, and only once",
            )),
            (_, Pdu::H2CTermReq(term)) => {
                log::warn!(
                    "nvmf: {}: host terminated the connection: FES {:#x} FEI {}",
                    self.peer,
                    term.fes,
                    term.fei
                );
                self.close("H2CTermReq");
                Ok(())
            }
            (_, Pdu::CapsuleCmd(command)) => self.on_capsule(command, location, context),
            (_, Pdu::H2CData(data)) => self.on_h2c_data(data, location),
            (_, _) => unreachable!("CommonHeader::check admits only host-to-controller PDUs"),
        }
    }

    fn accept_icreq(&mut self, icreq: ICReq) {
        self.framing_receive = Framing {
            header_digest: icreq.header_digest,
            data_digest: icreq.data_digest,
            pda: 0,
        };
        self.framing_send = Framing {
            pda: icreq.hpda,
            ..self.framing_receive
        };
        let icresp = ICResp {
            pfv: PDU_FORMAT_VERSION,
            cpda: 0,
            header_digest: icreq.header_digest,
            data_digest: icreq.data_digest,
            maxh2cdata: TRANSFER_BYTES_MAX,
        };
        self.control_bytes = icresp.encode_into(&mut self.control);
        self.send.push_back(SendItem::Control);
        self.phase = Phase::Ready;
        log::debug!(
            "nvmf: {}: ICReq hdgst={} ddgst={} hpda={}",
            self.peer,
            icreq.header_digest,
            icreq.data_digest,
            icreq.hpda
        );
    }

    /// Data of one PDU for request `index` arrived (`intact` = its digest matched or there was none).
    fn data_received(&mut self, index: u16, intact: bool, context: &mut Context<'_, B>) {
        let request = &mut self.requests[index as usize];
        if !intact {
            // NVMe/TCP 1.0 section 3.6.2.5.2: a data digest error fails the command, not the connection.
            request.early_status = Some(crate::pdu::GenericStatus::TransientTransportError.into());
        }
        if request.state == RequestState::AwaitingH2CData {
            return;
        }
        self.on_data_complete(index, context);
    }

    fn on_h2c_data(&mut self, data: DataHeader, location: DataLocation) -> Result<(), PduError> {
        let index = data.ttag;
        let valid_tag = (index as usize) < self.requests.len()
            && self.requests[index as usize].state == RequestState::AwaitingH2CData;
        if !valid_tag {
            return Err(PduError::field(10, "H2CData for an unknown transfer tag"));
        }
        let request = &mut self.requests[index as usize];
        if request.command.cid() != data.cccid {
            return Err(PduError::field(
                8,
                "H2CData CCCID does not match the transfer tag",
            ));
        }
        if data.datal > TRANSFER_BYTES_MAX {
            return Err(PduError::new(
                Fes::DataTransferLimitExceeded,
                "H2CData larger than MAXH2CDATA",
            ));
        }
        if data.datao != request.received_bytes || data.datao + data.datal > request.transfer_bytes
        {
            return Err(PduError::new(
                Fes::DataTransferOutOfRange,
                "H2CData outside the R2T range",
            ));
        }
        request.received_bytes += data.datal;
        let target = if request.write_slot.is_some() {
            DataTarget::WriteSlot
        } else {
            DataTarget::RequestBuffer
        };
        let start = data.datao;
        let end = data.datao + location.length;
        if request.received_bytes == request.transfer_bytes {
            request.state = RequestState::ReceivingData;
        }
        self.recv_state = RecvState::Data {
            index,
            target,
            start,
            offset: start,
            end,
            digest: location.digest,
        };
        Ok(())
    }
}
