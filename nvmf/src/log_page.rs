//! Get Log Page (NVMe Base 2.0 section 5.16): Error Information, SMART / Health Information, Firmware
//! Slot Information and Changed Namespace List for I/O controllers; the Discovery log page (Fabrics
//! section 5.3, built in [`crate::discovery`]) for discovery controllers. Offsets and lengths follow
//! NUMDL/NUMDU and LPOL/LPOU; data beyond a page's end is returned as zeroes. A read with RAE (Retain
//! Asynchronous Event, dword 10 bit 15) cleared clears the events the page reports
//! ([`crate::async_event`]); for the Changed Namespace List that empties the list, in the same lock
//! as the copy so no change is lost between them.

use crate::backend::Backend;
use crate::controller::ControllerKind;
use crate::identify::{put_ascii, FIRMWARE_REVISION, FIRMWARE_REVISION_BYTES};
use crate::pdu::{CommandSpecificStatus, GenericStatus, Status};
use crate::poll_group::Context;
use crate::request::{Outcome, QueueState, Request};
use crate::spec::{
    CHANGED_NAMESPACES_BYTES, ERROR_ENTRY_BYTES, FIRMWARE_SLOT_BYTES, LID_CHANGED_NAMESPACES,
    LID_DISCOVERY, LID_ERROR_INFORMATION, LID_FIRMWARE_SLOT, LID_SMART_HEALTH, RAE,
    SMART_HEALTH_BYTES,
};

/// Composite temperature reported in SMART / Health (Kelvin).
pub const COMPOSITE_TEMPERATURE_KELVIN: u16 = 300;

pub fn get_log_page<B: Backend>(
    queue: &QueueState,
    request: &mut Request<B::WriteSlot>,
    context: &mut Context<'_, B>,
) -> Result<Outcome, Status> {
    let command = request.command;
    let lid = (command.cdw(10) & 0xff) as u8;
    let retain = command.cdw(10) & RAE != 0;
    let dwords = u64::from(command.cdw(10) >> 16) | (u64::from(command.cdw(11) & 0xffff) << 16);
    let length = ((dwords + 1) * 4) as usize;
    let offset = u64::from(command.cdw(12)) | (u64::from(command.cdw(13)) << 32);
    if length > request.data.len() || length > command.sgl().length() as usize {
        return Err(GenericStatus::InvalidField.into());
    }
    if !offset.is_multiple_of(4) {
        return Err(GenericStatus::InvalidField.into());
    }
    let controller = queue
        .controller
        .as_ref()
        .expect("admin commands run after Connect");
    let discovery = controller.kind == ControllerKind::Discovery;
    let page_bytes = match (lid, discovery) {
        (LID_DISCOVERY, true) => crate::discovery::log_page_bytes(context.target),
        (LID_ERROR_INFORMATION, _) => ERROR_ENTRY_BYTES,
        (LID_SMART_HEALTH, false) => SMART_HEALTH_BYTES,
        (LID_FIRMWARE_SLOT, false) => FIRMWARE_SLOT_BYTES,
        (LID_CHANGED_NAMESPACES, false) => CHANGED_NAMESPACES_BYTES,
        _ => return Err(CommandSpecificStatus::InvalidLogPage.into()),
    };
    if offset >= page_bytes as u64 && offset > 0 {
        return Err(GenericStatus::InvalidField.into());
    }
    let offset = offset as usize;
    let data = &mut request.data[..length];
    data.fill(0);
    let visible = length.min(page_bytes - offset);
    match lid {
        LID_DISCOVERY => {
            crate::discovery::write_log_page(context.target, offset, &mut data[..visible])
        }
        LID_SMART_HEALTH => write_window(&smart_health(), offset, &mut data[..visible]),
        LID_FIRMWARE_SLOT => write_window(&firmware_slot(), offset, &mut data[..visible]),
        LID_CHANGED_NAMESPACES => {
            let mut page = [0u8; CHANGED_NAMESPACES_BYTES];
            controller.with_async_events(|events| {
                events.write_changed_namespaces(&mut page);
                events.log_page_read(lid, retain);
            });
            write_window(&page, offset, &mut data[..visible]);
        }
        // No errors are logged: all zeroes.
        _ => {}
    }
    if lid != LID_CHANGED_NAMESPACES {
        controller.with_async_events(|events| events.log_page_read(lid, retain));
    }
    Ok(Outcome::RespondWithData(
        queue.completion(command.cid(), Status::SUCCESS),
        length as u32,
    ))
}

fn write_window(page: &[u8], offset: usize, out: &mut [u8]) {
    out.copy_from_slice(&page[offset..offset + out.len()]);
}

fn smart_health() -> [u8; SMART_HEALTH_BYTES] {
    let mut page = [0u8; SMART_HEALTH_BYTES];
    page[1..3].copy_from_slice(&COMPOSITE_TEMPERATURE_KELVIN.to_le_bytes());
    page[3] = 100; // available spare, percent
    page[4] = 10; // available spare threshold, percent
    page
}

fn firmware_slot() -> [u8; FIRMWARE_SLOT_BYTES] {
    let mut page = [0u8; FIRMWARE_SLOT_BYTES];
    page[0] = 1; // AFI: slot 1 active
    put_ascii(&mut page[8..8 + FIRMWARE_REVISION_BYTES], FIRMWARE_REVISION);
    page
}
