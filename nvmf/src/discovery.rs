//! The discovery log page (NVMe over Fabrics 1.1 section 5.3, figures 38 and 39): a 1024-byte header
//! (generation counter, record count) and one 1024-byte entry per (subsystem, listener), so
//! `nvme discover` / `spdk_nvme_discover` find every configured subsystem over TCP.

use std::net::SocketAddr;

use crate::identify::put_ascii;
use crate::target::Target;

pub const HEADER_BYTES: usize = 1024;
pub const ENTRY_BYTES: usize = 1024;
/// TRTYPE for TCP, ADRFAM values, SUBTYPE for an NVM subsystem, TREQ "secure channel not required".
pub const TRTYPE_TCP: u8 = 3;
pub const ADRFAM_IPV4: u8 = 1;
pub const ADRFAM_IPV6: u8 = 2;
pub const SUBTYPE_NVM: u8 = 2;
pub const TREQ_SECURE_CHANNEL_NOT_REQUIRED: u8 = 0b10;
/// Generation counter: the configuration is fixed for the target's life.
pub const GENERATION: u64 = 1;

fn entries(target: &Target) -> impl Iterator<Item = (usize, usize, SocketAddr)> + '_ {
    let config = &target.config;
    (0..config.subsystems.len()).flat_map(move |subsystem| {
        config
            .listeners
            .iter()
            .enumerate()
            .map(move |(port, &address)| (subsystem, port, address))
    })
}

pub fn log_page_bytes(target: &Target) -> usize {
    HEADER_BYTES + entries(target).count() * ENTRY_BYTES
}

/// Writes the part of the log page that starts at `offset` into `out`.
pub fn write_log_page(target: &Target, offset: usize, out: &mut [u8]) {
    let mut page = vec![0u8; log_page_bytes(target)];
    let count = entries(target).count() as u64;
    page[0..8].copy_from_slice(&GENERATION.to_le_bytes());
    page[8..16].copy_from_slice(&count.to_le_bytes());
    for (index, (subsystem, port, address)) in entries(target).enumerate() {
        let entry = &mut page[HEADER_BYTES + index * ENTRY_BYTES..][..ENTRY_BYTES];
        write_entry(
            entry,
            &target.config.subsystems[subsystem].nqn,
            port as u16,
            address,
        );
    }
    out.copy_from_slice(&page[offset..offset + out.len()]);
}

fn write_entry(entry: &mut [u8], nqn: &str, port_id: u16, address: SocketAddr) {
    entry[0] = TRTYPE_TCP;
    entry[1] = if address.is_ipv4() {
        ADRFAM_IPV4
    } else {
        ADRFAM_IPV6
    };
    entry[2] = SUBTYPE_NVM;
    entry[3] = TREQ_SECURE_CHANNEL_NOT_REQUIRED;
    entry[4..6].copy_from_slice(&port_id.to_le_bytes());
    entry[6..8].copy_from_slice(&0xffffu16.to_le_bytes()); // CNTLID: dynamic
    entry[8..10].copy_from_slice(&crate::config::ADMIN_QUEUE_DEPTH.to_le_bytes()); // ASQSZ
    put_ascii(&mut entry[32..64], &address.port().to_string());
    entry[256..256 + nqn.len()].copy_from_slice(nqn.as_bytes());
    put_ascii(&mut entry[512..768], &address.ip().to_string());
    entry[768] = 0; // TSAS for TCP: SECTYPE none
}
