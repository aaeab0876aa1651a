use super::*;

const A: u64 = 0xA1;
const B: u64 = 0xB2;
const C: u64 = 0xC3;
const D: u64 = 0xD4;

fn node(node_id: u64, current: u64, history: &[u64]) -> Generations {
    let mut generations = Generations::fresh(node_id);
    generations.current = current;
    generations.history[..history.len()].copy_from_slice(history);
    generations.check();
    generations
}

/// The mirror image every decision must have.
fn mirrored(decision: Decision) -> Decision {
    match decision {
        Decision::PeerBehind { bitmap_usable } => Decision::WeAreBehind { bitmap_usable },
        Decision::WeAreBehind { bitmap_usable } => Decision::PeerBehind { bitmap_usable },
        Decision::SplitBrain {
            ours,
            theirs,
            ancestor,
        } => Decision::SplitBrain {
            ours: theirs,
            theirs: ours,
            ancestor,
        },
        Decision::NoSharedHistory { ours, theirs } => Decision::NoSharedHistory {
            ours: theirs,
            theirs: ours,
        },
        Decision::PeerFresh => Decision::WeAreFresh,
        Decision::WeAreFresh => Decision::PeerFresh,
        other => other,
    }
}

fn check(ours: Generations, theirs: Generations, expected: Decision) {
    assert_eq!(decide(&ours, &theirs), expected, "{ours:?} vs {theirs:?}");
    assert_eq!(decide(&theirs, &ours), mirrored(expected), "mirror");
}

#[test]
fn every_decision_and_its_mirror() {
    check(node(1, 0, &[]), node(2, 0, &[]), Decision::BothFresh);
    check(node(1, A, &[]), node(2, A, &[]), Decision::InSync);
    check(node(1, A, &[B]), node(2, A, &[C]), Decision::InSync);
    check(node(1, A, &[]), node(2, 0, &[]), Decision::PeerFresh);
    check(node(1, 0, &[]), node(2, A, &[]), Decision::WeAreFresh);
    check(
        node(1, B, &[A]),
        node(2, A, &[]),
        Decision::PeerBehind {
            bitmap_usable: false,
        },
    );
    let mut with_bitmap = node(1, A, &[]);
    with_bitmap.new_generation(B);
    assert_eq!(with_bitmap.bitmap_base, A);
    check(
        with_bitmap,
        node(2, A, &[]),
        Decision::PeerBehind {
            bitmap_usable: true,
        },
    );
    check(
        node(1, C, &[B, A]),
        node(2, A, &[]),
        Decision::PeerBehind {
            bitmap_usable: false,
        },
    );
    check(
        node(1, B, &[A]),
        node(2, C, &[A]),
        Decision::SplitBrain {
            ours: B,
            theirs: C,
            ancestor: A,
        },
    );
    // The common generation may lie deeper in one history than the other.
    check(
        node(1, D, &[B, A]),
        node(2, C, &[A]),
        Decision::SplitBrain {
            ours: D,
            theirs: C,
            ancestor: A,
        },
    );
    check(
        node(1, A, &[]),
        node(2, B, &[]),
        Decision::NoSharedHistory { ours: A, theirs: B },
    );
    check(
        node(1, A, &[C]),
        node(2, B, &[D]),
        Decision::NoSharedHistory { ours: A, theirs: B },
    );
    check(node(7, A, &[]), node(7, A, &[]), Decision::SameNode);
    check(node(7, 0, &[]), node(7, B, &[]), Decision::SameNode);
}

#[test]
fn a_history_forgets_its_oldest_generation() {
    let mut generations = node(1, 1, &[]);
    for generation in 2..=7 {
        generations.new_generation(generation);
    }
    assert_eq!(generations.current, 7);
    assert_eq!(generations.history, [6, 5, 4, 3]);
    assert_eq!(
        generations.bitmap_base, 1,
        "the bitmap still counts since 1"
    );
    // Beyond the history nothing links the sides: a full sync, never a silent acceptance.
    assert_eq!(
        decide(&generations, &node(2, 1, &[])),
        Decision::NoSharedHistory { ours: 7, theirs: 1 }
    );
}

#[test]
fn adopting_moves_the_old_current_into_the_history() {
    let mut destination = node(2, A, &[]);
    destination.adopt(B);
    assert_eq!((destination.current, destination.history[0]), (B, A));
    destination.adopt(A);
    assert_eq!(
        (destination.current, destination.history),
        (A, [B, 0, 0, 0]),
        "a generation held before is current again, once"
    );
    let mut fresh = Generations::fresh(3);
    fresh.adopt(C);
    assert_eq!((fresh.current, fresh.history), (C, [0; HISTORY_LEN]));
}

#[test]
fn settle_accepts_refuses_and_names_both_generations() {
    let proposed = 0x1234;
    let fresh = (node(1, 0, &[]), node(2, 0, &[]));
    assert_eq!(
        settle(&fresh.0, &fresh.1, true, proposed),
        Ok(Settlement {
            generation: proposed,
            source_adopts: true,
            destination_adopts: true,
            assumed_identical: true,
            resync: None,
        })
    );
    // The initial sync: neither side holds data, the source takes its proposal and copies
    // everything; the destination takes the generation only once the sync is done.
    assert_eq!(
        settle(&fresh.0, &fresh.1, false, proposed),
        Ok(Settlement {
            generation: proposed,
            source_adopts: true,
            destination_adopts: false,
            assumed_identical: false,
            resync: Some(ResyncKind::Full),
        })
    );
    let replaced = settle(&node(1, A, &[]), &node(2, 0, &[]), false, proposed).unwrap();
    assert_eq!(
        (replaced.generation, replaced.resync),
        (A, Some(ResyncKind::Full))
    );
    let (refusal, text) = settle(&node(1, C, &[]), &node(2, D, &[]), false, proposed).unwrap_err();
    assert_eq!(refusal, Refusal::FullSyncRequired);
    assert!(
        text.contains("would overwrite the destination's data")
            && text.contains("assume_identical = true"),
        "{text}"
    );
    assert_eq!(
        settle(&node(1, A, &[]), &node(2, A, &[B]), false, proposed)
            .unwrap()
            .generation,
        A
    );
    let promoted = node(2, B, &[A]);
    let (refusal, text) = settle(&node(1, A, &[]), &promoted, true, proposed).unwrap_err();
    assert_eq!(refusal, Refusal::StaleSource);
    assert!(
        text.contains("00000000000000a1") && text.contains("00000000000000b2"),
        "{text}"
    );
    let (refusal, text) = settle(&node(1, C, &[A]), &promoted, true, proposed).unwrap_err();
    assert_eq!(refusal, Refusal::SplitBrain);
    assert!(
        text.contains("split brain")
            && text.contains("00000000000000c3")
            && text.contains("00000000000000b2"),
        "{text}"
    );
    // The destination is behind: a resync from the bitmap when it counts changes since the
    // destination's generation, a full one otherwise.
    let behind = settle(&promoted, &node(1, A, &[]), true, proposed).unwrap();
    assert_eq!(
        (behind.generation, behind.resync, behind.destination_adopts),
        (B, Some(ResyncKind::Full), false)
    );
    let mut counting = promoted;
    counting.bitmap_base = A;
    let behind = settle(&counting, &node(1, A, &[]), false, proposed).unwrap();
    assert_eq!(behind.resync, Some(ResyncKind::Bitmap));
    let unrelated = settle(&node(1, C, &[]), &node(2, D, &[]), true, proposed).unwrap();
    assert_eq!(
        (unrelated.generation, unrelated.destination_adopts),
        (C, true)
    );
    assert!(settle(&node(1, C, &[]), &node(2, D, &[]), false, proposed).is_err());
    assert!(
        settle(&node(1, 0, &[]), &node(2, D, &[]), true, proposed)
            .unwrap()
            .source_adopts
    );
    // The source crashed after the destination took its proposal, before it did: completed,
    // even though the destination has consumed its assume_identical.
    let completed = settle(&node(1, 0, &[]), &node(2, proposed, &[]), false, proposed).unwrap();
    assert!(completed.source_adopts && !completed.destination_adopts);
    assert!(settle(&node(1, 0, &[]), &node(2, D, &[]), false, proposed).is_err());
    assert_eq!(
        settle(&node(5, A, &[]), &node(5, A, &[]), true, proposed)
            .unwrap_err()
            .0,
        Refusal::SameNode
    );
}

#[test]
fn the_encoded_form_round_trips_and_rejects_every_bad_field() {
    let mut generations = node(9, C, &[B, A]);
    generations.bitmap_base = A;
    generations.flags = FLAG_ASSUME_IDENTICAL_CONSUMED;
    let mut bytes = [0u8; GENERATIONS_BYTES];
    generations.encode(&mut bytes);
    assert_eq!(Generations::decode(&bytes), Ok(generations));
    let corrupt = |at: usize, value: u64| {
        let mut bad = bytes;
        bad[at..at + 8].copy_from_slice(&value.to_le_bytes());
        Generations::decode(&bad)
    };
    assert_eq!(corrupt(0, 0), Err("zero node id"));
    assert_eq!(corrupt(16, C), Err("current generation in its own history"));
    assert_eq!(corrupt(24, B), Err("a generation twice in the history"));
    assert_eq!(corrupt(16, 0), Err("a gap in the history"));
    let mut bad = bytes;
    bad[56..60].copy_from_slice(&(1u32 << 9).to_le_bytes());
    assert_eq!(Generations::decode(&bad), Err("unknown flags"));
    let mut bad = bytes;
    bad[60] = 1;
    assert_eq!(Generations::decode(&bad), Err("nonzero padding"));
    let mut fresh_with_history = bytes;
    fresh_with_history[8..16].fill(0);
    assert_eq!(
        Generations::decode(&fresh_with_history),
        Err("history or bitmap base without a current generation")
    );
}
