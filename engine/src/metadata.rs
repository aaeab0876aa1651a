//! Node metadata: a node's generations and its persistent dirty bitmap, per volume, on the node's
//! own storage and independent of its role (ARCHITECTURE "node metadata"; invariants 6 and 9).
//!
//! The bitmap has one bit per extent of `bitmap_extent_bytes` (a power of two, from
//! [`BITMAP_EXTENT_BYTES_MIN`] to [`BITMAP_EXTENT_BYTES_MAX`]): a set bit says "this extent may
//! differ from the peer's copy since `bitmap_base`". Updates are batched the way DRBD's activity
//! log batches its transactions (simplified): [`NodeMetadata::mark`] sets bits in memory and says
//! whether a persist is needed; the metadata emits one write per changed page (and the header when
//! it changed), then one flush, and reports through [`NodeMetadata::durable_through`] which marks
//! survive a crash, so a caller holds an unreplicated write's acknowledgement until then. The
//! synchronous (peer connected) path never marks.
//!
//! Call order: `open` (or `format`); per change `mark` / `clear` / `new_generation` / `adopt`,
//! each returning a sequence number; submit every `poll_device_op` to the metadata device and hand
//! each completion to `handle_device_completion` (any order); a change is durable once
//! `durable_through() >= its sequence`.
//!
//! On-disk format (little endian), written nowhere else:
//!
//! | offset             | bytes | what                                                        |
//! |--------------------|-------|-------------------------------------------------------------|
//! | 0                  | 512   | header slot 0                                               |
//! | 512                | 512   | header slot 1                                               |
//! | 1024               | 3072  | zero                                                        |
//! | 4096 + 4096 × i    | 4096  | bitmap page i                                               |
//!
//! Header slot: magic "NVMM" u32 @0, version u32 @4 (1), sequence u64 @8 (≥ 1), volume_id [16]
//! @16, generations (node_id u64, current u64, history 4 × u64, bitmap_base u64, flags u32, zero
//! u32: 64 B) @32, bitmap_extent_bytes u32 @96, namespace_count u32 @100, page_count u32 @104, zero
//! u32 @108, namespace size_bytes 16 × u64 @112 (unused ones zero), proposed_generation u64 @240
//! (random, non-zero, drawn at format: the generation this node proposes to a fresh peer, the
//! same across restarts so an interrupted first handshake completes), zero @248..508, crc32c u32
//! @508 over the 512 bytes with this field as zero. The valid slot with the larger sequence is the
//! header; an update writes the other slot, so a torn header write leaves the last one intact.
//!
//! Bitmap page: magic "NVMB" u32 @0, page_index u32 @4, crc32c u32 @8 (over the 4096 bytes with
//! this field as zero), zero u32 @12, then 4080 bytes of bits @16: bit `b` of page `i` (byte
//! `b / 8`, bit `b % 8`) is extent `i × BITS_PER_PAGE + b` of the volume, whose namespaces' extents
//! follow each other in nsid order. Pages are written in place; a page that fails its check at
//! open (a torn write) is taken as all ones: more resync, never a lost mark.

use std::fmt;

use crate::checksum::{crc32c_with_zero_field, le_u32, le_u64};
use crate::device::{
    check_extent, DeviceCompletion, DeviceError, DeviceOp, DeviceOpId, DeviceRequest,
};
use crate::generation::{Generations, Hex, FLAG_ASSUME_IDENTICAL_CONSUMED, GENERATIONS_BYTES};
use crate::geometry::{BLOCK_SIZE, NAMESPACES_MAX, SECTOR_SIZE};

/// "NVMM" in little endian: a header slot.
pub const METADATA_MAGIC: u32 = u32::from_le_bytes(*b"NVMM");
/// "NVMB" in little endian: a bitmap page.
pub const BITMAP_PAGE_MAGIC: u32 = u32::from_le_bytes(*b"NVMB");
pub const METADATA_VERSION: u32 = 1;
/// One sector per header slot: a slot is written whole or torn, never half of two slots.
pub const HEADER_SLOT_BYTES: usize = SECTOR_SIZE;
pub const HEADER_SLOTS: usize = 2;
pub const BITMAP_PAGES_OFFSET_BYTES: u64 = BLOCK_SIZE as u64;
pub const BITMAP_PAGE_BYTES: usize = BLOCK_SIZE;
pub const BITMAP_PAGE_HEADER_BYTES: usize = 16;
/// Extents one bitmap page covers.
pub const BITS_PER_PAGE: u64 = ((BITMAP_PAGE_BYTES - BITMAP_PAGE_HEADER_BYTES) * 8) as u64;
/// The smallest extent: one block (a host write never marks less than its blocks).
pub const BITMAP_EXTENT_BYTES_MIN: u64 = BLOCK_SIZE as u64;
/// The largest extent (a coarse bitmap of a huge volume).
pub const BITMAP_EXTENT_BYTES_MAX: u64 = 64 << 20;
/// DRBD's choice for its resync bitmap granularity is 4 KiB; 64 KiB keeps a 1 TiB volume's
/// bitmap at 2 MiB while a random 4 KiB write still resyncs only 64 KiB.
pub const BITMAP_EXTENT_BYTES_DEFAULT: u64 = 64 << 10;
/// Bitmap and header writes in flight at most.
pub const METADATA_WRITES_INFLIGHT_MAX: usize = 32;
/// The bitmap of the largest volume stays addressable with u32 page indices.
pub const BITMAP_PAGES_MAX: u64 = u32::MAX as u64;

const HEADER_CRC_OFFSET: usize = HEADER_SLOT_BYTES - 4;
const HEADER_GENERATIONS_OFFSET: usize = 32;
const HEADER_SIZES_OFFSET: usize = 112;
const HEADER_PROPOSED_OFFSET: usize = 240;
const PAGE_CRC_OFFSET: usize = 8;

const _: () = assert!(HEADER_SLOTS * HEADER_SLOT_BYTES <= BITMAP_PAGES_OFFSET_BYTES as usize);
const _: () = assert!(HEADER_GENERATIONS_OFFSET + GENERATIONS_BYTES == 96);
const _: () = assert!(HEADER_SIZES_OFFSET + 8 * NAMESPACES_MAX == HEADER_PROPOSED_OFFSET);
const _: () = assert!(HEADER_PROPOSED_OFFSET + 8 <= HEADER_CRC_OFFSET);
const _: () = assert!(BITMAP_EXTENT_BYTES_MIN.is_power_of_two());
const _: () = assert!(BITMAP_EXTENT_BYTES_MAX.is_power_of_two());
const _: () = assert!(
    BITMAP_EXTENT_BYTES_MIN <= BITMAP_EXTENT_BYTES_DEFAULT
        && BITMAP_EXTENT_BYTES_DEFAULT <= BITMAP_EXTENT_BYTES_MAX
);
const _: () = assert!(BITMAP_EXTENT_BYTES_MAX <= u32::MAX as u64);
const _: () = assert!(BITMAP_PAGE_BYTES.is_multiple_of(SECTOR_SIZE));

/// Why metadata cannot be opened (or a header slot decoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataError {
    /// Shorter than its header area, or than its own header says.
    Truncated { length: u64, needed: u64 },
    /// Neither header slot is valid (why for each).
    NoValidHeader([HeaderError; HEADER_SLOTS]),
    /// The file belongs to another volume.
    OtherVolume { ours: [u8; 16], file: [u8; 16] },
    /// The namespaces or the extent size differ from the file's.
    Layout(String),
}

impl fmt::Display for MetadataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { length, needed } => {
                write!(f, "metadata truncated: {length} of {needed} bytes")
            }
            Self::NoValidHeader([a, b]) => {
                write!(f, "no valid metadata header (slot 0: {a}; slot 1: {b})")
            }
            Self::OtherVolume { ours, file } => write!(
                f,
                "metadata of another volume (volume id {} in the file, {} configured)",
                hex16(file),
                hex16(ours)
            ),
            Self::Layout(text) => write!(f, "metadata layout: {text}"),
        }
    }
}

fn hex16(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a header slot or bitmap page is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    BadMagic,
    BadVersion(u32),
    Crc,
    ZeroSequence,
    ZeroProposedGeneration,
    Generations(&'static str),
    ExtentBytes(u32),
    NamespaceCount(u32),
    PageCount { stored: u32, expected: u64 },
    NonzeroPadding,
    PageIndex { stored: u32, expected: u32 },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("bad magic"),
            Self::BadVersion(version) => write!(f, "unsupported version {version}"),
            Self::Crc => f.write_str("crc mismatch"),
            Self::ZeroSequence => f.write_str("zero sequence"),
            Self::ZeroProposedGeneration => f.write_str("zero proposed generation"),
            Self::Generations(reason) => write!(f, "generations: {reason}"),
            Self::ExtentBytes(bytes) => write!(f, "bad bitmap extent size {bytes}"),
            Self::NamespaceCount(count) => write!(f, "bad namespace count {count}"),
            Self::PageCount { stored, expected } => {
                write!(f, "page count {stored}, the namespaces need {expected}")
            }
            Self::NonzeroPadding => f.write_str("nonzero padding"),
            Self::PageIndex { stored, expected } => {
                write!(f, "page index {stored} at page {expected}")
            }
        }
    }
}

/// A decoded header slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataHeader {
    pub sequence: u64,
    pub volume_id: [u8; 16],
    pub generations: Generations,
    pub bitmap_extent_bytes: u64,
    pub namespace_sizes_bytes: Vec<u64>,
    pub page_count: u64,
    pub proposed_generation: u64,
}

/// A checked bitmap extent size.
pub fn check_extent_bytes(bytes: u64) -> Result<(), String> {
    if bytes.is_power_of_two()
        && (BITMAP_EXTENT_BYTES_MIN..=BITMAP_EXTENT_BYTES_MAX).contains(&bytes)
    {
        Ok(())
    } else {
        Err(format!(
            "must be a power of two from {BITMAP_EXTENT_BYTES_MIN} to {BITMAP_EXTENT_BYTES_MAX} bytes, got {bytes}"
        ))
    }
}

fn extents_of(size_bytes: u64, extent_bytes: u64) -> u64 {
    size_bytes.div_ceil(extent_bytes)
}

/// Bitmap pages for namespaces of `sizes_bytes` at `extent_bytes` per bit.
pub fn page_count(sizes_bytes: &[u64], extent_bytes: u64) -> u64 {
    let bits: u64 = sizes_bytes
        .iter()
        .map(|&s| extents_of(s, extent_bytes))
        .sum();
    bits.div_ceil(BITS_PER_PAGE).max(1)
}

/// The metadata file's size for these namespaces.
pub fn metadata_bytes(sizes_bytes: &[u64], extent_bytes: u64) -> u64 {
    BITMAP_PAGES_OFFSET_BYTES + page_count(sizes_bytes, extent_bytes) * BITMAP_PAGE_BYTES as u64
}

impl MetadataHeader {
    /// Encodes the slot (512 B) with its crc.
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), HEADER_SLOT_BYTES);
        assert!(self.sequence > 0 && !self.namespace_sizes_bytes.is_empty());
        out.fill(0);
        out[0..4].copy_from_slice(&METADATA_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&METADATA_VERSION.to_le_bytes());
        out[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        out[16..32].copy_from_slice(&self.volume_id);
        self.generations.encode(
            &mut out[HEADER_GENERATIONS_OFFSET..HEADER_GENERATIONS_OFFSET + GENERATIONS_BYTES],
        );
        out[96..100].copy_from_slice(&(self.bitmap_extent_bytes as u32).to_le_bytes());
        out[100..104].copy_from_slice(&(self.namespace_sizes_bytes.len() as u32).to_le_bytes());
        out[104..108].copy_from_slice(&(self.page_count as u32).to_le_bytes());
        for (i, size) in self.namespace_sizes_bytes.iter().enumerate() {
            let at = HEADER_SIZES_OFFSET + 8 * i;
            out[at..at + 8].copy_from_slice(&size.to_le_bytes());
        }
        out[HEADER_PROPOSED_OFFSET..HEADER_PROPOSED_OFFSET + 8]
            .copy_from_slice(&self.proposed_generation.to_le_bytes());
        let crc = crc32c_with_zero_field(out, HEADER_CRC_OFFSET);
        out[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one slot, rejecting every field that is not what `encode` writes.
    pub fn decode(bytes: &[u8]) -> Result<Self, HeaderError> {
        assert_eq!(bytes.len(), HEADER_SLOT_BYTES);
        if le_u32(bytes, 0) != METADATA_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if le_u32(bytes, HEADER_CRC_OFFSET) != crc32c_with_zero_field(bytes, HEADER_CRC_OFFSET) {
            return Err(HeaderError::Crc);
        }
        let version = le_u32(bytes, 4);
        if version != METADATA_VERSION {
            return Err(HeaderError::BadVersion(version));
        }
        let sequence = le_u64(bytes, 8);
        if sequence == 0 {
            return Err(HeaderError::ZeroSequence);
        }
        let generations = Generations::decode(
            &bytes[HEADER_GENERATIONS_OFFSET..HEADER_GENERATIONS_OFFSET + GENERATIONS_BYTES],
        )
        .map_err(HeaderError::Generations)?;
        let extent_bytes = le_u32(bytes, 96);
        if check_extent_bytes(u64::from(extent_bytes)).is_err() {
            return Err(HeaderError::ExtentBytes(extent_bytes));
        }
        let count = le_u32(bytes, 100);
        if count == 0 || count as usize > NAMESPACES_MAX {
            return Err(HeaderError::NamespaceCount(count));
        }
        let sizes: Vec<u64> = (0..count as usize)
            .map(|i| le_u64(bytes, HEADER_SIZES_OFFSET + 8 * i))
            .collect();
        let unused_sizes = HEADER_SIZES_OFFSET + 8 * count as usize..HEADER_PROPOSED_OFFSET;
        let tail = HEADER_PROPOSED_OFFSET + 8..HEADER_CRC_OFFSET;
        if le_u32(bytes, 108) != 0
            || bytes[unused_sizes].iter().any(|&b| b != 0)
            || bytes[tail].iter().any(|&b| b != 0)
        {
            return Err(HeaderError::NonzeroPadding);
        }
        let proposed_generation = le_u64(bytes, HEADER_PROPOSED_OFFSET);
        if proposed_generation == 0 {
            return Err(HeaderError::ZeroProposedGeneration);
        }
        let stored = le_u32(bytes, 104);
        let expected = page_count(&sizes, u64::from(extent_bytes));
        if u64::from(stored) != expected {
            return Err(HeaderError::PageCount { stored, expected });
        }
        Ok(MetadataHeader {
            sequence,
            volume_id: bytes[16..32].try_into().expect("16 bytes"),
            generations,
            bitmap_extent_bytes: u64::from(extent_bytes),
            namespace_sizes_bytes: sizes,
            page_count: expected,
            proposed_generation,
        })
    }
}

/// Encodes bitmap page `index` with `bits` (4080 B) and its crc.
pub fn encode_page(out: &mut [u8], index: u32, bits: &[u8]) {
    assert_eq!(out.len(), BITMAP_PAGE_BYTES);
    out[0..4].copy_from_slice(&BITMAP_PAGE_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&index.to_le_bytes());
    out[8..16].fill(0);
    out[BITMAP_PAGE_HEADER_BYTES..].copy_from_slice(bits);
    let crc = crc32c_with_zero_field(out, PAGE_CRC_OFFSET);
    out[PAGE_CRC_OFFSET..PAGE_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Checks bitmap page `index` and returns its bits.
pub fn decode_page(bytes: &[u8], index: u32) -> Result<&[u8], HeaderError> {
    assert_eq!(bytes.len(), BITMAP_PAGE_BYTES);
    if le_u32(bytes, 0) != BITMAP_PAGE_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    if le_u32(bytes, PAGE_CRC_OFFSET) != crc32c_with_zero_field(bytes, PAGE_CRC_OFFSET) {
        return Err(HeaderError::Crc);
    }
    let stored = le_u32(bytes, 4);
    if stored != index {
        return Err(HeaderError::PageIndex {
            stored,
            expected: index,
        });
    }
    if le_u32(bytes, 12) != 0 {
        return Err(HeaderError::NonzeroPadding);
    }
    Ok(&bytes[BITMAP_PAGE_HEADER_BYTES..])
}

/// What opening found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenReport {
    /// Pages that failed their check and were taken as all ones.
    pub pages_damaged: u64,
    /// The header slot in use was the only valid one.
    pub header_slot_damaged: bool,
    pub extents_marked: u64,
}

/// A mark's place in the persist order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Mark {
    /// Durable once `durable_through() >= seq` (0: already durable).
    pub seq: u64,
    /// Some page changed: the metadata will emit writes for it.
    pub persist_needed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetadataOp {
    Page(u32),
    Header,
    Flush,
}

/// One persist: the pages and header changed before it began, written, then flushed.
#[derive(Debug)]
struct Batch {
    /// Every change up to this sequence is in it.
    seq: u64,
    /// The header is still to submit (it goes first).
    header: bool,
    /// The batch writes the header (into the slot `header_sequence` names).
    has_header: bool,
    pages_submitted: usize,
    writes_inflight: usize,
    flush_issued: bool,
    failed: bool,
}

/// A node's metadata: generations and dirty bitmap, with their batched persistence.
pub struct NodeMetadata {
    volume_id: [u8; 16],
    generations: Generations,
    proposed_generation: u64,
    extent_bytes: u64,
    namespace_sizes_bytes: Vec<u64>,
    /// First bit of each namespace.
    namespace_first_bit: Vec<u64>,
    page_count: u64,
    /// The live bits, `BITMAP_PAGE_BYTES - BITMAP_PAGE_HEADER_BYTES` per page.
    bits: Vec<u8>,
    page_dirty: Vec<bool>,
    /// Written by the batch in flight (clear once its flush completed).
    page_in_batch: Vec<bool>,
    dirty_pages: Vec<u32>,
    /// The pages of the batch in flight, in submit order.
    batch_pages: Vec<u32>,
    header_dirty: bool,
    header_sequence: u64,
    /// The header as the batch in flight encodes it (its sequence and generations updated).
    header_template: MetadataHeader,
    /// Encoded pages and header of the batch in flight: a device may read them until completion.
    staging: Vec<u8>,
    header_staging: Vec<u8>,
    batch: Option<Batch>,
    last_seq: u64,
    durable_through: u64,
    next_op_id: u64,
    ops: Vec<(DeviceOpId, MetadataOp)>,
    faults: u64,
    last_fault: Option<DeviceError>,
}

const PAGE_BITS_BYTES: usize = BITMAP_PAGE_BYTES - BITMAP_PAGE_HEADER_BYTES;

impl NodeMetadata {
    fn build(header: &MetadataHeader) -> Self {
        let pages = header.page_count as usize;
        let mut first = 0;
        let namespace_first_bit = header
            .namespace_sizes_bytes
            .iter()
            .map(|&size| {
                let at = first;
                first += extents_of(size, header.bitmap_extent_bytes);
                at
            })
            .collect();
        NodeMetadata {
            volume_id: header.volume_id,
            generations: header.generations,
            proposed_generation: header.proposed_generation,
            extent_bytes: header.bitmap_extent_bytes,
            namespace_sizes_bytes: header.namespace_sizes_bytes.clone(),
            namespace_first_bit,
            page_count: header.page_count,
            bits: vec![0; pages * PAGE_BITS_BYTES],
            page_dirty: vec![false; pages],
            page_in_batch: vec![false; pages],
            dirty_pages: Vec::with_capacity(pages),
            batch_pages: Vec::with_capacity(pages),
            header_dirty: false,
            header_sequence: header.sequence,
            header_template: header.clone(),
            staging: vec![0; pages * BITMAP_PAGE_BYTES],
            header_staging: vec![0; HEADER_SLOT_BYTES],
            batch: None,
            last_seq: 0,
            durable_through: 0,
            next_op_id: 1,
            ops: Vec::with_capacity(METADATA_WRITES_INFLIGHT_MAX + 1),
            faults: 0,
            last_fault: None,
        }
    }

    /// New metadata for a node: identity `node_id` and `proposed_generation` (random,
    /// non-zero), no data, a clean bitmap. Write [`NodeMetadata::image`] to the node's storage
    /// before using it.
    pub fn format(
        volume_id: [u8; 16],
        node_id: u64,
        proposed_generation: u64,
        namespace_sizes_bytes: &[u64],
        extent_bytes: u64,
    ) -> Result<Self, MetadataError> {
        check_layout(namespace_sizes_bytes, extent_bytes)?;
        if node_id == 0 || proposed_generation == 0 {
            return Err(MetadataError::Layout(
                "node id and proposed generation are non-zero".into(),
            ));
        }
        Ok(Self::build(&MetadataHeader {
            sequence: 1,
            volume_id,
            generations: Generations::fresh(node_id),
            bitmap_extent_bytes: extent_bytes,
            namespace_sizes_bytes: namespace_sizes_bytes.to_vec(),
            page_count: page_count(namespace_sizes_bytes, extent_bytes),
            proposed_generation,
        }))
    }

    /// Reads metadata from its whole on-disk `image`, checking it is of `volume_id` and of
    /// namespaces of `namespace_sizes_bytes`.
    pub fn open(
        image: &[u8],
        volume_id: [u8; 16],
        namespace_sizes_bytes: &[u64],
    ) -> Result<(Self, OpenReport), MetadataError> {
        let header_area = HEADER_SLOTS * HEADER_SLOT_BYTES;
        if image.len() < header_area {
            return Err(MetadataError::Truncated {
                length: image.len() as u64,
                needed: header_area as u64,
            });
        }
        let slots = [0, 1].map(|slot| {
            MetadataHeader::decode(&image[slot * HEADER_SLOT_BYTES..(slot + 1) * HEADER_SLOT_BYTES])
        });
        let header = match &slots {
            [Ok(a), Ok(b)] => if a.sequence >= b.sequence { a } else { b }.clone(),
            [Ok(a), Err(_)] => a.clone(),
            [Err(_), Ok(b)] => b.clone(),
            [Err(a), Err(b)] => return Err(MetadataError::NoValidHeader([*a, *b])),
        };
        if header.volume_id != volume_id {
            return Err(MetadataError::OtherVolume {
                ours: volume_id,
                file: header.volume_id,
            });
        }
        if header.namespace_sizes_bytes != namespace_sizes_bytes {
            return Err(MetadataError::Layout(format!(
                "namespace sizes {:?} in the file, {:?} opened",
                header.namespace_sizes_bytes, namespace_sizes_bytes
            )));
        }
        let needed = metadata_bytes(namespace_sizes_bytes, header.bitmap_extent_bytes);
        if (image.len() as u64) < needed {
            return Err(MetadataError::Truncated {
                length: image.len() as u64,
                needed,
            });
        }
        let mut metadata = Self::build(&header);
        let mut pages_damaged = 0;
        for page in 0..header.page_count as usize {
            let at = BITMAP_PAGES_OFFSET_BYTES as usize + page * BITMAP_PAGE_BYTES;
            let target = &mut metadata.bits[page * PAGE_BITS_BYTES..(page + 1) * PAGE_BITS_BYTES];
            match decode_page(&image[at..at + BITMAP_PAGE_BYTES], page as u32) {
                Ok(bits) => target.copy_from_slice(bits),
                Err(error) => {
                    log::warn!("metadata: bitmap page {page} damaged ({error}): every extent of it is taken as changed");
                    target.fill(0xFF);
                    pages_damaged += 1;
                    metadata.dirty_page(page as u32);
                }
            }
        }
        metadata.clear_bits_past_end();
        let report = OpenReport {
            pages_damaged,
            header_slot_damaged: slots.iter().any(Result::is_err),
            extents_marked: metadata.marked_count(),
        };
        Ok((metadata, report))
    }

    /// The whole on-disk image as it is now (the header in the slot its sequence names, the
    /// other one zero): what a format writes.
    pub fn image(&self) -> Vec<u8> {
        let mut image =
            vec![0; metadata_bytes(&self.namespace_sizes_bytes, self.extent_bytes) as usize];
        let slot = (self.header_sequence % HEADER_SLOTS as u64) as usize;
        self.header(self.header_sequence)
            .encode(&mut image[slot * HEADER_SLOT_BYTES..(slot + 1) * HEADER_SLOT_BYTES]);
        for page in 0..self.page_count as usize {
            let at = BITMAP_PAGES_OFFSET_BYTES as usize + page * BITMAP_PAGE_BYTES;
            encode_page(
                &mut image[at..at + BITMAP_PAGE_BYTES],
                page as u32,
                &self.bits[page * PAGE_BITS_BYTES..(page + 1) * PAGE_BITS_BYTES],
            );
        }
        image
    }

    fn header(&self, sequence: u64) -> MetadataHeader {
        MetadataHeader {
            sequence,
            volume_id: self.volume_id,
            generations: self.generations,
            bitmap_extent_bytes: self.extent_bytes,
            namespace_sizes_bytes: self.namespace_sizes_bytes.clone(),
            page_count: self.page_count,
            proposed_generation: self.proposed_generation,
        }
    }

    /// Bits past the last namespace's last extent are never set (a damaged last page).
    fn clear_bits_past_end(&mut self) {
        let total = self.total_bits();
        for bit in total..self.page_count * BITS_PER_PAGE {
            self.bits[(bit / 8) as usize] &= !(1 << (bit % 8));
        }
    }

    fn total_bits(&self) -> u64 {
        let last = self.namespace_sizes_bytes.len() - 1;
        self.namespace_first_bit[last]
            + extents_of(self.namespace_sizes_bytes[last], self.extent_bytes)
    }

    pub fn generations(&self) -> &Generations {
        &self.generations
    }

    pub fn volume_id(&self) -> [u8; 16] {
        self.volume_id
    }

    /// The generation this node proposes to a peer when neither holds data.
    pub fn proposed_generation(&self) -> u64 {
        self.proposed_generation
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    /// Every change up to this sequence survives a crash.
    pub fn durable_through(&self) -> u64 {
        self.durable_through
    }

    /// The sequence of the latest change.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Nothing waits to be written or is being written.
    pub fn is_durable(&self) -> bool {
        self.batch.is_none() && self.dirty_pages.is_empty() && !self.header_dirty
    }

    fn next_seq(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    fn change_header(&mut self) -> u64 {
        self.generations.check();
        self.header_dirty = true;
        self.next_seq()
    }

    /// Takes `generation` (random, non-zero, new) as this node's current one: a promotion, or a
    /// source that starts writing without its peer. Returns the change's sequence.
    pub fn new_generation(&mut self, generation: u64) -> u64 {
        let old = self.generations.current;
        self.generations.new_generation(generation);
        log::info!(
            "metadata: new generation {} (was {}; the bitmap counts changes since {})",
            Hex(generation),
            Hex(old),
            Hex(self.generations.bitmap_base)
        );
        self.change_header()
    }

    /// Takes the peer's generation (a handshake settled on it); `assumed_identical` records
    /// that `assume_identical` was consumed.
    pub fn adopt(&mut self, generation: u64, assumed_identical: bool) -> u64 {
        self.generations.adopt(generation);
        if assumed_identical {
            self.generations.flags |= FLAG_ASSUME_IDENTICAL_CONSUMED;
        }
        self.change_header()
    }

    /// The operator discards this node's data after a split brain: from now on it holds no data
    /// of the volume (its generations are forgotten, its bitmap cleared; its node id stays), so
    /// the next handshake gives it a full sync from its peer. Returns the change's sequence.
    pub fn discard_data(&mut self) -> u64 {
        let consumed = self.generations.flags & FLAG_ASSUME_IDENTICAL_CONSUMED;
        self.generations = Generations::fresh(self.generations.node_id);
        self.generations.flags = consumed;
        self.bits.fill(0);
        for page in 0..self.page_count as u32 {
            self.dirty_page(page);
        }
        self.change_header()
    }

    /// Sets or clears a persistent flag ([`crate::generation::FLAG_RESYNC_TARGET`]); returns the
    /// change's sequence.
    pub fn set_flag(&mut self, flag: u32, on: bool) -> u64 {
        if on {
            self.generations.flags |= flag;
        } else {
            self.generations.flags &= !flag;
        }
        self.change_header()
    }

    /// The bitmap counts changes since `generation` (0: since nothing; after a resync).
    pub fn set_bitmap_base(&mut self, generation: u64) -> u64 {
        self.generations.bitmap_base = generation;
        self.change_header()
    }

    /// The bit range of `length_bytes` at `lba` of namespace `nsid`: every extent it touches.
    fn bit_range(&self, nsid: u32, lba: u64, length_bytes: u64) -> (u64, u64) {
        let offset = lba * SECTOR_SIZE as u64;
        assert!(length_bytes > 0, "an empty range marks nothing");
        assert_eq!(
            check_extent(&self.namespace_sizes_bytes, nsid, offset, length_bytes),
            Ok(()),
            "callers check ranges first"
        );
        let first = self.namespace_first_bit[nsid as usize - 1];
        (
            first + offset / self.extent_bytes,
            first + (offset + length_bytes - 1) / self.extent_bytes + 1,
        )
    }

    fn bit(&self, bit: u64) -> bool {
        self.bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0
    }

    fn page_of(bit: u64) -> u32 {
        (bit / BITS_PER_PAGE) as u32
    }

    fn dirty_page(&mut self, page: u32) {
        if !self.page_dirty[page as usize] {
            self.page_dirty[page as usize] = true;
            self.dirty_pages.push(page);
        }
    }

    /// Marks every extent `length_bytes` at `lba` of `nsid` touches as changed. Cheap when they
    /// already are and that is durable (a hot extent costs no I/O).
    pub fn mark(&mut self, nsid: u32, lba: u64, length_bytes: u64) -> Mark {
        let (start, end) = self.bit_range(nsid, lba, length_bytes);
        let settled = (start..end).all(|bit| {
            let page = Self::page_of(bit) as usize;
            self.bit(bit) && !self.page_dirty[page] && !self.page_in_batch[page]
        });
        if settled {
            return Mark {
                seq: 0,
                persist_needed: false,
            };
        }
        let seq = self.next_seq();
        for bit in start..end {
            self.bits[(bit / 8) as usize] |= 1 << (bit % 8);
        }
        // A page whose bits are set but not yet durable (dirty, or in the batch in flight) is
        // written again by the next batch, which then carries this mark.
        for page in Self::page_of(start)..=Self::page_of(end - 1) {
            self.dirty_page(page);
        }
        Mark {
            seq,
            persist_needed: true,
        }
    }

    /// Clears the extents lying wholly inside the range (a resync copied them); returns the
    /// change's sequence.
    pub fn clear(&mut self, nsid: u32, lba: u64, length_bytes: u64) -> u64 {
        let offset = lba * SECTOR_SIZE as u64;
        let (start, end) = self.bit_range(nsid, lba, length_bytes);
        let first = self.namespace_first_bit[nsid as usize - 1];
        let size = self.namespace_sizes_bytes[nsid as usize - 1];
        let range_end = offset + length_bytes;
        for bit in start..end {
            let extent_start = (bit - first) * self.extent_bytes;
            let extent_end = (extent_start + self.extent_bytes).min(size);
            if extent_start >= offset && extent_end <= range_end && self.bit(bit) {
                self.bits[(bit / 8) as usize] &= !(1 << (bit % 8));
                self.dirty_page(Self::page_of(bit));
            }
        }
        self.next_seq()
    }

    /// Every marked extent as (nsid, offset_bytes, length_bytes), in order.
    pub fn iter_marked(&self) -> impl Iterator<Item = (u32, u64, u64)> + '_ {
        (0..self.namespace_sizes_bytes.len()).flat_map(move |index| {
            let first = self.namespace_first_bit[index];
            let size = self.namespace_sizes_bytes[index];
            let extent = self.extent_bytes;
            (0..extents_of(size, extent))
                .filter(move |&e| self.bit(first + e))
                .map(move |e| {
                    let offset = e * extent;
                    (index as u32 + 1, offset, extent.min(size - offset))
                })
        })
    }

    /// The first marked extent at or after volume bit `from_bit` (extents are numbered across
    /// namespaces in nsid order): (its bit, nsid, offset_bytes, length_bytes). Skips clean bytes
    /// eight extents at a time, so a resync walks a sparse bitmap cheaply.
    pub fn next_marked(&self, from_bit: u64) -> Option<(u64, u32, u64, u64)> {
        let total = self.total_bits();
        let mut bit = from_bit;
        while bit < total {
            if bit.is_multiple_of(8) && self.bits[(bit / 8) as usize] == 0 {
                bit += 8;
                continue;
            }
            if self.bit(bit) {
                let index = self
                    .namespace_first_bit
                    .iter()
                    .rposition(|&first| first <= bit)
                    .expect("bit 0 starts namespace 1");
                let offset = (bit - self.namespace_first_bit[index]) * self.extent_bytes;
                let size = self.namespace_sizes_bytes[index];
                return Some((
                    bit,
                    index as u32 + 1,
                    offset,
                    self.extent_bytes.min(size - offset),
                ));
            }
            bit += 1;
        }
        None
    }

    /// Marks every extent of every namespace (a full sync).
    pub fn mark_all(&mut self) -> Mark {
        let mut last = Mark {
            seq: 0,
            persist_needed: false,
        };
        for index in 0..self.namespace_sizes_bytes.len() {
            let size = self.namespace_sizes_bytes[index];
            let mark = self.mark(index as u32 + 1, 0, size);
            if mark.persist_needed {
                last = mark;
            }
        }
        last
    }

    /// Clears every extent of every namespace (what a finished resync, or a handshake that finds
    /// the marks meaningless, leaves); returns the change's sequence.
    pub fn clear_all(&mut self) -> u64 {
        let mut seq = 0;
        for index in 0..self.namespace_sizes_bytes.len() {
            seq = self.clear(index as u32 + 1, 0, self.namespace_sizes_bytes[index]);
        }
        seq
    }

    pub fn marked_count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Whether the extent holding byte `offset_bytes` of `nsid` is marked.
    pub fn is_marked(&self, nsid: u32, offset_bytes: u64) -> bool {
        self.bit(self.namespace_first_bit[nsid as usize - 1] + offset_bytes / self.extent_bytes)
    }

    /// Writes that failed so far, and the error of the current failing streak (if any).
    pub fn faults(&self) -> (u64, Option<DeviceError>) {
        (self.faults, self.last_fault)
    }

    fn start_batch(&mut self) {
        assert!(self.batch.is_none());
        self.batch_pages.clear();
        while let Some(page) = self.dirty_pages.pop() {
            self.page_dirty[page as usize] = false;
            self.page_in_batch[page as usize] = true;
            let p = page as usize;
            encode_page(
                &mut self.staging[p * BITMAP_PAGE_BYTES..(p + 1) * BITMAP_PAGE_BYTES],
                page,
                &self.bits[p * PAGE_BITS_BYTES..(p + 1) * PAGE_BITS_BYTES],
            );
            self.batch_pages.push(page);
        }
        // Pages in offset order: a disk sees one sweep.
        self.batch_pages.sort_unstable();
        let header = std::mem::take(&mut self.header_dirty);
        if header {
            self.header_sequence += 1;
            // The header kept for encoding: no allocation per batch.
            self.header_template.sequence = self.header_sequence;
            self.header_template.generations = self.generations;
            self.header_template.encode(&mut self.header_staging);
        }
        self.batch = Some(Batch {
            seq: self.last_seq,
            header,
            has_header: header,
            pages_submitted: 0,
            writes_inflight: 0,
            flush_issued: false,
            failed: false,
        });
    }

    fn start_op(&mut self, purpose: MetadataOp) -> DeviceOpId {
        let id = DeviceOpId(self.next_op_id);
        self.next_op_id += 1;
        self.ops.push((id, purpose));
        id
    }

    /// The next write or flush for the metadata device (its only namespace, nsid 1).
    #[must_use]
    pub fn poll_device_op(&mut self) -> Option<DeviceOp<'_>> {
        if self.batch.is_none() {
            if self.dirty_pages.is_empty() && !self.header_dirty {
                return None;
            }
            self.start_batch();
        }
        let batch = self.batch.as_mut().expect("started above");
        if batch.writes_inflight >= METADATA_WRITES_INFLIGHT_MAX || batch.flush_issued {
            return None;
        }
        let (purpose, offset_bytes) = if batch.header {
            batch.header = false;
            let slot = (self.header_sequence % HEADER_SLOTS as u64) as usize;
            (MetadataOp::Header, (slot * HEADER_SLOT_BYTES) as u64)
        } else if batch.pages_submitted < self.batch_pages.len() {
            let page = self.batch_pages[batch.pages_submitted];
            batch.pages_submitted += 1;
            (
                MetadataOp::Page(page),
                BITMAP_PAGES_OFFSET_BYTES + u64::from(page) * BITMAP_PAGE_BYTES as u64,
            )
        } else if batch.writes_inflight == 0 {
            batch.flush_issued = true;
            let id = self.start_op(MetadataOp::Flush);
            return Some(DeviceOp {
                id,
                nsid: 1,
                request: DeviceRequest::Flush,
            });
        } else {
            return None;
        };
        batch.writes_inflight += 1;
        let id = self.start_op(purpose);
        let data = match purpose {
            MetadataOp::Header => &self.header_staging[..],
            MetadataOp::Page(page) => {
                let p = page as usize;
                &self.staging[p * BITMAP_PAGE_BYTES..(p + 1) * BITMAP_PAGE_BYTES]
            }
            MetadataOp::Flush => unreachable!("flushes return above"),
        };
        Some(DeviceOp {
            id,
            nsid: 1,
            request: DeviceRequest::Write { offset_bytes, data },
        })
    }

    /// Takes the completion of an op [`NodeMetadata::poll_device_op`] emitted, in any order.
    pub fn handle_device_completion(&mut self, completion: DeviceCompletion<'_>) {
        let at = self
            .ops
            .iter()
            .position(|(id, _)| *id == completion.id)
            .expect("a completion of a metadata op, once");
        let (_, purpose) = self.ops.swap_remove(at);
        let batch = self
            .batch
            .as_mut()
            .expect("ops belong to the batch in flight");
        if let Err(error) = completion.result {
            // Once per failing streak: a device that keeps failing is retried at every poll.
            if !batch.failed && self.last_fault.is_none() {
                log::error!("metadata: {purpose:?} failed: {error}; the batch is written again");
            }
            batch.failed = true;
            self.faults += 1;
            self.last_fault = Some(error);
        }
        match purpose {
            MetadataOp::Header | MetadataOp::Page(_) => {
                batch.writes_inflight -= 1;
                // A batch that failed is not flushed: it ends once its writes are back.
                if batch.failed && batch.writes_inflight == 0 && !batch.flush_issued {
                    self.end_batch();
                }
            }
            MetadataOp::Flush => self.end_batch(),
        }
    }

    fn end_batch(&mut self) {
        let batch = self.batch.take().expect("a batch in flight");
        assert!(self.ops.is_empty(), "a batch ends with its last op");
        for index in 0..self.batch_pages.len() {
            let page = self.batch_pages[index];
            self.page_in_batch[page as usize] = false;
            if batch.failed {
                self.dirty_page(page);
            }
        }
        if batch.failed {
            if batch.has_header {
                // The retry writes the same slot: the other one keeps the last good header.
                self.header_sequence -= 1;
                self.header_dirty = true;
            }
        } else {
            assert!(batch.seq >= self.durable_through);
            self.durable_through = batch.seq;
            if self.last_fault.take().is_some() {
                log::info!("metadata: writes succeed again");
            }
        }
        self.batch_pages.clear();
    }
}

fn check_layout(sizes_bytes: &[u64], extent_bytes: u64) -> Result<(), MetadataError> {
    check_extent_bytes(extent_bytes)
        .map_err(|e| MetadataError::Layout(format!("bitmap_extent_bytes {e}")))?;
    if sizes_bytes.is_empty() || sizes_bytes.len() > NAMESPACES_MAX {
        return Err(MetadataError::Layout(format!(
            "{} namespaces (1 to {NAMESPACES_MAX})",
            sizes_bytes.len()
        )));
    }
    if page_count(sizes_bytes, extent_bytes) > BITMAP_PAGES_MAX {
        return Err(MetadataError::Layout("bitmap too large".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
