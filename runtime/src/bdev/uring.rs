//! [`UringDevice`]: a namespace in a file or block device driven through io_uring from the
//! reactor itself (invariant 8: `submit` pushes SQEs, `poll_completions` reaps CQEs, neither
//! waits). O_DIRECT where the file system allows (the probe of [`FileDevice`]), so the
//! transfers go from the device's own buffers: one [`WRITE_BYTES_MAX`] buffer per op slot, all
//! in one page-aligned mapping made at open (a write is copied into its slot's buffer, a read's
//! data is handed out of it). Write-zeroes is `fallocate(FALLOC_FL_ZERO_RANGE)`, or writes of a
//! shared zero buffer where the file system refuses that; a flush is `fdatasync` with
//! `IOSQE_IO_DRAIN`, so it starts after every SQE submitted before it has completed, and is
//! issued again if a write before it was still being resubmitted (short transfer). The ring's
//! eventfd is the doorbell a sleeping reactor waits on.
//!
//! Where io_uring is not available (seccomp in containers: EPERM, old kernels: ENOSYS),
//! [`open_file_namespace`] serves the file through a [`Worker`] thread instead.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use memmap2::MmapMut;
use nvmirror_engine::device::{
    BlockDevice, DeviceCompletion, DeviceError, DeviceOp, DeviceOpId, DeviceRequest,
};
use nvmirror_engine::geometry::WRITE_BYTES_MAX;
use nvmirror_engine::source::DEVICE_QUEUE_DEPTH_MAX;

use super::file::DIRECT_ALIGN_BYTES;
use super::{check_range, FileDevice, NamespaceDevice, Worker};
use crate::reactor::Doorbell;

/// Host reads the runtime keeps in flight on one device beside the engine's ops.
pub const HOST_READS_MAX: u32 = 64;
/// The largest transfer of one op: each slot's buffer.
pub const SLOT_BUFFER_BYTES: usize = WRITE_BYTES_MAX;
/// The shared zero buffer of write-zeroes by writes.
const ZERO_BUFFER_BYTES: usize = 1 << 20;

const _: () = assert!(SLOT_BUFFER_BYTES.is_multiple_of(DIRECT_ALIGN_BYTES));
const _: () = assert!(ZERO_BUFFER_BYTES.is_multiple_of(DIRECT_ALIGN_BYTES));
// The ring is sized to the slots (a power of two at most 4096 SQEs for any queue depth).
const _: () = assert!((DEVICE_QUEUE_DEPTH_MAX + HOST_READS_MAX) as usize <= 4096);

/// What one slot's op is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    Read,
    Write,
    /// `fallocate` first; `by_write` once the file system refused it.
    WriteZeroes {
        by_write: bool,
    },
    Flush,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    id: DeviceOpId,
    work: Work,
    offset_bytes: u64,
    length_bytes: u64,
    /// Bytes transferred so far (short transfers resubmit the rest).
    done_bytes: u64,
    /// Submission order, for a flush to see the writes before it.
    sequence: u64,
    /// Finished, waiting for `poll_completions`.
    result: Option<Result<(), DeviceError>>,
}

/// An eventfd the ring writes on every completion. The reactor waits on it; `arm` has nothing
/// to announce because the counter already holds every completion posted since the last drain.
#[derive(Debug)]
pub struct EventFdDoorbell {
    eventfd: File,
}

impl EventFdDoorbell {
    pub fn new() -> io::Result<Arc<EventFdDoorbell>> {
        // SAFETY: eventfd(2) takes no pointers; it returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        let eventfd = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Arc::new(EventFdDoorbell { eventfd }))
    }
}

impl Doorbell for EventFdDoorbell {
    fn arm(&self) -> bool {
        // A CQE posted after the last poll left the counter non-zero: the sleep returns at once.
        false
    }

    fn disarm(&self, rung: bool) {
        if rung {
            let mut count = [0u8; 8];
            // Non-blocking: a racing completion only costs one more loop.
            let _ = (&self.eventfd).read(&mut count);
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }
}

/// A file or block device driven through io_uring.
pub struct UringDevice {
    // Field order: the ring (which may still point at the buffers) drops first, after `Drop`
    // waited for every op.
    ring: IoUring,
    file: File,
    size_bytes: u64,
    direct: bool,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Slots whose next SQE did not fit the submission queue yet.
    backlog: Vec<u32>,
    /// Slots finished in submission of their CQE order, handed out by the next poll.
    finished: Vec<u32>,
    /// (user_data, result) of the CQEs of one poll.
    reaped: Vec<(u64, i32)>,
    buffers: MmapMut,
    zeroes: MmapMut,
    doorbell: Arc<EventFdDoorbell>,
    next_sequence: u64,
    inflight: usize,
    zero_range_refused: bool,
}

impl UringDevice {
    /// Opens `path` as [`FileDevice::open`] does (size, create, O_DIRECT probe) with room for
    /// `queue_depth` engine ops plus [`HOST_READS_MAX`] host reads in flight.
    pub fn open(
        path: &Path,
        size_bytes: Option<u64>,
        create: bool,
        queue_depth: u32,
    ) -> io::Result<UringDevice> {
        assert!((1..=DEVICE_QUEUE_DEPTH_MAX).contains(&queue_depth));
        let slot_count = (queue_depth + HOST_READS_MAX) as usize;
        let ring = IoUring::builder()
            .setup_cqsize((2 * slot_count.next_power_of_two()) as u32)
            .build(slot_count.next_power_of_two() as u32)?;
        let (file, size_bytes, direct) = FileDevice::open(path, size_bytes, create)?.into_file();
        if !direct {
            log::warn!(
                "{}: O_DIRECT refused by the file system; io_uring on buffered I/O",
                path.display()
            );
        }
        let doorbell = EventFdDoorbell::new()?;
        ring.submitter().register_eventfd(doorbell.raw_fd())?;
        Ok(UringDevice {
            ring,
            file,
            size_bytes,
            direct,
            slots: vec![None; slot_count],
            free: (0..slot_count as u32).rev().collect(),
            backlog: Vec::with_capacity(slot_count),
            finished: Vec::with_capacity(slot_count),
            reaped: Vec::with_capacity(2 * slot_count.next_power_of_two()),
            buffers: MmapMut::map_anon(slot_count * SLOT_BUFFER_BYTES)?,
            zeroes: MmapMut::map_anon(ZERO_BUFFER_BYTES)?,
            doorbell,
            next_sequence: 0,
            inflight: 0,
            zero_range_refused: false,
        })
    }

    /// Whether transfers bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Ops this device keeps in flight at most.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    fn buffer_ptr(&mut self, slot: u32) -> *mut u8 {
        let start = slot as usize * SLOT_BUFFER_BYTES;
        self.buffers[start..start + SLOT_BUFFER_BYTES].as_mut_ptr()
    }

    /// The SQE of slot `index`'s next step (the rest of a short transfer included).
    fn entry(&mut self, index: u32) -> squeue::Entry {
        let slot = self.slots[index as usize].expect("a busy slot");
        let fd = types::Fd(self.file.as_raw_fd());
        let offset = slot.offset_bytes + slot.done_bytes;
        let rest = (slot.length_bytes - slot.done_bytes) as usize;
        let entry = match slot.work {
            Work::Read => {
                // SAFETY: `buffer_ptr` points into the slot's own buffer in `self.buffers`,
                // which lives until the ring is dropped; `done + rest` <= the buffer's size.
                let ptr = unsafe { self.buffer_ptr(index).add(slot.done_bytes as usize) };
                opcode::Read::new(fd, ptr, rest as u32)
                    .offset(offset)
                    .build()
            }
            Work::Write => {
                // SAFETY: as for reads.
                let ptr = unsafe { self.buffer_ptr(index).add(slot.done_bytes as usize) };
                opcode::Write::new(fd, ptr, rest as u32)
                    .offset(offset)
                    .build()
            }
            Work::WriteZeroes { by_write: false } => opcode::Fallocate::new(fd, rest as u64)
                .offset(offset)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            Work::WriteZeroes { by_write: true } => {
                let chunk = rest.min(ZERO_BUFFER_BYTES);
                opcode::Write::new(fd, self.zeroes.as_ptr(), chunk as u32)
                    .offset(offset)
                    .build()
            }
            Work::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        };
        entry.user_data(u64::from(index))
    }

    /// Pushes slot `index`'s next SQE, or keeps it in the backlog while the queue is full.
    fn push(&mut self, index: u32) {
        let entry = self.entry(index);
        // SAFETY: every buffer an entry points at belongs to this device and stays put until
        // the op's CQE is reaped (the slot is busy until then; `Drop` waits for all of them).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.backlog.push(index);
        }
    }

    fn flush_backlog(&mut self) {
        while let Some(&index) = self.backlog.first() {
            let entry = self.entry(index);
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                return;
            }
            self.backlog.remove(0);
        }
    }

    /// Hands the pushed SQEs to the kernel without waiting for any completion.
    fn enter(&mut self) {
        if let Err(error) = self.ring.submit() {
            // EBUSY/EAGAIN: the kernel has no room for more now; the SQEs stay queued and
            // go with the next enter.
            if !matches!(error.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) {
                log::error!("io_uring submit failed: {error}");
            }
        }
    }

    fn finish(&mut self, index: u32, result: Result<(), DeviceError>) {
        let slot = self.slots[index as usize].as_mut().expect("a busy slot");
        slot.result = Some(result);
        self.finished.push(index);
    }

    /// One CQE of slot `index`: finish it, or submit its next step.
    fn handle_cqe(&mut self, index: u32, result: i32) {
        let slot = self.slots[index as usize].expect("a CQE names a busy slot");
        let error = |errno: i32| {
            Err(DeviceError {
                kind: io::Error::from_raw_os_error(errno).kind(),
                errno: Some(errno),
            })
        };
        if result < 0 {
            let errno = -result;
            if slot.work == (Work::WriteZeroes { by_write: false })
                && matches!(errno, libc::EOPNOTSUPP | libc::EINVAL)
            {
                if !self.zero_range_refused {
                    log::warn!("fallocate(ZERO_RANGE) refused ({errno}); writing zeroes instead");
                    self.zero_range_refused = true;
                }
                let slot = self.slots[index as usize].as_mut().expect("busy");
                slot.work = Work::WriteZeroes { by_write: true };
                self.push(index);
                return;
            }
            return self.finish(index, error(errno));
        }
        let transferred = match slot.work {
            Work::Read | Work::Write | Work::WriteZeroes { by_write: true } => result as u64,
            Work::WriteZeroes { by_write: false } => slot.length_bytes - slot.done_bytes,
            Work::Flush => {
                // A write submitted before this flush still resubmitting its rest: its tail
                // was not covered by the drain, so sync again behind it.
                let behind = self.slots.iter().flatten().any(|other| {
                    other.sequence < slot.sequence
                        && matches!(other.work, Work::Write | Work::WriteZeroes { .. })
                        && other.result.is_none()
                });
                if behind {
                    self.push(index);
                } else {
                    self.finish(index, Ok(()));
                }
                return;
            }
        };
        if transferred == 0 {
            // End of file before the range's end: the file shrank under the device.
            log::error!(
                "short {:?} at offset {} made no progress; failing with EIO",
                slot.work,
                slot.offset_bytes + slot.done_bytes
            );
            return self.finish(index, error(libc::EIO));
        }
        let slot = self.slots[index as usize].as_mut().expect("busy");
        slot.done_bytes += transferred;
        assert!(slot.done_bytes <= slot.length_bytes);
        if slot.done_bytes < slot.length_bytes {
            self.push(index);
        } else {
            self.finish(index, Ok(()));
        }
    }
}

impl BlockDevice for UringDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn submit(&mut self, op: DeviceOp<'_>) {
        let (offset_bytes, end_bytes) = op.request.range();
        let length_bytes = end_bytes - offset_bytes;
        let work = match op.request {
            DeviceRequest::Read { .. } => Work::Read,
            DeviceRequest::Write { .. } => Work::Write,
            DeviceRequest::WriteZeroes { .. } => Work::WriteZeroes {
                by_write: self.zero_range_refused,
            },
            DeviceRequest::Flush => Work::Flush,
        };
        let index = self
            .free
            .pop()
            .expect("the engine keeps at most its queue depth plus host reads in flight");
        let mut slot = Slot {
            id: op.id,
            work,
            offset_bytes,
            length_bytes,
            done_bytes: 0,
            sequence: self.next_sequence,
            result: None,
        };
        self.next_sequence += 1;
        self.inflight += 1;
        let transfer = matches!(work, Work::Read | Work::Write);
        let invalid = if work == Work::Flush {
            None
        } else if let Err(error) = check_range(offset_bytes, length_bytes as usize, self.size_bytes)
        {
            Some(DeviceError::from_io(&error))
        } else if transfer && length_bytes as usize > SLOT_BUFFER_BYTES {
            Some(DeviceError {
                kind: io::ErrorKind::InvalidInput,
                errno: Some(libc::EINVAL),
            })
        } else {
            None
        };
        if let Some(error) = invalid {
            slot.result = Some(Err(error));
            self.slots[index as usize] = Some(slot);
            self.finished.push(index);
            return;
        }
        self.slots[index as usize] = Some(slot);
        if let DeviceRequest::Write { data, .. } = op.request {
            let start = index as usize * SLOT_BUFFER_BYTES;
            self.buffers[start..start + data.len()].copy_from_slice(data);
        }
        self.push(index);
        self.enter();
    }

    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize {
        self.reaped.clear();
        for cqe in self.ring.completion() {
            self.reaped.push((cqe.user_data(), cqe.result()));
        }
        for position in 0..self.reaped.len() {
            let (user_data, result) = self.reaped[position];
            self.handle_cqe(user_data as u32, result);
        }
        self.flush_backlog();
        if !self.ring.submission().is_empty() {
            self.enter();
        }
        let count = self.finished.len();
        for position in 0..count {
            let index = self.finished[position];
            let slot = self.slots[index as usize].take().expect("finished slot");
            let start = index as usize * SLOT_BUFFER_BYTES;
            let result = slot.result.expect("finished").map(|()| match slot.work {
                Work::Read => &self.buffers[start..start + slot.length_bytes as usize],
                _ => &[][..],
            });
            complete(DeviceCompletion {
                id: slot.id,
                result,
            });
            self.free.push(index);
        }
        self.finished.drain(..count);
        self.inflight -= count;
        count
    }

    fn inflight_count(&self) -> usize {
        self.inflight
    }
}

impl NamespaceDevice for UringDevice {
    fn doorbell(&self) -> Option<Arc<dyn Doorbell>> {
        Some(Arc::clone(&self.doorbell) as Arc<dyn Doorbell>)
    }
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        // The kernel may still write into the slot buffers: wait for every op before they go.
        while self.inflight > 0 {
            let submitted_or_waiting = self.ring.submit_and_wait(1);
            if let Err(error) = submitted_or_waiting {
                if error.raw_os_error() != Some(libc::EINTR) {
                    log::error!("io_uring wait at close failed: {error}; leaking its buffers");
                    std::mem::forget(std::mem::replace(
                        &mut self.buffers,
                        MmapMut::map_anon(1).expect("a page"),
                    ));
                    return;
                }
            }
            self.poll_completions(&mut |_| {});
        }
    }
}

/// Opens a file namespace through io_uring ([`UringDevice`]), or, where the kernel refuses
/// io_uring (EPERM under seccomp, ENOSYS), through a [`Worker`] thread with one warning.
pub fn open_file_namespace(
    path: &Path,
    size_bytes: Option<u64>,
    create: bool,
    queue_depth: u32,
) -> io::Result<Box<dyn NamespaceDevice>> {
    open_file_namespace_with(path, size_bytes, create, queue_depth, true)
}

/// [`open_file_namespace`], with `try_uring: false` forcing the [`Worker`] fallback.
pub fn open_file_namespace_with(
    path: &Path,
    size_bytes: Option<u64>,
    create: bool,
    queue_depth: u32,
    try_uring: bool,
) -> io::Result<Box<dyn NamespaceDevice>> {
    let reason = if try_uring {
        match UringDevice::open(path, size_bytes, create, queue_depth) {
            Ok(device) => return Ok(Box::new(device)),
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EPERM | libc::ENOSYS | libc::EACCES)
                ) =>
            {
                format!("io_uring unavailable ({error})")
            }
            Err(error) => return Err(error),
        }
    } else {
        "io_uring not asked for".to_string()
    };
    log::warn!(
        "{}: {reason}; serving it through a worker thread",
        path.display()
    );
    let file = FileDevice::open(path, size_bytes, create)?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Box::new(Worker::start(&name, file)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring_memory::scratch::ScratchDir;

    fn wait(
        device: &mut dyn NamespaceDevice,
        count: usize,
    ) -> Vec<(u64, Result<Vec<u8>, DeviceError>)> {
        let mut seen = Vec::new();
        for _ in 0..10_000 {
            device.poll_completions(&mut |completion| {
                seen.push((completion.id.0, completion.result.map(<[u8]>::to_vec)));
            });
            if seen.len() >= count {
                assert_eq!(seen.len(), count);
                return seen;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the device did not complete {count} ops");
    }

    fn write(id: u64, offset_bytes: u64, data: &[u8]) -> DeviceOp<'_> {
        DeviceOp {
            id: DeviceOpId(id),
            nsid: 1,
            request: DeviceRequest::Write { offset_bytes, data },
        }
    }

    fn read(id: u64, offset_bytes: u64, length_bytes: u32) -> DeviceOp<'static> {
        DeviceOp {
            id: DeviceOpId(id),
            nsid: 1,
            request: DeviceRequest::Read {
                offset_bytes,
                length_bytes,
            },
        }
    }

    fn flush(id: u64) -> DeviceOp<'static> {
        DeviceOp {
            id: DeviceOpId(id),
            nsid: 1,
            request: DeviceRequest::Flush,
        }
    }

    /// Writes, zeroes, a flush and reads on `device`, checked against the file afterwards.
    fn exercise(device: &mut dyn NamespaceDevice, path: &Path) {
        assert!(device.doorbell().is_some());
        let data: Vec<u8> = (0..WRITE_BYTES_MAX).map(|i| (i * 7 + 3) as u8).collect();
        device.submit(write(1, 4096, &data));
        device.submit(write(2, 8 << 20, &data[..8192]));
        device.submit(flush(4));
        assert_eq!(device.inflight_count(), 3);
        let seen = wait(device, 3);
        assert!(seen.iter().all(|(_, result)| result == &Ok(Vec::new())));
        // The flush drains behind every write before it.
        assert_eq!(seen.last().unwrap().0, 4, "{seen:?}");
        device.submit(DeviceOp {
            id: DeviceOpId(3),
            nsid: 1,
            request: DeviceRequest::WriteZeroes {
                offset_bytes: 8 << 20,
                length_bytes: 4096,
            },
        });
        assert_eq!(wait(device, 1), [(3, Ok(Vec::new()))]);
        device.submit(read(5, 4096, WRITE_BYTES_MAX as u32));
        device.submit(read(6, 8 << 20, 8192));
        device.submit(read(7, 16 << 20, 512));
        let seen = wait(device, 3);
        let by_id = |id| seen.iter().find(|(seen_id, _)| *seen_id == id).unwrap();
        assert!(by_id(5).1.as_ref().unwrap() == &data);
        let zeroed = by_id(6).1.as_ref().unwrap();
        assert!(zeroed[..4096].iter().all(|&b| b == 0));
        assert_eq!(&zeroed[4096..], &data[4096..8192]);
        assert_eq!(
            by_id(7).1.as_ref().unwrap_err().kind,
            io::ErrorKind::InvalidInput
        );
        assert_eq!(device.inflight_count(), 0);
        // The medium holds what the device said it wrote.
        let contents = std::fs::read(path).unwrap();
        assert!(contents[4096..4096 + WRITE_BYTES_MAX] == data[..]);
        assert!(contents[8 << 20..(8 << 20) + 4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn io_uring_round_trips_zeroes_and_flushes_in_order() {
        let dir = ScratchDir::new(Path::new("/var/tmp"), "uring");
        let path = dir.path().join("ns.img");
        let mut device = UringDevice::open(&path, Some(16 << 20), true, 32).unwrap();
        assert_eq!(device.slot_count(), 32 + HOST_READS_MAX as usize);
        exercise(&mut device, &path);
    }

    #[test]
    fn io_uring_on_temp_dir_even_without_o_direct() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "uring-tmp");
        let path = dir.path().join("ns.img");
        let mut device = open_file_namespace(&path, Some(16 << 20), true, 32).unwrap();
        exercise(device.as_mut(), &path);
    }

    #[test]
    fn fallback_to_a_worker_serves_the_same_ops() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "uring-fallback");
        let path = dir.path().join("ns.img");
        let mut device = open_file_namespace_with(&path, Some(16 << 20), true, 32, false).unwrap();
        exercise(device.as_mut(), &path);
    }

    #[test]
    fn a_full_queue_depth_completes_and_the_doorbell_rings() {
        let dir = ScratchDir::new(Path::new("/var/tmp"), "uring-depth");
        let path = dir.path().join("ns.img");
        let mut device = UringDevice::open(&path, Some(4 << 20), true, 32).unwrap();
        let doorbell = device.doorbell().unwrap();
        let blocks: Vec<Vec<u8>> = (0..device.slot_count())
            .map(|i| vec![i as u8; 4096])
            .collect();
        for (i, block) in blocks.iter().enumerate() {
            device.submit(write(i as u64, i as u64 * 4096, block));
        }
        // The ring's eventfd becomes readable once completions are posted.
        let mut pollfd = libc::pollfd {
            fd: doorbell.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, 5000) };
        assert_eq!(ready, 1);
        doorbell.disarm(true);
        let seen = wait(&mut device, blocks.len());
        assert!(seen.iter().all(|(_, result)| result.is_ok()));
        for i in 0..blocks.len() as u64 {
            device.submit(read(1000 + i, i * 4096, 4096));
        }
        let seen = wait(&mut device, blocks.len());
        for (id, result) in seen {
            assert!(result.unwrap().iter().all(|&b| b == (id - 1000) as u8));
        }
    }
}
