//! Command line of `nvmirror-perf`, hand-parsed into [`Args`].
//!
//! The options follow SPDK's spdk_nvme_perf in spirit (queue depth, I/O size, pattern, time) with
//! the target given as `--target ADDR:PORT --nqn NQN`. Every value is checked here, so a bad
//! option fails before any connection is made.

use std::net::SocketAddr;

use nvmirror_nvmf::config::NQN_BYTES_MAX;

/// Largest I/O the tool issues (the target's MDTS may lower it further at connect time).
pub const IO_SIZE_BYTES_MAX: u32 = 1 << 20;
/// The LBA size the tool works in (the namespace's format must match).
pub const SECTOR_SIZE_BYTES: u32 = 512;
/// Largest queue depth per connection (the target's CAP.MQES may lower it).
pub const QUEUE_DEPTH_MAX: u16 = 1024;
/// Largest number of I/O connections (queue pairs) one run opens.
pub const CONNECTIONS_MAX: u16 = 64;
/// Host NQN used when `--hostnqn` is not given.
pub const HOSTNQN_DEFAULT: &str =
    "nqn.2014-08.org.nvmexpress:uuid:6e766d69-7272-6f72-2d70-657266000001";

const _: () = assert!(IO_SIZE_BYTES_MAX.is_multiple_of(SECTOR_SIZE_BYTES));
const _: () = assert!(QUEUE_DEPTH_MAX < u16::MAX / 2);

/// The access pattern of the measured phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Read,
    Write,
    RandRead,
    RandWrite,
    /// Sequential mix of reads and writes, `read_percent` of them reads.
    ReadWrite,
    /// Random mix of reads and writes, `read_percent` of them reads.
    RandReadWrite,
}

impl Pattern {
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Pattern::RandRead | Pattern::RandWrite | Pattern::RandReadWrite
        )
    }

    pub fn writes(self) -> bool {
        !matches!(self, Pattern::Read | Pattern::RandRead)
    }

    /// Percentage of reads given the `--read-percent` option (used only by the mixed patterns).
    pub fn read_percent(self, mixed_read_percent: u8) -> u8 {
        match self {
            Pattern::Read | Pattern::RandRead => 100,
            Pattern::Write | Pattern::RandWrite => 0,
            Pattern::ReadWrite | Pattern::RandReadWrite => mixed_read_percent,
        }
    }

    fn parse(text: &str) -> Option<Pattern> {
        Some(match text {
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "rw" => Pattern::ReadWrite,
            "randrw" => Pattern::RandReadWrite,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::ReadWrite => "rw",
            Pattern::RandReadWrite => "randrw",
        }
    }
}

/// Everything a run needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub target: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    pub queue_depth: u16,
    pub io_size_bytes: u32,
    pub pattern: Pattern,
    pub read_percent: u8,
    pub time_s: u32,
    pub warmup_s: u32,
    pub connections: u16,
    pub nsid: u32,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Connect CATTR "disable SQ flow control": lets the target complete reads with C2HData SUCCESS.
    pub disable_sq_flow_control: bool,
    pub verify: bool,
    pub seed: u64,
    pub core: Option<usize>,
    pub json: bool,
    /// Limit of the LBA range exercised, from LBA 0; `None` = the whole namespace.
    pub lba_range_bytes: Option<u64>,
    /// Verify mode: where to write, when the run ends for any reason (a killed target
    /// included), what was acknowledged per block (see `ack_state.rs`).
    pub ack_state: Option<std::path::PathBuf>,
}

pub const USAGE: &str =
    "usage: nvmirror-perf --target ADDR:PORT --nqn NQN [--hostnqn NQN] [--queue-depth 32]
  [--io-size 4096] [--pattern read|write|randread|randwrite|rw|randrw] [--read-percent 70]
  [--time-s 10] [--warmup-s 1] [--connections 1] [--nsid 1] [--header-digest] [--data-digest]
  [--disable-sq-flow-control] [--verify [--ack-state FILE]] [--seed N] [--core N] [--json]
  [--lba-range-bytes N]
       nvmirror-perf check-image --ack-state FILE --image PATH
  (an image of the namespace holds every acknowledged write of the run, none older, none torn)";

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(arguments: I) -> Result<Args, String> {
    let mut target = None;
    let mut subnqn = None;
    let mut args = Args {
        target: SocketAddr::from(([127, 0, 0, 1], 4420)),
        subnqn: String::new(),
        hostnqn: HOSTNQN_DEFAULT.to_string(),
        queue_depth: 32,
        io_size_bytes: 4096,
        pattern: Pattern::RandWrite,
        read_percent: 70,
        time_s: 10,
        warmup_s: 1,
        connections: 1,
        nsid: 1,
        header_digest: false,
        data_digest: false,
        disable_sq_flow_control: false,
        verify: false,
        seed: 1,
        core: None,
        json: false,
        lba_range_bytes: None,
        ack_state: None,
    };
    let mut iter = arguments.into_iter();
    while let Some(option) = iter.next() {
        let mut value = |name: &str| iter.next().ok_or_else(|| format!("{name} needs a value"));
        match option.as_str() {
            "--target" => {
                let text = value("--target")?;
                let address = text
                    .parse()
                    .map_err(|e| format!("--target {text}: {e} (want ADDR:PORT)"))?;
                target = Some(address);
            }
            "--nqn" => subnqn = Some(value("--nqn")?),
            "--hostnqn" => args.hostnqn = value("--hostnqn")?,
            "--queue-depth" => {
                args.queue_depth = number("--queue-depth", &value("--queue-depth")?)?
            }
            "--io-size" => args.io_size_bytes = number("--io-size", &value("--io-size")?)?,
            "--pattern" => {
                let text = value("--pattern")?;
                args.pattern = Pattern::parse(&text)
                    .ok_or_else(|| format!("--pattern {text}: unknown pattern"))?;
            }
            "--read-percent" => {
                args.read_percent = number("--read-percent", &value("--read-percent")?)?
            }
            "--time-s" => args.time_s = number("--time-s", &value("--time-s")?)?,
            "--warmup-s" => args.warmup_s = number("--warmup-s", &value("--warmup-s")?)?,
            "--connections" => {
                args.connections = number("--connections", &value("--connections")?)?
            }
            "--nsid" => args.nsid = number("--nsid", &value("--nsid")?)?,
            "--header-digest" => args.header_digest = true,
            "--data-digest" => args.data_digest = true,
            "--disable-sq-flow-control" => args.disable_sq_flow_control = true,
            "--verify" => args.verify = true,
            "--seed" => args.seed = number("--seed", &value("--seed")?)?,
            "--core" => args.core = Some(number("--core", &value("--core")?)?),
            "--json" => args.json = true,
            "--lba-range-bytes" => {
                args.lba_range_bytes =
                    Some(number("--lba-range-bytes", &value("--lba-range-bytes")?)?)
            }
            "--ack-state" => args.ack_state = Some(value("--ack-state")?.into()),
            "--help" | "-h" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    args.target = target.ok_or_else(|| format!("--target is required\n{USAGE}"))?;
    args.subnqn = subnqn.ok_or_else(|| format!("--nqn is required\n{USAGE}"))?;
    validate(&args)?;
    Ok(args)
}

fn number<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|e| format!("{name} {text}: {e}"))
}

fn validate(args: &Args) -> Result<(), String> {
    if args.queue_depth == 0 || args.queue_depth > QUEUE_DEPTH_MAX {
        return Err(format!(
            "--queue-depth {}: must be 1..={QUEUE_DEPTH_MAX}",
            args.queue_depth
        ));
    }
    let io_size = args.io_size_bytes;
    if io_size == 0 || io_size > IO_SIZE_BYTES_MAX || !io_size.is_multiple_of(SECTOR_SIZE_BYTES) {
        return Err(format!(
            "--io-size {io_size}: must be a multiple of {SECTOR_SIZE_BYTES} in 1..={IO_SIZE_BYTES_MAX}"
        ));
    }
    if args.read_percent > 100 {
        return Err(format!(
            "--read-percent {}: must be 0..=100",
            args.read_percent
        ));
    }
    if args.time_s == 0 {
        return Err("--time-s 0: must be at least 1".to_string());
    }
    if args.connections == 0 || args.connections > CONNECTIONS_MAX {
        return Err(format!(
            "--connections {}: must be 1..={CONNECTIONS_MAX}",
            args.connections
        ));
    }
    if args.nsid == 0 || args.nsid == u32::MAX {
        return Err(format!("--nsid {}: not a valid namespace ID", args.nsid));
    }
    if args.subnqn.is_empty()
        || args.subnqn.len() > NQN_BYTES_MAX
        || args.hostnqn.is_empty()
        || args.hostnqn.len() > NQN_BYTES_MAX
    {
        return Err(format!(
            "--nqn/--hostnqn: must be 1..={NQN_BYTES_MAX} bytes"
        ));
    }
    if args.ack_state.is_some() && !args.verify {
        return Err(
            "--ack-state needs --verify (only verify writes say which write they are)".into(),
        );
    }
    if let Some(range) = args.lba_range_bytes {
        if range < u64::from(io_size) {
            return Err(format!(
                "--lba-range-bytes {range}: smaller than --io-size {io_size}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(line: &str) -> Result<Args, String> {
        parse(line.split_whitespace().map(str::to_string))
    }

    #[test]
    fn parses_every_option() {
        let args = parse_line(
            "--target 127.0.0.1:4431 --nqn nqn.x --hostnqn nqn.h --queue-depth 8 --io-size 8192 \
             --pattern rw --read-percent 50 --time-s 3 --warmup-s 0 --connections 2 --nsid 2 \
             --header-digest --data-digest --disable-sq-flow-control --verify --seed 9 --core 1 --json --lba-range-bytes 1048576",
        )
        .unwrap();
        assert_eq!(args.target, "127.0.0.1:4431".parse().unwrap());
        assert_eq!(
            (args.subnqn.as_str(), args.hostnqn.as_str()),
            ("nqn.x", "nqn.h")
        );
        assert_eq!(
            (args.queue_depth, args.io_size_bytes, args.pattern),
            (8, 8192, Pattern::ReadWrite)
        );
        assert_eq!(
            (
                args.read_percent,
                args.time_s,
                args.warmup_s,
                args.connections
            ),
            (50, 3, 0, 2)
        );
        assert!(
            args.header_digest
                && args.data_digest
                && args.verify
                && args.json
                && args.disable_sq_flow_control
        );
        assert_eq!(
            (args.nsid, args.seed, args.core, args.lba_range_bytes),
            (2, 9, Some(1), Some(1 << 20))
        );
    }

    #[test]
    fn defaults_match_spdk_nvme_perf_style() {
        let args = parse_line("--target 127.0.0.1:4420 --nqn n").unwrap();
        assert_eq!(
            (args.queue_depth, args.io_size_bytes, args.pattern),
            (32, 4096, Pattern::RandWrite)
        );
        assert_eq!(
            (args.time_s, args.warmup_s, args.connections, args.nsid),
            (10, 1, 1, 1)
        );
        assert!(!args.header_digest && !args.data_digest && !args.verify);
    }

    #[test]
    fn rejects_bad_values_naming_the_option() {
        let base = "--target 127.0.0.1:4420 --nqn n";
        for (extra, needle) in [
            ("--io-size 1000", "--io-size"),
            ("--queue-depth 0", "--queue-depth"),
            ("--pattern zig", "--pattern"),
            ("--read-percent 101", "--read-percent"),
            ("--connections 0", "--connections"),
            ("--bogus", "unknown option"),
            ("--time-s", "needs a value"),
            ("--lba-range-bytes 512", "--lba-range-bytes"),
        ] {
            let error = parse_line(&format!("{base} {extra}")).unwrap_err();
            assert!(error.contains(needle), "{extra}: {error}");
        }
        assert!(parse_line("--nqn n").unwrap_err().contains("--target"));
        assert!(parse_line("--target localhost --nqn n")
            .unwrap_err()
            .contains("--target"));
    }

    #[test]
    fn pattern_read_percent() {
        assert_eq!(Pattern::RandRead.read_percent(70), 100);
        assert_eq!(Pattern::Write.read_percent(70), 0);
        assert_eq!(Pattern::ReadWrite.read_percent(70), 70);
        assert!(Pattern::RandReadWrite.is_random() && !Pattern::ReadWrite.is_random());
    }
}
