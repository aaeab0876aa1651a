//! The block-device boundary of the engine core: device I/O as events (ARCHITECTURE "block
//! devices"; invariant 8).
//!
//! The core never calls a device. It emits [`DeviceOp`]s (read, write, write-zeroes, flush of
//! one namespace, each named by a [`DeviceOpId`]) from `poll_device_op`, and takes each one's
//! [`DeviceCompletion`] in `handle_device_completion`, in whatever order the device finishes
//! them: the shape of TigerBeetle's `Storage` (submit with a completion, handle it later) and of
//! quinn-proto's `poll_*` / `handle_*`. The runtime owns the devices and moves ops and
//! completions between them and the core; the simulation delays, reorders and fails them.
//!
//! [`BlockDevice`] is what runtimes implement per namespace (malloc completes at once; files go
//! through io_uring; SPDK bdevs later). Offsets and lengths are in bytes and always multiples
//! of [`crate::geometry::SECTOR_SIZE`]; an implementation may rely on that.
//!
//! The buffer a [`DeviceRequest::Write`] borrows (ring memory, a staging block) is left
//! unchanged by the core until that op's completion is handled, so a device may keep pointing
//! at it instead of copying; a safe implementation copies before `submit` returns.

use std::fmt;
use std::io;

/// Names one device operation of a side until its completion is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceOpId(pub u64);

/// The core's op ids never have this bit set: a runtime that submits ops of its own to the same
/// device (host reads) names them with it and routes their completions itself.
pub const RUNTIME_OP_BIT: u64 = 1 << 63;

impl DeviceOpId {
    /// An op the runtime submitted itself (see [`RUNTIME_OP_BIT`]).
    pub fn is_runtime(self) -> bool {
        self.0 & RUNTIME_OP_BIT != 0
    }
}

/// What an operation asks of a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest<'a> {
    /// `length_bytes` at `offset_bytes`; the completion carries the data.
    Read {
        offset_bytes: u64,
        length_bytes: u32,
    },
    Write {
        offset_bytes: u64,
        data: &'a [u8],
    },
    /// The range reads back as zeroes once complete.
    WriteZeroes {
        offset_bytes: u64,
        length_bytes: u64,
    },
    /// Every write completed before this flush was submitted is durable when it completes.
    Flush,
}

impl DeviceRequest<'_> {
    pub fn kind(&self) -> DeviceOpKind {
        match self {
            Self::Read { .. } => DeviceOpKind::Read,
            Self::Write { .. } | Self::WriteZeroes { .. } => DeviceOpKind::Write,
            Self::Flush => DeviceOpKind::Flush,
        }
    }

    /// The byte range the request touches (empty for a flush).
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Self::Read {
                offset_bytes,
                length_bytes,
            } => (offset_bytes, offset_bytes + u64::from(length_bytes)),
            Self::Write { offset_bytes, data } => (offset_bytes, offset_bytes + data.len() as u64),
            Self::WriteZeroes {
                offset_bytes,
                length_bytes,
            } => (offset_bytes, offset_bytes + length_bytes),
            Self::Flush => (0, 0),
        }
    }
}

/// The kind of an operation, for counters, logs and fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceOpKind {
    Read,
    Write,
    Flush,
}

impl fmt::Display for DeviceOpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Flush => "flush",
        })
    }
}

/// One operation on namespace `nsid` (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceOp<'a> {
    pub id: DeviceOpId,
    pub nsid: u32,
    pub request: DeviceRequest<'a>,
}

/// Why an operation failed (kept `Copy` so completions and events stay cheap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceError {
    pub kind: io::ErrorKind,
    /// The OS error number, when there is one.
    pub errno: Option<i32>,
}

impl DeviceError {
    pub fn from_io(error: &io::Error) -> Self {
        DeviceError {
            kind: error.kind(),
            errno: error.raw_os_error(),
        }
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errno {
            Some(errno) => write!(f, "{}", io::Error::from_raw_os_error(errno)),
            None => write!(f, "{}", io::Error::from(self.kind)),
        }
    }
}

/// How an operation ended: a read's data, or nothing for the other kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCompletion<'a> {
    pub id: DeviceOpId,
    pub result: Result<&'a [u8], DeviceError>,
}

/// A namespace's backing store as a runtime serves it: the source's primary or the
/// destination's mirror. `submit` never blocks; completions come back through
/// `poll_completions` in any order. The core bounds the operations it keeps in flight per
/// device (its `device_queue_depth`); a device takes at least that many.
pub trait BlockDevice {
    /// Capacity in bytes (a multiple of the sector size).
    fn size_bytes(&self) -> u64;
    /// Starts `op`. A write's data is taken (copied, or submitted from where it is) now.
    fn submit(&mut self, op: DeviceOp<'_>);
    /// Hands every finished operation to `complete`; returns how many.
    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize;
    /// Reads at once when the device can do so without blocking (memory); `None` otherwise.
    fn read_now(&mut self, _offset_bytes: u64, _buf: &mut [u8]) -> Option<Result<(), DeviceError>> {
        None
    }
    /// [`BlockDevice::read_now`] serves reads.
    fn can_read_now(&self) -> bool {
        false
    }
    /// Operations submitted and not yet handed back.
    fn inflight_count(&self) -> usize;
}

impl<T: BlockDevice + ?Sized> BlockDevice for Box<T> {
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn submit(&mut self, op: DeviceOp<'_>) {
        (**self).submit(op)
    }
    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize {
        (**self).poll_completions(complete)
    }
    fn read_now(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Option<Result<(), DeviceError>> {
        (**self).read_now(offset_bytes, buf)
    }
    fn can_read_now(&self) -> bool {
        (**self).can_read_now()
    }
    fn inflight_count(&self) -> usize {
        (**self).inflight_count()
    }
}

/// Why an extent does not fit a set of namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentError {
    NoNamespace,
    OutOfRange,
}

/// The one range check of the engine: `length_bytes` at `offset_bytes` of namespace `nsid`
/// (1-based) lies inside namespace `nsid` of `sizes_bytes`. The source checks host writes with
/// it, the destination a source's entries, and a replay checks again what was checked on append.
pub fn check_extent(
    sizes_bytes: &[u64],
    nsid: u32,
    offset_bytes: u64,
    length_bytes: u64,
) -> Result<(), ExtentError> {
    let size_bytes = (nsid as usize)
        .checked_sub(1)
        .and_then(|index| sizes_bytes.get(index))
        .ok_or(ExtentError::NoNamespace)?;
    match offset_bytes.checked_add(length_bytes) {
        Some(end) if end <= *size_bytes => Ok(()),
        _ => Err(ExtentError::OutOfRange),
    }
}

/// The operations a side has in flight, by id: a slab of fixed capacity (allocated at start)
/// holding what each op is for (`P`), with a count per namespace so no device gets more than
/// `depth` at once. Ids carry the slot in their low 32 bits and a use count above, so a stale
/// or foreign id is caught, never mistaken for a live one.
#[derive(Debug)]
pub(crate) struct InflightOps<P> {
    slots: Vec<(u32, Option<(u32, P)>)>,
    free: Vec<u32>,
    per_namespace: Vec<u32>,
    depth: u32,
}

impl<P: Copy> InflightOps<P> {
    pub fn new(namespace_count: usize, depth: u32) -> Self {
        assert!(depth > 0, "a device takes at least one op");
        let capacity = namespace_count * depth as usize;
        InflightOps {
            slots: vec![(0, None); capacity],
            free: (0..capacity as u32).rev().collect(),
            per_namespace: vec![0; namespace_count],
            depth,
        }
    }

    /// Ops in flight on namespace `nsid`.
    pub fn count_on(&self, nsid: u32) -> u32 {
        self.per_namespace[nsid as usize - 1]
    }

    /// Namespace `nsid` can take another op.
    pub fn has_room(&self, nsid: u32) -> bool {
        self.per_namespace[nsid as usize - 1] < self.depth
    }

    /// Records an op for `nsid` (which must have room) and returns its id.
    pub fn start(&mut self, nsid: u32, purpose: P) -> DeviceOpId {
        assert!(
            self.has_room(nsid),
            "namespace {nsid} is at its queue depth"
        );
        let slot = self.free.pop().expect("capacity is namespaces x depth");
        let entry = &mut self.slots[slot as usize];
        assert!(entry.1.is_none());
        // The use count stays below 2^31, so a core id never has bit 63 set ([`RUNTIME_OP_BIT`]).
        entry.0 = (entry.0 + 1) & 0x7FFF_FFFF;
        entry.1 = Some((nsid, purpose));
        self.per_namespace[nsid as usize - 1] += 1;
        DeviceOpId(u64::from(entry.0) << 32 | u64::from(slot))
    }

    /// Ends op `id`: its namespace and purpose, or `None` for an id that is not in flight.
    pub fn finish(&mut self, id: DeviceOpId) -> Option<(u32, P)> {
        let slot = (id.0 & u64::from(u32::MAX)) as u32;
        let entry = self.slots.get_mut(slot as usize)?;
        if u64::from(entry.0) != id.0 >> 32 {
            return None;
        }
        let (nsid, purpose) = entry.1.take()?;
        self.per_namespace[nsid as usize - 1] -= 1;
        self.free.push(slot);
        Some((nsid, purpose))
    }

    /// Every op in flight with its namespace. Slots are reused last-freed first, so the live
    /// ones gather at the front and the scan stops at the last of them (the source checks every
    /// primary write against the ops in flight).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &P)> + '_ {
        let live: u32 = self.per_namespace.iter().sum();
        self.slots
            .iter()
            .filter_map(|(_, entry)| entry.as_ref().map(|(nsid, purpose)| (*nsid, purpose)))
            .take(live as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.per_namespace.iter().all(|&count| count == 0)
    }

    /// Ops per namespace at most.
    pub fn depth(&self) -> u32 {
        self.depth
    }
}

/// A namespace in plain process memory that completes every op on the next poll, in order:
/// for tests, examples and the unreplicated target (the runtime's `MallocDevice` is the
/// hugepage-backed one a node uses). Out-of-range access panics: callers check ranges first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryDevice {
    pub bytes: Vec<u8>,
    done: Vec<(DeviceOpId, DeviceOpKind, u64, u32)>,
}

impl MemoryDevice {
    pub fn new(size_bytes: usize) -> Self {
        MemoryDevice {
            bytes: vec![0; size_bytes],
            done: Vec::new(),
        }
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemoryDevice {
            bytes,
            done: Vec::new(),
        }
    }
}

impl BlockDevice for MemoryDevice {
    fn size_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn submit(&mut self, op: DeviceOp<'_>) {
        let (start, end) = op.request.range();
        let (start, end) = (start as usize, end as usize);
        match op.request {
            DeviceRequest::Write { data, .. } => self.bytes[start..end].copy_from_slice(data),
            DeviceRequest::WriteZeroes { .. } => self.bytes[start..end].fill(0),
            DeviceRequest::Read { .. } | DeviceRequest::Flush => {}
        }
        // A read's data is taken at completion: the core never overlaps a read with a write.
        self.done
            .push((op.id, op.request.kind(), start as u64, (end - start) as u32));
    }

    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize {
        let done = std::mem::take(&mut self.done);
        for &(id, kind, offset, length) in &done {
            let data = match kind {
                DeviceOpKind::Read => {
                    &self.bytes[offset as usize..offset as usize + length as usize]
                }
                DeviceOpKind::Write | DeviceOpKind::Flush => &[][..],
            };
            complete(DeviceCompletion {
                id,
                result: Ok(data),
            });
        }
        let count = done.len();
        self.done = done;
        self.done.clear();
        count
    }

    fn read_now(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Option<Result<(), DeviceError>> {
        let start = offset_bytes as usize;
        buf.copy_from_slice(&self.bytes[start..start + buf.len()]);
        Some(Ok(()))
    }

    fn can_read_now(&self) -> bool {
        true
    }

    fn inflight_count(&self) -> usize {
        self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_ops_bound_each_namespace_and_reject_stale_ids() {
        let mut ops = InflightOps::<u8>::new(2, 2);
        let a = ops.start(1, 10);
        let b = ops.start(1, 11);
        assert!(!ops.has_room(1));
        assert!(ops.has_room(2));
        let c = ops.start(2, 12);
        assert!(!ops.is_empty());
        assert_eq!(ops.finish(a), Some((1, 10)));
        assert_eq!(ops.finish(a), None, "an id finishes once");
        let d = ops.start(1, 13);
        assert_ne!(a, d, "a reused slot gets a new id");
        assert_eq!(ops.finish(a), None);
        assert_eq!(ops.finish(DeviceOpId(u64::MAX)), None);
        for id in [b, c, d] {
            assert!(ops.finish(id).is_some());
        }
        assert!(ops.is_empty());
    }

    #[test]
    fn inflight_iteration_yields_exactly_the_live_ops_wherever_their_slots_are() {
        let mut ops = InflightOps::<u32>::new(2, 8);
        let ids: Vec<_> = (0..16).map(|i| ops.start(1 + i % 2, i)).collect();
        // Free every third, so live slots sit behind freed ones.
        for id in ids.iter().step_by(3) {
            assert!(ops.finish(*id).is_some());
        }
        let mut live: Vec<u32> = ops.iter().map(|(_, &purpose)| purpose).collect();
        live.sort_unstable();
        let expected: Vec<u32> = (0..16).filter(|i| i % 3 != 0).collect();
        assert_eq!(live, expected);
        // Reused slots come back into the iteration, freed ones leave it.
        let e = ops.start(1, 100);
        assert!(ops
            .iter()
            .any(|(nsid, &purpose)| nsid == 1 && purpose == 100));
        assert!(ops.finish(e).is_some());
        assert_eq!(ops.iter().count(), expected.len());
    }

    #[test]
    fn memory_device_completes_in_order_on_the_next_poll() {
        let mut device = MemoryDevice::new(8192);
        let data = [7u8; 512];
        device.submit(DeviceOp {
            id: DeviceOpId(1),
            nsid: 1,
            request: DeviceRequest::Write {
                offset_bytes: 512,
                data: &data,
            },
        });
        device.submit(DeviceOp {
            id: DeviceOpId(2),
            nsid: 1,
            request: DeviceRequest::Read {
                offset_bytes: 0,
                length_bytes: 1024,
            },
        });
        assert_eq!(device.inflight_count(), 2);
        let mut seen = Vec::new();
        device.poll_completions(&mut |completion| {
            let data = completion.result.unwrap();
            seen.push((
                completion.id,
                data.len(),
                data.iter().map(|&b| b as u32).sum::<u32>(),
            ));
        });
        assert_eq!(
            seen,
            [(DeviceOpId(1), 0, 0), (DeviceOpId(2), 1024, 7 * 512)]
        );
        assert_eq!(device.inflight_count(), 0);
    }

    #[test]
    fn extents_are_checked_against_namespace_sizes() {
        let sizes = [4096, 8192];
        assert_eq!(check_extent(&sizes, 2, 4096, 4096), Ok(()));
        assert_eq!(
            check_extent(&sizes, 1, 4096, 512),
            Err(ExtentError::OutOfRange)
        );
        assert_eq!(
            check_extent(&sizes, 0, 0, 512),
            Err(ExtentError::NoNamespace)
        );
        assert_eq!(
            check_extent(&sizes, 3, 0, 512),
            Err(ExtentError::NoNamespace)
        );
        assert_eq!(
            check_extent(&sizes, 1, u64::MAX, 512),
            Err(ExtentError::OutOfRange)
        );
    }
}
