//! The source's side of liveness ([`crate::liveness`]): heartbeats out, the silence, ack and
//! reconnect deadlines, the [`PeerState`] they move, and the peer-loss policy applied to host
//! writes (the held ones fail, new ones are refused, under [`PeerLossPolicy::Fail`]).

use super::{CpPhase, LinkState, Source, SourceEvent, WriteId};
use crate::liveness::{PeerLossPolicy, PeerLostReason, PeerState};
use crate::ring::RingStore;
use crate::wire::Control;

impl<M: RingStore> Source<M> {
    /// Every tick: a lost peer is declared (and its connection closed), a heartbeat goes out
    /// when nothing else did for a while, and the policy applies to writes while lost.
    pub(super) fn tick_liveness(&mut self, now_us: u64) {
        if self.liveness.is_connected() {
            if let Some(silent_us) = self.liveness.silence_expired(now_us) {
                self.declare_lost(now_us, PeerLostReason::Silent { silent_us });
            } else if let Some(waited_us) = self.ack_overdue(now_us) {
                self.declare_lost(now_us, PeerLostReason::AckOverdue { waited_us });
            } else if self.liveness.heartbeat_due(
                now_us,
                self.sent_bytes,
                self.out.pending_bytes() == 0,
            ) {
                self.queue_heartbeat(now_us);
            }
        }
        if let PeerState::Disconnected { since_us } = self.peer {
            let down_us = now_us.saturating_sub(since_us);
            if down_us >= self.config.peer_timeout_us {
                self.declare_lost(now_us, PeerLostReason::Unreachable { down_us });
            }
        }
        if self.writes_fail() {
            self.fail_held_writes();
        }
        self.counters.peer_state = self.peer.code();
    }

    fn queue_heartbeat(&mut self, now_us: u64) {
        let heartbeat = Control::Heartbeat {
            peer_timeout_us: self.config.peer_timeout_us,
        };
        let length = heartbeat.encoded_bytes();
        if self
            .out
            .push_inline(length, |bytes| heartbeat.encode(bytes))
            .is_ok()
        {
            self.liveness.on_heartbeat_queued(now_us);
            self.counters.heartbeat_count += 1;
        }
    }

    /// Transfers sent on this session and not yet acknowledged.
    pub(super) fn awaiting_acks(&self) -> bool {
        self.link == LinkState::Ready
            && self
                .cps
                .iter()
                .any(|state| state.acked_count < state.sent_count)
    }

    /// How long transfers have waited with no ack progress, once that reaches the timeout.
    fn ack_overdue(&mut self, now_us: u64) -> Option<u64> {
        if !self.awaiting_acks() {
            self.ack_waiting_since_us = None;
            return None;
        }
        let since_us = *self.ack_waiting_since_us.get_or_insert(now_us);
        let waited_us = now_us.saturating_sub(since_us);
        (waited_us >= self.config.peer_timeout_us).then_some(waited_us)
    }

    /// A TransferAck completed transfers: the ack clock restarts for what is still unacked.
    pub(super) fn on_ack_progress(&mut self, now_us: u64) {
        self.ack_waiting_since_us = self.awaiting_acks().then_some(now_us);
    }

    /// The handshake succeeded: writes complete synchronously again.
    pub(super) fn on_peer_ready(&mut self, now_us: u64) {
        match self.peer {
            PeerState::Lost { since_us, reason } => {
                log::warn!(
                    "source: destination back after {} ms lost ({reason}); writes are replicated \
                     synchronously again",
                    now_us.saturating_sub(since_us) / 1000
                );
                self.counters.peer_return_count += 1;
            }
            PeerState::Disconnected { .. } => {}
            PeerState::Connected { .. } => unreachable!("a handshake per connection"),
        }
        self.peer = PeerState::Connected { since_us: now_us };
        self.ack_waiting_since_us = None;
        self.counters.peer_state = self.peer.code();
    }

    /// The destination is lost: its connection (if any) closes; the first time, the state
    /// changes, and that is logged, counted and told as an event.
    pub(super) fn declare_lost(&mut self, now_us: u64, reason: PeerLostReason) {
        if self.liveness.is_connected() {
            self.liveness.request_close(reason);
        }
        self.ack_waiting_since_us = None;
        if self.peer.is_lost() {
            return;
        }
        let policy = self.config.peer_loss_policy;
        log::error!(
            "source: destination lost: {reason}; peer_loss_policy = \"{}\": {}",
            policy.name(),
            match policy {
                PeerLossPolicy::Suspend => "host writes are held until it returns",
                PeerLossPolicy::Fail => "host writes fail with a path error until it returns",
                PeerLossPolicy::Degrade =>
                    "host writes go on without it, their extents marked in the bitmap for a resync",
            }
        );
        self.peer = PeerState::Lost {
            since_us: now_us,
            reason,
        };
        self.counters.peer_lost_count += 1;
        self.events.push_back(SourceEvent::PeerLost(reason));
    }

    /// Under the fail policy: every committed write not completed yet completes with a path
    /// error, in seq order (it stays in the ring and is mirrored when the peer returns).
    fn fail_held_writes(&mut self) {
        let through = self.committed_through_seq();
        for seq in self.completed_through_seq + 1..=through {
            self.events
                .push_back(SourceEvent::WriteFailed(WriteId(seq)));
            self.counters.write_failed_count += 1;
        }
        self.completed_through_seq = self.completed_through_seq.max(through);
    }

    /// The last seq of the ring's committed prefix (a reserved, uncommitted entry ends it).
    pub(super) fn committed_through_seq(&self) -> u64 {
        let mut through = self.completed_through_seq;
        for half in self.halves_in_order() {
            let state = &self.cps[half];
            if state.phase == CpPhase::Free {
                continue;
            }
            let committed = self.ring.committed_slots(half);
            if committed > 0 {
                through = through.max(state.first_seq + u64::from(committed) - 1);
            }
            if committed < self.ring.reserved_slots(half) {
                break;
            }
        }
        through
    }

    /// The next liveness deadline: silence or heartbeat on a connection, the ack deadline, and
    /// the moment a disconnected peer becomes lost.
    pub(super) fn liveness_deadline_us(&self) -> Option<u64> {
        let timeout_us = self.config.peer_timeout_us;
        let unreachable = match self.peer {
            PeerState::Disconnected { since_us } => Some(since_us + timeout_us),
            _ => None,
        };
        let ack = self.ack_waiting_since_us.map(|since| since + timeout_us);
        [self.liveness.deadline_us(), unreachable, ack]
            .into_iter()
            .flatten()
            .min()
    }
}
