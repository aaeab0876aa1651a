//! The replicated volume behind the NVMe/TCP target, with a destination on loopback: a write
//! whose data has not arrived never delays the completion of one whose data has, on any
//! connection (the NVRAM ring completes writes in ring order, so nvmf reserves a write's ring
//! entry only when its data is in), and a write whose data never comes is failed and its
//! connection closed after the data timeout. A Flush on this volatile ring (anonymous memory)
//! completes only once a CP put every write completed before it on the mirror.

#[path = "../../nvmf/tests/host/mod.rs"]
mod host;

use nvmirror_engine::metadata::{NodeMetadata, BITMAP_EXTENT_BYTES_DEFAULT};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use host::{Host, DEVICE_BYTES};
use nvmirror_engine::cp::CpMode;
use nvmirror_engine::destination::DestinationConfig;
use nvmirror_engine::device::MemoryDevice;
use nvmirror_engine::geometry::RING_BYTES_MIN;
use nvmirror_engine::source::{SourceConfig, DEVICE_QUEUE_DEPTH_DEFAULT};
use nvmirror_nvmf::pdu::{
    admin_opcode, io_opcode, Command, DataHeader, Fes, GenericStatus, Pdu, SglDescriptor, R2T,
};
use nvmirror_nvmf::Target;
use nvmirror_runtime::bdev::read_waiting;
use nvmirror_runtime::link::TcpTransport;
use nvmirror_runtime::node::{
    DestinationEngine, DestinationNode, Device, NodeControl, SourceEngine, SourceNode,
};
use nvmirror_runtime::reactor::Poller;
use nvmirror_runtime::ring_memory::RingMemory;
use nvmirror_runtime::target::TargetFrontEnd;

const VOLUME: [u8; 16] = [7; 16];
/// The pair stops by itself after this long, whatever the test does.
const LIFETIME_MAX: Duration = Duration::from_secs(60);
/// What "promptly" means for a write that waits for nothing (loopback, replicated).
const PROMPT: Duration = Duration::from_secs(2);

/// A source node (the replicated volume and its target) and its destination, polled in one
/// thread until dropped.
struct Pair {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Stopped>>,
}

/// What the pair held when it stopped: the destination's last completed CP and the start of
/// its mirror namespace.
struct Stopped {
    cp_completed: u64,
    mirror_head: Vec<u8>,
}

/// Bytes of the mirror a stopped pair reports.
const MIRROR_HEAD_BYTES: usize = 64 * 1024;

impl Pair {
    fn stop(mut self) -> Stopped {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().expect("pair thread")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("pair thread");
        }
    }
}

fn memory_device() -> Device {
    Box::new(MemoryDevice::new(DEVICE_BYTES))
}

/// A node's metadata, freshly formatted (both sides fresh: the pair takes the source's proposal).
fn fresh_metadata(node_id: u64, sizes: &[u64]) -> NodeMetadata {
    NodeMetadata::format(
        VOLUME,
        node_id,
        node_id + 100,
        sizes,
        BITMAP_EXTENT_BYTES_DEFAULT,
    )
    .unwrap()
}

/// The metadata device holding [`fresh_metadata`]'s image.
fn metadata_device(node_id: u64, sizes: &[u64]) -> Device {
    Box::new(MemoryDevice::from_bytes(
        fresh_metadata(node_id, sizes).image(),
    ))
}

impl Pair {
    fn start(data_timeout_ms: u32) -> Pair {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let (address_sender, address_receiver) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ring = RingMemory::anonymous(RING_BYTES_MIN as usize).unwrap();
            let sizes = [DEVICE_BYTES as u64];
            let destination = DestinationEngine::open(
                DestinationConfig {
                    volume_id: VOLUME,
                    device_queue_depth: DEVICE_QUEUE_DEPTH_DEFAULT,
                    peer_timeout_us: nvmirror_engine::PEER_TIMEOUT_US_DEFAULT,
                    assume_identical: true,
                },
                ring,
                &sizes,
                fresh_metadata(2, &sizes),
            )
            .unwrap();
            let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let mut destination = DestinationNode::new(
                TcpTransport::shared(),
                destination,
                vec![memory_device()],
                metadata_device(2, &sizes),
                listen,
                NodeControl::new().unwrap(),
            )
            .unwrap();
            let config = SourceConfig {
                volume_id: VOLUME,
                cp_interval_us: u64::MAX,
                mode: CpMode::References,
                device_queue_depth: DEVICE_QUEUE_DEPTH_DEFAULT,
                peer_timeout_us: nvmirror_engine::PEER_TIMEOUT_US_DEFAULT,
                peer_loss_policy: nvmirror_engine::PeerLossPolicy::Suspend,
                generation_seed: 1,
                resync_rate_bytes_per_s: 0,
                assume_identical: true,
            };
            let ring = RingMemory::anonymous(RING_BYTES_MIN as usize).unwrap();
            let now_us = nvmirror_runtime::reactor::monotonic_us();
            let (source, _) =
                SourceEngine::open(config, ring, &sizes, fresh_metadata(1, &sizes), now_us)
                    .unwrap();
            let mut target_config = host::config(true);
            target_config.data_timeout_ms = data_timeout_ms;
            let target = Target::new(target_config).unwrap();
            let front_end = TargetFrontEnd::new(target, Vec::new()).unwrap();
            address_sender.send(front_end.local_addrs()[0]).unwrap();
            let peer = destination.local_addr().expect("listening");
            let mut source = SourceNode::new(
                TcpTransport::shared(),
                source,
                vec![memory_device()],
                metadata_device(1, &sizes),
                peer,
                Box::new(move |_: &SourceEngine| Ok(front_end)),
                NodeControl::new().unwrap(),
            );
            let start = Instant::now();
            while !thread_stop.load(Ordering::Acquire) && start.elapsed() < LIFETIME_MAX {
                let now_us = start.elapsed().as_micros() as u64;
                let work = destination.poll(now_us) + source.poll(now_us);
                if work == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            let mut mirror_head = vec![0; MIRROR_HEAD_BYTES];
            read_waiting(destination.mirrors[0].as_mut(), 0, &mut mirror_head).unwrap();
            Stopped {
                cp_completed: destination.destination.cp_completed(),
                mirror_head,
            }
        });
        Pair {
            address: address_receiver.recv().unwrap(),
            stop,
            thread: Some(thread),
        }
    }
}

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Sends a write of `data` at `lba` whose data goes after an R2T, and returns that R2T: the
/// data is withheld until the caller sends it.
fn write_and_withhold(host: &mut Host, lba: u64, data: &[u8]) -> (u16, R2T) {
    let cid = host.cid();
    let sgl = SglDescriptor::Transport {
        length: data.len() as u32,
    };
    let blocks = (data.len() / 512) as u32;
    let command = Command::read_write(io_opcode::WRITE, cid, 1, lba, blocks, sgl);
    host.send_capsule(&command, &[]);
    match host.receive().expect("an R2T").pdu {
        Pdu::R2T(r2t) => {
            assert_eq!((r2t.cccid, r2t.r2to, r2t.r2tl), (cid, 0, data.len() as u32));
            (cid, r2t)
        }
        other => panic!("expected an R2T, got {other:?}"),
    }
}

/// Sends the withheld data of `r2t` and expects its write to complete successfully.
fn send_withheld(host: &mut Host, cid: u16, r2t: R2T, data: &[u8]) {
    let header = DataHeader {
        cccid: r2t.cccid,
        ttag: r2t.ttag,
        datao: 0,
        datal: data.len() as u32,
        last: true,
        success: false,
    };
    host.send_h2c(header, data);
    let completion = host.receive_completion();
    assert_eq!(completion.cid, cid);
    assert!(completion.status.is_success(), "{completion:?}");
}

/// An in-capsule write that must complete within [`PROMPT`].
fn prompt_write(host: &mut Host, lba: u64, data: &[u8]) {
    let started = Instant::now();
    host.stream.set_read_timeout(Some(PROMPT)).unwrap();
    let completion = host.write(lba, data, true);
    assert!(completion.status.is_success(), "{completion:?}");
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    host.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
}

fn assert_reads(host: &mut Host, lba: u64, data: &[u8]) {
    let (completion, read) = host.read(lba, (data.len() / 512) as u32);
    assert!(completion.status.is_success(), "{completion:?}");
    assert!(read == data, "data read back at lba {lba} differs");
}

#[test]
fn a_write_waiting_for_its_data_does_not_delay_another_connections_write() {
    let pair = Pair::start(30_000);
    let admin = Host::admin(pair.address, false);
    let mut holder = Host::io(pair.address, admin.cntlid, 1, false);
    let mut other = Host::io(pair.address, admin.cntlid, 2, true);
    let held = pattern(64 * 1024, 1);
    let (cid, r2t) = write_and_withhold(&mut holder, 0, &held);
    let small = pattern(1024, 2);
    prompt_write(&mut other, 1000, &small);
    // A second one on the holder's own connection does not wait either.
    let own = pattern(4096, 3);
    prompt_write(&mut holder, 2000, &own);
    send_withheld(&mut holder, cid, r2t, &held);
    assert_reads(&mut other, 0, &held);
    assert_reads(&mut holder, 1000, &small);
    assert_reads(&mut other, 2000, &own);
}

#[test]
fn a_holder_answering_keep_alives_delays_no_one() {
    let pair = Pair::start(30_000);
    let mut admin = Host::admin(pair.address, false);
    let mut holder = Host::io(pair.address, admin.cntlid, 1, true);
    let mut other = Host::io(pair.address, admin.cntlid, 2, false);
    let held = pattern(64 * 1024, 4);
    let (cid, r2t) = write_and_withhold(&mut holder, 64, &held);
    for round in 0..8u8 {
        let (completion, _) = admin.admin_command(admin_opcode::KEEP_ALIVE, 0, 0, 0, 0);
        assert!(completion.status.is_success());
        let data = pattern(1024, 10 + round);
        prompt_write(&mut other, 3000 + u64::from(round) * 2, &data);
        std::thread::sleep(Duration::from_millis(50));
    }
    send_withheld(&mut holder, cid, r2t, &held);
    assert_reads(&mut other, 64, &held);
    for round in 0..8u8 {
        assert_reads(
            &mut holder,
            3000 + u64::from(round) * 2,
            &pattern(1024, 10 + round),
        );
    }
}

#[test]
fn a_write_whose_data_never_comes_fails_and_its_connection_closes() {
    let data_timeout = Duration::from_millis(400);
    let pair = Pair::start(data_timeout.as_millis() as u32);
    let admin = Host::admin(pair.address, false);
    let mut holder = Host::io(pair.address, admin.cntlid, 1, false);
    let mut other = Host::io(pair.address, admin.cntlid, 2, false);
    let started = Instant::now();
    let (cid, _r2t) = write_and_withhold(&mut holder, 128, &pattern(64 * 1024, 5));
    prompt_write(&mut other, 4000, &pattern(1024, 6));
    let completion = holder.receive_completion();
    let waited = started.elapsed();
    assert_eq!(completion.cid, cid);
    assert_eq!(
        completion.status,
        GenericStatus::TransientTransportError.into()
    );
    assert!(!completion.status.dnr, "the host may retry it");
    assert!(waited >= data_timeout, "failed after {waited:?}");
    assert!(waited < data_timeout * 5, "failed only after {waited:?}");
    holder.expect_term_req(Fes::PduSequenceError);
    // Nothing of it was written, and the volume goes on.
    assert_reads(&mut other, 128, &vec![0; 64 * 1024]);
    prompt_write(&mut other, 4002, &pattern(1024, 7));
    assert_reads(&mut other, 4000, &pattern(1024, 6));
}

fn flush(host: &mut Host) -> nvmirror_nvmf::pdu::Completion {
    let cid = host.cid();
    let mut command = Command::zeroed();
    command
        .set_opcode(io_opcode::FLUSH)
        .set_cid(cid)
        .set_nsid(1);
    host.execute(&command, &[], &[]).0
}

#[test]
fn a_flush_on_a_volatile_ring_completes_once_a_cp_put_the_writes_on_the_mirror() {
    let data = pattern(8192, 11);
    // No CP timer: without the flush nothing reaches the mirror.
    let pair = Pair::start(30_000);
    let admin = Host::admin(pair.address, false);
    let mut io = Host::io(pair.address, admin.cntlid, 1, false);
    assert!(io.write(16, &data, true).status.is_success());
    let stopped = pair.stop();
    assert_eq!(stopped.cp_completed, 0, "no CP without a flush");
    assert!(stopped.mirror_head[16 * 512..16 * 512 + data.len()]
        .iter()
        .all(|&b| b == 0));

    let pair = Pair::start(30_000);
    let admin = Host::admin(pair.address, false);
    let mut io = Host::io(pair.address, admin.cntlid, 1, false);
    assert!(io.write(16, &data, true).status.is_success());
    let completion = flush(&mut io);
    assert!(completion.status.is_success(), "{completion:?}");
    let stopped = pair.stop();
    assert!(stopped.cp_completed >= 1, "the flush took a CP");
    assert_eq!(
        &stopped.mirror_head[16 * 512..16 * 512 + data.len()],
        &data[..],
        "the flushed write is on the mirror"
    );
}
