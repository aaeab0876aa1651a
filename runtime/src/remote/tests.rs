//! Unit tests of the remote backend against a hand-driven engine side.

use super::*;
use nvmirror_nvmf::backend::LBA_BYTES;
use nvmirror_nvmf::{Backend, BackendError, NamespaceInfo};

const SIZE_BYTES: u64 = 1 << 20;

fn backend() -> (RemoteBackend, RemoteLink) {
    let link = remote_links(1).unwrap().remove(0);
    let namespaces = vec![NamespaceInfo {
        size_bytes: SIZE_BYTES,
        uuid: [7; 16],
    }];
    (RemoteBackend::new(link.clone(), namespaces), link)
}

/// The engine's side of one operation: takes it, answers it (a read gets `fill` bytes).
fn serve_one(link: &RemoteLink, fill: u8) -> (u16, OpKind) {
    let Op { slot, kind, .. } = link.ops.pop().expect("an operation reached the engine");
    let (kind, buffer) = match kind {
        OpKind::Write {
            nsid,
            lba,
            length,
            buffer,
        } => {
            let copy = buffer.clone();
            let kind = OpKind::Write {
                nsid,
                lba,
                length,
                buffer: copy,
            };
            (kind, Some(buffer))
        }
        OpKind::Read {
            nsid,
            lba,
            length,
            mut buffer,
        } => {
            buffer[..length as usize].fill(fill);
            let kind = OpKind::Read {
                nsid,
                lba,
                length,
                buffer: Box::new([]),
            };
            (kind, Some(buffer))
        }
        zeroes => (zeroes, None),
    };
    let result = Ok(());
    link.done
        .send(Done {
            slot,
            buffer,
            result,
        })
        .unwrap();
    (slot, kind)
}

#[test]
fn a_write_moves_its_buffer_to_the_engine_and_completes_with_its_token() {
    let (mut backend, link) = backend();
    let slot = backend.reserve_write(0, 1, 8, 4096).unwrap();
    backend.write_buffer(&slot).fill(0xab);
    let token = backend.commit_write(0, slot);
    assert_eq!(backend.poll_completion(), None, "not durable yet");
    let (_, kind) = serve_one(&link, 0);
    match kind {
        OpKind::Write {
            nsid,
            lba,
            length,
            buffer,
        } => {
            assert_eq!((nsid, lba, length), (1, 8, 4096));
            assert!(buffer[..4096].iter().all(|&b| b == 0xab));
        }
        other => panic!("expected a write, got {other:?}"),
    }
    assert_eq!(backend.poll_completion(), Some((token, Ok(()))));
    assert_eq!(
        backend.free_slots(),
        REMOTE_SLOTS,
        "the slot and its buffer came back"
    );
}

#[test]
fn a_read_hands_over_the_engines_data_once() {
    let (mut backend, link) = backend();
    let token = backend.start_read(0, 1, 0, 512).unwrap().unwrap();
    serve_one(&link, 0x5a);
    assert_eq!(backend.poll_completion(), Some((token, Ok(()))));
    let mut data = [0u8; 512];
    backend.finish_read(token, &mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    assert_eq!(backend.free_slots(), REMOTE_SLOTS);

    // A read whose connection went away is abandoned: its slot is freed all the same.
    let token = backend.start_read(0, 1, 0, 512).unwrap().unwrap();
    serve_one(&link, 0);
    assert_eq!(backend.poll_completion(), Some((token, Ok(()))));
    backend.abandon(token);
    assert_eq!(backend.free_slots(), REMOTE_SLOTS);
}

#[test]
fn ranges_are_checked_here_and_a_full_pool_is_busy() {
    let (mut backend, link) = backend();
    let lbas = SIZE_BYTES / u64::from(LBA_BYTES);
    assert_eq!(
        backend.reserve_write(0, 1, lbas - 1, 1024).unwrap_err(),
        BackendError::OutOfRange
    );
    assert_eq!(
        backend.start_read(0, 2, 0, 512).unwrap_err(),
        BackendError::InvalidNamespace
    );
    assert_eq!(
        backend.write_zeroes(0, 1, lbas, 512).unwrap_err(),
        BackendError::OutOfRange
    );
    let slots: Vec<_> = (0..REMOTE_SLOTS)
        .map(|i| backend.reserve_write(0, 1, i as u64, 512).unwrap())
        .collect();
    assert_eq!(
        backend.reserve_write(0, 1, 0, 512).unwrap_err(),
        BackendError::Busy
    );
    // An aborted write never reaches the engine and frees its slot at once.
    let first = slots.into_iter().next().unwrap();
    let token = backend.abort_write(0, first);
    assert!(link.ops.pop().is_none());
    assert_eq!(backend.poll_completion(), Some((token, Ok(()))));
    assert!(backend.reserve_write(0, 1, 0, 512).is_ok());
}
