//! Online failover and failback on real processes (issue 9, point 7): the source is killed under
//! load; `nvmirror promote` on the running destination makes it serve the volume as the source
//! on its own target (same NQN and serial, so hosts reconnect), writes go on (degraded); the old
//! source, started as a destination with its own metadata and images, is attached: its
//! unmirrored ring entries are marked, the new source resyncs only what differs, and at the end
//! both images are equal. Each node has its own directory, as on two machines.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NQN: &str = "nqn.2026-11.io.nvmirror:failover";

/// One node's config in its own directory `dir`; `images` names its namespace files there.
#[allow(clippy::too_many_arguments)]
fn node_config(
    dir: &Path,
    name: &str,
    role: &str,
    address: &str,
    images: &str,
    target_port: Option<u16>,
    promote_peer: Option<u16>,
    metadata: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let key = if role == "source" { "peer" } else { "listen" };
    let mut text = format!(
        "role = \"{role}\"\nvolume = \"failover\"\n{key} = \"{address}\"\n\
         hugepage_dir = \"{d}\"\nfallback_dir = \"{d}\"\nring_medium = \"file\"\nring_size_mib = 8\n\
         cp_interval_ms = 200\npeer_timeout_ms = 1000\nrpc_socket = \"{d}/{name}.sock\"\n\
         metadata_path = \"{d}/{metadata}\"\nassume_identical = true\n",
        d = dir.display()
    );
    if role == "source" {
        text.push_str("peer_loss_policy = \"degrade\"\n");
    }
    if let Some(port) = promote_peer {
        text.push_str(&format!("promote_peer = \"127.0.0.1:{port}\"\n"));
    }
    for suffix in ["", ".2"] {
        text.push_str(&format!(
            "[[namespace]]\nkind = \"file\"\npath = \"{}/{images}{suffix}\"\nsize_mib = {NAMESPACE_MIB}\n",
            dir.display()
        ));
    }
    if let Some(port) = target_port {
        text.push_str(&format!(
            "[target]\nlisten = [\"127.0.0.1:{port}\"]\ndiscovery_listen = []\n\
             [[target.subsystem]]\nnqn = \"{NQN}\"\nserial = \"NVMIRRORFAILOVER\"\n\
             allow_any_host = true\nnamespaces = [1, 2]\n"
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn(
    config: &Path,
    log: &Path,
) -> (
    Process,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    let mut process = Process(
        Command::new(BIN)
            .args(["--config", config.to_str().unwrap()])
            .env(
                "RUST_LOG",
                std::env::var("FAILOVER_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    let lines = std::io::BufReader::new(process.0.stdout.take().unwrap()).lines();
    (process, lines)
}

fn wait_line(
    lines: &mut std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    what: &str,
) {
    for line in lines.by_ref() {
        if line.unwrap().contains(what) {
            return;
        }
    }
    panic!("the node exited before saying '{what}'");
}

fn wait_log(log: &Path, what: &str) -> String {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        assert!(
            started.elapsed() < TEST_TIMEOUT,
            "no '{what}' in {}:\n{text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn perf(port: u16, args: &[&str]) -> std::process::Output {
    let mut perf = perf_at(port, NQN);
    perf.args(["--io-size", "4096", "--queue-depth", "8", "--warmup-s", "0"]);
    perf.args(args);
    run_to_end(perf)
}

fn term(process: &mut Process) {
    let pid = process.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    process.0.wait().unwrap();
}

#[test]
fn promote_online_then_fail_back_resyncing_only_what_differs() {
    let scratch = Scratch::new("failover");
    let (a, b) = (scratch.path("node-a"), scratch.path("node-b"));
    let replication = free_port();
    let (target_a, target_b, failback) = (free_port(), free_port(), free_port());
    let source = node_config(
        &a,
        "source",
        "source",
        &format!("127.0.0.1:{replication}"),
        "disk.img",
        Some(target_a),
        None,
        "node.meta",
    );
    let destination = node_config(
        &b,
        "destination",
        "destination",
        &format!("127.0.0.1:{replication}"),
        "disk.img",
        Some(target_b),
        Some(failback),
        "node.meta",
    );
    let (mut node_b, mut b_lines) = spawn(&destination, &b.join("b.log"));
    wait_line(&mut b_lines, "accepting the source");
    let (mut node_a, mut a_lines) = spawn(&source, &a.join("a.log"));
    wait_line(&mut a_lines, "connect a host");
    std::thread::spawn(move || a_lines.for_each(drop));
    // Replicated writes, then the source dies under load.
    assert!(perf(target_a, &["--pattern", "randwrite", "--time-s", "1"])
        .status
        .success());
    let mut load = perf_at(target_a, NQN);
    load.args(["--pattern", "randwrite", "--time-s", "5", "--warmup-s", "0"]);
    load.stdout(Stdio::null()).stderr(Stdio::null());
    let mut load = Process(load.spawn().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    node_a.0.kill().unwrap();
    node_a.0.wait().unwrap();
    let _ = load.0.wait();

    // Online promotion: the running destination serves the volume on its own target.
    let mut promote = Command::new(BIN);
    promote.args(["promote", "--config", destination.to_str().unwrap()]);
    eprintln!("step: promote");
    let output = run_to_end(promote);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && said.contains("now serves the volume as its source"),
        "{said}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::thread::spawn(move || b_lines.for_each(drop));
    // Hosts reconnect to it: verified writes and reads (degraded: its new destination is away).
    eprintln!("step: verified perf on the promoted node");
    let b_log = b.join("b.log");
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        eprintln!(
            "promoted node log after 60 s:\n{}",
            std::fs::read_to_string(&b_log).unwrap_or_default()
        );
    });
    let verified = perf(
        target_b,
        &[
            "--pattern",
            "randwrite",
            "--time-s",
            "1",
            "--verify",
            "--lba-range-bytes",
            "1048576",
        ],
    );
    drop(watchdog);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let log_b = std::fs::read_to_string(b.join("b.log")).unwrap();
    assert!(log_b.contains("degraded"), "{log_b}");

    // Failback: the old source is attached as the new destination (its own directory, its
    // metadata, its images as mirrors).
    let attached = node_config(
        &a,
        "attached",
        "destination",
        &format!("127.0.0.1:{failback}"),
        "disk.img",
        None,
        None,
        "node.meta",
    );
    let (mut node_a2, mut a2_lines) = spawn(&attached, &a.join("a2.log"));
    wait_line(&mut a2_lines, "accepting the source");
    std::thread::spawn(move || a2_lines.for_each(drop));
    let log_a2 = std::fs::read_to_string(a.join("a2.log")).unwrap();
    assert!(
        log_a2.contains("attach: this node was the volume's source"),
        "{log_a2}"
    );
    let log = wait_log(&b.join("b.log"), "resync done");
    assert!(log.contains("resync of the destination starts"), "{log}");
    // Only what differs: far less than the volume (2 × 16 MiB).
    let line = log.lines().find(|l| l.contains("resync done")).unwrap();
    let mib: u64 = line
        .split("resync done (")
        .nth(1)
        .and_then(|rest| rest.split("): ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(mib < 2 * NAMESPACE_MIB, "{line}");
    eprintln!("failback: {line}");
    // The new source takes a last CP when it stops: both images are the same.
    term(&mut node_b);
    term(&mut node_a2);
    for suffix in ["", ".2"] {
        let ours = read_image(&b.join(format!("disk.img{suffix}")));
        let theirs = read_image(&a.join(format!("disk.img{suffix}")));
        if let Some(at) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
            panic!("namespace{suffix}: the failed-back mirror differs first at byte {at}");
        }
    }
}

fn run(args: &[&str]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(args);
    run_to_end(command)
}

#[test]
fn after_a_split_brain_discard_changes_lets_one_side_take_a_full_sync() {
    let scratch = Scratch::new("discard");
    let target_port = free_port();
    let (destination, source) = write_pair(&scratch, ("discard", "discard"), 600_000);
    let mut text = std::fs::read_to_string(&source).unwrap().replace(
        "ring_size_mib = 8\n",
        "ring_size_mib = 8\npeer_loss_policy = \"degrade\"\npeer_timeout_ms = 500\n",
    );
    text.push_str(&target_section(target_port, NQN, "1, 2"));
    std::fs::write(&source, text).unwrap();
    let dest_arg = destination.to_str().unwrap();
    // One settled pair, and a write the mirror gets.
    let mut destination_node = start_destination(&destination);
    let log = scratch.path("source-1.log");
    let (mut source_node, _lines) = start_source(&source, &[], "info", &log);
    assert!(perf(target_port, &["--pattern", "write", "--time-s", "1"])
        .status
        .success());
    assert!(perf(
        target_port,
        &["--nsid", "2", "--pattern", "write", "--time-s", "1"]
    )
    .status
    .success());
    term(&mut source_node);
    term(&mut destination_node);
    // Both move on alone: the destination is promoted, the source degrades without it.
    assert!(run(&["promote", "--config", dest_arg]).status.success());
    let log = scratch.path("source-2.log");
    let (mut source_node, _lines) = spawn(&source, &log);
    wait_log(&log, "degraded: writes go on without the destination");
    term(&mut source_node);
    // A split brain: refused.
    let _destination_node = start_destination(&destination);
    let log = scratch.path("source-3.log");
    let (mut source_node, _lines) = spawn(&source, &log);
    wait_log(&log, "split brain");
    let _ = source_node.0.wait();
    drop(_destination_node);
    // The operator gives up the destination's changes: it takes a full sync from the source.
    let discarded = run(&["discard-changes", "--config", dest_arg]);
    let said = String::from_utf8_lossy(&discarded.stdout);
    assert!(
        discarded.status.success() && said.contains("takes a full sync"),
        "{said}{}",
        String::from_utf8_lossy(&discarded.stderr)
    );
    let mut destination_node = start_destination(&destination);
    let log = scratch.path("source-4.log");
    let (mut source_node, _lines) = spawn(&source, &log);
    let text = wait_log(&log, "resync done");
    assert!(text.contains("every extent (full sync)"), "{text}");
    term(&mut source_node);
    term(&mut destination_node);
    assert_images_equal(&scratch);
}
