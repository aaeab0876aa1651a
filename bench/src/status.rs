//! Human-readable NVMe completion statuses (NVMe Base 2.0 figures 100-103, Fabrics 1.1 figure 12),
//! for error messages. A candidate to move next to `Status` in `nvmirror_nvmf::pdu`.

use nvmirror_nvmf::pdu::{Status, StatusCodeType};

fn generic_name(sc: u8) -> Option<&'static str> {
    Some(match sc {
        0x00 => "Successful Completion",
        0x01 => "Invalid Command Opcode",
        0x02 => "Invalid Field in Command",
        0x03 => "Command ID Conflict",
        0x04 => "Data Transfer Error",
        0x05 => "Commands Aborted due to Power Loss Notification",
        0x06 => "Internal Error",
        0x07 => "Command Abort Requested",
        0x08 => "Command Aborted due to SQ Deletion",
        0x0b => "Invalid Namespace or Format",
        0x0c => "Command Sequence Error",
        0x0d => "Invalid SGL Segment Descriptor",
        0x0f => "Data SGL Length Invalid",
        0x11 => "SGL Descriptor Type Invalid",
        0x16 => "SGL Offset Invalid",
        0x19 => "Keep Alive Timer Expired",
        0x1a => "Keep Alive Timeout Invalid",
        0x20 => "Namespace is Write Protected",
        0x22 => "Transient Transport Error",
        0x80 => "LBA Out of Range",
        0x81 => "Capacity Exceeded",
        0x82 => "Namespace Not Ready",
        _ => return None,
    })
}

fn command_specific_name(sc: u8) -> Option<&'static str> {
    Some(match sc {
        0x01 => "Invalid Queue Identifier",
        0x02 => "Invalid Queue Size",
        0x05 => "Asynchronous Event Request Limit Exceeded",
        0x09 => "Invalid Log Page",
        0x0d => "Feature Identifier Not Saveable",
        0x0e => "Feature Not Changeable",
        0x0f => "Feature Not Namespace Specific",
        0x80 => "Connect Incompatible Format",
        0x81 => "Connect Controller Busy",
        0x82 => "Connect Invalid Parameters",
        0x83 => "Connect Restart Discovery",
        0x84 => "Connect Invalid Host",
        _ => return None,
    })
}

fn path_name(sc: u8) -> Option<&'static str> {
    Some(match sc {
        0x00 => "Internal Path Error",
        0x01 => "Asymmetric Access Persistent Loss",
        0x02 => "Asymmetric Access Inaccessible",
        0x03 => "Asymmetric Access Transition",
        0x60 => "Controller Pathing Error",
        0x70 => "Host Pathing Error",
        0x71 => "Command Aborted By Host",
        _ => return None,
    })
}

fn media_name(sc: u8) -> Option<&'static str> {
    Some(match sc {
        0x80 => "Write Fault",
        0x81 => "Unrecovered Read Error",
        0x82 => "End-to-end Guard Check Error",
        0x86 => "Access Denied",
        _ => return None,
    })
}

/// E.g. "Command Specific / Connect Invalid Host (SCT 1, SC 0x84, DNR)".
pub fn describe_status(status: &Status) -> String {
    let (kind, name) = match status.sct {
        StatusCodeType::Generic => ("Generic", generic_name(status.sc)),
        StatusCodeType::CommandSpecific => ("Command Specific", command_specific_name(status.sc)),
        StatusCodeType::MediaError => ("Media and Data Integrity", media_name(status.sc)),
        StatusCodeType::PathRelated => ("Path Related", path_name(status.sc)),
        StatusCodeType::VendorSpecific => ("Vendor Specific", None),
        StatusCodeType::Reserved(_) => ("Reserved", None),
    };
    format!(
        "{kind} / {} (SCT {}, SC {:#04x}{})",
        name.unwrap_or("unknown status"),
        status.sct.to_bits(),
        status.sc,
        if status.dnr { ", DNR" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmirror_nvmf::pdu::{CommandSpecificStatus, GenericStatus};

    #[test]
    fn names_generic_and_command_specific_codes() {
        let lba = describe_status(&GenericStatus::LbaOutOfRange.into());
        assert_eq!(lba, "Generic / LBA Out of Range (SCT 0, SC 0x80, DNR)");
        let host = describe_status(&CommandSpecificStatus::ConnectInvalidHost.into());
        assert!(
            host.starts_with("Command Specific / Connect Invalid Host (SCT 1, SC 0x84"),
            "{host}"
        );
        let unknown = Status {
            sct: StatusCodeType::Generic,
            sc: 0x7e,
            dnr: false,
            more: false,
        };
        assert_eq!(
            describe_status(&unknown),
            "Generic / unknown status (SCT 0, SC 0x7e)"
        );
    }
}
