//! `nvmirror promote`: failover. A destination whose source is lost replays the log entries newer
//! than its last completed CP onto its mirror and bumps the epoch, so the stale former source is
//! refused if it comes back (invariants 4 and 6).

use nvmirror_engine::device::BlockDevice;
use nvmirror_runtime::bdev::drive_waiting;

use crate::config::{Config, Role};
use crate::setup;

/// `nvmirror promote`: the destination's failover step.
pub fn promote(config: &Config) -> Result<(), String> {
    if config.role != Role::Destination {
        return Err("promote takes a destination's config".into());
    }
    let (destination, mut mirrors) = setup::open_destination(config)?;
    let mut promotion = destination.promote().map_err(|e| format!("promote: {e}"))?;
    drive_waiting(
        &mut promotion,
        &mut mirrors,
        |promotion, mirrors| {
            let mut submitted = 0;
            while let Some(op) = promotion.poll_device_op() {
                mirrors[op.nsid as usize - 1].submit(op);
                submitted += 1;
            }
            submitted
        },
        |promotion, completion| promotion.handle_device_completion(completion),
        |promotion| promotion.is_done(),
    );
    let (report, _ring) = promotion.finish().map_err(|e| format!("promote: {e}"))?;
    println!(
        "nvmirror promote: {} log entries ({} bytes) newer than CP {} replayed onto the mirror; epoch is now {}",
        report.entries_replayed, report.bytes_replayed, report.cp_completed, report.epoch
    );
    Ok(())
}
