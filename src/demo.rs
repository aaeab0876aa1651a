//! `nvmirror demo`: the seeded workload through the embedded pair, consistency points on the way, then
//! the mirror checked against the primary byte for byte and the counters that show what references
//! saved on the wire (claims 1, 7, 13).

use std::sync::atomic::Ordering;

use nvmirror_engine::device::BlockDevice;
use nvmirror_engine::geometry::BLOCK_SIZE;
use nvmirror_runtime::bdev::read_waiting;
use nvmirror_runtime::node::{DestinationNode, FrontEnd, SourceNode};
use nvmirror_runtime::remote::QueuePairHosts;
use nvmirror_runtime::workload::{Pattern, Planner, Workload};

use crate::config::CpModeConfig;
use crate::embedded::{embedded_configs, EmbeddedPair, EMBEDDED_NAMESPACE_MIB};
use crate::{serve, setup, Options};

pub struct DemoOptions {
    seed: u64,
    writes: u64,
    pattern: Pattern,
    mode: CpModeConfig,
    queue_depth: usize,
    cp_every_writes: u64,
    cores: Vec<usize>,
    json: bool,
}

impl DemoOptions {
    pub fn from(options: &mut Options) -> Result<DemoOptions, String> {
        let demo = DemoOptions {
            seed: options.number("--seed", 1)?,
            writes: options.number("--writes", 20_000)?,
            pattern: options
                .value("--pattern")?
                .as_deref()
                .unwrap_or("mixed")
                .parse()?,
            mode: match options.value("--mode")?.as_deref().unwrap_or("references") {
                "references" => CpModeConfig::References,
                "naive" => CpModeConfig::Naive,
                other => return Err(format!("--mode: '{other}' is not references or naive")),
            },
            queue_depth: options.number("--queue-depth", 32)? as usize,
            cp_every_writes: options.number("--cp-every", 4000)?,
            cores: options.cores()?,
            json: options.flag("--json"),
        };
        options.finish()?;
        if demo.queue_depth == 0 || demo.queue_depth > nvmirror_runtime::workload::QUEUE_DEPTH_MAX {
            return Err(format!(
                "--queue-depth must be 1..={}",
                nvmirror_runtime::workload::QUEUE_DEPTH_MAX
            ));
        }
        Ok(demo)
    }
}

/// `nvmirror demo`: the seeded workload through the embedded pair, then counters and a byte-for-byte check.
pub fn run_demo(options: DemoOptions) -> Result<(), String> {
    let stop = crate::serve::signals()?.stop;
    let (source_config, destination_config) = embedded_configs(options.mode, &options.cores);
    let sizes = vec![EMBEDDED_NAMESPACE_MIB << 20; source_config.namespaces.len()];
    let (seed, writes, queue_depth, cp_every, pattern) = (
        options.seed,
        options.writes,
        options.queue_depth,
        options.cp_every_writes,
        options.pattern,
    );
    let started = std::time::Instant::now();
    let hosts = QueuePairHosts::default();
    let pair = EmbeddedPair::start((source_config, destination_config), &hosts, move |_| {
        Ok(Workload::new(
            Planner::new(pattern, seed, sizes),
            seed,
            queue_depth,
            writes,
            cp_every,
        ))
    })?;
    let control = pair.source_control.clone();
    setup::wait_until(&control, &stop, || control.synced.load(Ordering::Acquire))?;
    let elapsed = started.elapsed();
    let (source, destination) = pair.stop()?;
    let counters = *source.volume.source.counters();
    let destination_counters = *destination.destination.counters();
    let wire_bytes = source.link.counters.bytes_sent + source.link.counters.bytes_received;
    let equal = compare_images(source, destination)?;
    let host_bytes = counters.host_bytes_written.max(1);
    let ratio = wire_bytes as f64 / host_bytes as f64;
    if options.json {
        println!(
            "{{\"pattern\":\"{:?}\",\"mode\":\"{:?}\",\"seed\":{},\"writes\":{},\"host_bytes\":{},\"wire_bytes\":{},\"wire_per_host_byte\":{:.4},\"mirror_equals_primary\":{},\"seconds\":{:.3},\"source\":{},\"destination\":{}}}",
            options.pattern, options.mode, options.seed, options.writes, counters.host_bytes_written, wire_bytes, ratio,
            equal, elapsed.as_secs_f64(), counters.to_json(), destination_counters.to_json()
        );
    } else {
        println!(
            "nvmirror demo: {} {:?} writes (seed {}), CP mode {:?}, queue depth {}, {:.2} s",
            options.writes,
            options.pattern,
            options.seed,
            options.mode,
            options.queue_depth,
            elapsed.as_secs_f64()
        );
        serve::print_counters("source", &counters, false);
        serve::print_counters("destination", &destination_counters, false);
        println!("--- summary ---");
        println!(
            "host bytes written          {}",
            counters.host_bytes_written
        );
        println!("replication wire bytes      {wire_bytes} (both directions, all messages)");
        println!("wire bytes per host byte    {ratio:.4}");
        println!(
            "bytes saved by references   {}",
            counters.bytes_saved_by_references
        );
        println!(
            "mirror equals primary       {}",
            if equal { "yes" } else { "NO" }
        );
    }
    if !equal {
        return Err("the destination mirror differs from the source primary".into());
    }
    Ok(())
}

/// Compares every namespace of the source's primary with the destination's mirror.
fn compare_images(
    source: SourceNode<impl FrontEnd>,
    destination: DestinationNode,
) -> Result<bool, String> {
    const CHUNK_BYTES: usize = 256 * BLOCK_SIZE;
    let (_, mut primaries) = source.volume.into_parts();
    let mut mirrors = destination.mirrors;
    let mut primary = vec![0u8; CHUNK_BYTES];
    let mut mirror = vec![0u8; CHUNK_BYTES];
    for (index, (primary_device, mirror_device)) in
        primaries.iter_mut().zip(mirrors.iter_mut()).enumerate()
    {
        let size_bytes = primary_device.size_bytes();
        let mut offset = 0u64;
        while offset < size_bytes {
            let length = CHUNK_BYTES.min((size_bytes - offset) as usize);
            read_waiting(primary_device.as_mut(), offset, &mut primary[..length])
                .map_err(|e| format!("primary read: {e}"))?;
            read_waiting(mirror_device.as_mut(), offset, &mut mirror[..length])
                .map_err(|e| format!("mirror read: {e}"))?;
            if primary[..length] != mirror[..length] {
                let first = (0..length).find(|i| primary[*i] != mirror[*i]).unwrap_or(0);
                log::error!(
                    "namespace {}: mirror differs from primary at byte {}",
                    index + 1,
                    offset + first as u64
                );
                return Ok(false);
            }
            offset += length as u64;
        }
    }
    Ok(true)
}
