//! NVMe Base 2.0 constants that more than one part of the target uses: log page identifiers and
//! sizes, feature identifiers, and the asynchronous event fields. A leaf module (it imports
//! nothing), so a part that needs only a number (the events in [`crate::async_event`] name their
//! log page) does not depend on the part that serves it ([`crate::log_page`]). The values the PDU
//! codec decodes and host tools share (opcodes, status codes, SGL identifiers) live with their
//! wire structs in [`crate::pdu::nvme`], also a leaf.

/// Log page identifiers (Base 2.0 figure 202; the Discovery log page is Fabrics 1.1 section 5.3).
pub const LID_ERROR_INFORMATION: u8 = 0x01;
pub const LID_SMART_HEALTH: u8 = 0x02;
pub const LID_FIRMWARE_SLOT: u8 = 0x03;
pub const LID_CHANGED_NAMESPACES: u8 = 0x04;
pub const LID_DISCOVERY: u8 = 0x70;
/// Retain Asynchronous Event (Get Log Page dword 10 bit 15).
pub const RAE: u32 = 1 << 15;
/// Log page sizes (bytes).
pub const ERROR_ENTRY_BYTES: usize = 64;
pub const SMART_HEALTH_BYTES: usize = 512;
pub const FIRMWARE_SLOT_BYTES: usize = 512;
pub const CHANGED_NAMESPACES_BYTES: usize = 4096;

/// Feature identifiers (Base 2.0 figure 271) the controller answers.
pub mod feature {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
}

/// Asynchronous event type "Notice" (Base 2.0 figure 146; completion dword 0 bits 2:0).
pub const EVENT_TYPE_NOTICE: u8 = 0b010;
/// Asynchronous event information "Namespace Attribute Changed" of a Notice (figure 150).
pub const EVENT_INFO_NAMESPACE_ATTRIBUTE_CHANGED: u8 = 0x00;
/// Asynchronous Event Configuration (feature 0Bh) bit enabling Namespace Attribute Notices.
pub const CONFIG_NAMESPACE_ATTRIBUTE_NOTICES: u32 = 1 << 8;
