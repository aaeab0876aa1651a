//! Wire codec tests: every message round-trips; every corrupted header field, a flipped body
//! byte and truncation are rejected; the aligned-write overhead budget holds.

use super::*;
use crate::checksum::crc32c;
use crate::geometry::{RING_BYTES_MIN, SECTOR_SIZE};

fn hello() -> Hello {
    let mut sizes = [0; NAMESPACES_MAX];
    sizes[0] = 1 << 30;
    sizes[1] = 8 << 20;
    Hello {
        protocol_version: u32::from(PROTOCOL_VERSION),
        block_size: BLOCK_SIZE as u32,
        sector_size: SECTOR_SIZE as u32,
        mode: CpMode::References,
        volume_id: [9; 16],
        cp_completed: 17,
        geometry: RingGeometry::for_ring_size(RING_BYTES_MIN).unwrap(),
        proposed_generation: 0x77,
        generations: generations(),
        namespace_count: 2,
        namespace_sizes_bytes: sizes,
    }
}

fn generations() -> Generations {
    let mut generations = Generations::fresh(0x1D);
    generations.new_generation(0xA1);
    generations.new_generation(0xB2);
    generations.new_generation(0xC3);
    generations.flags = crate::generation::FLAG_ASSUME_IDENTICAL;
    generations
}

fn control_bytes(control: Control<'_>) -> Vec<u8> {
    let mut bytes = vec![0; control.encoded_bytes()];
    control.encode(&mut bytes);
    bytes
}

fn entry(lba: u64, data: &[u8], data_offset: u32) -> WireEntry {
    WireEntry {
        nsid: 1,
        flags: 0,
        length_bytes: data.len() as u32,
        lba,
        data_offset,
        data_crc: crc32c(data),
    }
}

/// A Transfer of `blocks` aligned 4 KiB writes plus one write-zeroes.
fn transfer_bytes(blocks: usize) -> Vec<u8> {
    let data: Vec<Vec<u8>> = (0..blocks).map(|i| vec![i as u8 + 1; BLOCK_SIZE]).collect();
    let mut entries: Vec<WireEntry> = data
        .iter()
        .enumerate()
        .map(|(i, d)| entry(i as u64 * 8, d, (i * BLOCK_SIZE) as u32))
        .collect();
    entries.push(WireEntry {
        flags: ENTRY_FLAG_ZEROES,
        data_crc: crc32c(&[]),
        ..entry(800, &[0; 8192], 0)
    });
    let header = TransferHeader {
        transfer_id: TransferId(5),
        cp_number: 2,
        first_seq: 40,
        entry_count: entries.len() as u32,
    };
    let mut bytes = vec![0; transfer_prefix_bytes(entries.len())];
    encode_transfer_prefix(&mut bytes, &header, &entries, blocks * BLOCK_SIZE);
    for d in &data {
        bytes.extend_from_slice(d);
    }
    bytes
}

fn table_entries() -> Vec<DescriptorEntry> {
    vec![
        DescriptorEntry {
            nsid: 1,
            block_index: 7,
            descriptor: Descriptor::Reference {
                transfer_id: TransferId(5),
                block_number: 3,
            },
        },
        DescriptorEntry {
            nsid: 2,
            block_index: 1 << 40,
            descriptor: Descriptor::Data,
        },
        DescriptorEntry {
            nsid: 1,
            block_index: 9,
            descriptor: Descriptor::Zeroes,
        },
        DescriptorEntry {
            nsid: 1,
            block_index: 10,
            descriptor: Descriptor::Data,
        },
    ]
}

fn table_message(entries: &[DescriptorEntry]) -> Vec<u8> {
    let mut bytes = vec![0; table_bytes(entries.iter().map(|e| e.descriptor))];
    let mut at = encode_table_prefix(&mut bytes, 4, entries);
    let data_count = entries
        .iter()
        .filter(|e| e.descriptor == Descriptor::Data)
        .count();
    for fill in (0xB0..).take(data_count) {
        bytes[at..at + BLOCK_SIZE].fill(fill);
        at += BLOCK_SIZE;
    }
    assert_eq!(at, bytes.len());
    seal_message(&mut bytes);
    bytes
}

/// (byte offset, bits flipped, the error expected).
type Corruption = (usize, u8, fn(&WireError) -> bool);

fn all_messages() -> Vec<Vec<u8>> {
    let h = hello();
    vec![
        control_bytes(Control::Hello(&h)),
        control_bytes(Control::HelloAck {
            cp_completed: 17,
            generations: generations(),
        }),
        control_bytes(Control::Reject {
            reason: RejectReason::StaleSource,
            text: "stale source: source generation 00000000000000a1 is older",
        }),
        transfer_bytes(3),
        control_bytes(Control::TransferAck {
            transfer_id: TransferId(99),
        }),
        table_message(&table_entries()),
        control_bytes(Control::CpCommit {
            cp_number: 4,
            descriptor_count: 4,
        }),
        control_bytes(Control::CpAck { cp_number: 4 }),
        control_bytes(Control::TableAck {
            cp_number: 4,
            tables: 2,
        }),
        control_bytes(Control::CpFailed { cp_number: 4 }),
        control_bytes(Control::Heartbeat {
            peer_timeout_us: 3_000_000,
        }),
    ]
}

#[test]
fn control_messages_round_trip() {
    let h = hello();
    assert_eq!(
        decode(&control_bytes(Control::Hello(&h))),
        Ok(Message::Hello(h))
    );
    assert_eq!(
        decode(&control_bytes(Control::HelloAck {
            cp_completed: 1,
            generations: generations(),
        })),
        Ok(Message::HelloAck {
            cp_completed: 1,
            generations: generations(),
        })
    );
    assert_eq!(
        decode(&control_bytes(Control::Reject {
            reason: RejectReason::Volume,
            text: "volume ∆"
        })),
        Ok(Message::Reject {
            reason: RejectReason::Volume,
            text: "volume ∆"
        })
    );
    assert_eq!(
        decode(&control_bytes(Control::TransferAck {
            transfer_id: TransferId(7)
        })),
        Ok(Message::TransferAck {
            transfer_id: TransferId(7)
        })
    );
    assert_eq!(
        decode(&control_bytes(Control::CpCommit {
            cp_number: 3,
            descriptor_count: 9
        })),
        Ok(Message::CpCommit {
            cp_number: 3,
            descriptor_count: 9
        })
    );
    assert_eq!(
        decode(&control_bytes(Control::CpAck { cp_number: 3 })),
        Ok(Message::CpAck { cp_number: 3 })
    );
    let heartbeat = control_bytes(Control::Heartbeat {
        peer_timeout_us: 1_500_000,
    });
    assert_eq!(heartbeat.len(), MESSAGE_HEADER_BYTES + 8);
    assert_eq!(heartbeat[5], MessageKind::Heartbeat as u8);
    assert_eq!(
        decode(&heartbeat),
        Ok(Message::Heartbeat {
            peer_timeout_us: 1_500_000
        })
    );
}

#[test]
fn heartbeat_fields_are_checked() {
    let heartbeat = control_bytes(Control::Heartbeat {
        peer_timeout_us: 3_000_000,
    });
    // Each byte of the timeout is covered by the crc.
    for at in MESSAGE_HEADER_BYTES..heartbeat.len() {
        let mut bad = heartbeat.clone();
        bad[at] ^= 0x10;
        assert!(
            matches!(decode(&bad), Err(WireError::Crc { .. })),
            "byte {at} flipped"
        );
    }
    // A zero timeout is refused even with a good crc.
    let mut zero = heartbeat.clone();
    zero[MESSAGE_HEADER_BYTES..].fill(0);
    seal_message(&mut zero);
    assert_eq!(
        decode(&zero),
        Err(WireError::BadBody {
            kind: MessageKind::Heartbeat,
            reason: "zero peer timeout"
        })
    );
    // A body of the wrong length is refused even with a good crc.
    let mut longer = heartbeat.clone();
    longer.extend_from_slice(&[0; 8]);
    let length = longer.len() as u32;
    longer[8..12].copy_from_slice(&length.to_le_bytes());
    seal_message(&mut longer);
    assert!(matches!(
        decode(&longer),
        Err(WireError::BadBody {
            kind: MessageKind::Heartbeat,
            ..
        })
    ));
    // A version-2 peer's bytes are not framed.
    let mut old = heartbeat;
    old[4] = 2;
    assert_eq!(frame_length(&old), Err(WireError::BadVersion(2)));
}

#[test]
fn transfer_round_trip() {
    let bytes = transfer_bytes(3);
    assert_eq!(frame_length(&bytes), Ok(Some(bytes.len())));
    let Ok(Message::Transfer(transfer)) = decode(&bytes) else {
        panic!("not a transfer")
    };
    assert_eq!(
        transfer.header,
        TransferHeader {
            transfer_id: TransferId(5),
            cp_number: 2,
            first_seq: 40,
            entry_count: 4
        }
    );
    let entries: Vec<_> = transfer.entries().collect();
    assert_eq!(entries.len(), 4);
    for (i, (entry, data)) in entries[..3].iter().enumerate() {
        assert_eq!(entry.lba, i as u64 * 8);
        assert_eq!(*data, &[i as u8 + 1; BLOCK_SIZE][..]);
        assert_eq!(crc32c(data), entry.data_crc);
    }
    assert!(entries[3].0.is_zeroes() && entries[3].1.is_empty());
    assert_eq!(entries[3].0.length_bytes, 8192);
}

#[test]
fn transfer_data_is_not_covered_by_the_message_crc() {
    let mut bytes = transfer_bytes(2);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let Ok(Message::Transfer(transfer)) = decode(&bytes) else {
        panic!("prefix still valid")
    };
    let (entry, data) = transfer.entries().nth(1).unwrap();
    assert_ne!(
        crc32c(data),
        entry.data_crc,
        "the entry's data_crc catches it"
    );
}

#[test]
fn descriptor_table_round_trip() {
    let entries = table_entries();
    let bytes = table_message(&entries);
    let Ok(Message::DescriptorTable(table)) = decode(&bytes) else {
        panic!("not a table")
    };
    assert_eq!((table.cp_number, table.count), (4, 4));
    let decoded: Vec<_> = table.descriptors().collect();
    assert_eq!(decoded.iter().map(|(e, _)| *e).collect::<Vec<_>>(), entries);
    assert_eq!(decoded[1].1, Some(&[0xB0; BLOCK_SIZE][..]));
    assert_eq!(decoded[3].1, Some(&[0xB1; BLOCK_SIZE][..]));
    assert_eq!(decoded[0].1, None);
}

#[test]
fn every_corrupted_header_field_is_rejected() {
    for message in all_messages() {
        let kind = message[5];
        let corruptions: [Corruption; 6] = [
            (0, 0x01, |e| *e == WireError::BadMagic),
            (4, 0x02, |e| matches!(e, WireError::BadVersion(_))),
            (5, 0x40, |e| matches!(e, WireError::UnknownKind(_))),
            (6, 0x01, |e| matches!(e, WireError::BadFlags(_))),
            (8, 0x01, |e| {
                matches!(e, WireError::BadLength(_) | WireError::Truncated { .. })
            }),
            (12, 0x01, |e| matches!(e, WireError::Crc { .. })),
        ];
        for (at, flip, expected) in corruptions {
            let mut bad = message.clone();
            bad[at] ^= flip;
            let error = decode(&bad).expect_err("corruption accepted");
            assert!(expected(&error), "kind {kind}, byte {at}: {error:?}");
        }
        // A different valid kind changes the crc.
        let mut other = message.clone();
        other[5] = if kind == 11 { 10 } else { kind + 1 };
        assert!(
            matches!(decode(&other), Err(WireError::Crc { .. })),
            "kind {kind}"
        );
        // Any flipped byte of the crc-covered part is caught.
        let mut flipped = message.clone();
        flipped[MESSAGE_HEADER_BYTES + 1] ^= 0x80;
        assert!(decode(&flipped).is_err(), "kind {kind} body flip accepted");
    }
}

#[test]
fn truncated_and_oversized_input_is_rejected() {
    for message in all_messages() {
        for cut in [0, 1, 15, 16, message.len() / 2, message.len() - 1] {
            assert!(decode(&message[..cut]).is_err(), "cut at {cut} accepted");
        }
        assert_eq!(frame_length(&message[..15]), Ok(None));
        assert_eq!(frame_length(&message[..16]), Ok(Some(message.len())));
        let mut longer = message.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
    }
    let mut huge = control_bytes(Control::CpAck { cp_number: 1 });
    huge[8..12].copy_from_slice(&((MESSAGE_BYTES_MAX + 1) as u32).to_le_bytes());
    assert_eq!(
        frame_length(&huge),
        Err(WireError::BadLength(MESSAGE_BYTES_MAX as u32 + 1))
    );
}

#[test]
fn bodies_are_validated_even_with_a_good_crc() {
    // A table whose count claims more descriptors than it has.
    let mut bytes = table_message(&table_entries());
    bytes[MESSAGE_HEADER_BYTES + 8] = 5;
    seal_message(&mut bytes);
    assert!(matches!(decode(&bytes), Err(WireError::BadBody { .. })));
    // An unknown descriptor kind.
    let mut bytes = table_message(&table_entries());
    bytes[MESSAGE_HEADER_BYTES + TABLE_HEADER_BYTES] = 9;
    seal_message(&mut bytes);
    assert!(matches!(decode(&bytes), Err(WireError::BadBody { .. })));
    // A Reject whose text is not UTF-8.
    let mut bytes = control_bytes(Control::Reject {
        reason: RejectReason::Version,
        text: "ab",
    });
    bytes[MESSAGE_HEADER_BYTES + 4] = 0xFF;
    seal_message(&mut bytes);
    assert!(matches!(decode(&bytes), Err(WireError::BadBody { .. })));
    // A Hello with 17 namespaces.
    let h = hello();
    let mut bytes = control_bytes(Control::Hello(&h));
    bytes[MESSAGE_HEADER_BYTES + 13] = 17;
    seal_message(&mut bytes);
    assert!(matches!(decode(&bytes), Err(WireError::BadBody { .. })));
}

/// Each generation field of Hello and HelloAck, corrupted with a good crc, is refused.
#[test]
fn corrupted_generation_fields_are_refused() {
    let h = hello();
    let hello_bytes = control_bytes(Control::Hello(&h));
    let ack_bytes = control_bytes(Control::HelloAck {
        cp_completed: 3,
        generations: generations(),
    });
    let generations_at = MESSAGE_HEADER_BYTES + HELLO_GENERATIONS_OFFSET;
    let ack_generations_at = MESSAGE_HEADER_BYTES + 8;
    // (offset inside the generations, bytes written, the reason expected)
    let cases: [(usize, &[u8], &str); 7] = [
        (0, &[0; 8], "zero node id"),
        (
            8,
            &[0; 8],
            "history or bitmap base without a current generation",
        ),
        (
            16,
            &0xC3u64.to_le_bytes(),
            "current generation in its own history",
        ),
        (
            24,
            &0xB2u64.to_le_bytes(),
            "a generation twice in the history",
        ),
        (16, &[0; 8], "a gap in the history"),
        (56, &[0, 0, 0, 0x80], "unknown flags"),
        (60, &[1], "nonzero padding"),
    ];
    for base in [generations_at, ack_generations_at] {
        let original = if base == generations_at {
            &hello_bytes
        } else {
            &ack_bytes
        };
        for (at, value, reason) in cases {
            let mut bytes = original.clone();
            bytes[base + at..base + at + value.len()].copy_from_slice(value);
            seal_message(&mut bytes);
            let kind = decode_kind(&bytes);
            assert_eq!(
                decode(&bytes),
                Err(WireError::BadBody { kind, reason }),
                "field at {at} of {kind:?}"
            );
        }
    }
    let mut bytes = hello_bytes.clone();
    bytes[MESSAGE_HEADER_BYTES + 56..MESSAGE_HEADER_BYTES + 64].fill(0);
    seal_message(&mut bytes);
    assert_eq!(
        decode(&bytes),
        Err(WireError::BadBody {
            kind: MessageKind::Hello,
            reason: "zero proposed generation"
        })
    );
    // A HelloAck of the old (epoch) length is refused.
    let mut short = ack_bytes[..MESSAGE_HEADER_BYTES + 16].to_vec();
    let length = short.len() as u32;
    short[8..12].copy_from_slice(&length.to_le_bytes());
    seal_message(&mut short);
    assert!(matches!(decode(&short), Err(WireError::BadBody { .. })));
}

fn decode_kind(bytes: &[u8]) -> MessageKind {
    MessageKind::from_repr(bytes[5]).unwrap()
}

/// The aligned-writes budget: a transfer of 8 aligned 4 KiB writes, a DescriptorTable of one
/// Reference per block (with its whole header) and the TransferAck, over the host bytes.
#[test]
fn aligned_write_overhead_is_under_two_percent() {
    const WRITES: usize = 8;
    let data = vec![0x5A; BLOCK_SIZE];
    let entries: Vec<WireEntry> = (0..WRITES)
        .map(|i| entry(i as u64 * 8, &data, (i * BLOCK_SIZE) as u32))
        .collect();
    let header = TransferHeader {
        transfer_id: TransferId(1),
        cp_number: 1,
        first_seq: 1,
        entry_count: WRITES as u32,
    };
    let mut prefix = vec![0; transfer_prefix_bytes(WRITES)];
    encode_transfer_prefix(&mut prefix, &header, &entries, WRITES * BLOCK_SIZE);
    let transfer_bytes = prefix.len() + WRITES * BLOCK_SIZE;
    let references: Vec<DescriptorEntry> = (0..WRITES)
        .map(|i| DescriptorEntry {
            nsid: 1,
            block_index: i as u64,
            descriptor: Descriptor::Reference {
                transfer_id: TransferId(1),
                block_number: i as u32,
            },
        })
        .collect();
    let reference_bytes = table_message(&references).len();
    let ack_bytes = control_bytes(Control::TransferAck {
        transfer_id: TransferId(1),
    })
    .len();
    let host_bytes = WRITES * BLOCK_SIZE;
    let overhead =
        (transfer_bytes - host_bytes + reference_bytes + ack_bytes) as f64 / host_bytes as f64;
    assert!(overhead < 0.02, "overhead {:.3}% >= 2%", overhead * 100.0);
    assert_eq!(
        reference_bytes,
        MESSAGE_HEADER_BYTES + TABLE_HEADER_BYTES + WRITES * REFERENCE_DESCRIPTOR_BYTES
    );
}
