//! [`Immediate`]: a memory-backed store served as a completion-based device. A write is copied
//! when it is submitted (memory is the medium, no syscall), and every op completes on the next
//! `poll_completions`, in submission order, as SPDK's malloc bdev completes on its next poll. A
//! read's data is taken from the store's memory at completion (no copy when the store exposes
//! it): the engine never has a write in flight over a range it reads.

use std::io;

use nvmirror_engine::device::{
    BlockDevice, DeviceCompletion, DeviceError, DeviceOp, DeviceOpId, DeviceRequest,
};

use super::{NamespaceDevice, SyncIo};

/// Ops one [`Immediate`] holds between submit and poll without allocating.
const COMPLETIONS_PREALLOCATED: usize = 1024;

/// A finished op waiting for the next poll.
#[derive(Debug, Clone, Copy)]
enum Done {
    Read {
        offset_bytes: u64,
        length_bytes: u32,
    },
    Other(Result<(), DeviceError>),
}

/// A store whose calls never block, completing each op on the next poll.
pub struct Immediate<T: SyncIo> {
    store: T,
    done: Vec<(DeviceOpId, Done)>,
    /// Reads of a store that does not expose its memory land here first.
    scratch: Vec<u8>,
}

impl<T: SyncIo> Immediate<T> {
    pub fn new(store: T) -> Self {
        Immediate {
            store,
            done: Vec::with_capacity(COMPLETIONS_PREALLOCATED),
            scratch: Vec::new(),
        }
    }

    pub fn store(&self) -> &T {
        &self.store
    }
}

fn outcome(result: io::Result<()>) -> Result<(), DeviceError> {
    result.map_err(|error| DeviceError::from_io(&error))
}

impl<T: SyncIo> BlockDevice for Immediate<T> {
    fn size_bytes(&self) -> u64 {
        self.store.size_bytes()
    }

    fn submit(&mut self, op: DeviceOp<'_>) {
        let done = match op.request {
            DeviceRequest::Read {
                offset_bytes,
                length_bytes,
            } => Done::Read {
                offset_bytes,
                length_bytes,
            },
            DeviceRequest::Write { offset_bytes, data } => {
                Done::Other(outcome(self.store.write_at(offset_bytes, data)))
            }
            DeviceRequest::WriteZeroes {
                offset_bytes,
                length_bytes,
            } => Done::Other(outcome(self.store.write_zeroes(offset_bytes, length_bytes))),
            DeviceRequest::Flush => Done::Other(outcome(self.store.flush())),
        };
        self.done.push((op.id, done));
    }

    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize {
        let count = self.done.len();
        if count > 0 {
            // One fence for the poll's writes, before any of them is reported done.
            self.store.order_writes();
        }
        for index in 0..count {
            let (id, done) = self.done[index];
            let result = match done {
                Done::Other(result) => result.map(|()| &[][..]),
                Done::Read {
                    offset_bytes,
                    length_bytes,
                } => {
                    let (start, length) = (offset_bytes as usize, length_bytes as usize);
                    match self.store.memory() {
                        Some(memory) if start + length <= memory.len() => {
                            Ok(&memory[start..start + length])
                        }
                        _ => {
                            self.scratch.resize(length, 0);
                            match self.store.read_at(offset_bytes, &mut self.scratch) {
                                Ok(()) => Ok(&self.scratch[..]),
                                Err(error) => Err(DeviceError::from_io(&error)),
                            }
                        }
                    }
                }
            };
            complete(DeviceCompletion { id, result });
        }
        self.done.drain(..count);
        count
    }

    fn read_now(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Option<Result<(), DeviceError>> {
        Some(outcome(self.store.read_at(offset_bytes, buf)))
    }

    fn can_read_now(&self) -> bool {
        true
    }

    fn inflight_count(&self) -> usize {
        self.done.len()
    }
}

impl<T: SyncIo> NamespaceDevice for Immediate<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::MallocDevice;

    #[test]
    fn ops_complete_on_the_next_poll_in_order_with_read_data() {
        let mut device = Immediate::new(MallocDevice::new(64 * 1024).unwrap());
        let data = [0x5au8; 4096];
        device.submit(DeviceOp {
            id: DeviceOpId(7),
            nsid: 1,
            request: DeviceRequest::Write {
                offset_bytes: 4096,
                data: &data,
            },
        });
        device.submit(DeviceOp {
            id: DeviceOpId(8),
            nsid: 1,
            request: DeviceRequest::Read {
                offset_bytes: 3584,
                length_bytes: 1024,
            },
        });
        device.submit(DeviceOp {
            id: DeviceOpId(9),
            nsid: 1,
            request: DeviceRequest::WriteZeroes {
                offset_bytes: 4096,
                length_bytes: 512,
            },
        });
        assert_eq!(device.inflight_count(), 3);
        let mut seen = Vec::new();
        device.poll_completions(&mut |completion| {
            let data = completion.result.unwrap();
            seen.push((completion.id.0, data.to_vec()));
        });
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0], (7, Vec::new()));
        assert_eq!(seen[1].0, 8);
        assert!(seen[1].1[..512].iter().all(|&b| b == 0));
        // The zeroing came before the read's data was taken: the engine never overlaps them.
        assert!(seen[1].1[512..].iter().all(|&b| b == 0));
        assert_eq!(device.inflight_count(), 0);
        let mut buf = [0; 512];
        device.read_now(4608, &mut buf).unwrap().unwrap();
        assert_eq!(buf, [0x5a; 512]);
    }
}
