//! A node (source, destination) polled by an SPDK poller on the thread that made it: the same
//! [`Node`] the embedded reactor drives, with commands from its [`NodeControl`] mailbox.

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvmirror_runtime::node::{Command, Node, NodeControl};
use nvmirror_runtime::reactor::monotonic_us;

use crate::thread::Poller;

/// What runs once a stopped node let go of its devices: `Err` (the reason, logged already)
/// when it could not, and the node was leaked instead.
type Stopped = Box<dyn FnOnce(Result<(), String>)>;

/// A node running on its SPDK thread until [`RunningNode::stop`] (or drop).
pub struct RunningNode<N: Node + 'static> {
    pub control: Arc<NodeControl>,
    node: Option<Rc<RefCell<N>>>,
    poller: Option<Poller>,
}

impl<N: Node + 'static> RunningNode<N> {
    /// Starts polling `node` on the current SPDK thread.
    pub fn start(name: &str, node: N, control: Arc<NodeControl>) -> Result<Self, String> {
        let node = Rc::new(RefCell::new(node));
        let mailbox = control.mailbox();
        let polled = node.clone();
        let stop = control.clone();
        let poller = Poller::register(name, 0, move || {
            if stop.stop.load(Ordering::Acquire) {
                return 0;
            }
            let now_us = monotonic_us();
            let mut node = polled.borrow_mut();
            let mut work = 0;
            while let Some(command) = mailbox.pop() {
                node.handle_command(now_us, command);
                work += 1;
            }
            work + node.poll(now_us)
        })?;
        Ok(RunningNode {
            control,
            node: Some(node),
            poller: Some(poller),
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
        // The poller's closure holds the other reference: dropping it leaves ours alone.
        self.poller.take();
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

/// The error (logged) of a stopped node left leaked because of `why`.
fn leaked(label: &str, why: &str) -> String {
    let error = format!(
        "{label}: {why}: the node is leaked (not freed under them) and its base bdevs stay claimed until the process ends"
    );
    log::error!("{error}");
    error
}
