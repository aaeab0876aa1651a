//! The memory under the NVRAM ring (claims 8, 10, 17: every write is a log entry before it is
//! forwarded): a shared, writable mapping of a ring file that outlives the process, the way NVRAM
//! outlives a controller reset. On hugetlbfs the file lives in reserved hugepages (no page faults
//! or TLB misses on the write path); otherwise it is a regular file, which survives a process crash
//! but not a power loss. The engine's `NvramRing<M>` takes a [`RingMemory`] as its `M`.
//!
//! Safety of the mapping: the ring file must not be truncated (SIGBUS) or written by another
//! process while it is mapped. [`RingMemory::open`] holds an exclusive `flock` on the file for
//! the mapping's lifetime, so a second nvmirror process cannot open the same ring; nothing else
//! may touch files in the ring directory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::{MmapMut, MmapOptions};

use crate::hugepages::{available_hugepages, is_hugetlbfs, round_up_to_hugepage};

/// Where a ring's memory came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingBacking {
    /// A file on hugetlbfs: survives a process crash, not a reboot.
    Hugepages,
    /// A regular file (no hugetlbfs, or no free hugepages): survives a process crash.
    RegularFile,
    /// Anonymous memory ([`RingMemory::anonymous`]): dies with the process.
    Anonymous,
}

/// A writable mapping holding one NVRAM ring; `as_ref()`/`as_mut()` are exactly `size_bytes` long.
#[derive(Debug)]
pub struct RingMemory {
    map: MmapMut,
    size_bytes: usize,
    backing: RingBacking,
    path: Option<PathBuf>,
    /// Holds the exclusive flock for as long as the mapping exists.
    _file: Option<File>,
}

impl RingMemory {
    /// Opens or creates the ring file `name`, in `dir` if `dir` is on hugetlbfs and the kernel
    /// grants the hugepages (the file is then rounded up to whole 2 MiB pages), else in `dir` when
    /// `dir` is a normal directory, else in `fallback_dir` with a warning. A ring file left by an
    /// earlier run is reused wherever it is (a fallback ring is preferred over creating a new empty
    /// hugepage ring, so a crash's log is never lost); an existing file of another size is an error.
    pub fn open(
        dir: &Path,
        fallback_dir: &Path,
        name: &str,
        size_bytes: u64,
    ) -> io::Result<(RingMemory, RingBacking)> {
        if size_bytes == 0 || name.is_empty() || name.contains('/') {
            return Err(invalid_input(format!(
                "ring file name {name:?} must be a plain non-empty name and size {size_bytes} non-zero"
            )));
        }
        let on_hugetlbfs = match is_hugetlbfs(dir) {
            Ok(on_hugetlbfs) => on_hugetlbfs,
            // No hugetlbfs mounted there (hugepages.sh mounts it): the fallback, as for no free pages.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                log::warn!(
                    "{} is missing (no hugetlbfs mounted there): ring at {} is a regular file; \
                     it survives a process crash but not a power loss",
                    dir.display(),
                    fallback_dir.join(name).display()
                );
                let ring = Self::map_file(
                    &fallback_dir.join(name),
                    size_bytes,
                    size_bytes,
                    RingBacking::RegularFile,
                )?;
                return Ok((ring, RingBacking::RegularFile));
            }
            Err(error) => return Err(with_path(dir, error)),
        };
        if !on_hugetlbfs {
            let ring = Self::map_file(
                &dir.join(name),
                size_bytes,
                size_bytes,
                RingBacking::RegularFile,
            )?;
            return Ok((ring, RingBacking::RegularFile));
        }
        let hugepage_path = dir.join(name);
        let fallback_path = fallback_dir.join(name);
        let file_bytes = round_up_to_hugepage(size_bytes);
        if hugepage_path.exists() {
            let ring = Self::map_file(
                &hugepage_path,
                file_bytes,
                size_bytes,
                RingBacking::Hugepages,
            )?;
            return Ok((ring, RingBacking::Hugepages));
        }
        let reason = if fallback_path.exists() {
            "a ring from an earlier run is there".to_string()
        } else {
            // The kernel reserves the file's hugepages at mmap: too few free fails here, never
            // later with SIGBUS on a write.
            match Self::map_file(
                &hugepage_path,
                file_bytes,
                size_bytes,
                RingBacking::Hugepages,
            ) {
                Ok(ring) => return Ok((ring, RingBacking::Hugepages)),
                Err(error) if is_out_of_hugepages(&error) => format!(
                    "no free hugepages in {} for {file_bytes} bytes ({} pages free)",
                    dir.display(),
                    available_hugepages()
                ),
                Err(error) => return Err(error),
            }
        };
        log::warn!(
            "{reason}: ring at {} is a regular file; it survives a process crash but not a power loss",
            fallback_path.display()
        );
        let ring = Self::map_file(
            &fallback_path,
            size_bytes,
            size_bytes,
            RingBacking::RegularFile,
        )?;
        Ok((ring, RingBacking::RegularFile))
    }

    /// A zeroed ring in anonymous memory, for tests and the simulation.
    pub fn anonymous(size_bytes: usize) -> io::Result<RingMemory> {
        assert!(size_bytes > 0, "an empty ring is a programmer error");
        Ok(RingMemory {
            map: MmapMut::map_anon(size_bytes)?,
            size_bytes,
            backing: RingBacking::Anonymous,
            path: None,
            _file: None,
        })
    }

    /// Where this ring's memory came from.
    pub fn backing(&self) -> RingBacking {
        self.backing
    }

    /// The ring file, or `None` for an anonymous ring.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Maps `path` (`file_bytes` long; created at that length if new) and exposes `size_bytes`.
    fn map_file(
        path: &Path,
        file_bytes: u64,
        size_bytes: u64,
        backing: RingBacking,
    ) -> io::Result<RingMemory> {
        assert!(size_bytes <= file_bytes);
        let size_bytes = usize::try_from(size_bytes)
            .map_err(|_| invalid_input(format!("ring size {size_bytes} does not fit in memory")))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|error| with_path(path, error))?;
        lock_exclusive(&file).map_err(|error| with_path(path, error))?;
        let existing_bytes = file.metadata()?.len();
        let created = existing_bytes == 0;
        if created {
            file.set_len(file_bytes)
                .map_err(|error| with_path(path, error))?;
        } else if existing_bytes != file_bytes {
            return Err(invalid_input(format!(
                "ring file {} is {existing_bytes} bytes but {file_bytes} were asked for; \
                 a ring is never truncated: move it away or ask for its size",
                path.display()
            )));
        }
        let mut options = MmapOptions::new();
        if backing == RingBacking::Hugepages {
            options.populate();
        }
        // SAFETY: the file is open read-write, `file_bytes` long and exclusively flock'ed by us for
        // the mapping's lifetime (held in `_file`); the module contract forbids anyone else from
        // truncating or writing it, so the mapping stays valid and unaliased.
        let map = unsafe { options.map_mut(&file) };
        let map = match map {
            Ok(map) => map,
            Err(error) => {
                if created {
                    // Best effort: a new empty ring file left behind would hold hugepages.
                    let _ = fs::remove_file(path);
                }
                return Err(with_path(path, error));
            }
        };
        assert_eq!(map.len() as u64, file_bytes);
        Ok(RingMemory {
            map,
            size_bytes,
            backing,
            path: Some(path.to_path_buf()),
            _file: Some(file),
        })
    }
}

impl AsRef<[u8]> for RingMemory {
    fn as_ref(&self) -> &[u8] {
        &self.map[..self.size_bytes]
    }
}

impl AsMut<[u8]> for RingMemory {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.map[..self.size_bytes]
    }
}

fn lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock(2) on a file descriptor we own; it touches no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.kind() == io::ErrorKind::WouldBlock {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "ring file is in use by another process",
        ));
    }
    Err(error)
}

/// ENOMEM (too few free hugepages) or ENOSPC (the hugetlbfs mount's size limit).
fn is_out_of_hugepages(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::OutOfMemory | io::ErrorKind::StorageFull
    )
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn with_path(path: &Path, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// A uniquely named directory removed on drop, for this crate's tests.
#[cfg(test)]
pub(crate) mod scratch {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    pub(crate) struct ScratchDir(PathBuf);

    impl ScratchDir {
        /// A new directory under `parent` (which must exist).
        pub(crate) fn new(parent: &Path, label: &str) -> ScratchDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let unique = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = parent.join(format!(
                "nvmirror-test-{}-{label}-{unique}",
                std::process::id()
            ));
            std::fs::create_dir_all(&path).unwrap();
            ScratchDir(path)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::scratch::ScratchDir;
    use super::*;
    use crate::hugepages::{hugetlbfs_mount, HUGEPAGE_SIZE_BYTES};

    const SIZE_BYTES: u64 = 1 << 20;

    fn fill(ring: &mut RingMemory, seed: u8) {
        for (index, byte) in ring.as_mut().iter_mut().enumerate() {
            *byte = (index as u8).wrapping_mul(31).wrapping_add(seed);
        }
    }

    fn matches(ring: &RingMemory, seed: u8) -> bool {
        let bytes = ring.as_ref();
        bytes
            .iter()
            .enumerate()
            .all(|(index, byte)| *byte == (index as u8).wrapping_mul(31).wrapping_add(seed))
    }

    #[test]
    fn regular_file_ring_survives_reopen() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "ring");
        let (mut ring, backing) =
            RingMemory::open(dir.path(), dir.path(), "ring0", SIZE_BYTES).unwrap();
        assert_eq!(backing, RingBacking::RegularFile);
        assert_eq!(ring.as_ref().len() as u64, SIZE_BYTES);
        assert!(ring.as_ref().iter().all(|byte| *byte == 0));
        fill(&mut ring, 7);
        drop(ring);
        let (ring, _) = RingMemory::open(dir.path(), dir.path(), "ring0", SIZE_BYTES).unwrap();
        assert!(matches(&ring, 7));
        assert_eq!(ring.path(), Some(dir.path().join("ring0").as_path()));
    }

    #[test]
    fn a_missing_hugepage_dir_falls_back_to_a_regular_file() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "ring");
        let missing = dir.path().join("no-hugetlbfs-here");
        let (ring, backing) = RingMemory::open(&missing, dir.path(), "ring0", SIZE_BYTES).unwrap();
        assert_eq!(backing, RingBacking::RegularFile);
        assert_eq!(ring.path(), Some(dir.path().join("ring0").as_path()));
        assert!(!missing.exists());
    }

    #[test]
    fn size_mismatch_is_an_error_naming_both_sizes() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "ring");
        drop(RingMemory::open(dir.path(), dir.path(), "ring0", SIZE_BYTES).unwrap());
        let error = RingMemory::open(dir.path(), dir.path(), "ring0", 2 * SIZE_BYTES).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        let message = error.to_string();
        assert!(
            message.contains("ring0") && message.contains(&SIZE_BYTES.to_string()),
            "{message}"
        );
        assert!(message.contains(&(2 * SIZE_BYTES).to_string()), "{message}");
        assert_eq!(
            fs::metadata(dir.path().join("ring0")).unwrap().len(),
            SIZE_BYTES
        );
    }

    #[test]
    fn second_open_while_mapped_is_refused() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "ring");
        let _first = RingMemory::open(dir.path(), dir.path(), "ring0", SIZE_BYTES).unwrap();
        let error = RingMemory::open(dir.path(), dir.path(), "ring0", SIZE_BYTES).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock, "{error}");
    }

    #[test]
    fn anonymous_ring_is_zeroed_and_writable() {
        let mut ring = RingMemory::anonymous(4096).unwrap();
        assert_eq!(ring.backing(), RingBacking::Anonymous);
        assert!(ring.path().is_none());
        fill(&mut ring, 3);
        assert!(matches(&ring, 3));
    }

    #[test]
    fn hugetlbfs_ring_survives_reopen() {
        let Some(mount) = hugetlbfs_mount() else {
            eprintln!("skipped: no hugetlbfs mounted (run hugepages.sh)");
            return;
        };
        if available_hugepages() == 0 {
            eprintln!("skipped: no free hugepages in {}", mount.display());
            return;
        }
        let fallback = ScratchDir::new(&std::env::temp_dir(), "ring-fallback");
        let name = format!("nvmirror-test-ring-{}", std::process::id());
        let (mut ring, backing) =
            RingMemory::open(&mount, fallback.path(), &name, SIZE_BYTES).unwrap();
        assert_eq!(backing, RingBacking::Hugepages);
        assert_eq!(ring.as_ref().len() as u64, SIZE_BYTES);
        assert_eq!(
            fs::metadata(mount.join(&name)).unwrap().len(),
            HUGEPAGE_SIZE_BYTES
        );
        fill(&mut ring, 11);
        drop(ring);
        let reopened = RingMemory::open(&mount, fallback.path(), &name, SIZE_BYTES);
        fs::remove_file(mount.join(&name)).unwrap();
        let (ring, backing) = reopened.unwrap();
        assert_eq!(backing, RingBacking::Hugepages);
        assert!(matches(&ring, 11));
    }

    #[test]
    fn full_hugetlbfs_falls_back_to_a_regular_file() {
        let Some(mount) = hugetlbfs_mount() else {
            eprintln!("skipped: no hugetlbfs mounted (run hugepages.sh)");
            return;
        };
        let fallback = ScratchDir::new(&std::env::temp_dir(), "ring-fallback");
        let name = format!("nvmirror-test-full-{}", std::process::id());
        // More pages than are free: a sparse regular file of that size costs nothing.
        let size_bytes = (available_hugepages() + 64) * HUGEPAGE_SIZE_BYTES;
        let (mut ring, backing) =
            RingMemory::open(&mount, fallback.path(), &name, size_bytes).unwrap();
        assert_eq!(backing, RingBacking::RegularFile);
        assert_eq!(ring.path(), Some(fallback.path().join(&name).as_path()));
        assert!(!mount.join(&name).exists());
        ring.as_mut()[..4].copy_from_slice(b"ring");
        drop(ring);
        let (ring, backing) = RingMemory::open(&mount, fallback.path(), &name, size_bytes).unwrap();
        assert_eq!(backing, RingBacking::RegularFile);
        assert_eq!(&ring.as_ref()[..4], b"ring");
    }

    #[test]
    fn earlier_fallback_ring_wins_over_a_new_hugepage_ring() {
        let Some(mount) = hugetlbfs_mount() else {
            eprintln!("skipped: no hugetlbfs mounted (run hugepages.sh)");
            return;
        };
        let fallback = ScratchDir::new(&std::env::temp_dir(), "ring-fallback");
        let name = format!("nvmirror-test-earlier-{}", std::process::id());
        let (mut ring, _) =
            RingMemory::open(fallback.path(), fallback.path(), &name, SIZE_BYTES).unwrap();
        fill(&mut ring, 5);
        drop(ring);
        let (ring, backing) = RingMemory::open(&mount, fallback.path(), &name, SIZE_BYTES).unwrap();
        assert_eq!(backing, RingBacking::RegularFile);
        assert!(matches(&ring, 5));
        assert!(!mount.join(&name).exists());
    }
}
