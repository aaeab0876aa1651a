//! Helpers shared by the perf tool's process tests.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, built by Cargo for these tests.
const PERF: &str = env!("CARGO_BIN_EXE_nvmirror-perf");
/// How long one nvmirror-perf run may take before the test kills it and fails.
pub const PERF_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the perf binary with `args`, its stdout and stderr piped.
pub fn spawn_perf(args: &[&str]) -> Child {
    Command::new(PERF)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs the perf binary with `args` to the end, killing it (and failing) after [`PERF_TIMEOUT`].
pub fn perf(args: &[&str]) -> Output {
    finish(spawn_perf(args))
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a `--json` run succeeded with I/O done, no errors or verify mismatches, and sane
/// latency quantiles; returns its JSON line.
pub fn assert_clean_run(output: &Output, what: &str) -> String {
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{what}: {stdout}\n{}",
        text(&output.stderr)
    );
    let json = stdout.lines().last().unwrap().to_string();
    assert!(json_number(&json, "ios") > 0.0, "{what}: {json}");
    assert!(json_number(&json, "iops") > 0.0, "{what}: {json}");
    assert_eq!(json_number(&json, "errors"), 0.0, "{what}: {json}");
    assert_eq!(
        json_number(&json, "verify_mismatches"),
        0.0,
        "{what}: {json}"
    );
    assert!(
        json_number(&json, "lat_us_p50") <= json_number(&json, "lat_us_p999"),
        "{what}: {json}"
    );
    json
}

/// Waits for the perf process, killing it (and failing) after [`PERF_TIMEOUT`].
pub fn finish(mut child: Child) -> Output {
    let deadline = Instant::now() + PERF_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!(
                "nvmirror-perf did not finish within {PERF_TIMEOUT:?}: {:?}",
                child.wait_with_output()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The value of `"key":number` in the JSON line.
pub fn json_number(json: &str, key: &str) -> f64 {
    let pattern = format!("\"{key}\":");
    let start = json
        .find(&pattern)
        .unwrap_or_else(|| panic!("{key} missing in {json}"))
        + pattern.len();
    let end = json[start..].find([',', '}']).unwrap() + start;
    json[start..end].parse().unwrap()
}
