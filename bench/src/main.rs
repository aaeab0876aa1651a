//! `nvmirror-perf`: an NVMe/TCP initiator load generator in the spirit of SPDK's spdk_nvme_perf.
//!
//! It brings up a controller over NVMe/TCP ([`controller`]), opens `--connections` I/O queue pairs
//! ([`queue_pair`]), and drives them from one polling thread ([`run`]) with a seeded workload
//! ([`workload`]); verify mode writes self-describing sectors and checks every read ([`verify`]).
//! Output: a table of IOPS, MiB/s and latency quantiles per connection and in total ([`report`]),
//! or one JSON line with `--json`. Exit codes: 0 ok, 1 I/O errors or verify mismatches, 2 bad
//! usage, 3 the target could not be reached or broke the protocol.

mod ack_state;
mod cli;
mod controller;
mod histogram;
mod queue_pair;
mod report;
mod run;
mod status;
mod verify;
mod workload;

use std::process::ExitCode;
use std::time::Duration;

use cli::Args;
use controller::{ConnectOptions, Controller};
use run::{RunConfig, Runner};

const EXIT_IO_ERRORS: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_FAILURE: u8 = 3;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if arguments.first().map(String::as_str) == Some("check-image") {
        return check_image(&arguments[1..]);
    }
    let args = match cli::parse(arguments) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match perf(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_IO_ERRORS),
        Err(message) => {
            eprintln!("nvmirror-perf: {message}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Connects, runs, reports, shuts down. `Ok(false)`: the run finished with errors or mismatches.
fn perf(args: &Args) -> Result<bool, String> {
    if let Some(core) = args.core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            return Err(format!("--core {core}: cannot pin the thread to that core"));
        }
    }
    let options = ConnectOptions {
        address: args.target,
        subnqn: args.subnqn.clone(),
        hostnqn: args.hostnqn.clone(),
        header_digest: args.header_digest,
        data_digest: args.data_digest,
        disable_sq_flow_control: args.disable_sq_flow_control,
    };
    let mut controller = Controller::connect(&options)
        .map_err(|error| format!("cannot attach to {} {}: {error}", args.target, args.subnqn))?;
    let config = plan(args, &mut controller)?;
    let granted = controller
        .set_queue_count(args.connections)
        .map_err(|error| error.to_string())?;
    if granted < args.connections {
        return Err(format!(
            "--connections {}: the controller granted only {granted} I/O queues",
            args.connections
        ));
    }
    let mut queues = Vec::new();
    for qid in 1..=args.connections {
        let queue = controller
            .connect_io_queue(qid, config.queue_depth, config.io_size_bytes)
            .map_err(|e| e.to_string())?;
        queues.push(queue);
    }
    if !args.json {
        let info = controller.info();
        println!(
            "attached to {} {} (cntlid {}, model '{}', serial '{}', in-capsule {} B); \
             {} x QD {} {} {} B, {} blocks, digests h{} d{}",
            args.target,
            args.subnqn,
            info.cntlid,
            info.model,
            info.serial,
            info.in_capsule_bytes_max,
            args.connections,
            config.queue_depth,
            args.pattern.name(),
            args.io_size_bytes,
            config.block_count,
            u8::from(args.header_digest),
            u8::from(args.data_digest)
        );
    }
    let measured = config.measured;
    let (stats, queues) = Runner::new(config, queues)
        .run(&mut controller)
        .map_err(|error| error.to_string())?;
    for queue in queues {
        queue.close();
    }
    controller
        .shutdown()
        .map_err(|error| format!("shutdown: {error}"))?;
    let total = report::Summary::new(&report::total(&stats), measured, args.io_size_bytes);
    if args.json {
        println!("{}", total.json());
    } else {
        println!("{}", report::table(&stats, measured, args.io_size_bytes));
        if args.verify {
            println!("verify: {} mismatches", total.mismatches);
        }
    }
    Ok(total.errors == 0 && total.mismatches == 0)
}

/// Checks the arguments against what the controller and namespace allow; sizes the run.
fn plan(args: &Args, controller: &mut Controller) -> Result<RunConfig, String> {
    let geometry = controller
        .identify_namespace(args.nsid)
        .map_err(|error| format!("namespace {}: {error}", args.nsid))?;
    if geometry.lba_bytes != cli::SECTOR_SIZE_BYTES {
        return Err(format!(
            "namespace {} has {}-byte LBAs; only 512 is supported",
            args.nsid, geometry.lba_bytes
        ));
    }
    let info = controller.info();
    if let Some(limit) = info.transfer_bytes_max {
        if args.io_size_bytes > limit {
            return Err(format!(
                "--io-size {}: above the controller's MDTS limit of {limit} bytes",
                args.io_size_bytes
            ));
        }
    }
    let namespace_bytes = geometry.size_lbas * u64::from(geometry.lba_bytes);
    let range_bytes = args
        .lba_range_bytes
        .unwrap_or(namespace_bytes)
        .min(namespace_bytes);
    let block_count = range_bytes / u64::from(args.io_size_bytes);
    if block_count == 0 {
        return Err(format!(
            "namespace of {namespace_bytes} bytes is smaller than --io-size"
        ));
    }
    if args.verify && block_count > verify::VERIFY_BLOCKS_MAX {
        return Err(format!(
            "--verify covers at most {} I/O blocks; limit the range with --lba-range-bytes",
            verify::VERIFY_BLOCKS_MAX
        ));
    }
    let depth_max = (info.queue_entries_max - 1).min(u32::from(cli::QUEUE_DEPTH_MAX)) as u16;
    if args.queue_depth > depth_max {
        log::warn!(
            "--queue-depth {} lowered to {depth_max} (CAP.MQES)",
            args.queue_depth
        );
    }
    Ok(RunConfig {
        pattern: args.pattern,
        read_percent: args.read_percent,
        nsid: args.nsid,
        io_size_bytes: args.io_size_bytes,
        block_count,
        queue_depth: args.queue_depth.min(depth_max),
        warmup: Duration::from_secs(u64::from(args.warmup_s)),
        measured: Duration::from_secs(u64::from(args.time_s)),
        verify: args.verify,
        ack_state: args.ack_state.clone(),
        seed: args.seed,
        run_id: run_id(args.seed),
    })
}

/// `check-image --ack-state FILE --image PATH`: one JSON line of what the image holds; exit 1 when
/// an acknowledged write is lost, a block is torn or stale.
fn check_image(arguments: &[String]) -> ExitCode {
    let mut state = None;
    let mut image = None;
    let mut iter = arguments.iter();
    while let Some(option) = iter.next() {
        match (option.as_str(), iter.next()) {
            ("--ack-state", Some(path)) => state = Some(std::path::PathBuf::from(path)),
            ("--image", Some(path)) => image = Some(std::path::PathBuf::from(path)),
            _ => {
                eprintln!("usage: nvmirror-perf check-image --ack-state FILE --image PATH");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let (Some(state), Some(image)) = (state, image) else {
        eprintln!("usage: nvmirror-perf check-image --ack-state FILE --image PATH");
        return ExitCode::from(EXIT_USAGE);
    };
    let checked =
        ack_state::AckState::load(&state).and_then(|state| ack_state::check_image(&state, &image));
    match checked {
        Ok(check) => {
            println!("{}", check.json());
            if check.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_IO_ERRORS)
            }
        }
        Err(message) => {
            eprintln!("nvmirror-perf check-image: {message}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// A per-run identifier stamped into verify sectors: data left by any other run fails the check.
fn run_id(seed: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = workload::Rng::new(seed ^ nanos ^ u64::from(std::process::id()) << 32);
    rng.next_u64()
}
