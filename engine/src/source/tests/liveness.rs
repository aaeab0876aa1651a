//! Liveness on virtual time: heartbeats on a quiet link, a silent peer lost after exactly the
//! peer timeout (on both sides), the ack deadline, a link that stays down, and what each
//! peer-loss policy does with held and new host writes until the peer returns.

use super::*;
use crate::liveness::{PeerLostReason, PeerState, HEARTBEATS_PER_TIMEOUT};

const INTERVAL_US: u64 = PEER_TIMEOUT_US / HEARTBEATS_PER_TIMEOUT;

fn lost_events(events: &[SourceEvent]) -> Vec<PeerLostReason> {
    events
        .iter()
        .filter_map(|event| match event {
            SourceEvent::PeerLost(reason) => Some(*reason),
            _ => None,
        })
        .collect()
}

fn drain_source_events(p: &mut Pair) -> Vec<SourceEvent> {
    std::iter::from_fn(|| p.source.poll_event()).collect()
}

/// Everything the source queued is lost on the way (a frozen destination never reads it).
fn lose_source_bytes(p: &mut Pair) {
    let _ = p
        .source
        .out
        .drain_to_vec(p.source.ring.bytes(0, RING_BYTES_MIN as usize));
}

fn fail_pair() -> Pair {
    pair_with(SourceConfig {
        peer_loss_policy: PeerLossPolicy::Fail,
        generation_seed: 0x5eed,
        resync_rate_bytes_per_s: 0,
        ..config(CpMode::References)
    })
}

#[test]
fn a_quiet_link_carries_heartbeats_both_ways_and_nobody_is_lost() {
    let mut p = pair(CpMode::References);
    p.connect();
    for _ in 0..5 * HEARTBEATS_PER_TIMEOUT {
        p.now_us += INTERVAL_US;
        p.destination.handle_tick(p.now_us);
        assert_eq!(p.destination.poll_link_close(), None);
        let events = p.exchange();
        assert_eq!(p.source.poll_link_close(), None);
        assert!(lost_events(&events).is_empty(), "{events:?}");
    }
    let (source, destination) = (p.source.counters(), p.destination.counters());
    assert!(source.heartbeat_count >= 5 * HEARTBEATS_PER_TIMEOUT - 1);
    assert!(destination.heartbeat_count >= 5 * HEARTBEATS_PER_TIMEOUT - 1);
    assert_eq!(
        (source.peer_lost_count, destination.peer_lost_count),
        (0, 0)
    );
    assert!(matches!(p.source.peer_state(), PeerState::Connected { .. }));
    assert_eq!(source.peer_state, 0);
}

#[test]
fn a_heartbeat_before_the_handshake_is_accepted_on_both_sides() {
    let mut p = pair(CpMode::References);
    let heartbeat = control_message(wire::Control::Heartbeat {
        peer_timeout_us: PEER_TIMEOUT_US,
    });
    p.destination.handle_connected(0);
    p.source.handle_connected(0);
    p.destination.handle_message(0, &heartbeat).unwrap();
    p.source.handle_message(0, &heartbeat).unwrap();
    assert!(p.exchange().contains(&SourceEvent::LinkReady));
}

#[test]
fn a_silent_destination_is_lost_after_exactly_the_peer_timeout() {
    let mut p = pair(CpMode::References);
    p.connect();
    // The HelloAck came at now_us; from here on the destination says nothing (frozen).
    let heard_us = p.now_us;
    p.now_us = heard_us + PEER_TIMEOUT_US - 1;
    p.source.handle_tick(p.now_us);
    assert_eq!(p.source.poll_link_close(), None);
    assert!(p.source.next_deadline_us().unwrap() <= heard_us + PEER_TIMEOUT_US);
    p.now_us += 1;
    p.source.handle_tick(p.now_us);
    let reason = PeerLostReason::Silent {
        silent_us: PEER_TIMEOUT_US,
    };
    assert_eq!(p.source.poll_link_close(), Some(reason));
    assert_eq!(p.source.poll_link_close(), None, "told once");
    assert_eq!(lost_events(&drain_source_events(&mut p)), vec![reason]);
    assert_eq!(
        p.source.peer_state(),
        PeerState::Lost {
            since_us: p.now_us,
            reason
        }
    );
    assert_eq!(
        (
            p.source.counters().peer_lost_count,
            p.source.counters().peer_state
        ),
        (1, 2)
    );
    // The link closes; redials that reach no handshake are not a second loss.
    p.source.handle_disconnected(p.now_us);
    for _ in 0..3 {
        p.now_us += 2 * PEER_TIMEOUT_US;
        p.source.handle_connected(p.now_us);
        p.now_us += PEER_TIMEOUT_US;
        p.source.handle_tick(p.now_us);
        assert!(
            p.source.poll_link_close().is_some(),
            "a silent redial closes"
        );
        p.source.handle_disconnected(p.now_us);
    }
    assert!(lost_events(&drain_source_events(&mut p)).is_empty());
    assert_eq!(p.source.counters().peer_lost_count, 1);
}

#[test]
fn a_silent_source_is_lost_on_the_destination_after_the_peer_timeout() {
    let mut p = pair(CpMode::References);
    p.connect();
    let heard_us = p.now_us;
    p.now_us = heard_us + PEER_TIMEOUT_US - 1;
    p.destination.handle_tick(p.now_us);
    assert_eq!(p.destination.poll_link_close(), None);
    p.now_us += 1;
    p.destination.handle_tick(p.now_us);
    let reason = PeerLostReason::Silent {
        silent_us: PEER_TIMEOUT_US,
    };
    assert_eq!(p.destination.poll_link_close(), Some(reason));
    assert_eq!(
        p.destination.poll_event(),
        Some(crate::DestinationEvent::PeerLost(reason))
    );
    assert_eq!(p.destination.counters().peer_lost_count, 1);
    p.destination.handle_disconnected(p.now_us);
    assert_eq!(p.destination.next_deadline_us(), None);
}

#[test]
fn a_destination_that_heartbeats_but_never_acks_is_lost_by_the_ack_deadline() {
    let mut p = pair(CpMode::References);
    p.connect();
    let id = p.write(0, &[1; 4096]);
    p.source.handle_tick(p.now_us);
    let sent_us = p.now_us;
    lose_source_bytes(&mut p);
    let mut lost = None;
    for _ in 0..2 * HEARTBEATS_PER_TIMEOUT {
        p.now_us += INTERVAL_US;
        // The destination is alive: its heartbeats keep the silence deadline away.
        p.destination.handle_tick(p.now_us);
        for message in split(&drain_destination(&mut p.destination)) {
            p.source.handle_message(p.now_us, message).unwrap();
        }
        p.source.handle_tick(p.now_us);
        lose_source_bytes(&mut p);
        if let Some(reason) = p.source.poll_link_close() {
            lost = Some((p.now_us, reason));
            break;
        }
    }
    let (at_us, reason) = lost.expect("the ack deadline expired");
    assert_eq!(at_us, sent_us + PEER_TIMEOUT_US);
    assert_eq!(
        reason,
        PeerLostReason::AckOverdue {
            waited_us: PEER_TIMEOUT_US
        }
    );
    let events = drain_source_events(&mut p);
    assert_eq!(lost_events(&events), vec![reason]);
    assert!(!events.contains(&SourceEvent::WriteCompleted(id)));
}

#[test]
fn an_ack_that_comes_keeps_the_ack_deadline_away() {
    let mut p = pair(CpMode::References);
    p.connect();
    for block in 0..3 * HEARTBEATS_PER_TIMEOUT {
        let id = p.write(block * 8, &[block as u8; 4096]);
        p.now_us += INTERVAL_US;
        p.destination.handle_tick(p.now_us);
        let events = p.exchange();
        assert!(events.contains(&SourceEvent::WriteCompleted(id)));
        assert!(lost_events(&events).is_empty());
    }
    assert_eq!(p.source.counters().peer_lost_count, 0);
}

#[test]
fn fail_policy_fails_held_and_new_writes_once_lost_and_resumes_after_the_handshake() {
    let mut p = fail_pair();
    p.connect();
    let done = p.write(0, &[1; 4096]);
    assert!(p.exchange().contains(&SourceEvent::WriteCompleted(done)));
    let held = p.write(8, &[2; 4096]);
    p.source.handle_tick(p.now_us);
    lose_source_bytes(&mut p);
    p.source.handle_disconnected(p.now_us);
    p.destination.handle_disconnected(p.now_us);
    let down_us = p.now_us;
    assert!(matches!(
        p.source.peer_state(),
        PeerState::Disconnected { .. }
    ));

    // Within the timeout writes are held, not failed.
    p.now_us = down_us + PEER_TIMEOUT_US - 1;
    let held_too = p.write(16, &[3; 4096]);
    p.source.handle_tick(p.now_us);
    assert!(drain_source_events(&mut p).is_empty());
    assert!(!p.source.writes_fail());

    p.now_us += 1;
    p.source.handle_tick(p.now_us);
    let events = drain_source_events(&mut p);
    assert_eq!(
        events,
        vec![
            SourceEvent::PeerLost(PeerLostReason::Unreachable {
                down_us: PEER_TIMEOUT_US
            }),
            SourceEvent::WriteFailed(held),
            SourceEvent::WriteFailed(held_too),
        ]
    );
    assert!(p.source.writes_fail());
    assert_eq!(
        p.source.write(p.now_us, 1, 24, &[4; 4096]),
        Err(WriteRefused::PeerLost)
    );
    assert_eq!(
        p.source.write_zeroes(p.now_us, 1, 24, 4096),
        Err(WriteRefused::PeerLost)
    );
    // Reads are served, and see what landed on the primary.
    assert!(p.source.read_gate(1, 0, 4096).is_ok());
    assert_eq!(p.source.counters().write_failed_count, 2);

    // The peer returns: the failed writes still reach it (the ring keeps them), none completes
    // a second time, and new writes complete synchronously again.
    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    let events = p.exchange();
    assert!(events.contains(&SourceEvent::LinkReady));
    assert!(!events
        .iter()
        .any(|e| matches!(e, SourceEvent::WriteCompleted(_))));
    assert!(p.destination.logged_seq_max().unwrap() >= held_too.0);
    assert!(matches!(p.source.peer_state(), PeerState::Connected { .. }));
    assert_eq!(p.source.counters().peer_return_count, 1);
    let after = p.write(32, &[5; 4096]);
    assert!(p.exchange().contains(&SourceEvent::WriteCompleted(after)));
    p.cp();
    assert_eq!(p.mirrors[0].bytes(), p.primaries[0].bytes());
    assert_eq!(&p.mirrors[0].bytes()[4096..8192], &[2; 4096][..]);
}

#[test]
fn suspend_policy_holds_writes_while_lost_and_completes_them_when_the_peer_returns() {
    let mut p = pair(CpMode::References);
    p.connect();
    let held = p.write(0, &[1; 4096]);
    p.source.handle_tick(p.now_us);
    lose_source_bytes(&mut p);
    p.source.handle_disconnected(p.now_us);
    p.destination.handle_disconnected(p.now_us);
    p.now_us += 10 * PEER_TIMEOUT_US;
    p.source.handle_tick(p.now_us);
    let events = drain_source_events(&mut p);
    assert_eq!(lost_events(&events).len(), 1);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, SourceEvent::WriteFailed(_))),
        "suspend fails nothing"
    );
    assert!(!p.source.writes_fail());
    let held_too = p.write(8, &[2; 4096]);
    p.source.handle_tick(p.now_us);
    assert!(drain_source_events(&mut p).is_empty(), "still held");

    p.destination.handle_connected(p.now_us);
    p.source.handle_connected(p.now_us);
    let events = p.exchange();
    assert!(events.contains(&SourceEvent::WriteCompleted(held)));
    assert!(events.contains(&SourceEvent::WriteCompleted(held_too)));
    assert_eq!(p.source.counters().write_failed_count, 0);
    assert_eq!(p.source.counters().peer_return_count, 1);
}

#[test]
fn a_source_that_never_reaches_its_destination_declares_it_lost_once() {
    let mut p = fail_pair();
    // Never connected since open (at 0): lost a timeout later.
    p.now_us = PEER_TIMEOUT_US - 1;
    p.source.handle_tick(p.now_us);
    assert!(matches!(
        p.source.peer_state(),
        PeerState::Disconnected { since_us: 0 }
    ));
    assert_eq!(p.source.next_deadline_us(), Some(PEER_TIMEOUT_US));
    p.now_us += 1;
    p.source.handle_tick(p.now_us);
    assert!(p.source.peer_state().is_lost());
    p.now_us += PEER_TIMEOUT_US;
    p.source.handle_tick(p.now_us);
    assert_eq!(p.source.counters().peer_lost_count, 1);
    assert_eq!(
        p.source.next_deadline_us(),
        None,
        "nothing timed while lost"
    );
}
