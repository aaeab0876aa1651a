//! `bdev_nvmirror`: the replicated virtual bdev, shaped like SPDK's passthru and raid vbdevs
//! but with the engine in the I/O path. SPDK's nvmf target (or bdevperf, or any bdev user)
//! submits to it; every write goes through the engine's source (NVRAM ring, data transfer,
//! synchronous ack from the destination, later a CP), a read reaches the primary once the
//! writes it must see landed there.
//!
//! I/O arrives on whatever SPDK thread the user's channel belongs to (an nvmf poll group). It is
//! queued in the volume's [`Inbox`] (a short mutex, no SPDK message per I/O), taken by
//! [`BdevFrontEnd`] on the node's poll, and its completion queued in its channel's outbox,
//! which a poller of that channel's thread drains: SPDK completes an I/O only on its own
//! thread, and a batch per poll costs less than a message per I/O.
//!
//! Until the node's role is settled (the handshake compared generations) the front end does not
//! exist and I/O is answered with a path error (Asymmetric Access Inaccessible, DNR clear): a
//! stale former source serves nothing, and hosts retry.

use std::collections::VecDeque;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use nvmirror_engine::geometry::{SECTOR_SIZE, WRITE_BYTES_MAX, WRITE_ZEROES_BYTES_MAX};
use nvmirror_nvmf::io::status_from;
use nvmirror_nvmf::token_table::TokenTable;
use nvmirror_nvmf::{Backend, BackendError, IoToken};
use nvmirror_runtime::node::{FrontEnd, Volume};

use crate::sys;
use crate::thread::{Poller, Thread};

use sys::spdk_bdev_io_type as io_type;

/// A bdev I/O pointer that crosses to the node's thread and back (SPDK completes an I/O only
/// on its own thread, which [`complete`] sees to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct IoPtr(*mut sys::spdk_bdev_io);

// SAFETY: the pointer is only a handle while it travels; it is dereferenced through SPDK's API
// on the node's thread (submission) and completed on the I/O's own thread.
unsafe impl Send for IoPtr {}

/// I/O of a volume's bdevs waiting for the node's poll: (nsid, I/O). Once closed (the node
/// stopped) an I/O is failed at once instead.
#[derive(Clone, Default)]
pub struct Inbox(Arc<Mutex<InboxState>>);

#[derive(Default)]
struct InboxState {
    waiting: VecDeque<(u32, IoPtr)>,
    /// The node's role is settled and its front end takes I/O.
    serving: bool,
    closed: bool,
}

impl Inbox {
    fn push(&self, nsid: u32, io: IoPtr) {
        let mut inbox = self.0.lock().unwrap();
        if inbox.closed || !inbox.serving {
            let serving = inbox.serving;
            drop(inbox);
            // Before the handshake settled the node's role (a stale or split source must not
            // answer), an I/O gets the path error a host's multipath retries elsewhere or later
            // (DNR clear), as the embedded runtime's missing listener refuses the connection.
            complete(
                io,
                if serving {
                    Completion::Aborted
                } else {
                    Completion::from_error(BackendError::PathInaccessible)
                },
            );
            return;
        }
        inbox.waiting.push_back((nsid, io));
    }

    /// The node serves: I/O queues for its front end from now on.
    fn serve(&self) {
        self.0.lock().unwrap().serving = true;
    }

    fn take_all(&self, into: &mut VecDeque<(u32, IoPtr)>) {
        let mut inbox = self.0.lock().unwrap();
        if into.is_empty() {
            std::mem::swap(&mut inbox.waiting, into);
        } else {
            into.extend(inbox.waiting.drain(..));
        }
    }

    /// Fails every waiting I/O and every later one (the volume's node stopped).
    pub fn close(&self) {
        let waiting: Vec<_> = {
            let mut inbox = self.0.lock().unwrap();
            inbox.closed = true;
            inbox.waiting.drain(..).collect()
        };
        for (_, io) in waiting {
            complete(io, Completion::Aborted);
        }
    }
}

/// How an I/O ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Completion {
    Success,
    Nvme { sct: u8, sc: u8 },
    Aborted,
    Failed,
}

impl Completion {
    /// The NVMe status of a backend error: the target's one mapping
    /// ([`nvmirror_nvmf::io::status_from`]).
    fn from_error(error: BackendError) -> Completion {
        let status = status_from(error);
        Completion::Nvme {
            sct: status.sct.to_bits(),
            sc: status.sc,
        }
    }
}

/// Completions of one channel's I/O, drained on the channel's thread.
type Outbox = Mutex<Vec<(IoPtr, Completion)>>;

/// What the module keeps in each I/O's driver context (NVMIRROR_BDEV_IO_CTX_BYTES).
#[repr(C)]
struct IoContext {
    /// The outbox of the channel the I/O was submitted on (alive while the I/O is).
    outbox: *const Outbox,
}

const _: () = assert!(std::mem::size_of::<IoContext>() == sys::NVMIRROR_BDEV_IO_CTX_BYTES as usize);

fn io_context(io: *mut sys::spdk_bdev_io) -> *mut IoContext {
    // SAFETY: a live I/O of this module: its driver context is ours until it completes.
    unsafe { sys::nvmirror_bdev_io_driver_ctx(io) as *mut IoContext }
}

/// Completes `io` with `completion` (on the I/O's own thread).
///
/// # Safety
/// The caller runs on the I/O's thread; the I/O is live and completed once.
unsafe fn complete_on_thread(io: *mut sys::spdk_bdev_io, completion: Completion) {
    // SAFETY: per the contract.
    unsafe {
        match completion {
            Completion::Success => sys::spdk_bdev_io_complete(
                io,
                sys::spdk_bdev_io_status::SPDK_BDEV_IO_STATUS_SUCCESS,
            ),
            Completion::Nvme { sct, sc } => {
                sys::spdk_bdev_io_complete_nvme_status(io, 0, i32::from(sct), i32::from(sc))
            }
            Completion::Aborted => sys::spdk_bdev_io_complete(
                io,
                sys::spdk_bdev_io_status::SPDK_BDEV_IO_STATUS_ABORTED,
            ),
            Completion::Failed => {
                sys::spdk_bdev_io_complete(io, sys::spdk_bdev_io_status::SPDK_BDEV_IO_STATUS_FAILED)
            }
        }
    }
}

/// Completes `io` on its own thread: at once when that is the current one, else through its
/// channel's outbox.
fn complete(io: IoPtr, completion: Completion) {
    // SAFETY: a live I/O of ours.
    let thread = unsafe { sys::spdk_bdev_io_get_thread(io.0) };
    if Thread::from_ptr(thread).is_current() {
        // SAFETY: on the I/O's thread; completed once (the caller's contract).
        unsafe { complete_on_thread(io.0, completion) };
        return;
    }
    // SAFETY: the context is ours while the I/O lives; submit_request set its outbox, which
    // belongs to the I/O's channel, kept by SPDK until the channel's I/O completed.
    let outbox = unsafe { &*(*io_context(io.0)).outbox };
    outbox.lock().unwrap().push((io, completion));
}

/// One exported namespace: the SPDK bdev and what its callbacks reach.
struct Exported {
    bdev: sys::spdk_bdev,
    nsid: u32,
    inbox: Inbox,
    /// Kept for the bdev's name and product name pointers.
    _name: CString,
    _product: CString,
}

fn exported(io: *mut sys::spdk_bdev_io) -> &'static Exported {
    // SAFETY: every bdev of this module has its Exported (alive until the io device is
    // unregistered, after the last I/O) as its ctxt.
    unsafe { &*(sys::nvmirror_bdev_io_ctxt(io) as *const Exported) }
}

/// Hands `io` to the node (its next poll takes it from the inbox).
fn forward(io: *mut sys::spdk_bdev_io) {
    let exported = exported(io);
    exported.inbox.push(exported.nsid, IoPtr(io));
}

unsafe extern "C" fn read_buffer_ready(
    _ch: *mut sys::spdk_io_channel,
    io: *mut sys::spdk_bdev_io,
    success: bool,
) {
    if success {
        forward(io);
    } else {
        complete(IoPtr(io), Completion::Failed);
    }
}

unsafe extern "C" fn submit_request(ch: *mut sys::spdk_io_channel, io: *mut sys::spdk_bdev_io) {
    // SAFETY: ch is a channel of our io device: its context holds the ChannelState pointer
    // written by channel_create; the I/O's context is ours until it completes.
    unsafe {
        let state = *(sys::nvmirror_io_channel_get_ctx(ch) as *const *const ChannelState);
        *io_context(io) = IoContext {
            outbox: &(*state).outbox,
        };
    }
    let mut rw = sys::nvmirror_bdev_io_rw::default();
    // SAFETY: a live I/O submitted to us.
    unsafe { sys::nvmirror_bdev_io_rw(io, &mut rw) };
    if u32::from(rw.type_) == io_type::SPDK_BDEV_IO_TYPE_READ {
        // A read needs its buffer before the engine copies into it.
        // SAFETY: a live read; the callback runs once (at once if it has buffers).
        unsafe {
            sys::spdk_bdev_io_get_buf(
                io,
                Some(read_buffer_ready),
                rw.num_blocks * SECTOR_SIZE as u64,
            )
        };
    } else {
        forward(io);
    }
}

unsafe extern "C" fn io_type_supported(_ctx: *mut c_void, kind: io_type::Type) -> bool {
    matches!(
        kind,
        io_type::SPDK_BDEV_IO_TYPE_READ
            | io_type::SPDK_BDEV_IO_TYPE_WRITE
            | io_type::SPDK_BDEV_IO_TYPE_FLUSH
            | io_type::SPDK_BDEV_IO_TYPE_WRITE_ZEROES
            | io_type::SPDK_BDEV_IO_TYPE_RESET
    )
}

unsafe extern "C" fn get_io_channel(ctx: *mut c_void) -> *mut sys::spdk_io_channel {
    // SAFETY: ctx is our Exported, registered as an io device.
    unsafe { sys::spdk_get_io_channel(ctx) }
}

/// A channel of a replicated bdev (one per SPDK thread that submits to it): the outbox of its
/// I/O's completions and the poller that completes them on this thread.
struct ChannelState {
    outbox: Outbox,
    poller: Option<Poller>,
}

unsafe extern "C" fn channel_create(_device: *mut c_void, ctx: *mut c_void) -> i32 {
    let state = Box::into_raw(Box::new(ChannelState {
        outbox: Mutex::new(Vec::new()),
        poller: None,
    }));
    let address = state as usize;
    // Swapped with the outbox at each poll, so neither allocates once both have grown.
    let mut done = Vec::new();
    let poller = Poller::register("nvmirror_completions", 0, move || {
        // SAFETY: the state lives until channel_destroy, which drops this poller first; the
        // poller runs on this channel's thread only.
        let state = unsafe { &*(address as *const ChannelState) };
        std::mem::swap(&mut done, &mut *state.outbox.lock().unwrap());
        let count = done.len();
        for (io, completion) in done.drain(..) {
            // SAFETY: an I/O of this channel, on its thread, completed once (taken from the outbox).
            unsafe { complete_on_thread(io.0, completion) };
        }
        count
    });
    match poller {
        Ok(poller) => {
            // SAFETY: state is ours (leaked above); ctx holds a pointer's worth of bytes
            // (the io device was registered with that context size).
            unsafe {
                (*state).poller = Some(poller);
                *(ctx as *mut *mut ChannelState) = state;
            }
            0
        }
        Err(reason) => {
            log::error!("nvmirror bdev channel: {reason}");
            // SAFETY: not shared with anything yet.
            drop(unsafe { Box::from_raw(state) });
            -libc::ENOMEM
        }
    }
}

unsafe extern "C" fn channel_destroy(_device: *mut c_void, ctx: *mut c_void) {
    // SAFETY: ctx holds the ChannelState written by channel_create; SPDK destroys a channel
    // once, after its I/O completed, on its thread.
    let mut state = unsafe { Box::from_raw(*(ctx as *mut *mut ChannelState)) };
    state.poller.take();
    let left = std::mem::take(&mut *state.outbox.lock().unwrap());
    for (io, completion) in left {
        // SAFETY: on the channel's thread; each completed once.
        unsafe { complete_on_thread(io.0, completion) };
    }
}

unsafe extern "C" fn device_unregistered(ctx: *mut c_void) {
    // SAFETY: the Exported leaked by `export`, freed once its io device is gone.
    drop(unsafe { Box::from_raw(ctx as *mut Exported) });
}

unsafe extern "C" fn destruct(ctx: *mut c_void) -> i32 {
    // SAFETY: ctx is our Exported; it is freed when the io device is unregistered.
    unsafe { sys::spdk_io_device_unregister(ctx, Some(device_unregistered)) };
    0
}

static FN_TABLE: sys::spdk_bdev_fn_table = sys::spdk_bdev_fn_table {
    destruct: Some(destruct),
    submit_request: Some(submit_request),
    io_type_supported: Some(io_type_supported),
    get_io_channel: Some(get_io_channel),
    dump_info_json: None,
    write_config_json: None,
    get_spin_time: None,
    get_module_ctx: None,
    get_memory_domains: None,
    get_memory_domain_types: None,
    reset_device_stat: None,
    dump_device_stat_json: None,
    accel_sequence_supported: None,
};

/// What a replicated bdev looks like to its users.
pub struct BdevSpec {
    pub name: String,
    pub nsid: u32,
    pub size_bytes: u64,
    pub uuid: [u8; 16],
    /// Identify's volatile write cache: set when the ring medium needs a Flush for an
    /// acknowledged write to survive what the README's table says.
    pub write_cache: bool,
}

/// A registered replicated bdev; [`ExportedBdev::unregister`] removes it.
pub struct ExportedBdev {
    exported: *mut Exported,
    name: String,
}

impl ExportedBdev {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Unregisters the bdev (its users see it removed); SPDK destructs it once its I/O drained.
    pub fn unregister(self) {
        // SAFETY: the bdev is registered and unregistered once, on the app thread.
        unsafe {
            sys::spdk_bdev_unregister(&mut (*self.exported).bdev, None, std::ptr::null_mut())
        };
    }
}

/// Registers a replicated bdev whose I/O goes to `inbox`, on the current (node's) thread.
pub fn export(spec: &BdevSpec, inbox: &Inbox) -> Result<ExportedBdev, String> {
    Thread::current().ok_or("not on an SPDK thread")?;
    let name = CString::new(spec.name.as_str()).map_err(|e| e.to_string())?;
    let product = CString::new("nvmirror replicated volume").expect("no NUL");
    let mut bdev = sys::spdk_bdev {
        name: name.as_ptr() as *mut _,
        product_name: product.as_ptr() as *mut _,
        write_cache: i32::from(spec.write_cache),
        blocklen: SECTOR_SIZE as u32,
        blockcnt: spec.size_bytes / SECTOR_SIZE as u64,
        max_rw_size: (WRITE_BYTES_MAX / SECTOR_SIZE) as u32,
        max_write_zeroes: (WRITE_ZEROES_BYTES_MAX / SECTOR_SIZE as u64) as u32,
        fn_table: &FN_TABLE,
        // SAFETY: the module is nvmirror's, registered when the program loaded.
        module: unsafe { sys::nvmirror_bdev_module() },
        ..Default::default()
    };
    bdev.uuid.u.raw = spec.uuid;
    let exported = Box::into_raw(Box::new(Exported {
        bdev,
        nsid: spec.nsid,
        inbox: inbox.clone(),
        _name: name,
        _product: product,
    }));
    // SAFETY: exported is a stable heap address; it is the bdev's ctxt and the io device,
    // freed only when the io device is unregistered (after destruct).
    unsafe {
        (*exported).bdev.ctxt = exported.cast();
        sys::spdk_io_device_register(
            exported.cast(),
            Some(channel_create),
            Some(channel_destroy),
            std::mem::size_of::<*mut ChannelState>() as u32,
            (*exported)._name.as_ptr(),
        );
        let rc = sys::spdk_bdev_register(&mut (*exported).bdev);
        if rc != 0 {
            sys::spdk_io_device_unregister(exported.cast(), Some(device_unregistered));
            return Err(format!(
                "cannot register bdev {}: {}",
                spec.name,
                std::io::Error::from_raw_os_error(-rc)
            ));
        }
    }
    Ok(ExportedBdev {
        exported,
        name: spec.name.clone(),
    })
}

/// What an I/O in flight in the engine waits for.
#[derive(Debug, Clone, Copy)]
enum Waiting {
    /// A write, flush or write-zeroes: completes with the engine's result.
    Result(IoPtr),
    /// A read of this many bytes: its data is copied into the I/O's buffers first.
    Read(IoPtr, usize),
}

/// The replicated bdevs' I/O as a source's front end: bdev I/O in, engine completions out.
pub struct BdevFrontEnd {
    inbox: Inbox,
    pending: VecDeque<(u32, IoPtr)>,
    /// By token: consecutive tokens in consecutive entries (a SipHash map scattered them).
    waiting: TokenTable<Waiting>,
    scratch: Vec<u8>,
}

impl BdevFrontEnd {
    /// The front end of a settled source: its bdevs' I/O is taken from now on.
    pub fn new(inbox: Inbox) -> BdevFrontEnd {
        inbox.serve();
        BdevFrontEnd {
            inbox,
            pending: VecDeque::new(),
            waiting: TokenTable::default(),
            scratch: Vec::new(),
        }
    }

    /// Starts one I/O: `false` when the volume is busy (it stays first in line).
    fn start(&mut self, now_us: u64, volume: &mut Volume, nsid: u32, io: IoPtr) -> bool {
        let mut rw = sys::nvmirror_bdev_io_rw::default();
        // SAFETY: a live I/O of ours.
        unsafe { sys::nvmirror_bdev_io_rw(io.0, &mut rw) };
        let lba = rw.offset_blocks;
        let length = rw.num_blocks * SECTOR_SIZE as u64;
        let iovs = if rw.iovs.is_null() {
            &[][..]
        } else {
            // SAFETY: SPDK gives a read or write `iovcnt` iovecs (a read's after get_buf).
            unsafe { std::slice::from_raw_parts(rw.iovs, rw.iovcnt as usize) }
        };
        let started = match u32::from(rw.type_) {
            io_type::SPDK_BDEV_IO_TYPE_WRITE => {
                match volume.reserve_write(now_us, nsid, lba, length as u32) {
                    Ok(slot) => {
                        let mut offset = 0;
                        for iov in iovs {
                            // SAFETY: the iovec describes the write's data, alive until completion.
                            let data = unsafe {
                                std::slice::from_raw_parts(iov.iov_base as *const u8, iov.iov_len)
                            };
                            volume.fill_write(&slot, offset, data);
                            offset += data.len();
                        }
                        let token = volume.commit_write(now_us, slot);
                        Ok(Some((token, Waiting::Result(io))))
                    }
                    Err(error) => Err(error),
                }
            }
            io_type::SPDK_BDEV_IO_TYPE_READ => {
                match Backend::start_read(volume, now_us, nsid, lba, length as u32) {
                    Ok(Some(token)) => Ok(Some((token, Waiting::Read(io, length as usize)))),
                    Ok(None) => {
                        self.scratch.resize(length as usize, 0);
                        let result = Backend::read(volume, nsid, lba, &mut self.scratch);
                        result.map(|()| {
                            scatter(&self.scratch, iovs);
                            None
                        })
                    }
                    Err(error) => Err(error),
                }
            }
            io_type::SPDK_BDEV_IO_TYPE_FLUSH => volume
                .flush(now_us, nsid)
                .map(|token| Some((token, Waiting::Result(io)))),
            io_type::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => volume
                .write_zeroes(now_us, nsid, lba, length)
                .map(|token| Some((token, Waiting::Result(io)))),
            // No command is queued anywhere but in the engine, which completes them all.
            io_type::SPDK_BDEV_IO_TYPE_RESET => Ok(None),
            _ => {
                complete(io, Completion::Failed);
                return true;
            }
        };
        match started {
            Ok(Some((token, waiting))) => {
                self.waiting.insert_growing(token, waiting);
            }
            Ok(None) => complete(io, Completion::Success),
            Err(BackendError::Busy) => return false,
            Err(error) => complete(io, Completion::from_error(error)),
        }
        true
    }

    fn finish(&mut self, volume: &mut Volume, token: IoToken, result: Result<(), BackendError>) {
        let Some(waiting) = self.waiting.remove(&token) else {
            log::error!("nvmirror bdev: completion of unknown token {}", token.0);
            return;
        };
        match waiting {
            Waiting::Result(io) => complete(io, completion_of(result)),
            Waiting::Read(io, length) => {
                self.scratch.resize(length, 0);
                let result = Backend::finish_read(volume, token, &mut self.scratch);
                if result.is_ok() {
                    let mut rw = sys::nvmirror_bdev_io_rw::default();
                    // SAFETY: a live I/O of ours.
                    unsafe { sys::nvmirror_bdev_io_rw(io.0, &mut rw) };
                    // SAFETY: the read's iovecs (from get_buf), alive until completion.
                    let iovs = unsafe { std::slice::from_raw_parts(rw.iovs, rw.iovcnt as usize) };
                    scatter(&self.scratch, iovs);
                }
                complete(io, completion_of(result));
            }
        }
    }
}

fn completion_of(result: Result<(), BackendError>) -> Completion {
    match result {
        Ok(()) => Completion::Success,
        Err(error) => Completion::from_error(error),
    }
}

/// Copies `data` into the iovecs of a read.
fn scatter(data: &[u8], iovs: &[sys::iovec]) {
    let mut offset = 0;
    for iov in iovs {
        let take = iov.iov_len.min(data.len() - offset);
        // SAFETY: the iovec is a writable buffer of iov_len bytes, ours until completion.
        unsafe {
            std::ptr::copy_nonoverlapping(data[offset..].as_ptr(), iov.iov_base as *mut u8, take)
        };
        offset += take;
        if offset == data.len() {
            break;
        }
    }
}

impl FrontEnd for BdevFrontEnd {
    fn poll(&mut self, now_us: u64, volume: &mut Volume) -> usize {
        let mut work = self.poll_completions(now_us, volume);
        self.inbox.take_all(&mut self.pending);
        while let Some(&(nsid, io)) = self.pending.front() {
            if !self.start(now_us, volume, nsid, io) {
                break;
            }
            self.pending.pop_front();
            work += 1;
        }
        work
    }

    /// The I/O that the acknowledgements just received completed (the runner's pass right after
    /// a destination on this thread ran).
    fn poll_completions(&mut self, _now_us: u64, volume: &mut Volume) -> usize {
        let mut work = 0;
        while let Some((token, result)) = volume.poll_completion() {
            self.finish(volume, token, result);
            work += 1;
        }
        work
    }

    fn next_deadline_us(&self) -> Option<u64> {
        (!self.pending.is_empty()).then_some(0)
    }
}

impl Drop for BdevFrontEnd {
    fn drop(&mut self) {
        for (_, io) in self.pending.drain(..) {
            complete(io, Completion::Aborted);
        }
        for (_, waiting) in self.waiting.drain() {
            let (Waiting::Result(io) | Waiting::Read(io, _)) = waiting;
            complete(io, Completion::Aborted);
        }
        self.inbox.close();
    }
}
