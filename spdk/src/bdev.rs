//! Any SPDK bdev (malloc, NVMe, AIO, ...) as a namespace device of the engine core: each
//! [`DeviceOp`] becomes an SPDK bdev I/O on the node's thread and its completion callback
//! queues the [`DeviceCompletion`] that the next poll hands back (invariant 8: nothing waits).
//!
//! A write whose data lies in memory registered with SPDK (the NVRAM ring) is submitted from
//! where it is: the core leaves that buffer unchanged until the completion is handled. Other
//! data (CP staging blocks) is copied into a DMA buffer first. Reads land in DMA buffers taken
//! from a small pool. An I/O SPDK cannot take now (`-ENOMEM`) waits in a queue and is submitted
//! again on the next poll, never failed for it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{c_void, CString};
use std::rc::Rc;

use nvmirror_engine::device::{
    BlockDevice, DeviceCompletion, DeviceError, DeviceOp, DeviceOpId, DeviceOpKind, DeviceRequest,
};
use nvmirror_engine::geometry::SECTOR_SIZE;
use nvmirror_runtime::bdev::NamespaceDevice;

use crate::dma::{is_registered, DmaBuf};
use crate::sys;

/// An open SPDK bdev, claimed by the nvmirror module (nothing else writes it) and with an I/O
/// channel on the thread that opened it.
pub struct OpenBdev {
    name: String,
    desc: *mut sys::spdk_bdev_desc,
    bdev: *mut sys::spdk_bdev,
    channel: *mut sys::spdk_io_channel,
    /// Opened for writing and claimed (a namespace), or read-only beside the claimer.
    claimed: bool,
}

unsafe extern "C" fn bdev_event(
    kind: sys::spdk_bdev_event_type::Type,
    bdev: *mut sys::spdk_bdev,
    _ctx: *mut c_void,
) {
    // SAFETY: SPDK passes a live bdev to its event callback.
    let name = unsafe { bdev_name(bdev) };
    if kind == sys::spdk_bdev_event_type::SPDK_BDEV_EVENT_REMOVE {
        log::error!("bdev {name} is being removed under nvmirror");
        crate::module::base_bdev_removed(&name);
    } else {
        log::info!("bdev {name}: event {kind}");
    }
}

/// # Safety
/// `bdev` is a live bdev.
pub(crate) unsafe fn bdev_name(bdev: *const sys::spdk_bdev) -> String {
    // SAFETY: a live bdev's name is a NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(sys::spdk_bdev_get_name(bdev)) }
        .to_string_lossy()
        .into_owned()
}

impl OpenBdev {
    /// Opens `name` for writing on the current SPDK thread and claims it for nvmirror.
    pub fn open(name: &str) -> Result<OpenBdev, String> {
        Self::open_as(name, true)
    }

    /// Opens `name` read-only, beside whoever claimed it (a whole-device checksum).
    pub fn open_read_only(name: &str) -> Result<OpenBdev, String> {
        Self::open_as(name, false)
    }

    fn open_as(name: &str, claim: bool) -> Result<OpenBdev, String> {
        if crate::thread::Thread::current().is_none() {
            return Err(format!("bdev {name}: not on an SPDK thread"));
        }
        let cname = CString::new(name).map_err(|e| e.to_string())?;
        let mut desc = std::ptr::null_mut();
        // SAFETY: on an SPDK thread; desc is written on success only.
        let rc = unsafe {
            sys::spdk_bdev_open_ext(
                cname.as_ptr(),
                claim,
                Some(bdev_event),
                std::ptr::null_mut(),
                &mut desc,
            )
        };
        if rc == -libc::EPERM && claim {
            // SPDK refuses a writer on a bdev another module claimed.
            return Err(format!(
                "bdev {name} is claimed by another module (used by another bdev or nvmirror volume)"
            ));
        }
        if rc != 0 {
            return Err(format!(
                "cannot open bdev {name}: {}{}",
                std::io::Error::from_raw_os_error(-rc),
                if rc == -libc::ENODEV {
                    " (create it first, e.g. bdev_malloc_create)"
                } else {
                    ""
                }
            ));
        }
        // SAFETY: desc is an open descriptor.
        let bdev = unsafe { sys::spdk_bdev_desc_get_bdev(desc) };
        if claim {
            // SAFETY: bdev and desc are live; the module is nvmirror's, registered at load.
            let rc = unsafe {
                sys::spdk_bdev_module_claim_bdev(bdev, desc, sys::nvmirror_bdev_module())
            };
            if rc != 0 {
                // SAFETY: opened above, closed once.
                unsafe { sys::spdk_bdev_close(desc) };
                return Err(format!(
                    "bdev {name} is claimed by another module (used by another bdev or nvmirror volume)"
                ));
            }
        }
        // SAFETY: desc is open; the channel belongs to the current thread.
        let channel = unsafe { sys::spdk_bdev_get_io_channel(desc) };
        let open = OpenBdev {
            name: name.into(),
            desc,
            bdev,
            channel,
            claimed: claim,
        };
        if channel.is_null() {
            return Err(format!("bdev {name}: no I/O channel"));
        }
        Ok(open)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn block_size(&self) -> u32 {
        // SAFETY: the bdev is open.
        unsafe { sys::spdk_bdev_get_block_size(self.bdev) }
    }

    pub fn size_bytes(&self) -> u64 {
        // SAFETY: the bdev is open.
        u64::from(self.block_size()) * unsafe { sys::spdk_bdev_get_num_blocks(self.bdev) }
    }

    pub fn supports(&self, io_type: sys::spdk_bdev_io_type::Type) -> bool {
        // SAFETY: the bdev is open.
        unsafe { sys::spdk_bdev_io_type_supported(self.bdev, io_type) }
    }

    pub fn bdev(&self) -> *mut sys::spdk_bdev {
        self.bdev
    }
}

impl Drop for OpenBdev {
    fn drop(&mut self) {
        // SAFETY: opened (claimed when `claimed`) and given a channel on this thread by
        // `open_as`; each released once, channel first.
        unsafe {
            if !self.channel.is_null() {
                sys::spdk_put_io_channel(self.channel);
            }
            if self.claimed {
                sys::spdk_bdev_module_release_bdev(self.bdev);
            }
            sys::spdk_bdev_close(self.desc);
        }
    }
}

/// A finished op, waiting for the next poll.
struct Done {
    id: DeviceOpId,
    kind: DeviceOpKind,
    length: usize,
    buf: Option<DmaBuf>,
    ok: bool,
}

/// DMA buffers by power-of-two size class, reused across ops.
#[derive(Default)]
struct BufPool {
    classes: Vec<Vec<DmaBuf>>,
}

const POOL_KEEP_PER_CLASS: usize = 256;

impl BufPool {
    fn class_of(len: usize) -> usize {
        len.max(SECTOR_SIZE).next_power_of_two().trailing_zeros() as usize
    }

    fn take(&mut self, len: usize) -> Result<DmaBuf, String> {
        let class = Self::class_of(len);
        if let Some(buf) = self.classes.get_mut(class).and_then(Vec::pop) {
            return Ok(buf);
        }
        DmaBuf::new(1 << class)
    }

    fn give(&mut self, buf: DmaBuf) {
        let class = Self::class_of(buf.len());
        if self.classes.len() <= class {
            self.classes.resize_with(class + 1, Vec::new);
        }
        if self.classes[class].len() < POOL_KEEP_PER_CLASS {
            self.classes[class].push(buf);
        }
    }
}

/// What the completion callback of one submitted op needs.
struct OpContext {
    id: DeviceOpId,
    kind: DeviceOpKind,
    length: usize,
    buf: Option<DmaBuf>,
    done: Rc<RefCell<VecDeque<Done>>>,
}

impl OpContext {
    /// The op ended: its completion waits for the next poll.
    fn finish(self, ok: bool) {
        let OpContext {
            id,
            kind,
            length,
            buf,
            done,
        } = self;
        done.borrow_mut().push_back(Done {
            id,
            kind,
            length,
            buf,
            ok,
        });
    }
}

/// An op SPDK could not take yet (`-ENOMEM`).
struct Waiting {
    context: Box<OpContext>,
    offset_bytes: u64,
    /// Data submitted in place (registered memory), when `context.buf` holds no copy.
    in_place: Option<*const u8>,
    zeroes: bool,
}

/// An SPDK bdev serving one namespace of the engine.
pub struct BdevDevice {
    bdev: OpenBdev,
    size_bytes: u64,
    flush_supported: bool,
    done: Rc<RefCell<VecDeque<Done>>>,
    waiting: VecDeque<Waiting>,
    pool: BufPool,
    inflight: usize,
}

// SAFETY: a BdevDevice is made, used and dropped on one SPDK thread (the node's): its bdev
// channel and the Rc shared with completion callbacks never cross threads. `Send` is asked by
// `NamespaceDevice` because the embedded runtime builds nodes on one thread and runs them on
// another; the SPDK runtime never moves a node.
unsafe impl Send for BdevDevice {}

unsafe extern "C" fn op_done(bdev_io: *mut sys::spdk_bdev_io, success: bool, ctx: *mut c_void) {
    // SAFETY: ctx is the Box<OpContext> leaked at submission, reaching its callback once.
    let context = unsafe { Box::from_raw(ctx as *mut OpContext) };
    // SAFETY: SPDK hands the callback its finished I/O to free.
    unsafe { sys::spdk_bdev_free_io(bdev_io) };
    (*context).finish(success);
}

impl BdevDevice {
    /// Opens bdev `name` as a namespace (on the node's SPDK thread).
    pub fn open(name: &str) -> Result<BdevDevice, String> {
        let bdev = OpenBdev::open(name)?;
        let block_size = bdev.block_size();
        if block_size as usize != SECTOR_SIZE {
            return Err(format!(
                "bdev {name} has {block_size}-byte blocks; nvmirror namespaces use {SECTOR_SIZE}-byte sectors (e.g. bdev_malloc_create -b {name} -s 512 ...)"
            ));
        }
        let size_bytes = bdev.size_bytes();
        let flush_supported = bdev.supports(sys::spdk_bdev_io_type::SPDK_BDEV_IO_TYPE_FLUSH);
        Ok(BdevDevice {
            bdev,
            size_bytes,
            flush_supported,
            done: Rc::new(RefCell::new(VecDeque::new())),
            waiting: VecDeque::new(),
            pool: BufPool::default(),
            inflight: 0,
        })
    }

    pub fn name(&self) -> &str {
        self.bdev.name()
    }

    /// Submits one op to SPDK: `Err(context)` when SPDK cannot take it now (`-ENOMEM`).
    fn start(&mut self, waiting: Waiting) -> Result<(), Waiting> {
        let Waiting {
            context,
            offset_bytes,
            in_place,
            zeroes,
        } = waiting;
        let (desc, channel) = (self.bdev.desc, self.bdev.channel);
        let length = context.length as u64;
        let kind = context.kind;
        let data_ptr = match (&context.buf, in_place) {
            (Some(buf), _) => buf.as_ptr() as *mut c_void,
            (None, Some(ptr)) => ptr as *mut c_void,
            (None, None) => std::ptr::null_mut(),
        };
        let ctx = Box::into_raw(context) as *mut c_void;
        // SAFETY: desc and channel are this thread's; data_ptr points at `length` bytes that
        // stay untouched until op_done runs (a DMA buffer owned by ctx, or ring memory the core
        // leaves unchanged until it handled the completion). op_done frees ctx.
        let rc = unsafe {
            match kind {
                DeviceOpKind::Read => sys::spdk_bdev_read(
                    desc,
                    channel,
                    data_ptr,
                    offset_bytes,
                    length,
                    Some(op_done),
                    ctx,
                ),
                DeviceOpKind::Write if zeroes => sys::spdk_bdev_write_zeroes(
                    desc,
                    channel,
                    offset_bytes,
                    length,
                    Some(op_done),
                    ctx,
                ),
                DeviceOpKind::Write => sys::spdk_bdev_write(
                    desc,
                    channel,
                    data_ptr,
                    offset_bytes,
                    length,
                    Some(op_done),
                    ctx,
                ),
                DeviceOpKind::Flush => {
                    sys::spdk_bdev_flush(desc, channel, 0, self.size_bytes, Some(op_done), ctx)
                }
            }
        };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: SPDK did not take ctx (the call failed).
        let context = unsafe { Box::from_raw(ctx as *mut OpContext) };
        if rc == -libc::ENOMEM {
            return Err(Waiting {
                context,
                offset_bytes,
                in_place,
                zeroes,
            });
        }
        log::error!(
            "bdev {}: {kind} of {length} bytes at {offset_bytes} refused: {}",
            self.name(),
            std::io::Error::from_raw_os_error(-rc)
        );
        (*context).finish(false);
        Ok(())
    }

    fn retry_waiting(&mut self) {
        while let Some(waiting) = self.waiting.pop_front() {
            if let Err(waiting) = self.start(waiting) {
                self.waiting.push_front(waiting);
                return;
            }
        }
    }
}

impl BlockDevice for BdevDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn submit(&mut self, op: DeviceOp<'_>) {
        self.inflight += 1;
        let (offset_bytes, end) = op.request.range();
        let length = (end - offset_bytes) as usize;
        let kind = op.request.kind();
        let mut in_place = None;
        let mut zeroes = false;
        let buf = match op.request {
            DeviceRequest::Read { .. } => Some(self.pool.take(length)),
            DeviceRequest::Write { data, .. } if is_registered(data) => {
                in_place = Some(data.as_ptr());
                None
            }
            DeviceRequest::Write { data, .. } => Some(self.pool.take(length).map(|mut buf| {
                buf.as_mut_slice()[..length].copy_from_slice(data);
                buf
            })),
            DeviceRequest::WriteZeroes { .. } => {
                zeroes = true;
                None
            }
            DeviceRequest::Flush => None,
        };
        let (buf, failed) = match buf.transpose() {
            Ok(buf) => (buf, None),
            Err(reason) => (None, Some(reason)),
        };
        let context = Box::new(OpContext {
            id: op.id,
            kind,
            length,
            buf,
            done: self.done.clone(),
        });
        if let Some(reason) = failed {
            log::error!("bdev {}: {kind} at {offset_bytes}: {reason}", self.name());
            return (*context).finish(false);
        }
        if kind == DeviceOpKind::Flush && !self.flush_supported {
            // A bdev without flush has no volatile cache: its completed writes are durable.
            return (*context).finish(true);
        }
        let waiting = Waiting {
            context,
            offset_bytes,
            in_place,
            zeroes,
        };
        if !self.waiting.is_empty() {
            self.waiting.push_back(waiting);
        } else if let Err(waiting) = self.start(waiting) {
            self.waiting.push_back(waiting);
        }
    }

    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize {
        self.retry_waiting();
        let mut count = 0;
        loop {
            let Some(done) = self.done.borrow_mut().pop_front() else {
                break;
            };
            count += 1;
            self.inflight -= 1;
            let result = if !done.ok {
                Err(DeviceError {
                    kind: std::io::ErrorKind::Other,
                    errno: Some(libc::EIO),
                })
            } else if done.kind == DeviceOpKind::Read {
                Ok(&done.buf.as_ref().expect("a read has its buffer").as_slice()[..done.length])
            } else {
                Ok(&[][..])
            };
            complete(DeviceCompletion {
                id: done.id,
                result,
            });
            if let Some(buf) = done.buf {
                self.pool.give(buf);
            }
        }
        count
    }

    fn inflight_count(&self) -> usize {
        self.inflight
    }
}

impl NamespaceDevice for BdevDevice {}

/// What a checksum reports: the bdev's size and CRC32C, or why it could not be read.
type ChecksumDone = Box<dyn FnOnce(Result<(u64, u32), String>)>;

/// A whole-bdev read computing a CRC32C, one chunk in flight at a time.
struct Checksum {
    bdev: OpenBdev,
    buf: DmaBuf,
    offset: u64,
    size: u64,
    crc: u32,
    done: Option<ChecksumDone>,
}

const CHECKSUM_CHUNK_BYTES: usize = 1 << 20;

impl Checksum {
    /// Starts the next chunk's read, or finishes. Consumes the state into the callback.
    fn next(self: Box<Self>) {
        if self.offset >= self.size {
            let result = Ok((self.size, self.crc));
            return (*self).finish(result);
        }
        let length = (self.size - self.offset).min(CHECKSUM_CHUNK_BYTES as u64);
        let (desc, channel, buf, offset) = (
            self.bdev.desc,
            self.bdev.channel,
            self.buf.as_ptr(),
            self.offset,
        );
        let ctx = Box::into_raw(self);
        // SAFETY: a read-only descriptor and its channel on this thread; buf (owned by the
        // state, leaked to the callback) holds at least `length` bytes.
        let rc = unsafe {
            sys::spdk_bdev_read(
                desc,
                channel,
                buf.cast(),
                offset,
                length,
                Some(checksum_chunk_done),
                ctx.cast(),
            )
        };
        if rc != 0 {
            // SAFETY: SPDK did not take ctx.
            let state = unsafe { Box::from_raw(ctx) };
            let reason = format!(
                "bdev {}: read at {offset} refused: {}",
                state.bdev.name,
                std::io::Error::from_raw_os_error(-rc)
            );
            (*state).finish(Err(reason));
        }
    }

    fn finish(mut self, result: Result<(u64, u32), String>) {
        let done = self.done.take();
        // The descriptor closes before the caller hears the result.
        drop(self);
        if let Some(done) = done {
            done(result);
        }
    }
}

unsafe extern "C" fn checksum_chunk_done(
    bdev_io: *mut sys::spdk_bdev_io,
    success: bool,
    ctx: *mut c_void,
) {
    // SAFETY: ctx is the Box<Checksum> leaked by `next`; SPDK frees nothing of ours.
    let mut state = unsafe { Box::from_raw(ctx as *mut Checksum) };
    // SAFETY: the finished I/O is ours to free.
    unsafe { sys::spdk_bdev_free_io(bdev_io) };
    if !success {
        let reason = format!("bdev {}: read at {} failed", state.bdev.name, state.offset);
        return (*state).finish(Err(reason));
    }
    let length = (state.size - state.offset).min(CHECKSUM_CHUNK_BYTES as u64) as usize;
    state.crc = crc32c::crc32c_append(state.crc, &state.buf.as_slice()[..length]);
    state.offset += length as u64;
    state.next();
}

/// Reads all of bdev `name` through a read-only descriptor of its own (whoever claimed the bdev
/// keeps it) and calls `done` with its size and CRC32C: how a test or an operator compares a
/// mirror with its primary after a CP. Runs on the current SPDK thread.
pub fn checksum(
    name: &str,
    done: impl FnOnce(Result<(u64, u32), String>) + 'static,
) -> Result<(), String> {
    let bdev = OpenBdev::open_read_only(name)?;
    let size = bdev.size_bytes();
    let buf = DmaBuf::new(CHECKSUM_CHUNK_BYTES)?;
    Box::new(Checksum {
        bdev,
        buf,
        offset: 0,
        size,
        crc: 0,
        done: Some(Box::new(done)),
    })
    .next();
    Ok(())
}
