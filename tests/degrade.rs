//! `peer_loss_policy = "degrade"` on real processes (issue 9): a SIGSTOPped destination is
//! declared lost and host writes (nvmirror-perf through the source's NVMe/TCP target) go on
//! completing, their extents marked in the source's bitmap; after SIGCONT the resync brings the
//! mirror back (followed in `nvmirror status --json`), and after `nvmirror cp --wait` the mirror
//! image equals the primary byte for byte. A suspended source switched to degrade at run time
//! releases the writes it held; a destination killed and restarted (file ring) during the outage
//! is resynced too. A fresh pair over a primary that holds data gets the initial full sync, and a
//! destination caught in the middle of it is refused promotion.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PEER_TIMEOUT_MS: u64 = 1000;
const NQN: &str = "nqn.2026-11.io.nvmirror:degrade";
/// How long a resync of the test's 16 MiB namespace may take on a loaded machine.
const RESYNC_LIMIT: Duration = Duration::from_secs(60);

/// One side's config: one file namespace, a short peer timeout, a file ring in `ring-ROLE`,
/// `extra` top-level lines; the source exports the namespace on `target_port`.
fn config(scratch: &Scratch, role: &str, port: u16, target_port: u16, extra: &str) -> PathBuf {
    let address = if role == "source" { "peer" } else { "listen" };
    let image = if role == "source" {
        "primary.img"
    } else {
        "mirror.img"
    };
    let ring_dir = scratch.path(&format!("ring-{role}"));
    std::fs::create_dir_all(&ring_dir).unwrap();
    let mut text = format!(
        "role = \"{role}\"\nvolume = \"degrade\"\n{address} = \"127.0.0.1:{port}\"\n\
         hugepage_dir = \"{dir}\"\nfallback_dir = \"{dir}\"\nring_medium = \"file\"\n\
         ring_dir = \"{ring_dir}\"\nring_size_mib = 8\ncp_interval_ms = 200\n\
         peer_timeout_ms = {PEER_TIMEOUT_MS}\nrpc_socket = \"{dir}/{role}.sock\"\n\
         metadata_path = \"{dir}/{role}.meta\"\n{extra}\n\
         [[namespace]]\nkind = \"file\"\npath = \"{image}\"\nsize_mib = {NAMESPACE_MIB}\n",
        dir = scratch.0.display(),
        ring_dir = ring_dir.display(),
        image = scratch.path(image).display(),
    );
    if role == "source" {
        text += &target_section(target_port, NQN, "1");
    }
    let path = scratch.path(&format!("{role}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A running pair: the destination, the source (serving hosts), their configs and logs.
struct Pair {
    destination: Process,
    source: Process,
    destination_config: PathBuf,
    source_config: PathBuf,
    source_log: PathBuf,
    target_port: u16,
}

/// Fresh zeroed image files are identical by construction: no initial sync.
const IDENTICAL: &str = "assume_identical = true";

fn start_pair(scratch: &Scratch, policy: &str) -> Pair {
    start_pair_with(
        scratch,
        IDENTICAL,
        &format!("{IDENTICAL}\npeer_loss_policy = \"{policy}\""),
    )
}

/// A pair whose sides get `destination_extra` and `source_extra` top-level lines.
fn start_pair_with(scratch: &Scratch, destination_extra: &str, source_extra: &str) -> Pair {
    let port = free_port();
    let target_port = free_port();
    let destination_config = config(scratch, "destination", port, target_port, destination_extra);
    let source_config = config(scratch, "source", port, target_port, source_extra);
    let destination = start_destination(&destination_config);
    let source_log = scratch.path("source.log");
    let (source, lines) = start_source(&source_config, &[], "info", &source_log);
    std::thread::spawn(move || lines.for_each(drop));
    Pair {
        destination,
        source,
        destination_config,
        source_config,
        source_log,
        target_port,
    }
}

fn signal(process: &Process, signal: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    let result = unsafe { libc::kill(process.0.id() as i32, signal) };
    assert_eq!(result, 0, "kill({signal})");
}

/// SIGTERM, and the exit status must be success (a source takes its last CP first).
fn stop(process: &mut Process, what: &str) {
    signal(process, libc::SIGTERM);
    let started = Instant::now();
    loop {
        if let Some(status) = process.0.try_wait().unwrap() {
            assert!(status.success(), "{what} exited with {status}");
            return;
        }
        assert!(started.elapsed() < TEST_TIMEOUT, "{what} did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn wait_for_log(path: &Path, needle: &str, limit: Duration) {
    let started = Instant::now();
    while !log_text(path).contains(needle) {
        assert!(
            started.elapsed() < limit,
            "no {needle:?} in {} within {limit:?}:\n{}",
            path.display(),
            log_text(path)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn nvmirror(args: &[&str]) -> Output {
    run_to_end({
        let mut command = Command::new(BIN);
        command.args(args);
        command
    })
}

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

/// The source's node in `nvmirror status --json`.
fn status(config: &Path) -> Value {
    json_of(&nvmirror(&[
        "status",
        "--config",
        config.to_str().unwrap(),
        "--json",
    ]))["nodes"][0]
        .clone()
}

fn source_counters(config: &Path) -> Value {
    json_of(&nvmirror(&[
        "stats",
        "--config",
        config.to_str().unwrap(),
        "--json",
    ]))["counters"]["source"]
        .clone()
}

fn counter(counters: &Value, name: &str) -> u64 {
    counters[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} in {counters}"))
}

/// Polls status until the source is degraded (the destination was declared lost).
fn wait_degraded(config: &Path) -> Value {
    let started = Instant::now();
    loop {
        let node = status(config);
        if node["degraded"] == true {
            return node;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not degraded: {node}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `nvmirror status --json` until a resync ran and is done (the destination is connected,
/// writes are synchronous); returns the samples seen while it ran.
fn wait_resync_done(config: &Path) -> Vec<Value> {
    let started = Instant::now();
    let mut running = Vec::new();
    loop {
        let node = status(config);
        let resync = &node["resync"];
        if resync["active"] == true {
            running.push(resync.clone());
        } else if resync["count"].as_u64().unwrap() >= 1
            && node["degraded"] == false
            && node["peer"]["state"] == "connected"
        {
            return running;
        }
        assert!(
            started.elapsed() < RESYNC_LIMIT,
            "no resync done within {RESYNC_LIMIT:?}: {node}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nvmirror cp --wait`, then both processes stopped, then the images compared.
fn finish_and_compare(scratch: &Scratch, pair: &mut Pair) {
    json_of(&nvmirror(&[
        "cp",
        "--wait",
        "--config",
        pair.source_config.to_str().unwrap(),
    ]));
    stop(&mut pair.source, "the source");
    stop(&mut pair.destination, "the destination");
    let primary = read_image(&scratch.path("primary.img"));
    let mirror = read_image(&scratch.path("mirror.img"));
    assert_eq!(primary.len(), mirror.len());
    assert!(
        primary.iter().any(|b| *b != 0),
        "the host wrote nothing to the primary"
    );
    if let Some(first) = (0..primary.len()).find(|&i| primary[i] != mirror[i]) {
        panic!("the mirror differs from the primary first at byte {first}");
    }
}

fn perf(pair: &Pair, seconds: u32) -> Command {
    let mut perf = perf_at(pair.target_port, NQN);
    perf.args([
        "--pattern",
        "randwrite",
        "--io-size",
        "4096",
        "--queue-depth",
        "4",
        "--time-s",
        &seconds.to_string(),
        "--warmup-s",
        "0",
        "--json",
    ]);
    perf
}

fn spawn(mut command: Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The JSON line of a finished perf run (which must have failed no write).
fn perf_result(child: Child) -> Value {
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "perf failed: {stdout}\n{stderr}");
    let json: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(json["errors"], 0, "no write fails: {json}\n{stderr}");
    json
}

#[test]
fn degrade_keeps_writes_completing_while_the_destination_is_frozen_and_resyncs_it_after_sigcont() {
    let scratch = Scratch::new("degrade-sigstop");
    let mut pair = start_pair(&scratch, "degrade");
    let perf = spawn(perf(&pair, 8));
    std::thread::sleep(Duration::from_secs(1));
    signal(&pair.destination, libc::SIGSTOP);
    let frozen = Instant::now();
    let node = wait_degraded(&pair.source_config);
    assert_eq!(node["peer"]["state"], "lost", "{node}");
    assert_eq!(node["peer"]["policy"], "degrade", "{node}");
    assert_ne!(
        node["generations"]["current"], node["generations"]["bitmap_base"],
        "a new generation; the bitmap counts changes since the destination's: {node}"
    );
    // Writes complete while the destination stays frozen.
    let first = counter(
        &source_counters(&pair.source_config),
        "degraded_write_count",
    );
    std::thread::sleep(Duration::from_secs(2));
    let counters = source_counters(&pair.source_config);
    let during = counter(&counters, "degraded_write_count") - first;
    eprintln!("{during} writes completed in 2 s with the destination frozen");
    // The frozen process's kernel still accepts the redials: a Hello nobody answers must not
    // hold the degraded CPs (and so the ring) for a peer timeout per dial. Before handshakes
    // were abandoned, 0 to 760 writes completed here; after, 73,000 to 96,000.
    assert!(
        during > 1000,
        "writes kept completing during the freeze: {counters}"
    );
    assert!(
        counter(&counters, "hello_abandoned_count") >= 1,
        "a redial was accepted and its Hello abandoned: {counters}"
    );
    assert_eq!(counter(&counters, "degrade_count"), 1, "{counters}");
    assert_eq!(counter(&counters, "write_failed_count"), 0, "{counters}");
    let text = String::from_utf8_lossy(
        &nvmirror(&["status", "--config", pair.source_config.to_str().unwrap()]).stdout,
    )
    .into_owned();
    eprintln!("status while frozen:\n{text}");
    assert!(text.contains("DEGRADED"), "{text}");
    assert!(text.contains("bitmap counts changes since"), "{text}");

    signal(&pair.destination, libc::SIGCONT);
    eprintln!("destination frozen for {:?}", frozen.elapsed());
    // The resync runs under the host's writes (the perf run goes on for a few seconds).
    let running = wait_resync_done(&pair.source_config);
    let json = perf_result(perf);
    assert!(json["writes"].as_u64().unwrap() > during, "{json}");
    eprintln!(
        "resync samples: {}",
        running
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let counters = source_counters(&pair.source_config);
    assert_eq!(counter(&counters, "resync_count"), 1, "{counters}");
    assert!(counter(&counters, "resync_bytes_total") > 0, "{counters}");
    assert!(
        counter(&counters, "resync_data_blocks") * 4096 <= counter(&counters, "resync_bytes_total"),
        "the resync sent at most the marked extents as data: {counters}"
    );
    let node = status(&pair.source_config);
    assert_eq!(
        node["generations"]["bitmap_base"], "0000000000000000",
        "the bitmap counts nothing once in sync: {node}"
    );
    assert!(log_text(&pair.source_log).contains("resync done"));
    finish_and_compare(&scratch, &mut pair);
}

#[test]
fn switching_a_suspended_source_to_degrade_releases_the_writes_it_holds() {
    let scratch = Scratch::new("degrade-switch");
    let mut pair = start_pair(&scratch, "suspend");
    signal(&pair.destination, libc::SIGSTOP);
    let perf = spawn(perf(&pair, 4));
    wait_for_log(
        &pair.source_log,
        "destination lost",
        Duration::from_secs(10),
    );
    // Held, not failed, not completed: nothing moves under suspend.
    std::thread::sleep(Duration::from_millis(500));
    let counters = source_counters(&pair.source_config);
    assert_eq!(counter(&counters, "degraded_write_count"), 0, "{counters}");
    assert_eq!(counter(&counters, "write_failed_count"), 0, "{counters}");
    assert!(
        counter(&counters, "host_write_count") > 0,
        "writes came in: {counters}"
    );
    let node = status(&pair.source_config);
    assert_eq!(node["degraded"], false, "{node}");

    let set = json_of(&nvmirror(&[
        "set-policy",
        "degrade",
        "--config",
        pair.source_config.to_str().unwrap(),
    ]));
    assert_eq!(set["policy"], "degrade");
    // The perf run ends and every write it issued completes while the destination is still
    // frozen: the held ones were released, the later ones completed alone.
    let json = perf_result(perf);
    let node = status(&pair.source_config);
    assert_eq!(node["peer"]["state"], "lost", "still frozen: {node}");
    assert_eq!(node["degraded"], true, "{node}");
    let counters = source_counters(&pair.source_config);
    assert_eq!(counter(&counters, "degrade_count"), 1, "{counters}");
    assert_eq!(counter(&counters, "policy_change_count"), 1, "{counters}");
    assert!(
        counter(&counters, "degraded_write_count") >= json["writes"].as_u64().unwrap(),
        "every write of the run completed degraded: {json} {counters}"
    );
    assert!(json["writes"].as_u64().unwrap() > 100, "{json}");

    signal(&pair.destination, libc::SIGCONT);
    wait_resync_done(&pair.source_config);
    finish_and_compare(&scratch, &mut pair);
}

#[test]
fn a_destination_killed_and_restarted_during_the_outage_is_resynced() {
    let scratch = Scratch::new("degrade-restart");
    let mut pair = start_pair(&scratch, "degrade");
    let perf = spawn(perf(&pair, 6));
    std::thread::sleep(Duration::from_secs(1));
    pair.destination.0.kill().unwrap();
    pair.destination.0.wait().unwrap();
    wait_degraded(&pair.source_config);
    std::thread::sleep(Duration::from_secs(1));
    let counters = source_counters(&pair.source_config);
    assert!(
        counter(&counters, "degraded_write_count") > 0,
        "writes complete while the destination is down: {counters}"
    );
    // Back with its file ring and metadata: its generation is the source's bitmap base.
    pair.destination = start_destination(&pair.destination_config);
    let json = perf_result(perf);
    assert!(json["writes"].as_u64().unwrap() > 0, "{json}");
    wait_resync_done(&pair.source_config);
    let counters = source_counters(&pair.source_config);
    assert_eq!(counter(&counters, "degrade_count"), 1, "{counters}");
    assert_eq!(counter(&counters, "resync_count"), 1, "{counters}");
    let log = log_text(&pair.source_log);
    assert!(
        log.contains("the extents changed since it was lost"),
        "a bitmap resync, not a full one: {log}"
    );
    finish_and_compare(&scratch, &mut pair);
}

/// Writes a recognisable pattern over the whole primary image before the pair first starts.
fn fill_primary(scratch: &Scratch) -> Vec<u8> {
    let bytes: Vec<u8> = (0..NAMESPACE_MIB << 20)
        .map(|i| (i / 4096 % 251) as u8 ^ (i % 7) as u8)
        .collect();
    std::fs::write(scratch.path("primary.img"), &bytes).unwrap();
    bytes
}

#[test]
fn a_fresh_pair_over_a_primary_with_data_gets_the_initial_full_sync() {
    let scratch = Scratch::new("degrade-initial");
    let primary = fill_primary(&scratch);
    // No assume_identical: the devices differ, and nothing may be accepted silently.
    let mut pair = start_pair_with(&scratch, "", "");
    let running = wait_resync_done(&pair.source_config);
    eprintln!("{} status samples during the full sync", running.len());
    let counters = source_counters(&pair.source_config);
    assert_eq!(counter(&counters, "resync_count"), 1, "{counters}");
    assert_eq!(
        counter(&counters, "resync_bytes_total"),
        NAMESPACE_MIB << 20,
        "every extent: {counters}"
    );
    assert!(log_text(&pair.source_log).contains("every extent (full sync)"));
    // Host writes after the sync are mirrored as usual.
    let json = perf_result(spawn(perf(&pair, 1)));
    assert!(json["writes"].as_u64().unwrap() > 0, "{json}");
    finish_and_compare(&scratch, &mut pair);
    assert_ne!(
        read_image(&scratch.path("mirror.img")),
        primary,
        "the host's writes are on the mirror too"
    );
}

#[test]
fn a_destination_in_the_middle_of_a_resync_is_not_promoted() {
    let scratch = Scratch::new("degrade-half");
    fill_primary(&scratch);
    // 1 MiB/s: the 16 MiB full sync takes 16 s; the source dies after a few.
    let mut pair = start_pair_with(&scratch, "", "resync_rate_mib_s = 1");
    let started = Instant::now();
    loop {
        let node = status(&pair.source_config);
        if node["resync"]["active"] == true && node["resync"]["bytes_done"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(
            started.elapsed() < RESYNC_LIMIT,
            "no resync progress: {node}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let destination = json_of(&nvmirror(&[
        "status",
        "--config",
        pair.destination_config.to_str().unwrap(),
        "--json",
    ]))["nodes"][0]
        .clone();
    assert_eq!(
        destination["generations"]["resync_target"], true,
        "{destination}"
    );
    pair.source.0.kill().unwrap();
    pair.source.0.wait().unwrap();
    stop(&mut pair.destination, "the destination");
    let promote = nvmirror(&[
        "promote",
        "--config",
        pair.destination_config.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&promote.stderr);
    assert!(
        !promote.status.success(),
        "a half-resynced mirror was promoted"
    );
    assert!(
        stderr.contains("not a consistent image, so it is not promoted"),
        "{stderr}"
    );
}
