//! Hugepage facts the runtime asks before it places memory: is a directory on hugetlbfs, where is
//! hugetlbfs mounted, and how many 2 MiB pages can still be had. The NVRAM ring (claims 8, 10, 17:
//! the log that survives a process crash) and the malloc block device live on these pages when the
//! host reserved them with `hugepages.sh`; every caller has a regular-memory fallback.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The hugepage size the runtime uses (x86-64 and aarch64 default; what `hugepages.sh` reserves).
pub const HUGEPAGE_SIZE_BYTES: u64 = 2 << 20;
/// Where `hugepages.sh` mounts hugetlbfs when none is mounted.
pub const HUGETLBFS_MOUNT_DEFAULT: &str = "/dev/hugepages";

const SYSFS_2M_DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

const _: () = assert!(HUGEPAGE_SIZE_BYTES.is_power_of_two());

/// `size_bytes` rounded up to a whole number of hugepages (hugetlbfs files and mappings come in
/// whole pages).
pub fn round_up_to_hugepage(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(HUGEPAGE_SIZE_BYTES) * HUGEPAGE_SIZE_BYTES
}

/// 2 MiB pages that a new mapping can still get: free pages minus those already promised to
/// existing mappings. 0 when the kernel has no hugepage support or nothing is reserved.
pub fn available_hugepages() -> u64 {
    let read = |name: &str| -> u64 {
        fs::read_to_string(Path::new(SYSFS_2M_DIR).join(name))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

/// Whether `path` lives on a hugetlbfs mount (statfs `f_type == HUGETLBFS_MAGIC`).
pub fn is_hugetlbfs(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string alive for the call and `stat` points to writable
    // memory of the size statfs(2) fills; we read it only after a 0 return.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it initialised the whole struct.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_type == libc::HUGETLBFS_MAGIC)
}

/// The first hugetlbfs mount point listed in /proc/mounts, if any.
pub fn hugetlbfs_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let mount_point = fields.nth(1)?;
        (fields.next()? == "hugetlbfs").then(|| PathBuf::from(mount_point))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_to_whole_hugepages() {
        assert_eq!(round_up_to_hugepage(1), HUGEPAGE_SIZE_BYTES);
        assert_eq!(
            round_up_to_hugepage(HUGEPAGE_SIZE_BYTES),
            HUGEPAGE_SIZE_BYTES
        );
        assert_eq!(
            round_up_to_hugepage(HUGEPAGE_SIZE_BYTES + 1),
            2 * HUGEPAGE_SIZE_BYTES
        );
        assert_eq!(round_up_to_hugepage(0), 0);
    }

    #[test]
    fn regular_directory_is_not_hugetlbfs() {
        assert!(!is_hugetlbfs(&std::env::temp_dir()).unwrap());
        assert!(is_hugetlbfs(Path::new("/nonexistent/nvmirror")).is_err());
    }

    #[test]
    fn listed_mount_is_hugetlbfs() {
        match hugetlbfs_mount() {
            Some(mount) => assert!(is_hugetlbfs(&mount).unwrap(), "{}", mount.display()),
            None => eprintln!("skipped: no hugetlbfs mounted (run hugepages.sh)"),
        }
    }
}
