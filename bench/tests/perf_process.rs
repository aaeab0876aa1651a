//! Process tests of the `nvmirror-perf` binary: usage and connection errors always run; the runs
//! against SPDK's nvmf_tgt (the reference NVMe/TCP target) need an SPDK tree built at `$SPDK_PEER`:
//! they skip with a message (shown with `--nocapture`) when it is not set, and fail when it is set
//! but not built. The target runs without hugepages
//! (`--no-huge`) on an ephemeral 127.0.0.1 port and is killed when the test ends, pass or fail.

mod common;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_clean_run, finish, json_number, perf, spawn_perf, text};
use nvmirror_nvmf::pdu::{Fes, PduType, TermReq};
use nvmirror_test_ports::free_port;

const NQN: &str = "nqn.2016-06.io.spdk:cnode1";
/// Longest any single perf invocation may take before the test kills it and fails.
const TARGET_START_TIMEOUT: Duration = Duration::from_secs(15);
const TARGET_STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn bad_usage_exits_2_naming_the_option() {
    let output = perf(&[
        "--target",
        "127.0.0.1:4420",
        "--nqn",
        NQN,
        "--io-size",
        "1000",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("--io-size"),
        "{}",
        text(&output.stderr)
    );
    assert_eq!(perf(&["--nqn", NQN]).status.code(), Some(2));
}

#[test]
fn refused_connection_exits_3_with_a_clear_message() {
    let port = free_port().to_string();
    let target = format!("127.0.0.1:{port}");
    let output = perf(&["--target", &target, "--nqn", NQN, "--time-s", "1"]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("refused") && stderr.contains(&target),
        "{stderr}"
    );
}

/// A fake target that answers the ICReq with `reply` and closes; returns its address.
fn fake_target(reply: Vec<u8>) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let thread = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut icreq = [0u8; 128];
        stream.read_exact(&mut icreq).unwrap();
        assert_eq!(icreq[0], PduType::ICReq as u8);
        stream.write_all(&reply).unwrap();
    });
    (address, thread)
}

/// Runs the perf tool against a fake target that answers the ICReq with `reply`; the run must
/// fail with exit 3 (connection or protocol failure). Returns what it printed on stderr.
fn perf_against_fake_target(reply: Vec<u8>) -> String {
    let (address, thread) = fake_target(reply);
    let output = perf(&["--target", &address, "--nqn", NQN, "--time-s", "1"]);
    thread.join().unwrap();
    assert_eq!(output.status.code(), Some(3));
    text(&output.stderr)
}

#[test]
fn target_term_req_is_reported_with_its_fes() {
    let mut reply = vec![0u8; 64];
    let term = TermReq {
        fes: Fes::UnsupportedParameter as u16,
        fei: 10,
    };
    let length = term.encode_into(&mut reply, PduType::C2HTermReq, &[]);
    reply.truncate(length);
    let stderr = perf_against_fake_target(reply);
    assert!(
        stderr.contains("C2HTermReq: FES 0x6 (UnsupportedParameter), FEI 0xa"),
        "{stderr}"
    );
}

#[test]
fn malformed_icresp_is_a_clear_protocol_error() {
    let mut reply = vec![0u8; 128];
    reply[0] = 0x7e;
    reply[2] = 128;
    reply[4] = 128;
    let stderr = perf_against_fake_target(reply);
    assert!(
        stderr.contains("malformed PDU from the target: unknown PDU type"),
        "{stderr}"
    );
}

/// SPDK's nvmf_tgt with one 16 MiB malloc namespace; killed on drop.
struct SpdkTarget {
    child: Child,
    directory: PathBuf,
    address: String,
}

impl Drop for SpdkTarget {
    /// SIGTERM first so nvmf_tgt removes its shared-memory trace file; SIGKILL if it lingers.
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the pid of our own still-unreaped child; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + TARGET_STOP_TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

impl SpdkTarget {
    fn start(root: &Path) -> SpdkTarget {
        let directory =
            std::env::temp_dir().join(format!("nvmirror-perf-test-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let socket = directory.join("rpc.sock");
        let shm_id = (100 + std::process::id() % 800).to_string();
        let log = std::fs::File::create(directory.join("nvmf_tgt.log")).unwrap();
        let mut command = Command::new(root.join("build/bin/nvmf_tgt"));
        // SAFETY: the closure runs in the forked child before exec and only makes one async-signal-safe
        // syscall: if this test process dies without running Drop, the kernel kills nvmf_tgt with it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command
            .args([
                "-m",
                "0x1",
                "-i",
                &shm_id,
                "--no-huge",
                "-s",
                "512",
                "--disable-cpumask-locks",
                "-r",
            ])
            .arg(&socket)
            .env("LD_LIBRARY_PATH", root.join("build/lib"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let port = free_port();
        let target = SpdkTarget {
            child,
            directory,
            address: format!("127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + TARGET_START_TIMEOUT;
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "nvmf_tgt did not open its RPC socket; see {:?}",
                target.directory
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let port = port.to_string();
        for rpc in [
            vec!["nvmf_create_transport", "-t", "TCP"],
            vec!["bdev_malloc_create", "-b", "Malloc0", "16", "512"],
            vec!["nvmf_create_subsystem", NQN, "-a", "-s", "SPDK0001"],
            vec!["nvmf_subsystem_add_ns", NQN, "Malloc0"],
            vec![
                "nvmf_subsystem_add_listener",
                NQN,
                "-t",
                "tcp",
                "-a",
                "127.0.0.1",
                "-s",
                &port,
            ],
        ] {
            let status = Command::new(root.join("scripts/rpc.py"))
                .arg("-s")
                .arg(&socket)
                .args(&rpc)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "rpc {rpc:?} failed");
        }
        target
    }
}

/// The SPDK tree `$SPDK_PEER` names, or `None` when it is unset. Set but unbuilt is a failure, not a
/// skip: whoever set it meant the SPDK runs to happen.
fn spdk_root() -> Option<PathBuf> {
    let root = PathBuf::from(std::env::var_os("SPDK_PEER")?);
    for needed in ["build/bin/nvmf_tgt", "scripts/rpc.py"] {
        assert!(
            root.join(needed).exists(),
            "SPDK_PEER={} has no {needed}: build SPDK there, or unset SPDK_PEER to skip this test",
            root.display()
        );
    }
    Some(root)
}

#[test]
fn against_spdk_nvmf_tgt() {
    let Some(root) = spdk_root() else {
        println!(
            "SKIPPED: SPDK_PEER is not set (set it to an SPDK tree with build/bin/nvmf_tgt to run)"
        );
        return;
    };
    let target = SpdkTarget::start(&root);
    let address = target.address.as_str();
    let base = [
        "--target",
        address,
        "--nqn",
        NQN,
        "--time-s",
        "1",
        "--warmup-s",
        "0",
        "--json",
        "--verify",
    ];

    // 16 KiB writes exceed SPDK's 4 KiB in-capsule size: R2T + H2CData, with both digests, two queues.
    let r2t = perf(
        &[
            &base[..],
            &[
                "--pattern",
                "randrw",
                "--io-size",
                "16384",
                "--header-digest",
                "--data-digest",
            ],
        ]
        .concat(),
    );
    let json = assert_clean_run(&r2t, "randrw 16 KiB with digests");
    assert!(
        json_number(&json, "reads") > 0.0 && json_number(&json, "writes") > 0.0,
        "{json}"
    );
    let multi = perf(
        &[
            &base[..],
            &[
                "--pattern",
                "randwrite",
                "--connections",
                "2",
                "--queue-depth",
                "8",
            ],
        ]
        .concat(),
    );
    assert_clean_run(&multi, "randwrite in-capsule on two queues");
    let success = perf(
        &[
            &base[..],
            &["--pattern", "randread", "--disable-sq-flow-control"],
        ]
        .concat(),
    );
    assert_clean_run(&success, "randread completed by C2HData SUCCESS");

    let unknown = perf(&[
        "--target",
        address,
        "--nqn",
        "nqn.2016-06.io.spdk:nobody",
        "--time-s",
        "1",
    ]);
    assert_eq!(unknown.status.code(), Some(3));
    let stderr = text(&unknown.stderr);
    assert!(
        stderr.contains("Connect Invalid Parameters") && stderr.contains("(SUBNQN)"),
        "{stderr}"
    );
    let inactive = perf(&[
        "--target", address, "--nqn", NQN, "--nsid", "7", "--time-s", "1",
    ]);
    assert_eq!(inactive.status.code(), Some(3));
    assert!(
        text(&inactive.stderr).contains("namespace 7"),
        "{}",
        text(&inactive.stderr)
    );

    // A second, unverified writer scribbles over the verified range: every read-back must notice.
    let range = ["--lba-range-bytes", "1048576"];
    let verified = spawn_perf(
        &[
            &base[..2],
            &[
                "--nqn",
                NQN,
                "--time-s",
                "3",
                "--verify",
                "--pattern",
                "randrw",
            ],
            &range[..],
        ]
        .concat(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let scribbler = perf(&[
        "--target",
        address,
        "--nqn",
        NQN,
        "--time-s",
        "1",
        "--warmup-s",
        "0",
        "--pattern",
        "randwrite",
        range[0],
        range[1],
    ]);
    assert_eq!(
        scribbler.status.code(),
        Some(0),
        "{}",
        text(&scribbler.stderr)
    );
    let verified = finish(verified);
    assert_eq!(
        verified.status.code(),
        Some(1),
        "{}",
        text(&verified.stdout)
    );
    let stderr = text(&verified.stderr);
    assert!(
        stderr.contains("verify mismatch at LBA") && stderr.contains("found garbage"),
        "{stderr}"
    );
    drop(target);
}
