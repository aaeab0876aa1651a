//! A node's metadata file (engine `metadata`: generations and the dirty bitmap) on the node's own
//! persistent storage: read and, the first time, formatted with random ids at start (start-up
//! may block), then served to the engine through the same device layer as the namespaces
//! (`open_file_namespace`: io_uring with O_DIRECT, a worker thread otherwise), so no blocking
//! call happens on a reactor after start (invariant 8).
//!
//! An advisory lock (`flock`) keeps a second process off the file: two nodes sharing one
//! metadata file would share one identity, and their handshake could not tell them apart.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nvmirror_engine::generation::Hex;
use nvmirror_engine::metadata::{MetadataError, NodeMetadata, OpenReport};

use crate::bdev::{open_file_namespace, NamespaceDevice};

/// Metadata ops in flight on the file at most (a batch's page writes and its flush).
pub const METADATA_QUEUE_DEPTH: u32 =
    nvmirror_engine::metadata::METADATA_WRITES_INFLIGHT_MAX as u32 + 1;

/// An opened metadata file.
pub struct MetadataFile {
    pub metadata: NodeMetadata,
    /// The file as a device for the engine's metadata ops; it holds the advisory lock, so the
    /// lock lasts as long as the node keeps its device (callers move `metadata` and `device`
    /// out and drop the rest).
    pub device: Box<dyn NamespaceDevice>,
    pub path: PathBuf,
    /// Created and formatted by this start.
    pub formatted: bool,
    pub report: Option<OpenReport>,
}

/// The metadata file's device together with the `flock`ed descriptor that keeps other
/// processes off the file.
struct LockedDevice {
    device: Box<dyn NamespaceDevice>,
    _lock: File,
}

impl nvmirror_engine::device::BlockDevice for LockedDevice {
    fn size_bytes(&self) -> u64 {
        self.device.size_bytes()
    }
    fn submit(&mut self, op: nvmirror_engine::device::DeviceOp<'_>) {
        self.device.submit(op)
    }
    fn poll_completions(
        &mut self,
        complete: &mut dyn FnMut(nvmirror_engine::device::DeviceCompletion<'_>),
    ) -> usize {
        self.device.poll_completions(complete)
    }
    fn read_now(
        &mut self,
        offset_bytes: u64,
        buf: &mut [u8],
    ) -> Option<Result<(), nvmirror_engine::device::DeviceError>> {
        self.device.read_now(offset_bytes, buf)
    }
    fn can_read_now(&self) -> bool {
        self.device.can_read_now()
    }
    fn inflight_count(&self) -> usize {
        self.device.inflight_count()
    }
}

impl NamespaceDevice for LockedDevice {
    fn doorbell(&self) -> Option<std::sync::Arc<dyn crate::reactor::Doorbell>> {
        self.device.doorbell()
    }
    fn next_deadline_us(&self) -> Option<u64> {
        self.device.next_deadline_us()
    }
}

/// A random non-zero u64 from the kernel (node ids, generations).
pub fn random_nonzero_u64() -> io::Result<u64> {
    let mut urandom = File::open("/dev/urandom")?;
    loop {
        let mut bytes = [0u8; 8];
        urandom.read_exact(&mut bytes)?;
        let value = u64::from_le_bytes(bytes);
        if value != 0 {
            return Ok(value);
        }
    }
}

fn lock_exclusive(file: &File, path: &Path) -> Result<(), String> {
    // SAFETY: flock on a descriptor this function's caller owns and keeps open; no memory is
    // passed to the kernel.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    Err(if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        format!(
            "metadata file {} is in use by another nvmirror process (each node needs its own metadata_path)",
            path.display()
        )
    } else {
        format!("metadata file {}: lock: {error}", path.display())
    })
}

/// Opens the metadata of `volume_id` at `path` for namespaces of `sizes_bytes`, formatting it
/// (new random node id and proposed generation) when the file does not exist or is empty.
pub fn open_metadata_file(
    path: &Path,
    volume_id: [u8; 16],
    volume_name: &str,
    sizes_bytes: &[u64],
    bitmap_extent_bytes: u64,
) -> Result<MetadataFile, String> {
    let at = |e: &dyn std::fmt::Display| format!("metadata file {}: {e}", path.display());
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| at(&e))?;
        if crate::hugepages::is_hugetlbfs(dir).unwrap_or(false) {
            return Err(at(
                &"on a hugetlbfs mount, which a reboot empties: the metadata must \
                 live on the node's persistent storage (set metadata_path)",
            ));
        }
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| at(&e))?;
    lock_exclusive(&file, path)?;
    let mut image = Vec::new();
    file.read_to_end(&mut image).map_err(|e| at(&e))?;
    let (metadata, formatted, report) = if image.is_empty() {
        let node_id = random_nonzero_u64().map_err(|e| at(&e))?;
        let proposed = random_nonzero_u64().map_err(|e| at(&e))?;
        let metadata = NodeMetadata::format(
            volume_id,
            node_id,
            proposed,
            sizes_bytes,
            bitmap_extent_bytes,
        )
        .map_err(|e| at(&e))?;
        file.write_all(&metadata.image()).map_err(|e| at(&e))?;
        file.sync_all().map_err(|e| at(&e))?;
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| at(&e))?;
        }
        log::info!(
            "metadata {}: formatted: node id {}, no data yet (generation 0)",
            path.display(),
            Hex(node_id)
        );
        (metadata, true, None)
    } else {
        let (metadata, report) =
            NodeMetadata::open(&image, volume_id, sizes_bytes).map_err(|error| match error {
                MetadataError::OtherVolume { .. } => format!(
                    "metadata file {} belongs to another volume, not '{volume_name}' ({error}); \
                     refusing to start: point metadata_path at this volume's file",
                    path.display()
                ),
                other => at(&other),
            })?;
        if metadata.extent_bytes() != bitmap_extent_bytes {
            log::warn!(
                "metadata {}: its bitmap counts {} B extents; bitmap_extent_bytes = {} applies only to a new file",
                path.display(),
                metadata.extent_bytes(),
                bitmap_extent_bytes
            );
        }
        let generations = metadata.generations();
        log::info!(
            "metadata {}: node id {}, generation {}, history {:?}, {} extents marked{}",
            path.display(),
            Hex(generations.node_id),
            Hex(generations.current),
            generations
                .history
                .iter()
                .take_while(|&&g| g != 0)
                .map(|&g| Hex(g).to_string())
                .collect::<Vec<_>>(),
            report.extents_marked,
            if report.pages_damaged > 0 {
                format!(
                    " ({} damaged bitmap pages taken as all changed)",
                    report.pages_damaged
                )
            } else {
                String::new()
            }
        );
        (metadata, false, Some(report))
    };
    let device =
        open_file_namespace(path, None, false, METADATA_QUEUE_DEPTH).map_err(|e| at(&e))?;
    Ok(MetadataFile {
        metadata,
        device: Box::new(LockedDevice {
            device,
            _lock: file,
        }),
        path: path.to_path_buf(),
        formatted,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring_memory::scratch::ScratchDir;

    const VOLUME: [u8; 16] = [4; 16];

    #[test]
    fn formats_once_reopens_and_refuses_another_volume_and_a_second_opener() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "metadata-file");
        let path = dir.path().join("node.meta");
        let sizes = [8 << 20];
        let first = open_metadata_file(&path, VOLUME, "v", &sizes, 64 << 10).unwrap();
        assert!(first.formatted);
        let node_id = first.metadata.generations().node_id;
        let second = open_metadata_file(&path, VOLUME, "v", &sizes, 64 << 10);
        assert!(
            second.as_ref().err().unwrap().contains("in use by another"),
            "{:?}",
            second.err()
        );
        // What a node keeps (the engine takes the metadata, the reactor the device) keeps the
        // lock: found when every caller dropped the rest and a second process opened the file.
        let MetadataFile {
            metadata, device, ..
        } = first;
        drop(metadata);
        let second = open_metadata_file(&path, VOLUME, "v", &sizes, 64 << 10);
        assert!(
            second.as_ref().err().unwrap().contains("in use by another"),
            "{:?}",
            second.err()
        );
        drop(device);
        let again = open_metadata_file(&path, VOLUME, "v", &sizes, 64 << 10).unwrap();
        assert!(!again.formatted);
        assert_eq!(again.metadata.generations().node_id, node_id);
        drop(again);
        let other = open_metadata_file(&path, [5; 16], "other", &sizes, 64 << 10)
            .err()
            .unwrap();
        assert!(
            other.contains("belongs to another volume, not 'other'"),
            "{other}"
        );
    }
}
