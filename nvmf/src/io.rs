//! NVM command set I/O commands (NVM Command Set 1.0 section 3): Read, Write, Flush, Write Zeroes and
//! Dataset Management. Writes reserve a backend slot before their data arrives and complete when the
//! backend reports them durable; reads are synchronous into the request's buffer; Write Zeroes and a
//! deallocate zero through the backend, so deallocated blocks read as zeroes. Backend errors become
//! NVMe status in one place, [`status_from`].

use crate::backend::{Backend, BackendError, NamespaceInfo, LBA_BYTES, WRITE_ZEROES_BLOCKS_MAX};
use crate::config::TRANSFER_BYTES_MAX;
use crate::pdu::{io_opcode, Command, GenericStatus, PathStatus, Status};
use crate::poll_group::Context;
use crate::request::{Outcome, QueueState, Request};

/// Dataset Management ranges per command (NR is 0's based, 8 bits).
pub const DSM_RANGES_MAX: usize = 256;
/// Size of one Dataset Management range.
pub const DSM_RANGE_BYTES: usize = 16;
/// Dataset Management attribute AD (dword 11 bit 2): deallocate the ranges.
pub const DSM_ATTRIBUTE_DEALLOCATE: u32 = 1 << 2;
/// Broadcast NSID (all namespaces).
pub const NSID_ALL: u32 = 0xffff_ffff;

/// The one mapping from backend errors to NVMe status.
pub fn status_from(error: BackendError) -> Status {
    match error {
        BackendError::InvalidNamespace => GenericStatus::InvalidNamespaceOrFormat.into(),
        BackendError::OutOfRange => GenericStatus::LbaOutOfRange.into(),
        BackendError::Io => GenericStatus::InternalError.into(),
        BackendError::PathInaccessible => Status::path(PathStatus::AsymmetricAccessInaccessible),
        BackendError::Busy => unreachable!("Busy is retried, never reported"),
    }
}

/// The NSIDs this queue's controller exports.
fn exported_namespaces<'a>(
    queue: &QueueState,
    context: &'a Context<'_, impl Backend>,
) -> &'a [u32] {
    let controller = queue
        .controller
        .as_ref()
        .expect("I/O queues have a controller");
    context.target.namespaces(controller.kind)
}

/// Namespace `nsid`, if this queue's subsystem exports it and the backend has it.
fn attached_namespace(
    queue: &QueueState,
    nsid: u32,
    context: &Context<'_, impl Backend>,
) -> Result<NamespaceInfo, Status> {
    if !exported_namespaces(queue, context).contains(&nsid) {
        return Err(GenericStatus::InvalidNamespaceOrFormat.into());
    }
    context
        .backend
        .namespace(nsid)
        .ok_or(GenericStatus::InvalidNamespaceOrFormat.into())
}

/// `blocks` from `lba` lie inside the namespace.
fn check_range(info: &NamespaceInfo, lba: u64, blocks: u64) -> Result<(), Status> {
    let lba_count = info.size_bytes / u64::from(LBA_BYTES);
    if lba.checked_add(blocks).is_none_or(|end| end > lba_count) {
        return Err(GenericStatus::LbaOutOfRange.into());
    }
    Ok(())
}

/// LBA, transfer length in bytes and checks shared by Read and Write.
fn extent(
    queue: &QueueState,
    command: &Command,
    context: &Context<'_, impl Backend>,
) -> Result<(u64, u32), Status> {
    let info = attached_namespace(queue, command.nsid(), context)?;
    let lba = command.u64_at(40);
    let blocks = (command.cdw(12) & 0xffff) + 1;
    let length_bytes = blocks * LBA_BYTES;
    if length_bytes > TRANSFER_BYTES_MAX {
        return Err(GenericStatus::InvalidField.into());
    }
    if command.sgl().length() < length_bytes {
        return Err(GenericStatus::DataSglLengthInvalid.into());
    }
    check_range(&info, lba, u64::from(blocks))?;
    Ok((lba, length_bytes))
}

/// Checks a write of `length_bytes` (its SGL's) before its data is asked for; returns its LBA.
pub fn check_write<B: Backend>(
    queue: &QueueState,
    command: &Command,
    length_bytes: u32,
    context: &Context<'_, B>,
) -> Result<u64, Status> {
    let (lba, extent_bytes) = extent(queue, command, context)?;
    if extent_bytes != length_bytes {
        return Err(GenericStatus::DataSglLengthInvalid.into());
    }
    Ok(lba)
}

/// Reserves the backend slot a write's data lands in. `Ok(None)` = backend Busy, retry later.
pub fn reserve_write<B: Backend>(
    queue: &QueueState,
    command: &Command,
    length_bytes: u32,
    context: &mut Context<'_, B>,
) -> Result<Option<B::WriteSlot>, Status> {
    let lba = check_write(queue, command, length_bytes, context)?;
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
        io_opcode::READ => return read(queue, request, index, context),
        io_opcode::WRITE => Err(GenericStatus::DataSglLengthInvalid.into()),
        io_opcode::FLUSH => flush(queue, request, index, context),
        io_opcode::WRITE_ZEROES => write_zeroes(queue, request, index, context),
        io_opcode::DATASET_MANAGEMENT => dataset_management(queue, request, index, context),
        opcode => {
            queue.command_errors.log(
                context.now_us,
                log::Level::Info,
                format_args!("I/O queue {}", queue.qid),
                format_args!("invalid opcode {opcode:#x}"),
            );
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
    index: u16,
    context: &mut Context<'_, B>,
) -> Outcome {
    let command = request.command;
    let (lba, length_bytes) = match extent(queue, &command, context) {
        Ok(extent) => extent,
        Err(status) => return Outcome::Respond(queue.completion(command.cid(), status)),
    };
    match context
        .backend
        .start_read(context.now_us, command.nsid(), lba, length_bytes)
    {
        Ok(None) => {}
        Ok(Some(token)) => {
            assert_eq!(
                request.tokens_pending, 0,
                "one backend operation per request"
            );
            request.tokens_pending += 1;
            request.read_pending = Some((token, length_bytes));
            context.register(token, index);
            return Outcome::Pending;
        }
        Err(BackendError::Busy) => return Outcome::Retry,
        Err(error) => {
            return Outcome::Respond(queue.completion(command.cid(), status_from(error)));
        }
    }
    let result = {
        let buffer = &mut request.data[..length_bytes as usize];
        context
            .backend
            .read(command.nsid(), lba, buffer)
            .map_err(status_from)
            .map(|()| length_bytes)
    };
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
            assert_eq!(
                request.tokens_pending, 0,
                "one backend operation per request"
            );
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
        let Some(&first) = exported_namespaces(queue, context).first() else {
            return Err(GenericStatus::InvalidNamespaceOrFormat.into());
        };
        let result = context.backend.flush(context.now_us, first);
        return pending(result, request, index, context);
    }
    if !exported_namespaces(queue, context).contains(&nsid) {
        return Err(GenericStatus::InvalidNamespaceOrFormat.into());
    }
    let result = context.backend.flush(context.now_us, nsid);
    pending(result, request, index, context)
}

/// Write Zeroes: one backend call (NLB is at most [`WRITE_ZEROES_BLOCKS_MAX`]). Zeroing is how this
/// target deallocates, so the Deallocate bit (dword 12 bit 25) needs nothing more (DLFEAT bit 3).
fn write_zeroes<B: Backend>(
    queue: &QueueState,
    request: &mut Request<B::WriteSlot>,
    index: u16,
    context: &mut Context<'_, B>,
) -> Result<Outcome, Status> {
    let command = request.command;
    let info = attached_namespace(queue, command.nsid(), context)?;
    let lba = command.u64_at(40);
    let blocks = u64::from(command.cdw(12) & 0xffff) + 1;
    check_range(&info, lba, blocks)?;
    let result = context.backend.write_zeroes(
        context.now_us,
        command.nsid(),
        lba,
        blocks * u64::from(LBA_BYTES),
    );
    pending(result, request, index, context)
}

/// Dataset Management (NVM Command Set 1.0 section 3.2.3). Every range is checked before anything
/// changes. With the Deallocate attribute the ranges are zeroed through the backend's `write_zeroes`
/// (replicated on the volume), so deallocated blocks read back as zeroes (Identify Namespace DLFEAT);
/// the command completes when the last call has. One call of at most [`WRITE_ZEROES_BLOCKS_MAX`] blocks
/// is outstanding at a time: a request owns one token-table entry, and `resume` brings the command back
/// through the retry list for the next one. The other attributes are hints.
fn dataset_management<B: Backend>(
    queue: &QueueState,
    request: &mut Request<B::WriteSlot>,
    index: u16,
    context: &mut Context<'_, B>,
) -> Result<Outcome, Status> {
    let command = request.command;
    let info = attached_namespace(queue, command.nsid(), context)?;
    let ranges = (command.cdw(10) & 0xff) as usize + 1;
    if request.transfer_bytes < (ranges * DSM_RANGE_BYTES) as u32 {
        return Err(GenericStatus::DataSglLengthInvalid.into());
    }
    let ranges = &request.data[..ranges * DSM_RANGE_BYTES];
    for range in ranges.chunks_exact(DSM_RANGE_BYTES) {
        let (start, blocks) = dsm_range(range);
        check_range(&info, start, blocks)?;
    }
    if command.cdw(11) & DSM_ATTRIBUTE_DEALLOCATE == 0 {
        return Ok(Outcome::Respond(
            queue.completion(command.cid(), Status::SUCCESS),
        ));
    }
    let Some((lba, blocks)) = deallocate_chunk(ranges, request.progress_blocks) else {
        assert_eq!(request.tokens_pending, 0);
        return Ok(Outcome::Respond(
            queue.completion(command.cid(), Status::SUCCESS),
        ));
    };
    let more = deallocate_chunk(ranges, request.progress_blocks + blocks).is_some();
    let result = context.backend.write_zeroes(
        context.now_us,
        command.nsid(),
        lba,
        blocks * u64::from(LBA_BYTES),
    );
    if result.is_ok() {
        request.progress_blocks += blocks;
        request.resume = more;
    }
    pending(result, request, index, context)
}

/// A Dataset Management range (NVM Command Set 1.0 figure 39): starting LBA and length in blocks.
fn dsm_range(range: &[u8]) -> (u64, u64) {
    let blocks = u64::from(u32::from_le_bytes(range[4..8].try_into().expect("4 bytes")));
    let start = u64::from_le_bytes(range[8..16].try_into().expect("8 bytes"));
    (start, blocks)
}

/// The next `write_zeroes` of a deallocate after `progress_blocks` of its ranges, in order:
/// (LBA, blocks), at most [`WRITE_ZEROES_BLOCKS_MAX`] blocks; `None` when every range is done.
pub fn deallocate_chunk(ranges: &[u8], progress_blocks: u64) -> Option<(u64, u64)> {
    assert!(ranges.len().is_multiple_of(DSM_RANGE_BYTES));
    let mut skip = progress_blocks;
    for range in ranges.chunks_exact(DSM_RANGE_BYTES) {
        let (start, blocks) = dsm_range(range);
        if skip >= blocks {
            skip -= blocks;
            continue;
        }
        return Some((start + skip, (blocks - skip).min(WRITE_ZEROES_BLOCKS_MAX)));
    }
    None
}

const _: () = assert!(DSM_RANGES_MAX * DSM_RANGE_BYTES <= TRANSFER_BYTES_MAX as usize);

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(list: &[(u64, u32)]) -> Vec<u8> {
        let mut bytes = vec![0u8; list.len() * DSM_RANGE_BYTES];
        for (range, &(start, blocks)) in bytes.chunks_exact_mut(DSM_RANGE_BYTES).zip(list) {
            range[4..8].copy_from_slice(&blocks.to_le_bytes());
            range[8..16].copy_from_slice(&start.to_le_bytes());
        }
        bytes
    }

    fn all_chunks(bytes: &[u8]) -> Vec<(u64, u64)> {
        let mut progress = 0;
        let mut chunks = Vec::new();
        while let Some((lba, blocks)) = deallocate_chunk(bytes, progress) {
            assert!(blocks > 0 && blocks <= WRITE_ZEROES_BLOCKS_MAX);
            chunks.push((lba, blocks));
            progress += blocks;
        }
        chunks
    }

    #[test]
    fn deallocate_walks_ranges_in_order_and_splits_large_ones() {
        let bytes = ranges(&[(1000, 100_000), (0, 0), (200, 8), (5, u32::MAX)]);
        let chunks = all_chunks(&bytes);
        assert_eq!(
            &chunks[..4],
            &[(1000, 65536), (66536, 34464), (200, 8), (5, 65536)]
        );
        let last = *chunks.last().unwrap();
        assert_eq!(last.0 + last.1, 5 + u64::from(u32::MAX));
        let total: u64 = chunks.iter().map(|&(_, blocks)| blocks).sum();
        assert_eq!(total, 100_000 + 8 + u64::from(u32::MAX));
    }

    #[test]
    fn deallocate_of_empty_ranges_has_nothing_to_do() {
        assert_eq!(deallocate_chunk(&ranges(&[(7, 0), (9, 0)]), 0), None);
        assert_eq!(deallocate_chunk(&ranges(&[(7, 4)]), 4), None);
    }
}
