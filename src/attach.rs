//! Failback: a former source started as a destination (after its peer was promoted) is attached
//! as the new source's destination. Its primaries may hold writes the other side never saw (the
//! entries of its ring newer than its last completed CP: a write lands on the primary before its
//! transfer is acknowledged). Before it serves as a destination, the extents of those entries are
//! marked in its node metadata bitmap (durably) and its source ring is retired; in the resync
//! session its ResyncMarks hand them to the new source, which resyncs them with its own changes.
//! So only what differs travels, and nothing the old source wrote survives unmirrored.

use std::path::PathBuf;

use nvmirror_engine::metadata::NodeMetadata;
use nvmirror_engine::ring::NvramRing;
use nvmirror_runtime::bdev::NamespaceDevice;

use crate::config::{Config, Role};
use crate::setup::open_ring;
use nvmirror_engine::generation::FLAG_RAN_AS_SOURCE;

/// Where this node's source ring would be, if it ever ran as the volume's source.
fn former_source_rings(config: &Config) -> Vec<PathBuf> {
    let mut as_source = config.clone();
    as_source.role = Role::Source;
    let name = as_source.ring_file_name();
    match as_source.ring_placement() {
        Some((_, dir)) => vec![dir.join(&name)],
        None => vec![
            as_source.hugepage_dir.join(&name),
            as_source.fallback_dir.join(&name),
        ],
    }
}

/// Marks the extents of a former source ring's entries in `metadata` (made durable through
/// `device`), then removes that ring. Returns the number of entries marked.
pub fn attach_former_source(
    config: &Config,
    metadata: &mut NodeMetadata,
    device: &mut dyn NamespaceDevice,
) -> Result<usize, String> {
    // Only this node's own former ring: another node's source ring may share the directory.
    if metadata.generations().flags & FLAG_RAN_AS_SOURCE == 0 {
        return Ok(0);
    }
    let Some(path) = former_source_rings(config)
        .into_iter()
        .find(|path| path.exists())
    else {
        return Ok(0);
    };
    let mut as_source = config.clone();
    as_source.role = Role::Source;
    let memory = open_ring(&as_source)?;
    let (_, entries) = NvramRing::open(memory)
        .map_err(|e| format!("the former source ring {}: {e}", path.display()))?;
    let mut bytes = 0u64;
    for entry in &entries {
        let length = u64::from(entry.length_bytes).max(1);
        let _ = metadata.mark(entry.nsid, entry.lba, length);
        bytes += length;
    }
    persist(metadata, device)?;
    std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = metadata.set_flag(FLAG_RAN_AS_SOURCE, false);
    persist(metadata, device)?;
    log::warn!(
        "attach: this node was the volume's source: {} entries ({} KiB) of its ring {} may never \
         have reached the other side; their extents are marked for the resync and the ring is retired",
        entries.len(),
        bytes.div_ceil(1024),
        path.display()
    );
    Ok(entries.len())
}

/// A node opening as a source records it, so a later start as a destination attaches its ring.
pub fn note_running_as_source(
    metadata: &mut NodeMetadata,
    device: &mut dyn NamespaceDevice,
) -> Result<(), String> {
    if metadata.generations().flags & FLAG_RAN_AS_SOURCE == 0 {
        let _ = metadata.set_flag(FLAG_RAN_AS_SOURCE, true);
        persist(metadata, device)?;
    }
    Ok(())
}

/// Writes `metadata`'s changes through `device` and waits until they are durable (start-up and
/// offline commands only: nothing is served meanwhile).
pub fn persist(
    metadata: &mut NodeMetadata,
    device: &mut dyn NamespaceDevice,
) -> Result<(), String> {
    while !metadata.is_durable() {
        let mut work = 0;
        while let Some(op) = metadata.poll_device_op() {
            device.submit(op);
            work += 1;
        }
        work += device.poll_completions(&mut |c| metadata.handle_device_completion(c));
        if work == 0 {
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        if let (faults, Some(error)) = metadata.faults() {
            if faults > 100 {
                return Err(format!("metadata writes fail: {error}"));
            }
        }
    }
    Ok(())
}

/// `nvmirror discard-changes --config FILE`: after a split brain, the operator gives up this
/// (stopped) node's changes: its metadata forgets its generations and bitmap, so when it is next
/// attached as a destination the handshake gives it a full sync from the other side.
/// Returns what it did, in a sentence.
pub fn discard_changes(config: &Config) -> Result<String, String> {
    let devices = crate::setup::open_namespaces(config)?;
    let mut file = crate::setup::open_metadata(config, &devices)?;
    let before = *file.metadata.generations();
    let _ = file.metadata.discard_data();
    persist(&mut file.metadata, &mut *file.device)?;
    Ok(format!(
        "node {} forgot generation {} (history {:?}); it holds no data of \
         volume '{}' now and takes a full sync from its peer when next attached as a destination",
        nvmirror_engine::generation::Hex(before.node_id),
        nvmirror_engine::generation::Hex(before.current),
        before
            .history
            .iter()
            .filter(|&&g| g != 0)
            .map(|&g| nvmirror_engine::generation::Hex(g).to_string())
            .collect::<Vec<_>>(),
        config.volume
    ))
}
