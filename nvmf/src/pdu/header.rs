//! The PDU-specific headers of NVMe/TCP 1.0 (section 3.6.2), decoded into typed structs and encoded back.
//!
//! [`decode`] takes the bytes of one header (common header, PDU header and header digest, as
//! [`CommonHeader::header_bytes`] says) and returns a [`Pdu`] plus where its data lies; `encode_into`
//! writes a header, its digest and the padding up to the data, and returns the byte count. Data and the
//! data digest are written and checked by the caller (see [`crc32c`]), so data never passes through here.

use super::*;

/// ICReq: the host opens the connection (figure 24).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ICReq {
    pub pfv: u16,
    /// Host PDU data alignment for C2H data, 0's based dwords.
    pub hpda: u8,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Most outstanding R2Ts per command the host accepts, 0's based.
    pub maxr2t: u32,
}

/// ICResp: the controller's answer (figure 25).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ICResp {
    pub pfv: u16,
    /// Controller PDU data alignment for H2C data, 0's based dwords.
    pub cpda: u8,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Most data bytes an H2CData PDU may carry.
    pub maxh2cdata: u32,
}

/// H2CTermReq or C2HTermReq (figures 26, 28); the error data (offending header) follows as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermReq {
    pub fes: u16,
    pub fei: u32,
}

/// H2CData / C2HData (figures 29, 30). `ttag` is reserved in C2HData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    pub cccid: u16,
    pub ttag: u16,
    pub datao: u32,
    pub datal: u32,
    pub last: bool,
    /// C2HData only: command completed successfully, no CapsuleResp follows.
    pub success: bool,
}

/// R2T: the controller asks for write data (figure 31).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct R2T {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

/// A decoded PDU header. Data, when present, lies at [`DataLocation`] of the same PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pdu {
    ICReq(ICReq),
    ICResp(ICResp),
    H2CTermReq(TermReq),
    C2HTermReq(TermReq),
    CapsuleCmd(Command),
    CapsuleResp(Completion),
    H2CData(DataHeader),
    C2HData(DataHeader),
    R2T(R2T),
}

/// Decodes one PDU header arriving from `from`. `bytes` holds at least [`CommonHeader::header_bytes`]
/// bytes after a successful [`CommonHeader::check`]; the header digest is verified here.
pub fn decode(
    bytes: &[u8],
    from: Direction,
    framing: &Framing,
) -> Result<(Pdu, DataLocation), PduError> {
    let common = CommonHeader::parse(bytes);
    let (pdu_type, location) = common.check(from, framing)?;
    let hlen = common.hlen as usize;
    assert!(
        bytes.len() >= common.header_bytes(),
        "decode needs the whole header"
    );
    if common.flags & FLAG_HDGSTF != 0 {
        let expected = u32::from_le_bytes(
            bytes[hlen..hlen + DIGEST_BYTES]
                .try_into()
                .expect("4 bytes"),
        );
        if crc32c(&bytes[..hlen]) != expected {
            return Err(PduError::new(
                Fes::HeaderDigestError,
                "header digest mismatch",
            ));
        }
    }
    let header = &bytes[..hlen];
    let pdu = match pdu_type {
        PduType::ICReq => Pdu::ICReq(decode_icreq(header)?),
        PduType::ICResp => Pdu::ICResp(decode_icresp(header)),
        PduType::H2CTermReq => Pdu::H2CTermReq(decode_term_req(header)),
        PduType::C2HTermReq => Pdu::C2HTermReq(decode_term_req(header)),
        PduType::CapsuleCmd => Pdu::CapsuleCmd(Command::from_bytes(&header[8..72])),
        PduType::CapsuleResp => Pdu::CapsuleResp(Completion::from_bytes(&header[8..24])),
        PduType::H2CData => Pdu::H2CData(decode_data(header, &common, location)?),
        PduType::C2HData => Pdu::C2HData(decode_data(header, &common, location)?),
        PduType::R2T => Pdu::R2T(R2T {
            cccid: le16(header, 8),
            ttag: le16(header, 10),
            r2to: le32(header, 12),
            r2tl: le32(header, 16),
        }),
    };
    Ok((pdu, location))
}

fn le16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
}

fn le32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

fn decode_icreq(header: &[u8]) -> Result<ICReq, PduError> {
    let icreq = ICReq {
        pfv: le16(header, 8),
        hpda: header[10],
        header_digest: header[11] & DGST_HEADER != 0,
        data_digest: header[11] & DGST_DATA != 0,
        maxr2t: le32(header, 12),
    };
    if icreq.pfv != PDU_FORMAT_VERSION {
        return Err(PduError {
            fes: Fes::UnsupportedParameter,
            fei: 8,
            reason: "unsupported PDU format version",
        });
    }
    if icreq.hpda > PDA_MAX {
        return Err(PduError::field(10, "HPDA out of range"));
    }
    Ok(icreq)
}

fn decode_icresp(header: &[u8]) -> ICResp {
    ICResp {
        pfv: le16(header, 8),
        cpda: header[10],
        header_digest: header[11] & DGST_HEADER != 0,
        data_digest: header[11] & DGST_DATA != 0,
        maxh2cdata: le32(header, 12),
    }
}

fn decode_term_req(header: &[u8]) -> TermReq {
    TermReq {
        fes: le16(header, 8),
        fei: le32(header, 10),
    }
}

fn decode_data(
    header: &[u8],
    common: &CommonHeader,
    location: DataLocation,
) -> Result<DataHeader, PduError> {
    let data = DataHeader {
        cccid: le16(header, 8),
        ttag: le16(header, 10),
        datao: le32(header, 12),
        datal: le32(header, 16),
        last: common.flags & FLAG_LAST_PDU != 0,
        success: common.flags & FLAG_SUCCESS != 0,
    };
    if data.datal != location.length {
        return Err(PduError::field(4, "plen does not match DATAL"));
    }
    if data.success && !data.last {
        return Err(PduError::field(1, "SUCCESS flag without LAST_PDU"));
    }
    Ok(data)
}

/// Writes the common header, zeroes the rest of the header and padding, appends the header digest.
/// Returns the prefix length (where the data starts, or the whole PDU when there is none).
fn write_frame(
    buf: &mut [u8],
    pdu_type: PduType,
    flags: u8,
    framing: &Framing,
    data_bytes: usize,
) -> usize {
    let shape = pdu_type.shape();
    let prefix = framing.prefix_bytes(pdu_type, data_bytes);
    assert!(buf.len() >= prefix, "encode buffer too small");
    let header_digest = shape.digests && framing.header_digest;
    let data_digest = shape.digests && framing.data_digest && data_bytes > 0;
    let mut all_flags = flags;
    if header_digest {
        all_flags |= FLAG_HDGSTF;
    }
    if data_digest {
        all_flags |= FLAG_DDGSTF;
    }
    let plen = prefix + data_bytes + if data_digest { DIGEST_BYTES } else { 0 };
    let pdo = if data_bytes > 0 && shape.digests {
        prefix
    } else {
        0
    };
    buf[..prefix].fill(0);
    let common = CommonHeader {
        pdu_type: pdu_type as u8,
        flags: all_flags,
        hlen: shape.hlen,
        pdo: u8::try_from(pdo).expect("pdo fits a byte"),
        plen: u32::try_from(plen).expect("PDU length fits plen"),
    };
    common.write(buf);
    prefix
}

/// Appends the header digest once the PDU-specific fields are in place.
fn seal(buf: &mut [u8], pdu_type: PduType, framing: &Framing) {
    if pdu_type.shape().digests && framing.header_digest {
        let hlen = pdu_type.shape().hlen as usize;
        let digest = crc32c(&buf[..hlen]);
        buf[hlen..hlen + DIGEST_BYTES].copy_from_slice(&digest.to_le_bytes());
    }
}

fn dgst_byte(header_digest: bool, data_digest: bool) -> u8 {
    (if header_digest { DGST_HEADER } else { 0 }) | (if data_digest { DGST_DATA } else { 0 })
}

impl ICReq {
    /// ICReq never carries digests.
    pub fn encode_into(&self, buf: &mut [u8]) -> usize {
        let length = write_frame(buf, PduType::ICReq, 0, &Framing::PLAIN, 0);
        buf[8..10].copy_from_slice(&self.pfv.to_le_bytes());
        buf[10] = self.hpda;
        buf[11] = dgst_byte(self.header_digest, self.data_digest);
        buf[12..16].copy_from_slice(&self.maxr2t.to_le_bytes());
        length
    }
}

impl ICResp {
    /// ICResp never carries digests.
    pub fn encode_into(&self, buf: &mut [u8]) -> usize {
        let length = write_frame(buf, PduType::ICResp, 0, &Framing::PLAIN, 0);
        buf[8..10].copy_from_slice(&self.pfv.to_le_bytes());
        buf[10] = self.cpda;
        buf[11] = dgst_byte(self.header_digest, self.data_digest);
        buf[12..16].copy_from_slice(&self.maxh2cdata.to_le_bytes());
        length
    }
}

impl TermReq {
    /// Encodes the TermReq header and copies up to [`TERM_REQ_ERROR_DATA_BYTES_MAX`] bytes of the
    /// offending header after it; returns the whole PDU length. TermReqs carry no digests.
    pub fn encode_into(&self, buf: &mut [u8], pdu_type: PduType, error_data: &[u8]) -> usize {
        assert!(matches!(
            pdu_type,
            PduType::H2CTermReq | PduType::C2HTermReq
        ));
        let error_data = &error_data[..error_data.len().min(TERM_REQ_ERROR_DATA_BYTES_MAX)];
        let prefix = write_frame(buf, pdu_type, 0, &Framing::PLAIN, error_data.len());
        buf[8..10].copy_from_slice(&self.fes.to_le_bytes());
        buf[10..14].copy_from_slice(&self.fei.to_le_bytes());
        buf[prefix..prefix + error_data.len()].copy_from_slice(error_data);
        prefix + error_data.len()
    }
}

/// Encodes a CapsuleCmd header; `in_capsule_data_bytes` of data (and its digest) follow from the caller.
pub fn encode_capsule_cmd(
    buf: &mut [u8],
    command: &Command,
    framing: &Framing,
    in_capsule_data_bytes: usize,
) -> usize {
    let length = write_frame(buf, PduType::CapsuleCmd, 0, framing, in_capsule_data_bytes);
    buf[8..72].copy_from_slice(command.as_bytes());
    seal(buf, PduType::CapsuleCmd, framing);
    length
}

/// Encodes a whole CapsuleResp PDU.
pub fn encode_capsule_resp(buf: &mut [u8], completion: &Completion, framing: &Framing) -> usize {
    let length = write_frame(buf, PduType::CapsuleResp, 0, framing, 0);
    completion.write_to(&mut buf[8..24]);
    seal(buf, PduType::CapsuleResp, framing);
    length
}

impl DataHeader {
    /// Encodes an H2CData or C2HData header; `datal` bytes of data (and its digest) follow from the caller.
    pub fn encode_into(&self, buf: &mut [u8], pdu_type: PduType, framing: &Framing) -> usize {
        assert!(matches!(pdu_type, PduType::H2CData | PduType::C2HData));
        assert!(self.datal > 0, "a data PDU carries data");
        let mut flags = if self.last { FLAG_LAST_PDU } else { 0 };
        if self.success {
            assert!(pdu_type == PduType::C2HData && self.last);
            flags |= FLAG_SUCCESS;
        }
        let length = write_frame(buf, pdu_type, flags, framing, self.datal as usize);
        buf[8..10].copy_from_slice(&self.cccid.to_le_bytes());
        let ttag = if pdu_type == PduType::H2CData {
            self.ttag
        } else {
            0
        };
        buf[10..12].copy_from_slice(&ttag.to_le_bytes());
        buf[12..16].copy_from_slice(&self.datao.to_le_bytes());
        buf[16..20].copy_from_slice(&self.datal.to_le_bytes());
        seal(buf, pdu_type, framing);
        length
    }
}

impl R2T {
    pub fn encode_into(&self, buf: &mut [u8], framing: &Framing) -> usize {
        let length = write_frame(buf, PduType::R2T, 0, framing, 0);
        buf[8..10].copy_from_slice(&self.cccid.to_le_bytes());
        buf[10..12].copy_from_slice(&self.ttag.to_le_bytes());
        buf[12..16].copy_from_slice(&self.r2to.to_le_bytes());
        buf[16..20].copy_from_slice(&self.r2tl.to_le_bytes());
        seal(buf, PduType::R2T, framing);
        length
    }
}
