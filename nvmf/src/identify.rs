//! Identify (NVMe Base 2.0 section 5.17): controller (CNS 01h), namespace (CNS 00h), active namespace
//! list (CNS 02h) and namespace identification descriptors (CNS 03h, with a stable NGUID and UUID from the
//! backend), plus the Fabrics fields (IOCCSZ, IORCSZ, ICDOFF, MSDBD) hosts size their capsules from.

use crate::backend::{Backend, LBA_BYTES};
use crate::config::{ADMIN_QUEUE_DEPTH, AER_OUTSTANDING_MAX, DISCOVERY_NQN, TRANSFER_BYTES_MAX};
use crate::controller::{ControllerKind, KEEP_ALIVE_SUPPORT_100MS, PAGE_BYTES, VERSION};
use crate::pdu::{GenericStatus, Status, CQE_BYTES, SQE_BYTES};
use crate::poll_group::Context;
use crate::request::{Outcome, QueueState, Request};

/// Size of every Identify data structure.
pub const IDENTIFY_BYTES: usize = 4096;
/// CNS values implemented.
pub const CNS_NAMESPACE: u8 = 0x00;
pub const CNS_CONTROLLER: u8 = 0x01;
pub const CNS_ACTIVE_NAMESPACES: u8 = 0x02;
pub const CNS_NAMESPACE_DESCRIPTORS: u8 = 0x03;
/// Firmware revision reported in Identify Controller and the Firmware Slot Information log page.
pub const FIRMWARE_REVISION: &str = "0.1";
/// Size of the FR field (and of a firmware slot's revision).
pub const FIRMWARE_REVISION_BYTES: usize = 8;
const _: () = assert!(FIRMWARE_REVISION.len() <= FIRMWARE_REVISION_BYTES);
/// DLFEAT: deallocated blocks read as 00h (bits 2:0 = 001b), and Write Zeroes honours its Deallocate
/// bit (bit 3): both deallocate by zeroing through the backend ([`crate::io`]).
pub const DLFEAT: u8 = 0b1001;
/// MDTS in units of the minimum page size, as a power of two.
pub const MDTS: u8 = (TRANSFER_BYTES_MAX / PAGE_BYTES).trailing_zeros() as u8;
const _: () = assert!(1 << MDTS == TRANSFER_BYTES_MAX / PAGE_BYTES);

pub fn identify<B: Backend>(
    queue: &QueueState,
    request: &mut Request<B::WriteSlot>,
    context: &mut Context<'_, B>,
) -> Result<Outcome, Status> {
    let command = request.command;
    let cns = (command.cdw(10) & 0xff) as u8;
    let controller = queue
        .controller
        .as_ref()
        .expect("admin commands run after Connect");
    if controller.kind == ControllerKind::Discovery && cns != CNS_CONTROLLER {
        return Err(GenericStatus::InvalidField.into());
    }
    let namespaces = context.target.namespaces(controller.kind);
    assert!(request.data.len() >= IDENTIFY_BYTES);
    let data = &mut request.data[..IDENTIFY_BYTES];
    data.fill(0);
    let nsid = command.nsid();
    match cns {
        CNS_CONTROLLER => identify_controller(queue, data, context),
        CNS_NAMESPACE if namespaces.contains(&nsid) => identify_namespace(nsid, data, context)?,
        CNS_NAMESPACE_DESCRIPTORS if namespaces.contains(&nsid) => {
            namespace_descriptors(nsid, data, context)?
        }
        CNS_NAMESPACE | CNS_NAMESPACE_DESCRIPTORS => {
            return Err(GenericStatus::InvalidNamespaceOrFormat.into())
        }
        CNS_ACTIVE_NAMESPACES => {
            if nsid >= 0xffff_fffe {
                return Err(GenericStatus::InvalidNamespaceOrFormat.into());
            }
            let mut active: Vec<u32> = namespaces.iter().copied().filter(|&id| id > nsid).collect();
            active.sort_unstable();
            for (entry, id) in data.chunks_exact_mut(4).zip(active) {
                entry.copy_from_slice(&id.to_le_bytes());
            }
        }
        _ => return Err(GenericStatus::InvalidField.into()),
    }
    let length = crate::admin::response_bytes(request, IDENTIFY_BYTES);
    Ok(Outcome::RespondWithData(
        queue.completion(command.cid(), Status::SUCCESS),
        length,
    ))
}

/// Writes an ASCII string field: left-justified, padded with spaces (Base 2.0 section 1.5), and cut
/// to the field's size (the configured strings are checked against their fields at start).
pub(crate) fn put_ascii(field: &mut [u8], text: &str) {
    field.fill(b' ');
    let bytes = text.as_bytes();
    let length = bytes.len().min(field.len());
    field[..length].copy_from_slice(&bytes[..length]);
}

fn identify_controller<B: Backend>(queue: &QueueState, data: &mut [u8], context: &Context<'_, B>) {
    let controller = queue
        .controller
        .as_ref()
        .expect("admin commands run after Connect");
    let config = &context.target.config;
    let (serial, model, namespace_count, kind_code) = match controller.kind {
        ControllerKind::Nvm { subsystem_index } => {
            let subsystem = &config.subsystems[subsystem_index];
            let highest = subsystem.namespaces.iter().copied().max().unwrap_or(0);
            (
                subsystem.serial.as_str(),
                subsystem.model.as_str(),
                highest,
                1u8,
            )
        }
        ControllerKind::Discovery => ("", "nvmirror discovery", 0, 2u8),
    };
    put_ascii(&mut data[4..24], serial);
    put_ascii(&mut data[24..64], model);
    put_ascii(
        &mut data[64..64 + FIRMWARE_REVISION_BYTES],
        FIRMWARE_REVISION,
    );
    data[77] = MDTS;
    data[78..80].copy_from_slice(&controller.cntlid.to_le_bytes());
    data[80..84].copy_from_slice(&VERSION.to_le_bytes());
    data[92..96].copy_from_slice(&(1u32 << 8).to_le_bytes()); // OAES: namespace attribute notices
    data[111] = kind_code; // CNTRLTYPE
    data[258] = 3; // ACL: 4 aborts, 0's based
    data[259] = (AER_OUTSTANDING_MAX - 1) as u8; // AERL, 0's based
    data[260] = 1 << 1 | 1; // FRMW: slot 1 read-only, one slot
    data[261] = 1 << 2; // LPA: extended data for Get Log Page
    data[263] = 0; // NPSS: one power state
    data[320..322].copy_from_slice(&KEEP_ALIVE_SUPPORT_100MS.to_le_bytes()); // KAS
    data[512] = 0x66; // SQES: 64-byte entries
    data[513] = 0x44; // CQES: 16-byte entries
    let maxcmd = if controller.kind == ControllerKind::Discovery {
        ADMIN_QUEUE_DEPTH
    } else {
        config.queue_depth_max
    };
    data[514..516].copy_from_slice(&maxcmd.to_le_bytes());
    data[516..520].copy_from_slice(&namespace_count.to_le_bytes()); // NN
    if controller.kind != ControllerKind::Discovery {
        data[520..522].copy_from_slice(&((1u16 << 2) | (1 << 3)).to_le_bytes()); // ONCS: DSM, Write Zeroes
                                                                                 // VWC: a volatile write cache is present (bit 0), so Flush is meaningful.
        data[525] = u8::from(config.volatile_write_cache);
    }
    // SGLS: SGLs supported, Offset (in-capsule) and Transport SGL Data Block descriptors supported.
    data[536..540].copy_from_slice(&(1u32 | (1 << 20) | (1 << 21)).to_le_bytes());
    let subnqn = if controller.kind == ControllerKind::Discovery {
        DISCOVERY_NQN
    } else {
        &controller.subnqn
    };
    data[768..768 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
    let in_capsule = if controller.kind == ControllerKind::Discovery {
        0
    } else {
        config.in_capsule_data_bytes
    };
    let ioccsz = (SQE_BYTES as u32 + in_capsule) / 16;
    data[1792..1796].copy_from_slice(&ioccsz.to_le_bytes());
    data[1796..1800].copy_from_slice(&((CQE_BYTES / 16) as u32).to_le_bytes()); // IORCSZ
    data[1800..1802].copy_from_slice(&0u16.to_le_bytes()); // ICDOFF
    data[1802] = 0; // FCATT: dynamic controller model
    data[1803] = 1; // MSDBD: one SGL data block descriptor
}

fn identify_namespace<B: Backend>(
    nsid: u32,
    data: &mut [u8],
    context: &Context<'_, B>,
) -> Result<(), Status> {
    let info = context
        .backend
        .namespace(nsid)
        .ok_or(Status::from(GenericStatus::InvalidNamespaceOrFormat))?;
    let blocks = info.size_bytes / u64::from(LBA_BYTES);
    data[0..8].copy_from_slice(&blocks.to_le_bytes()); // NSZE
    data[8..16].copy_from_slice(&blocks.to_le_bytes()); // NCAP
    data[16..24].copy_from_slice(&blocks.to_le_bytes()); // NUSE
    data[25] = 0; // NLBAF: one format
    data[26] = 0; // FLBAS: format 0
    data[33] = DLFEAT;
    data[104..120].copy_from_slice(&info.uuid); // NGUID
    data[130] = LBA_BYTES.trailing_zeros() as u8; // LBAF0.LBADS
    Ok(())
}

fn namespace_descriptors<B: Backend>(
    nsid: u32,
    data: &mut [u8],
    context: &Context<'_, B>,
) -> Result<(), Status> {
    let info = context
        .backend
        .namespace(nsid)
        .ok_or(Status::from(GenericStatus::InvalidNamespaceOrFormat))?;
    // Descriptor: NIDT, NIDL, 2 reserved bytes, NID. Types: 2 = NGUID, 3 = UUID, 4 = command set (NVM).
    data[0] = 2;
    data[1] = 16;
    data[4..20].copy_from_slice(&info.uuid);
    data[20] = 3;
    data[21] = 16;
    data[24..40].copy_from_slice(&info.uuid);
    data[40] = 4;
    data[41] = 1;
    data[44] = 0;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_fields_are_space_padded_and_cut_to_size() {
        let mut field = [0u8; 8];
        put_ascii(&mut field, FIRMWARE_REVISION);
        assert_eq!(&field, b"0.1     ");
        put_ascii(&mut field[..4], "nvmirror");
        assert_eq!(&field, b"nvmi    ");
    }
}
