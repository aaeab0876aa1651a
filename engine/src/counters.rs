//! Counters of one side (engine spec "Counters"): plain u64s the runtime prints as text
//! (`name value` per line) or JSON; they show what references save on the wire (claim 1).

use std::fmt::Write;

/// What one side did since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub host_write_count: u64,
    pub host_bytes_written: u64,
    pub transfer_count: u64,
    /// Wire bytes of Transfer messages.
    pub transfer_bytes: u64,
    /// Wire bytes destination -> source.
    pub ack_bytes: u64,
    pub cp_count: u64,
    pub cp_data_blocks: u64,
    /// Wire bytes of Data descriptors including their block.
    pub cp_data_bytes: u64,
    pub cp_reference_count: u64,
    pub cp_reference_bytes: u64,
    pub cp_zeroes_count: u64,
    /// references × 4096 − cp_reference_bytes.
    pub bytes_saved_by_references: u64,
    pub cp_duration_us_total: u64,
    pub cp_duration_us_max: u64,
    pub cp_duration_us_last: u64,
    pub ring_used_bytes: u64,
    pub ring_size_bytes: u64,
    /// Bytes sent plus bytes received.
    pub wire_bytes_total: u64,
    pub backpressure_count: u64,
    /// Device ops that failed (each is retried; nothing acknowledged depends on one).
    pub device_error_count: u64,
    /// CPs the destination failed (mirror write errors) and the source sent again.
    pub cp_failure_count: u64,
    /// Destination: bytes of mirror-namespace writes that completed successfully (4 KiB per
    /// applied descriptor); over `host_bytes_written` it is the coalescing CPs give.
    pub mirror_bytes_written: u64,
    /// Times the peer was declared lost (silence, an overdue ack, no handshake in time).
    pub peer_lost_count: u64,
    /// Source: handshakes that ended a loss.
    pub peer_return_count: u64,
    /// Source: 0 connected, 1 disconnected (within the peer timeout), 2 lost.
    pub peer_state: u64,
    /// Heartbeats sent.
    pub heartbeat_count: u64,
    /// Source: host writes completed with a path error (peer lost, `fail` policy).
    pub write_failed_count: u64,
    /// Source: peer-loss policy changes by the operator at run time.
    pub policy_change_count: u64,
    /// Source: times writes went on without the destination (`degrade`), and writes completed so.
    pub degrade_count: u64,
    pub degraded_write_count: u64,
    /// Source: handshakes abandoned while degraded (a Hello unanswered while a CP waited).
    pub hello_abandoned_count: u64,
    /// Source: resyncs started; bytes of marked extents at the start of the last one and done.
    pub resync_count: u64,
    pub resync_bytes_total: u64,
    pub resync_bytes_done: u64,
    /// Source: resync blocks sent as references (a few bytes each) and as data.
    pub resync_reference_blocks: u64,
    pub resync_data_blocks: u64,
    /// Source: wire bytes of ResyncTables.
    pub resync_wire_bytes: u64,
    /// Destination: resync blocks written to the mirror.
    pub resync_blocks_applied: u64,
}

impl Counters {
    fn fields(&self) -> [(&'static str, u64); 38] {
        [
            ("host_write_count", self.host_write_count),
            ("host_bytes_written", self.host_bytes_written),
            ("transfer_count", self.transfer_count),
            ("transfer_bytes", self.transfer_bytes),
            ("ack_bytes", self.ack_bytes),
            ("cp_count", self.cp_count),
            ("cp_data_blocks", self.cp_data_blocks),
            ("cp_data_bytes", self.cp_data_bytes),
            ("cp_reference_count", self.cp_reference_count),
            ("cp_reference_bytes", self.cp_reference_bytes),
            ("cp_zeroes_count", self.cp_zeroes_count),
            ("bytes_saved_by_references", self.bytes_saved_by_references),
            ("cp_duration_us_total", self.cp_duration_us_total),
            ("cp_duration_us_max", self.cp_duration_us_max),
            ("cp_duration_us_last", self.cp_duration_us_last),
            ("ring_used_bytes", self.ring_used_bytes),
            ("ring_size_bytes", self.ring_size_bytes),
            ("wire_bytes_total", self.wire_bytes_total),
            ("backpressure_count", self.backpressure_count),
            ("device_error_count", self.device_error_count),
            ("cp_failure_count", self.cp_failure_count),
            ("mirror_bytes_written", self.mirror_bytes_written),
            ("peer_lost_count", self.peer_lost_count),
            ("peer_return_count", self.peer_return_count),
            ("peer_state", self.peer_state),
            ("heartbeat_count", self.heartbeat_count),
            ("write_failed_count", self.write_failed_count),
            ("policy_change_count", self.policy_change_count),
            ("degrade_count", self.degrade_count),
            ("degraded_write_count", self.degraded_write_count),
            ("hello_abandoned_count", self.hello_abandoned_count),
            ("resync_count", self.resync_count),
            ("resync_bytes_total", self.resync_bytes_total),
            ("resync_bytes_done", self.resync_bytes_done),
            ("resync_reference_blocks", self.resync_reference_blocks),
            ("resync_data_blocks", self.resync_data_blocks),
            ("resync_wire_bytes", self.resync_wire_bytes),
            ("resync_blocks_applied", self.resync_blocks_applied),
        ]
    }

    /// One counter a line: `name value`.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for (name, value) in self.fields() {
            writeln!(text, "{name} {value}").expect("writing to a String");
        }
        text
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        let mut json = String::from("{");
        for (i, (name, value)) in self.fields().into_iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            write!(json, "{comma}\"{name}\":{value}").expect("writing to a String");
        }
        json.push('}');
        json
    }

    /// Records one completed CP's duration.
    pub fn record_cp_duration(&mut self, duration_us: u64) {
        self.cp_count += 1;
        self.cp_duration_us_total += duration_us;
        self.cp_duration_us_max = self.cp_duration_us_max.max(duration_us);
        self.cp_duration_us_last = duration_us;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json() {
        let mut counters = Counters {
            host_write_count: 3,
            backpressure_count: 1,
            ..Counters::default()
        };
        counters.record_cp_duration(50);
        counters.record_cp_duration(20);
        let text = counters.to_text();
        assert_eq!(text.lines().count(), 38);
        assert!(text.starts_with("host_write_count 3\n"));
        assert!(text.contains("cp_duration_us_max 50\ncp_duration_us_last 20\n"));
        let json = counters.to_json();
        assert!(json.starts_with("{\"host_write_count\":3,"));
        assert!(json.ends_with(
            "\"backpressure_count\":1,\"device_error_count\":0,\"cp_failure_count\":0,\
             \"mirror_bytes_written\":0,\"peer_lost_count\":0,\"peer_return_count\":0,\
             \"peer_state\":0,\"heartbeat_count\":0,\"write_failed_count\":0,\"policy_change_count\":0,\"degrade_count\":0,\"degraded_write_count\":0,\"hello_abandoned_count\":0,\"resync_count\":0,\"resync_bytes_total\":0,\"resync_bytes_done\":0,\"resync_reference_blocks\":0,\"resync_data_blocks\":0,\"resync_wire_bytes\":0,\"resync_blocks_applied\":0}"
        ));
        assert!(json.contains("\"cp_count\":2,"));
    }
}
