//! The memory under the NVRAM ring (claims 8, 10, 17: every write is a log entry before it is
//! forwarded): a shared, writable mapping of a ring file, on one of three media that differ in what
//! an entry survives ([`RingMedium`]; the README's table "What an acknowledged or flushed write
//! survives" is the contract):
//!
//! | medium | a stored byte survives | [`RingMemory::persist`] makes it survive | how |
//! |---|---|---|---|
//! | hugetlbfs | a process crash (the NVRAM stand-in) | nothing more: a reboot loses it | no-op |
//! | regular file | a process crash (page cache) | power loss, as far as the disk keeps an fsync | `msync(MS_SYNC)` |
//! | DAX file, `MAP_SYNC` | a process crash | power loss | cache-line flush (`clflush` + `sfence`) |
//!
//! A Flush has work to do on every medium today ([`RingMedium::volatile_write_cache`]): on hugetlbfs
//! only a CP (primary and mirror written and flushed) makes acknowledged writes outlive a power loss;
//! on a file or DAX ring, persisting the ring's written bytes does.
//!
//! Safety of the mapping: the ring file must not be truncated (SIGBUS) or written by another
//! process while it is mapped. [`RingMemory::open`] holds an exclusive `flock` on the file for
//! the mapping's lifetime, so a second nvmirror process cannot open the same ring; nothing else
//! may touch files in the ring directory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use memmap2::{MmapMut, MmapOptions};

use crate::hugepages::{available_hugepages, is_hugetlbfs, round_up_to_hugepage};

/// The smallest cache line of the CPUs we run on: flushing in steps of it never skips a line.
pub const CACHE_LINE_BYTES: usize = 64;

const _: () = assert!(CACHE_LINE_BYTES.is_power_of_two());

/// What the ring's memory is, and so what an entry in it survives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingMedium {
    /// A file on hugetlbfs: survives a process crash, not a reboot or a power loss (the NVRAM
    /// stand-in: NVRAM outlives a controller reset). `persist` cannot add anything.
    Hugetlbfs,
    /// A regular file through the page cache: survives a process crash; survives a power loss
    /// once `persist` (msync) covered it.
    File,
    /// A file on a DAX file system (persistent memory) mapped with `MAP_SYNC`: survives a process
    /// crash; survives a power loss once `persist` flushed its cache lines.
    Dax,
    /// Anonymous memory ([`RingMemory::anonymous`]): dies with the process (tests, the simulation).
    Anonymous,
}

impl RingMedium {
    /// The configuration spelling (`ring_medium = "..."`).
    pub fn name(self) -> &'static str {
        match self {
            RingMedium::Hugetlbfs => "hugetlbfs",
            RingMedium::File => "file",
            RingMedium::Dax => "dax",
            RingMedium::Anonymous => "anonymous",
        }
    }

    /// Whether a byte stored in the ring is still there when the process restarts after a crash
    /// (kill -9), with nothing done beyond the store.
    pub fn survives_process_crash(self) -> bool {
        self != RingMedium::Anonymous
    }

    /// Whether [`RingMemory::persist`] makes bytes survive a power loss of this node.
    pub fn survives_power_loss(self) -> bool {
        matches!(self, RingMedium::File | RingMedium::Dax)
    }

    /// Whether the ring's content is lost at a power loss whatever is done to it (hugetlbfs and
    /// anonymous memory): acknowledged writes outlive a power loss of both nodes only through a
    /// CP, which writes and flushes the primary and mirror namespaces.
    pub fn is_volatile(self) -> bool {
        !self.survives_power_loss()
    }

    /// What Identify Controller's VWC (and the Volatile Write Cache feature) should report: whether
    /// a Flush has work to do before every write acknowledged ahead of it survives a power loss.
    /// `persisted_before_ack` says whether the engine persists each entry before it acknowledges
    /// the write; the engine does not today, so every medium needs the Flush (a CP on a volatile
    /// medium, `persist`/`sync_all` of the ring otherwise).
    pub fn volatile_write_cache(self, persisted_before_ack: bool) -> bool {
        !(persisted_before_ack && self.survives_power_loss())
    }
}

impl std::fmt::Display for RingMedium {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The ring's mapping: memmap2's for hugetlbfs, regular files and anonymous memory; our own for
/// `MAP_SYNC`, which memmap2 cannot ask for.
#[derive(Debug)]
enum Mapping {
    Shared(MmapMut),
    Sync(SyncMapping),
}

/// A `MAP_SHARED_VALIDATE | MAP_SYNC` mapping of a whole DAX file, unmapped on drop. With
/// `MAP_SYNC` the kernel keeps the file's block mapping durable before a write fault returns, so
/// flushing the CPU cache lines of a store is all that makes it survive a power loss.
#[derive(Debug)]
struct SyncMapping {
    pointer: NonNull<u8>,
    length_bytes: usize,
}

// SAFETY: the mapping is owned memory like a `MmapMut` (which is Send): no thread-local state,
// and `&mut` access goes through `RingMemory::as_mut`, so moving it to another thread is sound.
unsafe impl Send for SyncMapping {}

impl SyncMapping {
    /// Maps `length_bytes` of `file` with `MAP_SYNC`; `Unsupported` when the file is not on DAX.
    fn new(file: &File, length_bytes: usize) -> io::Result<SyncMapping> {
        assert!(length_bytes > 0);
        // SAFETY: a fresh mapping at an address the kernel picks, over a file we hold open
        // read-write and flock'ed (module contract: nobody truncates it); no existing memory is
        // touched, and the result is checked against MAP_FAILED before use.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
                file.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            let error = io::Error::last_os_error();
            // EOPNOTSUPP: not a DAX file; EINVAL: a kernel without MAP_SHARED_VALIDATE (< 4.15).
            return Err(match error.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("mmap with MAP_SYNC refused ({error})"),
                ),
                _ => error,
            });
        }
        let pointer = NonNull::new(address.cast::<u8>()).expect("mmap returned a null mapping");
        Ok(SyncMapping {
            pointer,
            length_bytes,
        })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `pointer` maps `length_bytes` readable bytes for as long as `self` lives, and
        // the returned borrow of `self` keeps it alive and unmutated.
        unsafe { std::slice::from_raw_parts(self.pointer.as_ptr(), self.length_bytes) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only borrow of the memory.
        unsafe { std::slice::from_raw_parts_mut(self.pointer.as_ptr(), self.length_bytes) }
    }
}

impl Drop for SyncMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no borrow of it can outlive `self`.
        let rc = unsafe { libc::munmap(self.pointer.as_ptr().cast(), self.length_bytes) };
        debug_assert_eq!(rc, 0, "munmap of the ring failed");
    }
}

impl Mapping {
    fn bytes(&self) -> &[u8] {
        match self {
            Mapping::Shared(map) => map,
            Mapping::Sync(map) => map.as_slice(),
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Mapping::Shared(map) => map,
            Mapping::Sync(map) => map.as_mut_slice(),
        }
    }
}

/// A writable mapping holding one NVRAM ring; `as_ref()`/`as_mut()` are exactly `size_bytes` long.
#[derive(Debug)]
pub struct RingMemory {
    map: Mapping,
    size_bytes: usize,
    medium: RingMedium,
    path: Option<PathBuf>,
    /// Holds the exclusive flock for as long as the mapping exists.
    _file: Option<File>,
}

impl RingMemory {
    /// The default placement (no `ring_medium` configured): opens or creates the ring file `name`,
    /// in `dir` if `dir` is on hugetlbfs and the kernel grants the hugepages (the file is then
    /// rounded up to whole 2 MiB pages), else in `dir` when `dir` is a normal directory, else in
    /// `fallback_dir` with a warning (also when `dir` is missing). A ring file left by an earlier
    /// run is reused wherever it is (a fallback ring is preferred over creating a new empty
    /// hugepage ring, so a crash's log is never lost); an existing file of another size is an error.
    pub fn open(
        dir: &Path,
        fallback_dir: &Path,
        name: &str,
        size_bytes: u64,
    ) -> io::Result<(RingMemory, RingMedium)> {
        check_name_and_size(name, size_bytes)?;
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
                let ring = Self::map_file(&fallback_dir.join(name), size_bytes, RingMedium::File)?;
                return Ok((ring, RingMedium::File));
            }
            Err(error) => return Err(with_path(dir, error)),
        };
        if !on_hugetlbfs {
            let ring = Self::map_file(&dir.join(name), size_bytes, RingMedium::File)?;
            return Ok((ring, RingMedium::File));
        }
        let hugepage_path = dir.join(name);
        let fallback_path = fallback_dir.join(name);
        if hugepage_path.exists() {
            let ring = Self::map_file(&hugepage_path, size_bytes, RingMedium::Hugetlbfs)?;
            return Ok((ring, RingMedium::Hugetlbfs));
        }
        let reason = if fallback_path.exists() {
            "a ring from an earlier run is there".to_string()
        } else {
            // The kernel reserves the file's hugepages at mmap: too few free fails here, never
            // later with SIGBUS on a write.
            match Self::map_file(&hugepage_path, size_bytes, RingMedium::Hugetlbfs) {
                Ok(ring) => return Ok((ring, RingMedium::Hugetlbfs)),
                Err(error) if is_out_of_hugepages(&error) => {
                    out_of_hugepages_reason(dir, size_bytes)
                }
                Err(error) => return Err(error),
            }
        };
        log::warn!(
            "{reason}: ring at {} is a regular file; it survives a process crash but not a power loss",
            fallback_path.display()
        );
        let ring = Self::map_file(&fallback_path, size_bytes, RingMedium::File)?;
        Ok((ring, RingMedium::File))
    }

    /// A configured medium (`ring_medium = ...`): opens or creates the ring file `name` in `dir`
    /// on exactly that medium, or refuses with the reason (no fallback: the medium was asked for
    /// for what it survives). `dir` must be a hugetlbfs mount for [`RingMedium::Hugetlbfs`], a
    /// directory elsewhere for [`RingMedium::File`], and on a file system mounted with `-o dax`
    /// over persistent memory for [`RingMedium::Dax`] (checked by mapping with `MAP_SYNC`).
    pub fn open_on(
        medium: RingMedium,
        dir: &Path,
        name: &str,
        size_bytes: u64,
    ) -> io::Result<RingMemory> {
        check_name_and_size(name, size_bytes)?;
        let path = dir.join(name);
        let on_hugetlbfs = is_hugetlbfs(dir).map_err(|error| with_path(dir, error))?;
        match medium {
            RingMedium::Hugetlbfs if !on_hugetlbfs => Err(invalid_input(format!(
                "{} is not a hugetlbfs mount (hugepages.sh mounts one at {})",
                dir.display(),
                crate::hugepages::HUGETLBFS_MOUNT_DEFAULT
            ))),
            RingMedium::Hugetlbfs => Self::map_file(&path, size_bytes, medium).map_err(|error| {
                if is_out_of_hugepages(&error) {
                    io::Error::new(error.kind(), out_of_hugepages_reason(dir, size_bytes))
                } else {
                    error
                }
            }),
            RingMedium::File | RingMedium::Dax if on_hugetlbfs => Err(invalid_input(format!(
                "{} is a hugetlbfs mount: a {medium} ring needs a directory on another file system",
                dir.display()
            ))),
            RingMedium::File | RingMedium::Dax => Self::map_file(&path, size_bytes, medium),
            RingMedium::Anonymous => Err(invalid_input(
                "an anonymous ring has no file: use RingMemory::anonymous".into(),
            )),
        }
    }

    /// A zeroed ring in anonymous memory, for tests and the simulation.
    pub fn anonymous(size_bytes: usize) -> io::Result<RingMemory> {
        assert!(size_bytes > 0, "an empty ring is a programmer error");
        Ok(RingMemory {
            map: Mapping::Shared(MmapMut::map_anon(size_bytes)?),
            size_bytes,
            medium: RingMedium::Anonymous,
            path: None,
            _file: None,
        })
    }

    /// What this ring's memory is, and so what its bytes survive.
    pub fn medium(&self) -> RingMedium {
        self.medium
    }

    /// The ring file, or `None` for an anonymous ring.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Makes ring bytes `offset_bytes .. offset_bytes + length_bytes` survive what the medium
    /// promises ([`RingMedium::survives_power_loss`]): `msync(MS_SYNC)` of the pages covering them
    /// on a regular file, a flush of their cache lines on DAX, nothing on hugetlbfs and anonymous
    /// memory (nothing can make those outlive a power loss: a CP does). Returns once done; an
    /// error means the bytes may not survive a power loss (the caller fails the Flush).
    pub fn persist(&self, offset_bytes: usize, length_bytes: usize) -> io::Result<()> {
        assert!(
            offset_bytes <= self.size_bytes && length_bytes <= self.size_bytes - offset_bytes,
            "persist of {length_bytes} bytes at {offset_bytes} outside a ring of {}",
            self.size_bytes
        );
        if length_bytes == 0 {
            return Ok(());
        }
        // Streamed stores ([`RingStore::store_streamed`]) may still sit in write-combining
        // buffers: ordered first, so the write-back or cache-line flush below covers them.
        crate::stream::store_fence();
        match (&self.map, self.medium) {
            (_, RingMedium::Hugetlbfs | RingMedium::Anonymous) => Ok(()),
            (Mapping::Shared(map), RingMedium::File) => map
                .flush_range(offset_bytes, length_bytes)
                .map_err(|error| self.with_own_path(error)),
            (Mapping::Sync(map), RingMedium::Dax) => {
                flush_cache_lines(&map.as_slice()[offset_bytes..offset_bytes + length_bytes])
                    .map_err(|error| self.with_own_path(error))
            }
            (map, medium) => unreachable!("a {medium} ring on a {map:?} mapping"),
        }
    }

    /// [`RingMemory::persist`] of the whole ring (what a Flush needs when it does not track the
    /// range written since the last one). On a regular file `msync` writes only the dirty pages.
    pub fn sync_all(&self) -> io::Result<()> {
        self.persist(0, self.size_bytes)
    }

    /// Maps `path` and exposes `size_bytes` of it. The file is `size_bytes` long, rounded up to
    /// whole hugepages on hugetlbfs; created at that length (and, on a medium that survives a power
    /// loss, made durable with its directory entry) when new.
    fn map_file(path: &Path, size_bytes: u64, medium: RingMedium) -> io::Result<RingMemory> {
        assert_ne!(medium, RingMedium::Anonymous);
        let file_bytes = match medium {
            RingMedium::Hugetlbfs => round_up_to_hugepage(size_bytes),
            _ => size_bytes,
        };
        assert!(size_bytes <= file_bytes);
        let size_bytes = usize::try_from(size_bytes)
            .map_err(|_| invalid_input(format!("ring size {size_bytes} does not fit in memory")))?;
        let (file, created) = open_ring_file(path, file_bytes, medium)?;
        let map = match medium {
            RingMedium::Dax => SyncMapping::new(&file, size_bytes).map(Mapping::Sync).map_err(|error| {
                if error.kind() == io::ErrorKind::Unsupported {
                    io::Error::new(
                        error.kind(),
                        format!(
                            "{error}: it is not on a file system mounted -o dax over persistent memory; \
                             a DAX ring needs one (or use ring_medium = \"file\")"
                        ),
                    )
                } else {
                    error
                }
            }),
            _ => {
                let mut options = MmapOptions::new();
                if medium == RingMedium::Hugetlbfs {
                    options.populate();
                }
                // SAFETY: the file is open read-write, `file_bytes` long and exclusively flock'ed by
                // us for the mapping's lifetime (held in `_file`); the module contract forbids
                // anyone else from truncating or writing it, so the mapping stays valid and unaliased.
                unsafe { options.map_mut(&file) }.map(Mapping::Shared)
            }
        };
        let map = match map {
            Ok(map) => map,
            Err(error) => {
                if created {
                    // Best effort: a new empty ring file left behind would hold hugepages (or be
                    // taken for a ring of an earlier run next time).
                    let _ = fs::remove_file(path);
                }
                return Err(with_path(path, error));
            }
        };
        assert!(map.bytes().len() >= size_bytes);
        Ok(RingMemory {
            map,
            size_bytes,
            medium,
            path: Some(path.to_path_buf()),
            _file: Some(file),
        })
    }

    fn with_own_path(&self, error: io::Error) -> io::Error {
        match &self.path {
            Some(path) => with_path(path, error),
            None => error,
        }
    }
}

impl AsRef<[u8]> for RingMemory {
    fn as_ref(&self) -> &[u8] {
        &self.map.bytes()[..self.size_bytes]
    }
}

impl nvmirror_engine::ring::RingStore for RingMemory {
    fn prefetch_for_write(&self, offset: usize) {
        let line = self.as_ref()[offset..].as_ptr();
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint with no memory-safety precondition (it never faults, and
        // `line` is inside the mapping anyway); SSE, which it needs, is part of x86_64.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.cast())
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = line;
    }

    fn store_streamed(&mut self, offset: usize, data: &[u8]) {
        crate::stream::stream_copy_unfenced(&mut self.as_mut()[offset..offset + data.len()], data);
    }

    fn fence_streamed(&self) {
        crate::stream::store_fence();
    }
}

impl AsMut<[u8]> for RingMemory {
    fn as_mut(&mut self) -> &mut [u8] {
        let size_bytes = self.size_bytes;
        &mut self.map.bytes_mut()[..size_bytes]
    }
}

/// Opens (creating at `file_bytes`) and flocks a ring file; returns it and whether it was created.
/// A new file on a medium that survives a power loss is fsync'ed with its directory, so its length
/// and name are durable before any entry is.
fn open_ring_file(path: &Path, file_bytes: u64, medium: RingMedium) -> io::Result<(File, bool)> {
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
        if medium.survives_power_loss() {
            file.sync_all().map_err(|error| with_path(path, error))?;
            if let Some(dir) = path.parent() {
                File::open(dir)
                    .and_then(|dir| dir.sync_all())
                    .map_err(|error| with_path(dir, error))?;
            }
        }
    } else if existing_bytes != file_bytes {
        return Err(invalid_input(format!(
            "ring file {} is {existing_bytes} bytes but {file_bytes} were asked for; \
             a ring is never truncated: move it away or ask for its size",
            path.display()
        )));
    }
    Ok((file, created))
}

/// Writes back every cache line of `bytes` to memory and waits for it (x86-64: `clflush` per
/// line, then `sfence`), so a store to a `MAP_SYNC` DAX mapping survives a power loss.
/// `clflushopt`/`clwb` would be cheaper; `clflush` is the one every x86-64 has.
#[cfg(target_arch = "x86_64")]
fn flush_cache_lines(bytes: &[u8]) -> io::Result<()> {
    use std::arch::x86_64::{_mm_clflush, _mm_sfence};
    let start = bytes.as_ptr() as usize & !(CACHE_LINE_BYTES - 1);
    let end = bytes.as_ptr() as usize + bytes.len();
    for line in (start..end).step_by(CACHE_LINE_BYTES) {
        // SAFETY: clflush only writes a cache line back; `line` is inside the mapping (it starts
        // at or before `bytes` on the same line, which is mapped as a whole page), and SSE2 is part
        // of the x86-64 baseline.
        unsafe { _mm_clflush(line as *const u8) };
    }
    // SAFETY: a store fence touches no memory; SSE is part of the x86-64 baseline.
    unsafe { _mm_sfence() };
    Ok(())
}

/// Elsewhere: `msync(MS_SYNC)`, which the kernel implements on DAX by flushing the CPU caches.
#[cfg(not(target_arch = "x86_64"))]
fn flush_cache_lines(bytes: &[u8]) -> io::Result<()> {
    let page_bytes = 4096usize;
    let start = bytes.as_ptr() as usize & !(page_bytes - 1);
    let end = bytes.as_ptr() as usize + bytes.len();
    // SAFETY: msync reads no memory through the pointer; the page-aligned range lies in the
    // mapping (it starts on the page of `bytes`, and mappings are whole pages).
    let rc = unsafe { libc::msync(start as *mut libc::c_void, end - start, libc::MS_SYNC) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn check_name_and_size(name: &str, size_bytes: u64) -> io::Result<()> {
    if size_bytes == 0 || name.is_empty() || name.contains('/') {
        return Err(invalid_input(format!(
            "ring file name {name:?} must be a plain non-empty name and size {size_bytes} non-zero"
        )));
    }
    Ok(())
}

fn out_of_hugepages_reason(dir: &Path, size_bytes: u64) -> String {
    format!(
        "no free hugepages in {} for {} bytes ({} pages free)",
        dir.display(),
        round_up_to_hugepage(size_bytes),
        available_hugepages()
    )
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
        assert_eq!(backing, RingMedium::File);
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
        assert_eq!(backing, RingMedium::File);
        assert_eq!(ring.path(), Some(dir.path().join("ring0").as_path()));
        assert!(!missing.exists());
    }

    #[test]
    fn media_say_what_they_survive() {
        use RingMedium::*;
        for medium in [Hugetlbfs, File, Dax] {
            assert!(medium.survives_process_crash(), "{medium}");
        }
        assert!(!Anonymous.survives_process_crash());
        assert!(File.survives_power_loss() && Dax.survives_power_loss());
        assert!(Hugetlbfs.is_volatile() && Anonymous.is_volatile());
        assert!(!File.is_volatile() && !Dax.is_volatile());
        // Without a persist before the ack, every Flush has work to do; with one, only the
        // volatile media still need the Flush's CP.
        for medium in [Hugetlbfs, File, Dax, Anonymous] {
            assert!(medium.volatile_write_cache(false), "{medium}");
        }
        assert!(Hugetlbfs.volatile_write_cache(true));
        assert!(!File.volatile_write_cache(true) && !Dax.volatile_write_cache(true));
    }

    /// Dirty (or under writeback) page-cache pages of `path` in `offset .. offset + length`
    /// (cachestat(2), Linux 6.5), or `None` where the kernel has no cachestat.
    fn dirty_pages(path: &Path, offset: u64, length: u64) -> Option<u64> {
        #[repr(C)]
        struct Range {
            offset: u64,
            length: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            cache: u64,
            dirty: u64,
            writeback: u64,
            evicted: u64,
            recently_evicted: u64,
        }
        const SYS_CACHESTAT: libc::c_long = 451; // the same on every architecture
        let file = File::open(path).unwrap();
        let range = Range { offset, length };
        let mut stat = Stat::default();
        // SAFETY: cachestat reads `range` and writes `stat`, both live, correctly laid out
        // (`#[repr(C)]`, the kernel's struct cachestat_range / cachestat) and not aliased.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Stat,
                0,
            )
        };
        (rc == 0).then_some(stat.dirty + stat.writeback)
    }

    #[test]
    fn persist_of_a_file_ring_writes_back_exactly_the_pages_asked_for() {
        const PAGE: usize = 4096;
        let dir = ScratchDir::new(&std::env::temp_dir(), "ring-persist");
        let ring = RingMemory::open_on(RingMedium::File, dir.path(), "ring0", SIZE_BYTES);
        let mut ring = ring.unwrap();
        assert_eq!(ring.medium(), RingMedium::File);
        let path = ring.path().unwrap().to_path_buf();
        ring.as_mut()[..8 * PAGE].fill(0xa5);
        match dirty_pages(&path, 0, 8 * PAGE as u64) {
            None => {
                eprintln!("skipped: no cachestat(2) in this kernel to see dirty pages");
                return;
            }
            Some(0) => {
                eprintln!(
                    "skipped: {} keeps no dirty pages (tmpfs?)",
                    dir.path().display()
                );
                return;
            }
            Some(dirty) => assert_eq!(dirty, 8),
        }
        // An unaligned range within pages 0..4: those pages are written back, the rest stay dirty.
        ring.persist(100, 4 * PAGE - 200).unwrap();
        assert_eq!(dirty_pages(&path, 0, 4 * PAGE as u64), Some(0));
        assert_eq!(
            dirty_pages(&path, 4 * PAGE as u64, 4 * PAGE as u64),
            Some(4)
        );
        ring.sync_all().unwrap();
        assert_eq!(dirty_pages(&path, 0, SIZE_BYTES), Some(0));
        // What was written back is what the file holds.
        let on_disk = fs::read(&path).unwrap();
        assert!(on_disk[..8 * PAGE].iter().all(|byte| *byte == 0xa5));
    }

    #[test]
    fn a_streamed_store_lands_as_a_plain_copy_would_aligned_or_not() {
        use nvmirror_engine::ring::RingStore;
        let mut ring = RingMemory::anonymous(3 * 4096).unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        // Aligned whole lanes (streamed), a sector at an odd 16-byte offset, an unaligned tail.
        ring.store_streamed(4096, &data);
        ring.store_streamed(16, &data[..512]);
        ring.store_streamed(2 * 4096 + 3, &data[..1001]);
        ring.fence_streamed();
        let bytes = ring.as_ref();
        assert_eq!(&bytes[4096..8192], &data[..]);
        assert_eq!(&bytes[16..528], &data[..512]);
        assert_eq!(&bytes[2 * 4096 + 3..2 * 4096 + 1004], &data[..1001]);
        assert!(bytes[..16].iter().all(|&byte| byte == 0));
        assert!(bytes[528..4096].iter().all(|&byte| byte == 0));
        assert!(bytes[2 * 4096 + 1004..].iter().all(|&byte| byte == 0));
    }

    #[test]
    fn persist_is_a_no_op_where_nothing_can_outlive_a_power_loss() {
        let mut ring = RingMemory::anonymous(4096).unwrap();
        ring.as_mut()[0] = 1;
        ring.persist(0, 4096).unwrap();
        ring.persist(4096, 0).unwrap();
        ring.sync_all().unwrap();
    }

    #[test]
    #[should_panic(expected = "outside a ring")]
    fn persist_outside_the_ring_is_a_programmer_error() {
        let ring = RingMemory::anonymous(4096).unwrap();
        let _ = ring.persist(4000, 97);
    }

    #[test]
    fn cache_lines_of_any_range_are_flushed() {
        let bytes = vec![7u8; 1000];
        for (start, end) in [(0, 1000), (1, 2), (63, 65), (500, 500), (999, 1000)] {
            flush_cache_lines(&bytes[start..end]).unwrap();
        }
    }

    #[test]
    fn a_dax_ring_on_a_file_system_without_dax_is_refused() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "ring-dax");
        let error = RingMemory::open_on(RingMedium::Dax, dir.path(), "ring0", SIZE_BYTES)
            .expect_err("the temporary directory is not on DAX");
        assert_eq!(error.kind(), io::ErrorKind::Unsupported, "{error}");
        let message = error.to_string();
        assert!(
            message.contains("MAP_SYNC") && message.contains("-o dax") && message.contains("ring0"),
            "{message}"
        );
        assert!(
            !dir.path().join("ring0").exists(),
            "a refused ring leaves no file"
        );
    }

    /// A directory on a file system mounted with DAX (`-o dax`, `dax=always`), if any.
    fn dax_mount() -> Option<PathBuf> {
        let mounts = fs::read_to_string("/proc/mounts").ok()?;
        mounts.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let options = fields.get(3)?;
            let dax = options
                .split(',')
                .any(|option| option == "dax" || option == "dax=always");
            dax.then(|| PathBuf::from(fields[1]))
        })
    }

    #[test]
    fn dax_ring_survives_reopen_and_persists() {
        let Some(mount) = dax_mount() else {
            eprintln!("skipped: no file system mounted with -o dax here (no persistent memory)");
            return;
        };
        let dir = ScratchDir::new(&mount, "ring-dax");
        let mut ring =
            RingMemory::open_on(RingMedium::Dax, dir.path(), "ring0", SIZE_BYTES).unwrap();
        assert_eq!(ring.medium(), RingMedium::Dax);
        fill(&mut ring, 13);
        ring.persist(3, 5000).unwrap();
        ring.sync_all().unwrap();
        drop(ring);
        let ring = RingMemory::open_on(RingMedium::Dax, dir.path(), "ring0", SIZE_BYTES).unwrap();
        assert!(matches(&ring, 13));
    }

    #[test]
    fn configured_media_refuse_the_wrong_directory() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "ring-medium");
        let error = RingMemory::open_on(RingMedium::Hugetlbfs, dir.path(), "ring0", SIZE_BYTES)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(
            error.to_string().contains("not a hugetlbfs mount"),
            "{error}"
        );
        assert!(!dir.path().join("ring0").exists());
        let missing = dir.path().join("missing");
        assert!(RingMemory::open_on(RingMedium::File, &missing, "ring0", SIZE_BYTES).is_err());
        if let Some(mount) = hugetlbfs_mount() {
            let error =
                RingMemory::open_on(RingMedium::File, &mount, "ring0", SIZE_BYTES).unwrap_err();
            assert!(
                error.to_string().contains("is a hugetlbfs mount"),
                "{error}"
            );
        }
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
        assert_eq!(ring.medium(), RingMedium::Anonymous);
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
        assert_eq!(backing, RingMedium::Hugetlbfs);
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
        assert_eq!(backing, RingMedium::Hugetlbfs);
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
        assert_eq!(backing, RingMedium::File);
        assert_eq!(ring.path(), Some(fallback.path().join(&name).as_path()));
        assert!(!mount.join(&name).exists());
        ring.as_mut()[..4].copy_from_slice(b"ring");
        drop(ring);
        let (ring, backing) = RingMemory::open(&mount, fallback.path(), &name, size_bytes).unwrap();
        assert_eq!(backing, RingMedium::File);
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
        assert_eq!(backing, RingMedium::File);
        assert!(matches(&ring, 5));
        assert!(!mount.join(&name).exists());
    }
}
