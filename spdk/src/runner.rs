//! A node (source, destination) polled by an SPDK poller on the thread that made it: the same
//! [`Node`] the embedded reactor drives, with commands from its [`NodeControl`] mailbox.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvmirror_runtime::node::{Command, Node, NodeControl};
use nvmirror_runtime::reactor::monotonic_us;

use crate::thread::Poller;

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

    /// Stops polling and gives the node back (its last counters published).
    pub fn stop(mut self) -> N {
        // The poller's closure holds the other reference: dropping it leaves ours alone.
        self.poller.take();
        let node = self.node.take().expect("running");
        let Ok(node) = Rc::try_unwrap(node) else {
            unreachable!("the poller held the only other reference");
        };
        let mut node = node.into_inner();
        node.handle_command(monotonic_us(), Command::PublishCounters);
        node
    }
}
