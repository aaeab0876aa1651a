//! Block devices of the embedded runtime: the backing stores of the source's primary namespace and
//! the destination's mirror namespace (claims 1, 6, 9: the consistency point writes dirty blocks
//! to both). Each is served to the engine's completion-based
//! [`BlockDevice`](nvmirror_engine::device::BlockDevice) (invariant 8: no reactor thread blocks
//! on namespace I/O): [`MallocDevice`] keeps the namespace in (hugepage) memory like SPDK's
//! malloc bdev and completes behind [`Immediate`] on the next poll; [`FileDevice`] keeps it in a
//! file or block device with O_DIRECT where the file system allows, its blocking calls made by
//! a [`Worker`] thread, never by the reactor. [`FaultyDevice`] wraps any of them and fails,
//! delays, corrupts or stalls their ops (tests and benches).

pub mod faulty;
pub mod file;
pub mod immediate;
pub mod malloc;
pub mod uring;
pub mod worker;

pub use faulty::{FaultAction, FaultControl, FaultOps, FaultRule, FaultyDevice};
pub use file::FileDevice;
pub use immediate::Immediate;
pub use malloc::{MallocBacking, MallocDevice};
pub use uring::{open_file_namespace, open_file_namespace_with, UringDevice};
pub use worker::Worker;

use std::io;
use std::sync::Arc;

use nvmirror_engine::device::BlockDevice;
use nvmirror_engine::geometry::SECTOR_SIZE;

use crate::reactor::Doorbell;

/// A backing store's synchronous calls, made by whoever serves it to the engine ([`Immediate`]
/// for memory, [`Worker`] for anything that blocks). Offsets and lengths are sector multiples.
pub trait SyncIo: Send {
    fn size_bytes(&self) -> u64;
    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Durable after the next successful [`SyncIo::flush`].
    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> io::Result<()>;
    /// The range reads back as zeroes.
    fn write_zeroes(&mut self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut offset = offset_bytes;
        let end = offset_bytes + length_bytes;
        while offset < end {
            let chunk = (end - offset).min(ZEROES.len() as u64) as usize;
            self.write_at(offset, &ZEROES[..chunk])?;
            offset += chunk as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Orders every write so far before what the caller stores next (the completion it reports,
    /// which another thread may act on by reading the written memory). A store whose writes are
    /// ordered already (every syscall-backed one) has nothing to do.
    fn order_writes(&mut self) {}
    /// The whole namespace as memory, for a store that is memory (reads are then served from
    /// it without a copy).
    fn memory(&self) -> Option<&[u8]> {
        None
    }
}

/// Reads `buf.len()` bytes at `offset_bytes`, waiting for the device: for offline work on a
/// thread that is no reactor (comparing images after a run, tools), never on the I/O path.
pub fn read_waiting(
    device: &mut dyn NamespaceDevice,
    offset_bytes: u64,
    buf: &mut [u8],
) -> Result<(), nvmirror_engine::DeviceError> {
    if let Some(result) = device.read_now(offset_bytes, buf) {
        return result;
    }
    let id = nvmirror_engine::DeviceOpId(nvmirror_engine::device::RUNTIME_OP_BIT | 1);
    device.submit(nvmirror_engine::DeviceOp {
        id,
        nsid: 1,
        request: nvmirror_engine::DeviceRequest::Read {
            offset_bytes,
            length_bytes: buf.len() as u32,
        },
    });
    let mut outcome = None;
    while outcome.is_none() {
        device.poll_completions(&mut |completion| {
            assert_eq!(completion.id, id, "nothing else is in flight");
            outcome = Some(completion.result.map(|data| buf.copy_from_slice(data)));
        });
        if outcome.is_none() {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
    outcome.expect("set above")
}

/// Submits every op `poll` gives (to namespace `op.nsid`) and hands each completion to
/// `complete` until `done`, waiting for the devices: for offline work (a promotion from the
/// command line) on a thread that is no reactor.
pub fn drive_waiting<C>(
    core: &mut C,
    devices: &mut [Box<dyn NamespaceDevice>],
    mut poll: impl FnMut(&mut C, &mut [Box<dyn NamespaceDevice>]) -> usize,
    mut complete: impl FnMut(&mut C, nvmirror_engine::DeviceCompletion<'_>),
    mut done: impl FnMut(&C) -> bool,
) {
    while !done(core) {
        let mut work = poll(core, devices);
        for device in devices.iter_mut() {
            work += device.poll_completions(&mut |completion| complete(core, completion));
        }
        if work == 0 {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
}

/// A namespace device as nodes hold it: the engine's completion-based device, plus the
/// mailbox whose eventfd announces completions made on another thread (none: completions
/// are found by polling alone).
pub trait NamespaceDevice: BlockDevice + Send {
    fn doorbell(&self) -> Option<Arc<dyn Doorbell>> {
        None
    }
    /// The earliest [`crate::reactor::monotonic_us`] time at which the device needs a poll
    /// although no doorbell rang (completions it holds back on a timer, as
    /// a fault-injecting wrapper does); `None`: doorbells and submissions are enough.
    fn next_deadline_us(&self) -> Option<u64> {
        None
    }
}

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

/// The engine's plain-memory device (tests, examples) completes on the next poll.
impl NamespaceDevice for nvmirror_engine::device::MemoryDevice {}

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
