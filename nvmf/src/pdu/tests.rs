//! Round trips of every PDU header and the rejection of each corrupted field.

use super::*;

const DIGESTS: Framing = Framing {
    header_digest: true,
    data_digest: true,
    pda: 0,
};

fn decode_h2c(bytes: &[u8], framing: &Framing) -> Result<(Pdu, DataLocation), PduError> {
    decode(bytes, Direction::HostToController, framing)
}

#[test]
fn icreq_round_trip_and_fields() {
    let icreq = ICReq {
        pfv: 0,
        hpda: 3,
        header_digest: true,
        data_digest: false,
        maxr2t: 0,
    };
    let mut buf = [0u8; 256];
    let length = icreq.encode_into(&mut buf);
    assert_eq!(length, 128);
    assert_eq!(&buf[..4], &[0x00, 0x00, 128, 0]);
    assert_eq!(u32::from_le_bytes(buf[4..8].try_into().unwrap()), 128);
    let (pdu, location) = decode_h2c(&buf, &Framing::PLAIN).unwrap();
    assert_eq!(pdu, Pdu::ICReq(icreq));
    assert_eq!(location.length, 0);
    // An ICReq must never be accepted as a C2H PDU.
    let error = decode(&buf, Direction::ControllerToHost, &Framing::PLAIN).unwrap_err();
    assert_eq!((error.fes, error.fei), (Fes::InvalidHeaderField, 0));
    buf[8] = 1;
    let error = decode_h2c(&buf, &Framing::PLAIN).unwrap_err();
    assert_eq!((error.fes, error.fei), (Fes::UnsupportedParameter, 8));
}

#[test]
fn icresp_round_trip() {
    let icresp = ICResp {
        pfv: 0,
        cpda: 0,
        header_digest: true,
        data_digest: true,
        maxh2cdata: 131072,
    };
    let mut buf = [0u8; 128];
    assert_eq!(icresp.encode_into(&mut buf), 128);
    assert_eq!(buf[11], DGST_HEADER | DGST_DATA);
    let (pdu, _) = decode(&buf, Direction::ControllerToHost, &Framing::PLAIN).unwrap();
    assert_eq!(pdu, Pdu::ICResp(icresp));
}

#[test]
fn capsule_cmd_with_in_capsule_data_and_digests() {
    let sgl = SglDescriptor::InCapsule {
        offset: 0,
        length: 4096,
    };
    let command = Command::read_write(io_opcode::WRITE, 7, 1, 100, 8, sgl);
    let mut buf = [0u8; HEADER_BYTES_MAX];
    let prefix = encode_capsule_cmd(&mut buf, &command, &DIGESTS, 4096);
    assert_eq!(prefix, 76);
    let common = CommonHeader::parse(&buf);
    assert_eq!(common.flags, FLAG_HDGSTF | FLAG_DDGSTF);
    assert_eq!((common.pdo, common.plen), (76, 76 + 4096 + 4));
    let (pdu, location) = decode_h2c(&buf, &DIGESTS).unwrap();
    assert_eq!(
        location,
        DataLocation {
            offset: 76,
            length: 4096,
            digest: true
        }
    );
    let Pdu::CapsuleCmd(decoded) = pdu else {
        panic!("not a capsule: {pdu:?}")
    };
    assert_eq!(
        (decoded.opcode(), decoded.cid(), decoded.nsid()),
        (io_opcode::WRITE, 7, 1)
    );
    assert_eq!((decoded.u64_at(40), decoded.cdw(12)), (100, 7));
    assert_eq!(decoded.sgl(), sgl);
    assert_eq!(decoded.psdt(), PSDT_SGL);
    // A flipped header bit fails the header digest.
    buf[50] ^= 1;
    assert_eq!(
        decode_h2c(&buf, &DIGESTS).unwrap_err().fes,
        Fes::HeaderDigestError
    );
}

#[test]
fn capsule_cmd_without_data_has_zero_pdo() {
    let command = Command::property_get(1, 0x14, false);
    let mut buf = [0u8; HEADER_BYTES_MAX];
    assert_eq!(
        encode_capsule_cmd(&mut buf, &command, &Framing::PLAIN, 0),
        72
    );
    let common = CommonHeader::parse(&buf);
    assert_eq!((common.pdo, common.plen), (0, 72));
    assert_eq!(decode_h2c(&buf, &Framing::PLAIN).unwrap().1.length, 0);
}

#[test]
fn corrupted_common_header_fields_name_their_offset() {
    let command = Command::read_write(
        io_opcode::READ,
        1,
        1,
        0,
        1,
        SglDescriptor::Transport { length: 512 },
    );
    let mut good = [0u8; HEADER_BYTES_MAX];
    encode_capsule_cmd(&mut good, &command, &Framing::PLAIN, 0);
    let cases: [(usize, u8, u32); 5] = [
        (0, 0x08, 0),        // unknown type
        (0, 0x05, 0),        // a C2H type sent to the controller
        (2, 71, 2),          // hlen
        (4, 70, 4),          // plen shorter than the header
        (1, FLAG_HDGSTF, 1), // digest flag without negotiation
    ];
    for (offset, value, fei) in cases {
        let mut bad = good;
        bad[offset] = value;
        let error = decode_h2c(&bad, &Framing::PLAIN).unwrap_err();
        assert_eq!(
            (error.fes, error.fei),
            (Fes::InvalidHeaderField, fei),
            "byte {offset} = {value}"
        );
    }
    // Data present (plen > hlen) but pdo points inside the header.
    let mut bad = good;
    bad[4] = 72 + 16;
    bad[3] = 40;
    assert_eq!(decode_h2c(&bad, &Framing::PLAIN).unwrap_err().fei, 3);
    // Missing DDGSTF when data digests were negotiated.
    let framing = Framing {
        header_digest: false,
        data_digest: true,
        pda: 0,
    };
    let mut with_data = [0u8; HEADER_BYTES_MAX];
    encode_capsule_cmd(&mut with_data, &command, &framing, 512);
    with_data[1] &= !FLAG_DDGSTF;
    assert_eq!(decode_h2c(&with_data, &framing).unwrap_err().fei, 1);
}

#[test]
fn data_pdus_round_trip() {
    let h2c = DataHeader {
        cccid: 3,
        ttag: 9,
        datao: 8192,
        datal: 4096,
        last: true,
        success: false,
    };
    let mut buf = [0u8; HEADER_BYTES_MAX];
    let prefix = h2c.encode_into(&mut buf, PduType::H2CData, &DIGESTS);
    assert_eq!(prefix, 28);
    let (pdu, location) = decode_h2c(&buf, &DIGESTS).unwrap();
    assert_eq!(pdu, Pdu::H2CData(h2c));
    assert_eq!(
        location,
        DataLocation {
            offset: 28,
            length: 4096,
            digest: true
        }
    );
    // DATAL disagreeing with plen is a header field error at plen.
    buf[16] = 1;
    let framing_no_hdgst = Framing {
        header_digest: false,
        ..DIGESTS
    };
    let mut plain = [0u8; HEADER_BYTES_MAX];
    h2c.encode_into(&mut plain, PduType::H2CData, &framing_no_hdgst);
    plain[16] = 1;
    assert_eq!(decode_h2c(&plain, &framing_no_hdgst).unwrap_err().fei, 4);

    let c2h = DataHeader {
        cccid: 3,
        ttag: 0,
        datao: 0,
        datal: 512,
        last: true,
        success: true,
    };
    let aligned = Framing {
        header_digest: true,
        data_digest: false,
        pda: 3,
    };
    let prefix = c2h.encode_into(&mut buf, PduType::C2HData, &aligned);
    assert_eq!(prefix, 32, "HPDA 3 aligns data to 16 bytes");
    let (pdu, location) = decode(&buf, Direction::ControllerToHost, &aligned).unwrap();
    assert_eq!(pdu, Pdu::C2HData(c2h));
    assert_eq!(
        location,
        DataLocation {
            offset: 32,
            length: 512,
            digest: false
        }
    );
}

#[test]
fn r2t_resp_and_term_req_round_trip() {
    let mut buf = [0u8; 256];
    let r2t = R2T {
        cccid: 5,
        ttag: 6,
        r2to: 0,
        r2tl: 65536,
    };
    assert_eq!(r2t.encode_into(&mut buf, &DIGESTS), 28);
    assert_eq!(
        decode(&buf, Direction::ControllerToHost, &DIGESTS)
            .unwrap()
            .0,
        Pdu::R2T(r2t)
    );

    let mut completion = Completion::new(9, CommandSpecificStatus::ConnectInvalidHost.into());
    completion.sqhd = 4;
    completion.dw0 = 0xdead_beef;
    assert_eq!(
        encode_capsule_resp(&mut buf, &completion, &Framing::PLAIN),
        24
    );
    let (pdu, _) = decode(&buf, Direction::ControllerToHost, &Framing::PLAIN).unwrap();
    assert_eq!(pdu, Pdu::CapsuleResp(completion));
    assert_eq!(completion.status.sc, 0x84);
    assert!(completion.status.dnr);

    let header = [0xabu8; 200];
    let term = TermReq {
        fes: Fes::HeaderDigestError as u16,
        fei: 0,
    };
    let length = term.encode_into(&mut buf, PduType::C2HTermReq, &header);
    assert_eq!(length, TERM_REQ_PDU_BYTES_MAX);
    assert_eq!(&buf[24..length], &header[..TERM_REQ_ERROR_DATA_BYTES_MAX]);
    let (pdu, location) = decode(&buf, Direction::ControllerToHost, &DIGESTS).unwrap();
    assert_eq!(pdu, Pdu::C2HTermReq(term));
    assert_eq!(location.length as usize, TERM_REQ_ERROR_DATA_BYTES_MAX);
}

#[test]
fn status_and_completion_bits() {
    let status = Status::generic(GenericStatus::LbaOutOfRange);
    assert_eq!(status.to_field(), (0x80 << 1) | (1 << 15));
    assert_eq!(Status::from_field(status.to_field()), status);
    let transient = Status::generic(GenericStatus::TransientTransportError);
    assert!(!transient.dnr);
    let deleted = Status::generic(GenericStatus::AbortedSqDeletion);
    assert_eq!((deleted.sc, deleted.dnr), (0x08, false));
    let completion = Completion::connect_invalid_parameter(1, true, connect_data_offset::SUBNQN);
    assert_eq!(
        completion.dw0,
        (1 << 16) | 256,
        "IPO in bits 15:0, IATTR in bits 23:16"
    );
    let mut bytes = [0u8; CQE_BYTES];
    completion.write_to(&mut bytes);
    assert_eq!(Completion::from_bytes(&bytes), completion);
}

#[test]
fn connect_command_and_data() {
    let command = Command::connect(1, 0, 31, CONNECT_CATTR_DISABLE_SQ_FLOW_CONTROL, 120_000);
    assert_eq!(
        (command.opcode(), command.fctype()),
        (0x7f, FabricsType::Connect as u8)
    );
    assert_eq!(
        (command.u16_at(42), command.u16_at(44), command.dword_at(48)),
        (0, 31, 120_000)
    );
    assert_eq!(command.sgl().to_bytes()[15], SGL_ID_DATA_BLOCK_OFFSET);
    assert_eq!(SglDescriptor::Transport { length: 1 }.to_bytes()[15], 0x5a);
    let data = ConnectData {
        hostid: [7; 16],
        cntlid: 0xffff,
        subnqn: "nqn.2024-01.io.nvmirror:vol0".into(),
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
    };
    let mut bytes = [0u8; CONNECT_DATA_BYTES];
    data.encode_into(&mut bytes);
    assert_eq!(ConnectData::decode(&bytes).unwrap(), data);
    bytes[256..512].fill(b'a');
    assert_eq!(
        ConnectData::decode(&bytes).unwrap_err(),
        connect_data_offset::SUBNQN
    );
}

#[test]
fn digest_is_crc32c_whole_or_in_pieces() {
    // RFC 3720 B.4 and the CRC-32/ISCSI check value.
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c_append(0, b"123456789"), 0xE306_9283);
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + i / 13) as u8).collect();
    let whole = crc32c(&data);
    for split in [0, 1, 4, 63, 4096, 8191, 8192] {
        let (first, second) = data.split_at(split);
        assert_eq!(crc32c_append(crc32c(first), second), whole, "split {split}");
    }
    let pieces = data.chunks(1000).fold(0, crc32c_append);
    assert_eq!(pieces, whole);
}
