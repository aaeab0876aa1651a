//! The volume as a queue pair on a remote reactor sees it: a preallocated buffer pool whose
//! buffers travel to the engine's reactor and back.

use std::collections::VecDeque;

use nvmirror_nvmf::backend::LBA_BYTES;
use nvmirror_nvmf::{Backend, BackendError, IoToken, NamespaceInfo};

use super::{Op, OpKind, RemoteLink, LOCAL_TOKEN_BIT, REMOTE_BUFFER_BYTES, REMOTE_SLOTS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Reserved for a write whose data is arriving.
    Receiving,
    /// At the engine.
    InFlight {
        read: bool,
    },
    /// A read's data is back, waiting for `finish_read`.
    ReadDone,
}

struct PoolSlot {
    buffer: Option<Box<[u8]>>,
    generation: u64,
    state: SlotState,
    result: Result<(), BackendError>,
}

/// A reserved write of a remote queue pair: a pool slot.
#[derive(Debug, PartialEq, Eq)]
pub struct RemoteWriteSlot {
    slot: u16,
    nsid: u32,
    lba: u64,
    length: u32,
}

/// The volume as a queue pair on a remote reactor sees it (see the module documentation).
pub struct RemoteBackend {
    pub(super) link: RemoteLink,
    namespaces: Vec<NamespaceInfo>,
    slots: Vec<PoolSlot>,
    free: Vec<u16>,
    /// Tokens completed here, without the engine.
    completed: VecDeque<IoToken>,
    local_count: u64,
}

impl RemoteBackend {
    /// Pool slots free for new operations.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// `namespaces[i]` is nsid `i + 1`, as the volume reports them.
    pub fn new(link: RemoteLink, namespaces: Vec<NamespaceInfo>) -> Self {
        RemoteBackend {
            link,
            namespaces,
            slots: (0..REMOTE_SLOTS)
                .map(|_| PoolSlot {
                    buffer: Some(vec![0u8; REMOTE_BUFFER_BYTES].into_boxed_slice()),
                    generation: 0,
                    state: SlotState::Free,
                    result: Ok(()),
                })
                .collect(),
            free: (0..REMOTE_SLOTS as u16).rev().collect(),
            completed: VecDeque::with_capacity(REMOTE_SLOTS * 2),
            local_count: 0,
        }
    }

    fn check(&self, nsid: u32, lba: u64, length_bytes: u64) -> Result<(), BackendError> {
        let info = self.namespace(nsid).ok_or(BackendError::InvalidNamespace)?;
        let end = lba
            .checked_mul(u64::from(LBA_BYTES))
            .and_then(|offset| offset.checked_add(length_bytes))
            .ok_or(BackendError::OutOfRange)?;
        if end > info.size_bytes || length_bytes == 0 {
            return Err(BackendError::OutOfRange);
        }
        Ok(())
    }

    /// A free pool slot for a new operation, or Busy.
    fn take_slot(&mut self, state: SlotState) -> Result<u16, BackendError> {
        let slot = self.free.pop().ok_or(BackendError::Busy)?;
        let pool = &mut self.slots[slot as usize];
        pool.generation += 1;
        pool.state = state;
        Ok(slot)
    }

    fn token(&self, slot: u16) -> IoToken {
        IoToken(self.slots[slot as usize].generation << 16 | u64::from(slot))
    }

    /// The slot of a pool token, if it is that slot's current operation.
    fn slot_of(&self, token: IoToken) -> Option<u16> {
        if token.0 & LOCAL_TOKEN_BIT != 0 {
            return None;
        }
        let slot = (token.0 & 0xffff) as u16;
        (self.slots.get(slot as usize)?.generation == token.0 >> 16).then_some(slot)
    }

    fn release(&mut self, slot: u16) {
        self.slots[slot as usize].state = SlotState::Free;
        self.free.push(slot);
    }

    fn complete_here(&mut self) -> IoToken {
        self.local_count += 1;
        let token = IoToken(LOCAL_TOKEN_BIT | self.local_count);
        self.completed.push_back(token);
        token
    }

    fn send(&mut self, slot: u16, kind: OpKind) -> IoToken {
        let read = matches!(kind, OpKind::Read { .. });
        self.slots[slot as usize].state = SlotState::InFlight { read };
        let op = Op {
            remote: self.link.index,
            slot,
            kind,
        };
        // The operations mailbox holds every remote reactor's whole pool: it never fills.
        self.link
            .ops
            .send(op)
            .expect("the operations mailbox holds every pool");
        self.token(slot)
    }

    fn take_buffer(&mut self, slot: u16) -> Box<[u8]> {
        self.slots[slot as usize]
            .buffer
            .take()
            .expect("a free slot has its buffer")
    }
}

impl Backend for RemoteBackend {
    type WriteSlot = RemoteWriteSlot;
    /// A slot is a pool buffer on this reactor: the volume reserves ring space only when the
    /// buffer reaches it with all the data (at commit), so a slot held here delays no one.
    const ORDERED_WRITE_SLOTS: bool = false;

    fn namespace(&self, nsid: u32) -> Option<NamespaceInfo> {
        self.namespaces
            .get((nsid as usize).checked_sub(1)?)
            .copied()
    }

    fn reserve_write(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<RemoteWriteSlot, BackendError> {
        self.check(nsid, lba, u64::from(length_bytes))?;
        if length_bytes as usize > REMOTE_BUFFER_BYTES {
            return Err(BackendError::OutOfRange);
        }
        let slot = self.take_slot(SlotState::Receiving)?;
        Ok(RemoteWriteSlot {
            slot,
            nsid,
            lba,
            length: length_bytes,
        })
    }

    fn write_buffer(&mut self, slot: &RemoteWriteSlot) -> &mut [u8] {
        let pool = &mut self.slots[slot.slot as usize];
        assert_eq!(pool.state, SlotState::Receiving);
        &mut pool
            .buffer
            .as_mut()
            .expect("a receiving slot has its buffer")[..slot.length as usize]
    }

    fn commit_write(&mut self, _now_us: u64, slot: RemoteWriteSlot) -> IoToken {
        let buffer = self.take_buffer(slot.slot);
        let kind = OpKind::Write {
            nsid: slot.nsid,
            lba: slot.lba,
            length: slot.length,
            buffer,
        };
        self.send(slot.slot, kind)
    }

    /// Nothing reached the engine yet: the write simply never happened.
    fn abort_write(&mut self, _now_us: u64, slot: RemoteWriteSlot) -> IoToken {
        self.release(slot.slot);
        self.complete_here()
    }

    fn write_zeroes(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<IoToken, BackendError> {
        self.check(nsid, lba, length_bytes)?;
        let slot = self.take_slot(SlotState::InFlight { read: false })?;
        let kind = OpKind::Zeroes {
            nsid,
            lba,
            length_bytes,
        };
        Ok(self.send(slot, kind))
    }

    /// Never called: [`Backend::start_read`] always answers.
    fn read(&mut self, _nsid: u32, _lba: u64, _buf: &mut [u8]) -> Result<(), BackendError> {
        unreachable!("a remote backend reads through start_read")
    }

    fn start_read(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<Option<IoToken>, BackendError> {
        self.check(nsid, lba, u64::from(length_bytes))?;
        if length_bytes as usize > REMOTE_BUFFER_BYTES {
            return Err(BackendError::OutOfRange);
        }
        let slot = self.take_slot(SlotState::InFlight { read: true })?;
        let buffer = self.take_buffer(slot);
        let kind = OpKind::Read {
            nsid,
            lba,
            length: length_bytes,
            buffer,
        };
        Ok(Some(self.send(slot, kind)))
    }

    fn finish_read(&mut self, token: IoToken, buf: &mut [u8]) -> Result<(), BackendError> {
        let slot = self
            .slot_of(token)
            .expect("finish_read of a live read token");
        let pool = &self.slots[slot as usize];
        assert_eq!(pool.state, SlotState::ReadDone);
        let result = pool.result;
        if result.is_ok() {
            let length = buf.len();
            buf.copy_from_slice(&pool.buffer.as_ref().expect("read data")[..length]);
        }
        self.release(slot);
        result
    }

    fn abandon(&mut self, token: IoToken) {
        if let Some(slot) = self.slot_of(token) {
            if self.slots[slot as usize].state == SlotState::ReadDone {
                self.release(slot);
            }
        }
    }

    /// Like the volume: every completed write is non-volatile on both sides already.
    fn flush(&mut self, _now_us: u64, nsid: u32) -> Result<IoToken, BackendError> {
        // nvmf resolves the broadcast nsid to an attached namespace before calling.
        if self.namespace(nsid).is_none() {
            return Err(BackendError::InvalidNamespace);
        }
        Ok(self.complete_here())
    }

    fn poll_completion(&mut self) -> Option<(IoToken, Result<(), BackendError>)> {
        if let Some(token) = self.completed.pop_front() {
            return Some((token, Ok(())));
        }
        let done = self.link.done.pop()?;
        let token = self.token(done.slot);
        let pool = &mut self.slots[done.slot as usize];
        if let Some(buffer) = done.buffer {
            pool.buffer = Some(buffer);
        }
        let result = match pool.state {
            SlotState::InFlight { read: true } => {
                pool.state = SlotState::ReadDone;
                pool.result = done.result;
                Ok(())
            }
            SlotState::InFlight { read: false } => {
                // Durable on both sides, or a path error (the destination is lost under `fail`).
                assert!(
                    matches!(done.result, Ok(()) | Err(BackendError::PathInaccessible)),
                    "writes are answered once durable or failed over: {:?}",
                    done.result
                );
                self.release(done.slot);
                done.result
            }
            state => panic!("completion for a pool slot in state {state:?}"),
        };
        Some((token, result))
    }
}
