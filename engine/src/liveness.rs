//! Liveness of the replication link (issue 9, "Surviving the peer"): heartbeats, the silence and
//! ack deadlines, and the source's view of its peer ([`PeerState`]) with the policy that says what
//! host writes do while the peer is lost ([`PeerLossPolicy`]).
//!
//! A socket says nothing about a frozen peer (a SIGSTOPped process, a hung host, a blackholed
//! network keep the TCP connection open), so each side decides on its own clock: it sends a
//! Heartbeat whenever it has sent nothing for a quarter of its peer timeout, and a side that has
//! received nothing at all for a whole peer timeout declares the peer lost and asks the runtime to
//! close the connection ([`Liveness::poll_close`]). The source also declares the peer lost when a
//! transfer stays unacknowledged for a peer timeout without any ack progress (a peer that answers
//! heartbeats but no longer logs transfers holds host writes just as well).
//!
//! All of it is sans IO: the times come in as `now_us`, and [`Liveness::deadline_us`] tells the
//! runtime (or the simulation) when to tick next.

use std::fmt;

/// The default peer timeout (the config's `peer_timeout_ms` default is this in ms).
pub const PEER_TIMEOUT_US_DEFAULT: u64 = 3_000_000;
/// Heartbeats per peer timeout: a peer declares us lost only after this many heartbeats in a row
/// went missing, so one delayed packet is not a loss.
pub const HEARTBEATS_PER_TIMEOUT: u64 = 4;

/// What a source does with host writes while its peer is lost (config `peer_loss_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLossPolicy {
    /// Host writes are held (neither completed nor failed) until the peer returns: nothing is
    /// ever acknowledged that the destination has not logged. Once the ring is full, new writes
    /// wait for room (Busy, retried by the target, never failed).
    Suspend,
    /// Once the peer is lost (after the peer timeout), every held and every new host write
    /// completes with a path error, so host multipath can fail over; reads are still served.
    /// Failed writes stay in the ring and reach the destination when it returns (a failed write
    /// leaves its blocks undefined, which either content satisfies).
    Fail,
    /// Once the peer is lost, the source takes a new generation and writes go on without it:
    /// each write's extents are marked in the persistent bitmap, and it completes once it is in
    /// the ring and its mark is durable. CPs complete on the primary alone. When the peer
    /// returns, the marked extents are resynced and writes are synchronous again.
    Degrade,
}

impl PeerLossPolicy {
    pub fn name(self) -> &'static str {
        match self {
            Self::Suspend => "suspend",
            Self::Fail => "fail",
            Self::Degrade => "degrade",
        }
    }
}

/// Why a peer was declared lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLostReason {
    /// Nothing at all (no heartbeat, no ack) arrived for `silent_us` on a connected link.
    Silent { silent_us: u64 },
    /// Transfers stayed unacknowledged for `waited_us` with no ack progress.
    AckOverdue { waited_us: u64 },
    /// No handshake succeeded for `down_us` since the link went down (or since start).
    Unreachable { down_us: u64 },
    /// A degraded source's Hello got no answer for `waited_us` while a CP waited for it to
    /// complete on the primary alone (a destination whose kernel accepts connections while the
    /// process is frozen): the handshake is abandoned so the hosts' writes go on.
    HelloUnanswered { waited_us: u64 },
}

impl fmt::Display for PeerLostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Silent { silent_us } => {
                write!(f, "nothing received for {} ms", silent_us / 1000)
            }
            Self::AckOverdue { waited_us } => write!(
                f,
                "transfers unacknowledged for {} ms with no ack progress",
                waited_us / 1000
            ),
            Self::Unreachable { down_us } => {
                write!(f, "no handshake for {} ms", down_us / 1000)
            }
            Self::HelloUnanswered { waited_us } => write!(
                f,
                "no answer to the Hello for {} ms while a degraded CP waited to complete",
                waited_us / 1000
            ),
        }
    }
}

/// The source's view of its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// The handshake succeeded on the current connection: writes complete synchronously.
    Connected { since_us: u64 },
    /// No handshake yet (start) or the link went down less than a peer timeout ago: writes wait.
    Disconnected { since_us: u64 },
    /// Declared lost at `since_us`: the policy applies until a handshake succeeds again.
    Lost {
        since_us: u64,
        reason: PeerLostReason,
    },
}

impl PeerState {
    /// The `peer_state` counter: 0 connected, 1 disconnected (within the timeout), 2 lost.
    pub fn code(&self) -> u64 {
        match self {
            Self::Connected { .. } => 0,
            Self::Disconnected { .. } => 1,
            Self::Lost { .. } => 2,
        }
    }

    pub fn is_lost(&self) -> bool {
        matches!(self, Self::Lost { .. })
    }
}

/// One side's heartbeat and silence clock for the current connection.
#[derive(Debug)]
pub struct Liveness {
    timeout_us: u64,
    connected: bool,
    last_received_us: u64,
    last_sent_us: u64,
    /// The previous tick: bytes first seen at a tick went out after it.
    last_tick_us: u64,
    /// The side's send counter at the last tick.
    sent_bytes_seen: u64,
    /// The peer's timeout differs from ours: warned once per connection.
    mismatch_warned: bool,
    close: Option<PeerLostReason>,
}

impl Liveness {
    pub fn new(timeout_us: u64) -> Self {
        assert!(
            timeout_us >= HEARTBEATS_PER_TIMEOUT,
            "a peer timeout of {timeout_us} us leaves no heartbeat interval"
        );
        Self {
            timeout_us,
            connected: false,
            last_received_us: 0,
            last_sent_us: 0,
            last_tick_us: 0,
            sent_bytes_seen: 0,
            mismatch_warned: false,
            close: None,
        }
    }

    pub fn timeout_us(&self) -> u64 {
        self.timeout_us
    }

    /// A heartbeat goes out after this long without sending anything.
    pub fn heartbeat_interval_us(&self) -> u64 {
        self.timeout_us / HEARTBEATS_PER_TIMEOUT
    }

    /// A connection came up: both clocks start now (a peer that never says a word is lost a
    /// timeout later, the Hello's answer included).
    pub fn on_connected(&mut self, now_us: u64, sent_bytes: u64) {
        self.connected = true;
        self.last_received_us = now_us;
        self.last_sent_us = now_us;
        self.last_tick_us = now_us;
        self.sent_bytes_seen = sent_bytes;
        self.mismatch_warned = false;
        self.close = None;
    }

    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.close = None;
    }

    /// A whole message arrived (any kind counts: the peer is alive).
    pub fn on_received(&mut self, now_us: u64) {
        assert!(self.connected, "a message arrives on a connection");
        self.last_received_us = self.last_received_us.max(now_us);
    }

    /// A Heartbeat told us the peer's own timeout; a mismatch is worth one warning, since a peer
    /// whose heartbeat interval exceeds our timeout would be declared lost while alive.
    pub fn on_heartbeat(&mut self, side: &str, peer_timeout_us: u64) {
        if peer_timeout_us != self.timeout_us && !self.mismatch_warned {
            self.mismatch_warned = true;
            log::warn!(
                "{side}: the peer's peer_timeout_ms is {} and ours {}: configure both alike \
                 (the peer heartbeats every {} ms)",
                peer_timeout_us / 1000,
                self.timeout_us / 1000,
                peer_timeout_us / HEARTBEATS_PER_TIMEOUT / 1000
            );
        }
    }

    /// Takes note of bytes that left since the last tick (`sent_bytes` is the side's running
    /// total), then says whether a heartbeat is due: connected, nothing queued, and nothing sent
    /// for a heartbeat interval.
    pub fn heartbeat_due(&mut self, now_us: u64, sent_bytes: u64, queue_empty: bool) -> bool {
        if sent_bytes != self.sent_bytes_seen {
            // They left between the last tick and this one: taking the earlier time makes the
            // next heartbeat early rather than late (a reactor may sleep until this deadline).
            self.sent_bytes_seen = sent_bytes;
            self.last_sent_us = self.last_sent_us.max(self.last_tick_us);
        }
        self.last_tick_us = self.last_tick_us.max(now_us);
        self.connected
            && self.close.is_none()
            && queue_empty
            && now_us.saturating_sub(self.last_sent_us) >= self.heartbeat_interval_us()
    }

    /// The heartbeat was queued now.
    pub fn on_heartbeat_queued(&mut self, now_us: u64) {
        self.last_sent_us = now_us;
    }

    /// How long the peer has been silent, once that reaches the timeout.
    pub fn silence_expired(&self, now_us: u64) -> Option<u64> {
        let silent_us = now_us.saturating_sub(self.last_received_us);
        // Once a close is asked for, the loss was declared: not again on the same connection.
        (self.connected && self.close.is_none() && silent_us >= self.timeout_us)
            .then_some(silent_us)
    }

    /// The peer is lost: the runtime closes the connection at its next [`Liveness::poll_close`].
    pub fn request_close(&mut self, reason: PeerLostReason) {
        assert!(self.connected, "only a connection is closed");
        self.close.get_or_insert(reason);
    }

    /// Whether the runtime must close the connection now, and why.
    #[must_use]
    pub fn poll_close(&mut self) -> Option<PeerLostReason> {
        self.close.take()
    }

    /// A close was requested and not yet polled.
    pub fn close_requested(&self) -> bool {
        self.close.is_some()
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The next time the clock needs a tick: the silence deadline or the next heartbeat.
    pub fn deadline_us(&self) -> Option<u64> {
        if !self.connected {
            return None;
        }
        if self.close.is_some() {
            return Some(0);
        }
        Some(
            (self.last_received_us + self.timeout_us)
                .min(self.last_sent_us + self.heartbeat_interval_us()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT_US: u64 = 1_000_000;

    #[test]
    fn heartbeat_after_a_quarter_of_silence_on_our_side() {
        let mut liveness = Liveness::new(TIMEOUT_US);
        assert!(!liveness.heartbeat_due(0, 0, true), "not connected");
        liveness.on_connected(100, 0);
        assert!(!liveness.heartbeat_due(100 + 249_999, 0, true));
        assert!(liveness.heartbeat_due(100 + 250_000, 0, true));
        assert!(
            !liveness.heartbeat_due(100 + 250_000, 0, false),
            "bytes are queued: they go first"
        );
        // Bytes seen at a tick went out after the previous one (at 250_100): the interval
        // restarts from there.
        assert!(!liveness.heartbeat_due(300_000, 64, true));
        assert!(!liveness.heartbeat_due(500_099, 64, true));
        assert!(liveness.heartbeat_due(500_100, 64, true));
        liveness.on_heartbeat_queued(500_100);
        assert_eq!(liveness.deadline_us(), Some(750_100));
    }

    #[test]
    fn silence_for_a_whole_timeout_is_a_loss() {
        let mut liveness = Liveness::new(TIMEOUT_US);
        assert_eq!(liveness.silence_expired(5 * TIMEOUT_US), None, "no link");
        liveness.on_connected(0, 0);
        liveness.on_received(400_000);
        assert_eq!(liveness.silence_expired(1_399_999), None);
        assert_eq!(liveness.silence_expired(1_400_000), Some(TIMEOUT_US));
        liveness.request_close(PeerLostReason::Silent {
            silent_us: TIMEOUT_US,
        });
        assert_eq!(liveness.deadline_us(), Some(0), "close at once");
        assert_eq!(
            liveness.poll_close(),
            Some(PeerLostReason::Silent {
                silent_us: TIMEOUT_US
            })
        );
        assert_eq!(liveness.poll_close(), None, "told once");
        liveness.on_disconnected();
        assert_eq!(liveness.deadline_us(), None);
        assert_eq!(liveness.silence_expired(10 * TIMEOUT_US), None);
    }

    #[test]
    fn the_deadline_is_the_earlier_of_heartbeat_and_silence() {
        let mut liveness = Liveness::new(TIMEOUT_US);
        liveness.on_connected(0, 0);
        assert_eq!(liveness.deadline_us(), Some(250_000));
        assert!(liveness.heartbeat_due(250_000, 0, true));
        liveness.on_heartbeat_queued(250_000);
        liveness.on_heartbeat_queued(750_000);
        // The next heartbeat would be at 1_000_000: the silence deadline comes first.
        assert_eq!(liveness.deadline_us(), Some(TIMEOUT_US));
    }
}
