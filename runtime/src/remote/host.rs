//! A remote reactor's share of a target: its poll group over a [`RemoteBackend`], started once
//! the target exists.

use std::os::fd::RawFd;
use std::sync::Arc;

use nvmirror_nvmf::{NamespaceInfo, PollGroup, Target};

use super::{RemoteBackend, RemoteLink};
use crate::reactor::{Doorbell, Mailbox, Poller};

/// A remote reactor's share of the target: the queue pairs handed to it and their backend.
pub struct RemoteFrontEnd {
    group: PollGroup<RemoteBackend>,
    backend: RemoteBackend,
}

impl RemoteFrontEnd {
    pub fn new(target: Arc<Target>, link: RemoteLink, namespaces: Vec<NamespaceInfo>) -> Self {
        RemoteFrontEnd {
            group: PollGroup::new(target),
            backend: RemoteBackend::new(link, namespaces),
        }
    }

    pub fn connection_count(&self) -> usize {
        self.group.connection_count()
    }
}

impl Poller for RemoteFrontEnd {
    fn poll(&mut self, now_us: u64) -> usize {
        let link = &self.backend.link;
        let mut work = 0;
        while let Some(stream) = link.streams.pop() {
            self.group.add_connection(stream, now_us);
            work += 1;
        }
        work + self.group.poll(now_us, &mut self.backend)
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.group.raw_fds(out);
    }

    fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        out.push(self.backend.link.done.clone());
        out.push(self.backend.link.streams.clone());
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
}

impl QueuePairHost {
    pub fn new() -> std::io::Result<Self> {
        Ok(QueuePairHost {
            inbox: Mailbox::new(1)?,
            front_end: None,
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
        if let Some(front_end) = &self.front_end {
            front_end.wait_fds(out);
        }
    }

    fn doorbells(&self, out: &mut Vec<Arc<dyn Doorbell>>) {
        out.push(self.inbox.clone());
        if let Some(front_end) = &self.front_end {
            front_end.doorbells(out);
        }
    }
}
