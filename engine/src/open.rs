//! Opening a side's ring, shared by the source, the destination and a promotion (engine spec
//! "Source::open", "Destination::open"): the namespace list a side starts with is checked, the
//! ring is opened (or formatted when it has no valid superblock) and must belong to the volume,
//! and the entries a crash left newer than the last completed CP are checked against the
//! namespaces before anything replays them.

use crate::device::check_extent;
use crate::error::EngineError;
use crate::geometry::{RingGeometry, BLOCK_SIZE, NAMESPACES_MAX};
use crate::ring::{EntryHeader, NvramRing, RingError, RingStore};

/// Checks the namespace list a side is started with.
pub(crate) fn check_namespaces(sizes_bytes: &[u64]) -> Result<(), EngineError> {
    if sizes_bytes.is_empty() || sizes_bytes.len() > NAMESPACES_MAX {
        return Err(EngineError::NamespaceCount(sizes_bytes.len()));
    }
    for (index, &size_bytes) in sizes_bytes.iter().enumerate() {
        if size_bytes == 0 || size_bytes % BLOCK_SIZE as u64 != 0 {
            return Err(EngineError::NamespaceSize {
                nsid: index as u32 + 1,
                size_bytes,
            });
        }
    }
    Ok(())
}

/// Opens the ring in `memory`, formatting it (epoch 1) when it has no valid superblock.
pub(crate) fn open_or_format<M: RingStore>(
    memory: M,
    volume_id: [u8; 16],
) -> Result<(NvramRing<M>, Vec<EntryHeader>, bool), EngineError> {
    let geometry =
        RingGeometry::for_ring_size(memory.as_ref().len() as u64).map_err(EngineError::Geometry)?;
    let (ring, entries, formatted) = match NvramRing::<M>::probe(memory.as_ref()) {
        Err(RingError::NoSuperblock) => {
            log::info!(
                "ring: no valid superblock, formatting {} bytes",
                geometry.ring_bytes
            );
            (
                NvramRing::format(memory, geometry, volume_id, 1),
                Vec::new(),
                true,
            )
        }
        Err(error) => return Err(EngineError::Ring(error)),
        Ok(_) => {
            let (ring, entries) = NvramRing::open(memory).map_err(EngineError::Ring)?;
            (ring, entries, false)
        }
    };
    if ring.superblock().volume_id != volume_id {
        return Err(EngineError::VolumeMismatch);
    }
    Ok((ring, entries, formatted))
}

/// Checks every entry to replay against the namespaces (what was checked on append is checked
/// again: a namespace that shrank, or went, since the entry was logged is a reported fault,
/// never a write out of range); returns the bytes the entries cover.
pub(crate) fn check_replay(
    sizes_bytes: &[u64],
    entries: &[EntryHeader],
) -> Result<u64, EngineError> {
    let mut bytes = 0;
    for header in entries {
        check_extent(
            sizes_bytes,
            header.nsid,
            header.offset_bytes(),
            u64::from(header.length_bytes),
        )
        .map_err(|_| EngineError::EntryOutOfRange {
            nsid: header.nsid,
            offset_bytes: header.offset_bytes(),
            length_bytes: header.length_bytes,
        })?;
        bytes += u64::from(header.length_bytes);
    }
    Ok(bytes)
}
