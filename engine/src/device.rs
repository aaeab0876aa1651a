//! The block-device boundary of the engine core.
//!
//! The core never opens files or sockets; it reads and writes namespaces through this trait,
//! which the runtime implements (malloc in hugepage memory, files with O_DIRECT) and the
//! simulation implements with fault injection. Offsets and lengths are in bytes and always
//! multiples of [`crate::geometry::SECTOR_SIZE`]; an implementation may rely on that.

use std::io;

/// A namespace's backing store: the source's primary namespace or the destination's mirror.
pub trait BlockDevice {
    /// Capacity in bytes (a multiple of the sector size).
    fn size_bytes(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset_bytes`.
    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset_bytes`. Durable after the next successful [`BlockDevice::flush`].
    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
}

impl<T: BlockDevice + ?Sized> BlockDevice for Box<T> {
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset_bytes, buf)
    }
    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(offset_bytes, data)
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
}

/// Why an extent does not fit a set of namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentError {
    NoNamespace,
    OutOfRange,
}

/// The one range check of the engine: `length_bytes` at `offset_bytes` of namespace `nsid`
/// (1-based) lies inside `devices[nsid - 1]`. The source checks host writes with it, the
/// destination a source's entries, and a replay checks again what was checked on append.
pub fn check_extent<D: BlockDevice>(
    devices: &[D],
    nsid: u32,
    offset_bytes: u64,
    length_bytes: u64,
) -> Result<(), ExtentError> {
    let device = (nsid as usize)
        .checked_sub(1)
        .and_then(|index| devices.get(index))
        .ok_or(ExtentError::NoNamespace)?;
    match offset_bytes.checked_add(length_bytes) {
        Some(end) if end <= device.size_bytes() => Ok(()),
        _ => Err(ExtentError::OutOfRange),
    }
}

/// A namespace in plain process memory: for tests, the simulation's peers and examples (the
/// runtime's `MallocDevice` is the hugepage-backed one a node uses). Out-of-range access panics:
/// callers are the engine and tests, which check ranges first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryDevice(pub Vec<u8>);

impl MemoryDevice {
    pub fn new(size_bytes: usize) -> Self {
        MemoryDevice(vec![0; size_bytes])
    }
}

impl BlockDevice for MemoryDevice {
    fn size_bytes(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = offset_bytes as usize;
        buf.copy_from_slice(&self.0[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        let start = offset_bytes as usize;
        self.0[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
