//! Unit tests of the ring format: append, scan, wrap-around, torn entries and superblocks.

use super::*;
use crate::geometry::RING_BYTES_MIN;

const VOLUME: [u8; 16] = [7; 16];

fn fresh() -> NvramRing<Vec<u8>> {
    let geometry = RingGeometry::for_ring_size(RING_BYTES_MIN).unwrap();
    NvramRing::format(vec![0xA5; RING_BYTES_MIN as usize], geometry, VOLUME, 1)
}

fn request(cp_number: u64, lba: u64, length_bytes: u32) -> EntryRequest {
    EntryRequest {
        cp_number,
        transfer_id: 1,
        nsid: 1,
        lba,
        length_bytes,
        zeroes: false,
    }
}

fn append(
    ring: &mut NvramRing<Vec<u8>>,
    request: EntryRequest,
    fill: u8,
) -> Result<EntryHeader, RingFull> {
    let slot = ring.reserve(&request)?;
    ring.data_mut(&slot).fill(fill);
    ring.commit(&slot);
    Ok(ring.entry_header(slot.half(), slot.slot()))
}

fn reopen(ring: NvramRing<Vec<u8>>) -> (NvramRing<Vec<u8>>, Vec<EntryHeader>) {
    NvramRing::open(ring.into_memory()).unwrap()
}

#[test]
fn header_round_trip_and_every_field_checked() {
    let header = EntryHeader {
        flags: ENTRY_FLAG_ZEROES,
        seq: 9,
        cp_number: 3,
        transfer_id: 4,
        nsid: 2,
        length_bytes: 8192,
        lba: 77,
        data_offset: 4096,
        data_crc: 0,
    };
    let mut bytes = [0; ENTRY_HEADER_BYTES];
    header.encode(&mut bytes);
    assert_eq!(EntryHeader::decode(&bytes), Ok(header));
    for byte in 0..ENTRY_HEADER_BYTES {
        let mut corrupt = bytes;
        corrupt[byte] ^= 0x10;
        assert!(
            EntryHeader::decode(&corrupt).is_err(),
            "flip in byte {byte} accepted"
        );
    }
    let mut padded = bytes;
    padded[57] = 1;
    let crc = crc32c(&padded[..ENTRY_CRC_OFFSET]);
    padded[ENTRY_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(EntryHeader::decode(&padded), Err(HeaderFault::Padding));
    assert_eq!(
        EntryHeader::decode(&[0; ENTRY_HEADER_BYTES]),
        Err(HeaderFault::Empty)
    );
}

#[test]
fn placement_keeps_blocks_aligned() {
    assert_eq!(placement_offset(0, 0), 0);
    assert_eq!(placement_offset(0, 1), 512);
    assert_eq!(placement_offset(512, 0), 4096);
    assert_eq!(placement_offset(4096 + 1024, 10), 4096 + 1024);
    assert_eq!(placement_offset(8192, 16), 8192);
    let mut ring = fresh();
    let aligned = append(&mut ring, request(1, 8, 8192), 1).unwrap();
    let unaligned = append(&mut ring, request(1, 3, 1024), 2).unwrap();
    let after = append(&mut ring, request(1, 16, 4096), 3).unwrap();
    assert_eq!(aligned.data_offset, 0);
    assert_eq!(unaligned.data_offset, 8192 + 1536);
    assert_eq!(after.data_offset, 3 * 4096);
}

#[test]
fn fresh_ring_scans_empty_and_keeps_identity() {
    let ring = fresh();
    let (ring, entries) = reopen(ring);
    assert!(entries.is_empty());
    assert_eq!(ring.superblock().volume_id, VOLUME);
    assert_eq!(ring.superblock().cp_completed, 0);
    assert_eq!(ring.superblock().epoch, 1);
}

#[test]
fn committed_prefix_only() {
    let mut ring = fresh();
    let first = ring.reserve(&request(1, 0, 4096)).unwrap();
    let second = ring.reserve(&request(1, 8, 4096)).unwrap();
    assert_eq!(ring.commit(&second), 0);
    let (mut ring, entries) = reopen(ring);
    assert!(
        entries.is_empty(),
        "an entry after an uncommitted slot does not count"
    );
    let again = append(&mut ring, request(1, 16, 512), 9).unwrap();
    assert_eq!(
        again.seq,
        first.seq(),
        "seq continues from the valid prefix"
    );
    let (_, entries) = reopen(ring);
    assert_eq!(entries, vec![again]);
}

#[test]
fn zeroes_entries_take_no_data_space() {
    let mut ring = fresh();
    let slot = ring
        .reserve(&EntryRequest {
            zeroes: true,
            ..request(1, 0, 1 << 20)
        })
        .unwrap();
    assert!(ring.data_mut(&slot).is_empty());
    ring.commit(&slot);
    assert_eq!(ring.data_cursor(1), 0);
    let data = append(&mut ring, request(1, 0, 4096), 5).unwrap();
    let (ring, entries) = reopen(ring);
    assert_eq!(entries.len(), 2);
    assert!(entries[0].is_zeroes());
    assert_eq!(ring.data(&entries[1]), &[5; 4096][..]);
    assert_eq!(entries[1], data);
}

#[test]
fn wrap_around_across_halves() {
    let mut ring = fresh();
    let mut written = Vec::new();
    for cp in 1..=4u64 {
        let mut count = 0;
        while let Ok(header) = append(&mut ring, request(cp, count * 8, 4096), cp as u8) {
            count += 1;
            written.push(header);
        }
        assert_eq!(
            count,
            u64::from(ring.geometry().half_data_bytes) / 4096,
            "cp {cp} fills its half"
        );
        let (reopened, entries) = reopen(ring);
        ring = reopened;
        let completed = ring.superblock().cp_completed;
        let expected: Vec<_> = written
            .iter()
            .copied()
            .filter(|e| e.cp_number > completed)
            .collect();
        assert!(
            entries == expected,
            "scan after filling cp {cp}: {} entries, {} expected",
            entries.len(),
            expected.len()
        );
        assert!(entries
            .iter()
            .all(|e| ring.data(e).iter().all(|&b| b == e.cp_number as u8)));
        if cp > 1 {
            ring.record_cp_completed(cp - 1, 1);
            ring.release_half(half_of_cp(cp - 1));
            let (reopened, entries) = reopen(ring);
            ring = reopened;
            assert!(entries.iter().all(|e| e.cp_number == cp));
            assert_eq!(entries.len() as u64, count);
        }
    }
    assert!(written.windows(2).all(|w| w[1].seq == w[0].seq + 1));
}

#[test]
fn next_cp_entries_count_only_when_the_sequence_continues() {
    let mut ring = fresh();
    let a = append(&mut ring, request(1, 0, 4096), 1).unwrap();
    let b = append(&mut ring, request(2, 0, 4096), 2).unwrap();
    let (ring, entries) = reopen(ring);
    assert_eq!(entries, vec![a, b]);
    // Break the last entry of CP 1: CP 2's entries no longer continue the sequence.
    let mut memory = ring.into_memory();
    let data_start = RingGeometry::for_ring_size(RING_BYTES_MIN)
        .unwrap()
        .data_area_offset(1) as usize;
    memory[data_start] ^= 1;
    let (_, entries) = NvramRing::open(memory).unwrap();
    assert!(entries.is_empty());
}

#[test]
fn corrupt_data_stops_the_scan_there() {
    let mut ring = fresh();
    let headers: Vec<_> = (0..6)
        .map(|i| append(&mut ring, request(1, i * 8, 4096), i as u8).unwrap())
        .collect();
    let geometry = ring.geometry();
    let mut memory = ring.into_memory();
    let at = (geometry.data_area_offset(1) + u64::from(headers[3].data_offset) + 100) as usize;
    memory[at] ^= 0xFF;
    let (mut ring, entries) = NvramRing::open(memory).unwrap();
    assert_eq!(entries, headers[..3].to_vec());
    // The torn slot and everything after it were zeroed: new appends continue at slot 3.
    let next = append(&mut ring, request(1, 0, 512), 9).unwrap();
    assert_eq!(next.seq, headers[3].seq);
    let (_, entries) = reopen(ring);
    assert_eq!(entries.len(), 4);
}

#[test]
fn torn_superblock_falls_back_to_the_older_copy() {
    let mut ring = fresh();
    ring.record_cp_completed(1, 5);
    ring.record_cp_completed(2, 9);
    let newest = (ring.superblock().generation % 2 * SUPERBLOCK_BYTES) as usize;
    let mut memory = ring.into_memory();
    memory[newest + 70] ^= 1;
    let (ring, _) = NvramRing::open(memory).unwrap();
    assert_eq!(ring.superblock().cp_completed, 1);
    assert_eq!(ring.superblock().transfer_id_floor, 5);
    let mut memory = ring.into_memory();
    memory[0] ^= 1;
    memory[SUPERBLOCK_BYTES as usize] ^= 1;
    assert_eq!(NvramRing::open(memory).err(), Some(RingError::NoSuperblock));
}

#[test]
fn wrong_memory_size_is_rejected() {
    let ring = fresh();
    let mut memory = ring.into_memory();
    memory.truncate(memory.len() - 4096);
    assert!(matches!(
        NvramRing::open(memory),
        Err(RingError::SizeMismatch { .. })
    ));
}

#[test]
fn full_half_reports_ring_full() {
    let mut ring = fresh();
    let half_data = ring.geometry().half_data_bytes;
    let big = request(1, 0, 1 << 20);
    append(&mut ring, big, 1).unwrap();
    assert_eq!(
        ring.reserve(&big),
        Err(RingFull),
        "a second 1 MiB does not fit in {half_data}"
    );
    let mut zeroes = 0;
    while ring
        .reserve(&EntryRequest {
            zeroes: true,
            ..request(1, 0, 512)
        })
        .is_ok()
    {
        zeroes += 1;
    }
    assert_eq!(
        zeroes,
        ring.geometry().half_header_slots - 1,
        "header slots run out too"
    );
}
