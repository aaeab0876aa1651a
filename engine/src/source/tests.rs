//! Source + destination over a direct in-memory link and memory devices driven through device
//! ops: how blocks are mirrored at a CP (references for wholly overwritten blocks, data for
//! partial ones), reference resolution to the right bytes at the destination, the ack rule,
//! the stale-source refusal, the point-in-time mirror, and device failures as events.

use std::collections::HashMap;

mod liveness;
mod resync;

use super::*;
use crate::destination::{Destination, DestinationConfig};
use crate::device::{
    BlockDevice, DeviceCompletion, DeviceOp, DeviceOpId, DeviceRequest, MemoryDevice,
};
use crate::geometry::RING_BYTES_MIN;
use crate::liveness::PeerLossPolicy;
use crate::metadata::{NodeMetadata, BITMAP_EXTENT_BYTES_DEFAULT};

const VOLUME: [u8; 16] = [3; 16];
const NAMESPACE_BYTES: usize = 1 << 20;
const DEPTH: u32 = 8;
const PEER_TIMEOUT_US: u64 = 3_000_000;

/// A memory namespace whose ops can be made to fail or to stall (completions held back).
#[derive(Default)]
struct TestDevice {
    inner: Option<MemoryDevice>,
    kinds: HashMap<DeviceOpId, DeviceOpKind>,
    fail_reads: bool,
    fail_writes: bool,
    stalled: bool,
}

impl TestDevice {
    fn new() -> Self {
        TestDevice {
            inner: Some(MemoryDevice::new(NAMESPACE_BYTES)),
            ..TestDevice::default()
        }
    }
    fn bytes(&self) -> &[u8] {
        &self.inner.as_ref().unwrap().bytes
    }
}

impl BlockDevice for TestDevice {
    fn size_bytes(&self) -> u64 {
        NAMESPACE_BYTES as u64
    }
    fn submit(&mut self, op: DeviceOp<'_>) {
        self.kinds.insert(op.id, op.request.kind());
        self.inner.as_mut().unwrap().submit(op);
    }
    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize {
        if self.stalled {
            return 0;
        }
        let (kinds, fail_reads, fail_writes) = (&mut self.kinds, self.fail_reads, self.fail_writes);
        self.inner
            .as_mut()
            .unwrap()
            .poll_completions(&mut |completion| {
                let kind = kinds.remove(&completion.id).unwrap();
                let fail = (kind == DeviceOpKind::Read && fail_reads)
                    || (kind != DeviceOpKind::Read && fail_writes);
                let injected = DeviceError {
                    kind: std::io::ErrorKind::Other,
                    errno: Some(5),
                };
                complete(DeviceCompletion {
                    id: completion.id,
                    result: if fail {
                        Err(injected)
                    } else {
                        completion.result
                    },
                });
            })
    }
    fn inflight_count(&self) -> usize {
        self.inner.as_ref().unwrap().inflight_count()
    }
}

struct Pair {
    source: Source<Vec<u8>>,
    destination: Destination<Vec<u8>>,
    primaries: Vec<TestDevice>,
    mirrors: Vec<TestDevice>,
    /// Each side's metadata device (ops complete at once).
    source_metadata: MemoryDevice,
    destination_metadata: MemoryDevice,
    now_us: u64,
}

const SOURCE_NODE: u64 = 0x50;
const DESTINATION_NODE: u64 = 0xD0;

fn formatted_metadata(node_id: u64) -> (NodeMetadata, MemoryDevice) {
    let metadata = NodeMetadata::format(
        VOLUME,
        node_id,
        node_id + 0x6E00,
        &[NAMESPACE_BYTES as u64],
        BITMAP_EXTENT_BYTES_DEFAULT,
    )
    .unwrap();
    let device = MemoryDevice::from_bytes(metadata.image());
    (metadata, device)
}

/// The metadata a node finds on its device at its next start.
fn reopen_metadata(device: &MemoryDevice) -> NodeMetadata {
    NodeMetadata::open(&device.bytes, VOLUME, &[NAMESPACE_BYTES as u64])
        .unwrap()
        .0
}

fn config(mode: CpMode) -> SourceConfig {
    SourceConfig {
        volume_id: VOLUME,
        cp_interval_us: u64::MAX,
        mode,
        device_queue_depth: DEPTH,
        peer_timeout_us: PEER_TIMEOUT_US,
        peer_loss_policy: PeerLossPolicy::Suspend,
        generation_seed: 0x5eed,
        resync_rate_bytes_per_s: 0,
        assume_identical: true,
    }
}

fn destination_config() -> DestinationConfig {
    DestinationConfig {
        volume_id: VOLUME,
        device_queue_depth: DEPTH,
        peer_timeout_us: PEER_TIMEOUT_US,
        assume_identical: true,
    }
}

fn pair(mode: CpMode) -> Pair {
    pair_with(config(mode))
}

fn pair_with(config: SourceConfig) -> Pair {
    let sizes = [NAMESPACE_BYTES as u64];
    let (source_metadata, source_device) = formatted_metadata(SOURCE_NODE);
    let (destination_metadata, destination_device) = formatted_metadata(DESTINATION_NODE);
    let (source, _) = Source::open(
        config,
        vec![0; RING_BYTES_MIN as usize],
        &sizes,
        source_metadata,
        0,
    )
    .unwrap();
    let destination = Destination::open(
        destination_config(),
        vec![0; RING_BYTES_MIN as usize],
        &sizes,
        destination_metadata,
    )
    .unwrap();
    Pair {
        source,
        destination,
        primaries: vec![TestDevice::new()],
        mirrors: vec![TestDevice::new()],
        source_metadata: source_device,
        destination_metadata: destination_device,
        now_us: 1,
    }
}

impl Pair {
    /// Submits every op both sides emit and hands back every completion, until quiet; returns
    /// whether anything happened.
    fn devices(&mut self) -> bool {
        for pass in 0..1000 {
            let now = self.now_us;
            let mut work = 0;
            while let Some(op) = self.source.poll_device_op(now) {
                self.primaries[op.nsid as usize - 1].submit(op);
                work += 1;
            }
            while let Some(op) = self.destination.poll_device_op(now) {
                self.mirrors[op.nsid as usize - 1].submit(op);
                work += 1;
            }
            while let Some(op) = self.source.poll_metadata_op() {
                self.source_metadata.submit(op);
                work += 1;
            }
            while let Some(op) = self.destination.poll_metadata_op() {
                self.destination_metadata.submit(op);
                work += 1;
            }
            let (source, destination) = (&mut self.source, &mut self.destination);
            self.source_metadata
                .poll_completions(&mut |c| source.handle_metadata_completion(c));
            self.destination_metadata
                .poll_completions(&mut |c| destination.handle_metadata_completion(c));
            for device in &mut self.primaries {
                work += device.poll_completions(&mut |c| source.handle_device_completion(now, c));
            }
            for device in &mut self.mirrors {
                work +=
                    device.poll_completions(&mut |c| destination.handle_device_completion(now, c));
            }
            if work == 0 {
                return pass > 0;
            }
        }
        panic!("devices never quiet");
    }

    /// Moves every queued byte both ways until nothing moves; returns the source's events.
    fn exchange(&mut self) -> Vec<SourceEvent> {
        let mut events = Vec::new();
        for _ in 0..200 {
            self.source.handle_tick(self.now_us);
            let mut busy = self.devices();
            self.source.handle_tick(self.now_us);
            busy |= self.devices();
            let bytes = self
                .source
                .out
                .drain_to_vec(self.source.ring.bytes(0, RING_BYTES_MIN as usize));
            let from_destination = drain_destination(&mut self.destination);
            let moved = !bytes.is_empty() || !from_destination.is_empty();
            for message in split(&bytes) {
                self.destination
                    .handle_message(self.now_us, message)
                    .unwrap();
            }
            for message in split(&from_destination) {
                self.source.handle_message(self.now_us, message).unwrap();
            }
            while let Some(event) = self.source.poll_event() {
                if let SourceEvent::WriteCompleted(id) = event {
                    assert!(
                        self.destination.logged_seq_max().unwrap() >= id.0,
                        "ack rule"
                    );
                }
                events.push(event);
            }
            if !moved && !busy {
                break;
            }
        }
        events
    }

    fn connect(&mut self) {
        self.destination.handle_connected(0);
        self.source.handle_connected(0);
        assert!(self.exchange().contains(&SourceEvent::LinkReady));
    }

    fn cp(&mut self) -> Vec<SourceEvent> {
        self.source.request_cp(self.now_us);
        self.exchange()
    }

    fn write(&mut self, lba: u64, data: &[u8]) -> WriteId {
        self.source.write(self.now_us, 1, lba, data).unwrap()
    }
}

fn drain_destination(destination: &mut Destination<Vec<u8>>) -> Vec<u8> {
    let mut slices = Vec::new();
    destination.tx_iovecs(&mut slices, usize::MAX);
    let bytes: Vec<u8> = slices
        .iter()
        .flat_map(|slice| slice.iter().copied())
        .collect();
    destination.tx_advance(bytes.len());
    bytes
}

fn split(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut messages = Vec::new();
    while let Some(length) = wire::frame_length(bytes).unwrap() {
        messages.push(&bytes[..length]);
        bytes = &bytes[length..];
    }
    assert!(bytes.is_empty());
    messages
}

const PROMOTED_GENERATION: u64 = 0x9A;

/// Promotes `destination`, driving its replay against `mirrors` and its new generation into
/// `metadata`.
fn promote(
    destination: Destination<Vec<u8>>,
    mirrors: &mut [TestDevice],
    metadata: &mut MemoryDevice,
) -> crate::PromoteReport {
    let mut promotion = destination.promote(PROMOTED_GENERATION).unwrap();
    for _ in 0..1000 {
        while let Some(op) = promotion.poll_device_op() {
            mirrors[op.nsid as usize - 1].submit(op);
        }
        for device in mirrors.iter_mut() {
            device.poll_completions(&mut |c| promotion.handle_device_completion(c));
        }
        while let Some(op) = promotion.poll_metadata_op() {
            metadata.submit(op);
        }
        metadata.poll_completions(&mut |c| promotion.handle_metadata_completion(c));
        if promotion.is_done() {
            return promotion.finish().unwrap().0;
        }
    }
    panic!("promotion never finished");
}

#[test]
fn partial_then_whole_is_a_reference_and_resolves_to_the_right_bytes() {
    let mut p = pair(CpMode::References);
    p.connect();
    p.source.write(1, 1, 10, &[1; 1024]).unwrap(); // block 1, partial
    p.source.write(1, 1, 8, &[2; 4096]).unwrap(); // block 1, whole
    p.source.write(1, 1, 3, &[9; 512]).unwrap(); // block 0, partial
    let first_events = p.exchange();
    assert_eq!(
        first_events
            .iter()
            .filter(|e| matches!(e, SourceEvent::WriteCompleted(_)))
            .count(),
        3
    );
    let events = p.cp();
    assert!(events
        .iter()
        .any(|e| matches!(e, SourceEvent::CpCompleted { cp_number: 1, .. })));
    assert_eq!(p.source.counters().cp_reference_count, 1);
    assert_eq!(p.source.counters().cp_data_blocks, 1);
    let mirrors = &p.mirrors;
    assert_eq!(&mirrors[0].bytes()[4096..8192], &[2; 4096][..]);
    assert_eq!(&mirrors[0].bytes()[1536..2048], &[9; 512][..]);
    assert!(mirrors[0].bytes()[..1536].iter().all(|&b| b == 0));
}

#[test]
fn whole_then_partial_is_data_and_several_writes_keep_the_last() {
    let mut p = pair(CpMode::References);
    p.connect();
    p.source.write(1, 1, 16, &[5; 8192]).unwrap(); // blocks 2, 3 whole
    p.source.write(1, 1, 17, &[6; 512]).unwrap(); // block 2 partial now
    p.source.write(1, 1, 24, &[7; 4096]).unwrap(); // block 3 whole again
    p.source.write(1, 1, 24, &[8; 4096]).unwrap(); // block 3 whole, latest
    p.source.write_zeroes(1, 1, 32, 4096).unwrap(); // block 4 zeroes
    p.exchange();
    p.cp();
    let counters = *p.source.counters();
    assert_eq!(
        (
            counters.cp_reference_count,
            counters.cp_data_blocks,
            counters.cp_zeroes_count
        ),
        (1, 1, 1)
    );
    assert_eq!(
        counters.bytes_saved_by_references,
        4096 - wire::REFERENCE_DESCRIPTOR_BYTES as u64
    );
    let (primaries, mirrors) = (&p.primaries, &p.mirrors);
    assert_eq!(mirrors[0].bytes(), primaries[0].bytes());
    assert_eq!(&mirrors[0].bytes()[3 * 4096..4 * 4096], &[8; 4096][..]);
    assert_eq!(
        &mirrors[0].bytes()[2 * 4096 + 512..2 * 4096 + 1024],
        &[6; 512][..]
    );
}

#[test]
fn naive_mode_sends_every_block_as_data() {
    let mut p = pair(CpMode::Naive);
    p.connect();
    p.source.write(1, 1, 0, &[4; 16384]).unwrap();
    p.exchange();
    p.cp();
    assert_eq!(
        (
            p.source.counters().cp_reference_count,
            p.source.counters().cp_data_blocks
        ),
        (0, 4)
    );
}

#[test]
fn writes_complete_only_after_the_transfer_ack() {
    let mut p = pair(CpMode::References);
    let id = p.source.write(1, 1, 0, &[1; 4096]).unwrap();
    p.source.handle_tick(1);
    assert_eq!(p.source.poll_event(), None, "no link, no completion");
    p.destination.handle_connected(0);
    p.source.handle_connected(0);
    let events = p.exchange();
    assert_eq!(
        events,
        vec![SourceEvent::LinkReady, SourceEvent::WriteCompleted(id)]
    );
    assert_eq!(p.source.read_gate(1, 0, 512), Ok(id.0));
    assert!(
        p.source.landed_through_seq() >= id.0,
        "the write landed on the primary"
    );
    assert_eq!(
        p.source.write(1, 2, 0, &[0; 512]),
        Err(WriteRefused::InvalidNamespace)
    );
    assert_eq!(
        p.source.write(1, 1, 2048, &[0; 512]),
        Err(WriteRefused::OutOfRange)
    );
    assert_eq!(
        p.source.write(1, 1, 0, &[0; 100]),
        Err(WriteRefused::InvalidLength)
    );
}

#[test]
fn a_promoted_destination_refuses_the_stale_source() {
    let mut p = pair(CpMode::References);
    p.connect();
    let settled = p.source.metadata().generations().current;
    assert_eq!(
        settled,
        SOURCE_NODE + 0x6E00,
        "a fresh pair takes the source's proposed generation"
    );
    assert_eq!(p.destination.metadata().generations().current, settled);
    p.source.write(1, 1, 0, &[1; 4096]).unwrap();
    p.exchange();
    let ring = p.destination.into_memory();
    let promoted = Destination::open(
        destination_config(),
        ring,
        &[NAMESPACE_BYTES as u64],
        reopen_metadata(&p.destination_metadata),
    )
    .unwrap();
    let report = promote(promoted, &mut p.mirrors, &mut p.destination_metadata);
    assert_eq!(report.entries_replayed, 1);
    assert_eq!(
        (report.generation, report.previous_generation),
        (PROMOTED_GENERATION, settled)
    );
    assert_eq!(
        &p.mirrors[0].bytes()[..4096],
        &[1; 4096][..],
        "replayed onto the mirror"
    );
    // The promoted node restarts (its metadata from its device) and meets the old source.
    let mut stale_peer = Destination::open(
        destination_config(),
        vec![0; RING_BYTES_MIN as usize],
        &[NAMESPACE_BYTES as u64],
        reopen_metadata(&p.destination_metadata),
    )
    .unwrap();
    assert_eq!(
        stale_peer.metadata().generations().history[0],
        settled,
        "the old generation is in the promoted node's history"
    );
    stale_peer.handle_connected(0);
    p.source.handle_disconnected(0);
    p.source.handle_connected(0);
    let hello = p
        .source
        .out
        .drain_to_vec(p.source.ring.bytes(0, RING_BYTES_MIN as usize));
    let error = stale_peer.handle_message(0, &hello).unwrap_err();
    assert!(
        matches!(
            error,
            LinkError::RejectedPeer {
                reason: wire::RejectReason::StaleSource,
                ..
            }
        ),
        "{error}"
    );
    let reject = drain_destination(&mut stale_peer);
    assert!(matches!(
        p.source.handle_message(0, &reject),
        Err(LinkError::RejectedByPeer { .. })
    ));
    let names_both = |text: &str| {
        text.contains("stale source")
            && text.contains(&format!("{settled:016x}"))
            && text.contains(&format!("{PROMOTED_GENERATION:016x}"))
    };
    assert!(
        matches!(p.source.poll_event(), Some(SourceEvent::LinkRejected(text)) if names_both(&text))
    );
}

#[test]
fn a_split_brain_is_refused_by_both_sides() {
    let mut p = pair(CpMode::References);
    p.connect();
    let common = p.source.metadata().generations().current;
    // The destination is promoted; the source takes a generation of its own too (as the
    // degrade policy will before an unreplicated write).
    let ring = p.destination.into_memory();
    let promoted = Destination::open(
        destination_config(),
        ring,
        &[NAMESPACE_BYTES as u64],
        reopen_metadata(&p.destination_metadata),
    )
    .unwrap();
    promote(promoted, &mut p.mirrors, &mut p.destination_metadata);
    let seq = p.source.new_generation(0x5B);
    p.destination = Destination::open(
        destination_config(),
        vec![0; RING_BYTES_MIN as usize],
        &[NAMESPACE_BYTES as u64],
        reopen_metadata(&p.destination_metadata),
    )
    .unwrap();
    p.source.handle_disconnected(0);
    p.devices();
    assert!(p.source.metadata().durable_through() >= seq);
    assert_eq!(p.source.metadata().generations().bitmap_base, common);
    p.destination.handle_connected(0);
    p.source.handle_connected(0);
    let hello = p
        .source
        .out
        .drain_to_vec(p.source.ring.bytes(0, RING_BYTES_MIN as usize));
    let error = p.destination.handle_message(0, &hello).unwrap_err();
    let text = match error {
        LinkError::RejectedPeer {
            reason: wire::RejectReason::SplitBrain,
            text,
        } => text,
        other => panic!("{other}"),
    };
    for generation in [0x5B, PROMOTED_GENERATION, common] {
        assert!(text.contains(&format!("{generation:016x}")), "{text}");
    }
    // The source settles the same pair itself: a HelloAck carrying the promoted side's
    // generations (as a peer that skipped its own check would send) is refused too.
    let mut generations = *p.destination.metadata().generations();
    generations.flags |= crate::generation::FLAG_ASSUME_IDENTICAL;
    let ack = control_message(wire::Control::HelloAck {
        cp_completed: p.source.cp_completed(),
        generations,
    });
    assert!(matches!(
        p.source.handle_message(0, &ack),
        Err(LinkError::RejectedPeer {
            reason: wire::RejectReason::SplitBrain,
            ..
        })
    ));
    assert!(
        matches!(p.source.poll_event(), Some(SourceEvent::LinkRejected(text)) if text.contains("split brain"))
    );
}

#[test]
fn an_aborted_write_changes_nothing_and_unblocks_later_ones() {
    let mut p = pair(CpMode::References);
    p.connect();
    p.source.write(1, 1, 0, &[1; 4096]).unwrap();
    let aborted = p.source.reserve_write(1, 1, 0, 4096).unwrap();
    p.source.write_buffer(&aborted)[..100].fill(0xEE);
    let later = p.source.write(1, 1, 8, &[2; 4096]).unwrap();
    let events = p.exchange();
    assert!(
        !events.contains(&SourceEvent::WriteCompleted(later)),
        "blocked behind the reserved slot"
    );
    let aborted_id = aborted.id();
    p.source.abort_write(1, aborted);
    let events = p.exchange();
    assert!(
        events.contains(&SourceEvent::WriteCompleted(aborted_id))
            && events.contains(&SourceEvent::WriteCompleted(later))
    );
    p.cp();
    let (primaries, mirrors) = (&p.primaries, &p.mirrors);
    assert_eq!(&primaries[0].bytes()[..4096], &[1; 4096][..]);
    assert_eq!(mirrors[0].bytes(), primaries[0].bytes());
}

#[test]
fn a_corrupted_resend_never_overwrites_acknowledged_log_entries() {
    let mut p = pair(CpMode::References);
    p.connect();
    let first = p.source.write(1, 1, 0, &[1; 4096]).unwrap();
    let second = p.source.write(1, 1, 8, &[2; 4096]).unwrap();
    let events = p.exchange();
    assert!(events.contains(&SourceEvent::WriteCompleted(first)));
    assert!(events.contains(&SourceEvent::WriteCompleted(second)));

    // Reconnect: the destination rewinds its halves without erasing them, the source resends
    // both entries, and the resend arrives with its last data byte flipped.
    p.destination.handle_disconnected(0);
    p.source.handle_disconnected(0);
    p.destination.handle_connected(0);
    p.source.handle_connected(0);
    let hello = p
        .source
        .out
        .drain_to_vec(p.source.ring.bytes(0, RING_BYTES_MIN as usize));
    for message in split(&hello) {
        p.destination.handle_message(1, message).unwrap();
    }
    for message in split(&drain_destination(&mut p.destination)) {
        p.source.handle_message(1, message).unwrap();
    }
    p.source.handle_tick(1);
    let mut resent = p
        .source
        .out
        .drain_to_vec(p.source.ring.bytes(0, RING_BYTES_MIN as usize));
    *resent.last_mut().unwrap() ^= 1;
    let error = split(&resent)
        .into_iter()
        .find_map(|message| p.destination.handle_message(1, message).err());
    assert!(
        matches!(error, Some(LinkError::DataCrc { .. })),
        "{error:?}"
    );

    // Promotion still finds both acknowledged writes in the log (invariant 4).
    let ring = p.destination.into_memory();
    let promoted = Destination::open(
        destination_config(),
        ring,
        &[NAMESPACE_BYTES as u64],
        reopen_metadata(&p.destination_metadata),
    )
    .unwrap();
    let report = promote(promoted, &mut p.mirrors, &mut p.destination_metadata);
    assert_eq!(report.entries_replayed, 2);
}

fn control_message(control: wire::Control<'_>) -> Vec<u8> {
    let mut bytes = vec![0; control.encoded_bytes()];
    control.encode(&mut bytes);
    bytes
}

#[test]
fn an_ack_of_a_transfer_never_sent_completes_nothing() {
    let mut p = pair(CpMode::References);
    p.connect();
    p.source.write(1, 1, 0, &[1; 4096]).unwrap();
    p.source.handle_tick(1);
    let bogus = control_message(wire::Control::TransferAck {
        transfer_id: crate::transfer::TransferId(99),
    });
    assert!(matches!(
        p.source.handle_message(1, &bogus),
        Err(LinkError::Protocol(_))
    ));
    assert_eq!(
        p.source.poll_event(),
        None,
        "no write completes on a refused ack"
    );
}

#[test]
fn a_hello_ack_claiming_an_unflushed_cp_is_a_protocol_error() {
    let mut p = pair(CpMode::References);
    p.source.write(1, 1, 0, &[1; 4096]).unwrap();
    p.source.request_cp(1);
    p.source.handle_tick(1);
    p.source.handle_connected(2);
    let mut generations = *p.destination.metadata().generations();
    generations.flags |= crate::generation::FLAG_ASSUME_IDENTICAL;
    let claim = control_message(wire::Control::HelloAck {
        cp_completed: p.source.ring.superblock().cp_completed + 1,
        generations,
    });
    assert!(matches!(
        p.source.handle_message(2, &claim),
        Err(LinkError::Protocol(_))
    ));
}

#[test]
fn an_aborted_write_whose_old_content_cannot_be_read_is_never_committed() {
    let mut p = pair(CpMode::References);
    p.write(0, &[1; 4096]);
    assert!(p.devices());
    let half = half_of_cp(p.source.active_cp);
    let committed = p.source.ring.committed_slots(half);
    let aborted = p.source.reserve_write(1, 1, 8, 4096).unwrap();
    p.source.write_buffer(&aborted).fill(0xEE);
    p.primaries[0].fail_reads = true;
    p.source.abort_write(1, aborted);
    assert!(p.devices());
    assert_eq!(
        p.source.ring.committed_slots(half),
        committed,
        "a slot of unknown bytes stays uncommitted"
    );
    assert!(matches!(
        p.source.poll_event(),
        Some(SourceEvent::DeviceFault(fault)) if fault.purpose == "read for an aborted write" && fault.offset_bytes == 8 * 512
    ));
    // Once the primary reads again, the retry commits it with the primary's content.
    p.primaries[0].fail_reads = false;
    p.now_us += apply::DEVICE_RETRY_BACKOFF_US;
    assert!(p.devices());
    assert_eq!(p.source.ring.committed_slots(half), committed + 1);
    assert_eq!(p.source.counters().device_error_count, 1);
}

#[test]
fn replay_onto_a_namespace_that_shrank_is_a_reported_fault() {
    let mut p = pair(CpMode::References);
    let last_lba = (NAMESPACE_BYTES / 512 - 8) as u64;
    p.source.write(1, 1, last_lba, &[7; 4096]).unwrap();
    let ring = p.source.into_memory();
    let smaller = [NAMESPACE_BYTES as u64 / 2];
    let metadata =
        NodeMetadata::format(VOLUME, 1, 2, &smaller, BITMAP_EXTENT_BYTES_DEFAULT).unwrap();
    let error = Source::open(config(CpMode::References), ring, &smaller, metadata, 0)
        .err()
        .expect("refused");
    assert!(
        matches!(error, crate::EngineError::EntryOutOfRange { nsid: 1, .. }),
        "{error}"
    );
}

#[test]
fn the_mirror_is_the_primary_as_of_the_end_of_its_cp_although_writes_go_on() {
    let mut p = pair(CpMode::References);
    p.connect();
    p.write(1, &[1; 512]); // block 0, partial: CP 1 reads it from the primary as Data
    p.write(8, &[2; 4096]); // block 1, whole: a reference
    p.exchange();
    p.source.request_cp(p.now_us);
    p.source.handle_tick(p.now_us); // CP 1 frozen; CP 2 takes the next writes
    let later = p.write(0, &[3; 4096]); // block 0 again, in CP 2, before CP 1 read it
    let also_later = p.write(16, &[4; 4096]); // block 2: not held
    let events = p.exchange();
    assert!(events.contains(&SourceEvent::WriteCompleted(later)));
    assert!(events.contains(&SourceEvent::WriteCompleted(also_later)));
    assert!(events
        .iter()
        .any(|e| matches!(e, SourceEvent::CpCompleted { cp_number: 1, .. })));
    let mirror = p.mirrors[0].bytes();
    assert_eq!(
        &mirror[512..1024],
        &[1; 512][..],
        "CP 1's content of block 0"
    );
    assert!(mirror[..512]
        .iter()
        .chain(&mirror[1024..4096])
        .all(|&b| b == 0));
    assert_eq!(&mirror[4096..8192], &[2; 4096][..]);
    assert!(
        mirror[8192..12288].iter().all(|&b| b == 0),
        "CP 2 is not in it"
    );
    // The held write reached the primary once CP 1 completed, and CP 2 mirrors it.
    assert_eq!(&p.primaries[0].bytes()[..4096], &[3; 4096][..]);
    p.cp();
    assert_eq!(p.mirrors[0].bytes(), p.primaries[0].bytes());
}

#[test]
fn a_stalled_primary_delays_no_write_completion() {
    let mut p = pair(CpMode::References);
    p.connect();
    p.primaries[0].stalled = true;
    let ids: Vec<WriteId> = (0..(DEPTH as u64 * 3))
        .map(|i| p.write(i * 8, &[9; 4096]))
        .collect();
    let events = p.exchange();
    for id in &ids {
        assert!(events.contains(&SourceEvent::WriteCompleted(*id)));
    }
    assert!(
        p.source.landed_through_seq() < ids[0].0,
        "nothing landed yet"
    );
    assert_eq!(
        p.source.ops.iter().count(),
        DEPTH as usize,
        "bounded in flight"
    );
    p.primaries[0].stalled = false;
    p.cp();
    assert!(p.source.landed_through_seq() >= ids.last().unwrap().0);
    assert_eq!(p.mirrors[0].bytes(), p.primaries[0].bytes());
}

#[test]
fn a_failing_mirror_fails_the_cp_cleanly_and_the_retry_completes_it() {
    let mut p = pair(CpMode::References);
    p.connect();
    let first = p.write(0, &[5; 4096]);
    let partial = p.write(9, &[6; 512]);
    p.exchange();
    p.mirrors[0].fail_writes = true;
    let events = p.cp();
    assert!(events.contains(&SourceEvent::MirrorFailed { cp_number: 1 }));
    assert!(!events
        .iter()
        .any(|e| matches!(e, SourceEvent::CpCompleted { .. })));
    assert_eq!(p.source.counters().cp_failure_count, 1);
    assert_eq!(p.destination.cp_completed(), 0, "nothing recorded");
    assert_eq!(
        p.source.cp_completed(),
        0,
        "the ring keeps the CP's entries"
    );
    // The link stayed up: new writes still complete.
    let during = p.write(32, &[7; 4096]);
    assert!(p.exchange().contains(&SourceEvent::WriteCompleted(during)));
    p.mirrors[0].fail_writes = false;
    p.now_us += apply::DEVICE_RETRY_BACKOFF_US;
    let events = p.exchange();
    assert!(events
        .iter()
        .any(|e| matches!(e, SourceEvent::CpCompleted { cp_number: 1, .. })));
    p.cp();
    assert_eq!(p.mirrors[0].bytes(), p.primaries[0].bytes());
    assert!(first.0 < partial.0 && partial.0 < during.0);
    assert_eq!(&p.mirrors[0].bytes()[..4096], &[5; 4096][..]);
}

#[test]
fn a_failing_primary_write_is_retried_in_order() {
    let mut p = pair(CpMode::References);
    p.connect();
    p.primaries[0].fail_writes = true;
    let first = p.write(0, &[1; 4096]);
    let second = p.write(0, &[2; 4096]);
    let events = p.exchange();
    assert!(events.contains(&SourceEvent::WriteCompleted(first)));
    assert!(events.contains(&SourceEvent::WriteCompleted(second)));
    assert!(events.iter().any(
        |e| matches!(e, SourceEvent::DeviceFault(f) if f.kind == DeviceOpKind::Write && f.nsid == 1)
    ));
    assert!(p.source.landed_through_seq() < first.0);
    p.primaries[0].fail_writes = false;
    p.now_us += apply::DEVICE_RETRY_BACKOFF_US;
    p.cp();
    assert_eq!(
        &p.primaries[0].bytes()[..4096],
        &[2; 4096][..],
        "the later write wins"
    );
    assert_eq!(p.mirrors[0].bytes(), p.primaries[0].bytes());
}

/// A generation a side adopts is durable in its metadata before the other side hears of it:
/// the destination's HelloAck waits for its metadata write and flush, and the source's
/// LinkReady for its own.
#[test]
fn an_adopted_generation_is_durable_before_the_handshake_completes() {
    let mut p = pair(CpMode::References);
    p.destination.handle_connected(0);
    p.source.handle_connected(0);
    let hello = p
        .source
        .out
        .drain_to_vec(p.source.ring.bytes(0, RING_BYTES_MIN as usize));
    p.destination.handle_message(0, &hello).unwrap();
    assert!(
        drain_destination(&mut p.destination).is_empty(),
        "no HelloAck before the adopted generation is durable"
    );
    let mut ops = Vec::new();
    while let Some(op) = p.destination.poll_metadata_op() {
        ops.push((op.id, op.request.kind()));
        p.destination_metadata.submit(op);
    }
    assert_eq!(
        ops.iter().map(|(_, kind)| *kind).collect::<Vec<_>>(),
        [DeviceOpKind::Write],
        "the header first; the flush once it completed"
    );
    let destination = &mut p.destination;
    p.destination_metadata
        .poll_completions(&mut |c| destination.handle_metadata_completion(c));
    assert!(
        drain_destination(&mut p.destination).is_empty(),
        "still no flush"
    );
    let flush = p.destination.poll_metadata_op().unwrap();
    assert_eq!(flush.request, DeviceRequest::Flush);
    p.destination_metadata.submit(flush);
    let destination = &mut p.destination;
    p.destination_metadata
        .poll_completions(&mut |c| destination.handle_metadata_completion(c));
    let ack = drain_destination(&mut p.destination);
    assert!(!ack.is_empty(), "the HelloAck once durable");
    // The source adopts the same generation and waits for its own metadata.
    p.source.handle_message(0, &ack).unwrap();
    p.source.handle_tick(0);
    assert_eq!(
        p.source.poll_event(),
        None,
        "not ready before its metadata is durable"
    );
    assert_eq!(
        p.source.metadata().generations().current,
        p.destination.metadata().generations().current
    );
    assert!(p.devices());
    p.source.handle_tick(0);
    assert_eq!(p.source.poll_event(), Some(SourceEvent::LinkReady));
}
