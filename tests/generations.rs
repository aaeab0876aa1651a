//! Generations on real processes (invariant 6): after a promotion the former source is refused
//! as stale, and two nodes that both took a generation since their common one are refused as a
//! split brain, by both sides, every time; a refused source never opens its NVMe/TCP listener.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Scenarios per test (the acceptance: 10 of 10).
const REPEATS: usize = 10;
const NQN: &str = "nqn.2026-11.io.nvmirror:generations";

/// A pair in `scratch` whose source exports both namespaces on `target_port`.
fn pair_with_target(
    scratch: &Scratch,
    volume: &str,
    target_port: u16,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (destination, source) = write_pair(scratch, (volume, volume), 600_000);
    let mut text = std::fs::read_to_string(&source).unwrap();
    text.push_str(&target_section(target_port, NQN, "1, 2"));
    std::fs::write(&source, text).unwrap();
    (destination, source)
}

/// Runs `nvmirror promote` on `config`; returns (new generation, previous one) as printed.
fn promote(config: &std::path::Path) -> (String, String) {
    let mut promote = Command::new(BIN);
    promote.args(["promote", "--config", config.to_str().unwrap()]);
    let output = run_to_end(promote);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "promote failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (_, rest) = stdout
        .split_once("generation is now ")
        .unwrap_or_else(|| panic!("promote said: {stdout}"));
    let new = rest[..16].to_string();
    let (_, was) = rest.split_once("(was ").unwrap();
    (new, was[..16].to_string())
}

fn stop(process: &mut Process) {
    let pid = process.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    process.0.wait().unwrap();
}

/// Runs a source that the handshake must refuse: while it lives, its target port never accepts
/// a connection; it exits with an error and never prints "connect a host". Returns its log.
fn run_refused_source(config: &std::path::Path, target_port: u16, log: &std::path::Path) -> String {
    let mut child = Process(
        Command::new(BIN)
            .args(["--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    let mut probes = 0;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < TEST_TIMEOUT,
            "the refused source never exited"
        );
        let address = format!("127.0.0.1:{target_port}").parse().unwrap();
        assert!(
            TcpStream::connect_timeout(&address, Duration::from_millis(50)).is_err(),
            "the refused source accepted a host connection on its target port"
        );
        probes += 1;
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stdout = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(!status.success(), "a refused source exits with an error");
    assert!(
        !stdout.contains("connect a host"),
        "the refused source told hosts to connect:\n{stdout}"
    );
    let _ = probes;
    std::fs::read_to_string(log).unwrap()
}

/// Starts the pair once so both sides settle on one generation, then (with `writes`) lets a
/// workload on the source leave acknowledged entries newer than the last CP in its ring (it is
/// killed before any CP); returns the generation.
fn settle_pair(
    destination: &std::path::Path,
    source: &std::path::Path,
    scratch: &Scratch,
    writes: bool,
) -> String {
    let mut destination_process = start_destination(destination);
    let log = scratch.path("first-source.log");
    let (mut source_process, _lines) = start_source(source, &[], "info", &log);
    // Serving hosts means the handshake settled: the generation is in the log.
    source_process.0.kill().unwrap();
    source_process.0.wait().unwrap();
    if writes {
        let ack_log = scratch.path("acked.log");
        let mut workload =
            spawn_disjoint_workload(source, 7, 1_000_000, 0, &ack_log, Stdio::null());
        wait_for_acks(&ack_log, 50, &mut workload);
        workload.0.kill().unwrap();
        workload.0.wait().unwrap();
    }
    stop(&mut destination_process);
    // "source: generation <16 hex digits> settled with the destination: serving hosts"
    let text = std::fs::read_to_string(&log).unwrap();
    let at = text
        .find(" settled with the destination")
        .unwrap_or_else(|| {
            panic!(
                "no settled line:
{text}"
            )
        });
    let generation = text[at - 16..at].to_string();
    assert!(
        generation.chars().all(|c| c.is_ascii_hexdigit()),
        "{generation}"
    );
    generation
}

#[test]
fn a_stale_former_source_is_refused_after_a_promotion_and_never_serves_hosts() {
    for round in 0..REPEATS {
        let scratch = Scratch::new(&format!("stale-{round}"));
        let target_port = free_port();
        let (destination, source) = pair_with_target(&scratch, "stale", target_port);
        let common = settle_pair(&destination, &source, &scratch, true);
        // The source is lost; the destination is promoted and takes a new generation.
        let (promoted, was) = promote(&destination);
        assert_eq!(
            was, common,
            "round {round}: promotion moves the pair's generation to the history"
        );
        assert_ne!(promoted, common);
        // The promoted node comes back (here as the destination it was); the old source, restarted,
        // must not serve a host for one moment.
        let _promoted_node = start_destination(&destination);
        let primaries = ["primary.img", "primary.img.2"].map(|image| scratch.path(image));
        let modified = || {
            primaries
                .each_ref()
                .map(|path| std::fs::metadata(path).unwrap().modified().unwrap())
        };
        let before = modified();
        let log = run_refused_source(&source, target_port, &scratch.path("stale-source.log"));
        assert_eq!(
            modified(),
            before,
            "round {round}: the refused source replayed its ring onto its primary"
        );
        assert!(
            log.contains("entries (") && !log.contains(" 0 entries (0 bytes) newer"),
            "round {round}: the ring held entries to replay:\n{log}"
        );
        let destination_log = std::fs::read_to_string(scratch.path("destination.log")).unwrap();
        for (side, text) in [("source", &log), ("destination", &destination_log)] {
            let refused = text
                .lines()
                .find(|line| line.contains("stale source"))
                .unwrap_or_else(|| panic!("round {round}: the {side} did not refuse:\n{text}"));
            assert!(
                refused.contains(&common) && refused.contains(&promoted),
                "round {round}: the {side}'s refusal names both generations: {refused}"
            );
        }
        assert!(!log.contains("serving hosts"), "round {round}:\n{log}");
    }
}

#[test]
fn a_split_brain_is_refused_on_both_sides() {
    for round in 0..REPEATS {
        let scratch = Scratch::new(&format!("split-{round}"));
        let target_port = free_port();
        let (destination, source) = pair_with_target(&scratch, "split", target_port);
        let common = settle_pair(&destination, &source, &scratch, false);
        // Both nodes take a generation of their own since the common one: the destination is
        // promoted, and so is the former source's node (its own metadata and images, opened
        // as a destination with a fresh ring: two operators each failing over to "their" side).
        let (destination_generation, was) = promote(&destination);
        assert_eq!(was, common);
        let source_text = std::fs::read_to_string(&source).unwrap();
        let as_destination = source_text
            .replace("role = \"source\"", "role = \"destination\"")
            .replace("peer = ", "listen = ")
            .split("[target]")
            .next()
            .unwrap()
            .replace(
                &format!("fallback_dir = \"{}\"", scratch.0.display()),
                &format!("fallback_dir = \"{}/other-ring\"", scratch.0.display()),
            )
            .replace(
                &format!("hugepage_dir = \"{}\"", scratch.0.display()),
                &format!("hugepage_dir = \"{}/other-ring\"", scratch.0.display()),
            );
        let other = scratch.path("source-as-destination.toml");
        std::fs::write(&other, as_destination).unwrap();
        let (source_generation, was) = promote(&other);
        assert_eq!(
            was, common,
            "round {round}: the source node's metadata held the common generation"
        );
        let _destination_node = start_destination(&destination);
        let log = run_refused_source(&source, target_port, &scratch.path("split-source.log"));
        let destination_log = std::fs::read_to_string(scratch.path("destination.log")).unwrap();
        for (side, text) in [("source", &log), ("destination", &destination_log)] {
            let refused = text
                .lines()
                .find(|line| line.contains("split brain"))
                .unwrap_or_else(|| panic!("round {round}: the {side} did not refuse:\n{text}"));
            assert!(
                refused.contains(&source_generation)
                    && refused.contains(&destination_generation)
                    && refused.contains(&common),
                "round {round}: the {side}'s refusal names the generations: {refused}"
            );
        }
    }
}

/// A fresh pair now gets the initial full sync (`tests/degrade.rs`); what stays refused is a full
/// sync that would overwrite data: here a source whose metadata is new (it holds no data of the
/// volume) facing a destination that holds a generation.
#[test]
fn a_fresh_pair_without_assume_identical_gets_the_initial_full_sync() {
    let scratch = Scratch::new("full-sync");
    let target_port = free_port();
    let (destination, source) = pair_with_target(&scratch, "fresh", target_port);
    for config in [&destination, &source] {
        let text = std::fs::read_to_string(config).unwrap();
        std::fs::write(config, text.replace("assume_identical = true\n", "")).unwrap();
    }
    // The primaries hold data from before replication (never written through nvmirror).
    let bytes = (NAMESPACE_MIB << 20) as usize;
    for (index, name) in ["primary.img", "primary.img.2"].iter().enumerate() {
        let image: Vec<u8> = (0..bytes)
            .map(|i| ((i / 4096) as u8) ^ (i as u8).wrapping_mul(7) ^ index as u8)
            .collect();
        std::fs::write(scratch.path(name), image).unwrap();
    }
    let mut destination_node = start_destination(&destination);
    let log = scratch.path("fresh-source.log");
    let (mut source_node, _lines) = start_source(&source, &[], "info", &log);
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("resync done")
    {
        assert!(
            started.elapsed() < TEST_TIMEOUT,
            "no full sync: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("every extent (full sync)"), "{text}");
    stop(&mut source_node);
    stop(&mut destination_node);
    assert_images_equal(&scratch);
}

#[test]
fn a_source_without_data_facing_a_destination_with_data_is_refused() {
    let scratch = Scratch::new("no-data");
    let target_port = free_port();
    let (destination, source) = pair_with_target(&scratch, "fresh", target_port);
    let generation = settle_pair(&destination, &source, &scratch, false);
    std::fs::remove_file(scratch.path("source.meta")).unwrap();
    let _destination_node = start_destination(&destination);
    let log = run_refused_source(&source, target_port, &scratch.path("fresh-source.log"));
    assert!(
        log.contains("the source holds no data of this volume")
            && log.contains(&generation)
            && log.contains("a full sync would overwrite the destination's data")
            && log.contains("assume_identical = true"),
        "{log}"
    );
}
