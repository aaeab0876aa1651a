//! Fabrics commands (NVMe over Fabrics 1.1 section 3.3 / Base 2.0 section 6): Connect creates the admin
//! queue's controller (dynamic controller model) or joins an I/O queue to an existing one; Property Get
//! and Set reach CAP, VS, CC and CSTS. Connect errors report IATTR/IPO naming the offending field.

use std::sync::atomic::Ordering;

use crate::backend::Backend;
use crate::config::{
    ADMIN_IN_CAPSULE_DATA_BYTES, ADMIN_QUEUE_DEPTH, DISCOVERY_NQN, TRANSFER_BYTES_MAX,
};
use crate::connection::Connection;
use crate::controller::{property, CcEffect, ClaimRefused, Controller, ControllerKind};
use crate::pdu::{
    connect_data_offset, sqe_offset, Command, CommandSpecificStatus, Completion, ConnectData,
    FabricsType, GenericStatus, Status, CONNECT_CATTR_DISABLE_SQ_FLOW_CONTROL, CONNECT_DATA_BYTES,
};
use crate::poll_group::Context;
use crate::request::Outcome;

/// Dynamic controller model: the admin Connect's CNTLID must be 0xFFFF.
pub const CNTLID_DYNAMIC: u16 = 0xffff;

pub fn execute<B: Backend>(
    connection: &mut Connection<B>,
    index: u16,
    context: &mut Context<'_, B>,
) -> Outcome {
    let command = connection.requests[index as usize].command;
    let cid = command.cid();
    let respond = |queue: &crate::request::QueueState, status: Status| {
        Outcome::Respond(queue.completion(cid, status))
    };
    match FabricsType::from_repr(command.fctype()) {
        Some(FabricsType::Connect) => connect(connection, index, context),
        Some(FabricsType::PropertyGet) | Some(FabricsType::PropertySet)
            if connection.queue.controller.is_none() || connection.queue.qid != 0 =>
        {
            respond(
                &connection.queue,
                GenericStatus::CommandSequenceError.into(),
            )
        }
        Some(FabricsType::PropertyGet) => property_get(connection, &command),
        Some(FabricsType::PropertySet) => property_set(connection, &command),
        Some(FabricsType::AuthenticationSend)
        | Some(FabricsType::AuthenticationReceive)
        | Some(FabricsType::Disconnect)
        | None => {
            connection.queue.command_errors.log(
                context.now_us,
                log::Level::Info,
                format_args!("{}", connection.peer),
                format_args!("unsupported Fabrics command type {:#x}", command.fctype()),
            );
            respond(&connection.queue, GenericStatus::InvalidOpcode.into())
        }
    }
}

/// The controller and the property a Property Get/Set names: offset (dword 11) and whether it is
/// eight bytes wide (attribute bit 0, byte 40).
fn property_access<'a, B: Backend>(
    connection: &'a Connection<B>,
    command: &Command,
) -> (&'a Controller, u32, bool) {
    let controller = connection
        .queue
        .controller
        .as_ref()
        .expect("checked by the caller");
    (
        controller,
        command.dword_at(44),
        command.byte_at(40) & 1 != 0,
    )
}

fn property_get<B: Backend>(connection: &Connection<B>, command: &Command) -> Outcome {
    let (controller, offset, eight_bytes) = property_access(connection, command);
    let mut completion = connection.queue.completion(command.cid(), Status::SUCCESS);
    match controller.property_get(offset, eight_bytes) {
        Some(value) => {
            completion.dw0 = value as u32;
            completion.dw1 = (value >> 32) as u32;
        }
        None => completion.status = GenericStatus::InvalidField.into(),
    }
    Outcome::Respond(completion)
}

/// Property Set: only CC is writable. Clearing CC.EN resets the controller: its I/O queues close on
/// their own polls (reset epoch) and this admin queue aborts its Asynchronous Event Requests.
fn property_set<B: Backend>(connection: &mut Connection<B>, command: &Command) -> Outcome {
    let (controller, offset, eight_bytes) = property_access(connection, command);
    if offset != property::CC || eight_bytes {
        let status = GenericStatus::InvalidField.into();
        return Outcome::Respond(connection.queue.completion(command.cid(), status));
    }
    let cntlid = controller.cntlid;
    if controller.set_cc(command.dword_at(48)) == CcEffect::Reset {
        log::info!(
            "nvmf: {}: controller {cntlid} reset by the host (CC.EN cleared): I/O queues close",
            connection.peer
        );
        connection.abort_async_event_requests();
    }
    Outcome::Respond(connection.queue.completion(command.cid(), Status::SUCCESS))
}

fn invalid(
    connection_queue: &crate::request::QueueState,
    cid: u16,
    in_data: bool,
    offset: u16,
) -> Outcome {
    let mut completion = Completion::connect_invalid_parameter(cid, in_data, offset);
    completion.sqhd = connection_queue.completion(cid, Status::SUCCESS).sqhd;
    Outcome::Respond(completion)
}

fn connect<B: Backend>(
    connection: &mut Connection<B>,
    index: u16,
    context: &mut Context<'_, B>,
) -> Outcome {
    let request = &connection.requests[index as usize];
    let command = request.command;
    let cid = command.cid();
    let queue = &connection.queue;
    if queue.controller.is_some() {
        return Outcome::Respond(queue.completion(cid, GenericStatus::CommandSequenceError.into()));
    }
    if command.u16_at(40) != 0 {
        return Outcome::Respond(
            queue.completion(cid, CommandSpecificStatus::ConnectIncompatibleFormat.into()),
        );
    }
    if request.transfer_bytes < CONNECT_DATA_BYTES as u32 {
        return Outcome::Respond(queue.completion(cid, GenericStatus::DataSglLengthInvalid.into()));
    }
    let data = match ConnectData::decode(&request.data[..CONNECT_DATA_BYTES]) {
        Ok(data) => data,
        Err(offset) => return invalid(queue, cid, true, offset),
    };
    let config = &context.target.config;
    let kind = if data.subnqn == DISCOVERY_NQN {
        ControllerKind::Discovery
    } else {
        match config
            .subsystems
            .iter()
            .position(|subsystem| subsystem.nqn == data.subnqn)
        {
            Some(subsystem_index) => ControllerKind::Nvm { subsystem_index },
            None => {
                log::warn!(
                    "nvmf: {}: Connect to unknown subsystem {:?}",
                    connection.peer,
                    data.subnqn
                );
                return invalid(queue, cid, true, connect_data_offset::SUBNQN);
            }
        }
    };
    if let ControllerKind::Nvm { subsystem_index } = kind {
        if !config.subsystems[subsystem_index].allows_host(&data.hostnqn) {
            log::warn!(
                "nvmf: {}: host {:?} not allowed on {:?}",
                connection.peer,
                data.hostnqn,
                data.subnqn
            );
            let mut completion =
                Completion::connect_invalid_parameter(cid, true, connect_data_offset::HOSTNQN);
            completion.status = CommandSpecificStatus::ConnectInvalidHost.into();
            return Outcome::Respond(completion);
        }
    }
    let qid = command.u16_at(sqe_offset::CONNECT_QID as usize);
    let outcome = if qid == 0 {
        connect_admin(connection, &command, kind, data, context)
    } else {
        connect_io(connection, &command, qid, data, context)
    };
    if let Outcome::Respond(completion) = &outcome {
        if completion.status.is_success() {
            connection.queue.sq_flow_control_disabled =
                command.byte_at(46) & CONNECT_CATTR_DISABLE_SQ_FLOW_CONTROL != 0;
            let mut completion = *completion;
            completion.sqhd = connection.queue.completion(cid, Status::SUCCESS).sqhd;
            return Outcome::Respond(completion);
        }
    }
    outcome
}

fn connect_admin<B: Backend>(
    connection: &mut Connection<B>,
    command: &Command,
    kind: ControllerKind,
    data: ConnectData,
    context: &mut Context<'_, B>,
) -> Outcome {
    let cid = command.cid();
    let sqsize = command.u16_at(sqe_offset::CONNECT_SQSIZE as usize);
    if sqsize == 0 || sqsize >= ADMIN_QUEUE_DEPTH {
        return invalid(&connection.queue, cid, false, sqe_offset::CONNECT_SQSIZE);
    }
    if data.cntlid != CNTLID_DYNAMIC {
        return invalid(&connection.queue, cid, true, connect_data_offset::CNTLID);
    }
    let config = &context.target.config;
    let mut kato_ms = command.dword_at(sqe_offset::CONNECT_KATO as usize);
    if kato_ms == 0 && kind == ControllerKind::Discovery {
        kato_ms = config.keep_alive_timeout_ms_default;
    }
    let (io_queues_max, queue_depth_max) = (config.io_queues_max, config.queue_depth_max);
    let registered = context.target.register_controller(|cntlid| {
        Controller::new(
            cntlid,
            kind,
            data.subnqn,
            data.hostnqn,
            data.hostid,
            io_queues_max,
            queue_depth_max,
        )
    });
    let Some(controller) = registered else {
        return Outcome::Respond(
            connection
                .queue
                .completion(cid, CommandSpecificStatus::ConnectControllerBusy.into()),
        );
    };
    controller.kato_ms.store(kato_ms, Ordering::Relaxed);
    controller.touch(context.now_us);
    log::info!(
        "nvmf: {}: controller {} created for {:?}",
        connection.peer,
        controller.cntlid,
        controller.subnqn
    );
    let entries = sqsize + 1;
    connection.provision(entries, ADMIN_IN_CAPSULE_DATA_BYTES as usize);
    let queue = &mut connection.queue;
    queue.qid = 0;
    queue.sq_entries = entries;
    queue.sq_head = 1;
    queue.in_capsule_data_bytes = ADMIN_IN_CAPSULE_DATA_BYTES;
    let mut completion = queue.completion(cid, Status::SUCCESS);
    completion.dw0 = u32::from(controller.cntlid);
    queue.controller = Some(controller);
    Outcome::Respond(completion)
}

fn connect_io<B: Backend>(
    connection: &mut Connection<B>,
    command: &Command,
    qid: u16,
    data: ConnectData,
    context: &mut Context<'_, B>,
) -> Outcome {
    let cid = command.cid();
    let queue = &connection.queue;
    let Some(controller) = context.target.find_controller(data.cntlid) else {
        return invalid(queue, cid, true, connect_data_offset::CNTLID);
    };
    if controller.subnqn != data.subnqn {
        return invalid(queue, cid, true, connect_data_offset::SUBNQN);
    }
    if controller.hostnqn != data.hostnqn {
        return invalid(queue, cid, true, connect_data_offset::HOSTNQN);
    }
    if controller.kind == ControllerKind::Discovery {
        return invalid(queue, cid, false, sqe_offset::CONNECT_QID);
    }
    let sqsize = command.u16_at(sqe_offset::CONNECT_SQSIZE as usize);
    if sqsize == 0 || sqsize >= controller.io_queue_depth_max {
        return invalid(queue, cid, false, sqe_offset::CONNECT_SQSIZE);
    }
    let reset_epoch = match controller.claim_io_queue(qid) {
        Ok(reset_epoch) => reset_epoch,
        Err(ClaimRefused::NotReady) => {
            let status = GenericStatus::CommandSequenceError.into();
            return Outcome::Respond(queue.completion(cid, status));
        }
        Err(ClaimRefused::InvalidQueue) => {
            return invalid(queue, cid, false, sqe_offset::CONNECT_QID)
        }
    };
    let entries = sqsize + 1;
    connection.provision(entries, TRANSFER_BYTES_MAX as usize);
    let in_capsule_data_bytes = context.target.config.in_capsule_data_bytes;
    let queue = &mut connection.queue;
    queue.qid = qid;
    queue.sq_entries = entries;
    queue.sq_head = 1;
    queue.in_capsule_data_bytes = in_capsule_data_bytes;
    queue.reset_epoch = reset_epoch;
    let mut completion = queue.completion(cid, Status::SUCCESS);
    completion.dw0 = u32::from(controller.cntlid);
    log::info!(
        "nvmf: {}: I/O queue {qid} ({entries} entries) joined controller {}",
        connection.peer,
        controller.cntlid
    );
    queue.controller = Some(controller);
    Outcome::Respond(completion)
}
