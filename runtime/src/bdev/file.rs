//! A namespace in a file or a block device. O_DIRECT where the file system allows, so the
//! consistency point's writes (claims 1, 9: dirty blocks to the primary and mirror namespaces)
//! bypass the page cache and `flush` (fdatasync) is the only durability step; buffered I/O
//! otherwise, with a log line. O_DIRECT needs aligned memory: a caller buffer that is not
//! [`DIRECT_ALIGN_BYTES`]-aligned goes through a bounce buffer allocated at open.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use nvmirror_engine::geometry::{SECTOR_SIZE, WRITE_BYTES_MAX};

use super::{check_range, check_size, SyncIo};

/// Memory alignment used for O_DIRECT transfers (covers 512 and 4096 logical-block devices).
pub const DIRECT_ALIGN_BYTES: usize = 4096;
/// The bounce buffer: one maximal host write; larger unaligned I/O goes through it in pieces.
pub const BOUNCE_BYTES: usize = WRITE_BYTES_MAX;

const _: () = assert!(BOUNCE_BYTES.is_multiple_of(DIRECT_ALIGN_BYTES));
const _: () = assert!(DIRECT_ALIGN_BYTES.is_multiple_of(SECTOR_SIZE));

/// A block device over a file descriptor with positional I/O.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size_bytes: u64,
    /// Page-aligned scratch for unaligned caller buffers; present exactly when O_DIRECT is on.
    bounce: Option<MmapMut>,
}

impl FileDevice {
    /// Opens `path` with O_DIRECT if its file system allows it, else buffered.
    ///
    /// Size: a block device is `size_bytes` long if given (at most the device) else the whole
    /// device; a regular file is created (with `create`) and extended to `size_bytes`, and an
    /// existing file smaller than `size_bytes` is an error unless `create` is set. The size must be
    /// a non-zero multiple of the sector size.
    pub fn open(path: &Path, size_bytes: Option<u64>, create: bool) -> io::Result<FileDevice> {
        Self::open_with(path, size_bytes, create, true)
    }

    /// As [`FileDevice::open`], but always through the page cache.
    pub fn open_buffered(
        path: &Path,
        size_bytes: Option<u64>,
        create: bool,
    ) -> io::Result<FileDevice> {
        Self::open_with(path, size_bytes, create, false)
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.bounce.is_some()
    }

    /// The file or block device.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (O_DIRECT exactly when [`FileDevice::is_direct`]) and its size, for a
    /// device that drives the descriptor itself (io_uring).
    pub(crate) fn into_file(self) -> (File, u64, bool) {
        let direct = self.is_direct();
        (self.file, self.size_bytes, direct)
    }

    fn open_with(
        path: &Path,
        size_bytes: Option<u64>,
        create: bool,
        try_direct: bool,
    ) -> io::Result<FileDevice> {
        let with_path =
            |error: io::Error| io::Error::new(error.kind(), format!("{}: {error}", path.display()));
        let mut file = match Self::open_file(path, create, try_direct) {
            Err(error) if try_direct && error.raw_os_error() == Some(libc::EINVAL) => {
                log::info!(
                    "{}: file system refuses O_DIRECT ({error}); using buffered I/O",
                    path.display()
                );
                Self::open_file(path, create, false)
            }
            other => other,
        }
        .map_err(with_path)?;
        let size_bytes = Self::settle_size(&mut file, size_bytes, create).map_err(with_path)?;
        check_size(size_bytes).map_err(with_path)?;
        let mut device = FileDevice {
            file,
            path: path.to_path_buf(),
            size_bytes,
            bounce: None,
        };
        if try_direct {
            device.bounce = Some(MmapMut::map_anon(BOUNCE_BYTES)?);
            match device.probe_direct() {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    log::info!(
                        "{}: O_DIRECT read refused ({error}); using buffered I/O",
                        path.display()
                    );
                    device.file = Self::open_file(path, false, false).map_err(with_path)?;
                    device.bounce = None;
                }
                Err(error) => return Err(with_path(error)),
            }
        }
        Ok(device)
    }

    fn open_file(path: &Path, create: bool, direct: bool) -> io::Result<File> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .create(create)
            .truncate(false);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        options.open(path)
    }

    /// The device size from the file, extending a regular file when asked to.
    fn settle_size(file: &mut File, size_bytes: Option<u64>, create: bool) -> io::Result<u64> {
        let metadata = file.metadata()?;
        let (existing_bytes, resizable) = if metadata.file_type().is_block_device() {
            (file.seek(SeekFrom::End(0))?, false)
        } else {
            (metadata.len(), metadata.is_file())
        };
        match size_bytes {
            None => Ok(existing_bytes),
            Some(wanted_bytes) if wanted_bytes <= existing_bytes => Ok(wanted_bytes),
            Some(wanted_bytes) if create && resizable => {
                file.set_len(wanted_bytes)?;
                Ok(wanted_bytes)
            }
            Some(wanted_bytes) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("it is {existing_bytes} bytes, smaller than the {wanted_bytes} asked for"),
            )),
        }
    }

    /// One aligned O_DIRECT read of a sector away from offset 0: file systems that accept the
    /// flag at open but not our alignment fail here, at start, instead of on the I/O path.
    fn probe_direct(&mut self) -> io::Result<()> {
        let offset_bytes = if self.size_bytes >= 2 * SECTOR_SIZE as u64 {
            SECTOR_SIZE as u64
        } else {
            0
        };
        let bounce = self.bounce.as_mut().expect("probe only in direct mode");
        self.file
            .read_exact_at(&mut bounce[..SECTOR_SIZE], offset_bytes)
    }
}

fn is_aligned(address: *const u8) -> bool {
    (address as usize).is_multiple_of(DIRECT_ALIGN_BYTES)
}

impl SyncIo for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset_bytes, buf.len(), self.size_bytes)?;
        let bounce = match &mut self.bounce {
            Some(bounce) if !is_aligned(buf.as_ptr()) => bounce,
            _ => return self.file.read_exact_at(buf, offset_bytes),
        };
        let mut piece_offset_bytes = offset_bytes;
        for piece in buf.chunks_mut(BOUNCE_BYTES) {
            let staged = &mut bounce[..piece.len()];
            self.file.read_exact_at(staged, piece_offset_bytes)?;
            piece.copy_from_slice(staged);
            piece_offset_bytes += piece.len() as u64;
        }
        Ok(())
    }

    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        check_range(offset_bytes, data.len(), self.size_bytes)?;
        let bounce = match &mut self.bounce {
            Some(bounce) if !is_aligned(data.as_ptr()) => bounce,
            _ => return self.file.write_all_at(data, offset_bytes),
        };
        let mut piece_offset_bytes = offset_bytes;
        for piece in data.chunks(BOUNCE_BYTES) {
            let staged = &mut bounce[..piece.len()];
            staged.copy_from_slice(piece);
            self.file.write_all_at(staged, piece_offset_bytes)?;
            piece_offset_bytes += piece.len() as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring_memory::scratch::ScratchDir;

    const SIZE_BYTES: u64 = 4 << 20;

    fn pattern(length_bytes: usize, seed: u8) -> Vec<u8> {
        (0..length_bytes)
            .map(|index| (index as u8).wrapping_mul(29) ^ seed)
            .collect()
    }

    /// A buffer deliberately off the O_DIRECT alignment by one sector.
    fn misaligned(storage: &mut MmapMut, length_bytes: usize) -> &mut [u8] {
        let slice = &mut storage[SECTOR_SIZE..SECTOR_SIZE + length_bytes];
        assert!(!is_aligned(slice.as_ptr()));
        slice
    }

    fn round_trip(device: &mut FileDevice) {
        // Larger than the bounce buffer, so the unaligned path goes in pieces.
        let length_bytes = BOUNCE_BYTES + 2 * 4096;
        let data = pattern(length_bytes, 0x3c);
        let mut storage = MmapMut::map_anon(BOUNCE_BYTES * 3).unwrap();
        let unaligned = misaligned(&mut storage, length_bytes);
        unaligned.copy_from_slice(&data);
        device.write_at(512, unaligned).unwrap();
        let mut aligned = MmapMut::map_anon(4096).unwrap();
        device.read_at(512 + 4096, &mut aligned[..]).unwrap();
        assert_eq!(&aligned[..], &data[4096..8192]);
        unaligned.fill(0);
        device.read_at(512, unaligned).unwrap();
        assert!(*unaligned == data[..]);
        device.flush().unwrap();
    }

    #[test]
    fn direct_round_trip_with_unaligned_buffers() {
        let dir = ScratchDir::new(Path::new("/var/tmp"), "file-direct");
        let mut device =
            FileDevice::open(&dir.path().join("disk"), Some(SIZE_BYTES), true).unwrap();
        assert_eq!(device.size_bytes(), SIZE_BYTES);
        // ext4, xfs, btrfs and (since Linux 6.6) tmpfs all take O_DIRECT.
        assert!(device.is_direct(), "/var/tmp refused O_DIRECT");
        round_trip(&mut device);
    }

    #[test]
    fn buffered_round_trip() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "file-buffered");
        let mut device =
            FileDevice::open_buffered(&dir.path().join("disk"), Some(SIZE_BYTES), true).unwrap();
        assert!(!device.is_direct());
        round_trip(&mut device);
    }

    #[test]
    fn contents_survive_reopen() {
        let dir = ScratchDir::new(Path::new("/var/tmp"), "file-reopen");
        let path = dir.path().join("disk");
        let data = pattern(8192, 0x77);
        let mut device = FileDevice::open(&path, Some(SIZE_BYTES), true).unwrap();
        device.write_at(SIZE_BYTES - 8192, &data).unwrap();
        device.flush().unwrap();
        drop(device);
        let mut device = FileDevice::open(&path, None, false).unwrap();
        assert_eq!(device.size_bytes(), SIZE_BYTES);
        let mut read = vec![0; 8192];
        device.read_at(SIZE_BYTES - 8192, &mut read).unwrap();
        assert_eq!(read, data);
    }

    #[test]
    fn out_of_range_is_invalid_input() {
        let dir = ScratchDir::new(Path::new("/var/tmp"), "file-range");
        let mut device = FileDevice::open(&dir.path().join("disk"), Some(8192), true).unwrap();
        let error = device.write_at(4096, &vec![1; 8192]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(device.read_at(8192, &mut [0; 512]).is_err());
        assert_eq!(std::fs::metadata(device.path()).unwrap().len(), 8192);
    }

    #[test]
    fn sizes_are_checked_at_open() {
        let dir = ScratchDir::new(Path::new("/var/tmp"), "file-size");
        let path = dir.path().join("disk");
        let missing = FileDevice::open(&path, Some(8192), false).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert!(missing.to_string().contains("disk"), "{missing}");
        drop(FileDevice::open(&path, Some(8192), true).unwrap());
        let smaller = FileDevice::open(&path, Some(16384), false).unwrap_err();
        assert!(
            smaller.to_string().contains("smaller than the 16384"),
            "{smaller}"
        );
        assert_eq!(
            FileDevice::open(&path, Some(4096), false)
                .unwrap()
                .size_bytes(),
            4096
        );
        assert_eq!(
            FileDevice::open(&path, Some(16384), true)
                .unwrap()
                .size_bytes(),
            16384
        );
        std::fs::write(dir.path().join("odd"), [0; 1000]).unwrap();
        assert!(FileDevice::open(&dir.path().join("odd"), None, false).is_err());
    }
}
