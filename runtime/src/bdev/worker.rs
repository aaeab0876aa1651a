//! [`Worker`]: a store whose calls block (a file, a block device) served as a completion-based
//! device by a thread of its own, so no reactor thread ever waits on namespace I/O (invariant
//! 8). The reactor hands each op (a write's data copied into a buffer reused from a pool) to
//! the worker; the worker makes the call and sends the result back through a [`Mailbox`],
//! whose eventfd wakes a sleeping reactor. Ops run one at a time in submission order, which
//! also keeps a flush behind every write submitted before it. This is the fallback where
//! io_uring is not available; its cost is one copy and two thread hand-offs per op.

use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use nvmirror_engine::device::{
    BlockDevice, DeviceCompletion, DeviceError, DeviceOp, DeviceOpId, DeviceRequest,
};

use super::{NamespaceDevice, SyncIo};
use crate::reactor::{Doorbell, Mailbox};

/// Completions the worker's mailbox holds (more than any engine queue depth plus host reads).
const COMPLETIONS_MAX: usize = 4096;

#[derive(Debug)]
enum Job {
    Read { length_bytes: usize },
    Write,
    WriteZeroes { length_bytes: u64 },
    Flush,
}

struct Request {
    id: DeviceOpId,
    offset_bytes: u64,
    job: Job,
    buffer: Vec<u8>,
}

#[derive(Debug)]
struct Completed {
    id: DeviceOpId,
    result: Result<usize, DeviceError>,
    buffer: Vec<u8>,
}

/// A blocking store served from its own thread.
pub struct Worker {
    size_bytes: u64,
    requests: Option<mpsc::Sender<Request>>,
    completions: Arc<Mailbox<Completed>>,
    free_buffers: Vec<Vec<u8>>,
    inflight: usize,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker thread for `store` (named after `name` in logs and thread lists).
    pub fn start<T: SyncIo + 'static>(name: &str, mut store: T) -> io::Result<Worker> {
        let size_bytes = store.size_bytes();
        let (requests, incoming) = mpsc::channel::<Request>();
        let completions = Mailbox::new(COMPLETIONS_MAX)?;
        let outgoing = Arc::clone(&completions);
        let thread = std::thread::Builder::new()
            .name(format!("nvmirror-io-{name}"))
            .spawn(move || {
                while let Ok(request) = incoming.recv() {
                    let completed = execute(&mut store, request);
                    let mut pending = completed;
                    // The mailbox holds more than can be in flight; a full one only means the
                    // reactor has not polled yet.
                    while let Err(back) = outgoing.send(pending) {
                        pending = back;
                        std::thread::yield_now();
                    }
                }
            })?;
        Ok(Worker {
            size_bytes,
            requests: Some(requests),
            completions,
            free_buffers: Vec::new(),
            inflight: 0,
            thread: Some(thread),
        })
    }

    fn buffer(&mut self, length_bytes: usize) -> Vec<u8> {
        let mut buffer = self.free_buffers.pop().unwrap_or_default();
        buffer.resize(length_bytes, 0);
        buffer
    }
}

fn execute<T: SyncIo>(store: &mut T, request: Request) -> Completed {
    let Request {
        id,
        offset_bytes,
        job,
        mut buffer,
    } = request;
    let result = match job {
        Job::Read { length_bytes } => store
            .read_at(offset_bytes, &mut buffer[..length_bytes])
            .map(|()| length_bytes),
        Job::Write => store.write_at(offset_bytes, &buffer).map(|()| 0),
        Job::WriteZeroes { length_bytes } => {
            store.write_zeroes(offset_bytes, length_bytes).map(|()| 0)
        }
        Job::Flush => store.flush().map(|()| 0),
    };
    Completed {
        id,
        result: result.map_err(|error| DeviceError::from_io(&error)),
        buffer,
    }
}

impl BlockDevice for Worker {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn submit(&mut self, op: DeviceOp<'_>) {
        let (job, buffer) = match op.request {
            DeviceRequest::Read { length_bytes, .. } => (
                Job::Read {
                    length_bytes: length_bytes as usize,
                },
                self.buffer(length_bytes as usize),
            ),
            DeviceRequest::Write { data, .. } => {
                let mut buffer = self.buffer(data.len());
                buffer.copy_from_slice(data);
                (Job::Write, buffer)
            }
            DeviceRequest::WriteZeroes { length_bytes, .. } => {
                (Job::WriteZeroes { length_bytes }, Vec::new())
            }
            DeviceRequest::Flush => (Job::Flush, Vec::new()),
        };
        let request = Request {
            id: op.id,
            offset_bytes: op.request.range().0,
            job,
            buffer,
        };
        self.requests
            .as_ref()
            .expect("running")
            .send(request)
            .expect("the worker thread runs while its device exists");
        self.inflight += 1;
    }

    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize {
        let mut count = 0;
        while let Some(completed) = self.completions.pop() {
            let result = completed
                .result
                .map(|length_bytes| &completed.buffer[..length_bytes]);
            complete(DeviceCompletion {
                id: completed.id,
                result,
            });
            self.free_buffers.push(completed.buffer);
            self.inflight -= 1;
            count += 1;
        }
        count
    }

    fn inflight_count(&self) -> usize {
        self.inflight
    }
}

impl NamespaceDevice for Worker {
    fn doorbell(&self) -> Option<Arc<dyn Doorbell>> {
        Some(Arc::clone(&self.completions) as Arc<dyn Doorbell>)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the requests already sent.
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::FileDevice;
    use crate::ring_memory::scratch::ScratchDir;

    fn wait(device: &mut Worker, count: usize) -> Vec<(u64, Result<Vec<u8>, DeviceError>)> {
        let mut seen = Vec::new();
        for _ in 0..10_000 {
            device.poll_completions(&mut |completion| {
                seen.push((completion.id.0, completion.result.map(<[u8]>::to_vec)));
            });
            if seen.len() == count {
                return seen;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("the worker did not complete {count} ops");
    }

    #[test]
    fn a_file_served_by_a_worker_writes_reads_and_flushes_in_order() {
        let dir = ScratchDir::new(&std::env::temp_dir(), "worker");
        let file = FileDevice::open(&dir.path().join("ns.img"), Some(1 << 20), true).unwrap();
        let mut device = Worker::start("test", file).unwrap();
        assert!(device.doorbell().is_some());
        let data = vec![0xa5u8; 8192];
        device.submit(DeviceOp {
            id: DeviceOpId(1),
            nsid: 1,
            request: DeviceRequest::Write {
                offset_bytes: 4096,
                data: &data,
            },
        });
        device.submit(DeviceOp {
            id: DeviceOpId(2),
            nsid: 1,
            request: DeviceRequest::Flush,
        });
        device.submit(DeviceOp {
            id: DeviceOpId(3),
            nsid: 1,
            request: DeviceRequest::Read {
                offset_bytes: 0,
                length_bytes: 12288,
            },
        });
        assert_eq!(device.inflight_count(), 3);
        let seen = wait(&mut device, 3);
        assert_eq!(seen[0], (1, Ok(Vec::new())));
        assert_eq!(seen[1], (2, Ok(Vec::new())));
        let read = seen[2].1.as_ref().unwrap();
        assert!(read[..4096].iter().all(|&b| b == 0));
        assert_eq!(&read[4096..], &data[..]);
        assert_eq!(device.inflight_count(), 0);
    }
}
