//! NVM command set I/O commands (NVM Command Set 1.0 section 3): Read, Write, Flush, Write Zeroes and
//! Dataset Management. Writes reserve a backend slot before their data arrives and complete when the
//! backend reports them durable; reads are synchronous into the request's buffer. Backend errors become
//! NVMe status in one place, [`status_from`].

use crate::backend::{Backend, BackendError, LBA_BYTES};
use crate::config::TRANSFER_BYTES_MAX;
use crate::controller::ControllerKind;
use crate::pdu::{io_opcode, Command, GenericStatus, Status};
use crate::poll_group::Context;
use crate::request::{Outcome, QueueState, Request};

/// Dataset Management ranges per command (NR is 0's based, 8 bits).
pub const DSM_RANGES_MAX: usize = 256;
/// Size of one Dataset Management range.
pub const DSM_RANGE_BYTES: usize = 16;
/// Broadcast NSID (all namespaces).
pub const NSID_ALL: u32 = 0xffff_ffff;

/// The one mapping from backend errors to NVMe status.
pub fn status_from(error: BackendError) -> Status {
    match error {
        BackendError::InvalidNamespace => GenericStatus::InvalidNamespaceOrFormat.into(),
        BackendError::OutOfRange => GenericStatus::LbaOutOfRange.into(),
        BackendError::Io => GenericStatus::InternalError.into(),
        BackendError::Busy => unreachable!("Busy is retried, never reported"),
    }
}

/// Is `nsid` exported by this queue's subsystem?
fn namespace_attached(queue: &QueueState, nsid: u32, context: &Context<'_, impl Backend>) -> bool {
    let controller = queue
        .controller
        .as_ref()
        .expect("I/O queues have a controller");
    match controller.kind {
        ControllerKind::Nvm { subsystem_index } => context.target.config.subsystems
            [subsystem_index]
            .namespaces
            .contains(&nsid),
        ControllerKind::Discovery => false,
    }
}

/// LBA, transfer length in bytes and checks shared by Read and Write.
fn extent(
    queue: &QueueState,
    command: &Command,
    context: &Context<'_, impl Backend>,
) -> Result<(u64, u32), Status> {
    if !namespace_attached(queue, command.nsid(), context) {
        return Err(GenericStatus::InvalidNamespaceOrFormat.into());
    }
    let lba = command.u64_at(40);
    let blocks = (command.cdw(12) & 0xffff) + 1;
    let length_bytes = blocks * LBA_BYTES;
    if length_bytes > TRANSFER_BYTES_MAX {
        return Err(GenericStatus::InvalidField.into());
    }
    if command.sgl().length() < length_bytes {
        return Err(GenericStatus::DataSglLengthInvalid.into());
    }
    let info = context
        .backend
        .namespace(command.nsid())
        .ok_or(Status::from(GenericStatus::InvalidNamespaceOrFormat))?;
    let end = lba
        .checked_add(u64::from(blocks))
        .ok_or(Status::from(GenericStatus::LbaOutOfRange))?;
    if end > info.size_bytes / u64::from(LBA_BYTES) {
        return Err(GenericStatus::LbaOutOfRange.into());
    }
    Ok((lba, length_bytes))
}

/// Reserves the backend slot a write's data lands in. `Ok(None)` = backend Busy, retry later.
pub fn reserve_write<B: Backend>(
    queue: &QueueState,
    command: &Command,
    length_bytes: u32,
    context: &mut Context<'_, B>,
) -> Result<Option<B::WriteSlot>, Status> {
    let (lba, extent_bytes) = extent(queue, command, context)?;
    if extent_bytes != length_bytes {
        return Err(GenericStatus::DataSglLengthInvalid.into());
    }
    match context
        .backend
        .reserve_write(context.now_us, command.nsid(), lba, length_bytes)
    {
        Ok(slot) => Ok(Some(slot)),
        Err(BackendError::Busy) => Ok(None),
        Err(error) => Err(status_from(error)),
    }
}

pub fn execute<B: Backend>(
    queue: &QueueState,
    request: &mut Request<B::WriteSlot>,
    index: u16,
    context: &mut Context<'_, B>,
) -> Outcome {
    let command = request.command;
    let result = match command.opcode() {
        io_opcode::READ => return read(queue, request, context),
        io_opcode::WRITE => Err(GenericStatus::DataSglLengthInvalid.into()),
        io_opcode::FLUSH => flush(queue, request, index, context),
        io_opcode::WRITE_ZEROES => write_zeroes(queue, request, index, context),
        io_opcode::DATASET_MANAGEMENT => dataset_management(queue, request, context),
        opcode => {
            log::info!("nvmf: I/O queue {}: invalid opcode {opcode:#x}", queue.qid);
            Err(GenericStatus::InvalidOpcode.into())
        }
    };
    match result {
        Ok(outcome) => outcome,
        Err(status) => Outcome::Respond(queue.completion(command.cid(), status)),
    }
}

fn read<B: Backend>(
    queue: &QueueState,
    request: &mut Request<B::WriteSlot>,
    context: &mut Context<'_, B>,
) -> Outcome {
    let command = request.command;
    let result = extent(queue, &command, context).and_then(|(lba, length_bytes)| {
        let buffer = &mut request.data[..length_bytes as usize];
        context
            .backend
            .read(command.nsid(), lba, buffer)
            .map_err(status_from)
            .map(|()| length_bytes)
    });
    match result {
        Ok(length_bytes) => Outcome::RespondWithData(
            queue.completion(command.cid(), Status::SUCCESS),
            length_bytes,
        ),
        Err(status) => Outcome::Respond(queue.completion(command.cid(), status)),
    }
}

fn pending<B: Backend>(
    result: Result<crate::backend::IoToken, BackendError>,
    request: &mut Request<B::WriteSlot>,
    index: u16,
    context: &mut Context<'_, B>,
) -> Result<Outcome, Status> {
    match result {
        Ok(token) => {
            request.tokens_pending += 1;
            context.register(token, index);
            Ok(Outcome::Pending)
        }
        Err(BackendError::Busy) => Ok(Outcome::Retry),
        Err(error) => Err(status_from(error)),
    }
}

fn flush<B: Backend>(
    queue: &QueueState,
    request: &mut Request<B::WriteSlot>,
    index: u16,
    context: &mut Context<'_, B>,
) -> Result<Outcome, Status> {
    let nsid = request.command.nsid();
    if nsid == NSID_ALL {
        // Flushing one namespace flushes the backend's shared durability point: use the first.
        let controller = queue
            .controller
            .as_ref()
            .expect("I/O queues have a controller");
        let ControllerKind::Nvm { subsystem_index } = controller.kind else {
            return Err(GenericStatus::InvalidNamespaceOrFormat.into());
        };
        let first = context.target.config.subsystems[subsystem_index].namespaces[0];
        let result = context.backend.flush(context.now_us, first);
        return pending(result, request, index, context);
    }
    if !namespace_attached(queue, nsid, context) {
        return Err(GenericStatus::InvalidNamespaceOrFormat.into());
    }
    let result = context.backend.flush(context.now_us, nsid);
    pending(result, request, index, context)
}

fn write_zeroes<B: Backend>(
    queue: &QueueState,
    request: &mut Request<B::WriteSlot>,
    index: u16,
    context: &mut Context<'_, B>,
) -> Result<Outcome, Status> {
    let command = request.command;
    if !namespace_attached(queue, command.nsid(), context) {
        return Err(GenericStatus::InvalidNamespaceOrFormat.into());
    }
    let lba = command.u64_at(40);
    let blocks = u64::from(command.cdw(12) & 0xffff) + 1;
    let info = context
        .backend
        .namespace(command.nsid())
        .ok_or(Status::from(GenericStatus::InvalidNamespaceOrFormat))?;
    if lba
        .checked_add(blocks)
        .is_none_or(|end| end > info.size_bytes / u64::from(LBA_BYTES))
    {
        return Err(GenericStatus::LbaOutOfRange.into());
    }
    let result = context.backend.write_zeroes(
        context.now_us,
        command.nsid(),
        lba,
        blocks * u64::from(LBA_BYTES),
    );
    pending(result, request, index, context)
}

/// Deallocate is advisory (Identify Namespace DLFEAT = 0: deallocated blocks read back unspecified
/// content), so the ranges are validated and the command completes; other attributes are hints too.
fn dataset_management<B: Backend>(
    queue: &QueueState,
    request: &mut Request<B::WriteSlot>,
    context: &mut Context<'_, B>,
) -> Result<Outcome, Status> {
    let command = request.command;
    if !namespace_attached(queue, command.nsid(), context) {
        return Err(GenericStatus::InvalidNamespaceOrFormat.into());
    }
    let ranges = (command.cdw(10) & 0xff) as usize + 1;
    if request.transfer_bytes < (ranges * DSM_RANGE_BYTES) as u32 {
        return Err(GenericStatus::DataSglLengthInvalid.into());
    }
    let info = context
        .backend
        .namespace(command.nsid())
        .ok_or(Status::from(GenericStatus::InvalidNamespaceOrFormat))?;
    let lba_count = info.size_bytes / u64::from(LBA_BYTES);
    for range in request.data[..ranges * DSM_RANGE_BYTES].chunks_exact(DSM_RANGE_BYTES) {
        let blocks = u64::from(u32::from_le_bytes(range[4..8].try_into().expect("4 bytes")));
        let start = u64::from_le_bytes(range[8..16].try_into().expect("8 bytes"));
        if start.checked_add(blocks).is_none_or(|end| end > lba_count) {
            return Err(GenericStatus::LbaOutOfRange.into());
        }
    }
    Ok(Outcome::Respond(
        queue.completion(command.cid(), Status::SUCCESS),
    ))
}

const _: () = assert!(DSM_RANGES_MAX * DSM_RANGE_BYTES <= TRANSFER_BYTES_MAX as usize);
