//! The storage boundary of the target: the [`Backend`] trait that the replicated volume (and the
//! unreplicated [`DeviceBackend`]) implements, so write data lands straight in the backend's buffer
//! (the volume's slot in the NVRAM ring) and a write completes only when the backend says it is durable.

use std::collections::VecDeque;

use nvmirror_engine::device::{BlockDevice, DeviceOp, DeviceOpId, DeviceRequest};
use nvmirror_engine::geometry::SECTOR_SIZE;

/// Size of a logical block exported to hosts.
pub const LBA_BYTES: u32 = SECTOR_SIZE as u32;
/// Largest single write the [`DeviceBackend`] buffers (the target's MDTS is never larger).
pub const DEVICE_BACKEND_WRITE_BYTES_MAX: usize = 128 * 1024;
/// Write slots the [`DeviceBackend`] preallocates; more outstanding writes report `Busy`.
pub const DEVICE_BACKEND_SLOT_COUNT: usize = 256;
/// Most blocks one [`Backend::write_zeroes`] call covers: a Write Zeroes command's largest NLB (16 bits,
/// 0's based); a Dataset Management deallocate is split into calls of at most this many.
pub const WRITE_ZEROES_BLOCKS_MAX: u64 = 1 << 16;
const _: () = assert!(
    WRITE_ZEROES_BLOCKS_MAX * LBA_BYTES as u64 <= nvmirror_engine::geometry::WRITE_ZEROES_BYTES_MAX
);

/// What the target exports for one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub size_bytes: u64,
    /// Stable identity, reported as the namespace UUID and NGUID.
    pub uuid: [u8; 16],
}

/// Names one outstanding backend operation until [`Backend::poll_completion`] returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoToken(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    /// No room right now (ring backpressure): retry on a later poll, never fail the command.
    Busy,
    InvalidNamespace,
    OutOfRange,
    Io,
    /// This path cannot take writes now (the volume's replica is lost and its policy fails
    /// writes): a path error, so host multipath retries on another path.
    PathInaccessible,
}

/// The volume behind the target. Writes are two-phase: reserve a slot, receive the host's data straight
/// into [`Backend::write_buffer`], then commit (or abort if the connection died before the data arrived).
pub trait Backend {
    type WriteSlot;
    /// Does a reserved slot hold back the completion of the writes reserved after it until it is
    /// committed or aborted? (The NVRAM ring completes writes in ring order.) Then the target
    /// reserves a slot for a write only once all its data is in: data sent after an R2T is
    /// received into the request's own buffer first and copied into the slot, so a host that
    /// withholds its data never delays another write. `false`: slots are independent (a buffer
    /// each), and one is reserved when the command arrives, its data received straight into it.
    const ORDERED_WRITE_SLOTS: bool = true;
    fn namespace(&self, nsid: u32) -> Option<NamespaceInfo>;
    /// Busy = no room right now (ring backpressure): keep the command queued and retry on a later poll; never fail it.
    fn reserve_write(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<Self::WriteSlot, BackendError>;
    /// Exactly `length_bytes` long.
    fn write_buffer(&mut self, slot: &Self::WriteSlot) -> &mut [u8];
    /// Copies data that arrived with the command (in-capsule) into the slot at `offset`; a
    /// backend may copy past the cache (the NVRAM ring is read back only at its next CP).
    fn fill_write(&mut self, slot: &Self::WriteSlot, offset: usize, data: &[u8]) {
        self.write_buffer(slot)[offset..offset + data.len()].copy_from_slice(data);
    }
    /// Completes later via `poll_completion`.
    fn commit_write(&mut self, now_us: u64, slot: Self::WriteSlot) -> IoToken;
    /// [`Backend::commit_write`] when the host's data digest was checked over the whole slot as
    /// it is now: `data_crc` is that CRC32C, for a backend that checksums its data (the NVRAM
    /// ring) to take instead of reading the data again.
    fn commit_write_verified(
        &mut self,
        now_us: u64,
        slot: Self::WriteSlot,
        _data_crc: u32,
    ) -> IoToken {
        self.commit_write(now_us, slot)
    }
    /// The connection died before the data arrived: the backend turns the slot into a no-op write (never garbage).
    fn abort_write(&mut self, now_us: u64, slot: Self::WriteSlot) -> IoToken;
    /// At most [`WRITE_ZEROES_BLOCKS_MAX`] blocks; serves Write Zeroes and Dataset Management
    /// deallocate, so zeroed blocks must read back as zeroes once the token completes.
    fn write_zeroes(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<IoToken, BackendError>;
    /// Synchronous.
    fn read(&mut self, nsid: u32, lba: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Starts a read the backend finishes later (a volume served by another reactor): the token
    /// completes through `poll_completion`, then [`Backend::finish_read`] hands over the data.
    /// `Ok(None)`: this backend reads synchronously, call [`Backend::read`]. Busy: retry later.
    fn start_read(
        &mut self,
        _now_us: u64,
        _nsid: u32,
        _lba: u64,
        _length_bytes: u32,
    ) -> Result<Option<IoToken>, BackendError> {
        Ok(None)
    }
    /// Copies the data of a completed [`Backend::start_read`] into `buf` (once per token).
    fn finish_read(&mut self, _token: IoToken, _buf: &mut [u8]) -> Result<(), BackendError> {
        unreachable!("finish_read without start_read")
    }
    /// A completed token nobody waits for any more (its connection closed): the backend frees
    /// what it kept for it (a finished read's data).
    fn abandon(&mut self, _token: IoToken) {}
    fn flush(&mut self, now_us: u64, nsid: u32) -> Result<IoToken, BackendError>;
    /// The next finished operation and how it ended: `Err` for a write, write zeroes or flush
    /// that will never be durable (a read's outcome comes from [`Backend::finish_read`]).
    fn poll_completion(&mut self) -> Option<(IoToken, Result<(), BackendError>)>;
}

/// A reserved write of the [`DeviceBackend`]: an index into its preallocated slot buffers.
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceWriteSlot {
    index: usize,
    nsid: u32,
    offset_bytes: u64,
    length_bytes: u32,
}

/// The unreplicated backend: a set of `BlockDevice`s (nsid = index + 1) driven through device
/// ops; an operation's token completes through `poll_completion` when its device op does. Used
/// by tests and by the "no replication" benchmark case.
pub struct DeviceBackend<D: BlockDevice> {
    devices: Vec<D>,
    slot_buffers: Vec<Box<[u8]>>,
    free_slots: Vec<usize>,
    completions: VecDeque<IoToken>,
    next_token: u64,
    /// Ops in flight: (token, the slot they hold, is a read).
    inflight: Vec<(u64, Option<usize>, bool)>,
    /// Reads whose data is in their slot: (token, slot, result).
    reads_done: Vec<(u64, usize, Result<(), BackendError>)>,
}

impl<D: BlockDevice> DeviceBackend<D> {
    pub fn new(devices: Vec<D>) -> Self {
        assert!(
            !devices.is_empty(),
            "a backend exports at least one namespace"
        );
        for device in &devices {
            assert!(
                device.size_bytes() % LBA_BYTES as u64 == 0,
                "device size is whole LBAs"
            );
        }
        DeviceBackend {
            devices,
            slot_buffers: (0..DEVICE_BACKEND_SLOT_COUNT)
                .map(|_| vec![0u8; DEVICE_BACKEND_WRITE_BYTES_MAX].into_boxed_slice())
                .collect(),
            free_slots: (0..DEVICE_BACKEND_SLOT_COUNT).rev().collect(),
            completions: VecDeque::with_capacity(DEVICE_BACKEND_SLOT_COUNT * 4),
            next_token: 1,
            inflight: Vec::with_capacity(DEVICE_BACKEND_SLOT_COUNT * 2),
            reads_done: Vec::with_capacity(DEVICE_BACKEND_SLOT_COUNT),
        }
    }

    fn check(&self, nsid: u32, lba: u64, length_bytes: u64) -> Result<usize, BackendError> {
        let index = (nsid as usize)
            .checked_sub(1)
            .filter(|&i| i < self.devices.len());
        let index = index.ok_or(BackendError::InvalidNamespace)?;
        let offset = lba
            .checked_mul(LBA_BYTES as u64)
            .ok_or(BackendError::OutOfRange)?;
        let end = offset
            .checked_add(length_bytes)
            .ok_or(BackendError::OutOfRange)?;
        if end > self.devices[index].size_bytes() {
            return Err(BackendError::OutOfRange);
        }
        Ok(index)
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// Submits `request` to namespace `index + 1` under a new token holding `slot`.
    fn submit(
        &mut self,
        index: usize,
        request: DeviceRequest<'_>,
        slot: Option<usize>,
        read: bool,
    ) -> IoToken {
        let token = self.token();
        self.inflight.push((token, slot, read));
        let op = DeviceOp {
            id: DeviceOpId(token),
            nsid: index as u32 + 1,
            request,
        };
        self.devices[index].submit(op);
        IoToken(token)
    }

    fn poll_devices(&mut self) {
        let DeviceBackend {
            devices,
            slot_buffers,
            free_slots,
            completions,
            inflight,
            reads_done,
            ..
        } = self;
        for device in devices.iter_mut() {
            device.poll_completions(&mut |completion| {
                let token = completion.id.0;
                let at = inflight
                    .iter()
                    .position(|&(t, _, _)| t == token)
                    .expect("a completion of an op this backend submitted");
                let (_, slot, read) = inflight.swap_remove(at);
                match (slot, read) {
                    (Some(slot), true) => {
                        let result = completion.result.map(|data| {
                            slot_buffers[slot][..data.len()].copy_from_slice(data);
                        });
                        reads_done.push((token, slot, result.map_err(|_| BackendError::Io)));
                    }
                    (slot, _) => {
                        if let Err(error) = completion.result {
                            log::error!("device op {token} failed: {error}");
                        }
                        if let Some(slot) = slot {
                            free_slots.push(slot);
                        }
                    }
                }
                completions.push_back(IoToken(token));
            });
        }
    }
}

impl<D: BlockDevice> Backend for DeviceBackend<D> {
    type WriteSlot = DeviceWriteSlot;
    /// Each slot is its own buffer, written to the device at commit.
    const ORDERED_WRITE_SLOTS: bool = false;

    fn namespace(&self, nsid: u32) -> Option<NamespaceInfo> {
        let index = (nsid as usize).checked_sub(1)?;
        let device = self.devices.get(index)?;
        let mut uuid = *b"nvmirror-device\0";
        uuid[15] = nsid as u8;
        uuid[6] = (uuid[6] & 0x0f) | 0x40; // RFC 4122 version 4 layout, stable per nsid
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        Some(NamespaceInfo {
            size_bytes: device.size_bytes(),
            uuid,
        })
    }

    fn reserve_write(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<DeviceWriteSlot, BackendError> {
        assert!(length_bytes > 0 && length_bytes as usize <= DEVICE_BACKEND_WRITE_BYTES_MAX);
        self.check(nsid, lba, length_bytes as u64)?;
        let index = self.free_slots.pop().ok_or(BackendError::Busy)?;
        Ok(DeviceWriteSlot {
            index,
            nsid,
            offset_bytes: lba * LBA_BYTES as u64,
            length_bytes,
        })
    }

    fn write_buffer(&mut self, slot: &DeviceWriteSlot) -> &mut [u8] {
        &mut self.slot_buffers[slot.index][..slot.length_bytes as usize]
    }

    /// The slot stays held until the device op completes (the device may read it until then).
    fn commit_write(&mut self, _now_us: u64, slot: DeviceWriteSlot) -> IoToken {
        let token = self.token();
        self.inflight.push((token, Some(slot.index), false));
        let data = &self.slot_buffers[slot.index][..slot.length_bytes as usize];
        self.devices[slot.nsid as usize - 1].submit(DeviceOp {
            id: DeviceOpId(token),
            nsid: slot.nsid,
            request: DeviceRequest::Write {
                offset_bytes: slot.offset_bytes,
                data,
            },
        });
        IoToken(token)
    }

    fn abort_write(&mut self, _now_us: u64, slot: DeviceWriteSlot) -> IoToken {
        self.free_slots.push(slot.index);
        let token = IoToken(self.token());
        self.completions.push_back(token);
        token
    }

    fn write_zeroes(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<IoToken, BackendError> {
        let index = self.check(nsid, lba, length_bytes)?;
        let request = DeviceRequest::WriteZeroes {
            offset_bytes: lba * LBA_BYTES as u64,
            length_bytes,
        };
        Ok(self.submit(index, request, None, false))
    }

    fn read(&mut self, nsid: u32, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let index = self.check(nsid, lba, buf.len() as u64)?;
        match self.devices[index].read_now(lba * LBA_BYTES as u64, buf) {
            Some(result) => result.map_err(|_| BackendError::Io),
            None => unreachable!("read only where start_read said the device reads at once"),
        }
    }

    /// A device that reads memory is read at once; any other gets a device op whose data
    /// lands in a slot buffer until [`Backend::finish_read`].
    fn start_read(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<Option<IoToken>, BackendError> {
        let index = self.check(nsid, lba, u64::from(length_bytes))?;
        if self.devices[index].can_read_now() {
            return Ok(None);
        }
        assert!(length_bytes as usize <= DEVICE_BACKEND_WRITE_BYTES_MAX);
        let slot = self.free_slots.pop().ok_or(BackendError::Busy)?;
        let request = DeviceRequest::Read {
            offset_bytes: lba * LBA_BYTES as u64,
            length_bytes,
        };
        Ok(Some(self.submit(index, request, Some(slot), true)))
    }

    fn finish_read(&mut self, token: IoToken, buf: &mut [u8]) -> Result<(), BackendError> {
        let at = self
            .reads_done
            .iter()
            .position(|&(t, _, _)| t == token.0)
            .expect("finish_read of a completed read token");
        let (_, slot, result) = self.reads_done.swap_remove(at);
        if result.is_ok() {
            buf.copy_from_slice(&self.slot_buffers[slot][..buf.len()]);
        }
        self.free_slots.push(slot);
        result
    }

    fn abandon(&mut self, token: IoToken) {
        if let Some(at) = self.reads_done.iter().position(|&(t, _, _)| t == token.0) {
            let (_, slot, _) = self.reads_done.swap_remove(at);
            self.free_slots.push(slot);
        }
    }

    fn flush(&mut self, _now_us: u64, nsid: u32) -> Result<IoToken, BackendError> {
        let index = self.check(nsid, 0, 0)?;
        Ok(self.submit(index, DeviceRequest::Flush, None, false))
    }

    fn poll_completion(&mut self) -> Option<(IoToken, Result<(), BackendError>)> {
        if self.completions.is_empty() {
            self.poll_devices();
        }
        self.completions.pop_front().map(|token| (token, Ok(())))
    }
}
