//! What the long-running commands share: the signal flags, the loop that serves until a signal
//! stops it, and the lines they print (how to reach the target, the counters).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nvmirror_engine::counters::Counters;
use nvmirror_runtime::node::{Command, NodeControl};

use crate::config::Config;

/// Flags set by signals: SIGINT/SIGTERM stop, SIGUSR1 prints the counters, SIGUSR2 starts a CP.
pub struct Signals {
    pub stop: Arc<AtomicBool>,
    pub report: Arc<AtomicBool>,
    pub cp: Arc<AtomicBool>,
}

pub fn signals() -> Result<Signals, String> {
    let flags = Signals {
        stop: Arc::new(AtomicBool::new(false)),
        report: Arc::new(AtomicBool::new(false)),
        cp: Arc::new(AtomicBool::new(false)),
    };
    let register = |signal, flag: &Arc<AtomicBool>| {
        signal_hook::flag::register(signal, flag.clone())
            .map_err(|e| format!("signal handler: {e}"))
    };
    register(signal_hook::consts::SIGINT, &flags.stop)?;
    register(signal_hook::consts::SIGTERM, &flags.stop)?;
    register(signal_hook::consts::SIGUSR1, &flags.report)?;
    register(signal_hook::consts::SIGUSR2, &flags.cp)?;
    Ok(flags)
}

/// How long a stopping source waits for its last CP.
pub const FINAL_CP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs until SIGINT/SIGTERM, printing counters on SIGUSR1. A source whose destination refuses
/// the link for good (another volume, version or geometry; stale, split or unsynced generations)
/// stops with that reason.
/// Why serving ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// A signal stopped it.
    Stopped,
    /// The operator promoted the destination (`nvmirror_promote`).
    Promote,
}

pub fn serve_until_stopped(
    controls: &[crate::manage::Node],
    source: Option<&NodeControl>,
    signals: &Signals,
    json: bool,
) -> Result<Served, String> {
    while !signals.stop.load(Ordering::Acquire) {
        if controls
            .iter()
            .any(|(_, control, _)| control.promote_requested.load(Ordering::Acquire))
        {
            return Ok(Served::Promote);
        }
        if signals.cp.swap(false, Ordering::AcqRel) {
            match source {
                Some(control) => control.send(Command::RequestCp)?,
                None => log::warn!("SIGUSR2: only a source starts consistency points"),
            }
        }
        if let Some(reason) = source.and_then(|control| control.rejected.lock().unwrap().clone()) {
            return Err(format!("replication stopped: {reason}"));
        }
        if signals.report.swap(false, Ordering::AcqRel) {
            for (_, _, commands) in controls {
                if let Err(e) = commands.send(Command::PublishCounters) {
                    log::warn!("{e}");
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            for (side, control, _) in controls {
                if let Some(counters) = control.counters.lock().unwrap().as_ref() {
                    print_counters(side, counters, json);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(Served::Stopped)
}

/// Prints a side's counters. A closed standard output (the reader went away) must not turn a
/// clean shutdown into a panic, so write errors are ignored here.
pub fn print_counters(side: &str, counters: &Counters, json: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = if json {
        writeln!(
            out,
            "{{\"side\":\"{side}\",\"counters\":{}}}",
            counters.to_json()
        )
    } else {
        writeln!(
            out,
            "--- {side} counters ---\n{}",
            counters.to_text().trim_end()
        )
    };
}

/// What a user types to reach the target: `nvme connect` and SPDK's perf, the latter on a core
/// none of `reactor_cores` polls.
pub fn print_connect_lines(config: &Config, reactor_cores: &[usize]) {
    let Some(target) = &config.target else {
        return;
    };
    let cpus = crate::cores::CpuSet::of_this_process();
    for subsystem in &target.subsystems {
        for listener in &target.listen {
            println!(
                "  connect a host: nvme connect -t tcp -a {} -s {} -n {}",
                listener.ip(),
                listener.port(),
                subsystem.nqn
            );
            println!(
                "  benchmark:      {}",
                perf_line(listener, &subsystem.nqn, &cpus, reactor_cores)
            );
        }
    }
    for discovery in &target.discovery_listen {
        println!(
            "  discovery:      nvme discover -t tcp -a {} -s {}",
            discovery.ip(),
            discovery.port()
        );
    }
}

/// The `spdk_nvme_perf` line for one listener. Without `-c` SPDK runs on core 0, which is the
/// default reactor's: both poll one core and perf measures a quarter of the target. So the line
/// names the first core no reactor uses, or, when every core has one, the last core, and says so.
fn perf_line(
    listener: &std::net::SocketAddr,
    nqn: &str,
    cpus: &crate::cores::CpuSet,
    reactor_cores: &[usize],
) -> String {
    let (core, note) = match cpus.first_unused(reactor_cores) {
        Some(core) => (core, String::new()),
        None => {
            let core = *cpus.online.last().expect("at least one core is online");
            (
                core,
                format!(
                    "   # every core runs a reactor: perf shares core {core} with one, and both slow down"
                ),
            )
        }
    };
    format!(
        "spdk_nvme_perf -c {} -r 'trtype:TCP adrfam:IPv4 traddr:{} trsvcid:{} subnqn:{nqn}' -q 32 -o 4096 -w randwrite -t 10{note}",
        crate::cores::spdk_core_mask(core),
        listener.ip(),
        listener.port(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_cores() -> crate::cores::CpuSet {
        crate::cores::CpuSet {
            online: vec![0, 1],
            allowed: vec![0, 1],
        }
    }

    #[test]
    fn perf_runs_on_a_core_no_reactor_uses() {
        let listener = "127.0.0.1:4420".parse().unwrap();
        let line = perf_line(&listener, NQN, &two_cores(), &[0]);
        assert!(line.starts_with("spdk_nvme_perf -c 0x2 -r 'trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.2026-11.io.nvmirror:vol0'"), "{line}");
        assert!(!line.contains('#'), "{line}");
        let line = perf_line(&listener, NQN, &two_cores(), &[1]);
        assert!(line.starts_with("spdk_nvme_perf -c 0x1 "), "{line}");
    }

    #[test]
    fn perf_on_a_reactor_core_says_so() {
        let listener = "127.0.0.1:4420".parse().unwrap();
        let line = perf_line(&listener, NQN, &two_cores(), &[0, 1]);
        assert!(line.starts_with("spdk_nvme_perf -c 0x2 "), "{line}");
        assert!(
            line.ends_with(
                "# every core runs a reactor: perf shares core 1 with one, and both slow down"
            ),
            "{line}"
        );
    }

    const NQN: &str = crate::config::NQN_DEFAULT;
}
