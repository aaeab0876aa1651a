//! Opening a queue pair's connection: socket options and the ICReq/ICResp exchange
//! (NVMe/TCP 1.0 sections 3.6.2.2-3.6.2.3), and the H2CTermReq a host sends before it drops a
//! connection over a malformed PDU (section 3.6.2.4).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nvmirror_nvmf::pdu::{
    self, CommonHeader, Direction, Framing, ICReq, Pdu, PduError, PduType, TermReq,
    COMMON_HEADER_BYTES, PDA_MAX, PDU_FORMAT_VERSION,
};

use super::{Negotiated, QueueError, MAXH2CDATA_MIN, SOCKET_BUFFER_BYTES};

/// Best effort: tell the target why we drop the connection (H2CTermReq), then shut the socket down.
pub(super) fn send_term_req(stream: &TcpStream, error: PduError) {
    let mut buffer = [0u8; 64];
    let term = TermReq {
        fes: error.fes as u16,
        fei: error.fei,
    };
    let length = term.encode_into(&mut buffer, PduType::H2CTermReq, &[]);
    let _ = (&*stream).write(&buffer[..length]);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// ICReq/ICResp on the still-blocking socket (NVMe/TCP 1.0 section 3.6.2.2-3.6.2.3).
pub(super) fn exchange_icreq(
    stream: &TcpStream,
    header_digest: bool,
    data_digest: bool,
    timeout: Duration,
) -> Result<Negotiated, QueueError> {
    stream.set_read_timeout(Some(timeout))?;
    let mut buffer = [0u8; pdu::HEADER_BYTES_MAX + pdu::TERM_REQ_ERROR_DATA_BYTES_MAX];
    let icreq = ICReq {
        pfv: PDU_FORMAT_VERSION,
        hpda: 0,
        header_digest,
        data_digest,
        maxr2t: 0,
    };
    let length = icreq.encode_into(&mut buffer);
    (&*stream).write_all(&buffer[..length])?;
    (&*stream)
        .read_exact(&mut buffer[..COMMON_HEADER_BYTES])
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::UnexpectedEof => QueueError::Closed,
            _ => QueueError::Io(error),
        })?;
    let pdu = read_first_pdu(stream, &mut buffer).inspect_err(|error| {
        if let QueueError::Pdu(error) = error {
            send_term_req(stream, *error);
        }
    })?;
    let icresp = match pdu {
        Pdu::ICResp(icresp) => icresp,
        Pdu::C2HTermReq(TermReq { fes, fei }) => return Err(QueueError::TermReq { fes, fei }),
        _ => return Err(QueueError::Protocol("expected ICResp")),
    };
    if icresp.pfv != PDU_FORMAT_VERSION
        || icresp.cpda > PDA_MAX
        || icresp.maxh2cdata < MAXH2CDATA_MIN
    {
        return Err(QueueError::Negotiation(format!(
            "ICResp out of range: {icresp:?}"
        )));
    }
    if icresp.header_digest != header_digest || icresp.data_digest != data_digest {
        return Err(QueueError::Negotiation(format!(
            "digests asked header {header_digest} data {data_digest}, target granted header {} data {}",
            icresp.header_digest, icresp.data_digest
        )));
    }
    stream.set_read_timeout(None)?;
    Ok(Negotiated {
        header_digest,
        data_digest,
        cpda: icresp.cpda,
        maxh2cdata: icresp.maxh2cdata,
    })
}

/// Reads and decodes the controller's answer to ICReq (ICResp or C2HTermReq) into `buffer`.
fn read_first_pdu(stream: &TcpStream, buffer: &mut [u8]) -> Result<Pdu, QueueError> {
    let common = CommonHeader::parse(buffer);
    let (_, _) = common
        .check(Direction::ControllerToHost, &Framing::PLAIN)
        .map_err(QueueError::Pdu)?;
    if common.plen as usize > buffer.len() {
        return Err(QueueError::Pdu(PduError::field(
            4,
            "ICResp/TermReq plen too large",
        )));
    }
    (&*stream).read_exact(&mut buffer[COMMON_HEADER_BYTES..common.plen as usize])?;
    let header = &buffer[..common.plen as usize];
    let (pdu, _) = pdu::decode(header, Direction::ControllerToHost, &Framing::PLAIN)
        .map_err(QueueError::Pdu)?;
    Ok(pdu)
}

/// 2 MiB kernel socket buffers; a failure only costs speed, so it is logged, not fatal.
pub(super) fn set_socket_buffers(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        let value: libc::c_int = SOCKET_BUFFER_BYTES;
        // SAFETY: the fd is a live socket owned by `stream`; `value` outlives the call and its size is passed.
        let result = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            log::warn!(
                "setsockopt({option}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
