//! Pollers and messages on SPDK threads.
//!
//! Everything the SPDK runtime owns lives on the `spdk_thread` that made it; other threads reach
//! it with [`send`] (SPDK's lock-free message ring), never with a lock on the I/O path.

use std::ffi::c_void;

use crate::sys;

/// An SPDK thread, to send messages to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thread(*mut sys::spdk_thread);

// SAFETY: an spdk_thread pointer is only a name for the thread here; SPDK's message API
// (`spdk_thread_send_msg`) is made to be called with it from any thread.
unsafe impl Send for Thread {}
// SAFETY: see `Send`: sharing the name is as safe as sending it.
unsafe impl Sync for Thread {}

impl Thread {
    /// The SPDK thread the caller runs on (`None` outside SPDK threads).
    pub fn current() -> Option<Thread> {
        // SAFETY: spdk_get_thread only reads a thread-local.
        let thread = unsafe { sys::spdk_get_thread() };
        (!thread.is_null()).then_some(Thread(thread))
    }

    pub fn is_current(self) -> bool {
        Thread::current() == Some(self)
    }

    pub fn as_ptr(self) -> *mut sys::spdk_thread {
        self.0
    }

    pub fn from_ptr(thread: *mut sys::spdk_thread) -> Thread {
        Thread(thread)
    }
}

type Message = Box<dyn FnOnce() + Send>;

unsafe extern "C" fn run_message(ctx: *mut c_void) {
    // SAFETY: ctx is the Box<Message> leaked by `send` and reaches this function exactly once.
    let message = unsafe { Box::from_raw(ctx as *mut Message) };
    message();
}

/// Runs `f` on `thread` (from any thread). Fails when SPDK's message pool is exhausted.
pub fn send(thread: Thread, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
    let message: Box<Message> = Box::new(Box::new(f));
    let ctx = Box::into_raw(message) as *mut c_void;
    // SAFETY: `thread` names a live SPDK thread; on success SPDK calls run_message(ctx) once on
    // it, which frees ctx; on failure ctx is freed here.
    let rc = unsafe { sys::spdk_thread_send_msg(thread.0, Some(run_message), ctx) };
    if rc != 0 {
        // SAFETY: SPDK did not take ctx.
        drop(unsafe { Box::from_raw(ctx as *mut Message) });
        return Err(format!("spdk_thread_send_msg failed: {rc}"));
    }
    Ok(())
}

type PollFn = Box<dyn FnMut() -> usize>;

/// A poller on the current SPDK thread: calls its closure every `period_us` (0: every reactor
/// loop) until dropped. Must be dropped on the thread that registered it.
pub struct Poller {
    poller: *mut sys::spdk_poller,
    closure: *mut PollFn,
}

unsafe extern "C" fn run_poller(ctx: *mut c_void) -> i32 {
    // SAFETY: ctx is the PollFn box owned by the Poller, which unregisters before freeing it;
    // SPDK calls pollers only on their own thread, so the closure is never entered twice.
    let closure = unsafe { &mut *(ctx as *mut PollFn) };
    if closure() > 0 {
        sys::spdk_thread_poller_rc::SPDK_POLLER_BUSY as i32
    } else {
        sys::spdk_thread_poller_rc::SPDK_POLLER_IDLE as i32
    }
}

impl Poller {
    /// Registers `poll` (returning the work it did) on the current SPDK thread.
    pub fn register(
        name: &str,
        period_us: u64,
        poll: impl FnMut() -> usize + 'static,
    ) -> Result<Poller, String> {
        if Thread::current().is_none() {
            return Err(format!("poller {name}: not on an SPDK thread"));
        }
        let closure: *mut PollFn = Box::into_raw(Box::new(Box::new(poll)));
        let cname = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: on an SPDK thread (checked); run_poller receives `closure`, alive until drop.
        let poller = unsafe {
            sys::spdk_poller_register_named(
                Some(run_poller),
                closure as *mut c_void,
                period_us,
                cname.as_ptr(),
            )
        };
        if poller.is_null() {
            // SAFETY: SPDK did not take the closure.
            drop(unsafe { Box::from_raw(closure) });
            return Err(format!("spdk_poller_register({name}) failed"));
        }
        Ok(Poller { poller, closure })
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        // SAFETY: the poller was registered on this thread and is unregistered once; SPDK
        // never calls it afterwards, so the closure can be freed.
        unsafe {
            sys::spdk_poller_unregister(&mut self.poller);
            drop(Box::from_raw(self.closure));
        }
    }
}

type Waiter = Box<dyn FnMut() -> bool>;

thread_local! {
    static WAITERS: std::cell::RefCell<Vec<Waiter>> = const { std::cell::RefCell::new(Vec::new()) };
    static WAITER_POLLER: std::cell::RefCell<Option<Poller>> = const { std::cell::RefCell::new(None) };
}

/// Calls `check` about every millisecond on the current SPDK thread until it returns true (an
/// RPC that waits for a CP answers from it). The first call makes the thread's waiter poller.
pub fn poll_until(check: impl FnMut() -> bool + 'static) -> Result<(), String> {
    WAITERS.with(|waiters| waiters.borrow_mut().push(Box::new(check)));
    WAITER_POLLER.with(|slot| {
        if slot.borrow().is_some() {
            return Ok(());
        }
        let poller = Poller::register("nvmirror_waiters", 1000, || {
            // Waiters may add waiters: run the current ones with the list released.
            let mut current = WAITERS.with(|waiters| std::mem::take(&mut *waiters.borrow_mut()));
            let before = current.len();
            current.retain_mut(|check| !check());
            let done = before - current.len();
            WAITERS.with(|waiters| {
                let mut waiters = waiters.borrow_mut();
                current.append(&mut waiters);
                *waiters = current;
            });
            done
        })?;
        *slot.borrow_mut() = Some(poller);
        Ok(())
    })
}

/// Ends the waiter poller (at shutdown, on its thread).
pub fn stop_waiting() {
    WAITER_POLLER.with(|slot| slot.borrow_mut().take());
    WAITERS.with(|waiters| waiters.borrow_mut().clear());
}
