//! Process tests per ring medium (`ring_medium = "hugetlbfs" | "file" | "dax"`): a source killed
//! with SIGKILL after its writes were acknowledged replays its ring at the restart and every
//! acknowledged write is on the primary and the mirror; a medium the machine cannot give is refused
//! at start with the key named.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// Puts the pair's rings on `medium`: `ring_lines` go first in both configs, and a hugetlbfs
/// ring's `hugepage_dir` becomes `hugepage_dir`.
fn set_ring_medium(configs: &[&Path], ring_lines: &str, hugepage_dir: Option<&Path>) {
    for &config in configs {
        let mut text = std::fs::read_to_string(config).unwrap();
        if let Some(dir) = hugepage_dir {
            let line = text
                .lines()
                .find(|line| line.starts_with("hugepage_dir = "))
                .unwrap()
                .to_string();
            text = text.replace(&line, &format!("hugepage_dir = \"{}\"", dir.display()));
        }
        std::fs::write(config, format!("{ring_lines}\n{text}")).unwrap();
    }
}

/// Acknowledged writes of a source killed with SIGKILL are replayed from its ring (on the
/// configured medium) at the restart and reach the primary and the mirror.
fn acknowledged_writes_survive_a_killed_source(
    name: &str,
    ring_lines: &str,
    hugepage_dir: Option<&Path>,
) {
    let scratch = Scratch::new(name);
    // No CP during the run: the acknowledged writes live only in the rings.
    let (destination, source) = write_pair(&scratch, (name, name), 600_000);
    set_ring_medium(&[&destination, &source], ring_lines, hugepage_dir);
    let _destination = start_destination(&destination);
    let ack_log = scratch.path("acked.log");
    let source_log = std::fs::File::create(scratch.path("source.log")).unwrap();
    let mut victim =
        spawn_disjoint_workload(&source, 5, 1_000_000, 0, &ack_log, Stdio::from(source_log));
    wait_for_acks(&ack_log, 300, &mut victim);
    victim.0.kill().unwrap();
    victim.0.wait().unwrap();
    let acked = acked_writes(&ack_log);
    assert!(acked.len() >= 300);
    let log = std::fs::read_to_string(scratch.path("source.log")).unwrap();
    let medium = ring_lines.split('"').nth(1).unwrap();
    assert!(
        log.contains(&format!("ring: 8 MiB on {medium} at ")),
        "the source's ring is not on {medium}:\n{log}"
    );

    let mut sync = Command::new(BIN);
    sync.args(["sync", "--config", source.to_str().unwrap()]);
    let output = run_to_end(sync);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "sync after the kill failed:\n{stderr}"
    );
    assert!(
        stderr.contains("ring replay") && !stderr.contains("ring replay: 0 entries"),
        "the restart must replay the acknowledged entries from its ring:\n{stderr}"
    );
    assert_acked_writes_on(&scratch, "primary.img", 5, &acked);
    assert_acked_writes_on(&scratch, "mirror.img", 5, &acked);
    assert_images_equal(&scratch);
}

#[test]
fn file_ring_keeps_acknowledged_writes_across_a_killed_source() {
    acknowledged_writes_survive_a_killed_source("medium-file", "ring_medium = \"file\"", None);
}

#[test]
fn hugetlbfs_ring_keeps_acknowledged_writes_across_a_killed_source() {
    let Some(mount) = nvmirror_runtime::hugepages::hugetlbfs_mount() else {
        eprintln!("skipped: no hugetlbfs mounted (run hugepages.sh)");
        return;
    };
    // Two 8 MiB rings: four pages each.
    let free = nvmirror_runtime::hugepages::available_hugepages();
    if free < 8 {
        eprintln!(
            "skipped: {free} free hugepages in {}, 8 needed",
            mount.display()
        );
        return;
    }
    // The ring files are named after the volume, so this test's own name keeps them apart.
    let name = format!("medium-huge-{}", std::process::id());
    acknowledged_writes_survive_a_killed_source(&name, "ring_medium = \"hugetlbfs\"", Some(&mount));
    for role in ["source", "destination"] {
        let _ = std::fs::remove_file(mount.join(format!("nvmirror-{name}-{role}.ring")));
    }
}

#[test]
fn dax_ring_keeps_acknowledged_writes_across_a_killed_source() {
    let Ok(dir) = std::env::var("NVMIRROR_DAX_DIR") else {
        eprintln!(
            "skipped: no DAX file system here (set NVMIRROR_DAX_DIR to a directory on one mounted -o dax)"
        );
        return;
    };
    let lines = format!("ring_medium = \"dax\"\nring_dir = \"{dir}\"");
    acknowledged_writes_survive_a_killed_source("medium-dax", &lines, None);
}

#[test]
fn a_dax_ring_on_a_file_system_without_dax_is_refused_at_start() {
    let scratch = Scratch::new("medium-no-dax");
    let (destination, _) = write_pair(&scratch, ("nodax", "nodax"), 10_000);
    let lines = format!(
        "ring_medium = \"dax\"\nring_dir = \"{}\"",
        scratch.0.display()
    );
    set_ring_medium(&[&destination], &lines, None);
    let mut start = Command::new(BIN);
    start.args(["--config", destination.to_str().unwrap()]);
    let output = run_to_end(start);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a dax ring on {} started",
        scratch.0.display()
    );
    assert!(
        stderr.contains("config key 'ring_medium': cannot place the NVRAM ring on dax")
            && stderr.contains("MAP_SYNC")
            && stderr.contains("-o dax"),
        "unclear refusal:\n{stderr}"
    );
}
