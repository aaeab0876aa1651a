//! Block devices of the embedded runtime: the backing stores of the source's primary namespace and
//! the destination's mirror namespace (claims 1, 6, 9: the consistency point writes dirty blocks
//! to both). Each implements the engine's [`BlockDevice`](nvmirror_engine::device::BlockDevice):
//! [`MallocDevice`] keeps the namespace in (hugepage) memory like SPDK's malloc bdev,
//! [`FileDevice`] keeps it in a file or block device with O_DIRECT where the file system allows.

pub mod file;
pub mod malloc;

pub use file::FileDevice;
pub use malloc::{MallocBacking, MallocDevice};

use std::io;

use nvmirror_engine::geometry::SECTOR_SIZE;

/// Checks one I/O against the device: misaligned offsets or lengths break the `BlockDevice`
/// contract (programmer error); a range past the end is a command error the caller reports.
pub(crate) fn check_range(
    offset_bytes: u64,
    length_bytes: usize,
    size_bytes: u64,
) -> io::Result<()> {
    assert!(
        offset_bytes.is_multiple_of(SECTOR_SIZE as u64),
        "offset {offset_bytes} is not sector aligned"
    );
    assert!(
        length_bytes.is_multiple_of(SECTOR_SIZE),
        "length {length_bytes} is not a whole number of sectors"
    );
    let end_bytes = offset_bytes.checked_add(length_bytes as u64);
    match end_bytes {
        Some(end_bytes) if end_bytes <= size_bytes => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("I/O of {length_bytes} bytes at offset {offset_bytes} is past the device end ({size_bytes} bytes)"),
        )),
    }
}

/// Checks a device size given at start.
pub(crate) fn check_size(size_bytes: u64) -> io::Result<()> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_SIZE as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device size {size_bytes} must be a non-zero multiple of {SECTOR_SIZE} bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_check_accepts_the_last_sector_and_rejects_past_the_end() {
        assert!(check_range(0, 4096, 4096).is_ok());
        assert!(check_range(3584, 512, 4096).is_ok());
        assert_eq!(
            check_range(3584, 1024, 4096).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(check_range(4096, 0, 4096).is_ok());
        assert!(check_range(u64::MAX - 511, 1024, 4096).is_err());
    }

    #[test]
    #[should_panic(expected = "not sector aligned")]
    fn misaligned_offset_is_a_programmer_error() {
        let _ = check_range(100, 512, 4096);
    }

    #[test]
    fn sizes_must_be_whole_sectors() {
        assert!(check_size(512).is_ok());
        assert!(check_size(0).is_err());
        assert!(check_size(1000).is_err());
    }
}
