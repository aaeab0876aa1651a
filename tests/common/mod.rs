//! Helpers of the process tests: scratch directories, pair configs, the `nvmirror` binary run,
//! killed and waited for, and checks of acknowledged writes on the images. Each test crate uses a
//! part of them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nvmirror_runtime::workload::{fill_payload, parse_ack_line, PlannedWrite};

pub const BIN: &str = env!("CARGO_BIN_EXE_nvmirror");
pub const NAMESPACE_MIB: u64 = 16;
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A scratch directory removed at the end of the test.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("nvmirror-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed when the test ends, whatever happens.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port for a process that binds it later (not one the kernel may give a `connect` meanwhile).
pub use nvmirror_test_ports::free_port;

pub fn write_config(
    scratch: &Scratch,
    role: &str,
    volume: &str,
    port: u16,
    image: &str,
    cp_interval_ms: u64,
) -> PathBuf {
    let address = if role == "source" { "peer" } else { "listen" };
    let text = format!(
        "role = \"{role}\"\nvolume = \"{volume}\"\n{address} = \"127.0.0.1:{port}\"\n\
         hugepage_dir = \"{dir}\"\nfallback_dir = \"{dir}\"\nring_size_mib = 8\ncp_interval_ms = {cp_interval_ms}\nrpc_socket = \"{dir}/{role}.sock\"\n\
         metadata_path = \"{dir}/{role}.meta\"\n\
         # Fresh zeroed image files: identical by construction, no initial sync.\n\
         assume_identical = true\n\
         [[namespace]]\nkind = \"file\"\npath = \"{image}\"\nsize_mib = {NAMESPACE_MIB}\n\
         [[namespace]]\nkind = \"file\"\npath = \"{image}.2\"\nsize_mib = {NAMESPACE_MIB}\n",
        dir = scratch.0.display(),
        image = scratch.path(image).display(),
    );
    let path = scratch.path(&format!("{role}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The two configs of a pair in `scratch` (file namespaces, one port): (destination, source).
pub fn write_pair(
    scratch: &Scratch,
    volumes: (&str, &str),
    cp_interval_ms: u64,
) -> (PathBuf, PathBuf) {
    let port = free_port();
    let destination = write_config(
        scratch,
        "destination",
        volumes.0,
        port,
        "mirror.img",
        cp_interval_ms,
    );
    let source = write_config(
        scratch,
        "source",
        volumes.1,
        port,
        "primary.img",
        cp_interval_ms,
    );
    (destination, source)
}

pub fn start_destination(config: &Path) -> Process {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_file_name("destination.log"))
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start destination");
    // Wait for its "accepting" line so the source's first dial finds it.
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    reader.read_line(&mut line).unwrap();
    // Keep reading, so the counters it prints when it stops do not hit a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    assert!(
        line.contains("accepting the source"),
        "destination said: {line}"
    );
    Process(child)
}

/// The `[target]` section of a source exporting `namespaces` on 127.0.0.1:`port` to any host.
pub fn target_section(port: u16, nqn: &str, namespaces: &str) -> String {
    format!(
        "[target]\nlisten = [\"127.0.0.1:{port}\"]\ndiscovery_listen = []\n\
         [[target.subsystem]]\nnqn = \"{nqn}\"\nallow_any_host = true\nnamespaces = [{namespaces}]\n"
    )
}

/// Starts a source with `args` after `--config`, logging at `rust_log` into `log`, and waits for
/// its "replicating to" line (and, with a `[target]`, its first "connect a host" line); the rest
/// of its stdout comes back to the caller.
pub fn start_source(
    config: &Path,
    args: &[&str],
    rust_log: &str,
    log: &Path,
) -> (Process, std::io::Lines<BufReader<ChildStdout>>) {
    let mut process = Process(
        Command::new(BIN)
            .args(["--config", config.to_str().unwrap()])
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    let stdout = process.0.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("replicating to"), "source said: {first}");
    // A source with a target opens its listener once the handshake settled its role, and says
    // so with its "connect a host" line.
    if std::fs::read_to_string(config)
        .unwrap()
        .contains("[target]")
    {
        loop {
            let line = lines
                .next()
                .expect("the source exited before serving hosts")
                .unwrap();
            if line.contains("connect a host") {
                break;
            }
        }
    }
    (process, lines)
}

/// `nvmirror-perf` aimed at subsystem `nqn` on 127.0.0.1:`port`; the caller adds the workload.
pub fn perf_at(port: u16, nqn: &str) -> Command {
    let mut perf = Command::new(perf_binary());
    perf.args(["--target", &format!("127.0.0.1:{port}"), "--nqn", nqn]);
    perf
}

/// Runs `command` to its end (at most TEST_TIMEOUT) and collects its output. Both pipes are
/// drained while it runs, so a chatty tool never blocks on a full pipe.
pub fn run_to_end(mut command: Command) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "command timed out; stderr:\n{}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

pub fn read_image(path: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    bytes
}

/// A source process running the disjoint workload (writes never overlap, so each acknowledged
/// one must be found intact), logging every acknowledged write to `ack_log`.
pub fn spawn_disjoint_workload(
    source: &Path,
    seed: u64,
    writes: u64,
    cp_every: u64,
    ack_log: &Path,
    stderr: Stdio,
) -> Process {
    let numbers = [seed.to_string(), writes.to_string(), cp_every.to_string()];
    Process(
        Command::new(BIN)
            .args([
                "workload",
                "--config",
                source.to_str().unwrap(),
                "--pattern",
                "disjoint",
                "--queue-depth",
                "8",
            ])
            .args([
                "--seed",
                &numbers[0],
                "--writes",
                &numbers[1],
                "--cp-every",
                &numbers[2],
            ])
            .args(["--ack-log", ack_log.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    )
}

pub fn acked_count(ack_log: &Path) -> usize {
    std::fs::read_to_string(ack_log)
        .unwrap_or_default()
        .lines()
        .count()
}

/// Waits until `count` writes are acknowledged; the workload must still be running.
pub fn wait_for_acks(ack_log: &Path, count: usize, workload: &mut Process) {
    let started = Instant::now();
    while acked_count(ack_log) < count {
        assert!(
            workload.0.try_wait().unwrap().is_none(),
            "workload exited early"
        );
        assert!(
            started.elapsed() < TEST_TIMEOUT,
            "only {} writes acknowledged in time",
            acked_count(ack_log)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn acked_writes(ack_log: &Path) -> Vec<PlannedWrite> {
    std::fs::read_to_string(ack_log)
        .unwrap()
        .lines()
        .filter_map(parse_ack_line)
        .collect()
}

/// Every acknowledged write's payload is on the two namespace images named `image` and `image.2`.
pub fn assert_acked_writes_on(scratch: &Scratch, image: &str, seed: u64, acked: &[PlannedWrite]) {
    let images = [
        read_image(&scratch.path(image)),
        read_image(&scratch.path(&format!("{image}.2"))),
    ];
    for write in acked {
        let bytes = &images[write.nsid as usize - 1];
        let offset = (write.lba * 512) as usize;
        let mut expected = vec![0u8; write.length_bytes as usize];
        fill_payload(seed, write.index, &mut expected);
        assert!(
            bytes[offset..offset + expected.len()] == expected[..],
            "acknowledged write {write:?} is not on {image}"
        );
    }
}

pub fn assert_images_equal(scratch: &Scratch) {
    for suffix in ["", ".2"] {
        let primary = read_image(&scratch.path(&format!("primary.img{suffix}")));
        let mirror = read_image(&scratch.path(&format!("mirror.img{suffix}")));
        assert_eq!(primary.len(), mirror.len());
        if let Some(first) = (0..primary.len()).find(|i| primary[*i] != mirror[*i]) {
            panic!("namespace{suffix}: mirror differs from primary first at byte {first}");
        }
        assert!(
            primary.iter().any(|b| *b != 0),
            "the workload wrote nothing to primary.img{suffix}"
        );
    }
}

/// The perf tool of this workspace (built beside `nvmirror` by `cargo test --workspace`).
pub fn perf_binary() -> PathBuf {
    let path = Path::new(BIN).with_file_name("nvmirror-perf");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}
