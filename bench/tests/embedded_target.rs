//! Process tests of `nvmirror-perf` against nvmirror's own NVMe/TCP target (`nvmirror_nvmf`), run in
//! a thread of this test on an ephemeral 127.0.0.1 port over an in-memory namespace. One namespace
//! device can corrupt a chosen sector on read, to prove verify mode reports it.

mod common;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{assert_clean_run, finish, json_number, perf, spawn_perf};
use nvmirror_engine::device::{
    BlockDevice, DeviceCompletion, DeviceError, DeviceOp, DeviceRequest, MemoryDevice,
};
use nvmirror_nvmf::{DeviceBackend, PollGroup, SubsystemConfig, Target, TargetConfig};

const NQN: &str = "nqn.2024-01.io.nvmirror:perf-test";
const DEVICE_BYTES: usize = 8 * 1024 * 1024;
/// The target thread stops by itself after this long, whatever the test does.
const TARGET_LIFETIME_MAX: Duration = Duration::from_secs(60);

/// An in-memory namespace whose reads covering `corrupt_offset_bytes` return that byte flipped
/// (what is stored stays intact).
struct CorruptOnRead {
    inner: MemoryDevice,
    corrupt_offset_bytes: Option<u64>,
}

impl BlockDevice for CorruptOnRead {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    /// Host reads of a memory device are served here (the target calls it at once).
    fn read_now(&mut self, offset_bytes: u64, buf: &mut [u8]) -> Option<Result<(), DeviceError>> {
        let result = self.inner.read_now(offset_bytes, buf)?;
        if let Some(corrupt) = self.corrupt_offset_bytes {
            if (offset_bytes..offset_bytes + buf.len() as u64).contains(&corrupt) {
                buf[(corrupt - offset_bytes) as usize] ^= 0x01;
            }
        }
        Some(result)
    }
    fn can_read_now(&self) -> bool {
        true
    }
    fn submit(&mut self, op: DeviceOp<'_>) {
        assert!(
            !matches!(op.request, DeviceRequest::Read { .. }),
            "reads come through read_now"
        );
        self.inner.submit(op)
    }
    fn poll_completions(&mut self, complete: &mut dyn FnMut(DeviceCompletion<'_>)) -> usize {
        self.inner.poll_completions(complete)
    }
    fn inflight_count(&self) -> usize {
        self.inner.inflight_count()
    }
}

/// The embedded target polled in a thread until dropped.
struct EmbeddedTarget {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedTarget {
    fn start(corrupt_offset_bytes: Option<u64>) -> EmbeddedTarget {
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let subsystem = SubsystemConfig {
            nqn: NQN.into(),
            serial: "PERFTEST".into(),
            model: "nvmirror perf test".into(),
            allow_any_host: true,
            allowed_hosts: Vec::new(),
            namespaces: vec![1],
        };
        let mut config = TargetConfig::with_defaults(vec![subsystem], localhost);
        config.listeners = vec![SocketAddr::new(localhost, 0)];
        config.discovery_listeners = Vec::new();
        let stop = Arc::new(AtomicBool::new(false));
        let (address_sender, address_receiver) = mpsc::channel();
        let thread_stop = stop.clone();
        let thread = std::thread::spawn(move || {
            let target = Target::new(config).expect("valid configuration");
            let mut listeners = target.bind_listeners().expect("bind 127.0.0.1:0");
            address_sender.send(listeners[0].local_addr()).unwrap();
            let device = CorruptOnRead {
                inner: MemoryDevice::new(DEVICE_BYTES),
                corrupt_offset_bytes,
            };
            let mut backend = DeviceBackend::new(vec![device]);
            let mut group = PollGroup::new(target);
            let start = Instant::now();
            while !thread_stop.load(Ordering::Relaxed) && start.elapsed() < TARGET_LIFETIME_MAX {
                let now_us = start.elapsed().as_micros() as u64;
                for listener in &mut listeners {
                    while let Some(stream) = listener.poll_accept() {
                        group.add_connection(stream, now_us);
                    }
                }
                if group.poll(now_us, &mut backend) == 0 {
                    std::thread::yield_now();
                }
            }
        });
        let address = address_receiver
            .recv_timeout(Duration::from_secs(10))
            .expect("target started");
        EmbeddedTarget {
            address,
            stop,
            thread: Some(thread),
        }
    }

    fn perf(&self, extra: &[&str]) -> Output {
        finish(self.spawn_perf(extra))
    }

    /// Starts a one-second `--json` run against this target with `extra` options.
    fn spawn_perf(&self, extra: &[&str]) -> std::process::Child {
        let address = self.address.to_string();
        let base = [
            "--target",
            &address,
            "--nqn",
            NQN,
            "--time-s",
            "1",
            "--warmup-s",
            "0",
            "--json",
        ];
        spawn_perf(&[&base[..], extra].concat())
    }
}

impl Drop for EmbeddedTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn verified_workloads_run_clean() {
    let target = EmbeddedTarget::start(None);
    let in_capsule = [
        "--verify",
        "--pattern",
        "randrw",
        "--connections",
        "2",
        "--queue-depth",
        "16",
    ];
    assert_clean_run(
        &target.perf(&in_capsule),
        "randrw 4 KiB in-capsule, two queues",
    );
    let digests = [
        "--verify",
        "--pattern",
        "randrw",
        "--header-digest",
        "--data-digest",
    ];
    assert_clean_run(&target.perf(&digests), "randrw 4 KiB with digests");
    // 16 KiB is above the target's 8 KiB in-capsule size: R2T and H2CData.
    const _: () = assert!(16384 > nvmirror_nvmf::config::IN_CAPSULE_DATA_BYTES_DEFAULT);
    let r2t = [
        "--verify",
        "--pattern",
        "rw",
        "--io-size",
        "16384",
        "--data-digest",
        "--disable-sq-flow-control",
    ];
    assert_clean_run(&target.perf(&r2t), "rw 16 KiB through R2T");
}

#[test]
fn verify_reports_a_corrupted_sector_and_fails() {
    let lba = 1000u64;
    let target = EmbeddedTarget::start(Some(lba * 512 + 100));
    let output = target.perf(&[
        "--verify",
        "--pattern",
        "write",
        "--lba-range-bytes",
        "1048576",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("verify mismatch at LBA {lba}: expected lba {lba}")),
        "{stderr}"
    );
    let json = String::from_utf8_lossy(&output.stdout);
    assert!(
        json_number(json.lines().last().unwrap(), "verify_mismatches") >= 1.0,
        "{json}"
    );
}

#[test]
fn unknown_subsystem_is_rejected_with_the_status_decoded() {
    let target = EmbeddedTarget::start(None);
    let address = target.address.to_string();
    let output = perf(&[
        "--target",
        &address,
        "--nqn",
        "nqn.2024-01.io.nvmirror:nobody",
        "--time-s",
        "1",
    ]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("Fabrics Connect rejected: Command Specific / Connect Invalid Parameters")
            && stderr.contains("(SUBNQN)"),
        "{stderr}"
    );
}

#[test]
fn target_going_away_mid_run_is_a_prompt_clear_failure() {
    let target = EmbeddedTarget::start(None);
    let child = target.spawn_perf(&["--time-s", "20", "--pattern", "randrw"]);
    std::thread::sleep(Duration::from_millis(700));
    let stopped_at = Instant::now();
    drop(target);
    let output = finish(child);
    assert!(
        stopped_at.elapsed() < Duration::from_secs(5),
        "perf noticed the closed connections late"
    );
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the target closed the connection"),
        "{stderr}"
    );
}
