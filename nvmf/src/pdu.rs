//! NVMe/TCP PDU codec (NVMe/TCP Transport Specification 1.0, section 3.6), usable by a target and a host.
//!
//! Every PDU starts with the 8-byte common header (type, flags, hlen, pdo, plen); the PDU-specific header
//! follows, then an optional header digest (CRC32C of the `hlen` header bytes), padding up to `pdo`, the
//! data, and an optional data digest (CRC32C of the data). This module decodes headers into typed structs
//! and encodes them; it never decides what a command means and never touches data bytes, so data can be
//! received into and sent from the final buffers (zero copy). A malformed header is a [`PduError`] that
//! carries the fatal error status (FES) and the offending byte offset (FEI) for the TermReq the receiver
//! must send before closing the connection. The SQE/CQE and NVMe status codes live in [`nvme`].

pub mod nvme;

pub use nvme::*;

/// Size of the common header that starts every PDU.
pub const COMMON_HEADER_BYTES: usize = 8;
/// Size of a header or data digest (CRC32C).
pub const DIGEST_BYTES: usize = 4;
/// The only PDU format version defined by NVMe/TCP 1.0 (PFV field of ICReq/ICResp).
pub const PDU_FORMAT_VERSION: u16 = 0;
/// Largest header any PDU has (ICReq/ICResp), plus a header digest: enough to buffer any header.
pub const HEADER_BYTES_MAX: usize = 128 + DIGEST_BYTES;
/// Most error data a TermReq may carry: the offending PDU header, at most 128 bytes of it
/// (NVMe/TCP 1.0 figures 26 and 28, Error Data).
pub const TERM_REQ_ERROR_DATA_BYTES_MAX: usize = 128;
/// Longest TermReq (PLEN): its header and the most error data. Linux's host rejects a longer
/// C2HTermReq as malformed (`NVME_TCP_MAX_C2HTERM_PLEN`).
pub const TERM_REQ_PDU_BYTES_MAX: usize = TERM_REQ_HEADER_BYTES + TERM_REQ_ERROR_DATA_BYTES_MAX;
/// The TermReq header (PDU-specific part included).
pub const TERM_REQ_HEADER_BYTES: usize = 24;
const _: () = assert!(TERM_REQ_PDU_BYTES_MAX == 152);
/// Largest PDU data alignment an ICReq may ask for (HPDA/CPDA is 0's based in dwords, 0..=31).
pub const PDA_MAX: u8 = 31;

/// Common header flag: a header digest follows the PDU header.
pub const FLAG_HDGSTF: u8 = 1 << 0;
/// Common header flag: a data digest follows the PDU data.
pub const FLAG_DDGSTF: u8 = 1 << 1;
/// H2CData/C2HData flag: last data PDU of the command's transfer.
pub const FLAG_LAST_PDU: u8 = 1 << 2;
/// C2HData flag: the command completed successfully; no CapsuleResp follows.
pub const FLAG_SUCCESS: u8 = 1 << 3;

/// ICReq/ICResp DGST field bit: header digest enabled.
pub const DGST_HEADER: u8 = 1 << 0;
/// ICReq/ICResp DGST field bit: data digest enabled.
pub const DGST_DATA: u8 = 1 << 1;

nvmirror_engine::wire_enum! {
    /// PDU type field values (NVMe/TCP 1.0, figure 21).
    pub enum PduType: u8 {
        ICReq = 0x00,
        ICResp = 0x01,
        H2CTermReq = 0x02,
        C2HTermReq = 0x03,
        CapsuleCmd = 0x04,
        CapsuleResp = 0x05,
        H2CData = 0x06,
        C2HData = 0x07,
        R2T = 0x09,
    }
}

/// Which way a PDU travels: only host-to-controller PDUs are valid at a target and vice versa.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    HostToController,
    ControllerToHost,
}

/// The fixed layout of a PDU type: its header length, whether it may carry digests and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PduShape {
    pub hlen: u8,
    pub direction: Direction,
    /// Header digest allowed (every PDU but ICReq/ICResp/TermReq).
    pub digests: bool,
    /// Data: `None` never, `Some(true)` always, `Some(false)` optionally (CapsuleCmd in-capsule data).
    pub data: Option<bool>,
}

impl PduType {
    /// The const PDU-shape table (header lengths from the spec's PDU figures).
    pub const fn shape(self) -> PduShape {
        use Direction::{ControllerToHost as C2H, HostToController as H2C};
        let (hlen, direction, digests, data) = match self {
            PduType::ICReq => (128, H2C, false, None),
            PduType::ICResp => (128, C2H, false, None),
            PduType::H2CTermReq => (TERM_REQ_HEADER_BYTES as u8, H2C, false, Some(false)),
            PduType::C2HTermReq => (TERM_REQ_HEADER_BYTES as u8, C2H, false, Some(false)),
            PduType::CapsuleCmd => (72, H2C, true, Some(false)),
            PduType::CapsuleResp => (24, C2H, true, None),
            PduType::H2CData => (24, H2C, true, Some(true)),
            PduType::C2HData => (24, C2H, true, Some(true)),
            PduType::R2T => (24, C2H, true, None),
        };
        PduShape {
            hlen,
            direction,
            digests,
            data,
        }
    }
}

const _: () = assert!(PduType::CapsuleCmd.shape().hlen as usize == COMMON_HEADER_BYTES + SQE_BYTES);
const _: () =
    assert!(PduType::CapsuleResp.shape().hlen as usize == COMMON_HEADER_BYTES + CQE_BYTES);
const _: () = assert!(PduType::ICReq.shape().hlen as usize + DIGEST_BYTES == HEADER_BYTES_MAX);

nvmirror_engine::wire_enum! {
    /// Fatal error status of a TermReq (NVMe/TCP 1.0, figure 27).
    pub enum Fes: u16 {
        InvalidHeaderField = 0x01,
        PduSequenceError = 0x02,
        HeaderDigestError = 0x03,
        DataTransferOutOfRange = 0x04,
        DataTransferLimitExceeded = 0x05,
        UnsupportedParameter = 0x06,
    }
}

/// A connection-fatal protocol error: send a TermReq with `fes`/`fei` (and the offending header) and close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PduError {
    pub fes: Fes,
    /// Fatal error information: byte offset of the offending field for InvalidHeaderField and
    /// UnsupportedParameter, otherwise 0.
    pub fei: u32,
    pub reason: &'static str,
}

impl PduError {
    pub const fn field(offset: u32, reason: &'static str) -> PduError {
        PduError {
            fes: Fes::InvalidHeaderField,
            fei: offset,
            reason,
        }
    }
    pub const fn new(fes: Fes, reason: &'static str) -> PduError {
        PduError {
            fes,
            fei: 0,
            reason,
        }
    }
}

impl std::fmt::Display for PduError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (FES {:?}, FEI {})", self.reason, self.fes, self.fei)
    }
}

impl std::error::Error for PduError {}

/// CRC32C (Castagnoli) as NVMe/TCP digests use it: the ring's implementation (`crc-fast`), so a
/// data digest checked over a ring slot is the entry's CRC as the ring computes it.
pub fn crc32c(bytes: &[u8]) -> u32 {
    nvmirror_engine::checksum::crc32c(bytes)
}

/// Continues a CRC32C over data received in pieces (`crc` starts at 0):
/// `crc32c_append(crc32c(a), b) == crc32c(a ++ b)`.
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    // CRC-32/ISCSI is reflected with XOROUT FFFFFFFFh: the register behind a finished CRC is its
    // complement, and the digest goes on from there.
    let mut digest =
        crc_fast::Digest::new_with_init_state(crc_fast::CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    digest.update(bytes);
    digest.finalize() as u32
}

/// What the ICReq/ICResp exchange negotiated: digests and the receiver's data alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Framing {
    pub header_digest: bool,
    pub data_digest: bool,
    /// PDU data alignment the receiver asked for (HPDA for C2H PDUs, CPDA for H2C), 0's based dwords.
    pub pda: u8,
}

impl Framing {
    pub const PLAIN: Framing = Framing {
        header_digest: false,
        data_digest: false,
        pda: 0,
    };

    pub const fn header_digest_bytes(&self) -> usize {
        if self.header_digest {
            DIGEST_BYTES
        } else {
            0
        }
    }

    /// The PDO of a data-carrying PDU with header length `hlen`: after the header digest, aligned.
    pub const fn data_offset(&self, hlen: usize) -> usize {
        let alignment_bytes = (self.pda as usize + 1) * 4;
        (hlen + self.header_digest_bytes()).div_ceil(alignment_bytes) * alignment_bytes
    }

    /// The bytes that precede the data: the header, its digest and padding (what `encode_into` writes).
    pub const fn prefix_bytes(&self, pdu_type: PduType, data_bytes: usize) -> usize {
        let hlen = pdu_type.shape().hlen as usize;
        if data_bytes > 0 {
            self.data_offset(hlen)
        } else if pdu_type.shape().digests {
            hlen + self.header_digest_bytes()
        } else {
            hlen
        }
    }
}

/// The common header (NVMe/TCP 1.0, figure 20).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    pub pdu_type: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

impl CommonHeader {
    pub fn parse(bytes: &[u8]) -> CommonHeader {
        assert!(bytes.len() >= COMMON_HEADER_BYTES);
        CommonHeader {
            pdu_type: bytes[0],
            flags: bytes[1],
            hlen: bytes[2],
            pdo: bytes[3],
            plen: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        }
    }

    pub fn write(&self, bytes: &mut [u8]) {
        bytes[0] = self.pdu_type;
        bytes[1] = self.flags;
        bytes[2] = self.hlen;
        bytes[3] = self.pdo;
        bytes[4..8].copy_from_slice(&self.plen.to_le_bytes());
    }

    /// Bytes to buffer before [`decode`] can run: the header plus its digest if flagged.
    /// Only meaningful after [`CommonHeader::check`] accepted the header.
    pub fn header_bytes(&self) -> usize {
        let digest = if self.flags & FLAG_HDGSTF != 0 {
            DIGEST_BYTES
        } else {
            0
        };
        self.hlen as usize + digest
    }

    /// Validates the common header of a PDU arriving from `from` against the negotiated framing
    /// (before the ICReq/ICResp exchange `framing` is [`Framing::PLAIN`]). Returns the PDU's type and
    /// the location of its data.
    pub fn check(
        &self,
        from: Direction,
        framing: &Framing,
    ) -> Result<(PduType, DataLocation), PduError> {
        let pdu_type =
            PduType::from_repr(self.pdu_type).ok_or(PduError::field(0, "unknown PDU type"))?;
        let shape = pdu_type.shape();
        if shape.direction != from {
            return Err(PduError::field(0, "PDU type invalid in this direction"));
        }
        if self.hlen != shape.hlen {
            return Err(PduError::field(2, "hlen does not match the PDU type"));
        }
        let header_digest = shape.digests && framing.header_digest;
        if (self.flags & FLAG_HDGSTF != 0) != header_digest {
            return Err(PduError::field(
                1,
                "HDGSTF flag does not match the negotiated header digest",
            ));
        }
        let header_end = self.hlen as u32
            + if header_digest {
                DIGEST_BYTES as u32
            } else {
                0
            };
        let location = self.data_location(shape, framing, header_end)?;
        Ok((pdu_type, location))
    }

    fn data_location(
        &self,
        shape: PduShape,
        framing: &Framing,
        header_end: u32,
    ) -> Result<DataLocation, PduError> {
        let has_data = match shape.data {
            None => false,
            Some(true) => true,
            Some(false) => self.plen > header_end,
        };
        let data_digest = has_data && shape.digests && framing.data_digest;
        if self.flags & FLAG_DDGSTF != 0 && !data_digest {
            return Err(PduError::field(
                1,
                "DDGSTF flag set but no data digest expected",
            ));
        }
        if data_digest && self.flags & FLAG_DDGSTF == 0 {
            return Err(PduError::field(
                1,
                "DDGSTF flag clear but data digest negotiated",
            ));
        }
        if !has_data {
            if self.plen != header_end {
                return Err(PduError::field(4, "plen does not match a PDU without data"));
            }
            if self.pdo != 0 {
                return Err(PduError::field(3, "pdo set on a PDU without data"));
            }
            return Ok(DataLocation {
                offset: header_end,
                length: 0,
                digest: false,
            });
        }
        if shape.digests {
            let alignment_bytes = (framing.pda as u32 + 1) * 4;
            if (self.pdo as u32) < header_end || !(self.pdo as u32).is_multiple_of(alignment_bytes)
            {
                return Err(PduError::field(
                    3,
                    "pdo before the header end or misaligned",
                ));
            }
        } else if self.pdo != 0 && self.pdo as u32 != header_end {
            return Err(PduError::field(
                3,
                "pdo of a TermReq must point after the header",
            ));
        }
        let data_start = header_end.max(self.pdo as u32);
        let digest = if data_digest { DIGEST_BYTES as u32 } else { 0 };
        if self.plen <= data_start + digest {
            return Err(PduError::field(4, "plen leaves no room for data"));
        }
        let length = self.plen - data_start - digest;
        Ok(DataLocation {
            offset: data_start,
            length,
            digest: data_digest,
        })
    }
}

/// Where a PDU's data lies, relative to the start of the PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLocation {
    pub offset: u32,
    pub length: u32,
    /// A data digest follows the data.
    pub digest: bool,
}

mod header;
pub use header::*;

#[cfg(test)]
mod tests;
