//! Queue pairs on reactors other than the volume's: the NVMe/TCP target hands accepted
//! connections round robin over the configured cores.
//!
//! The engine (ring, transfers, replication link) is single-threaded on its reactor. A queue
//! pair on another reactor reaches it through lock-free mailboxes (crossbeam `ArrayQueue` plus
//! an eventfd for a sleeping reactor): [`RemoteBackend`] on the queue pair's reactor, the
//! [`VolumeService`] on the engine's. The remote backend owns a fixed pool of buffers, allocated
//! once: a write's data is received into a pool buffer, the buffer itself (not a copy) moves to
//! the engine's reactor, which copies it into the write's NVRAM ring slot and commits it, and
//! the buffer comes back with the completion once the write is durable on both sides. That is
//! one copy more than on the engine's own reactor, where the data lands straight in the ring;
//! what the other reactor takes over is the host connection's socket work and PDU handling.
//! Reads go the same way (the engine fills the buffer from the primary).

mod backend;
mod host;
mod service;
#[cfg(test)]
mod tests;

pub use backend::{RemoteBackend, RemoteWriteSlot};
pub use host::{QueuePairHost, QueuePairHosts, RemoteFrontEnd, RemoteInit};
pub use service::{backend_namespaces, RemoteRouting, Routed, VolumeService};

use std::net::TcpStream;
use std::sync::Arc;

use nvmirror_nvmf::BackendError;

use crate::reactor::Mailbox;

/// Operations a remote reactor may have outstanding at the engine (its buffer pool).
pub const REMOTE_SLOTS: usize = 256;
/// One pool buffer: the largest transfer of one command (MDTS).
pub const REMOTE_BUFFER_BYTES: usize = nvmirror_nvmf::config::TRANSFER_BYTES_MAX as usize;
// A pool buffer holds any write the volume and the unreplicated backend accept whole.
const _: () = assert!(REMOTE_BUFFER_BYTES <= nvmirror_engine::geometry::WRITE_BYTES_MAX);
const _: () =
    assert!(REMOTE_BUFFER_BYTES <= nvmirror_nvmf::backend::DEVICE_BACKEND_WRITE_BYTES_MAX);

/// Accepted connections waiting for a remote reactor to take them.
pub const REMOTE_STREAMS_MAX: usize = 64;
/// Tokens of operations a remote backend completes by itself (flush, an aborted write) carry
/// this bit; pool tokens never do.
const LOCAL_TOKEN_BIT: u64 = 1 << 63;

/// What a remote queue pair asks of the volume.
#[derive(Debug)]
pub enum OpKind {
    Write {
        nsid: u32,
        lba: u64,
        length: u32,
        buffer: Box<[u8]>,
    },
    Zeroes {
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    },
    Read {
        nsid: u32,
        lba: u64,
        length: u32,
        buffer: Box<[u8]>,
    },
}

impl OpKind {
    /// The pool buffer the operation carries (none for write zeroes).
    pub fn into_buffer(self) -> Option<Box<[u8]>> {
        match self {
            OpKind::Write { buffer, .. } | OpKind::Read { buffer, .. } => Some(buffer),
            OpKind::Zeroes { .. } => None,
        }
    }
}

/// An operation from remote reactor `remote`, pool slot `slot`.
#[derive(Debug)]
pub struct Op {
    pub remote: u16,
    pub slot: u16,
    pub kind: OpKind,
}

/// Who waits for a remote operation, and the buffer that goes back with its completion.
#[derive(Debug)]
pub struct RemoteWaiter {
    pub remote: u16,
    pub slot: u16,
    pub buffer: Option<Box<[u8]>>,
    /// A read that went through a device op: its token and length, for `finish_read` into
    /// `buffer` before the answer goes back.
    pub read: Option<(u64, u32)>,
    /// How the operation ended (set when it completes; a write may fail with a path error).
    pub result: Result<(), BackendError>,
}

/// An operation finished: the slot, its buffer, and (for a read) whether the data is good.
#[derive(Debug)]
pub struct Done {
    pub slot: u16,
    pub buffer: Option<Box<[u8]>>,
    pub result: Result<(), BackendError>,
}

/// The mailboxes between the engine's reactor and one remote reactor.
#[derive(Clone)]
pub struct RemoteLink {
    /// Remote reactors -> engine (shared by all remote reactors of a volume).
    pub ops: Arc<Mailbox<Op>>,
    /// Engine -> this remote reactor.
    pub done: Arc<Mailbox<Done>>,
    /// Accepted connections for this remote reactor.
    pub streams: Arc<Mailbox<TcpStream>>,
    pub index: u16,
}

/// Completions in flight for remote queue pairs, room reserved up front: four queue-pair
/// reactors' pools (more reactors make the table grow once, at their first load).
pub const REMOTE_ROUTES_RESERVED: usize = 4 * REMOTE_SLOTS;

/// Which backend completions belong to queue pairs on other reactors: the one routing table of
/// the volume and of [`Routed`].
#[derive(Debug)]
pub struct RemoteRoutes {
    waiting: std::collections::HashMap<u64, RemoteWaiter>,
    done: std::collections::VecDeque<RemoteWaiter>,
}

impl Default for RemoteRoutes {
    fn default() -> Self {
        RemoteRoutes {
            waiting: std::collections::HashMap::with_capacity(REMOTE_ROUTES_RESERVED),
            done: std::collections::VecDeque::with_capacity(REMOTE_ROUTES_RESERVED),
        }
    }
}

impl RemoteRoutes {
    /// Token `token`'s completion goes to `waiter`.
    pub fn wait(&mut self, token: u64, waiter: RemoteWaiter) {
        let previous = self.waiting.insert(token, waiter);
        assert!(previous.is_none(), "a token is routed once");
    }

    /// A completion: `true` if a remote queue pair waits for it (it is set aside for
    /// [`RemoteRoutes::pop_done`]), `false` if it is this reactor's.
    pub fn complete(&mut self, token: u64, result: Result<(), BackendError>) -> bool {
        if self.waiting.is_empty() {
            return false;
        }
        match self.waiting.remove(&token) {
            Some(mut waiter) => {
                waiter.result = result;
                self.done.push_back(waiter);
                true
            }
            None => false,
        }
    }

    pub fn pop_done(&mut self) -> Option<RemoteWaiter> {
        self.done.pop_front()
    }
}

/// Creates the mailboxes for `count` remote reactors of one volume.
pub fn remote_links(count: usize) -> std::io::Result<Vec<RemoteLink>> {
    let ops = Mailbox::new((REMOTE_SLOTS * count).max(1))?;
    (0..count)
        .map(|index| {
            Ok(RemoteLink {
                ops: ops.clone(),
                done: Mailbox::new(REMOTE_SLOTS)?,
                streams: Mailbox::new(REMOTE_STREAMS_MAX)?,
                index: index as u16,
            })
        })
        .collect()
}
