//! `nvmirror promote`: failover. A destination whose source is lost replays the log entries newer
//! than its last completed CP onto its mirror and takes a new generation (random, durable in its
//! metadata file before the log records the replay), so the stale former source, whose generation
//! is now in this node's history, is refused if it comes back (invariants 4 and 6).

use nvmirror_engine::device::BlockDevice;
use nvmirror_engine::generation::Hex;
use nvmirror_runtime::metadata_file::random_nonzero_u64;

use crate::config::{Config, Role};
use crate::setup;

/// How long `nvmirror promote` waits for a running destination to serve as the source.
pub const ONLINE_PROMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// `nvmirror promote --config FILE`: online when the destination runs (its management socket
/// answers: it stops taking the source, replays its log, takes a new generation and serves the
/// volume as its source, the same NQN and serial, so hosts reconnect), offline otherwise.
pub fn promote_command(config: &Config) -> Result<(), String> {
    if config.role != Role::Destination {
        return Err("promote takes a destination's config".into());
    }
    let socket = config.rpc_socket_path();
    if std::os::unix::net::UnixStream::connect(&socket).is_err() {
        return promote(config);
    }
    config.promoted_source()?;
    nvmirror_runtime::management::call(&socket, "nvmirror_promote", serde_json::Value::Null)?;
    println!("nvmirror promote: the running destination is being promoted");
    let started = std::time::Instant::now();
    let mut went_down = false;
    loop {
        std::thread::sleep(std::time::Duration::from_millis(50));
        match nvmirror_runtime::management::call(
            &socket,
            "nvmirror_get_status",
            serde_json::Value::Null,
        ) {
            Ok(status) => {
                let role = status["nodes"][0]["role"].as_str().unwrap_or("");
                if role == "source" {
                    println!("nvmirror promote: the node now serves the volume as its source");
                    return Ok(());
                }
                if went_down {
                    if let Some(error) = status["promote_error"].as_str() {
                        return Err(format!("promotion refused: {error}"));
                    }
                }
            }
            // The socket goes while the node changes roles.
            Err(_) => went_down = true,
        }
        if started.elapsed() > ONLINE_PROMOTE_TIMEOUT {
            return Err(format!(
                "the destination did not come back as a source within {} s (see its log)",
                ONLINE_PROMOTE_TIMEOUT.as_secs()
            ));
        }
    }
}

/// `nvmirror promote`, offline: the destination's failover step.
pub fn promote(config: &Config) -> Result<(), String> {
    if config.role != Role::Destination {
        return Err("promote takes a destination's config".into());
    }
    let (destination, mirrors, metadata_device) = setup::open_destination(config)?;
    let generation =
        random_nonzero_u64().map_err(|e| format!("promote: random generation: {e}"))?;
    let mut promotion = destination
        .promote(generation)
        .map_err(|e| format!("promote: {e}"))?;
    let (mut mirrors, mut metadata_device) = (mirrors, metadata_device);
    // Offline: this thread may wait on the devices.
    while !promotion.is_done() {
        let mut work = 0;
        while let Some(op) = promotion.poll_device_op() {
            mirrors[op.nsid as usize - 1].submit(op);
            work += 1;
        }
        while let Some(op) = promotion.poll_metadata_op() {
            metadata_device.submit(op);
            work += 1;
        }
        for mirror in mirrors.iter_mut() {
            work += mirror.poll_completions(&mut |c| promotion.handle_device_completion(c));
        }
        work += metadata_device.poll_completions(&mut |c| promotion.handle_metadata_completion(c));
        if work == 0 {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
    let (report, _ring, _metadata) = promotion.finish().map_err(|e| format!("promote: {e}"))?;
    println!(
        "nvmirror promote: {} log entries ({} bytes) newer than CP {} replayed onto the mirror; generation is now {} (was {})",
        report.entries_replayed,
        report.bytes_replayed,
        report.cp_completed,
        Hex(report.generation),
        Hex(report.previous_generation)
    );
    Ok(())
}
