//! Process tests of core selection: `--cores` and `cores = [...]` are judged against the machine's
//! online cores, not against the affinity mask `taskset` gives the process; a core outside the mask
//! is reported as such at start.

mod common;

use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use common::*;

/// The embedded pair's rings on hugetlbfs have fixed names (`TMPDIR` moves only the fallback
/// ones): one embedded pair of this crate at a time.
fn one_embedded_pair_at_a_time() -> MutexGuard<'static, ()> {
    static EMBEDDED: Mutex<()> = Mutex::new(());
    EMBEDDED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `nvmirror ARGS` under `taskset -c MASK`, or `None` (the test says why and skips) when this
/// machine has no `taskset` or fewer than two cores. `TMPDIR` is the test's own, so the embedded
/// pairs of tests running at once keep their ring files apart.
fn under_taskset(scratch: &Scratch, mask: &str, args: &[&str]) -> Option<std::process::Output> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 || Command::new("taskset").arg("-V").output().is_err() {
        eprintln!("skipped: needs taskset and two cores (this machine has {cores})");
        return None;
    }
    let mut command = Command::new("taskset");
    command.args(["-c", mask, BIN]).args(args);
    command.env("TMPDIR", &scratch.0);
    Some(run_to_end(command))
}

#[test]
fn the_only_core_of_the_affinity_mask_is_accepted_for_cores() {
    let _embedded = one_embedded_pair_at_a_time();
    let scratch = Scratch::new("cores-mask");
    let args = ["demo", "--cores", "1", "--writes", "200"];
    let Some(output) = under_taskset(&scratch, "1", &args) else {
        return;
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("core 1 does not exist"), "{stderr}");
    assert!(!stderr.contains("affinity mask"), "{stderr}");
}

#[test]
fn a_core_outside_the_affinity_mask_is_reported_at_start_not_called_missing() {
    let _embedded = one_embedded_pair_at_a_time();
    let scratch = Scratch::new("cores-outside");
    let args = ["demo", "--cores", "0", "--writes", "200"];
    let Some(output) = under_taskset(&scratch, "1", &args) else {
        return;
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("core 0 is online but outside this process's CPU affinity mask (1"),
        "{stderr}"
    );
}

#[test]
fn a_config_core_in_the_affinity_mask_is_accepted_and_a_missing_one_refused() {
    let scratch = Scratch::new("cores");
    let (destination, _) = write_pair(&scratch, ("cores", "cores"), 10_000);
    let text = std::fs::read_to_string(&destination).unwrap();
    std::fs::write(&destination, format!("cores = [1]\n{text}")).unwrap();
    // `promote` loads the config, opens the destination's (new) ring and log, and exits.
    let config = destination.to_str().unwrap();
    let Some(output) = under_taskset(&scratch, "1", &["promote", "--config", config]) else {
        return;
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");

    std::fs::write(&destination, format!("cores = [4096]\n{text}")).unwrap();
    let mut promote = Command::new(BIN);
    promote.args(["promote", "--config", config]);
    let output = run_to_end(promote);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("config key 'cores': core 4096 does not exist (online cores: "),
        "{stderr}"
    );
}

/// The embedded default's reactor polls core 0, where SPDK tools run unless told otherwise: the
/// `spdk_nvme_perf` line it prints must put perf on another core.
#[test]
fn the_printed_perf_line_keeps_perf_off_the_reactor_core() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: one core, perf cannot avoid the reactor");
        return;
    }
    let _embedded = one_embedded_pair_at_a_time();
    let scratch = Scratch::new("cores-perf");
    let listen = format!("127.0.0.1:{}", free_port());
    let discovery = format!("127.0.0.1:{}", free_port());
    let mut embedded = Process(
        Command::new(BIN)
            .args(["--listen", &listen, "--discovery-listen", &discovery])
            .env("TMPDIR", &scratch.0)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = std::io::BufReader::new(embedded.0.stdout.take().unwrap());
    let line = std::io::BufRead::lines(stdout)
        .map(Result::unwrap)
        .find(|line| line.contains("spdk_nvme_perf"))
        .expect("the embedded default prints a perf line");
    assert!(line.contains("spdk_nvme_perf -c 0x2 -r "), "{line}");
    assert!(
        line.contains(&format!("trsvcid:{}", &listen[10..])),
        "{line}"
    );
}
