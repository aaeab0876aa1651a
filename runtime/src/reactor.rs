//! The polled per-core loop, in the style of SPDK's reactor: one thread pinned to a core drains a
//! bounded batch of cross-thread messages, polls every poller, and when idle either keeps spinning
//! (lowest latency, one core burned) or, after a short spin, sleeps in ppoll(2) on the pollers'
//! file descriptors, the mailbox's eventfd and the earliest poller deadline. A polled process that
//! shares a core with another one collapses (PERF-NOTES: 130 IOPS); the adaptive policy avoids it.
//! The reactor knows nothing of the engine: pollers and the message handler bring that.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crossbeam_queue::ArrayQueue;

/// Messages handled per loop at most, so a flood of messages cannot starve the pollers.
pub const MAILBOX_BATCH: usize = 64;
/// The largest mailbox a reactor accepts.
pub const MAILBOX_CAPACITY_MAX: usize = 1 << 16;

const _: () = assert!(MAILBOX_BATCH <= MAILBOX_CAPACITY_MAX);

/// Microseconds since the first call in this process, from the monotonic clock. Every reactor
/// uses this clock, so deadlines computed on one thread mean the same on another.
pub fn monotonic_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    start.elapsed().as_micros() as u64
}

/// How often listeners are asked for new connections (SPDK polls its acceptor on a timer too):
/// an accept attempt per loop would be a wasted syscall per listener per loop. A new connection
/// waits at most this long.
pub const ACCEPT_POLL_PERIOD_US: u64 = 1000;

/// Work a poller does at most once per period (accepting connections), not on every loop.
#[derive(Debug, Clone, Copy)]
pub struct Period {
    period_us: u64,
    next_us: u64,
}

impl Period {
    pub const fn new(period_us: u64) -> Self {
        Period {
            period_us,
            next_us: 0,
        }
    }

    /// True at most once per period; the first call is always due.
    pub fn due(&mut self, now_us: u64) -> bool {
        if now_us < self.next_us {
            return false;
        }
        self.next_us = now_us + self.period_us;
        true
    }
}

/// A mailbox the reactor arms before it sleeps, so that a sender wakes it: its own, and those
/// its pollers drain ([`Poller::doorbells`]).
pub trait Doorbell {
    /// From now on a sender writes the eventfd; returns whether messages already wait (then
    /// the reactor must not sleep).
    fn arm(&self) -> bool;
    /// Senders stop writing the eventfd; `rung`: it was readable, drain it.
    fn disarm(&self, rung: bool);
    fn raw_fd(&self) -> RawFd;
}

/// One unit of polled work on a reactor (a listener, a connection, a timer wheel).
pub trait Poller {
    /// One bounded pass; returns the work done (0 = idle).
    fn poll(&mut self, now_us: u64) -> usize;
    /// Appends the fds whose readability should wake the reactor when it sleeps. They must stay
    /// open while registered (a closed fd makes every sleep return at once).
    fn wait_fds(&self, out: &mut Vec<RawFd>);
    /// The earliest [`monotonic_us`] time at which this poller needs a poll without I/O.
    fn next_deadline_us(&self) -> Option<u64> {
        None
    }
    /// Appends the mailboxes this poller drains: the reactor arms them before it sleeps and
    /// waits on their eventfds too.
    fn doorbells(&self, _out: &mut Vec<Arc<dyn Doorbell>>) {}
}

/// What a reactor does when a loop found no work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Keep polling: lowest latency, the core is always busy.
    BusyPoll,
    /// Keep polling for `spin_us` after the last work, then sleep in ppoll(2) on the fds, the
    /// mailbox and the earliest deadline, for at most `max_sleep_us` at a time.
    Adaptive { spin_us: u64, max_sleep_us: u64 },
}

/// How a reactor runs.
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// For log lines.
    pub name: String,
    /// The core to pin the reactor's thread to; `None` leaves it unpinned.
    pub core: Option<usize>,
    pub idle: IdlePolicy,
}

/// A bounded multi-producer queue into one reactor, with an eventfd that wakes the reactor when
/// it sleeps. A full mailbox hands the message back; the sender decides (retry, drop, fail).
#[derive(Debug)]
pub struct Mailbox<T> {
    queue: ArrayQueue<T>,
    eventfd: File,
    /// Set by the reactor just before it sleeps; a sender that clears it writes the eventfd.
    sleeping: AtomicBool,
}

impl<T> Mailbox<T> {
    /// A mailbox holding up to `capacity` messages (1..=[`MAILBOX_CAPACITY_MAX`]).
    pub fn new(capacity: usize) -> io::Result<Arc<Mailbox<T>>> {
        assert!(
            (1..=MAILBOX_CAPACITY_MAX).contains(&capacity),
            "mailbox capacity {capacity}"
        );
        // SAFETY: eventfd(2) takes no pointers; it returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        let eventfd = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Arc::new(Mailbox {
            queue: ArrayQueue::new(capacity),
            eventfd,
            sleeping: AtomicBool::new(false),
        }))
    }

    /// Queues `message` for the reactor, waking it if it sleeps; a full mailbox returns it.
    pub fn send(&self, message: T) -> Result<(), T> {
        self.queue.push(message)?;
        // Pairs with the fence in `Reactor::sleep`: either the reactor sees the message before it
        // sleeps, or this sender sees `sleeping` and wakes it.
        fence(Ordering::SeqCst);
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
        Ok(())
    }

    /// Wakes the reactor from a sleep (e.g. after setting its stop flag).
    pub fn wake(&self) {
        // An eventfd write fails only if the counter would overflow u64, i.e. never here; an
        // unread count of wake-ups has the same meaning as one.
        let _ = (&self.eventfd).write(&1u64.to_ne_bytes());
    }

    /// Takes the oldest message: for a poller that drains a mailbox of its own (not its
    /// reactor's; it lists the mailbox in [`Poller::doorbells`]).
    pub fn pop(&self) -> Option<T> {
        self.queue.pop()
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no message waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The most messages the mailbox holds.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }
}

impl<T> Doorbell for Mailbox<T> {
    fn arm(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        // Pairs with the fence in `Mailbox::send`: either the sender sees `sleeping` and writes
        // the eventfd, or this check sees its message.
        fence(Ordering::SeqCst);
        !self.queue.is_empty()
    }

    fn disarm(&self, rung: bool) {
        self.sleeping.store(false, Ordering::SeqCst);
        if rung {
            let mut count = [0u8; 8];
            // Non-blocking: resets the wake-up counter; a racing wake-up only costs one more loop.
            let _ = (&self.eventfd).read(&mut count);
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }
}

/// Counters a reactor returns when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReactorStats {
    /// Loop iterations.
    pub loops: u64,
    /// Iterations in which no message and no poller did work.
    pub idle_loops: u64,
    /// Sleeps in ppoll(2).
    pub sleeps: u64,
    /// Messages handled.
    pub messages: u64,
}

/// One polled loop on one thread.
///
/// Call order: build the reactor on the thread that will run it (pollers need not be `Send`, so
/// a `Reactor` is not either; create a [`Mailbox`] first and use [`Reactor::with_mailbox`] when
/// other threads need it before the reactor exists), [`Reactor::add_poller`] for each poller,
/// then [`Reactor::run`]. Each loop: read the clock once; hand at most [`MAILBOX_BATCH`]
/// messages to the handler; poll every poller in the order added; if nothing did work, idle per
/// [`IdlePolicy`]. `run` returns when the stop flag is set (checked once per loop; a handler or
/// poller may set it; another thread should also call [`Mailbox::wake`]). Messages still queued
/// then stay in the mailbox.
pub struct Reactor<T> {
    config: ReactorConfig,
    mailbox: Arc<Mailbox<T>>,
    pollers: Vec<Box<dyn Poller>>,
    /// Scratch for `sleep`, reused so sleeping allocates only while the fd count grows.
    wait_fds: Vec<RawFd>,
    doorbells: Vec<Arc<dyn Doorbell>>,
    pollfds: Vec<libc::pollfd>,
}

impl<T: Send + 'static> Reactor<T> {
    /// A reactor with a new mailbox of `mailbox_capacity` messages.
    pub fn new(config: ReactorConfig, mailbox_capacity: usize) -> io::Result<Reactor<T>> {
        Ok(Self::with_mailbox(config, Mailbox::new(mailbox_capacity)?))
    }

    /// A reactor draining an existing mailbox (one reactor per mailbox).
    pub fn with_mailbox(config: ReactorConfig, mailbox: Arc<Mailbox<T>>) -> Reactor<T> {
        if let IdlePolicy::Adaptive { max_sleep_us, .. } = config.idle {
            assert!(
                max_sleep_us > 0,
                "reactor {}: an adaptive reactor must be able to sleep",
                config.name
            );
        }
        Reactor {
            config,
            mailbox,
            pollers: Vec::new(),
            wait_fds: Vec::new(),
            doorbells: Vec::new(),
            pollfds: Vec::new(),
        }
    }

    /// The mailbox other threads send to.
    pub fn mailbox(&self) -> Arc<Mailbox<T>> {
        Arc::clone(&self.mailbox)
    }

    /// Adds a poller; polled in the order added.
    pub fn add_poller(&mut self, poller: Box<dyn Poller>) {
        self.pollers.push(poller);
    }

    /// Runs the loop on the calling thread until `stop` is set (see the type's call order).
    pub fn run(
        mut self,
        stop: &AtomicBool,
        mut on_message: impl FnMut(T, u64, &mut [Box<dyn Poller>]),
    ) -> ReactorStats {
        self.pin();
        let mut stats = ReactorStats::default();
        let mut last_work_us = monotonic_us();
        while !stop.load(Ordering::Acquire) {
            let now_us = monotonic_us();
            let mut work = 0;
            while work < MAILBOX_BATCH {
                let Some(message) = self.mailbox.queue.pop() else {
                    break;
                };
                on_message(message, now_us, &mut self.pollers);
                work += 1;
            }
            stats.messages += work as u64;
            for poller in &mut self.pollers {
                work += poller.poll(now_us);
            }
            stats.loops += 1;
            if work > 0 {
                last_work_us = now_us;
                continue;
            }
            stats.idle_loops += 1;
            match self.config.idle {
                IdlePolicy::BusyPoll => std::hint::spin_loop(),
                IdlePolicy::Adaptive {
                    spin_us,
                    max_sleep_us,
                } => {
                    if now_us.saturating_sub(last_work_us) >= spin_us
                        && self.sleep(now_us, max_sleep_us, stop)
                    {
                        stats.sleeps += 1;
                    }
                }
            }
        }
        stats
    }

    fn pin(&self) {
        if let Some(core) = self.config.core {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                log::warn!(
                    "reactor {}: could not pin to core {core}; running unpinned",
                    self.config.name
                );
            }
        }
    }

    /// Sleeps until an fd is readable, a message arrives, the earliest deadline or
    /// `max_sleep_us`; returns whether it slept.
    fn sleep(&mut self, now_us: u64, max_sleep_us: u64, stop: &AtomicBool) -> bool {
        let deadline_us = self
            .pollers
            .iter()
            .filter_map(|poller| poller.next_deadline_us())
            .min();
        let timeout_us = deadline_us.map_or(max_sleep_us, |deadline_us| {
            deadline_us.saturating_sub(now_us)
        });
        let timeout_us = timeout_us.min(max_sleep_us);
        if timeout_us == 0 {
            return false;
        }
        self.wait_fds.clear();
        self.doorbells.clear();
        self.doorbells.push(self.mailbox.clone());
        for poller in &self.pollers {
            poller.wait_fds(&mut self.wait_fds);
            poller.doorbells(&mut self.doorbells);
        }
        let readable = |fd: RawFd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        self.pollfds.clear();
        self.pollfds.extend(
            self.doorbells
                .iter()
                .map(|doorbell| readable(doorbell.raw_fd())),
        );
        self.pollfds
            .extend(self.wait_fds.iter().map(|fd| readable(*fd)));

        // Every doorbell is armed, then checked: a message that arrived first keeps us awake.
        let mut waiting = false;
        for doorbell in &self.doorbells {
            waiting |= doorbell.arm();
        }
        if waiting || stop.load(Ordering::Acquire) {
            for doorbell in &self.doorbells {
                doorbell.disarm(false);
            }
            return false;
        }
        let timeout = libc::timespec {
            tv_sec: (timeout_us / 1_000_000) as libc::time_t,
            tv_nsec: ((timeout_us % 1_000_000) * 1_000) as libc::c_long,
        };
        // SAFETY: `pollfds` is a live, exclusively borrowed array of `len()` pollfd structs that
        // ppoll may write `revents` into; `timeout` outlives the call; a null sigmask keeps ours.
        let ready = unsafe {
            libc::ppoll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                &timeout,
                std::ptr::null(),
            )
        };
        for (doorbell, pollfd) in self.doorbells.iter().zip(&self.pollfds) {
            doorbell.disarm(ready > 0 && pollfd.revents & libc::POLLIN != 0);
        }
        true
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_period_is_due_once_per_period() {
        let mut period = Period::new(1000);
        assert!(period.due(5));
        assert!(!period.due(5));
        assert!(!period.due(1004));
        assert!(period.due(1005));
        assert!(!period.due(1006));
    }

    use super::*;
    use std::cell::Cell;
    use std::os::unix::net::UnixStream;
    use std::rc::Rc;
    use std::sync::atomic::AtomicU64;
    use std::thread::{self, JoinHandle};
    use std::time::Duration;

    /// Far longer than any test waits: a reactor that returns did so because it was woken.
    const SLEEP_LONG_US: u64 = 30_000_000;
    const WAIT_BOUND: Duration = Duration::from_secs(5);

    fn config(idle: IdlePolicy) -> ReactorConfig {
        ReactorConfig {
            name: "test".to_string(),
            core: None,
            idle,
        }
    }

    fn sleepy() -> ReactorConfig {
        config(IdlePolicy::Adaptive {
            spin_us: 0,
            max_sleep_us: SLEEP_LONG_US,
        })
    }

    fn wait_until(what: &str, condition: impl Fn() -> bool) {
        let start = Instant::now();
        while !condition() {
            assert!(
                start.elapsed() < WAIT_BOUND,
                "timed out waiting until {what}"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn join_within<R>(handle: JoinHandle<R>) -> R {
        wait_until("the reactor returned", || handle.is_finished());
        handle.join().unwrap()
    }

    struct Counter {
        count: Rc<Cell<usize>>,
        limit: usize,
        stop: Arc<AtomicBool>,
    }

    impl Poller for Counter {
        fn poll(&mut self, _now_us: u64) -> usize {
            self.count.set(self.count.get() + 1);
            if self.count.get() == self.limit {
                self.stop.store(true, Ordering::Release);
            }
            1
        }
        fn wait_fds(&self, _out: &mut Vec<RawFd>) {}
    }

    #[test]
    fn poller_that_sets_stop_ends_the_loop_exactly_there() {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Rc::new(Cell::new(0));
        let mut reactor = Reactor::<()>::new(config(IdlePolicy::BusyPoll), 4).unwrap();
        reactor.add_poller(Box::new(Counter {
            count: Rc::clone(&count),
            limit: 1000,
            stop: Arc::clone(&stop),
        }));
        let stats = reactor.run(&stop, |_, _, _| unreachable!("no message was sent"));
        assert_eq!(count.get(), 1000);
        assert_eq!(stats.loops, 1000);
        assert_eq!(stats.idle_loops, 0);
    }

    #[test]
    fn full_mailbox_hands_the_message_back() {
        let mailbox = Mailbox::new(2).unwrap();
        assert_eq!(mailbox.send(1), Ok(()));
        assert_eq!(mailbox.send(2), Ok(()));
        assert_eq!(mailbox.send(3), Err(3));
        assert_eq!(mailbox.len(), 2);
    }

    #[test]
    fn messages_are_handled_in_bounded_batches_between_polls() {
        let stop = Arc::new(AtomicBool::new(false));
        let mut reactor = Reactor::<usize>::new(config(IdlePolicy::BusyPoll), 256).unwrap();
        let mailbox = reactor.mailbox();
        for message in 0..200 {
            mailbox.send(message).unwrap();
        }
        let count = Rc::new(Cell::new(0));
        reactor.add_poller(Box::new(Counter {
            count: Rc::clone(&count),
            limit: 4,
            stop: Arc::clone(&stop),
        }));
        let mut handled = Vec::new();
        let stats = reactor.run(&stop, |message, _, pollers| {
            assert_eq!(pollers.len(), 1);
            handled.push((message, count.get()));
        });
        assert_eq!(stats.messages, 200);
        // Message i was handled after i / MAILBOX_BATCH poller passes.
        assert!(handled
            .iter()
            .enumerate()
            .all(|(index, (message, polls))| *message == index && *polls == index / MAILBOX_BATCH));
    }

    #[test]
    fn mailbox_wakes_a_sleeping_reactor() {
        let mailbox = Mailbox::<u64>::new(8).unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let (thread_mailbox, thread_received) = (Arc::clone(&mailbox), Arc::clone(&received));
        let handle = thread::spawn(move || {
            let stop = AtomicBool::new(false);
            Reactor::with_mailbox(sleepy(), thread_mailbox).run(&stop, |message, _, _| {
                thread_received.store(message, Ordering::SeqCst);
                stop.store(true, Ordering::Release);
            })
        });
        wait_until("the reactor sleeps", || {
            mailbox.sleeping.load(Ordering::SeqCst)
        });
        mailbox.send(42).unwrap();
        let stats = join_within(handle);
        assert_eq!(received.load(Ordering::SeqCst), 42);
        assert!(stats.sleeps >= 1);
        assert_eq!(stats.messages, 1);
    }

    struct Reader {
        stream: UnixStream,
        received: Arc<AtomicU64>,
        stop: Arc<AtomicBool>,
    }

    impl Poller for Reader {
        fn poll(&mut self, _now_us: u64) -> usize {
            let mut bytes = [0u8; 8];
            match self.stream.read(&mut bytes) {
                Ok(8) => {
                    self.received
                        .store(u64::from_le_bytes(bytes), Ordering::SeqCst);
                    self.stop.store(true, Ordering::Release);
                    1
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
                other => panic!("unexpected read result {other:?}"),
            }
        }
        fn wait_fds(&self, out: &mut Vec<RawFd>) {
            out.push(self.stream.as_raw_fd());
        }
    }

    #[test]
    fn readable_fd_wakes_a_sleeping_reactor() {
        let (mut writer, reader) = UnixStream::pair().unwrap();
        reader.set_nonblocking(true).unwrap();
        let mailbox = Mailbox::<()>::new(1).unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let (thread_mailbox, thread_received) = (Arc::clone(&mailbox), Arc::clone(&received));
        let handle = thread::spawn(move || {
            let stop = Arc::new(AtomicBool::new(false));
            let mut reactor = Reactor::with_mailbox(sleepy(), thread_mailbox);
            reactor.add_poller(Box::new(Reader {
                stream: reader,
                received: thread_received,
                stop: Arc::clone(&stop),
            }));
            reactor.run(&stop, |_, _, _| {})
        });
        wait_until("the reactor sleeps", || {
            mailbox.sleeping.load(Ordering::SeqCst)
        });
        writer.write_all(&7u64.to_le_bytes()).unwrap();
        let stats = join_within(handle);
        assert_eq!(received.load(Ordering::SeqCst), 7);
        assert!(stats.sleeps >= 1);
    }

    /// Drains a mailbox of its own (not the reactor's), listed as a doorbell.
    struct Drainer {
        mailbox: Arc<Mailbox<u64>>,
        received: Arc<AtomicU64>,
        stop: Arc<AtomicBool>,
    }

    impl Poller for Drainer {
        fn poll(&mut self, _now_us: u64) -> usize {
            let Some(message) = self.mailbox.pop() else {
                return 0;
            };
            self.received.store(message, Ordering::SeqCst);
            self.stop.store(true, Ordering::Release);
            1
        }
        fn wait_fds(&self, _out: &mut Vec<RawFd>) {}
        fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
            out.push(self.mailbox.clone());
        }
    }

    #[test]
    fn a_pollers_mailbox_wakes_a_sleeping_reactor_and_is_disarmed_after() {
        let own = Mailbox::<()>::new(1).unwrap();
        let drained = Mailbox::<u64>::new(8).unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let (thread_own, thread_drained, thread_received) = (
            Arc::clone(&own),
            Arc::clone(&drained),
            Arc::clone(&received),
        );
        let handle = thread::spawn(move || {
            let stop = Arc::new(AtomicBool::new(false));
            let mut reactor = Reactor::with_mailbox(sleepy(), thread_own);
            reactor.add_poller(Box::new(Drainer {
                mailbox: thread_drained,
                received: thread_received,
                stop: Arc::clone(&stop),
            }));
            reactor.run(&stop, |_, _, _| {})
        });
        wait_until("the poller's mailbox is armed", || {
            drained.sleeping.load(Ordering::SeqCst)
        });
        drained.send(9).unwrap();
        let stats = join_within(handle);
        assert_eq!(received.load(Ordering::SeqCst), 9);
        assert!(stats.sleeps >= 1);
        assert!(
            !drained.sleeping.load(Ordering::SeqCst) && !own.sleeping.load(Ordering::SeqCst),
            "disarmed after the sleep"
        );
    }

    struct Timer {
        deadline_us: u64,
        fired_us: Rc<Cell<Option<u64>>>,
        stop: Arc<AtomicBool>,
    }

    impl Poller for Timer {
        fn poll(&mut self, now_us: u64) -> usize {
            if now_us < self.deadline_us {
                return 0;
            }
            self.fired_us.set(Some(now_us));
            self.stop.store(true, Ordering::Release);
            1
        }
        fn wait_fds(&self, _out: &mut Vec<RawFd>) {}
        fn next_deadline_us(&self) -> Option<u64> {
            Some(self.deadline_us)
        }
    }

    #[test]
    fn deadline_ends_a_sleep() {
        let stop = Arc::new(AtomicBool::new(false));
        let fired_us = Rc::new(Cell::new(None));
        let deadline_us = monotonic_us() + 20_000;
        let mut reactor = Reactor::<()>::new(sleepy(), 1).unwrap();
        reactor.add_poller(Box::new(Timer {
            deadline_us,
            fired_us: Rc::clone(&fired_us),
            stop: Arc::clone(&stop),
        }));
        let started = Instant::now();
        let stats = reactor.run(&stop, |_, _, _| {});
        assert!(started.elapsed() < WAIT_BOUND);
        assert!(fired_us.get().unwrap() >= deadline_us);
        assert!(stats.sleeps >= 1);
    }

    /// CPU time consumed by the calling thread, in microseconds.
    fn thread_cpu_us() -> u64 {
        let mut time = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into `time`, which is live and writable.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) };
        assert_eq!(rc, 0);
        time.tv_sec as u64 * 1_000_000 + time.tv_nsec as u64 / 1_000
    }

    /// Idles for `wall_us` after the first poll, then reports the reactor thread's CPU time.
    struct CpuProbe {
        started: Option<(u64, u64)>,
        wall_us: u64,
        cpu_us: Rc<Cell<u64>>,
        stop: Arc<AtomicBool>,
    }

    impl Poller for CpuProbe {
        fn poll(&mut self, now_us: u64) -> usize {
            let (start_us, start_cpu_us) = *self.started.get_or_insert((now_us, thread_cpu_us()));
            if now_us >= start_us + self.wall_us {
                self.cpu_us.set(thread_cpu_us() - start_cpu_us);
                self.stop.store(true, Ordering::Release);
            }
            0
        }
        fn wait_fds(&self, _out: &mut Vec<RawFd>) {}
        fn next_deadline_us(&self) -> Option<u64> {
            self.started.map(|(start_us, _)| start_us + self.wall_us)
        }
    }

    #[test]
    fn adaptive_reactor_idles_without_burning_its_core() {
        let stop = Arc::new(AtomicBool::new(false));
        let cpu_us = Rc::new(Cell::new(0));
        let wall_us = 300_000;
        let idle = IdlePolicy::Adaptive {
            spin_us: 1_000,
            max_sleep_us: 10_000,
        };
        let mut reactor = Reactor::<()>::new(config(idle), 1).unwrap();
        let probe = CpuProbe {
            started: None,
            wall_us,
            cpu_us: Rc::clone(&cpu_us),
            stop: Arc::clone(&stop),
        };
        reactor.add_poller(Box::new(probe));
        let stats = reactor.run(&stop, |_, _, _| {});
        // Spinning 1 ms, then ~30 wake-ups of 10 ms: far below a tenth of the wall time.
        assert!(
            cpu_us.get() < wall_us / 10,
            "idle reactor used {} us of CPU in {wall_us} us",
            cpu_us.get()
        );
        assert!(stats.sleeps >= 10 && stats.sleeps <= 100, "{stats:?}");
    }
}
