//! The embedded target against a spec-written host: fabrics, admin, I/O, and every bad-input class with a
//! second healthy connection doing verified I/O at the same time.

mod host;

use host::*;
use nvmirror_nvmf::pdu::*;
use nvmirror_nvmf::DeviceBackend;

#[test]
fn admin_identify_features_log_pages() {
    let server = serve_memory(config(true));
    let mut admin = Host::admin(server.address, false);
    let cap = admin.property_get(0x00, true);
    assert_eq!(
        u64::from(cap.dw0) | (u64::from(cap.dw1) << 32),
        (127 | 1 << 16 | 20 << 24 | 1 << 37)
    );
    assert_eq!(admin.property_get(0x08, false).dw0, 0x0001_0300);
    let (completion, data) = admin.admin_command(admin_opcode::IDENTIFY, 0, 1, 0, 4096);
    assert!(completion.status.is_success());
    assert_eq!(&data[4..11], b"SERIAL1");
    assert_eq!(u16::from_le_bytes([data[78], data[79]]), admin.cntlid);
    assert_eq!(
        u32::from_le_bytes(data[1792..1796].try_into().unwrap()),
        (64 + 8192) / 16
    );
    let (completion, data) = admin.admin_command(admin_opcode::IDENTIFY, 1, 0, 0, 4096);
    assert!(completion.status.is_success());
    assert_eq!(
        u64::from_le_bytes(data[0..8].try_into().unwrap()),
        (DEVICE_BYTES / 512) as u64
    );
    let nguid = data[104..120].to_vec();
    let (_, list) = admin.admin_command(admin_opcode::IDENTIFY, 0, 2, 0, 4096);
    assert_eq!(
        (u32::from_le_bytes(list[0..4].try_into().unwrap()), list[4]),
        (1, 0)
    );
    let (_, descriptors) = admin.admin_command(admin_opcode::IDENTIFY, 1, 3, 0, 4096);
    assert_eq!((descriptors[0], descriptors[1]), (2, 16));
    assert_eq!(&descriptors[4..20], &nguid[..]);
    assert_eq!(
        admin
            .admin_command(admin_opcode::IDENTIFY, 9, 0, 0, 4096)
            .0
            .status
            .sc,
        0x0b
    );
    // Features: number of queues, keep-alive, async event config.
    let (completion, _) =
        admin.admin_command(admin_opcode::SET_FEATURES, 0, 0x07, 3 | (3 << 16), 0);
    assert_eq!(completion.dw0, 3 | (3 << 16));
    assert!(admin
        .admin_command(admin_opcode::SET_FEATURES, 0, 0x0f, 30_000, 0)
        .0
        .status
        .is_success());
    assert_eq!(
        admin
            .admin_command(admin_opcode::GET_FEATURES, 0, 0x0f, 0, 0)
            .0
            .dw0,
        30_000
    );
    assert!(admin
        .admin_command(admin_opcode::SET_FEATURES, 0, 0x0b, 1 << 8, 0)
        .0
        .status
        .is_success());
    assert_eq!(
        admin
            .admin_command(admin_opcode::GET_FEATURES, 0, 0x0b, 0, 0)
            .0
            .dw0,
        1 << 8
    );
    // Log pages: error information, SMART, changed namespaces; an unknown page.
    let numdl = |bytes: u32| (bytes / 4 - 1) << 16;
    for (lid, bytes) in [(1u32, 64u32), (2, 512), (4, 4096)] {
        let (completion, data) = admin.admin_command(
            admin_opcode::GET_LOG_PAGE,
            0xffff_ffff,
            lid | numdl(bytes),
            0,
            bytes,
        );
        assert!(completion.status.is_success(), "log page {lid}");
        assert_eq!(data.len(), bytes as usize);
    }
    let (smart, _) = admin.admin_command(
        admin_opcode::GET_LOG_PAGE,
        0xffff_ffff,
        2 | numdl(512),
        0,
        512,
    );
    assert!(smart.status.is_success());
    let (bad, _) = admin.admin_command(admin_opcode::GET_LOG_PAGE, 0, 0x70 | numdl(1024), 0, 1024);
    assert_eq!(
        (bad.status.sct, bad.status.sc),
        (StatusCodeType::CommandSpecific, 0x09)
    );
    // Unknown admin opcode.
    let (invalid, _) = admin.admin_command(0x7e, 0, 0, 0, 0);
    assert_eq!((invalid.status.sc, invalid.status.dnr), (0x01, true));
    // AERs are held; the fifth exceeds the limit.
    for _ in 0..4 {
        let mut command = Command::zeroed();
        let cid = admin.cid();
        command
            .set_opcode(admin_opcode::ASYNC_EVENT_REQUEST)
            .set_cid(cid);
        admin.send_capsule(&command, &[]);
    }
    let (limit, _) = admin.admin_command(admin_opcode::ASYNC_EVENT_REQUEST, 0, 0, 0, 0);
    assert_eq!(
        (limit.status.sct, limit.status.sc),
        (StatusCodeType::CommandSpecific, 0x05)
    );
    // Keep Alive works, shutdown completes.
    assert!(admin
        .admin_command(admin_opcode::KEEP_ALIVE, 0, 0, 0, 0)
        .0
        .status
        .is_success());
    assert!(admin.property_set(0x14, 1 | (1 << 14)).status.is_success());
    assert_eq!(admin.property_get(0x1c, false).dw0 & 0b1100, 0b1000);
}

#[test]
fn io_in_capsule_r2t_flush_write_zeroes_dsm_with_digests() {
    for digests in [false, true] {
        let server = serve_memory(config(true));
        let admin = Host::admin(server.address, digests);
        let mut io = Host::io(server.address, admin.cntlid, 1, digests);
        let small: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        assert!(io.write(8, &small, true).status.is_success());
        assert_eq!(io.read(8, 8).1, small);
        let large: Vec<u8> = (0..65536u32).map(|i| (i * 13 + 1) as u8).collect();
        assert!(io.write(64, &large, false).status.is_success());
        assert_eq!(io.read(64, 128).1, large);
        let cid = io.cid();
        let mut flush = Command::zeroed();
        flush.set_opcode(io_opcode::FLUSH).set_cid(cid).set_nsid(1);
        assert!(io.execute(&flush, &[], &[]).0.status.is_success());
        let cid = io.cid();
        let mut zeroes = Command::zeroed();
        zeroes
            .set_opcode(io_opcode::WRITE_ZEROES)
            .set_cid(cid)
            .set_nsid(1)
            .set_u64_at(40, 64)
            .set_cdw(12, 7);
        assert!(io.execute(&zeroes, &[], &[]).0.status.is_success());
        assert_eq!(io.read(64, 8).1, vec![0u8; 4096]);
        assert_eq!(io.read(72, 8).1, large[4096..8192].to_vec());
        let mut range = [0u8; 16];
        range[4..8].copy_from_slice(&8u32.to_le_bytes());
        range[8..16].copy_from_slice(&8u64.to_le_bytes());
        let cid = io.cid();
        let mut dsm = Command::zeroed();
        dsm.set_opcode(io_opcode::DATASET_MANAGEMENT)
            .set_cid(cid)
            .set_nsid(1)
            .set_cdw(10, 0)
            .set_cdw(11, 1 << 2);
        dsm.set_sgl(SglDescriptor::InCapsule {
            offset: 0,
            length: 16,
        });
        assert!(io.execute(&dsm, &range, &[]).0.status.is_success());
        // Out-of-range LBA, unknown I/O opcode.
        let last_lba = (DEVICE_BYTES / 512) as u64 - 4;
        let status = io.write(last_lba, &small, true).status;
        assert_eq!((status.sc, status.dnr), (0x80, true));
        assert_eq!(io.read(last_lba, 8).0.status.sc, 0x80);
        io.verified_io(100, 5);
    }
}

#[test]
fn connect_rejections_carry_iattr_and_ipo() {
    let server = serve_memory(config(false));
    let mut healthy_admin = Host::admin(server.address, false);
    let mut healthy = Host::io(server.address, healthy_admin.cntlid, 1, false);
    let mut host = Host::open(server.address, false, false);
    let unknown = host.connect(0, "nqn.2024-01.io.nvmirror:nope", HOSTNQN, 0xffff, 0);
    assert_eq!(
        (unknown.status.sct, unknown.status.sc),
        (StatusCodeType::CommandSpecific, 0x82)
    );
    assert_eq!(((unknown.dw0 >> 16) & 0xff, unknown.dw0 & 0xffff), (1, 256));
    let denied = host.connect(
        0,
        NQN,
        "nqn.2014-08.org.nvmexpress:uuid:intruder",
        0xffff,
        0,
    );
    assert_eq!(
        (denied.status.sct, denied.status.sc),
        (StatusCodeType::CommandSpecific, 0x84)
    );
    let bad_cntlid = host.connect(2, NQN, HOSTNQN, 0x4242, 0);
    assert_eq!(
        (
            bad_cntlid.status.sc,
            (bad_cntlid.dw0 >> 16) & 0xff,
            bad_cntlid.dw0 & 0xffff
        ),
        (0x82, 1, 16)
    );
    let duplicate_qid = host.connect(1, NQN, HOSTNQN, healthy_admin.cntlid, 0);
    assert_eq!(
        (
            duplicate_qid.status.sc,
            (duplicate_qid.dw0 >> 16) & 0xff,
            duplicate_qid.dw0 & 0xffff
        ),
        (0x82, 0, 42)
    );
    healthy.verified_io(0, 1);
    assert!(healthy_admin
        .admin_command(admin_opcode::KEEP_ALIVE, 0, 0, 0, 0)
        .0
        .status
        .is_success());
}

fn capsule_bytes(command: &Command, framing: &Framing, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER_BYTES_MAX + data.len()];
    let prefix = encode_capsule_cmd(&mut buf, command, framing, data.len());
    buf[prefix..prefix + data.len()].copy_from_slice(data);
    buf.truncate(prefix + data.len());
    buf
}

type Corruption = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn malformed_pdus_terminate_only_their_connection() {
    let server = serve_memory(config(true));
    let admin = Host::admin(server.address, false);
    let mut healthy = Host::io(server.address, admin.cntlid, 1, true);
    let keep_alive = Command::property_get(1, 0x1c, false);
    let good = capsule_bytes(&keep_alive, &Framing::PLAIN, &[]);
    let cases: Vec<(&str, Corruption, Fes, Option<u32>)> = vec![
        (
            "unknown type",
            Box::new(|pdu: &mut Vec<u8>| pdu[0] = 0x0c),
            Fes::InvalidHeaderField,
            Some(0),
        ),
        (
            "bad hlen",
            Box::new(|pdu: &mut Vec<u8>| pdu[2] = 80),
            Fes::InvalidHeaderField,
            Some(2),
        ),
        (
            "bad plen",
            Box::new(|pdu: &mut Vec<u8>| pdu[4] = 40),
            Fes::InvalidHeaderField,
            Some(4),
        ),
        (
            "bad pdo",
            Box::new(|pdu: &mut Vec<u8>| {
                pdu[4] = 72 + 8;
                pdu[3] = 16;
                pdu.extend_from_slice(&[0; 8])
            }),
            Fes::InvalidHeaderField,
            Some(3),
        ),
    ];
    for (name, corrupt, fes, fei) in cases {
        let mut host = Host::open(server.address, false, false);
        let mut pdu = good.clone();
        corrupt(&mut pdu);
        host.send_raw(&pdu);
        let reported = host.expect_term_req(fes);
        if let Some(fei) = fei {
            assert_eq!(reported, fei, "{name}");
        }
        healthy.verified_io(16, name.len() as u8);
    }
    // A PDU before ICReq.
    let mut raw = Host::raw(server.address);
    raw.send_raw(&good);
    raw.expect_term_req(Fes::PduSequenceError);
    // Bad header digest.
    let mut host = Host::open(server.address, true, false);
    let mut pdu = capsule_bytes(&keep_alive, &host.framing, &[]);
    pdu[20] ^= 0xff;
    host.send_raw(&pdu);
    host.expect_term_req(Fes::HeaderDigestError);
    // H2CData for an unknown transfer tag.
    let mut host = Host::io(server.address, admin.cntlid, 2, false);
    let header = DataHeader {
        cccid: 9,
        ttag: 77,
        datao: 0,
        datal: 512,
        last: true,
        success: false,
    };
    host.send_h2c(header, &[0; 512]);
    assert_eq!(host.expect_term_req(Fes::InvalidHeaderField), 10);
    healthy.verified_io(32, 9);
}

#[test]
fn identify_reports_the_configured_volatile_write_cache() {
    for volatile_write_cache in [true, false] {
        let mut config = config(true);
        config.volatile_write_cache = volatile_write_cache;
        let server = serve_memory(config);
        let mut admin = Host::admin(server.address, false);
        let (completion, data) = admin.admin_command(admin_opcode::IDENTIFY, 0, 1, 0, 4096);
        assert!(completion.status.is_success());
        assert_eq!(data[525] & 1, u8::from(volatile_write_cache), "VWC");
        let (completion, _) = admin.admin_command(admin_opcode::GET_FEATURES, 0, 0x06, 0, 0);
        assert!(completion.status.is_success());
        assert_eq!(completion.dw0, u32::from(volatile_write_cache), "WCE");
    }
    assert!(
        config(true).volatile_write_cache,
        "the default is today's value"
    );
}

/// Reads a C2HTermReq as bytes: its PLEN, FES and error data; then expects the connection closed.
fn receive_term_req_bytes(host: &mut Host) -> (u32, u16, Vec<u8>) {
    use std::io::Read;
    let mut common = [0u8; COMMON_HEADER_BYTES];
    host.stream.read_exact(&mut common).expect("a TermReq");
    let header = CommonHeader::parse(&common);
    assert_eq!(header.pdu_type, PduType::C2HTermReq as u8);
    // NVMe/TCP 1.0: error data is at most 128 bytes (Linux: NVME_TCP_MAX_C2HTERM_PLEN).
    assert!(header.plen <= 152, "PLEN {}", header.plen);
    let mut whole = vec![0u8; header.plen as usize];
    whole[..8].copy_from_slice(&common);
    host.stream
        .read_exact(&mut whole[8..])
        .expect("TermReq body");
    let fes = u16::from_le_bytes([whole[8], whole[9]]);
    let mut byte = [0u8; 1];
    assert_eq!(host.stream.read(&mut byte).unwrap_or(0), 0, "closed");
    (header.plen, fes, whole[24..].to_vec())
}

#[test]
fn term_req_quotes_the_offending_header_within_152_bytes() {
    let server = serve_memory(config(true));
    let admin = Host::admin(server.address, false);
    // A CapsuleCmd claiming a 200-byte header: the first 128 bytes are quoted, PLEN 152.
    let mut host = Host::open(server.address, false, false);
    let keep_alive = Command::property_get(1, 0x1c, false);
    let mut pdu = capsule_bytes(&keep_alive, &Framing::PLAIN, &[]);
    pdu[2] = 200;
    pdu.extend((0..184u32).map(|i| i as u8 ^ 0x5a));
    pdu[4..8].copy_from_slice(&256u32.to_le_bytes());
    host.send_raw(&pdu);
    let (plen, fes, quoted) = receive_term_req_bytes(&mut host);
    assert_eq!(fes, Fes::InvalidHeaderField as u16);
    assert_eq!(plen, 152);
    assert_eq!(quoted, pdu[..128]);
    // A well-formed H2CData for an unknown tag: its whole 24-byte header is quoted.
    let mut host = Host::io(server.address, admin.cntlid, 1, false);
    let header = DataHeader {
        cccid: 9,
        ttag: 77,
        datao: 0,
        datal: 512,
        last: true,
        success: false,
    };
    let mut sent = [0u8; 64];
    let prefix = header.encode_into(&mut sent, PduType::H2CData, &host.framing);
    host.send_h2c(header, &[0; 512]);
    let (plen, fes, quoted) = receive_term_req_bytes(&mut host);
    assert_eq!(fes, Fes::InvalidHeaderField as u16);
    assert_eq!(quoted, sent[..PduType::H2CData.shape().hlen as usize]);
    assert_eq!(plen as usize, 24 + prefix);
}

#[test]
fn bad_data_digest_fails_the_command_not_the_connection() {
    let server = serve_memory(config(true));
    let admin = Host::admin(server.address, true);
    let mut healthy = Host::io(server.address, admin.cntlid, 1, true);
    let mut io = Host::io(server.address, admin.cntlid, 2, true);
    healthy.verified_io(0, 3);
    let cid = io.cid();
    let data = vec![0xabu8; 4096];
    let command = Command::read_write(
        io_opcode::WRITE,
        cid,
        1,
        0,
        8,
        SglDescriptor::InCapsule {
            offset: 0,
            length: 4096,
        },
    );
    let mut pdu = capsule_bytes(&command, &io.framing, &data);
    pdu.extend_from_slice(&(crc32c(&data) ^ 1).to_le_bytes());
    io.send_raw(&pdu);
    let Some(Received {
        pdu: Pdu::CapsuleResp(completion),
        ..
    }) = io.receive()
    else {
        panic!("expected a response")
    };
    assert_eq!((completion.status.sc, completion.status.dnr), (0x22, false));
    // The aborted write never reached the medium; the connection still works.
    let (_, read) = io.read(0, 16);
    assert_ne!(&read[..4096], &data[..]);
    io.verified_io(64, 4);
    healthy.verified_io(128, 5);
}

#[test]
fn keep_alive_expiry_closes_the_controller() {
    let server = serve_memory(config(true));
    let mut admin = Host::open(server.address, false, false);
    let completion = admin.connect(0, NQN, HOSTNQN, 0xffff, 300);
    assert!(completion.status.is_success());
    assert!(admin.property_set(0x14, 1).status.is_success());
    let mut io = Host::io(server.address, completion.dw0 as u16, 1, false);
    let mut other = Host::admin(server.address, false);
    let mut other_io = Host::io(server.address, other.cntlid, 1, false);
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(800) {
        assert!(other
            .admin_command(admin_opcode::KEEP_ALIVE, 0, 0, 0, 0)
            .0
            .status
            .is_success());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        admin.receive().is_none(),
        "admin queue closed after the keep-alive timeout"
    );
    assert!(
        io.receive().is_none(),
        "I/O queue of the expired controller closed"
    );
    other_io.verified_io(0, 7);
}

#[test]
fn busy_backend_commands_wait_then_complete() {
    let backend = BusyBackend {
        inner: DeviceBackend::new(vec![MemoryDevice::new(DEVICE_BYTES)]),
        busy_reservations: 50,
    };
    let server = serve(config(true), backend);
    let admin = Host::admin(server.address, false);
    let mut io = Host::io(server.address, admin.cntlid, 1, false);
    let data = vec![0x5au8; 4096];
    assert!(io.write(0, &data, true).status.is_success());
    assert!(io.write(8, &data, false).status.is_success());
    assert_eq!(io.read(0, 16).1, [data.clone(), data].concat());
}

#[test]
fn config_validation_names_the_field() {
    let mut bad = config(true);
    bad.in_capsule_data_bytes = 100;
    assert!(bad
        .validate()
        .unwrap_err()
        .starts_with("in_capsule_data_bytes"));
    let mut bad = config(false);
    bad.subsystems[0].allowed_hosts.clear();
    assert!(bad
        .validate()
        .unwrap_err()
        .starts_with("subsystems[0].allowed_hosts"));
    let mut bad = config(true);
    bad.subsystems[0].nqn = "nqn.2014-08.org.nvmexpress.discovery".into();
    assert!(bad.validate().unwrap_err().contains("reserved"));
}

/// Two Keep Alives answered in order: had the target completed a held request, that completion would
/// have come before the second Keep Alive's (`execute` checks each completion's CID).
fn assert_nothing_completes(admin: &mut Host) {
    for _ in 0..2 {
        assert!(admin
            .admin_command(admin_opcode::KEEP_ALIVE, 0, 0, 0, 0)
            .0
            .status
            .is_success());
    }
}

/// The NSIDs listed in a Changed Namespace List page (zero terminated).
fn changed_namespaces(page: &[u8]) -> Vec<u32> {
    assert_eq!(page.len(), 4096);
    let listed: Vec<u32> = page
        .chunks_exact(4)
        .map(|entry| u32::from_le_bytes(entry.try_into().unwrap()))
        .take_while(|&nsid| nsid != 0)
        .collect();
    assert!(
        page[listed.len() * 4..].iter().all(|&byte| byte == 0),
        "zero filled after the list"
    );
    listed
}

/// AER completion dword 0: type 2 (notice), information 00h (namespace attribute changed), log page 04h.
const NAMESPACE_ATTRIBUTE_CHANGED: u32 = 0x0004_0002;

#[test]
fn async_event_request_completes_when_a_namespace_changes() {
    let server = serve_memory(config(true));
    let mut admin = Host::admin(server.address, false);
    // Notices disabled (the default): the change is listed, the request stays held.
    let first = admin.send_async_event_request();
    assert_eq!(server.target.namespace_changed(1), 1);
    assert_nothing_completes(&mut admin);
    let (completion, page) = admin.get_log_page(0x04, 4096, false);
    assert!(completion.status.is_success());
    assert_eq!(changed_namespaces(&page), [1]);
    assert_eq!(
        changed_namespaces(&admin.get_log_page(0x04, 4096, false).1),
        []
    );
    // Enabled: the outstanding request completes with type notice, info 00h, log page 04h.
    assert!(admin
        .admin_command(admin_opcode::SET_FEATURES, 0, 0x0b, 1 << 8, 0)
        .0
        .status
        .is_success());
    assert_eq!(server.target.namespace_changed(1), 1);
    let event = admin.receive_completion();
    assert_eq!(event.cid, first);
    assert!(event.status.is_success());
    assert_eq!(event.dw0, NAMESPACE_ATTRIBUTE_CHANGED);
    let (completion, page) = admin.get_log_page(0x04, 4096, false);
    assert!(completion.status.is_success());
    assert_eq!(changed_namespaces(&page), [1]);
    assert_eq!(
        changed_namespaces(&admin.get_log_page(0x04, 4096, false).1),
        [],
        "cleared by the read"
    );
    // An event raised with no request outstanding completes the next one at once.
    assert_eq!(server.target.namespace_changed(1), 1);
    assert_nothing_completes(&mut admin);
    let second = admin.send_async_event_request();
    let event = admin.receive_completion();
    assert_eq!(
        (event.cid, event.dw0),
        (second, NAMESPACE_ATTRIBUTE_CHANGED)
    );
    // Masked until the log page is read with RAE cleared; RAE set keeps list and mask.
    let third = admin.send_async_event_request();
    assert_eq!(server.target.namespace_changed(1), 1);
    assert_nothing_completes(&mut admin);
    assert_eq!(
        changed_namespaces(&admin.get_log_page(0x04, 4096, true).1),
        [1]
    );
    assert_eq!(server.target.namespace_changed(1), 1);
    assert_nothing_completes(&mut admin);
    assert_eq!(
        changed_namespaces(&admin.get_log_page(0x04, 4096, false).1),
        [1]
    );
    assert_eq!(server.target.namespace_changed(1), 1);
    let event = admin.receive_completion();
    assert_eq!((event.cid, event.dw0), (third, NAMESPACE_ATTRIBUTE_CHANGED));
    // A namespace no subsystem exports concerns no controller.
    assert_eq!(server.target.namespace_changed(2), 0);
}

/// Dataset Management with `ranges` (LBA, blocks) and dword 11 `attributes`, ranges in-capsule.
fn dataset_management(io: &mut Host, ranges: &[(u64, u32)], attributes: u32) -> Completion {
    let mut data = vec![0u8; ranges.len() * 16];
    for (range, &(lba, blocks)) in data.chunks_exact_mut(16).zip(ranges) {
        range[4..8].copy_from_slice(&blocks.to_le_bytes());
        range[8..16].copy_from_slice(&lba.to_le_bytes());
    }
    let cid = io.cid();
    let mut command = Command::zeroed();
    command
        .set_opcode(io_opcode::DATASET_MANAGEMENT)
        .set_cid(cid)
        .set_nsid(1)
        .set_cdw(10, ranges.len() as u32 - 1)
        .set_cdw(11, attributes);
    command.set_sgl(SglDescriptor::InCapsule {
        offset: 0,
        length: data.len() as u32,
    });
    io.execute(&command, &data, &[]).0
}

#[test]
fn dataset_management_deallocate_zeroes_the_ranges() {
    const BLOCKS: u64 = 131_072;
    const DEALLOCATE: u32 = 1 << 2;
    let mut image: Vec<u8> = (0..BLOCKS as usize * 512)
        .map(|i| ((i / 512 * 31 + i) % 251 + 1) as u8)
        .collect();
    let backend = DeferredZeroesBackend::new(MemoryDevice::from_bytes(image.clone()));
    let calls = std::sync::Arc::clone(&backend.zeroes_calls);
    let server = serve(config(true), backend);
    let mut admin = Host::admin(server.address, false);
    let (_, namespace) = admin.admin_command(admin_opcode::IDENTIFY, 1, 0, 0, 4096);
    assert_eq!(
        namespace[33], 0b1001,
        "DLFEAT: reads zeroes, Write Zeroes DEAC"
    );
    let mut io = Host::io(server.address, admin.cntlid, 1, false);
    let check = |io: &mut Host, image: &[u8], lba: u64, blocks: u32| {
        let (completion, data) = io.read(lba, blocks);
        assert!(completion.status.is_success());
        let start = lba as usize * 512;
        assert!(
            data == image[start..start + blocks as usize * 512],
            "blocks {lba}..{}",
            lba + u64::from(blocks)
        );
    };
    // A range past the end fails the command before anything changes.
    let status = dataset_management(&mut io, &[(40, 8), (BLOCKS - 4, 8)], DEALLOCATE).status;
    assert_eq!((status.sc, status.dnr), (0x80, true));
    assert!(calls.lock().unwrap().is_empty());
    check(&mut io, &image, 32, 24);
    // Two ranges, one longer than a Write Zeroes: zeroes there, the pattern elsewhere, as soon as
    // the command completes (the backend applies a write_zeroes only when its token completes).
    let completion = dataset_management(&mut io, &[(1000, 100_000), (200, 8)], DEALLOCATE);
    assert!(completion.status.is_success());
    image[1000 * 512..101_000 * 512].fill(0);
    image[200 * 512..208 * 512].fill(0);
    for (lba, blocks) in [(192, 24), (992, 16), (66_530, 12), (100_992, 16), (0, 256)] {
        check(&mut io, &image, lba, blocks);
    }
    assert_eq!(
        *calls.lock().unwrap(),
        [(1000, 65_536), (66_536, 34_464), (200, 8)]
    );
    // Without the Deallocate attribute the ranges are only hints.
    let completion = dataset_management(&mut io, &[(300, 8)], 0b11);
    assert!(completion.status.is_success());
    check(&mut io, &image, 296, 16);
    assert_eq!(calls.lock().unwrap().len(), 3);
    io.verified_io(400, 6);
}

#[test]
fn clearing_cc_en_deletes_io_queues_and_aborts_async_event_requests() {
    const CC_ENABLED: u64 = 1 | (6 << 16) | (4 << 20);
    let server = serve_memory(config(true));
    let mut admin = Host::admin(server.address, false);
    let mut io = Host::io(server.address, admin.cntlid, 1, false);
    let other_admin = Host::admin(server.address, false);
    let mut other_io = Host::io(server.address, other_admin.cntlid, 1, false);
    io.verified_io(0, 1);
    // A delivered event stays masked (its log page unread) until the reset.
    assert!(admin
        .admin_command(admin_opcode::SET_FEATURES, 0, 0x0b, 1 << 8, 0)
        .0
        .status
        .is_success());
    let delivered = admin.send_async_event_request();
    assert_eq!(server.target.namespace_changed(1), 2);
    assert_eq!(admin.receive_completion().cid, delivered);
    let held = admin.send_async_event_request();
    assert_nothing_completes(&mut admin);
    // CC.EN = 0: the held request is aborted (SQ deletion), the Property Set succeeds.
    let cid = admin.cid();
    admin.send_capsule(
        &Command::property_set(cid, 0x14, false, CC_ENABLED & !1),
        &[],
    );
    let completions = [admin.receive_completion(), admin.receive_completion()];
    let aborted = completions.iter().find(|c| c.cid == held).expect("AER");
    assert_eq!(
        (aborted.status.sct, aborted.status.sc),
        (StatusCodeType::Generic, 0x08)
    );
    let set = completions
        .iter()
        .find(|c| c.cid == cid)
        .expect("Property Set");
    assert!(set.status.is_success());
    // The target closes the I/O queue's connection; CSTS.RDY clears; the admin queue stays.
    io.stream
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        matches!(std::io::Read::read(&mut io.stream, &mut byte), Ok(0)),
        "I/O queue closed by the target"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while admin.property_get(0x1c, false).dw0 & 1 != 0 {
        assert!(std::time::Instant::now() < deadline, "CSTS.RDY cleared");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Disabled: admin commands and I/O queue Connects are refused; the other controller is untouched.
    let (identify, _) = admin.admin_command(admin_opcode::IDENTIFY, 0, 1, 0, 4096);
    assert_eq!(identify.status.sc, 0x0c);
    let mut refused = Host::open(server.address, false, false);
    let connect = refused.connect(1, NQN, HOSTNQN, admin.cntlid, 0);
    assert_eq!(
        (connect.status.sct, connect.status.sc),
        (StatusCodeType::Generic, 0x0c)
    );
    other_io.verified_io(64, 2);
    // Re-enabled: a new I/O queue with the same QID works and finds the data written before.
    assert!(admin.property_set(0x14, CC_ENABLED).status.is_success());
    assert_eq!(admin.property_get(0x1c, false).dw0 & 1, 1);
    let mut io = Host::io(server.address, admin.cntlid, 1, false);
    let before: Vec<u8> = (0..8192)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(1))
        .collect();
    assert_eq!(io.read(0, 16).1, before);
    io.verified_io(16, 3);
    // The reset cleared the mask: the next change completes a new request.
    let after = admin.send_async_event_request();
    assert_nothing_completes(&mut admin);
    assert_eq!(server.target.namespace_changed(1), 2);
    let event = admin.receive_completion();
    assert_eq!((event.cid, event.dw0), (after, NAMESPACE_ATTRIBUTE_CHANGED));
}

#[test]
fn write_after_cc_en_cleared_on_a_still_open_io_queue_is_refused() {
    const CC_ENABLED: u64 = 1 | (6 << 16) | (4 << 20);
    let server = serve_memory(config(true));
    let mut admin = Host::admin(server.address, false);
    let mut io = Host::io(server.address, admin.cntlid, 1, false);
    let data = vec![0xa5u8; 4096];
    // Both PDUs arrive in one pass: the admin queue (first slot) resets the controller, then the I/O
    // queue reads the in-capsule write before the pass closes it.
    let pass = server.pass.lock().unwrap();
    let reset_cid = admin.cid();
    admin.send_capsule(
        &Command::property_set(reset_cid, 0x14, false, CC_ENABLED & !1),
        &[],
    );
    let write_cid = io.cid();
    let sgl = SglDescriptor::InCapsule {
        offset: 0,
        length: data.len() as u32,
    };
    io.send_capsule(
        &Command::read_write(io_opcode::WRITE, write_cid, 1, 0, 8, sgl),
        &data,
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    drop(pass);
    assert!(admin.receive_completion().status.is_success());
    let write = io.receive_completion();
    assert_eq!(write.cid, write_cid);
    assert_eq!(
        (write.status.sct, write.status.sc),
        (StatusCodeType::Generic, 0x0c)
    );
    assert!(io.receive().is_none(), "I/O queue closed by the reset");
    assert!(admin.property_set(0x14, CC_ENABLED).status.is_success());
    let mut io = Host::io(server.address, admin.cntlid, 1, false);
    assert_ne!(
        io.read(0, 8).1,
        data,
        "the refused write never reached the medium"
    );
}

/// A write whose data the host withholds after the R2T: the target asks for it, waits the data
/// timeout, fails the command with Command Transient Transport Error and closes the connection.
fn withheld_write_times_out<B: nvmirror_nvmf::Backend + Send + 'static>(backend: B) {
    let mut config = config(true);
    config.data_timeout_ms = 300;
    let server = serve(config, backend);
    let admin = Host::admin(server.address, false);
    let mut healthy = Host::io(server.address, admin.cntlid, 1, true);
    let mut holder = Host::io(server.address, admin.cntlid, 2, false);
    let cid = holder.cid();
    let sgl = SglDescriptor::Transport { length: 65536 };
    let command = Command::read_write(io_opcode::WRITE, cid, 1, 256, 128, sgl);
    let started = std::time::Instant::now();
    holder.send_capsule(&command, &[]);
    assert!(matches!(holder.receive().unwrap().pdu, Pdu::R2T(r2t) if r2t.cccid == cid));
    healthy.verified_io(0, 1);
    let completion = holder.receive_completion();
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(completion.cid, cid);
    assert_eq!(
        completion.status,
        GenericStatus::TransientTransportError.into()
    );
    holder.expect_term_req(Fes::PduSequenceError);
    healthy.verified_io(512, 2);
    let (completion, data) = healthy.read(256, 128);
    assert!(completion.status.is_success());
    assert!(data.iter().all(|&byte| byte == 0), "nothing of it written");
}

#[test]
fn withheld_write_data_times_out_with_a_reserved_slot() {
    // The device backend reserves its (independent) slot when the command arrives.
    withheld_write_times_out(DeviceBackend::new(vec![MemoryDevice::new(DEVICE_BYTES)]));
}

#[test]
fn withheld_write_data_times_out_before_any_slot_is_reserved() {
    // Ordered slots: the data would be staged in the request's buffer.
    withheld_write_times_out(BusyBackend {
        inner: DeviceBackend::new(vec![MemoryDevice::new(DEVICE_BYTES)]),
        busy_reservations: 0,
    });
}

#[test]
fn staged_write_data_waits_for_a_slot_then_commits() {
    // Ordered slots: the R2T goes out at once, and the data, all in, waits out the Busy answers.
    let backend = BusyBackend {
        inner: DeviceBackend::new(vec![MemoryDevice::new(DEVICE_BYTES)]),
        busy_reservations: 40,
    };
    let server = serve(config(true), backend);
    let admin = Host::admin(server.address, true);
    let mut io = Host::io(server.address, admin.cntlid, 1, true);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    assert!(io.write(40, &data, false).status.is_success());
    assert_eq!(io.read(40, 128).1, data);
    io.verified_io(1000, 3);
}
