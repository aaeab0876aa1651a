//! Nodes (sources, destinations) polled on the SPDK thread that made them: the same [`Node`]s
//! the embedded reactor drives, with commands from their [`NodeControl`] mailboxes.
//!
//! One poller per thread runs every node of the thread in the embedded pair's order
//! (`PairNode`): each source's first half (new writes' transfers onto the socket), then each
//! destination, then each source's acknowledgements and second half. A destination on the same
//! thread takes a transfer in the pass that sent it and the source its acknowledgement right
//! after, so a host write is answered in the reactor iteration that took it, not the next one
//! (a poller per node, run in SPDK's order, took one iteration more at queue depth 1).

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvmirror_runtime::node::{Command, DestinationNode, FrontEnd, Node, NodeControl, SourceNode};
use nvmirror_runtime::reactor::monotonic_us;

use crate::thread::Poller;

/// The passes of the thread's node poller, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    SourcesFirst,
    Destinations,
    SourcesAcknowledgements,
    SourcesSecond,
}

impl Pass {
    /// Whether the pass polls sources (else destinations).
    fn of_sources(self) -> bool {
        self != Pass::Destinations
    }
}

const PASSES: [Pass; 4] = [
    Pass::SourcesFirst,
    Pass::Destinations,
    Pass::SourcesAcknowledgements,
    Pass::SourcesSecond,
];

/// How the thread's poller drives a kind of node.
pub trait Scheduled: Node {
    /// Polled in the sources' passes (else in the destinations').
    const SOURCE: bool;
    /// A source's first half, or a destination's whole poll. `acknowledgements_follow`: the
    /// acknowledgements' pass runs after the destinations in this iteration (a source then
    /// reads its link there, once, and not here).
    fn poll_first(&mut self, now_us: u64, acknowledgements_follow: bool) -> usize;
    fn poll_acknowledgements(&mut self, _now_us: u64) -> usize {
        0
    }
    fn poll_second(&mut self, _now_us: u64) -> usize {
        0
    }
}

impl<F: FrontEnd> Scheduled for SourceNode<F> {
    const SOURCE: bool = true;
    fn poll_first(&mut self, now_us: u64, acknowledgements_follow: bool) -> usize {
        self.poll_intake(now_us, !acknowledgements_follow)
    }
    fn poll_acknowledgements(&mut self, now_us: u64) -> usize {
        SourceNode::poll_acknowledgements(self, now_us)
    }
    fn poll_second(&mut self, now_us: u64) -> usize {
        self.poll_devices(now_us)
    }
}

impl Scheduled for DestinationNode {
    const SOURCE: bool = false;
    fn poll_first(&mut self, now_us: u64, _acknowledgements_follow: bool) -> usize {
        nvmirror_runtime::reactor::Poller::poll(self, now_us)
    }
}

/// Polls a node in a pass: (now, pass, whether the acknowledgements' pass runs this iteration).
type PassFn = Box<dyn FnMut(u64, Pass, bool) -> usize>;

/// A node on the thread's poller; `poll` is taken (and the node's reference with it) when the
/// node stops.
struct Entry {
    /// A source (polled in the sources' passes), else a destination.
    source: bool,
    poll: RefCell<Option<PassFn>>,
}

thread_local! {
    /// The thread's nodes, in the order they started; touched by the poller only.
    static NODES: RefCell<Vec<Rc<Entry>>> = const { RefCell::new(Vec::new()) };
    /// Nodes started since the poller last ran (a start never waits for a poll in progress).
    static JOINING: RefCell<Vec<Rc<Entry>>> = const { RefCell::new(Vec::new()) };
    static NODES_POLLER: RefCell<Option<Poller>> = const { RefCell::new(None) };
}

fn poll_nodes() -> usize {
    NODES.with(|nodes| {
        let mut nodes = nodes.borrow_mut();
        JOINING.with(|joining| nodes.append(&mut joining.borrow_mut()));
        nodes.retain(|entry| entry.poll.borrow().is_some());
        let now_us = monotonic_us();
        let mut work = 0;
        // With a destination on this thread, acknowledgements can be on a source's socket right
        // after the destinations' pass: sources read their links there, once per iteration (and
        // not in their first half). A thread of lone sources has no acknowledgements' pass: its
        // sources read in their first half.
        let acknowledgements_follow = nodes.iter().any(|entry| !entry.source);
        for pass in PASSES {
            if pass == Pass::SourcesAcknowledgements && !acknowledgements_follow {
                continue;
            }
            for entry in nodes
                .iter()
                .filter(|entry| entry.source == pass.of_sources())
            {
                if let Some(poll) = entry.poll.borrow_mut().as_mut() {
                    work += poll(now_us, pass, acknowledgements_follow);
                }
            }
        }
        work
    })
}

/// Adds `entry` to the current thread's nodes (the first one makes the thread's poller).
fn schedule(entry: Rc<Entry>) -> Result<(), String> {
    NODES_POLLER.with(|slot| {
        if slot.borrow().is_none() {
            *slot.borrow_mut() = Some(Poller::register("nvmirror_nodes", 0, poll_nodes)?);
        }
        Ok::<(), String>(())
    })?;
    JOINING.with(|joining| joining.borrow_mut().push(entry));
    Ok(())
}

/// Ends the thread's node poller (at shutdown, on its thread, once its nodes stopped).
pub fn stop_polling() {
    NODES_POLLER.with(|slot| slot.borrow_mut().take());
    JOINING.with(|joining| joining.borrow_mut().clear());
    NODES.with(|nodes| nodes.borrow_mut().clear());
}

/// What runs once a stopped node let go of its devices: `Err` (the reason, logged already)
/// when it could not, and the node was leaked instead.
type Stopped = Box<dyn FnOnce(Result<(), String>)>;

/// A node running on its SPDK thread until [`RunningNode::stop`] (or drop).
pub struct RunningNode<N: Scheduled + 'static> {
    pub control: Arc<NodeControl>,
    node: Option<Rc<RefCell<N>>>,
    entry: Option<Rc<Entry>>,
}

impl<N: Scheduled + 'static> RunningNode<N> {
    /// Starts polling `node` on the current SPDK thread (from its next reactor iteration).
    pub fn start(name: &str, node: N, control: Arc<NodeControl>) -> Result<Self, String> {
        let node = Rc::new(RefCell::new(node));
        let mailbox = control.mailbox();
        let polled = node.clone();
        let stop = control.clone();
        let poll: PassFn = Box::new(move |now_us, pass, acknowledgements_follow| {
            if stop.stop.load(Ordering::Acquire) {
                return 0;
            }
            let mut node = polled.borrow_mut();
            match pass {
                Pass::SourcesFirst | Pass::Destinations => {
                    let mut work = 0;
                    while let Some(command) = mailbox.pop() {
                        node.handle_command(now_us, command);
                        work += 1;
                    }
                    work + node.poll_first(now_us, acknowledgements_follow)
                }
                Pass::SourcesAcknowledgements => node.poll_acknowledgements(now_us),
                Pass::SourcesSecond => node.poll_second(now_us),
            }
        });
        let entry = Rc::new(Entry {
            source: N::SOURCE,
            poll: RefCell::new(Some(poll)),
        });
        schedule(entry.clone()).map_err(|e| format!("{name}: {e}"))?;
        Ok(RunningNode {
            control,
            node: Some(node),
            entry: Some(entry),
        })
    }

    /// Runs `f` on the node (between polls: the caller is on the node's thread).
    pub fn with<R>(&self, f: impl FnOnce(&mut N) -> R) -> R {
        f(&mut self.node.as_ref().expect("running").borrow_mut())
    }

    /// Stops polling the node (its last counters published) and drops it once its device ops
    /// completed, then calls `done(Ok(()))`. SPDK completes a bdev op on this thread after the
    /// call that submitted it returned, so a node dropped with ops in flight would free the
    /// bdev channel, DMA buffers and ring memory they still use (a SIGTERM during a CP's mirror
    /// writes ended in heap corruption so). Ops still in flight after `timeout_us` leave the
    /// node leaked, never freed under them: `done(Err(why))`, its base bdevs still claimed.
    pub fn stop(
        mut self,
        label: &str,
        timeout_us: u64,
        done: impl FnOnce(Result<(), String>) + 'static,
    ) {
        // The entry's closure holds the other reference: dropping it leaves ours alone.
        self.unschedule();
        let node = self.node.take().expect("running");
        let Ok(node) = Rc::try_unwrap(node) else {
            unreachable!("the poller held the only other reference");
        };
        // Dropped only below, once idle: a waiter dropped unfinished (the waiter list is
        // cleared at shutdown) leaks it rather than freeing it under its ops.
        let mut node = Some(ManuallyDrop::new(node.into_inner()));
        let deadline = monotonic_us() + timeout_us;
        let done: Rc<RefCell<Option<Stopped>>> = Rc::new(RefCell::new(Some(Box::new(done))));
        let on_error = done.clone();
        let name = label.to_string();
        let mut said = false;
        let mut finish = move || {
            let held = node.as_mut().expect("held until finished");
            held.reap_device_completions();
            let left = held.device_ops_in_flight();
            if left > 0 && monotonic_us() < deadline {
                if !said {
                    log::info!("{name}: stopping: waiting for {left} device op(s) in flight");
                    said = true;
                }
                return false;
            }
            let mut held = node.take().expect("finished once");
            held.handle_command(monotonic_us(), Command::PublishCounters);
            let result = if left > 0 {
                Err(leaked(
                    &name,
                    &format!(
                        "{left} device op(s) did not complete within {} s",
                        timeout_us / 1_000_000
                    ),
                ))
            } else {
                // Before `done`: it may open the same devices and ring again (a promotion).
                drop(ManuallyDrop::into_inner(held));
                Ok(())
            };
            if let Some(done) = done.borrow_mut().take() {
                done(result);
            }
            true
        };
        if finish() {
            return;
        }
        if let Err(reason) = crate::thread::poll_until(finish) {
            // The waiter holds the node and may never run: leaked, as on a timeout.
            let error = leaked(label, &format!("cannot wait for its device ops ({reason})"));
            if let Some(done) = on_error.borrow_mut().take() {
                done(Err(error));
            }
        }
    }
}

impl<N: Scheduled + 'static> RunningNode<N> {
    /// Polled no more: the entry's closure (and its reference to the node) is dropped now, the
    /// emptied entry at the poller's next run.
    fn unschedule(&mut self) {
        if let Some(entry) = self.entry.take() {
            entry.poll.borrow_mut().take();
        }
    }
}

impl<N: Scheduled + 'static> Drop for RunningNode<N> {
    /// Dropped running (not stopped): polled no more, as a dropped poller was.
    fn drop(&mut self) {
        self.unschedule();
    }
}

/// The error (logged) of a stopped node left leaked because of `why`.
fn leaked(label: &str, why: &str) -> String {
    let error = format!(
        "{label}: {why}: the node is leaked (not freed under them) and its base bdevs stay claimed until the process ends"
    );
    log::error!("{error}");
    error
}
