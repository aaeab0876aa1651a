//! A scripted fake controller on 127.0.0.1 drives one [`QueuePair`] through the transfers a real
//! target may choose: R2Ts split into MAXH2CDATA-sized H2CData PDUs (with digests), a read in two
//! C2HData PDUs completed by the SUCCESS flag, an error status, and a corrupted data digest, then
//! reads again with the host not keeping read data.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nvmirror_nvmf::pdu::{
    self, io_opcode, Command, CommonHeader, Completion, DataHeader, Direction, Framing,
    GenericStatus, ICResp, Pdu, PduType, SglDescriptor, Status, R2T,
};

use super::{DataDirection, Done, QueueError, QueuePair};

const MAXH2CDATA: u32 = 4096;
const IO_BYTES: u32 = 16384;
const TIMEOUT: Duration = Duration::from_secs(5);

fn framing() -> Framing {
    Framing {
        header_digest: true,
        data_digest: true,
        pda: 0,
    }
}

fn pattern(index: usize) -> u8 {
    (index * 7 + index / 251) as u8
}

/// Reads one whole PDU from the host.
fn read_pdu(stream: &mut TcpStream) -> Vec<u8> {
    let mut bytes = vec![0u8; 8];
    stream.read_exact(&mut bytes).unwrap();
    let plen = CommonHeader::parse(&bytes).plen as usize;
    bytes.resize(plen, 0);
    stream.read_exact(&mut bytes[8..]).unwrap();
    bytes
}

fn read_command(stream: &mut TcpStream) -> Command {
    let bytes = read_pdu(stream);
    match pdu::decode(&bytes, Direction::HostToController, &framing()).unwrap() {
        (Pdu::CapsuleCmd(command), location) => {
            assert_eq!(location.length, 0, "no in-capsule data was allowed");
            command
        }
        other => panic!("expected CapsuleCmd, got {other:?}"),
    }
}

fn send_data_pdu(stream: &mut TcpStream, header: DataHeader, data: &[u8], corrupt_digest: bool) {
    let mut bytes = vec![0u8; 256];
    let prefix = header.encode_into(&mut bytes, PduType::C2HData, &framing());
    bytes.truncate(prefix);
    bytes.extend_from_slice(data);
    let digest = pdu::crc32c(data) ^ u32::from(corrupt_digest);
    bytes.extend_from_slice(&digest.to_le_bytes());
    stream.write_all(&bytes).unwrap();
}

fn send_completion(stream: &mut TcpStream, cid: u16, status: Status) {
    let mut bytes = [0u8; 64];
    let length = pdu::encode_capsule_resp(&mut bytes, &Completion::new(cid, status), &framing());
    stream.write_all(&bytes[..length]).unwrap();
}

/// Asks for `r2tl` bytes at `r2to` and checks the H2CData PDUs that answer.
fn request_write_data(stream: &mut TcpStream, cid: u16, r2to: u32, r2tl: u32, received: &mut [u8]) {
    let mut bytes = [0u8; 64];
    let r2t = R2T {
        cccid: cid,
        ttag: 7,
        r2to,
        r2tl,
    };
    let length = r2t.encode_into(&mut bytes, &framing());
    stream.write_all(&bytes[..length]).unwrap();
    let mut offset = r2to;
    while offset < r2to + r2tl {
        let pdu_bytes = read_pdu(stream);
        let (pdu, location) =
            pdu::decode(&pdu_bytes, Direction::HostToController, &framing()).unwrap();
        let Pdu::H2CData(header) = pdu else {
            panic!("expected H2CData, got {pdu:?}")
        };
        let expected_length = (r2to + r2tl - offset).min(MAXH2CDATA);
        assert_eq!(
            (header.cccid, header.ttag, header.datao, header.datal),
            (cid, 7, offset, expected_length)
        );
        assert_eq!(header.last, offset + expected_length == r2to + r2tl);
        let data =
            &pdu_bytes[location.offset as usize..(location.offset + location.length) as usize];
        let digest = u32::from_le_bytes(pdu_bytes[pdu_bytes.len() - 4..].try_into().unwrap());
        assert_eq!(
            digest,
            pdu::crc32c(data),
            "data digest of H2CData at {offset}"
        );
        received[offset as usize..(offset + expected_length) as usize].copy_from_slice(data);
        offset += expected_length;
    }
}

fn fake_controller(listener: TcpListener) {
    let (mut stream, _) = listener.accept().unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let icreq = read_pdu(&mut stream);
    let Pdu::ICReq(icreq) = pdu::decode(&icreq, Direction::HostToController, &Framing::PLAIN)
        .unwrap()
        .0
    else {
        panic!("expected ICReq")
    };
    assert!(icreq.header_digest && icreq.data_digest && icreq.hpda == 0 && icreq.maxr2t == 0);
    let icresp = ICResp {
        pfv: 0,
        cpda: 0,
        header_digest: true,
        data_digest: true,
        maxh2cdata: MAXH2CDATA,
    };
    let mut bytes = [0u8; 128];
    let length = icresp.encode_into(&mut bytes);
    stream.write_all(&bytes[..length]).unwrap();

    let write = read_command(&mut stream);
    assert_eq!(
        (write.opcode(), write.sgl()),
        (
            io_opcode::WRITE,
            SglDescriptor::Transport { length: IO_BYTES }
        )
    );
    let mut received = vec![0u8; IO_BYTES as usize];
    request_write_data(&mut stream, write.cid(), 0, 10_000, &mut received);
    request_write_data(
        &mut stream,
        write.cid(),
        10_000,
        IO_BYTES - 10_000,
        &mut received,
    );
    assert!(received
        .iter()
        .enumerate()
        .all(|(index, &byte)| byte == pattern(index)));
    send_completion(&mut stream, write.cid(), Status::SUCCESS);

    let read = read_command(&mut stream);
    assert_eq!(read.opcode(), io_opcode::READ);
    let half = IO_BYTES / 2;
    let first = DataHeader {
        cccid: read.cid(),
        ttag: 0,
        datao: 0,
        datal: half,
        last: false,
        success: false,
    };
    send_data_pdu(&mut stream, first, &received[..half as usize], false);
    let second = DataHeader {
        datao: half,
        last: true,
        success: true,
        ..first
    };
    send_data_pdu(&mut stream, second, &received[half as usize..], false);

    let failing = read_command(&mut stream);
    send_completion(
        &mut stream,
        failing.cid(),
        GenericStatus::LbaOutOfRange.into(),
    );

    let corrupted = read_command(&mut stream);
    let whole = DataHeader {
        cccid: corrupted.cid(),
        ttag: 0,
        datao: 0,
        datal: IO_BYTES,
        last: true,
        success: false,
    };
    send_data_pdu(&mut stream, whole, &received, true);
    send_completion(&mut stream, corrupted.cid(), Status::SUCCESS);

    // The host stops keeping read data: the same two reads again, good and corrupted.
    for corrupt_digest in [false, true] {
        let read = read_command(&mut stream);
        let whole = DataHeader {
            cccid: read.cid(),
            ..whole
        };
        send_data_pdu(&mut stream, whole, &received, corrupt_digest);
        send_completion(&mut stream, read.cid(), Status::SUCCESS);
    }
}

fn run_one(queue: &mut QueuePair, opcode: u8, direction: DataDirection) -> Done {
    let slot = queue.acquire().unwrap();
    if opcode == io_opcode::WRITE {
        for (index, byte) in queue.data_mut(slot).iter_mut().enumerate() {
            *byte = pattern(index);
        }
    } else {
        queue.data_mut(slot).fill(0);
    }
    let mut command = Command::read_write(
        opcode,
        0,
        1,
        8,
        IO_BYTES / 512,
        SglDescriptor::Transport { length: 0 },
    );
    queue.submit(slot, &mut command, direction, false);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        queue.flush().unwrap();
        queue.poll_receive().unwrap();
        if let Some(done) = queue.take_done() {
            assert_eq!(done.slot, slot);
            return done;
        }
        assert!(Instant::now() < deadline, "command did not complete");
    }
}

#[test]
fn host_side_of_every_data_transfer_form() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let controller = std::thread::spawn(move || fake_controller(listener));
    let mut queue = QueuePair::connect(address, 1, 2, IO_BYTES, true, true, TIMEOUT).unwrap();

    let write = run_one(
        &mut queue,
        io_opcode::WRITE,
        DataDirection::ToController(IO_BYTES),
    );
    assert!(write.completion.status.is_success());
    queue.release(write.slot);

    let read = run_one(
        &mut queue,
        io_opcode::READ,
        DataDirection::FromController(IO_BYTES),
    );
    assert!(
        read.completion.status.is_success(),
        "SUCCESS flag completes the read"
    );
    assert!(queue
        .data(read.slot)
        .iter()
        .enumerate()
        .all(|(index, &byte)| byte == pattern(index)));
    queue.release(read.slot);

    let failing = run_one(
        &mut queue,
        io_opcode::READ,
        DataDirection::FromController(IO_BYTES),
    );
    assert_eq!(
        failing.completion.status,
        Status::generic(GenericStatus::LbaOutOfRange)
    );
    queue.release(failing.slot);

    let corrupted = run_one(
        &mut queue,
        io_opcode::READ,
        DataDirection::FromController(IO_BYTES),
    );
    assert_eq!(
        corrupted.completion.status,
        Status::generic(GenericStatus::DataTransferError)
    );
    queue.release(corrupted.slot);

    queue.set_keep_read_data(false);
    let skipped = run_one(
        &mut queue,
        io_opcode::READ,
        DataDirection::FromController(IO_BYTES),
    );
    assert!(skipped.completion.status.is_success());
    assert!(
        queue.data(skipped.slot).iter().all(|&byte| byte == 0),
        "read data is not copied into the slot"
    );
    queue.release(skipped.slot);
    let skipped_corrupted = run_one(
        &mut queue,
        io_opcode::READ,
        DataDirection::FromController(IO_BYTES),
    );
    assert_eq!(
        skipped_corrupted.completion.status,
        Status::generic(GenericStatus::DataTransferError),
        "the data digest is still checked when the data is not kept"
    );
    queue.release(skipped_corrupted.slot);
    controller.join().unwrap();
}

#[test]
fn a_reset_or_broken_pipe_reads_as_the_target_closing() {
    for kind in [
        std::io::ErrorKind::BrokenPipe,
        std::io::ErrorKind::ConnectionReset,
    ] {
        let error = QueueError::Io(std::io::Error::from(kind));
        assert!(
            error
                .to_string()
                .starts_with("the target closed the connection"),
            "{error}"
        );
    }
    let other = QueueError::Io(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
    assert!(other.to_string().starts_with("socket error"), "{other}");
}
