//! A slow disk under a replicated volume: file namespaces behind `kind = "faulty"` add 2 ms to
//! every primary and mirror op, and NVMe/TCP randwrite at QD32 over two connections still runs
//! far above what a device-synchronous write path allows (2 ms per write caps one queue at 500
//! IOPS): device I/O is an event of the core, never a wait of a reactor (invariant 8). And a
//! mirror that fails every write for a while fails CPs that are sent again on the same link.

mod common;

use std::process::Command;

use common::*;

/// 2 ms on every op of a namespace of `image` (a file of `scratch`).
fn faulty_config(scratch: &Scratch, role: &str, port: u16, image: &str, faults: &str) -> String {
    let address = if role == "source" { "peer" } else { "listen" };
    format!(
        "role = \"{role}\"\nvolume = \"slow\"\n{address} = \"127.0.0.1:{port}\"\n\
         hugepage_dir = \"{dir}\"\nfallback_dir = \"{dir}\"\nring_size_mib = 8\ncp_interval_ms = 200\nrpc_socket = \"{dir}/{role}.sock\"\n\
         metadata_path = \"{dir}/{role}.meta\"\nassume_identical = true\n\
         [[namespace]]\nkind = \"faulty\"\n\
         base = {{ kind = \"file\", path = \"{image}\", size_mib = {NAMESPACE_MIB} }}\n{faults}",
        dir = scratch.0.display(),
        image = scratch.path(image).display(),
    )
}

const DELAY_EVERY_OP: &str =
    "[[namespace.fault]]\nop = \"all\"\naction = \"delay\"\ndelay_us = 2000\n";

/// (IOPS, errors) of each `qid N` row and of the `total` row of nvmirror-perf's table.
fn table_rows(stdout: &str) -> Vec<(String, f64, u64)> {
    stdout
        .lines()
        .filter(|line| line.starts_with("qid ") || line.starts_with("total"))
        .map(|line| {
            let (name, figures) = line.split_at(12);
            let figures: Vec<&str> = figures.split_whitespace().collect();
            let iops = figures[0].parse().unwrap_or_else(|_| panic!("{line}"));
            let errors = figures
                .last()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("{line}"));
            (name.trim().to_string(), iops, errors)
        })
        .collect()
}

#[test]
fn randwrite_on_slow_primary_and_mirror_stays_far_above_a_synchronous_path() {
    let scratch = Scratch::new("slow-disk");
    let port = free_port();
    let target_port = free_port();
    let nqn = "nqn.2026-11.io.nvmirror:slow";
    let destination = scratch.path("destination.toml");
    let text = faulty_config(&scratch, "destination", port, "mirror.img", DELAY_EVERY_OP);
    std::fs::write(&destination, text).unwrap();
    let source = scratch.path("source.toml");
    let mut text = faulty_config(&scratch, "source", port, "primary.img", DELAY_EVERY_OP);
    text.push_str(&target_section(target_port, nqn, "1"));
    std::fs::write(&source, text).unwrap();
    let _destination = start_destination(&destination);
    let source_log = scratch.path("source.log");
    let (_source_process, lines) = start_source(&source, &[], "info", &source_log);
    std::thread::spawn(move || lines.for_each(drop));

    let mut perf = perf_at(target_port, nqn);
    perf.args([
        "--pattern",
        "randwrite",
        "--io-size",
        "4096",
        "--queue-depth",
        "32",
    ]);
    perf.args(["--connections", "2", "--time-s", "3", "--warmup-s", "0"]);
    let output = run_to_end(perf);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "perf failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        std::fs::read_to_string(&source_log).unwrap_or_default()
    );
    let rows = table_rows(&stdout);
    assert_eq!(rows.len(), 3, "two connections and a total:\n{stdout}");
    for (name, iops, errors) in &rows {
        assert_eq!(*errors, 0, "{name} had errors:\n{stdout}");
        assert!(*iops > 0.0, "{name} made no progress:\n{stdout}");
    }
    let total_iops = rows[2].1;
    assert!(
        total_iops > 2_000.0,
        "{total_iops} IOPS: a 2 ms device is on the write path:\n{stdout}"
    );
    let log = std::fs::read_to_string(&source_log).unwrap();
    assert!(
        log.contains("a faulty namespace"),
        "no faults applied:\n{log}"
    );
    eprintln!("slow disk (2 ms per device op), QD32 x 2:\n{stdout}");
}

/// The mirror fails every write for its first 1.5 s: the source sees each CP fail and sends it
/// again over the same link (no reconnect), and once the window closes a CP completes.
#[test]
fn a_failing_mirror_fails_cps_that_are_sent_again_on_the_same_link() {
    let scratch = Scratch::new("failing-mirror");
    let port = free_port();
    let target_port = free_port();
    let nqn = "nqn.2026-11.io.nvmirror:failing";
    let failing = "[[namespace.fault]]\nop = \"write\"\naction = \"fail\"\nevery = 1\n\
                   from_ms = 0\nto_ms = 1500\n";
    let destination = scratch.path("destination.toml");
    let text = faulty_config(&scratch, "destination", port, "mirror.img", failing);
    std::fs::write(&destination, text).unwrap();
    let source = scratch.path("source.toml");
    let mut text = faulty_config(&scratch, "source", port, "primary.img", "");
    text.push_str(&target_section(target_port, nqn, "1"));
    std::fs::write(&source, text).unwrap();
    let _destination = start_destination(&destination);
    let source_log = scratch.path("source.log");
    let (mut source_process, lines) = start_source(
        &source,
        &["--json"],
        "info,nvmirror_runtime::node=debug",
        &source_log,
    );
    let printed = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    let mut perf = perf_at(target_port, nqn);
    perf.args([
        "--pattern",
        "randwrite",
        "--io-size",
        "4096",
        "--queue-depth",
        "4",
    ]);
    perf.args(["--time-s", "1", "--warmup-s", "0"]);
    let output = run_to_end(perf);
    assert!(output.status.success(), "{output:?}");
    // Past the window: the CP sent again now lands.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let pid = source_process.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(source_process.0.wait().unwrap().success());
    let printed = printed.join().unwrap();
    let counters = printed
        .iter()
        .find(|line| line.contains("\"side\":\"source\""))
        .unwrap_or_else(|| panic!("no source counters: {printed:?}"));
    let count = |name: &str| -> u64 {
        let at = counters.find(&format!("\"{name}\":")).unwrap() + name.len() + 3;
        let digits: String = counters[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap()
    };
    let log = std::fs::read_to_string(&source_log).unwrap();
    assert!(
        log.contains("the mirror failed cp") && log.contains("it is sent again"),
        "{log}"
    );
    assert_eq!(
        log.matches("link: connected to").count(),
        1,
        "reconnected:\n{log}"
    );
    assert!(count("cp_failure_count") > 0, "{counters}");
    assert!(
        count("cp_count") > 0,
        "no CP completed after the window: {counters}"
    );
}
