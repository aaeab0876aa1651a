//! Source + destination over a direct in-memory link: how blocks are mirrored at a CP
//! (references for wholly overwritten blocks, data for partial ones), reference resolution
//! to the right bytes at the destination, the ack rule, and the stale-source refusal.

use super::*;
use crate::destination::{Destination, DestinationConfig};
use crate::device::MemoryDevice;
use crate::geometry::RING_BYTES_MIN;

const VOLUME: [u8; 16] = [3; 16];
const NAMESPACE_BYTES: usize = 1 << 20;

type Pair = (
    Source<Vec<u8>, MemoryDevice>,
    Destination<Vec<u8>, MemoryDevice>,
);

fn pair(mode: CpMode) -> Pair {
    let config = SourceConfig {
        volume_id: VOLUME,
        cp_interval_us: u64::MAX,
        mode,
    };
    let (source, _) = Source::open(
        config,
        vec![0; RING_BYTES_MIN as usize],
        vec![MemoryDevice(vec![0; NAMESPACE_BYTES])],
        0,
    )
    .unwrap();
    let destination = Destination::open(
        DestinationConfig { volume_id: VOLUME },
        vec![0; RING_BYTES_MIN as usize],
        vec![MemoryDevice(vec![0; NAMESPACE_BYTES])],
    )
    .unwrap();
    (source, destination)
}

/// Moves every queued byte both ways until nothing moves; returns the source's events.
fn exchange(
    source: &mut Source<Vec<u8>, MemoryDevice>,
    destination: &mut Destination<Vec<u8>, MemoryDevice>,
) -> Vec<SourceEvent> {
    let mut events = Vec::new();
    for _ in 0..100 {
        source.handle_tick(1);
        let bytes = source
            .out
            .drain_to_vec(source.ring.bytes(0, RING_BYTES_MIN as usize));
        let from_destination = drain_destination(destination);
        if bytes.is_empty() && from_destination.is_empty() {
            break;
        }
        for message in split(&bytes) {
            destination.handle_message(1, message).unwrap();
        }
        for message in split(&from_destination) {
            source.handle_message(1, message).unwrap();
            while let Some(event) = source.poll_event() {
                if let SourceEvent::WriteCompleted(id) = event {
                    assert!(destination.logged_seq_max().unwrap() >= id.0, "ack rule");
                }
                events.push(event);
            }
        }
    }
    events
}

fn drain_destination(destination: &mut Destination<Vec<u8>, MemoryDevice>) -> Vec<u8> {
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

fn connect(
    source: &mut Source<Vec<u8>, MemoryDevice>,
    destination: &mut Destination<Vec<u8>, MemoryDevice>,
) {
    destination.handle_connected(0);
    source.handle_connected(0);
    assert!(exchange(source, destination).contains(&SourceEvent::LinkReady));
}

fn cp(
    source: &mut Source<Vec<u8>, MemoryDevice>,
    destination: &mut Destination<Vec<u8>, MemoryDevice>,
) -> Vec<SourceEvent> {
    source.request_cp(1);
    exchange(source, destination)
}

#[test]
fn partial_then_whole_is_a_reference_and_resolves_to_the_right_bytes() {
    let (mut source, mut destination) = pair(CpMode::References);
    connect(&mut source, &mut destination);
    source.write(1, 1, 10, &[1; 1024]).unwrap(); // block 1, partial
    source.write(1, 1, 8, &[2; 4096]).unwrap(); // block 1, whole
    source.write(1, 1, 3, &[9; 512]).unwrap(); // block 0, partial
    let first_events = exchange(&mut source, &mut destination);
    assert_eq!(
        first_events
            .iter()
            .filter(|e| matches!(e, SourceEvent::WriteCompleted(_)))
            .count(),
        3
    );
    let events = cp(&mut source, &mut destination);
    assert!(events
        .iter()
        .any(|e| matches!(e, SourceEvent::CpCompleted { cp_number: 1, .. })));
    assert_eq!(source.counters().cp_reference_count, 1);
    assert_eq!(source.counters().cp_data_blocks, 1);
    let (_, mirrors) = destination.into_parts();
    assert_eq!(&mirrors[0].0[4096..8192], &[2; 4096][..]);
    assert_eq!(&mirrors[0].0[1536..2048], &[9; 512][..]);
    assert!(mirrors[0].0[..1536].iter().all(|&b| b == 0));
}

#[test]
fn whole_then_partial_is_data_and_several_writes_keep_the_last() {
    let (mut source, mut destination) = pair(CpMode::References);
    connect(&mut source, &mut destination);
    source.write(1, 1, 16, &[5; 8192]).unwrap(); // blocks 2, 3 whole
    source.write(1, 1, 17, &[6; 512]).unwrap(); // block 2 partial now
    source.write(1, 1, 24, &[7; 4096]).unwrap(); // block 3 whole again
    source.write(1, 1, 24, &[8; 4096]).unwrap(); // block 3 whole, latest
    source.write_zeroes(1, 1, 32, 4096).unwrap(); // block 4 zeroes
    exchange(&mut source, &mut destination);
    cp(&mut source, &mut destination);
    let counters = *source.counters();
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
    let (_, primaries) = source.into_parts();
    let (_, mirrors) = destination.into_parts();
    assert_eq!(mirrors[0].0, primaries[0].0);
    assert_eq!(&mirrors[0].0[3 * 4096..4 * 4096], &[8; 4096][..]);
    assert_eq!(
        &mirrors[0].0[2 * 4096 + 512..2 * 4096 + 1024],
        &[6; 512][..]
    );
}

#[test]
fn naive_mode_sends_every_block_as_data() {
    let (mut source, mut destination) = pair(CpMode::Naive);
    connect(&mut source, &mut destination);
    source.write(1, 1, 0, &[4; 16384]).unwrap();
    exchange(&mut source, &mut destination);
    cp(&mut source, &mut destination);
    assert_eq!(
        (
            source.counters().cp_reference_count,
            source.counters().cp_data_blocks
        ),
        (0, 4)
    );
}

#[test]
fn writes_complete_only_after_the_transfer_ack() {
    let (mut source, mut destination) = pair(CpMode::References);
    let id = source.write(1, 1, 0, &[1; 4096]).unwrap();
    source.handle_tick(1);
    assert_eq!(source.poll_event(), None, "no link, no completion");
    destination.handle_connected(0);
    source.handle_connected(0);
    let events = exchange(&mut source, &mut destination);
    assert_eq!(
        events,
        vec![SourceEvent::LinkReady, SourceEvent::WriteCompleted(id)]
    );
    assert_eq!(source.read(1, 0, &mut [0; 512]), Ok(()));
    assert_eq!(
        source.write(1, 2, 0, &[0; 512]),
        Err(WriteRefused::InvalidNamespace)
    );
    assert_eq!(
        source.write(1, 1, 2048, &[0; 512]),
        Err(WriteRefused::OutOfRange)
    );
    assert_eq!(
        source.write(1, 1, 0, &[0; 100]),
        Err(WriteRefused::InvalidLength)
    );
}

#[test]
fn a_promoted_destination_refuses_the_stale_source() {
    let (mut source, mut destination) = pair(CpMode::References);
    connect(&mut source, &mut destination);
    source.write(1, 1, 0, &[1; 4096]).unwrap();
    exchange(&mut source, &mut destination);
    let (ring, mirrors) = destination.into_parts();
    let promoted =
        Destination::open(DestinationConfig { volume_id: VOLUME }, ring, mirrors).unwrap();
    let report = promoted.promote().unwrap();
    assert_eq!((report.entries_replayed, report.epoch), (1, 2));
    // A destination whose ring says epoch 2 (as the promoted one's does) meets the old source.
    let geometry = crate::geometry::RingGeometry::for_ring_size(RING_BYTES_MIN).unwrap();
    let promoted_ring =
        NvramRing::format(vec![0; RING_BYTES_MIN as usize], geometry, VOLUME, 2).into_memory();
    let mirrors = vec![MemoryDevice(vec![0; NAMESPACE_BYTES])];
    let mut stale_peer = Destination::open(
        DestinationConfig { volume_id: VOLUME },
        promoted_ring,
        mirrors,
    )
    .unwrap();
    stale_peer.handle_connected(0);
    source.handle_disconnected(0);
    source.handle_connected(0);
    let hello = source
        .out
        .drain_to_vec(source.ring.bytes(0, RING_BYTES_MIN as usize));
    let error = stale_peer.handle_message(0, &hello).unwrap_err();
    assert!(
        matches!(
            error,
            LinkError::RejectedPeer {
                reason: wire::RejectReason::StaleEpoch,
                ..
            }
        ),
        "{error}"
    );
    let reject = drain_destination(&mut stale_peer);
    assert!(matches!(
        source.handle_message(0, &reject),
        Err(LinkError::RejectedByPeer { .. })
    ));
    assert!(
        matches!(source.poll_event(), Some(SourceEvent::LinkRejected(text)) if text.contains("stale source: epoch 1 < 2"))
    );
}

#[test]
fn an_aborted_write_changes_nothing_and_unblocks_later_ones() {
    let (mut source, mut destination) = pair(CpMode::References);
    connect(&mut source, &mut destination);
    source.write(1, 1, 0, &[1; 4096]).unwrap();
    let aborted = source.reserve_write(1, 1, 0, 4096).unwrap();
    source.write_buffer(&aborted)[..100].fill(0xEE);
    let later = source.write(1, 1, 8, &[2; 4096]).unwrap();
    let events = exchange(&mut source, &mut destination);
    assert!(
        !events.contains(&SourceEvent::WriteCompleted(later)),
        "blocked behind the reserved slot"
    );
    let aborted_id = aborted.id();
    source.abort_write(1, aborted);
    let events = exchange(&mut source, &mut destination);
    assert!(
        events.contains(&SourceEvent::WriteCompleted(aborted_id))
            && events.contains(&SourceEvent::WriteCompleted(later))
    );
    cp(&mut source, &mut destination);
    let (_, primaries) = source.into_parts();
    let (_, mirrors) = destination.into_parts();
    assert_eq!(&primaries[0].0[..4096], &[1; 4096][..]);
    assert_eq!(mirrors[0].0, primaries[0].0);
}

#[test]
fn a_corrupted_resend_never_overwrites_acknowledged_log_entries() {
    let (mut source, mut destination) = pair(CpMode::References);
    connect(&mut source, &mut destination);
    let first = source.write(1, 1, 0, &[1; 4096]).unwrap();
    let second = source.write(1, 1, 8, &[2; 4096]).unwrap();
    let events = exchange(&mut source, &mut destination);
    assert!(events.contains(&SourceEvent::WriteCompleted(first)));
    assert!(events.contains(&SourceEvent::WriteCompleted(second)));

    // Reconnect: the destination rewinds its halves without erasing them, the source resends
    // both entries, and the resend arrives with its last data byte flipped.
    destination.handle_disconnected(0);
    source.handle_disconnected(0);
    destination.handle_connected(0);
    source.handle_connected(0);
    let hello = source
        .out
        .drain_to_vec(source.ring.bytes(0, RING_BYTES_MIN as usize));
    for message in split(&hello) {
        destination.handle_message(1, message).unwrap();
    }
    for message in split(&drain_destination(&mut destination)) {
        source.handle_message(1, message).unwrap();
    }
    source.handle_tick(1);
    let mut resent = source
        .out
        .drain_to_vec(source.ring.bytes(0, RING_BYTES_MIN as usize));
    *resent.last_mut().unwrap() ^= 1;
    let error = split(&resent)
        .into_iter()
        .find_map(|message| destination.handle_message(1, message).err());
    assert!(
        matches!(error, Some(LinkError::DataCrc { .. })),
        "{error:?}"
    );

    // Promotion still finds both acknowledged writes in the log (invariant 4).
    let (ring, mirrors) = destination.into_parts();
    let promoted =
        Destination::open(DestinationConfig { volume_id: VOLUME }, ring, mirrors).unwrap();
    let report = promoted.promote().unwrap();
    assert_eq!(report.entries_replayed, 2);
}

fn control_message(control: wire::Control<'_>) -> Vec<u8> {
    let mut bytes = vec![0; control.encoded_bytes()];
    control.encode(&mut bytes);
    bytes
}

#[test]
fn an_ack_of_a_transfer_never_sent_completes_nothing() {
    let (mut source, mut destination) = pair(CpMode::References);
    connect(&mut source, &mut destination);
    source.write(1, 1, 0, &[1; 4096]).unwrap();
    source.handle_tick(1);
    let bogus = control_message(wire::Control::TransferAck {
        transfer_id: crate::transfer::TransferId(99),
    });
    assert!(matches!(
        source.handle_message(1, &bogus),
        Err(LinkError::Protocol(_))
    ));
    assert_eq!(
        source.poll_event(),
        None,
        "no write completes on a refused ack"
    );
}

#[test]
fn a_hello_ack_claiming_an_unflushed_cp_is_a_protocol_error() {
    let (mut source, _destination) = pair(CpMode::References);
    source.write(1, 1, 0, &[1; 4096]).unwrap();
    source.request_cp(1);
    source.handle_tick(1);
    source.handle_connected(2);
    let epoch = source.ring.superblock().epoch;
    let claim = control_message(wire::Control::HelloAck {
        cp_completed: source.ring.superblock().cp_completed + 1,
        epoch,
    });
    assert!(matches!(
        source.handle_message(2, &claim),
        Err(LinkError::Protocol(_))
    ));
}

/// A namespace whose reads fail once `failing` is set.
struct FailingReads {
    inner: MemoryDevice,
    failing: bool,
}

impl BlockDevice for FailingReads {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if self.failing {
            return Err(std::io::Error::other("injected read failure"));
        }
        self.inner.read_at(offset_bytes, buf)
    }
    fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> std::io::Result<()> {
        self.inner.write_at(offset_bytes, data)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn an_aborted_write_whose_old_content_cannot_be_read_is_never_committed() {
    let config = SourceConfig {
        volume_id: VOLUME,
        cp_interval_us: u64::MAX,
        mode: CpMode::References,
    };
    let primary = FailingReads {
        inner: MemoryDevice(vec![0; NAMESPACE_BYTES]),
        failing: false,
    };
    let (mut source, _) =
        Source::open(config, vec![0; RING_BYTES_MIN as usize], vec![primary], 0).unwrap();
    source.write(1, 1, 0, &[1; 4096]).unwrap();
    let half = half_of_cp(source.active_cp);
    let committed = source.ring.committed_slots(half);
    let aborted = source.reserve_write(1, 1, 8, 4096).unwrap();
    source.write_buffer(&aborted).fill(0xEE);
    source.primaries[0].failing = true;
    source.abort_write(1, aborted);
    assert_eq!(
        source.ring.committed_slots(half),
        committed,
        "a slot of unknown bytes stays uncommitted"
    );
    assert!(matches!(
        source.poll_event(),
        Some(SourceEvent::DeviceFailed(text)) if text.contains("read for an aborted write")
    ));
}

#[test]
fn replay_onto_a_namespace_that_shrank_is_a_reported_fault() {
    let (mut source, _destination) = pair(CpMode::References);
    let last_lba = (NAMESPACE_BYTES / 512 - 8) as u64;
    source.write(1, 1, last_lba, &[7; 4096]).unwrap();
    let (ring, _) = source.into_parts();
    let config = SourceConfig {
        volume_id: VOLUME,
        cp_interval_us: u64::MAX,
        mode: CpMode::References,
    };
    let smaller = vec![MemoryDevice(vec![0; NAMESPACE_BYTES / 2])];
    let error = Source::open(config, ring, smaller, 0)
        .err()
        .expect("refused");
    assert!(
        matches!(error, crate::EngineError::EntryOutOfRange { nsid: 1, .. }),
        "{error}"
    );
}
