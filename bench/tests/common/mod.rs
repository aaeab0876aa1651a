//! Helpers shared by the perf tool's process tests.

use std::process::{Child, Output};
use std::time::{Duration, Instant};

/// How long one nvmirror-perf run may take before the test kills it and fails.
pub const PERF_TIMEOUT: Duration = Duration::from_secs(30);

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
