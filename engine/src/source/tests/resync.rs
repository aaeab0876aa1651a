//! Degrade and resync on virtual time: writes complete without the destination once their
//! extents are durably marked, CPs complete on the primary alone, and a returning destination
//! is resynced (references first, then data read from the primary) until the mirror equals the
//! primary and both sides hold one generation; a fresh pair gets the initial sync.

use super::*;
use crate::generation::FLAG_RESYNC_TARGET;

fn degrade_pair() -> Pair {
    pair_with(SourceConfig {
        peer_loss_policy: PeerLossPolicy::Degrade,
        ..config(CpMode::References)
    })
}

/// Everything the source queued, as bytes (sent or lost by the caller).
fn source_bytes(p: &mut Pair) -> Vec<u8> {
    p.source
        .out
        .drain_to_vec(p.source.ring.bytes(0, RING_BYTES_MIN as usize))
}

fn events_of(p: &mut Pair) -> Vec<SourceEvent> {
    std::iter::from_fn(|| p.source.poll_event()).collect()
}

/// The link goes down with whatever the source had queued lost, and stays down past the peer
/// timeout: the source declares the destination lost and (degrade) goes on alone.
fn lose_destination(p: &mut Pair) {
    p.source.handle_tick(p.now_us);
    let _ = source_bytes(p);
    p.source.handle_disconnected(p.now_us);
    p.destination.handle_disconnected(p.now_us);
    p.now_us += 2 * PEER_TIMEOUT_US;
    p.source.handle_tick(p.now_us);
    assert!(p.source.peer_state().is_lost());
}

/// Ticks and device passes while the link is down; returns the source's events.
fn run_alone(p: &mut Pair) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    for _ in 0..50 {
        p.source.handle_tick(p.now_us);
        let busy = p.devices();
        p.source.handle_tick(p.now_us);
        events.extend(events_of(p));
        // Nothing reaches the destination while it is lost.
        let _ = source_bytes(p);
        if !busy {
            break;
        }
    }
    events
}

/// One lockstep round: a tick, the source's bytes to the destination, and the destination's
/// answers back, except those `lost` says never arrived.
fn lockstep(p: &mut Pair, lost: impl Fn(&wire::Message<'_>) -> bool) {
    p.source.handle_tick(p.now_us);
    p.devices();
    let bytes = source_bytes(p);
    for message in split(&bytes) {
        p.destination.handle_message(p.now_us, message).unwrap();
    }
    p.devices();
    let back = drain_destination(&mut p.destination);
    for message in split(&back) {
        if !lost(&wire::decode(message).unwrap()) {
            p.source.handle_message(p.now_us, message).unwrap();
        }
    }
}

fn completed(events: &[SourceEvent], id: WriteId) -> bool {
    events.contains(&SourceEvent::WriteCompleted(id))
}

fn reconnect(p: &mut Pair) -> Vec<SourceEvent> {
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    let mut events = Vec::new();
    for _ in 0..20 {
        events.extend(p.exchange());
        if p.source.resync_progress().is_none() {
            break;
        }
    }
    events
}

fn assert_mirror_is_primary(p: &Pair) {
    let (primary, mirror) = (p.primaries[0].bytes(), p.mirrors[0].bytes());
    if let Some(at) = (0..primary.len()).find(|&i| primary[i] != mirror[i]) {
        panic!("the mirror differs from the primary first at byte {at}");
    }
}

#[test]
fn degraded_writes_complete_once_marked_and_cps_complete_on_the_primary_alone() {
    let mut p = degrade_pair();
    p.connect();
    let replicated = p.write(0, &[1; 4096]);
    assert!(completed(&p.exchange(), replicated));
    let generation_before = p.source.metadata.generations().current;
    lose_destination(&mut p);
    assert!(p.source.is_degraded());
    let alone = p.write(64, &[2; 4096]);
    let events = run_alone(&mut p);
    assert!(completed(&events, alone), "{events:?}");
    let generations = *p.source.metadata.generations();
    assert_ne!(generations.current, generation_before, "a new generation");
    assert_eq!(
        generations.bitmap_base, generation_before,
        "the bitmap counts changes since the destination's generation"
    );
    // Durably: the metadata on its device says so.
    let reopened = reopen_metadata(&p.source_metadata);
    assert_eq!(reopened.generations().current, generations.current);
    assert!(
        reopened.is_marked(1, 64 * 512),
        "the degraded write's extent"
    );
    assert!(
        reopened.is_marked(1, 0),
        "the ring's entries when the peer was lost"
    );
    // A CP completes without the destination and releases its half.
    p.source.request_cp(p.now_us);
    let events = run_alone(&mut p);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SourceEvent::CpCompleted { .. })),
        "{events:?}"
    );
    assert_eq!(p.source.counters().degrade_count, 1);
    assert!(p.source.counters().degraded_write_count >= 1);
    assert_eq!(
        &p.primaries[0].bytes()[64 * 512..64 * 512 + 4096],
        &[2; 4096]
    );
}

/// Found on real processes (`tests/degrade.rs`, a SIGSTOPped destination): its kernel accepts
/// every redial, so the source sat in HelloSent for a peer timeout per dial and its degraded
/// CPs, which may not complete under a Hello that named the last completed CP, filled the ring.
#[test]
fn a_degraded_cp_abandons_an_unanswered_hello_after_a_grace_that_doubles_per_abandon() {
    let mut p = degrade_pair();
    p.connect();
    lose_destination(&mut p);
    run_alone(&mut p);
    let cp_completed = |events: &[SourceEvent]| {
        events
            .iter()
            .any(|e| matches!(e, SourceEvent::CpCompleted { .. }))
    };
    let mut grace_us = DEGRADED_HELLO_GRACE_US_MIN;
    for round in 0..3 {
        // A redial the frozen destination's kernel accepts: the Hello goes out, nothing answers.
        p.source.handle_connected(p.now_us);
        p.source.handle_tick(p.now_us);
        let hello = source_bytes(&mut p);
        assert!(
            matches!(wire::decode(split(&hello)[0]), Ok(wire::Message::Hello(_))),
            "round {round}"
        );
        let held = p.write(1024 + round * 8, &[9; 4096]);
        p.source.request_cp(p.now_us);
        // Within the grace the CP waits (the Hello named the last completed CP).
        p.now_us += grace_us - 1;
        let events = run_alone(&mut p);
        assert!(!cp_completed(&events), "round {round}: {events:?}");
        // The write itself completed once marked; its half is what waits (a full ring then).
        assert!(completed(&events, held), "round {round}: {events:?}");
        assert_eq!(p.source.poll_link_close(), None, "round {round}");
        assert_eq!(
            p.source.next_deadline_us().map(|at| at <= p.now_us + 1),
            Some(true)
        );
        // Once it ends, the handshake is abandoned: the connection closes, the CP completes.
        p.now_us += 1;
        p.source.handle_tick(p.now_us);
        assert_eq!(
            p.source.poll_link_close(),
            Some(PeerLostReason::HelloUnanswered {
                waited_us: grace_us
            }),
            "round {round}"
        );
        assert_eq!(p.source.counters().hello_abandoned_count, round + 1);
        p.source.handle_disconnected(p.now_us);
        let events = [run_alone(&mut p), run_alone(&mut p)].concat();
        assert!(cp_completed(&events), "round {round}: {events:?}");
        grace_us *= 2;
    }
    // The destination thaws: the handshake succeeds, the resync makes the mirror the primary,
    // and the grace is back at its least for the next loss.
    let _ = reconnect(&mut p);
    assert!(!p.source.is_degraded());
    assert_eq!(p.source.resync_progress(), None);
    p.source.request_cp(p.now_us);
    for _ in 0..10 {
        p.exchange();
    }
    assert_mirror_is_primary(&p);
    assert_eq!(p.source.hello_grace_us, DEGRADED_HELLO_GRACE_US_MIN);
}

#[test]
fn a_degraded_cp_waits_for_the_marks_of_its_writes_before_it_completes() {
    // Found on real processes: a CP frozen and flushed before its writes' marks were durable
    // completed alone and released their entries; those writes then never completed.
    let mut p = degrade_pair();
    p.connect();
    lose_destination(&mut p);
    // The new generation is durable; from now on only the marks of new writes are pending.
    run_alone(&mut p);
    let held = p.write(512, &[7; 4096]);
    p.source.request_cp(p.now_us);
    let mut events = Vec::new();
    let mut metadata_ops = 0;
    for _ in 0..20 {
        p.source.handle_tick(p.now_us);
        // The primary completes everything; the metadata device holds every op.
        while let Some(op) = p.source.poll_device_op(p.now_us) {
            p.primaries[op.nsid as usize - 1].submit(op);
        }
        let source = &mut p.source;
        let now = p.now_us;
        p.primaries[0].poll_completions(&mut |c| source.handle_device_completion(now, c));
        while let Some(op) = p.source.poll_metadata_op() {
            p.source_metadata.submit(op);
            metadata_ops += 1;
        }
        events.extend(events_of(&mut p));
    }
    assert!(metadata_ops > 0, "the write's mark is being written");
    assert!(
        !completed(&events, held),
        "completed before its mark: {events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, SourceEvent::CpCompleted { .. })),
        "the CP completed before its write did: {events:?}"
    );
    // The mark lands (the harness's device passes finish the batch in two runs): the write
    // completes, then the CP.
    let events = [run_alone(&mut p), run_alone(&mut p), run_alone(&mut p)].concat();
    let write_at = events
        .iter()
        .position(|e| *e == SourceEvent::WriteCompleted(held));
    let cp_at = events
        .iter()
        .position(|e| matches!(e, SourceEvent::CpCompleted { .. }));
    assert!(
        matches!((write_at, cp_at), (Some(w), Some(c)) if w < c),
        "{events:?}"
    );
    assert_eq!(
        &p.primaries[0].bytes()[512 * 512..512 * 512 + 4096],
        &[7; 4096]
    );
}

#[test]
fn a_returning_destination_is_resynced_with_references_and_data_until_the_mirror_is_the_primary() {
    let mut p = degrade_pair();
    p.connect();
    // Blocks the destination acknowledged (references later) and one changed after the loss.
    for block in 0..8u64 {
        p.write(block * 8, &[10 + block as u8; 4096]);
    }
    assert!(p
        .exchange()
        .iter()
        .any(|e| matches!(e, SourceEvent::WriteCompleted(_))));
    lose_destination(&mut p);
    let changed = p.write(3 * 8, &[0xCC; 4096]);
    let far = p.write(200 * 8, &[0xDD; 4096]);
    let events = run_alone(&mut p);
    assert!(completed(&events, changed) && completed(&events, far));
    p.source.request_cp(p.now_us);
    run_alone(&mut p);

    let events = reconnect(&mut p);
    assert!(events.contains(&SourceEvent::LinkReady), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SourceEvent::ResyncDone { .. })),
        "{events:?}"
    );
    // Every block the destination still held unchanged went as a reference (7 of the 8), the
    // rest of the marked extents as data.
    let counters = *p.source.counters();
    assert_eq!(counters.resync_reference_blocks, 7, "{counters:?}");
    assert!(counters.resync_data_blocks > 0);
    assert_eq!(
        counters.resync_bytes_done, counters.resync_bytes_total,
        "every marked extent"
    );
    // The marked extents only: 64 KiB extents around blocks 0..8 and block 200.
    assert_eq!(counters.resync_bytes_total, 2 * 64 * 1024);
    // The mirror follows through CPs from here on: one more makes every write of the ring reach it.
    let after = p.write(5 * 8, &[0xEE; 4096]);
    assert!(completed(&p.exchange(), after), "synchronous again");
    p.cp();
    p.cp();
    assert_mirror_is_primary(&p);
    let (source, destination) = (
        *p.source.metadata.generations(),
        *p.destination.metadata().generations(),
    );
    assert_eq!(source.current, destination.current, "one generation");
    assert_eq!(source.bitmap_base, 0, "the bitmap counts nothing");
    assert_eq!(destination.flags & FLAG_RESYNC_TARGET, 0);
    assert_eq!(p.source.metadata.marked_count(), 0);
    assert!(!p.source.is_degraded());
}

#[test]
fn a_destination_that_lost_its_log_takes_every_marked_block_as_data() {
    let mut p = degrade_pair();
    p.connect();
    for block in 0..4u64 {
        p.write(block * 8, &[20 + block as u8; 4096]);
    }
    p.exchange();
    lose_destination(&mut p);
    p.write(100 * 8, &[0x77; 4096]);
    run_alone(&mut p);
    p.source.request_cp(p.now_us);
    run_alone(&mut p);
    // The destination restarts without its ring (a reboot with a hugetlbfs ring): same
    // metadata, empty log.
    p.destination = Destination::open(
        destination_config(),
        vec![0; RING_BYTES_MIN as usize],
        &[NAMESPACE_BYTES as u64],
        reopen_metadata(&p.destination_metadata),
    )
    .unwrap();
    let events = reconnect(&mut p);
    assert!(events
        .iter()
        .any(|e| matches!(e, SourceEvent::ResyncDone { .. })));
    assert_eq!(p.source.counters().resync_reference_blocks, 4, "offered");
    p.cp();
    p.cp();
    assert_mirror_is_primary(&p);
}

#[test]
fn host_writes_during_a_resync_are_never_overwritten_by_older_resync_data() {
    let mut p = pair_with(SourceConfig {
        peer_loss_policy: PeerLossPolicy::Degrade,
        // Slow: the resync sends about a table per tick of 10 ms.
        resync_rate_bytes_per_s: 1 << 20,
        ..config(CpMode::References)
    });
    p.connect();
    lose_destination(&mut p);
    for block in 0..64u64 {
        p.write(block * 32, &[block as u8; 4096]);
    }
    run_alone(&mut p);
    p.source.request_cp(p.now_us);
    run_alone(&mut p);
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    p.exchange();
    assert!(
        p.source.resync_progress().is_some(),
        "the rate limit keeps it going"
    );
    let mut rounds = 0;
    while p.source.resync_progress().is_some() {
        // Each round a host write to a block the resync has or has not reached yet.
        let block = (rounds * 7) % 64;
        let id = p.write(block * 32, &[0x80 + rounds as u8; 4096]);
        if rounds % 3 == 0 {
            p.source.request_cp(p.now_us);
        }
        assert!(
            completed(&p.exchange(), id),
            "synchronous during the resync"
        );
        p.now_us += 10_000;
        rounds += 1;
        assert!(rounds < 10_000, "the resync ends");
    }
    assert!(rounds > 3, "writes ran during the resync ({rounds} rounds)");
    p.cp();
    p.cp();
    assert_mirror_is_primary(&p);
}

#[test]
fn a_fresh_pair_without_assume_identical_gets_the_initial_full_sync() {
    let mut p = pair(CpMode::References);
    p.source.config.assume_identical = false;
    p.destination.assume_identical = false;
    // Data on the primary from before replication (never written through the engine).
    for (i, byte) in p.primaries[0]
        .inner
        .as_mut()
        .unwrap()
        .bytes
        .iter_mut()
        .enumerate()
    {
        *byte = (i / 4096) as u8 ^ 0x5A;
    }
    p.destination.handle_connected(0);
    p.source.handle_connected(0);
    let events = reconnect(&mut p);
    assert!(events
        .iter()
        .any(|e| matches!(e, SourceEvent::ResyncDone { .. })));
    assert_eq!(
        p.source.counters().resync_bytes_done,
        NAMESPACE_BYTES as u64,
        "everything"
    );
    assert_mirror_is_primary(&p);
    assert_eq!(
        p.source.metadata.generations().current,
        p.destination.metadata().generations().current
    );
}

#[test]
fn a_half_resynced_destination_is_not_promoted() {
    let mut p = degrade_pair();
    p.connect();
    lose_destination(&mut p);
    for block in 0..256u64 {
        p.write(block * 8, &[block as u8; 4096]);
        if block % 64 == 63 {
            p.source.request_cp(p.now_us);
            run_alone(&mut p);
        }
    }
    run_alone(&mut p);
    // The destination sees the resync begin, then the link drops before it ends.
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    for _ in 0..3 {
        lockstep(&mut p, |_| false);
    }
    assert!(p.source.resync_progress().is_some(), "still resyncing");
    p.destination.handle_disconnected(p.now_us);
    p.devices();
    assert_ne!(
        p.destination.metadata().generations().flags & FLAG_RESYNC_TARGET,
        0
    );
    let refused = p.destination.promote(PROMOTED_GENERATION).err().unwrap();
    assert!(refused.to_string().contains("not promoted"), "{refused}");
}

/// Found by the simulation (seed 201): a resync that ended with its data reads still in flight
/// (the link dropped) was replaced by a new one whose tables started again at generation 0, so
/// the old reads counted towards the new table and filled its blocks: a table went out with
/// blocks its own reads had not filled (zeroes in the simulation), or, as here, never went out
/// (more reads counted than it has).
#[test]
fn reads_of_an_earlier_resync_never_fill_a_later_table() {
    let mut p = degrade_pair();
    p.connect();
    lose_destination(&mut p);
    for block in 0..16u64 {
        p.write(block * 8, &[0x60 + block as u8; 4096]);
    }
    run_alone(&mut p);
    p.source.request_cp(p.now_us);
    run_alone(&mut p);
    // The first table's reads stall on the primary; the link drops and comes back meanwhile.
    p.primaries[0].stalled = true;
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    p.exchange();
    assert!(p.source.resync_progress().is_some());
    p.source.handle_disconnected(p.now_us);
    p.destination.handle_disconnected(p.now_us);
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    p.exchange();
    p.primaries[0].stalled = false;
    let mut done = false;
    for _ in 0..20 {
        done |= p
            .exchange()
            .iter()
            .any(|e| matches!(e, SourceEvent::ResyncDone { .. }));
        if done {
            break;
        }
    }
    assert!(done, "the resync ends");
    p.cp();
    p.cp();
    assert_mirror_is_primary(&p);
}

/// Found by the simulation (seed 233): a degraded source completed a frozen CP on the primary
/// alone after its Hello had told the destination its last completed CP, so the HelloAck (the
/// destination adopting the Hello's CP) no longer matched: a protocol error, and the resync
/// could not start while CPs kept completing between Hello and HelloAck.
#[test]
fn no_cp_completes_on_the_primary_alone_during_a_handshake() {
    let mut p = degrade_pair();
    p.connect();
    lose_destination(&mut p);
    p.write(0, &[0x41; 4096]);
    run_alone(&mut p);
    // The CP freezes; its primary flush stalls until the Hello went out.
    p.primaries[0].stalled = true;
    p.source.request_cp(p.now_us);
    p.source.handle_tick(p.now_us);
    p.devices();
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    let hello = source_bytes(&mut p);
    for message in split(&hello) {
        p.destination.handle_message(p.now_us, message).unwrap();
    }
    p.devices();
    let hello_ack = drain_destination(&mut p.destination);
    // The flush completes before the HelloAck arrives.
    p.primaries[0].stalled = false;
    for _ in 0..5 {
        p.source.handle_tick(p.now_us);
        p.devices();
    }
    let early: Vec<SourceEvent> = events_of(&mut p);
    assert!(
        !early
            .iter()
            .any(|e| matches!(e, SourceEvent::CpCompleted { .. })),
        "{early:?}"
    );
    for message in split(&hello_ack) {
        p.source.handle_message(p.now_us, message).unwrap();
    }
    let mut done = false;
    for _ in 0..20 {
        done |= p
            .exchange()
            .iter()
            .any(|e| matches!(e, SourceEvent::ResyncDone { .. }));
        if done {
            break;
        }
    }
    assert!(done, "the resync ends");
    p.cp();
    assert_mirror_is_primary(&p);
}

/// Found by the simulation (seeds 447, 567, ...): ResyncDone went out as soon as the last
/// marked extent was acknowledged, while the entries whose data the resync had read from the
/// primary were still in CPs not yet completed: the destination, no resync target any more,
/// held blocks newer than the CPs it had applied (no point-in-time image), and could lack a
/// degraded write still on its way in a transfer.
#[test]
fn resync_done_waits_for_the_cps_of_every_entry_the_resync_read() {
    let mut p = degrade_pair();
    p.connect();
    lose_destination(&mut p);
    // A degraded write that stays in the active CP (no CP before the peer returns).
    let alone = p.write(0, &[0x5C; 4096]);
    assert!(completed(&run_alone(&mut p), alone));
    let events = reconnect(&mut p);
    let cp_at = events
        .iter()
        .position(|e| matches!(e, SourceEvent::CpCompleted { .. }));
    let done_at = events
        .iter()
        .position(|e| matches!(e, SourceEvent::ResyncDone { .. }));
    assert!(
        matches!((cp_at, done_at), (Some(cp), Some(done)) if cp < done),
        "the CP of the write read by the resync completes before ResyncDone: {events:?}"
    );
    assert_mirror_is_primary(&p);
}

/// Found by the simulation (seed 736): a degraded source completed a CP on the primary alone
/// before its new generation was durable; a crash then brought it back at the old generation
/// with a CP the destination never saw (refused as needing a full resync), and the released
/// entries' marks could be lost too.
#[test]
fn a_cp_completes_on_the_primary_alone_only_once_its_marks_are_durable() {
    let mut p = degrade_pair();
    p.connect();
    p.write(0, &[0x11; 4096]);
    p.exchange();
    lose_destination(&mut p);
    p.write(64, &[0x22; 4096]);
    p.source.request_cp(p.now_us);
    // Primary ops complete, metadata ops are submitted but never answered.
    let mut events = Vec::new();
    for _ in 0..20 {
        p.source.handle_tick(p.now_us);
        while let Some(op) = p.source.poll_device_op(p.now_us) {
            p.primaries[op.nsid as usize - 1].submit(op);
        }
        while let Some(op) = p.source.poll_metadata_op() {
            p.source_metadata.submit(op);
        }
        let source = &mut p.source;
        for device in &mut p.primaries {
            device.poll_completions(&mut |c| source.handle_device_completion(p.now_us, c));
        }
        events.extend(events_of(&mut p));
    }
    assert!(
        !events.iter().any(|e| matches!(
            e,
            SourceEvent::CpCompleted { .. } | SourceEvent::WriteCompleted(_)
        )),
        "nothing completes before the generation and marks are durable: {events:?}"
    );
    let source = &mut p.source;
    p.source_metadata
        .poll_completions(&mut |c| source.handle_metadata_completion(c));
    let events = run_alone(&mut p);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SourceEvent::CpCompleted { .. })),
        "{events:?}"
    );
}

/// Found by the simulation (seed 1166): a source lost its peer before any handshake settled
/// (generation 0) and took a generation with no history: a destination holding the source's
/// proposal (its half of an interrupted first handshake) shared no history with it, and a fresh
/// destination would have been accepted as identical under `assume_identical` without the
/// degraded writes.
#[test]
fn a_source_degraded_before_any_handshake_resyncs_a_fresh_destination_in_full() {
    let mut p = degrade_pair();
    p.source.config.assume_identical = true;
    p.destination.assume_identical = true;
    // Never connected: the destination is lost after the peer timeout.
    p.now_us += 2 * PEER_TIMEOUT_US;
    p.source.handle_tick(p.now_us);
    assert!(p.source.is_degraded());
    let alone = p.write(8, &[0x99; 4096]);
    assert!(completed(&run_alone(&mut p), alone));
    let generations = *p.source.metadata.generations();
    assert_eq!(
        generations.history[0],
        p.source.metadata.proposed_generation()
    );
    let events = reconnect(&mut p);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SourceEvent::ResyncDone { .. })),
        "{events:?}"
    );
    assert_eq!(
        p.source.counters().resync_bytes_done,
        NAMESPACE_BYTES as u64,
        "a full sync, not an assumed identical pair"
    );
    p.cp();
    assert_mirror_is_primary(&p);
}

/// Found by the simulation (seed 369): the destination applied a CP whose CpAck was lost, then
/// the source crashed; the handshake settled on a resync and the destination refused the
/// source as behind it, although one CP ahead is exactly the lost-CpAck case the source
/// completes at the HelloAck.
#[test]
fn a_resync_accepts_a_destination_one_cp_ahead() {
    let mut p = pair(CpMode::References);
    p.source.config.assume_identical = false;
    p.destination.assume_identical = false;
    p.destination.handle_connected(0);
    p.source.handle_connected(0);
    let events = reconnect(&mut p);
    assert!(events
        .iter()
        .any(|e| matches!(e, SourceEvent::ResyncDone { .. })));
    // A second resync is owed: the source takes a generation the destination lacks (as after
    // a degrade), then a CP is applied over there and its CpAck lost.
    p.source.handle_disconnected(p.now_us);
    p.destination.handle_disconnected(p.now_us);
    let seq = p.source.new_generation(0x4242);
    p.devices();
    assert!(p.source.metadata.durable_through() >= seq);
    let _ = p.source.metadata.mark(1, 0, 4096);
    p.devices();
    // The resync's ResyncDone waits for this write's CP, which never completes here.
    p.write(0, &[0x33; 4096]);
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    p.source.request_cp(p.now_us);
    for _ in 0..50 {
        lockstep(&mut p, |message| {
            matches!(message, wire::Message::CpAck { .. })
        });
    }
    assert_eq!(
        p.destination.cp_completed(),
        p.source.cp_completed() + 1,
        "the CpAck was lost"
    );
    // The source crashes (its ring and metadata survive) and comes back: a resync again.
    p.source.handle_disconnected(p.now_us);
    p.destination.handle_disconnected(p.now_us);
    assert!(p.source.resync_progress().is_some(), "still resyncing");
    let config = p.source.config;
    let placeholder = Source::open(
        config,
        vec![0; RING_BYTES_MIN as usize],
        &[NAMESPACE_BYTES as u64],
        reopen_metadata(&p.source_metadata),
        p.now_us,
    )
    .unwrap()
    .0;
    let ring = std::mem::replace(&mut p.source, placeholder).into_memory();
    p.source = Source::open(
        config,
        ring,
        &[NAMESPACE_BYTES as u64],
        reopen_metadata(&p.source_metadata),
        p.now_us,
    )
    .unwrap()
    .0;
    let events = reconnect(&mut p);
    assert!(events.contains(&SourceEvent::LinkReady), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SourceEvent::ResyncDone { .. })),
        "{events:?}"
    );
    p.cp();
    assert_mirror_is_primary(&p);
}

/// Found by the simulation's failback (seed 1195 of 5000): the destination applied a CP whose
/// CpAck was lost, the source crashed and reopened with that CP's entries to land on the
/// primary again; the handshake takes the CP as mirrored (never sent again), and a resync read
/// of a block it wrote, issued before its entry landed again, sent the block's older content in
/// a table that overwrote the mirror's newer one. Resync reads wait until such a CP completed.
#[test]
fn resync_reads_wait_for_a_cp_the_destination_applied_to_land_on_the_primary() {
    let mut p = pair(CpMode::References);
    p.connect();
    p.source.handle_disconnected(p.now_us);
    p.destination.handle_disconnected(p.now_us);
    let seq = p.source.new_generation(0x4343);
    p.devices();
    assert!(p.source.metadata.durable_through() >= seq);
    // A whole extent marked: its blocks beyond the write are read from the primary.
    let _ = p.source.metadata.mark(1, 0, BITMAP_EXTENT_BYTES_DEFAULT);
    p.devices();
    // The extent's last block: reads go in block order, and a read overlapping the write in
    // flight waits (the earlier blocks' reads would not).
    p.write(
        BITMAP_EXTENT_BYTES_DEFAULT / crate::geometry::SECTOR_SIZE as u64 - 8,
        &[0x44; 4096],
    );
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    p.source.request_cp(p.now_us);
    for _ in 0..50 {
        lockstep(&mut p, |message| {
            matches!(message, wire::Message::CpAck { .. })
        });
    }
    assert_eq!(
        p.destination.cp_completed(),
        p.source.cp_completed() + 1,
        "the CpAck was lost"
    );
    p.source.handle_disconnected(p.now_us);
    p.destination.handle_disconnected(p.now_us);
    let config = p.source.config;
    let placeholder = Source::open(
        config,
        vec![0; RING_BYTES_MIN as usize],
        &[NAMESPACE_BYTES as u64],
        reopen_metadata(&p.source_metadata),
        p.now_us,
    )
    .unwrap()
    .0;
    let ring = std::mem::replace(&mut p.source, placeholder).into_memory();
    p.source = Source::open(
        config,
        ring,
        &[NAMESPACE_BYTES as u64],
        reopen_metadata(&p.source_metadata),
        p.now_us,
    )
    .unwrap()
    .0;
    // The recovered entry does not land on the primary yet; the extent is marked again (as a
    // failback's destination's ResyncMarks do at every session).
    p.primaries[0].stalled = true;
    let _ = p.source.metadata.mark(1, 0, BITMAP_EXTENT_BYTES_DEFAULT);
    p.devices();
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    let events = p.exchange();
    assert!(events.contains(&SourceEvent::LinkReady), "{events:?}");
    assert!(p.source.resync_progress().is_some(), "a resync runs");
    assert!(
        !p.primaries[0]
            .kinds
            .values()
            .any(|&kind| kind == DeviceOpKind::Read),
        "no resync read before the mirrored CP landed on the primary"
    );
    p.primaries[0].stalled = false;
    let mut events = Vec::new();
    for _ in 0..20 {
        events.extend(p.exchange());
        if p.source.resync_progress().is_none() {
            break;
        }
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SourceEvent::ResyncDone { .. })),
        "{events:?}"
    );
    p.cp();
    assert_mirror_is_primary(&p);
}

/// Found by the simulation (seed 6979): the destination took our generation at ResyncDone and
/// crashed before its ResyncDoneAck went out. The next handshake found the pair in sync and
/// dropped the resync without resetting the bitmap's base, so a later degrade took no new
/// generation: its writes were marked against a base the destination had left, and the
/// handshake after it found the pair in sync again, the degraded writes never mirrored.
#[test]
fn a_lost_resync_done_ack_leaves_no_stale_bitmap_base() {
    let mut p = degrade_pair();
    p.connect();
    lose_destination(&mut p);
    p.write(0, &[0x71; 4096]);
    run_alone(&mut p);
    p.source.request_cp(p.now_us);
    run_alone(&mut p);
    // The resync runs; the ResyncDoneAck is lost with the link.
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    let mut done_sent = false;
    for _ in 0..200 {
        p.source.handle_tick(p.now_us);
        p.devices();
        let bytes = source_bytes(&mut p);
        for message in split(&bytes) {
            done_sent |= matches!(wire::decode(message), Ok(wire::Message::ResyncDone { .. }));
            p.destination.handle_message(p.now_us, message).unwrap();
        }
        p.devices();
        let back = drain_destination(&mut p.destination);
        if done_sent {
            break;
        }
        for message in split(&back) {
            p.source.handle_message(p.now_us, message).unwrap();
        }
    }
    assert!(done_sent);
    p.devices();
    let _ = drain_destination(&mut p.destination);
    p.source.handle_disconnected(p.now_us);
    p.destination.handle_disconnected(p.now_us);
    assert_eq!(
        p.source.metadata.generations().current,
        p.destination.metadata().generations().current
    );
    // In sync at the next handshake: the resync is over.
    let events = reconnect(&mut p);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SourceEvent::ResyncDone { .. })),
        "{events:?}"
    );
    assert_eq!(p.source.metadata.generations().bitmap_base, 0);
    // A later outage takes a new generation, and its writes reach the mirror by a resync.
    let before = p.source.metadata.generations().current;
    lose_destination(&mut p);
    assert_ne!(p.source.metadata.generations().current, before);
    p.write(512, &[0x72; 4096]);
    run_alone(&mut p);
    p.source.request_cp(p.now_us);
    run_alone(&mut p);
    let events = reconnect(&mut p);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, SourceEvent::ResyncDone { .. })),
        "{events:?}"
    );
    p.cp();
    assert_mirror_is_primary(&p);
}

/// Found by the simulation (seed 3315): a degraded source sent its Hello with a new generation
/// not yet durable; the destination started a resync session on it (resync target, our CP
/// numbering), the source crashed and came back at the old generation, and the pair met "in
/// sync" with a destination that had adopted CPs it never applied. The Hello now waits.
#[test]
fn the_hello_waits_for_the_generations_it_carries_to_be_durable() {
    let mut p = degrade_pair();
    p.connect();
    lose_destination(&mut p);
    assert!(p.source.is_degraded());
    assert!(p.source.metadata.durable_through() < p.source.metadata.last_seq());
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    p.source.handle_tick(p.now_us);
    assert_eq!(
        p.source.tx_pending_bytes(),
        0,
        "no Hello before the generation is durable"
    );
    let events = reconnect(&mut p);
    assert!(events.contains(&SourceEvent::LinkReady), "{events:?}");
}

#[test]
fn marks_without_a_base_are_forgotten_at_a_handshake_in_sync() {
    // What a crash right after a degrade can leave: the new generation lost (not yet durable),
    // marks written after it kept. The entries they cover are still in the ring, which the new
    // session sends again, so the pair is in sync and no resync is owed for them.
    let mut p = degrade_pair();
    p.connect();
    let id = p.write(0, &[0x5a; 4096]);
    assert!(completed(&p.exchange(), id));
    p.source.handle_disconnected(p.now_us);
    p.destination.handle_disconnected(p.now_us);
    assert_eq!(p.source.metadata.generations().bitmap_base, 0);
    let _ = p.source.metadata.mark(1, 16, 8192);
    assert!(p.source.metadata.marked_count() > 0);
    let events = reconnect(&mut p);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, SourceEvent::ResyncDone { .. })),
        "{events:?}"
    );
    assert!(p.source.resync_progress().is_none());
    assert_eq!(p.source.metadata.marked_count(), 0);
    assert_eq!(
        p.source.metadata.generations().current,
        p.destination.metadata().generations().current
    );
    // The clears reach the metadata device: nothing is marked after a reopen either.
    for _ in 0..20 {
        p.source.handle_tick(p.now_us);
        p.devices();
    }
    assert!(p.source.metadata.is_durable());
    // Writes are replicated as before.
    let id = p.write(8, &[0x5b; 4096]);
    assert!(completed(&p.exchange(), id));
}
