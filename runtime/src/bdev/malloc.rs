//! A namespace in memory, like SPDK's malloc bdev: the fastest backing store, for benchmarks and
//! tests. Memory comes from 2 MiB hugepages (anonymous `MAP_HUGETLB`) when the size is a whole
//! number of hugepages and enough are free, else from regular pages with a warning. Reads and
//! writes are memcpy; flush has nothing to do because memory is the medium.

use std::io;

use memmap2::{MmapMut, MmapOptions};

use super::{check_range, check_size, SyncIo};
use crate::hugepages::{available_hugepages, HUGEPAGE_SIZE_BYTES};

/// Which memory a [`MallocDevice`] lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MallocBacking {
    /// Anonymous 2 MiB hugepages, reserved at creation.
    Hugepages,
    /// Regular anonymous pages.
    RegularPages,
}

/// A zero-filled in-memory block device of a fixed size, populated at creation (no page faults on
/// the I/O path).
#[derive(Debug)]
pub struct MallocDevice {
    memory: MmapMut,
    backing: MallocBacking,
    /// Streamed writes not ordered yet ([`SyncIo::order_writes`]).
    unordered_writes: bool,
}

impl MallocDevice {
    /// Allocates `size_bytes` (a non-zero multiple of the sector size) of zeroed memory.
    pub fn new(size_bytes: u64) -> io::Result<MallocDevice> {
        check_size(size_bytes)?;
        let length_bytes = usize::try_from(size_bytes).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("malloc size {size_bytes} does not fit in memory"),
            )
        })?;
        let whole_hugepages = size_bytes.is_multiple_of(HUGEPAGE_SIZE_BYTES);
        let pages_needed = size_bytes / HUGEPAGE_SIZE_BYTES;
        let reason = if !whole_hugepages {
            "size is not a multiple of 2 MiB".to_string()
        } else if available_hugepages() < pages_needed {
            format!(
                "{pages_needed} hugepages needed, {} free",
                available_hugepages()
            )
        } else {
            match MmapOptions::new()
                .len(length_bytes)
                .huge(None)
                .populate()
                .map_anon()
            {
                Ok(memory) => {
                    return Ok(MallocDevice {
                        memory,
                        backing: MallocBacking::Hugepages,
                        unordered_writes: false,
                    })
                }
                Err(error) => format!("hugepage mapping failed ({error})"),
            }
        };
        log::warn!("malloc device of {size_bytes} bytes uses regular pages: {reason}");
        let memory = MmapOptions::new().len(length_bytes).populate().map_anon()?;
        Ok(MallocDevice {
            memory,
            backing: MallocBacking::RegularPages,
            unordered_writes: false,
        })
    }

    /// Which memory the device lives in.
    pub fn backing(&self) -> MallocBacking {
        self.backing
    }
}

impl SyncIo for MallocDevice {
    fn size_bytes(&self) -> u64 {
        self.memory.len() as u64
    }

    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset_bytes, buf.len(), self.size_bytes())?;
        let start = offset_bytes as usize;
        buf.copy_from_slice(&self.memory[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        check_range(offset_bytes, data.len(), self.size_bytes())?;
        let start = offset_bytes as usize;
        crate::stream::stream_copy_unfenced(&mut self.memory[start..start + data.len()], data);
        self.unordered_writes = true;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.order_writes();
        Ok(())
    }

    fn order_writes(&mut self) {
        if self.unordered_writes {
            crate::stream::store_fence();
            self.unordered_writes = false;
        }
    }

    fn memory(&self) -> Option<&[u8]> {
        Some(&self.memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(length_bytes: usize, seed: u8) -> Vec<u8> {
        (0..length_bytes)
            .map(|index| (index as u8).wrapping_mul(13) ^ seed)
            .collect()
    }

    #[test]
    fn round_trip_and_zero_fill() {
        let mut device = MallocDevice::new(64 * 1024).unwrap();
        assert_eq!(device.size_bytes(), 64 * 1024);
        let data = pattern(8192, 0x5a);
        device.write_at(4096, &data).unwrap();
        let mut read = vec![0xff; 8192 + 1024];
        device.read_at(3584, &mut read).unwrap();
        assert!(read[..512].iter().all(|byte| *byte == 0));
        assert_eq!(&read[512..512 + 8192], &data[..]);
        assert!(read[512 + 8192..].iter().all(|byte| *byte == 0));
        device.flush().unwrap();
    }

    #[test]
    fn out_of_range_is_invalid_input_and_changes_nothing() {
        let mut device = MallocDevice::new(8192).unwrap();
        let error = device.write_at(7680, &[1; 1024]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("past the device end"), "{error}");
        assert!(device.read_at(8192, &mut [0; 512]).is_err());
        let mut last = [0xff; 512];
        device.read_at(7680, &mut last).unwrap();
        assert!(last.iter().all(|byte| *byte == 0));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert_eq!(
            MallocDevice::new(0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            MallocDevice::new(1000).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn uses_hugepages_exactly_when_the_size_allows_and_pages_are_free() {
        assert_eq!(
            MallocDevice::new(1 << 20).unwrap().backing(),
            MallocBacking::RegularPages
        );
        let expected = if available_hugepages() >= 1 {
            MallocBacking::Hugepages
        } else {
            MallocBacking::RegularPages
        };
        let mut device = MallocDevice::new(HUGEPAGE_SIZE_BYTES).unwrap();
        assert_eq!(device.backing(), expected);
        let data = pattern(4096, 1);
        device.write_at(HUGEPAGE_SIZE_BYTES - 4096, &data).unwrap();
        let mut read = vec![0; 4096];
        device
            .read_at(HUGEPAGE_SIZE_BYTES - 4096, &mut read)
            .unwrap();
        assert_eq!(read, data);
    }
}
