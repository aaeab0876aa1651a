//! `nvmirror workload` and `nvmirror sync`: one source process driving the seeded workload (or
//! none) until every write is durable on both sides; what the process tests kill and restart.

use std::sync::atomic::Ordering;

use nvmirror_runtime::node::SourceEngine;
use nvmirror_runtime::workload::{Pattern, Planner, Workload};

use crate::config::{Config, Role};
use crate::{serve, setup, Options};

/// `nvmirror workload` / `nvmirror sync`: one source process with the seeded workload (or none),
/// exiting 0 once everything it wrote is durable on both sides.
pub fn run_workload(options: &mut Options, sync_only: bool) -> Result<(), String> {
    let path = options.required("--config")?;
    let seed = options.number("--seed", 1)?;
    let writes = if sync_only {
        0
    } else {
        options.number("--writes", 10_000)?
    };
    let pattern: Pattern = options
        .value("--pattern")?
        .as_deref()
        .unwrap_or("mixed")
        .parse()?;
    let queue_depth = options.number("--queue-depth", 16)? as usize;
    let cp_every = options.number("--cp-every", 2000)?;
    let ack_log = options.value("--ack-log")?;
    let json = options.flag("--json");
    options.finish()?;
    let config = Config::load(&path).map_err(|e| e.to_string())?;
    if config.role != Role::Source {
        return Err(format!(
            "{}: role must be source for this command",
            path.display()
        ));
    }
    let stop = crate::serve::signals()?.stop;
    let running = setup::spawn_source(config, move |source: &SourceEngine| {
        let mut workload = Workload::new(
            Planner::new(pattern, seed, source.namespace_sizes_bytes().to_vec()),
            seed,
            queue_depth,
            writes,
            cp_every,
        );
        if let Some(path) = ack_log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("--ack-log {path}: {e}"))?;
            workload = workload.with_ack_log(Box::new(std::io::BufWriter::new(file)));
        }
        Ok(workload)
    })?;
    let control = running.control.clone();
    setup::wait_until(&control, &stop, || control.synced.load(Ordering::Acquire))?;
    let node = running.stop()?;
    serve::print_counters("source", node.volume.source.counters(), json);
    Ok(())
}
