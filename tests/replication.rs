//! Process tests: a source and a destination as two `nvmirror` processes on loopback, with file
//! namespaces so the images can be compared from outside; a source killed with SIGKILL and
//! restarted; a mismatched pair refused; a bad config named.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn two_processes_mirror_equals_primary_after_mixed_workload() {
    let scratch = Scratch::new("mixed");
    let (destination, source) = write_pair(&scratch, ("mixed", "mixed"), 10_000);
    let _destination = start_destination(&destination);
    let mut workload = Command::new(BIN);
    workload.args(["workload", "--config", source.to_str().unwrap()]);
    workload.args([
        "--seed",
        "42",
        "--writes",
        "6000",
        "--pattern",
        "mixed",
        "--cp-every",
        "1500",
        "--json",
    ]);
    let output = run_to_end(workload);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "workload failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("\"cp_reference_count\""),
        "no counters printed: {stdout}"
    );
    assert!(
        !stdout.contains("\"cp_reference_count\":0,"),
        "a mixed workload must produce references: {stdout}"
    );
    assert_images_equal(&scratch);
}

#[test]
fn source_killed_with_sigkill_replays_its_ring_and_resyncs() {
    let scratch = Scratch::new("sigkill");
    // A long CP interval and no CP requests: the acknowledged writes live only in the ring.
    let (destination, source) = write_pair(&scratch, ("kill", "kill"), 600_000);
    let _destination = start_destination(&destination);
    let ack_log = scratch.path("acked.log");
    let mut victim = spawn_disjoint_workload(&source, 9, 1_000_000, 0, &ack_log, Stdio::null());
    wait_for_acks(&ack_log, 300, &mut victim);
    // SIGKILL: no destructor, no flush, nothing but what the ring already holds.
    victim.0.kill().unwrap();
    victim.0.wait().unwrap();
    let acked = acked_writes(&ack_log);
    assert!(acked.len() >= 300);

    let mut sync = Command::new(BIN);
    sync.args(["sync", "--config", source.to_str().unwrap()]);
    let output = run_to_end(sync);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "sync after the crash failed:\n{stderr}"
    );
    assert!(
        stderr.contains("replay"),
        "the restart must report its ring replay:\n{stderr}"
    );

    assert_acked_writes_on(&scratch, "primary.img", 9, &acked);
    assert_images_equal(&scratch);
}

#[test]
fn a_destination_of_another_volume_is_refused_with_a_clear_error() {
    let scratch = Scratch::new("mismatch");
    let (destination, source) = write_pair(&scratch, ("alpha", "beta"), 10_000);
    let _destination = start_destination(&destination);
    let mut workload = Command::new(BIN);
    workload.args([
        "workload",
        "--config",
        source.to_str().unwrap(),
        "--writes",
        "10",
    ]);
    let output = run_to_end(workload);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a mismatched pair must not replicate"
    );
    assert!(
        stderr.contains("refused") && stderr.contains("volume"),
        "unclear error:\n{stderr}"
    );
}

#[test]
fn a_bad_config_names_the_key() {
    let scratch = Scratch::new("badconfig");
    let path = scratch.path("bad.toml");
    std::fs::write(
        &path,
        "role = \"source\"\npeer = \"127.0.0.1:1\"\nring_size_mib = 3\n[[namespace]]\nkind = \"malloc\"\nsize_mib = 8\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("ring_size_mib"), "{stderr}");
}

/// The source's target spreads its queue pairs round robin over its two cores (the source's
/// reactor and a queue-pair reactor); verified I/O on both reaches the mirror.
#[test]
fn verified_nvme_tcp_writes_reach_the_mirror_after_a_cp() {
    let scratch = Scratch::new("nvmf");
    let port = free_port();
    let target_port = free_port();
    let nqn = "nqn.2026-11.io.nvmirror:test";
    let destination = write_config(&scratch, "destination", "nvmf", port, "mirror.img", 600_000);
    let source = write_config(&scratch, "source", "nvmf", port, "primary.img", 600_000);
    let mut text = std::fs::read_to_string(&source).unwrap();
    text = text.replace("ring_size_mib = 8\n", "ring_size_mib = 8\ncores = [0, 1]\n");
    text.push_str(&target_section(target_port, nqn, "1, 2"));
    std::fs::write(&source, text).unwrap();
    let _destination = start_destination(&destination);
    let source_log = scratch.path("source.log");
    let (mut source_process, lines) = start_source(&source, &[], "info", &source_log);

    for (nsid, pattern) in [("1", "randwrite"), ("2", "write")] {
        let mut perf = perf_at(target_port, nqn);
        perf.args(["--nsid", nsid]);
        perf.args([
            "--pattern",
            pattern,
            "--verify",
            "--time-s",
            "2",
            "--warmup-s",
            "0",
            "--queue-depth",
            "16",
            "--connections",
            "3",
        ]);
        perf.args(["--io-size", "4096", "--json"]);
        if nsid == "2" {
            // Digests on: the data digest checked over the ring slot is the entry's CRC (the
            // destination verifies it again, so a wrong one would stall the run).
            perf.args(["--header-digest", "--data-digest"]);
        }
        let output = run_to_end(perf);
        assert!(
            output.status.success(),
            "verified {pattern} on namespace {nsid} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // SIGTERM: the source takes a last CP before it exits, so the mirror is current.
    let pid = source_process.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = source_process.0.wait().unwrap();
    assert!(status.success(), "source exited with {status}");
    let counters: Vec<String> = lines.map_while(Result::ok).collect();
    let cps = counters
        .iter()
        .find(|l| l.starts_with("cp_count "))
        .expect("counters printed at shutdown");
    assert_ne!(cps.as_str(), "cp_count 0");
    assert_images_equal(&scratch);
    // Each run: admin queue here, I/O queue 1 there, 2 here, 3 there.
    let log = std::fs::read_to_string(&source_log).unwrap();
    let handed = log.matches("goes to queue-pair reactor 1").count();
    assert_eq!(
        handed, 4,
        "two connections per perf run polled remotely:\n{log}"
    );
}

#[test]
fn a_peer_speaking_another_protocol_version_is_told_and_disconnected() {
    use std::io::Write;
    let scratch = Scratch::new("version");
    let port = free_port();
    let destination = write_config(
        &scratch,
        "destination",
        "version",
        port,
        "mirror.img",
        10_000,
    );
    let _destination = start_destination(&destination);
    let mut peer = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A message header of a future version 99: magic, version, kind Hello, flags, length, crc.
    let mut header = Vec::new();
    header.extend_from_slice(b"NVMW");
    header.extend_from_slice(&[99, 1, 0, 0]);
    header.extend_from_slice(&16u32.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    peer.write_all(&header).unwrap();
    let mut reply = Vec::new();
    peer.read_to_end(&mut reply)
        .expect("the destination closes the connection");
    assert!(
        reply.len() > 16,
        "a Reject comes before the close, got {} bytes",
        reply.len()
    );
    assert_eq!(&reply[..4], b"NVMW");
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains("protocol version 99"),
        "the Reject names the version: {text}"
    );
    let log = std::fs::read_to_string(scratch.path("destination.log")).unwrap();
    assert!(
        log.contains("protocol version 99"),
        "the destination log names the version:\n{log}"
    );
}

#[test]
fn a_lost_destination_delays_writes_and_loses_none() {
    let scratch = Scratch::new("lostpeer");
    let (destination, source) = write_pair(&scratch, ("lost", "lost"), 600_000);
    let mut first = start_destination(&destination);
    let ack_log = scratch.path("acked.log");
    let source_log = std::fs::File::create(scratch.path("source.log")).unwrap();
    let mut workload = spawn_disjoint_workload(&source, 5, 2000, 700, &ack_log, source_log.into());
    wait_for_acks(&ack_log, 200, &mut workload);
    let started = Instant::now();
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    // Without its destination the source acknowledges nothing more (synchronous mode).
    std::thread::sleep(Duration::from_millis(300));
    let stalled = acked_count(&ack_log);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        acked_count(&ack_log) <= stalled + 8,
        "writes were acknowledged without a destination"
    );
    let source_text = std::fs::read_to_string(scratch.path("source.log")).unwrap();
    assert!(
        source_text.contains("cannot reach destination"),
        "no clear error:\n{source_text}"
    );

    let _second = start_destination(&destination);
    let status = loop {
        if let Some(status) = workload.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < TEST_TIMEOUT,
            "the workload did not finish after the destination came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "workload failed after the destination came back"
    );
    let acked = acked_writes(&ack_log);
    assert_eq!(
        acked.len(),
        2000,
        "every write completes once the destination is back"
    );
    assert_images_equal(&scratch);
}

#[test]
fn promoting_the_destination_after_a_source_crash_keeps_every_acknowledged_write() {
    let scratch = Scratch::new("promote");
    // No CP during the run: the acknowledged writes exist on the destination only in its log.
    let (destination, source) = write_pair(&scratch, ("promote", "promote"), 600_000);
    let mut destination_process = start_destination(&destination);
    let ack_log = scratch.path("acked.log");
    let mut victim = spawn_disjoint_workload(&source, 13, 1_000_000, 0, &ack_log, Stdio::null());
    wait_for_acks(&ack_log, 300, &mut victim);
    victim.0.kill().unwrap();
    victim.0.wait().unwrap();
    let pid = destination_process.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(destination_process.0.wait().unwrap().success());

    let mut promote = Command::new(BIN);
    promote.args(["promote", "--config", destination.to_str().unwrap()]);
    let output = run_to_end(promote);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "promote failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("replayed onto the mirror"), "{stdout}");

    assert_acked_writes_on(&scratch, "mirror.img", 13, &acked_writes(&ack_log));
}

/// The unreplicated target (the benchmarks' baseline) spreads its queue pairs over two cores
/// too; verified reads and writes pass on both reactors.
#[test]
fn unreplicated_target_spreads_queue_pairs_over_its_cores() {
    let scratch = Scratch::new("plain");
    let (port, discovery_port) = (free_port(), free_port());
    let log = scratch.path("target.log");
    let _target = Process(
        Command::new(BIN)
            .args(["--no-replication", "--cores", "0,1"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--discovery-listen", &format!("127.0.0.1:{discovery_port}")])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut perf = Command::new(perf_binary());
    perf.args(["--target", &format!("127.0.0.1:{port}")]);
    perf.args([
        "--nqn",
        "nqn.2026-11.io.nvmirror:vol0",
        "--connections",
        "3",
    ]);
    perf.args([
        "--pattern",
        "randrw",
        "--verify",
        "--time-s",
        "2",
        "--warmup-s",
        "0",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let output = loop {
        let mut attempt = Command::new(perf.get_program());
        attempt.args(perf.get_args());
        let output = run_to_end(attempt);
        let refused = String::from_utf8_lossy(&output.stderr).contains("refused");
        if !refused || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("verify: 0 mismatches"), "{stdout}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        log.matches("goes to queue-pair reactor 1").count(),
        2,
        "I/O queues 1 and 3 polled by the second reactor:\n{log}"
    );
}
