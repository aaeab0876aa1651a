//! A poll group: the queue pairs one reactor polls (SPDK's `spdk_nvmf_poll_group`). Each pass reads and
//! executes every connection within its budget, dispatches backend completions to their commands through
//! a preallocated token table, flushes every socket once and enforces keep-alive. Lock-free on the I/O
//! path; the backend is lent for the pass, not owned.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::backend::{Backend, IoToken};
use crate::config::{ADMIN_QUEUE_DEPTH, QUEUE_DEPTH_MAX};
use crate::connection::{Connection, Phase};
use crate::target::Target;

const _: () = assert!(ADMIN_QUEUE_DEPTH <= QUEUE_DEPTH_MAX);
/// Backend completions dispatched per pass at most.
pub const COMPLETIONS_PER_POLL_MAX: usize = 1024;

pub use crate::token_table::TokenTable;

/// Identifies a connection slot and its incarnation (a reused slot gets a new generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionKey {
    pub slot: u32,
    pub generation: u32,
}

/// What a connection's commands may use during one pass.
pub struct Context<'a, B: Backend> {
    pub now_us: u64,
    pub backend: &'a mut B,
    pub target: &'a Target,
    tokens: &'a mut TokenTable,
    key: ConnectionKey,
}

impl<B: Backend> Context<'_, B> {
    /// Routes `token`'s completion back to request `index` of this connection.
    pub fn register(&mut self, token: IoToken, index: u16) {
        let previous = self.tokens.insert(token, (self.key, index));
        assert!(previous.is_none(), "backend reused an outstanding token");
    }
}

struct Slot<B: Backend> {
    generation: u32,
    connection: Option<Connection<B>>,
}

pub struct PollGroup<B: Backend> {
    target: Arc<Target>,
    slots: Vec<Slot<B>>,
    tokens: TokenTable,
    connection_count: usize,
}

impl<B: Backend> PollGroup<B> {
    pub fn new(target: Arc<Target>) -> Self {
        PollGroup {
            target,
            slots: Vec::new(),
            tokens: TokenTable::default(),
            connection_count: 0,
        }
    }

    pub fn add_connection(&mut self, stream: TcpStream, now_us: u64) {
        let config = &self.target.config;
        let data_timeout_us = u64::from(config.data_timeout_ms) * 1000;
        let connection =
            match Connection::new(stream, now_us, config.recv_budget_pdus, data_timeout_us) {
                Ok(connection) => connection,
                Err(error) => {
                    log::warn!("nvmf: dropping a new connection: {error}");
                    return;
                }
            };
        self.connection_count += 1;
        // Ask for every live connection's share, so `register` never grows the table.
        let tokens_max = self.connection_count * self.tokens_per_connection();
        self.tokens.reserve_total(tokens_max);
        assert!(self.tokens.capacity() >= tokens_max);
        if let Some(slot) = self.slots.iter_mut().find(|slot| slot.connection.is_none()) {
            slot.generation = slot.generation.wrapping_add(1);
            slot.connection = Some(connection);
        } else {
            self.slots.push(Slot {
                generation: 0,
                connection: Some(connection),
            });
        }
    }

    /// Token-table entries one connection may need: a request has at most one backend operation
    /// outstanding, and a queue at most its depth of requests (admin, or the configured I/O maximum).
    fn tokens_per_connection(&self) -> usize {
        let depth = self.target.config.queue_depth_max.max(ADMIN_QUEUE_DEPTH);
        assert!(depth <= QUEUE_DEPTH_MAX, "queue_depth_max checked at start");
        usize::from(depth)
    }

    /// One pass: read/parse/execute every connection (bounded), dispatch backend completions, flush
    /// sockets, enforce keep-alive. Returns the amount of work done (0 = idle).
    pub fn poll(&mut self, now_us: u64, backend: &mut B) -> usize {
        // Completions the backend finished since the last pass go out before any socket is read:
        // a response waits for no receive syscall.
        let mut work = self.poll_completions(now_us, backend);
        for slot_index in 0..self.slots.len() {
            let slot = &mut self.slots[slot_index];
            let Some(connection) = slot.connection.as_mut() else {
                continue;
            };
            let key = ConnectionKey {
                slot: slot_index as u32,
                generation: slot.generation,
            };
            let mut context = Context {
                now_us,
                backend: &mut *backend,
                target: &self.target,
                tokens: &mut self.tokens,
                key,
            };
            work += connection.poll_retry(&mut context);
            work += connection.poll_data_timeouts(&mut context);
            work += connection.poll_receive_paced(&mut context);
            work += connection.poll_async_events();
        }
        work += self.dispatch_completions(backend);
        for slot_index in 0..self.slots.len() {
            let slot = &mut self.slots[slot_index];
            let Some(connection) = slot.connection.as_mut() else {
                continue;
            };
            work += connection.flush(now_us);
            check_timers(connection, now_us);
            if connection.is_closed() {
                let key = ConnectionKey {
                    slot: slot_index as u32,
                    generation: slot.generation,
                };
                let mut context = Context {
                    now_us,
                    backend: &mut *backend,
                    target: &self.target,
                    tokens: &mut self.tokens,
                    key,
                };
                connection.teardown(&mut context);
                slot.connection = None;
                self.connection_count -= 1;
                self.tokens.retain(|_, (owner, _)| *owner != key);
                work += 1;
            }
        }
        work
    }

    /// Dispatches the backend's finished operations to their commands and flushes the
    /// responses, without reading any socket: for a runtime that just completed writes (their
    /// acknowledgement came) and wants them on the wire before its next full pass.
    pub fn poll_completions(&mut self, now_us: u64, backend: &mut B) -> usize {
        let work = self.dispatch_completions(backend);
        if work > 0 {
            for connection in self.slots.iter_mut().filter_map(|s| s.connection.as_mut()) {
                connection.flush(now_us);
            }
        }
        work
    }

    fn dispatch_completions(&mut self, backend: &mut B) -> usize {
        let mut count = 0;
        while count < COMPLETIONS_PER_POLL_MAX {
            let Some((token, result)) = backend.poll_completion() else {
                break;
            };
            count += 1;
            let Some((key, index)) = self.tokens.remove(&token) else {
                // An operation of a torn-down connection: its tokens left the table with it.
                backend.abandon(token);
                continue;
            };
            let slot = &mut self.slots[key.slot as usize];
            assert_eq!(
                slot.generation, key.generation,
                "a connection's tokens leave the table at its teardown"
            );
            let connection = slot
                .connection
                .as_mut()
                .expect("a live connection owns the token");
            connection.on_token_complete(index, token, result, backend);
        }
        count
    }

    /// Sockets to wait on when the reactor sleeps (poll(2)).
    pub fn raw_fds(&self, out: &mut Vec<RawFd>) {
        for slot in &self.slots {
            if let Some(connection) = &slot.connection {
                out.push(connection.stream.as_raw_fd());
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.connection_count
    }
}

/// ICReq timeout, keep-alive expiry, a controller that went away and, for an I/O queue, a controller
/// reset since it connected close the connection. Keep-alive is the controller's: its admin queue
/// checks it and marks the controller closed, and the I/O queues follow through `closed`. (A closing
/// connection's linger deadline is enforced by the `flush` that runs just before.)
fn check_timers<B: Backend>(connection: &mut Connection<B>, now_us: u64) {
    if let Phase::AwaitICReq { deadline_us } = connection.phase {
        if now_us >= deadline_us {
            connection.close("no ICReq in time");
        }
    }
    let Some(controller) = connection.queue.controller.as_ref() else {
        return;
    };
    if controller.closed.load(Ordering::Acquire) {
        connection.close("controller destroyed");
    } else if connection.queue.qid != 0 && controller.reset_epoch() != connection.queue.reset_epoch
    {
        connection.close(&format!(
            "controller {} reset (CC.EN cleared): I/O queue {} deleted",
            controller.cntlid, connection.queue.qid
        ));
    } else if connection.queue.qid == 0 && controller.keep_alive_expired(now_us) {
        log::warn!(
            "nvmf: {}: keep-alive timeout expired for controller {}",
            connection.peer,
            controller.cntlid
        );
        controller.closed.store(true, Ordering::Release);
        connection.close("keep-alive timeout");
    }
}
