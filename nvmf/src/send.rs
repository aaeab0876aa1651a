//! The send side of a queue pair: PDUs are only queued (headers encoded into the request's own buffers,
//! data left where it is) and each poll flushes the socket once with one writev of up to
//! [`IOVECS_PER_FLUSH`] slices. A read completes with a C2HData carrying the SUCCESS flag when the host
//! disabled SQ flow control (NVMe/TCP 1.0 section 3.6.2.8), otherwise with C2HData then CapsuleResp.

use std::io::{self, IoSlice, Write};

use crate::backend::{Backend, BackendError, IoToken};
use crate::connection::{Connection, Phase};
use crate::pdu::{encode_capsule_resp, Completion, DataHeader, PduType, Status, R2T};
use crate::poll_group::Context;
use crate::request::{Outcome, RequestState};

/// Most slices handed to one writev (SPDK's limit).
pub const IOVECS_PER_FLUSH: usize = 64;

/// A queued PDU; the bytes live in the connection's control buffer or in request `u16`'s buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendItem {
    /// ICResp or C2HTermReq.
    Control,
    R2T(u16),
    /// C2HData; `true` when it carries the SUCCESS flag and so completes the command.
    C2HData(u16, bool),
    Response(u16),
}

impl<B: Backend> Connection<B> {
    /// Acts on what a command's execution produced.
    pub(crate) fn finish(&mut self, index: u16, outcome: Outcome) {
        let request = &mut self.requests[index as usize];
        match outcome {
            Outcome::Respond(completion) => self.queue_response(index, &completion),
            Outcome::RespondWithData(completion, data_bytes) => {
                self.queue_c2h_data(index, completion, data_bytes)
            }
            Outcome::Pending | Outcome::Retry => request.state = RequestState::Executing,
            Outcome::Held => request.state = RequestState::Held,
        }
    }

    pub(crate) fn queue_response(&mut self, index: u16, completion: &Completion) {
        let request = &mut self.requests[index as usize];
        assert_eq!(completion.cid, request.command.cid());
        request.response_bytes =
            encode_capsule_resp(&mut request.response, completion, &self.framing_send);
        request.state = RequestState::Completing;
        self.send.push_back(SendItem::Response(index));
    }

    fn queue_c2h_data(&mut self, index: u16, completion: Completion, data_bytes: u32) {
        if data_bytes == 0 {
            self.queue_response(index, &completion);
            return;
        }
        let success = self.queue.sq_flow_control_disabled && completion.status.is_success();
        let request = &mut self.requests[index as usize];
        let header = DataHeader {
            cccid: completion.cid,
            ttag: 0,
            datao: 0,
            datal: data_bytes,
            last: true,
            success,
        };
        request.header_bytes =
            header.encode_into(&mut request.header, PduType::C2HData, &self.framing_send);
        request.data_bytes = data_bytes;
        if self.framing_send.data_digest {
            let digest = crate::pdu::crc32c(&request.data[..data_bytes as usize]);
            request.data_digest = digest.to_le_bytes();
        }
        request.state = RequestState::Completing;
        self.send.push_back(SendItem::C2HData(index, success));
        if !success {
            self.queue_response(index, &completion);
        }
    }

    pub(crate) fn queue_r2t(&mut self, index: u16) {
        let request = &mut self.requests[index as usize];
        let r2t = R2T {
            cccid: request.command.cid(),
            ttag: index,
            r2to: 0,
            r2tl: request.transfer_bytes,
        };
        request.received_bytes = 0;
        request.header_bytes = r2t.encode_into(&mut request.header, &self.framing_send);
        self.send.push_back(SendItem::R2T(index));
    }

    /// A backend operation of request `index` finished; the last one sends the completion, or
    /// queues the command to execute again when it has more to do (`resume`).
    pub(crate) fn on_token_complete(
        &mut self,
        index: u16,
        token: IoToken,
        result: Result<(), BackendError>,
        backend: &mut B,
    ) {
        let request = &mut self.requests[index as usize];
        assert_eq!(request.state, RequestState::Executing);
        assert!(request.tokens_pending > 0);
        request.tokens_pending -= 1;
        if let Err(error) = result {
            // The first failing token of a request (a Write Zeroes spans several) is its status.
            if request.status.is_success() {
                request.status = crate::io::status_from(error);
            }
        }
        if let Some((read_token, length_bytes)) = request.read_pending {
            assert_eq!(read_token, token, "a read waits for its own token only");
            request.read_pending = None;
            let data = &mut request.data[..length_bytes as usize];
            let completion = match backend.finish_read(token, data) {
                Ok(()) => {
                    let completion = self
                        .queue
                        .completion(request.command.cid(), Status::SUCCESS);
                    self.queue_c2h_data(index, completion, length_bytes);
                    return;
                }
                Err(error) => self
                    .queue
                    .completion(request.command.cid(), crate::io::status_from(error)),
            };
            self.queue_response(index, &completion);
            return;
        }
        if request.tokens_pending > 0 {
            return;
        }
        if request.resume {
            request.resume = false;
            assert!(
                self.retry.len() < self.retry.capacity(),
                "retry list sized for every request"
            );
            self.retry.push(index);
            return;
        }
        let completion = self.queue.completion(request.command.cid(), request.status);
        self.queue_response(index, &completion);
    }

    fn item_parts(&self, item: SendItem) -> [&[u8]; 3] {
        match item {
            SendItem::Control => [&self.control[..self.control_bytes], &[], &[]],
            SendItem::R2T(index) => {
                let request = &self.requests[index as usize];
                [&request.header[..request.header_bytes], &[], &[]]
            }
            SendItem::C2HData(index, _) => {
                let request = &self.requests[index as usize];
                let digest: &[u8] = if self.framing_send.data_digest {
                    &request.data_digest
                } else {
                    &[]
                };
                [
                    &request.header[..request.header_bytes],
                    &request.data[..request.data_bytes as usize],
                    digest,
                ]
            }
            SendItem::Response(index) => {
                let request = &self.requests[index as usize];
                [&request.response[..request.response_bytes], &[], &[]]
            }
        }
    }

    /// One writev of the queued PDUs. Returns the bytes sent.
    pub fn flush(&mut self, now_us: u64) -> usize {
        if self.phase == Phase::Closed {
            return 0;
        }
        let sent = if self.send.is_empty() {
            Ok(0)
        } else {
            self.write_queued()
        };
        let sent = match sent {
            Ok(count) => count,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(error) => {
                self.close(&format!("write: {error}"));
                return 0;
            }
        };
        self.advance(sent);
        if let Phase::Closing { deadline_us } = self.phase {
            if self.send.is_empty() || now_us >= deadline_us {
                self.close("terminated after a protocol error");
            }
        }
        sent
    }

    fn write_queued(&mut self) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); IOVECS_PER_FLUSH];
        let mut count = 0;
        let mut skip = self.send_offset;
        'items: for &item in &self.send {
            for part in self.item_parts(item) {
                if part.len() <= skip {
                    skip -= part.len();
                    continue;
                }
                slices[count] = IoSlice::new(&part[skip..]);
                skip = 0;
                count += 1;
                if count == IOVECS_PER_FLUSH {
                    break 'items;
                }
            }
        }
        (&self.stream).write_vectored(&slices[..count])
    }

    fn advance(&mut self, sent: usize) {
        let mut remaining = self.send_offset + sent;
        while let Some(&item) = self.send.front() {
            let length: usize = self.item_parts(item).iter().map(|part| part.len()).sum();
            if remaining < length {
                break;
            }
            remaining -= length;
            self.send.pop_front();
            self.on_sent(item);
        }
        self.send_offset = remaining;
    }

    fn on_sent(&mut self, item: SendItem) {
        let index = match item {
            SendItem::Response(index) | SendItem::C2HData(index, true) => index,
            SendItem::Control | SendItem::R2T(_) | SendItem::C2HData(_, false) => return,
        };
        let request = &mut self.requests[index as usize];
        assert_eq!(request.state, RequestState::Completing);
        assert!(request.write_slot.is_none() && request.tokens_pending == 0);
        request.state = RequestState::Free;
        self.free.push(index);
    }

    /// Releases what the connection holds when it is gone: write slots (aborted, never garbage),
    /// its I/O queue claim, or, for an admin queue, the controller itself.
    pub(crate) fn teardown(&mut self, context: &mut Context<'_, B>) {
        assert_eq!(self.phase, Phase::Closed);
        self.queue
            .command_errors
            .flush(format_args!("{}", self.peer));
        for request in &mut self.requests {
            if let Some(slot) = request.write_slot.take() {
                let _ignored: crate::backend::IoToken =
                    context.backend.abort_write(context.now_us, slot);
            }
        }
        if let Some(controller) = self.queue.controller.take() {
            if self.queue.qid == 0 {
                context.target.remove_controller(controller.cntlid);
                log::info!(
                    "nvmf: {}: controller {} destroyed",
                    self.peer,
                    controller.cntlid
                );
            } else {
                controller.release_io_queue(self.queue.qid);
            }
        }
    }
}
