//! A remote reactor's share of a target: its poll group over a [`RemoteBackend`], started once
//! the target exists.

use std::cell::Cell;
use std::os::fd::RawFd;
use std::sync::Arc;

use nvmirror_nvmf::{NamespaceInfo, PollGroup, Target};

use super::{RemoteBackend, RemoteLink};
use crate::reactor::{Mailbox, Poller};

/// A remote reactor's share of the target: the queue pairs handed to it and their backend.
pub struct RemoteFrontEnd {
    group: PollGroup<RemoteBackend>,
    backend: RemoteBackend,
    armed: Cell<bool>,
}

impl RemoteFrontEnd {
    pub fn new(target: Arc<Target>, link: RemoteLink, namespaces: Vec<NamespaceInfo>) -> Self {
        RemoteFrontEnd {
            group: PollGroup::new(target),
            backend: RemoteBackend::new(link, namespaces),
            armed: Cell::new(false),
        }
    }

    pub fn connection_count(&self) -> usize {
        self.group.connection_count()
    }
}

impl Poller for RemoteFrontEnd {
    fn poll(&mut self, now_us: u64) -> usize {
        let link = &self.backend.link;
        if self.armed.replace(false) {
            link.done.disarm();
            link.streams.disarm();
        }
        let mut work = 0;
        while let Some(stream) = link.streams.pop() {
            self.group.add_connection(stream, now_us);
            work += 1;
        }
        work + self.group.poll(now_us, &mut self.backend)
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.backend.link.done.raw_fd());
        out.push(self.backend.link.streams.raw_fd());
        self.group.raw_fds(out);
    }

    fn next_deadline_us(&self) -> Option<u64> {
        self.armed.set(true);
        let link = &self.backend.link;
        let done = link.done.arm();
        let streams = link.streams.arm();
        (done || streams).then_some(0)
    }
}

/// What a queue-pair reactor needs once the target exists (sent from the engine's reactor).
pub struct RemoteInit {
    pub target: Arc<Target>,
    pub link: RemoteLink,
    pub namespaces: Vec<NamespaceInfo>,
}

/// The queue-pair reactors of one source, filled in before its front end is built: the front
/// end sends each one its [`RemoteInit`].
#[derive(Clone, Default)]
pub struct QueuePairHosts(Arc<std::sync::Mutex<Vec<Arc<Mailbox<RemoteInit>>>>>);

impl QueuePairHosts {
    pub fn add(&self, inbox: Arc<Mailbox<RemoteInit>>) {
        self.0.lock().unwrap().push(inbox);
    }

    pub fn inboxes(&self) -> Vec<Arc<Mailbox<RemoteInit>>> {
        self.0.lock().unwrap().clone()
    }
}

/// A reactor's share of a target's queue pairs; it starts serving when its [`RemoteInit`]
/// arrives. Polled alone (a queue-pair reactor) or beside another node on the same core.
pub struct QueuePairHost {
    inbox: Arc<Mailbox<RemoteInit>>,
    front_end: Option<RemoteFrontEnd>,
    armed: Cell<bool>,
}

impl QueuePairHost {
    pub fn new() -> std::io::Result<Self> {
        Ok(QueuePairHost {
            inbox: Mailbox::new(1)?,
            front_end: None,
            armed: Cell::new(false),
        })
    }

    pub fn inbox(&self) -> Arc<Mailbox<RemoteInit>> {
        self.inbox.clone()
    }

    /// Queue pairs polled here now.
    pub fn connection_count(&self) -> usize {
        self.front_end
            .as_ref()
            .map_or(0, RemoteFrontEnd::connection_count)
    }
}

impl Poller for QueuePairHost {
    fn poll(&mut self, now_us: u64) -> usize {
        if self.armed.replace(false) {
            self.inbox.disarm();
        }
        if let Some(init) = self.inbox.pop() {
            log::info!(
                "queue-pair reactor {} ready for the target's connections",
                init.link.index + 1
            );
            self.front_end = Some(RemoteFrontEnd::new(init.target, init.link, init.namespaces));
        }
        self.front_end
            .as_mut()
            .map_or(0, |front_end| front_end.poll(now_us))
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.inbox.raw_fd());
        if let Some(front_end) = &self.front_end {
            front_end.wait_fds(out);
        }
    }

    fn next_deadline_us(&self) -> Option<u64> {
        self.armed.set(true);
        if self.inbox.arm() {
            return Some(0);
        }
        self.front_end
            .as_ref()
            .and_then(RemoteFrontEnd::next_deadline_us)
    }
}
