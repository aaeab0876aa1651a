//! Admin commands (NVMe Base 2.0 section 5) of I/O and discovery controllers: Identify, Get Log Page,
//! Get/Set Features, Keep Alive, Asynchronous Event Request and Abort. Dispatch is an exhaustive match;
//! an opcode the controller does not implement gets Invalid Opcode. Asynchronous Event Requests are held
//! on the admin queue and completed by [`crate::async_event`] events on a later poll, or aborted by a
//! controller reset.

use std::sync::atomic::Ordering;

use crate::backend::Backend;
use crate::config::AER_OUTSTANDING_MAX;
use crate::connection::Connection;
use crate::controller::ControllerKind;
use crate::pdu::{admin_opcode, CommandSpecificStatus, Completion, GenericStatus, Status};
use crate::poll_group::Context;
use crate::request::{Outcome, QueueState, Request, RequestState};

pub use crate::spec::feature;

/// Temperature threshold default (343 K, over-temperature), reported by Get Features.
pub const TEMPERATURE_THRESHOLD_KELVIN: u32 = 343;

pub fn execute<B: Backend>(
    queue: &mut QueueState,
    request: &mut Request<B::WriteSlot>,
    index: u16,
    context: &mut Context<'_, B>,
) -> Outcome {
    let command = request.command;
    let cid = command.cid();
    let discovery = queue
        .controller
        .as_ref()
        .expect("admin commands run after Connect")
        .kind
        == ControllerKind::Discovery;
    let result = match command.opcode() {
        admin_opcode::IDENTIFY => crate::identify::identify(queue, request, context),
        admin_opcode::GET_LOG_PAGE => crate::log_page::get_log_page(queue, request, context),
        admin_opcode::GET_FEATURES => get_features(queue, request, &context.target.config),
        admin_opcode::SET_FEATURES => set_features(queue, request),
        admin_opcode::KEEP_ALIVE => Ok(Outcome::Respond(queue.completion(cid, Status::SUCCESS))),
        admin_opcode::ASYNC_EVENT_REQUEST => {
            if queue.async_event_requests.len() >= AER_OUTSTANDING_MAX {
                Err(CommandSpecificStatus::AsyncEventRequestLimitExceeded.into())
            } else {
                queue.async_event_requests.push(index);
                Ok(Outcome::Held)
            }
        }
        admin_opcode::ABORT if !discovery => {
            // The command is not aborted (dw0 bit 0 = 1): commands here complete promptly or are held.
            let mut completion = queue.completion(cid, Status::SUCCESS);
            completion.dw0 = 1;
            Ok(Outcome::Respond(completion))
        }
        opcode => {
            queue.command_errors.log(
                context.now_us,
                log::Level::Info,
                format_args!("admin queue"),
                format_args!("invalid opcode {opcode:#x}"),
            );
            Err(GenericStatus::InvalidOpcode.into())
        }
    };
    match result {
        Ok(outcome) => outcome,
        Err(status) => Outcome::Respond(queue.completion(cid, status)),
    }
}

/// The C2H length of an admin command: the host's SGL length, at most the request buffer.
pub fn response_bytes<S>(request: &Request<S>, produced_bytes: usize) -> u32 {
    let sgl_bytes = request.command.sgl().length() as usize;
    produced_bytes.min(sgl_bytes).min(request.data.len()) as u32
}

fn respond_value(queue: &QueueState, cid: u16, value: u32) -> Outcome {
    let mut completion: Completion = queue.completion(cid, Status::SUCCESS);
    completion.dw0 = value;
    Outcome::Respond(completion)
}

fn get_features<S>(
    queue: &QueueState,
    request: &Request<S>,
    config: &crate::config::TargetConfig,
) -> Result<Outcome, Status> {
    let command = request.command;
    let controller = queue
        .controller
        .as_ref()
        .expect("admin commands run after Connect");
    let fid = (command.cdw(10) & 0xff) as u8;
    let select = (command.cdw(10) >> 8) & 0b111;
    if select == 0b011 {
        // Supported capabilities: changeable for the features Set Features accepts, never saveable.
        let changeable = matches!(
            fid,
            feature::NUMBER_OF_QUEUES | feature::ASYNC_EVENT_CONFIG | feature::KEEP_ALIVE_TIMER
        );
        return Ok(respond_value(
            queue,
            command.cid(),
            (changeable as u32) << 2,
        ));
    }
    let value = match fid {
        feature::ARBITRATION
        | feature::POWER_MANAGEMENT
        | feature::ERROR_RECOVERY
        | feature::INTERRUPT_COALESCING
        | feature::WRITE_ATOMICITY => 0,
        feature::TEMPERATURE_THRESHOLD => TEMPERATURE_THRESHOLD_KELVIN,
        // WCE: the cache Identify reports is enabled (none: none is).
        feature::VOLATILE_WRITE_CACHE => u32::from(config.volatile_write_cache),
        feature::NUMBER_OF_QUEUES => controller.queue_count_granted.load(Ordering::Relaxed),
        feature::ASYNC_EVENT_CONFIG => controller.async_event_config.load(Ordering::Relaxed),
        feature::KEEP_ALIVE_TIMER => controller.kato_ms.load(Ordering::Relaxed),
        _ => return Err(GenericStatus::InvalidField.into()),
    };
    Ok(respond_value(queue, command.cid(), value))
}

fn set_features<S>(queue: &QueueState, request: &Request<S>) -> Result<Outcome, Status> {
    let command = request.command;
    let controller = queue
        .controller
        .as_ref()
        .expect("admin commands run after Connect");
    let fid = (command.cdw(10) & 0xff) as u8;
    if command.cdw(10) & (1 << 31) != 0 {
        return Err(CommandSpecificStatus::FeatureIdNotSaveable.into());
    }
    let value = command.cdw(11);
    match fid {
        feature::NUMBER_OF_QUEUES => {
            if value & 0xffff == 0xffff || value >> 16 == 0xffff {
                return Err(GenericStatus::InvalidField.into());
            }
            if controller.io_queues_connected() > 0 {
                return Err(GenericStatus::CommandSequenceError.into());
            }
            let limit = u32::from(controller.io_queues_max - 1);
            let granted = (value & 0xffff).min(limit);
            let granted = granted | ((value >> 16).min(limit) << 16);
            controller
                .queue_count_granted
                .store(granted, Ordering::Relaxed);
            Ok(respond_value(queue, command.cid(), granted))
        }
        feature::ASYNC_EVENT_CONFIG => {
            controller
                .async_event_config
                .store(value, Ordering::Relaxed);
            Ok(respond_value(queue, command.cid(), 0))
        }
        feature::KEEP_ALIVE_TIMER => {
            controller.kato_ms.store(value, Ordering::Relaxed);
            Ok(respond_value(queue, command.cid(), 0))
        }
        feature::ARBITRATION
        | feature::POWER_MANAGEMENT
        | feature::TEMPERATURE_THRESHOLD
        | feature::ERROR_RECOVERY
        | feature::VOLATILE_WRITE_CACHE
        | feature::INTERRUPT_COALESCING
        | feature::WRITE_ATOMICITY => Err(CommandSpecificStatus::FeatureNotChangeable.into()),
        _ => Err(GenericStatus::InvalidField.into()),
    }
}

impl<B: Backend> Connection<B> {
    /// Completes outstanding Asynchronous Event Requests, oldest first, with the controller's queued
    /// events (Base 2.0 section 5.2). Returns how many completed.
    pub(crate) fn poll_async_events(&mut self) -> usize {
        let mut completed = 0;
        while !self.queue.async_event_requests.is_empty() {
            let Some(controller) = self.queue.controller.as_ref() else {
                break;
            };
            let Some(event) = controller.take_async_event() else {
                break;
            };
            log::info!(
                "nvmf: {}: controller {}: asynchronous event {event:?}",
                self.peer,
                controller.cntlid
            );
            let index = self.queue.async_event_requests.remove(0);
            let request = &self.requests[index as usize];
            assert_eq!(request.state, RequestState::Held);
            let mut completion = self
                .queue
                .completion(request.command.cid(), Status::SUCCESS);
            completion.dw0 = event.completion_dword0();
            self.queue_response(index, &completion);
            completed += 1;
        }
        completed
    }

    /// A controller reset deletes the queues the requests wait on: each outstanding Asynchronous Event
    /// Request completes with Command Aborted due to SQ Deletion.
    pub(crate) fn abort_async_event_requests(&mut self) {
        let status = Status::from(GenericStatus::AbortedSqDeletion);
        while let Some(index) = self.queue.async_event_requests.pop() {
            let request = &self.requests[index as usize];
            assert_eq!(request.state, RequestState::Held);
            let completion = self.queue.completion(request.command.cid(), status);
            self.queue_response(index, &completion);
        }
    }
}
