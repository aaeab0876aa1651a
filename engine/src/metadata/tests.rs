use super::*;
use crate::device::DeviceOpKind;
use crate::test_rng::Rng;

const VOLUME: [u8; 16] = [7; 16];
const MIB: u64 = 1 << 20;

fn metadata(sizes: &[u64], extent_bytes: u64) -> NodeMetadata {
    NodeMetadata::format(VOLUME, 0x5EED, 0x9909, sizes, extent_bytes).unwrap()
}

/// A metadata device: completed writes sit in a volatile cache until a flush completes; a crash
/// keeps the durable image plus any subset of the cached writes, each possibly torn at a sector.
struct Disk {
    durable: Vec<u8>,
    cached: Vec<(u64, Vec<u8>)>,
    inflight: Vec<(DeviceOpId, DeviceOpKind, u64, Vec<u8>)>,
}

impl Disk {
    fn new(image: Vec<u8>) -> Self {
        Disk {
            durable: image,
            cached: Vec::new(),
            inflight: Vec::new(),
        }
    }

    fn submit_all(&mut self, metadata: &mut NodeMetadata) -> usize {
        let mut count = 0;
        while let Some(op) = metadata.poll_device_op() {
            assert_eq!(op.nsid, 1);
            let (offset, data) = match op.request {
                DeviceRequest::Write { offset_bytes, data } => (offset_bytes, data.to_vec()),
                DeviceRequest::Flush => (0, Vec::new()),
                other => panic!("metadata emits writes and flushes only: {other:?}"),
            };
            self.inflight.push((op.id, op.request.kind(), offset, data));
            count += 1;
        }
        count
    }

    /// Completes the in-flight op at `index` (`fail`: with an error, nothing written).
    fn complete(&mut self, metadata: &mut NodeMetadata, index: usize, fail: bool) {
        let (id, kind, offset, data) = self.inflight.swap_remove(index);
        let result = if fail {
            Err(DeviceError {
                kind: std::io::ErrorKind::Other,
                errno: Some(5),
            })
        } else {
            match kind {
                DeviceOpKind::Write => self.cached.push((offset, data)),
                DeviceOpKind::Flush => {
                    for (offset, data) in self.cached.drain(..) {
                        let at = offset as usize;
                        self.durable[at..at + data.len()].copy_from_slice(&data);
                    }
                }
                DeviceOpKind::Read => unreachable!(),
            }
            Ok(&[][..])
        };
        metadata.handle_device_completion(DeviceCompletion { id, result });
    }

    fn drain(&mut self, metadata: &mut NodeMetadata) {
        loop {
            self.submit_all(metadata);
            if self.inflight.is_empty() {
                break;
            }
            self.complete(metadata, 0, false);
        }
    }

    /// What survives a crash now: in-flight writes may have landed too, whole or torn.
    fn crash_image(&self, rng: &mut Rng) -> Vec<u8> {
        let mut image = self.durable.clone();
        let inflight = self
            .inflight
            .iter()
            .map(|(_, _, offset, data)| (offset, data));
        let unflushed = self.cached.iter().map(|(offset, data)| (offset, data));
        for (offset, data) in unflushed.chain(inflight) {
            match rng.below(3) {
                0 => {}
                1 => image[*offset as usize..*offset as usize + data.len()].copy_from_slice(data),
                _ => {
                    let sectors = data.len() / SECTOR_SIZE;
                    let torn = rng.below(sectors as u64 + 1) as usize * SECTOR_SIZE;
                    image[*offset as usize..*offset as usize + torn].copy_from_slice(&data[..torn]);
                }
            }
        }
        image
    }
}

#[test]
fn a_formatted_image_opens_to_the_same_metadata() {
    let sizes = [16 * MIB, 3 * MIB + 4096];
    let fresh = metadata(&sizes, 64 << 10);
    let image = fresh.image();
    assert_eq!(image.len() as u64, metadata_bytes(&sizes, 64 << 10));
    let (opened, report) = NodeMetadata::open(&image, VOLUME, &sizes).unwrap();
    assert_eq!(opened.generations(), fresh.generations());
    assert_eq!(
        report,
        OpenReport {
            pages_damaged: 0,
            header_slot_damaged: true,
            extents_marked: 0
        }
    );
    assert!(matches!(
        NodeMetadata::open(&image, [8; 16], &sizes),
        Err(MetadataError::OtherVolume { .. })
    ));
    let other = NodeMetadata::open(&image, VOLUME, &[16 * MIB])
        .err()
        .unwrap();
    assert!(other.to_string().contains("namespace sizes"), "{other}");
    assert!(matches!(
        NodeMetadata::open(&image[..image.len() - 1], VOLUME, &sizes),
        Err(MetadataError::Truncated { .. })
    ));
}

#[test]
fn extent_sizes_are_checked() {
    assert!(check_extent_bytes(BITMAP_EXTENT_BYTES_DEFAULT).is_ok());
    assert!(check_extent_bytes(BITMAP_EXTENT_BYTES_MIN).is_ok());
    assert!(check_extent_bytes(BITMAP_EXTENT_BYTES_MAX).is_ok());
    for bad in [0, 2048, 3 << 12, BITMAP_EXTENT_BYTES_MAX * 2] {
        assert!(check_extent_bytes(bad).is_err(), "{bad}");
        assert!(NodeMetadata::format(VOLUME, 1, 2, &[MIB], bad).is_err());
    }
}

#[test]
fn the_header_slot_round_trips_and_rejects_every_corrupted_field() {
    let mut generations = Generations::fresh(0xAB);
    generations.new_generation(0x11);
    generations.new_generation(0x22);
    let header = MetadataHeader {
        sequence: 9,
        volume_id: VOLUME,
        generations,
        bitmap_extent_bytes: 1 << 16,
        namespace_sizes_bytes: vec![16 * MIB, 8 * MIB],
        page_count: page_count(&[16 * MIB, 8 * MIB], 1 << 16),
        proposed_generation: 0x3333,
    };
    let mut slot = vec![0u8; HEADER_SLOT_BYTES];
    header.encode(&mut slot);
    assert_eq!(MetadataHeader::decode(&slot), Ok(header.clone()));
    // Each field corrupted, the crc re-sealed so the field's own check must catch it.
    let corrupt = |at: usize, bytes: &[u8]| {
        let mut bad = slot.clone();
        bad[at..at + bytes.len()].copy_from_slice(bytes);
        let crc = crc32c_with_zero_field(&bad, HEADER_CRC_OFFSET);
        bad[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        MetadataHeader::decode(&bad)
    };
    assert_eq!(corrupt(0, b"XXXX"), Err(HeaderError::BadMagic));
    assert_eq!(
        corrupt(4, &2u32.to_le_bytes()),
        Err(HeaderError::BadVersion(2))
    );
    assert_eq!(
        corrupt(8, &0u64.to_le_bytes()),
        Err(HeaderError::ZeroSequence)
    );
    assert_eq!(
        corrupt(32, &0u64.to_le_bytes()),
        Err(HeaderError::Generations("zero node id"))
    );
    assert!(matches!(
        corrupt(48, &0x22u64.to_le_bytes()),
        Err(HeaderError::Generations(_))
    ));
    assert_eq!(
        corrupt(96, &3000u32.to_le_bytes()),
        Err(HeaderError::ExtentBytes(3000))
    );
    assert_eq!(
        corrupt(100, &0u32.to_le_bytes()),
        Err(HeaderError::NamespaceCount(0))
    );
    assert_eq!(
        corrupt(100, &17u32.to_le_bytes()),
        Err(HeaderError::NamespaceCount(17))
    );
    assert!(matches!(
        corrupt(104, &7u32.to_le_bytes()),
        Err(HeaderError::PageCount { stored: 7, .. })
    ));
    assert_eq!(corrupt(108, &[1]), Err(HeaderError::NonzeroPadding));
    assert_eq!(corrupt(300, &[1]), Err(HeaderError::NonzeroPadding));
    assert_eq!(
        corrupt(140, &[1]),
        Err(HeaderError::NonzeroPadding),
        "an unused size"
    );
    assert_eq!(
        corrupt(240, &0u64.to_le_bytes()),
        Err(HeaderError::ZeroProposedGeneration)
    );
    // A size changed is a different page count or caught by open's layout check.
    assert!(matches!(
        corrupt(112, &(64 * 1024 * MIB).to_le_bytes()),
        Err(HeaderError::PageCount { .. })
    ));
    // Any flipped bit without re-sealing fails the crc.
    for at in [5, 20, 40, 97, 113, 200, 509] {
        let mut bad = slot.clone();
        bad[at] ^= 0x10;
        assert_eq!(
            MetadataHeader::decode(&bad),
            Err(HeaderError::Crc),
            "byte {at}"
        );
    }
}

#[test]
fn a_bitmap_page_round_trips_and_rejects_corruption() {
    let bits = vec![0x5A; PAGE_BITS_BYTES];
    let mut page = vec![0u8; BITMAP_PAGE_BYTES];
    encode_page(&mut page, 3, &bits);
    assert_eq!(decode_page(&page, 3), Ok(&bits[..]));
    assert_eq!(
        decode_page(&page, 4),
        Err(HeaderError::PageIndex {
            stored: 3,
            expected: 4
        })
    );
    let mut bad = page.clone();
    bad[100] ^= 1;
    assert_eq!(decode_page(&bad, 3), Err(HeaderError::Crc));
    let mut bad = page.clone();
    bad[0] = 0;
    assert_eq!(decode_page(&bad, 3), Err(HeaderError::BadMagic));
    let mut bad = page.clone();
    bad[12] = 1;
    let crc = crc32c_with_zero_field(&bad, PAGE_CRC_OFFSET);
    bad[8..12].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode_page(&bad, 3), Err(HeaderError::NonzeroPadding));
}

#[test]
fn marks_batch_into_one_write_per_page_then_a_flush() {
    let sizes = [256 * MIB];
    let mut m = metadata(&sizes, 4096);
    let mut disk = Disk::new(m.image());
    let first = m.mark(1, 0, 4096);
    let second = m.mark(1, 8, 8192); // bytes 4096..12288: extents 1 and 2, same page
    let far = m.mark(1, (BITS_PER_PAGE * 4096 + 4096) / 512, 4096); // page 1
    assert!(first.persist_needed && second.persist_needed && far.persist_needed);
    assert_eq!(disk.submit_all(&mut m), 2, "one write per dirty page");
    assert_eq!(m.durable_through(), 0);
    // Marks while the batch is in flight wait for the next batch.
    let during = m.mark(1, 0, 512);
    assert!(
        during.persist_needed,
        "its page is being written: not yet durable"
    );
    assert!(during.seq > far.seq);
    disk.complete(&mut m, 1, false);
    assert_eq!(disk.submit_all(&mut m), 0, "flush waits for every write");
    disk.complete(&mut m, 0, false);
    assert_eq!(disk.submit_all(&mut m), 1, "then one flush");
    disk.complete(&mut m, 0, false);
    assert_eq!(m.durable_through(), far.seq);
    assert!(m.durable_through() < during.seq);
    disk.drain(&mut m);
    assert!(m.durable_through() >= during.seq);
    // Marking a durable extent again costs nothing.
    let again = m.mark(1, 0, 4096);
    assert_eq!(
        again,
        Mark {
            seq: 0,
            persist_needed: false
        }
    );
    assert_eq!(disk.submit_all(&mut m), 0);
    let (opened, _) = NodeMetadata::open(&disk.durable, VOLUME, &sizes).unwrap();
    let marked: Vec<_> = opened.iter_marked().collect();
    assert_eq!(
        marked,
        [
            (1, 0, 4096),
            (1, 4096, 4096),
            (1, 8192, 4096),
            (1, BITS_PER_PAGE * 4096 + 4096, 4096)
        ]
    );
}

#[test]
fn a_new_generation_is_durable_in_the_other_header_slot() {
    let sizes = [8 * MIB];
    let mut m = metadata(&sizes, 64 << 10);
    let mut disk = Disk::new(m.image());
    let seq = m.new_generation(0xFEED);
    let ops = disk.submit_all(&mut m);
    assert_eq!(ops, 1, "the header alone");
    assert_eq!(
        disk.inflight[0].2, 0,
        "slot 0: slot 1 keeps the formatted header"
    );
    disk.drain(&mut m);
    assert!(m.durable_through() >= seq);
    let (opened, report) = NodeMetadata::open(&disk.durable, VOLUME, &sizes).unwrap();
    assert_eq!(opened.generations().current, 0xFEED);
    assert!(!report.header_slot_damaged);
    // A torn second update leaves the first one readable.
    let _ = m.new_generation(0xBEEF);
    disk.submit_all(&mut m);
    let (_, _, offset, data) = disk.inflight[0].clone();
    assert_eq!(offset, HEADER_SLOT_BYTES as u64);
    let mut torn = disk.durable.clone();
    let at = offset as usize;
    torn[at..at + SECTOR_SIZE / 2].copy_from_slice(&data[..SECTOR_SIZE / 2]);
    let (opened, report) = NodeMetadata::open(&torn, VOLUME, &sizes).unwrap();
    assert_eq!(opened.generations().current, 0xFEED);
    assert!(report.header_slot_damaged);
}

#[test]
fn a_failed_write_is_retried_and_never_reported_durable() {
    let sizes = [8 * MIB];
    let mut m = metadata(&sizes, 4096);
    let mut disk = Disk::new(m.image());
    let mark = m.mark(1, 0, 4096);
    let generation = m.new_generation(0x77);
    assert_eq!(disk.submit_all(&mut m), 2);
    let header_slot = disk.inflight.iter().find(|op| op.2 < 4096).unwrap().2;
    disk.complete(&mut m, 0, true);
    disk.complete(&mut m, 0, false);
    assert_eq!(m.durable_through(), 0, "no flush after a failure");
    assert_eq!(m.faults().0, 1);
    assert_eq!(disk.submit_all(&mut m), 2, "both written again");
    assert!(
        disk.inflight.iter().any(|op| op.2 == header_slot),
        "the header goes to the same slot again"
    );
    disk.drain(&mut m);
    assert!(m.durable_through() >= mark.seq.max(generation));
    let (opened, _) = NodeMetadata::open(&disk.durable, VOLUME, &sizes).unwrap();
    assert!(opened.is_marked(1, 0));
    assert_eq!(opened.generations().current, 0x77);
}

#[test]
fn clear_unmarks_whole_extents_only() {
    let mut m = metadata(&[MIB], 64 << 10);
    let _ = m.mark(1, 0, 200 << 10); // extents 0..=3
    assert_eq!(m.marked_count(), 4);
    let _ = m.clear(1, 0, 100 << 10); // wholly covers extent 0 only
    assert_eq!(
        m.iter_marked()
            .map(|(_, offset, _)| offset)
            .collect::<Vec<_>>(),
        [64 << 10, 128 << 10, 192 << 10]
    );
    let _ = m.clear(1, 0, MIB);
    assert_eq!(m.marked_count(), 0);
    // The last extent of an odd-sized namespace is shorter and clears too.
    let mut odd = metadata(&[MIB + 4096], 64 << 10);
    let _ = odd.mark(1, MIB / 512, 4096);
    assert_eq!(odd.iter_marked().collect::<Vec<_>>(), [(1, MIB, 4096)]);
    let _ = odd.clear(1, MIB / 512, 4096);
    assert_eq!(odd.marked_count(), 0);
}

#[test]
fn clear_all_unmarks_every_namespace_including_short_last_extents() {
    let mut m = metadata(&[MIB, MIB + 4096], 64 << 10);
    let _ = m.mark(1, 0, 4096);
    let _ = m.mark(2, 100, 4096);
    let _ = m.mark(2, MIB / 512, 4096);
    assert_eq!(m.marked_count(), 3);
    let seq = m.clear_all();
    assert_eq!(m.marked_count(), 0);
    assert_eq!(seq, m.last_seq());
}

#[test]
fn a_damaged_page_is_taken_as_all_changed() {
    let sizes = [8 * MIB];
    let m = metadata(&sizes, 4096);
    let mut image = m.image();
    image[BITMAP_PAGES_OFFSET_BYTES as usize + 50] ^= 1;
    let (opened, report) = NodeMetadata::open(&image, VOLUME, &sizes).unwrap();
    assert_eq!(report.pages_damaged, 1);
    assert_eq!(
        opened.marked_count(),
        8 * MIB / 4096,
        "every extent, none past the end"
    );
    assert!(!opened.is_durable(), "the repaired page is written back");
}

/// The property: whatever the completion order, failures and crash point, every mark and
/// generation change reported durable is found by a reopen.
#[test]
fn after_any_crash_the_durable_bitmap_covers_every_mark_reported_durable() {
    let seeds: u64 = std::env::var("METADATA_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let sizes = [4 * MIB, 2 * MIB + 8192];
    for seed in 1..=seeds {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let extent = 4096 << rng.below(3);
        let mut m = metadata(&sizes, extent);
        let mut disk = Disk::new(m.image());
        // The shadow: every mark with its sequence, and the generation with its sequence.
        let mut marks: Vec<(u64, u32, u64, u64)> = Vec::new();
        let mut generations: Vec<(u64, Generations)> = vec![(0, *m.generations())];
        let mut next_generation = 1u64;
        let steps = 20 + rng.below(200);
        for _ in 0..steps {
            match rng.below(10) {
                0..=4 => {
                    let nsid = 1 + rng.below(2) as u32;
                    let size = sizes[nsid as usize - 1];
                    let length = 512 * (1 + rng.below(64));
                    let lba = rng.below((size - length) / 512 + 1);
                    let mark = m.mark(nsid, lba, length);
                    marks.push((mark.seq, nsid, lba * 512, length));
                }
                5 => {
                    next_generation += 1;
                    let seq = m.new_generation(next_generation);
                    generations.push((seq, *m.generations()));
                }
                6 => {
                    disk.submit_all(&mut m);
                }
                _ => {
                    disk.submit_all(&mut m);
                    if !disk.inflight.is_empty() {
                        let index = rng.below(disk.inflight.len() as u64) as usize;
                        let fail = rng.below(20) == 0;
                        disk.complete(&mut m, index, fail);
                    }
                }
            }
            assert!(m.durable_through() <= m.last_seq());
        }
        let durable = m.durable_through();
        let image = disk.crash_image(&mut rng);
        let (opened, _) = NodeMetadata::open(&image, VOLUME, &sizes)
            .unwrap_or_else(|e| panic!("seed {seed}: reopen failed: {e}"));
        for &(seq, nsid, offset, length) in &marks {
            if seq <= durable {
                let mut at = offset - offset % extent;
                while at < offset + length {
                    assert!(
                        opened.is_marked(nsid, at),
                        "seed {seed}: mark {seq} (durable through {durable}) lost at {nsid}:{at}"
                    );
                    at += extent;
                }
            }
        }
        let newest_durable = generations
            .iter()
            .rfind(|(seq, _)| *seq <= durable)
            .unwrap()
            .1;
        let found = opened.generations().current;
        assert!(
            found >= newest_durable.current,
            "seed {seed}: generation {found} older than durable {}",
            newest_durable.current
        );
        // Nothing is invented: every marked extent was marked by someone.
        for (nsid, offset, _) in opened.iter_marked() {
            assert!(
                marks
                    .iter()
                    .any(|&(_, n, o, l)| n == nsid && o < offset + extent && offset < o + l),
                "seed {seed}: extent {nsid}:{offset} marked without a mark"
            );
        }
    }
}
