//! From a received CapsuleCmd to an executed command: claim a request slot, plan the data phase from the
//! SGL (NVMe/TCP 1.0 section 3.4: in-capsule Data Block/Offset descriptor, or Transport SGL Data Block
//! answered with an R2T), land write data in the backend's slot, then dispatch through an exhaustive match
//! to Fabrics, admin or I/O execution.
//!
//! On a backend whose write slots complete in order (the replicated volume's NVRAM ring,
//! [`Backend::ORDERED_WRITE_SLOTS`]) a write reserves its slot only when its data is complete:
//! in-capsule data arrives with the command and goes straight into the slot, data sent after an
//! R2T goes into the request's preallocated buffer first. So a write whose data has not arrived
//! never delays the completion of one whose data has, on any connection. A command whose data
//! does not arrive within [`crate::config::TargetConfig::data_timeout_ms`] is failed and its
//! connection closed ([`Connection::poll_data_timeouts`]): it holds nothing for ever.

use crate::backend::Backend;
use crate::connection::{Connection, DataTarget, RecvState};
use crate::pdu::{
    admin_opcode, io_opcode, Command, DataLocation, Fes, GenericStatus, PduError, SglDescriptor,
    Status,
};
use crate::poll_group::Context;
use crate::request::Request;
use crate::request::{Outcome, RequestState};

/// Does the command move data host-to-controller? (Opcode bits 1:0 = 01b; FCTYPE for Fabrics.)
pub fn host_to_controller(command: &Command) -> bool {
    let code = if command.opcode() == admin_opcode::FABRICS {
        command.fctype()
    } else {
        command.opcode()
    };
    code & 0b11 == 0b01
}

/// The data length of a command given its SGL and the in-capsule bytes that came with it.
fn data_plan(
    command: &Command,
    in_capsule_bytes: u32,
    data_bytes_max: usize,
) -> Result<u32, Status> {
    let length = match command.sgl() {
        SglDescriptor::InCapsule { offset, length } => {
            if offset != 0 {
                return Err(GenericStatus::SglOffsetInvalid.into());
            }
            if length != in_capsule_bytes {
                return Err(GenericStatus::DataSglLengthInvalid.into());
            }
            length
        }
        SglDescriptor::Transport { length } if in_capsule_bytes == 0 => length,
        SglDescriptor::Other { length: 0, .. } if in_capsule_bytes == 0 => 0,
        SglDescriptor::Transport { .. } | SglDescriptor::Other { .. } => {
            return Err(GenericStatus::SglDescriptorTypeInvalid.into())
        }
    };
    if length as usize > data_bytes_max {
        return Err(GenericStatus::InvalidField.into());
    }
    Ok(length)
}

impl<B: Backend> Connection<B> {
    pub(crate) fn on_capsule(
        &mut self,
        command: Command,
        location: DataLocation,
        context: &mut Context<'_, B>,
    ) -> Result<(), PduError> {
        if location.length > self.queue.in_capsule_data_bytes {
            return Err(PduError::new(
                Fes::DataTransferLimitExceeded,
                "in-capsule data larger than IOCCSZ",
            ));
        }
        let Some(index) = self.free.pop() else {
            return Err(PduError::new(
                Fes::PduSequenceError,
                "more commands outstanding than the queue size",
            ));
        };
        self.queue.advance_sq_head();
        let data_bytes_max = self.requests[index as usize].data.len();
        self.requests[index as usize].start(command);
        // Only Fabrics commands run before the controller is enabled and ready (Fabrics section 3.5;
        // after a reset, until its I/O queues close). Checked here, on every command's way in: a write
        // commits from `on_data_complete` and never reaches `dispatch`.
        let ready = self
            .queue
            .controller
            .as_ref()
            .is_some_and(|controller| controller.is_ready());
        if command.opcode() != admin_opcode::FABRICS && !ready {
            self.reject(index, GenericStatus::CommandSequenceError.into(), location);
            return Ok(());
        }
        let length = match data_plan(&command, location.length, data_bytes_max) {
            Ok(length) => length,
            Err(status) => {
                self.reject(index, status, location);
                return Ok(());
            }
        };
        if length == 0 || !host_to_controller(&command) {
            self.execute(index, context);
            return Ok(());
        }
        self.requests[index as usize].transfer_bytes = length;
        let is_write = self.queue.qid != 0
            && self.queue.controller.is_some()
            && command.opcode() == io_opcode::WRITE;
        if !is_write {
            self.begin_h2c(index, location, context.now_us);
            return Ok(());
        }
        if B::ORDERED_WRITE_SLOTS && location.length == 0 {
            // The host sends this write's data when it likes: its slot waits for the data.
            match crate::io::check_write(&self.queue, &command, length, context) {
                Ok(_) => {
                    self.requests[index as usize].staged_write = true;
                    self.begin_h2c(index, location, context.now_us);
                }
                Err(status) => self.reject(index, status, location),
            }
            return Ok(());
        }
        match crate::io::reserve_write(&self.queue, &command, length, context) {
            Ok(Some(slot)) => {
                self.requests[index as usize].write_slot = Some(slot);
                self.begin_h2c(index, location, context.now_us);
            }
            Ok(None) => {
                self.requests[index as usize].state = RequestState::AwaitingWriteSlot;
                if location.length > 0 {
                    self.recv_state = RecvState::AwaitWriteSlot { index, location };
                } else {
                    self.retry.push(index);
                }
            }
            Err(status) => self.reject(index, status, location),
        }
        Ok(())
    }

    /// Starts receiving H2C data: in-capsule data is next on the wire, otherwise ask with an R2T.
    /// The data is due within the configured data timeout from now.
    fn begin_h2c(&mut self, index: u16, location: DataLocation, now_us: u64) {
        let request = &mut self.requests[index as usize];
        assert!(request.data_deadline_us.is_none());
        request.data_deadline_us = Some(now_us + self.data_timeout_us);
        let target = if request.write_slot.is_some() {
            DataTarget::WriteSlot
        } else {
            DataTarget::RequestBuffer
        };
        if location.length > 0 {
            assert_eq!(location.length, request.transfer_bytes);
            request.state = RequestState::ReceivingData;
            request.received_bytes = location.length;
            let (end, digest) = (location.length, location.digest);
            self.recv_state = RecvState::Data {
                index,
                target,
                start: 0,
                offset: 0,
                end,
                digest,
            };
        } else {
            request.state = RequestState::AwaitingH2CData;
            self.queue_r2t(index);
        }
    }

    /// A command failed before execution: drain its in-capsule data (if any), then send `status`.
    fn reject(&mut self, index: u16, status: Status, location: DataLocation) {
        let request = &mut self.requests[index as usize];
        if location.length == 0 {
            let completion = self.queue.completion(request.command.cid(), status);
            self.finish(index, Outcome::Respond(completion));
            return;
        }
        assert!(request.write_slot.is_none() && location.length as usize <= request.data.len());
        request.early_status = Some(status);
        request.state = RequestState::ReceivingData;
        request.transfer_bytes = location.length;
        let (end, digest) = (location.length, location.digest);
        self.recv_state = RecvState::Data {
            index,
            target: DataTarget::RequestBuffer,
            start: 0,
            offset: 0,
            end,
            digest,
        };
    }

    /// Retries the write slot of an in-capsule write whose data still waits in the socket.
    pub(crate) fn retry_in_capsule_write(
        &mut self,
        index: u16,
        location: DataLocation,
        context: &mut Context<'_, B>,
    ) -> bool {
        let command = self.requests[index as usize].command;
        let length = self.requests[index as usize].transfer_bytes;
        self.recv_state = RecvState::Header;
        match crate::io::reserve_write(&self.queue, &command, length, context) {
            Ok(Some(slot)) => {
                self.requests[index as usize].write_slot = Some(slot);
                self.begin_h2c(index, location, context.now_us);
                true
            }
            Ok(None) => {
                self.recv_state = RecvState::AwaitWriteSlot { index, location };
                false
            }
            Err(status) => {
                self.reject(index, status, location);
                true
            }
        }
    }

    /// All H2C data of request `index` arrived: commit a write, or execute the command with its data.
    pub(crate) fn on_data_complete(&mut self, index: u16, context: &mut Context<'_, B>) {
        let request = &mut self.requests[index as usize];
        request.data_deadline_us = None;
        if let Some(status) = request.early_status {
            if let Some(slot) = request.write_slot.take() {
                let _ignored: crate::backend::IoToken =
                    context.backend.abort_write(context.now_us, slot);
            }
            let completion = self.queue.completion(request.command.cid(), status);
            self.finish(index, Outcome::Respond(completion));
            return;
        }
        if request.write_slot.is_some() {
            self.commit(index, context);
            return;
        }
        if request.staged_write {
            if !self.commit_staged_write(index, context) {
                assert!(
                    self.retry.len() < self.retry.capacity(),
                    "retry list sized for every request"
                );
                self.retry.push(index);
            }
            return;
        }
        self.execute(index, context);
    }

    /// Commits request `index`'s write slot, its data all in; the completion follows the token.
    fn commit(&mut self, index: u16, context: &mut Context<'_, B>) {
        let request = &mut self.requests[index as usize];
        let slot = request.write_slot.take().expect("a reserved write slot");
        let token = match request.data_crc.take() {
            Some(data_crc) => context
                .backend
                .commit_write_verified(context.now_us, slot, data_crc),
            None => context.backend.commit_write(context.now_us, slot),
        };
        assert_eq!(
            request.tokens_pending, 0,
            "one backend operation per request"
        );
        request.tokens_pending = 1;
        context.register(token, index);
        self.finish(index, Outcome::Pending);
    }

    /// A staged write's data is all in the request's buffer: reserve its slot now, copy the data
    /// in and commit. `false`: the backend is Busy, retry on a later poll.
    fn commit_staged_write(&mut self, index: u16, context: &mut Context<'_, B>) -> bool {
        let request = &self.requests[index as usize];
        assert!(request.staged_write && request.write_slot.is_none());
        assert_eq!(request.received_bytes, request.transfer_bytes);
        let (command, length) = (request.command, request.transfer_bytes);
        match crate::io::reserve_write(&self.queue, &command, length, context) {
            Ok(Some(slot)) => {
                let request: &mut Request<B::WriteSlot> = &mut self.requests[index as usize];
                // One copy more than data received straight into the slot, paid by writes
                // larger than the in-capsule size only: the price of reserving ring space
                // only once the data is here, so a host withholding its data holds no slot
                // and delays no one else's write.
                context
                    .backend
                    .fill_write(&slot, 0, &request.data[..length as usize]);
                request.write_slot = Some(slot);
                self.commit(index, context);
                true
            }
            Ok(None) => {
                self.requests[index as usize].state = RequestState::AwaitingWriteSlotWithData;
                false
            }
            Err(status) => {
                let completion = self.queue.completion(command.cid(), status);
                self.finish(index, Outcome::Respond(completion));
                true
            }
        }
    }

    /// Executes retried requests (backend Busy earlier); those still busy stay queued in order.
    pub(crate) fn poll_retry(&mut self, context: &mut Context<'_, B>) -> usize {
        let mut kept = 0;
        let count = self.retry.len();
        for position in 0..count {
            let index = self.retry[position];
            let state = self.requests[index as usize].state;
            let done = if state == RequestState::AwaitingWriteSlot {
                self.retry_r2t_write(index, context)
            } else if state == RequestState::AwaitingWriteSlotWithData {
                self.commit_staged_write(index, context)
            } else {
                let outcome = self.dispatch(index, context);
                if outcome != Outcome::Retry {
                    self.finish(index, outcome);
                }
                outcome != Outcome::Retry
            };
            if !done {
                self.retry[kept] = index;
                kept += 1;
            }
        }
        self.retry.truncate(kept);
        count - kept
    }

    fn retry_r2t_write(&mut self, index: u16, context: &mut Context<'_, B>) -> bool {
        let request = &self.requests[index as usize];
        let (command, length) = (request.command, request.transfer_bytes);
        let none = DataLocation {
            offset: 0,
            length: 0,
            digest: false,
        };
        match crate::io::reserve_write(&self.queue, &command, length, context) {
            Ok(Some(slot)) => {
                self.requests[index as usize].write_slot = Some(slot);
                self.begin_h2c(index, none, context.now_us);
                true
            }
            Ok(None) => false,
            Err(status) => {
                self.reject(index, status, none);
                true
            }
        }
    }

    fn execute(&mut self, index: u16, context: &mut Context<'_, B>) {
        let outcome = self.dispatch(index, context);
        if outcome == Outcome::Retry {
            self.retry.push(index);
        }
        self.finish(index, outcome);
    }

    fn dispatch(&mut self, index: u16, context: &mut Context<'_, B>) -> Outcome {
        let command = self.requests[index as usize].command;
        if command.opcode() == admin_opcode::FABRICS {
            return crate::fabrics::execute(self, index, context);
        }
        let request = &mut self.requests[index as usize];
        if self.queue.qid == 0 {
            crate::admin::execute(&mut self.queue, request, index, context)
        } else {
            crate::io::execute(&self.queue, request, index, context)
        }
    }
}
