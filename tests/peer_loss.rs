//! Surviving the peer, on real processes over loopback (issue 9): a SIGSTOPped destination keeps
//! its TCP connection open and is declared lost by the source's heartbeat deadline within
//! `peer_timeout_ms` + 1 s; under `peer_loss_policy = "suspend"` host writes are held and complete
//! after SIGCONT; under `"fail"` they fail with a path status while reads are still served, and
//! writes resume once the destination is back; a link stalled by the fault proxy (a blackhole
//! that closes nothing) is lost on both sides and heals.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nvmirror_fault_proxy::{Action, FaultProxy};

const PEER_TIMEOUT_MS: u64 = 1000;
/// What the issue allows on top of the peer timeout for declaring a frozen peer lost.
const DECLARE_SLACK: Duration = Duration::from_secs(1);
const NQN: &str = "nqn.2026-11.io.nvmirror:peer-loss";

/// One side's config: file namespaces, a short peer timeout, `extra` top-level lines.
fn config(scratch: &Scratch, role: &str, port: u16, image: &str, extra: &str) -> PathBuf {
    let address = if role == "source" { "peer" } else { "listen" };
    let text = format!(
        "role = \"{role}\"\nvolume = \"peerloss\"\n{address} = \"127.0.0.1:{port}\"\n\
         hugepage_dir = \"{dir}\"\nfallback_dir = \"{dir}\"\nring_size_mib = 8\ncp_interval_ms = 500\n\
         peer_timeout_ms = {PEER_TIMEOUT_MS}\nrpc_socket = \"{dir}/{role}.sock\"\n\
         metadata_path = \"{dir}/{role}.meta\"\n\
         # Fresh zeroed image files: identical by construction, no initial sync.\n\
         assume_identical = true\n{extra}\n\
         [[namespace]]\nkind = \"file\"\npath = \"{image}\"\nsize_mib = {NAMESPACE_MIB}\n",
        dir = scratch.0.display(),
        image = scratch.path(image).display(),
    );
    let path = scratch.path(&format!("{role}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn signal(process: &Process, signal: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    let result = unsafe { libc::kill(process.0.id() as i32, signal) };
    assert_eq!(result, 0, "kill({signal})");
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until `needle` occurs `count` times in the log; returns how long that took.
fn wait_for_log(path: &Path, needle: &str, count: usize, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if log_text(path).matches(needle).count() >= count {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "no {count}x {needle:?} in {} within {limit:?}:\n{}",
            path.display(),
            log_text(path)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A started pair: destination (its log next to its config), source with `source_extra`
/// (and a target on `target_port` when given), `peer_port` being where the source dials.
struct Pair {
    destination: Process,
    _source: Process,
    source_log: PathBuf,
    destination_log: PathBuf,
}

fn start_pair(
    scratch: &Scratch,
    destination_port: u16,
    peer_port: u16,
    source_extra: &str,
    target_port: Option<u16>,
) -> Pair {
    let destination_config = config(scratch, "destination", destination_port, "mirror.img", "");
    let mut extra = source_extra.to_string();
    let target = target_port.map(|port| target_section(port, NQN, "1"));
    let source_config = config(scratch, "source", peer_port, "primary.img", &extra);
    if let Some(target) = target {
        extra = std::fs::read_to_string(&source_config).unwrap() + &target;
        std::fs::write(&source_config, extra).unwrap();
    }
    let destination = start_destination(&destination_config);
    let source_log = scratch.path("source.log");
    let (source, lines) = start_source(&source_config, &[], "info", &source_log);
    std::thread::spawn(move || lines.for_each(drop));
    wait_for_log(
        &source_log,
        "replication link ready",
        1,
        Duration::from_secs(20),
    );
    Pair {
        destination,
        _source: source,
        source_log,
        destination_log: scratch.path("destination.log"),
    }
}

/// A JSON figure of nvmirror-perf's last line.
fn figure(json: &str, name: &str) -> f64 {
    let key = format!("\"{name}\":");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {json}"))
        + key.len();
    json[at..]
        .split([',', '}'])
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{name} in {json}"))
}

fn perf(target_port: u16, pattern: &str, seconds: u32) -> Command {
    let mut perf = perf_at(target_port, NQN);
    perf.args([
        "--pattern",
        pattern,
        "--io-size",
        "4096",
        "--queue-depth",
        "4",
    ]);
    perf.args([
        "--time-s",
        &seconds.to_string(),
        "--warmup-s",
        "0",
        "--json",
    ]);
    perf
}

/// (last stdout line, stderr) of a finished perf run.
fn perf_output(child: Child) -> (String, String) {
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let json = stdout.lines().last().unwrap_or("").to_string();
    (json, String::from_utf8_lossy(&output.stderr).to_string())
}

fn spawn_perf(mut command: Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_sigstopped_destination_is_declared_lost_within_the_peer_timeout_and_returns_after_sigcont() {
    let scratch = Scratch::new("peer-loss-sigstop");
    let port = free_port();
    let pair = start_pair(&scratch, port, port, "", None);
    // Heartbeats flow while idle: the link stays up for several peer timeouts.
    std::thread::sleep(Duration::from_millis(3 * PEER_TIMEOUT_MS));
    assert!(
        !log_text(&pair.source_log).contains("destination lost"),
        "an idle, healthy link was declared lost:\n{}",
        log_text(&pair.source_log)
    );

    signal(&pair.destination, libc::SIGSTOP);
    let limit = Duration::from_millis(PEER_TIMEOUT_MS) + DECLARE_SLACK;
    let declared = wait_for_log(&pair.source_log, "destination lost", 1, limit + limit);
    eprintln!("SIGSTOPped destination declared lost after {declared:?} (peer timeout {PEER_TIMEOUT_MS} ms)");
    assert!(declared <= limit, "declared lost after {declared:?}");
    let log = log_text(&pair.source_log);
    assert!(log.contains("nothing received for"), "{log}");
    assert!(log.contains("peer_loss_policy = \"suspend\""), "{log}");
    assert!(
        log.contains("closing connection"),
        "the link was closed: {log}"
    );
    // Redials reach the frozen process's listen backlog, never a handshake: still one loss.
    std::thread::sleep(Duration::from_millis(2 * PEER_TIMEOUT_MS));
    assert_eq!(
        log_text(&pair.source_log)
            .matches("destination lost")
            .count(),
        1
    );

    signal(&pair.destination, libc::SIGCONT);
    let back = wait_for_log(
        &pair.source_log,
        "destination back after",
        1,
        Duration::from_secs(15),
    );
    eprintln!("destination back {back:?} after SIGCONT");
    wait_for_log(
        &pair.source_log,
        "replication link ready",
        2,
        Duration::from_secs(5),
    );
}

#[test]
fn suspend_holds_host_writes_while_the_destination_is_frozen_and_completes_them_after_sigcont() {
    let scratch = Scratch::new("peer-loss-suspend");
    let port = free_port();
    let target_port = free_port();
    let pair = start_pair(
        &scratch,
        port,
        port,
        "peer_loss_policy = \"suspend\"",
        Some(target_port),
    );
    let perf = spawn_perf(perf(target_port, "randwrite", 6));
    std::thread::sleep(Duration::from_secs(1));
    signal(&pair.destination, libc::SIGSTOP);
    let frozen = Instant::now();
    wait_for_log(
        &pair.source_log,
        "destination lost",
        1,
        Duration::from_secs(5),
    );
    std::thread::sleep(Duration::from_millis(2500).saturating_sub(frozen.elapsed()));
    signal(&pair.destination, libc::SIGCONT);
    let frozen_for = frozen.elapsed();
    let (json, stderr) = perf_output(perf);
    assert_eq!(
        figure(&json, "errors"),
        0.0,
        "suspend fails no write: {json}\n{stderr}"
    );
    assert!(figure(&json, "writes") > 0.0, "{json}");
    // A write issued just after the SIGSTOP waited until the destination came back.
    let held_us = figure(&json, "lat_us_max");
    assert!(
        held_us >= (frozen_for.as_micros() as f64) * 0.8,
        "the longest write took {held_us} us; the destination was frozen {frozen_for:?}"
    );
    let log = log_text(&pair.source_log);
    assert!(log.contains("destination back after"), "{log}");
    assert!(!log.contains("fail with a path error"), "{log}");
}

#[test]
fn fail_policy_fails_writes_with_a_path_error_serves_reads_and_resumes_writes_after_the_handshake()
{
    let scratch = Scratch::new("peer-loss-fail");
    let port = free_port();
    let target_port = free_port();
    let pair = start_pair(
        &scratch,
        port,
        port,
        "peer_loss_policy = \"fail\"",
        Some(target_port),
    );
    let (json, _) = perf_output(spawn_perf(perf(target_port, "randwrite", 1)));
    assert_eq!(figure(&json, "errors"), 0.0, "healthy pair: {json}");

    signal(&pair.destination, libc::SIGSTOP);
    wait_for_log(
        &pair.source_log,
        "destination lost",
        1,
        Duration::from_secs(5),
    );
    let (json, stderr) = perf_output(spawn_perf(perf(target_port, "randwrite", 1)));
    assert!(
        figure(&json, "errors") > 0.0,
        "writes failed while lost: {json}"
    );
    assert_eq!(
        figure(&json, "writes"),
        0.0,
        "no write succeeded while lost: {json}"
    );
    assert!(
        stderr.contains("Path Related / Asymmetric Access Inaccessible (SCT 3, SC 0x02)"),
        "the path status, DNR clear, that multipath fails over on: {stderr}"
    );
    let (json, stderr) = perf_output(spawn_perf(perf(target_port, "randread", 1)));
    assert_eq!(
        figure(&json, "errors"),
        0.0,
        "reads are served: {json}\n{stderr}"
    );
    assert!(figure(&json, "reads") > 100.0, "{json}");

    signal(&pair.destination, libc::SIGCONT);
    wait_for_log(
        &pair.source_log,
        "destination back after",
        1,
        Duration::from_secs(15),
    );
    let (json, stderr) = perf_output(spawn_perf(perf(target_port, "randwrite", 1)));
    assert_eq!(
        figure(&json, "errors"),
        0.0,
        "writes resume: {json}\n{stderr}"
    );
    assert!(figure(&json, "writes") > 100.0, "{json}");
}

#[test]
fn a_link_stalled_by_the_fault_proxy_is_lost_on_both_sides_and_heals() {
    let scratch = Scratch::new("peer-loss-proxy");
    let destination_port = free_port();
    let proxy = FaultProxy::start(
        "127.0.0.1:0".parse().unwrap(),
        format!("127.0.0.1:{destination_port}").parse().unwrap(),
        Vec::new(),
    )
    .unwrap();
    let pair = start_pair(
        &scratch,
        destination_port,
        proxy.local_addr().port(),
        "",
        None,
    );
    let forwarded = proxy.stats();
    assert!(forwarded.bytes_to_upstream > 0 && forwarded.bytes_to_client > 0);

    proxy.apply(Action::Stall);
    let limit = Duration::from_millis(PEER_TIMEOUT_MS) + DECLARE_SLACK;
    let source_declared = wait_for_log(&pair.source_log, "destination lost", 1, limit + limit);
    assert!(
        source_declared <= limit,
        "source declared after {source_declared:?}"
    );
    // Measured from the stall too: the wait for the source's line came first.
    let destination_declared = source_declared
        + wait_for_log(
            &pair.destination_log,
            "source lost",
            1,
            Duration::from_secs(5),
        );
    eprintln!(
        "stall: source declared lost after {source_declared:?}, destination after {destination_declared:?}"
    );
    assert!(destination_declared <= limit, "{destination_declared:?}");

    proxy.apply(Action::Heal);
    let healed = Instant::now();
    wait_for_log(
        &pair.source_log,
        "destination back after",
        1,
        Duration::from_secs(15),
    );
    eprintln!("link back {:?} after the heal", healed.elapsed());
    assert!(
        proxy.stats().connections >= 2,
        "the source reconnected through the proxy"
    );
}
