//! The receive half of a [`QueuePair`]: one read per poll into the socket buffer, then PDUs parsed
//! in place (NVMe/TCP 1.0 section 3.6): CapsuleResp completes a command, C2HData is copied into the
//! command's buffer when the queue keeps read data (and may complete it with the SUCCESS flag), R2T
//! queues H2CData PDUs, C2HTermReq ends the connection with its FES.

use std::io::Read;

use nvmirror_nvmf::pdu::{
    self, CommonHeader, Completion, DataHeader, Direction, GenericStatus, Pdu, PduError, PduType,
    Status, TermReq, COMMON_HEADER_BYTES, DIGEST_BYTES,
};

use super::handshake::send_term_req;
use super::{
    would_block, Area, DataDirection, Done, QueueError, QueuePair, Receive, SlotState,
    PDU_STRIDE_BYTES, PREFIX_BYTES_MAX, RECEIVE_BUFFER_BYTES,
};

impl QueuePair {
    /// One read into the receive buffer, then every complete PDU in it is handled.
    /// Returns the bytes read (0 = nothing arrived).
    pub fn poll_receive(&mut self) -> Result<usize, QueueError> {
        if self.receive_start == self.receive_end {
            self.receive_start = 0;
            self.receive_end = 0;
        } else if self.receive_start > 0
            && self.receive_buffer.len() - self.receive_end < RECEIVE_BUFFER_BYTES / 4
        {
            self.receive_buffer
                .copy_within(self.receive_start..self.receive_end, 0);
            self.receive_end -= self.receive_start;
            self.receive_start = 0;
        }
        assert!(
            self.receive_end < self.receive_buffer.len(),
            "parse leaves at most one partial header"
        );
        let read = match (&self.stream).read(&mut self.receive_buffer[self.receive_end..]) {
            Ok(0) => return Err(QueueError::Closed),
            Ok(read) => read,
            Err(error) if would_block(&error) => return Ok(0),
            Err(error) => return Err(QueueError::Io(error)),
        };
        self.receive_end += read;
        match self.parse() {
            Ok(()) => Ok(read),
            Err(QueueError::Pdu(error)) => {
                send_term_req(&self.stream, error);
                Err(QueueError::Pdu(error))
            }
            Err(error) => Err(error),
        }
    }

    fn available(&self) -> usize {
        self.receive_end - self.receive_start
    }

    fn parse(&mut self) -> Result<(), QueueError> {
        loop {
            match self.receive {
                Receive::Header => {
                    if !self.parse_header()? {
                        return Ok(());
                    }
                }
                Receive::Data {
                    slot,
                    offset,
                    remaining,
                    crc,
                    digest,
                    success,
                } => {
                    let length = remaining.min(self.available() as u32);
                    if length == 0 {
                        return Ok(());
                    }
                    let source = &self.receive_buffer
                        [self.receive_start..self.receive_start + length as usize];
                    if self.keep_read_data {
                        let destination = &mut self.slots[slot as usize].data
                            [offset as usize..(offset + length) as usize];
                        destination.copy_from_slice(source);
                    }
                    let crc = if digest {
                        pdu::crc32c_append(crc, source)
                    } else {
                        crc
                    };
                    self.receive_start += length as usize;
                    self.receive = if length < remaining {
                        Receive::Data {
                            slot,
                            offset: offset + length,
                            remaining: remaining - length,
                            crc,
                            digest,
                            success,
                        }
                    } else if digest {
                        Receive::DataDigest { slot, crc, success }
                    } else {
                        self.data_received(slot, success)?;
                        Receive::Header
                    };
                }
                Receive::DataDigest { slot, crc, success } => {
                    if self.available() < DIGEST_BYTES {
                        return Ok(());
                    }
                    let at = self.receive_start;
                    let stored = u32::from_le_bytes(
                        self.receive_buffer[at..at + DIGEST_BYTES]
                            .try_into()
                            .expect("4"),
                    );
                    self.receive_start += DIGEST_BYTES;
                    if stored != crc {
                        log::error!("qid {}: data digest error on cid {slot}", self.qid);
                        self.slots[slot as usize].data_digest_error = true;
                    }
                    self.data_received(slot, success)?;
                    self.receive = Receive::Header;
                }
            }
        }
    }

    /// Parses one PDU header if all of it (and its padding) is buffered; returns whether it did.
    fn parse_header(&mut self) -> Result<bool, QueueError> {
        if self.available() < COMMON_HEADER_BYTES {
            return Ok(false);
        }
        let bytes = &self.receive_buffer[self.receive_start..self.receive_end];
        let common = CommonHeader::parse(bytes);
        let (pdu_type, location) = common
            .check(Direction::ControllerToHost, &self.receive_framing)
            .map_err(QueueError::Pdu)?;
        let prefix = if pdu_type == PduType::C2HTermReq {
            common.plen as usize
        } else {
            location.offset as usize
        };
        if prefix > pdu::HEADER_BYTES_MAX + pdu::TERM_REQ_ERROR_DATA_BYTES_MAX {
            return Err(QueueError::Pdu(PduError::field(
                4,
                "PDU prefix longer than any valid header",
            )));
        }
        if bytes.len() < prefix {
            return Ok(false);
        }
        let (pdu, location) = pdu::decode(
            &bytes[..prefix],
            Direction::ControllerToHost,
            &self.receive_framing,
        )
        .map_err(QueueError::Pdu)?;
        self.receive_start += prefix;
        match pdu {
            Pdu::CapsuleResp(completion) => {
                let slot = self.in_flight_slot(completion.cid)?;
                self.complete(slot, completion)?;
            }
            Pdu::C2HData(header) => self.begin_c2h_data(header, location.digest)?,
            Pdu::R2T(r2t) => self.answer_r2t(r2t)?,
            Pdu::C2HTermReq(TermReq { fes, fei }) => return Err(QueueError::TermReq { fes, fei }),
            _ => return Err(QueueError::Protocol("unexpected PDU type from the target")),
        }
        Ok(true)
    }

    fn in_flight_slot(&self, cid: u16) -> Result<u16, QueueError> {
        match self.slots.get(cid as usize) {
            Some(entry) if entry.state == SlotState::InFlight => Ok(cid),
            _ => Err(QueueError::Protocol(
                "PDU names a command ID that is not in flight",
            )),
        }
    }

    fn begin_c2h_data(&mut self, header: DataHeader, digest: bool) -> Result<(), QueueError> {
        let slot = self.in_flight_slot(header.cccid)?;
        let entry = &self.slots[slot as usize];
        let DataDirection::FromController(length) = entry.direction else {
            return Err(QueueError::Protocol(
                "C2HData for a command without controller-to-host data",
            ));
        };
        if header.datao != entry.received_bytes
            || u64::from(header.datao) + u64::from(header.datal) > u64::from(length)
        {
            return Err(QueueError::Protocol(
                "C2HData out of order or beyond the command's data",
            ));
        }
        if header.last != (header.datao + header.datal == length) {
            return Err(QueueError::Protocol(
                "C2HData LAST_PDU flag does not match the data length",
            ));
        }
        self.slots[slot as usize].received_bytes += header.datal;
        self.receive = Receive::Data {
            slot,
            offset: header.datao,
            remaining: header.datal,
            crc: 0,
            digest,
            success: header.success,
        };
        Ok(())
    }

    fn data_received(&mut self, slot: u16, success: bool) -> Result<(), QueueError> {
        if success {
            let completion = Completion {
                sqid: self.qid,
                ..Completion::new(slot, Status::SUCCESS)
            };
            self.complete(slot, completion)?;
        }
        Ok(())
    }

    fn answer_r2t(&mut self, r2t: pdu::R2T) -> Result<(), QueueError> {
        let slot = self.in_flight_slot(r2t.cccid)?;
        let maxh2cdata = self.negotiated.maxh2cdata;
        let entry = &self.slots[slot as usize];
        let DataDirection::ToController(length) = entry.direction else {
            return Err(QueueError::Protocol(
                "R2T for a command without host-to-controller data",
            ));
        };
        if r2t.r2tl == 0 || u64::from(r2t.r2to) + u64::from(r2t.r2tl) > u64::from(length) {
            return Err(QueueError::Protocol("R2T range beyond the command's data"));
        }
        if entry.segments_queued > 0 {
            return Err(QueueError::Protocol(
                "R2T while the capsule or previous data is still being sent",
            ));
        }
        let framing = self.send_framing;
        let mut sent = 0;
        let mut record = 1;
        while sent < r2t.r2tl {
            let datal = (r2t.r2tl - sent).min(maxh2cdata);
            let header = DataHeader {
                cccid: r2t.cccid,
                ttag: r2t.ttag,
                datao: r2t.r2to + sent,
                datal,
                last: sent + datal == r2t.r2tl,
                success: false,
            };
            let at = record * PDU_STRIDE_BYTES;
            let area = &mut self.slots[slot as usize].pdu_area;
            let prefix = header.encode_into(
                &mut area[at..at + PREFIX_BYTES_MAX],
                PduType::H2CData,
                &framing,
            );
            self.push_segment(slot, Area::Pdu, at as u32, (at + prefix) as u32);
            self.push_data_with_digest(slot, record, header.datao, datal);
            sent += datal;
            record += 1;
        }
        Ok(())
    }

    fn complete(&mut self, slot: u16, mut completion: Completion) -> Result<(), QueueError> {
        let entry = &mut self.slots[slot as usize];
        if entry.segments_queued > 0 {
            return Err(QueueError::Protocol(
                "completion before the command's data was sent",
            ));
        }
        if let DataDirection::FromController(length) = entry.direction {
            if completion.status.is_success() && entry.received_bytes != length {
                return Err(QueueError::Protocol(
                    "successful read completed with data missing",
                ));
            }
        }
        if entry.data_digest_error {
            completion.status = Status::generic(GenericStatus::DataTransferError);
        }
        entry.state = SlotState::Done;
        self.done.push(Done { slot, completion });
        Ok(())
    }
}
