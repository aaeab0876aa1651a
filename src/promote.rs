//! `nvmirror promote`: failover. A destination whose source is lost replays the log entries newer
//! than its last completed CP onto its mirror and bumps the epoch, so the stale former source is
//! refused if it comes back (invariants 4 and 6).

use crate::config::{Config, Role};
use crate::setup;

/// `nvmirror promote`: the destination's failover step.
pub fn promote(config: &Config) -> Result<(), String> {
    if config.role != Role::Destination {
        return Err("promote takes a destination's config".into());
    }
    let destination = setup::open_destination(config)?;
    let report = destination.promote().map_err(|e| format!("promote: {e}"))?;
    println!(
        "nvmirror promote: {} log entries ({} bytes) newer than CP {} replayed onto the mirror; epoch is now {}",
        report.entries_replayed, report.bytes_replayed, report.cp_completed, report.epoch
    );
    Ok(())
}
