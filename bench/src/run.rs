//! The measurement loop: one thread polls every I/O queue pair, keeping `queue_depth` commands in
//! flight on each, and records latencies in per-connection histograms.
//!
//! Per pass and connection: one `read` ([`QueuePair::poll_receive`]), the completions it produced,
//! refill to the queue depth, one `writev` ([`QueuePair::flush`]). The clock is read once per
//! connection per pass, after the receive, so a latency spans submit → completion seen. Phases:
//! verify mode first writes every I/O block (fill), then the timed phase runs (warmup, then
//! measured), then verify mode reads every block back. Everything is allocated in [`Runner::new`].

use std::time::{Duration, Instant};

use nvmirror_nvmf::pdu::{io_opcode, Command, SglDescriptor};

use crate::cli::Pattern;
use crate::controller::{Controller, SetupError};
use crate::histogram::Histogram;
use crate::queue_pair::{DataDirection, Done, QueueError, QueuePair};
use crate::status::describe_status;
use crate::verify::{self, VerifyTable};
use crate::workload::{IoKind, Workload};

/// How long outstanding commands may take to finish after the timed phase.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Errors and verify mismatches printed individually; the rest are only counted.
const ERRORS_LOGGED_MAX: u64 = 10;
/// Verify mode: tries to find a block without I/O in flight before leaving a slot idle this pass.
const BUSY_BLOCK_RETRIES: u32 = 4;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub pattern: Pattern,
    pub read_percent: u8,
    pub nsid: u32,
    pub io_size_bytes: u32,
    pub block_count: u64,
    pub queue_depth: u16,
    pub warmup: Duration,
    pub measured: Duration,
    pub verify: bool,
    /// Verify mode: where the acknowledged state goes when the run ends, however it ends.
    pub ack_state: Option<std::path::PathBuf>,
    pub seed: u64,
    pub run_id: u64,
}

/// What one connection did during the measured phase (errors and mismatches: during the whole run).
#[derive(Debug, Clone, Default)]
pub struct ConnectionStats {
    pub latency: Histogram,
    pub reads: u64,
    pub writes: u64,
    pub errors: u64,
    pub mismatches: u64,
}

#[derive(Debug)]
pub enum RunError {
    Queue { qid: u16, error: QueueError },
    Admin(SetupError),
    Stuck { in_flight: usize },
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Queue { qid, error } => write!(f, "I/O queue {qid}: {error}"),
            RunError::Admin(error) => write!(f, "admin queue: {error}"),
            RunError::Stuck { in_flight } => {
                write!(
                    f,
                    "{in_flight} commands did not complete within {DRAIN_TIMEOUT:?} after the run"
                )
            }
        }
    }
}

impl std::error::Error for RunError {}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    kind: IoKind,
    block: u64,
    /// Verify mode: the sequence written, or the sequence a read must find.
    sequence: u64,
    started: Instant,
}

struct Connection {
    queue: QueuePair,
    workload: Workload,
    in_flight: Vec<InFlight>,
    stats: ConnectionStats,
}

/// Where the next requests come from.
enum Source {
    /// Each connection's own workload (the timed phase).
    Workload,
    /// One pass over all blocks shared by all connections (verify fill and read-back).
    Sweep { workload: Workload, remaining: u64 },
}

pub struct Runner {
    config: RunConfig,
    connections: Vec<Connection>,
    table: Option<VerifyTable>,
    measuring: bool,
    errors_logged: u64,
}

impl Runner {
    pub fn new(config: RunConfig, queues: Vec<QueuePair>) -> Runner {
        assert!(config.block_count > 0 && config.queue_depth > 0);
        let count = queues.len() as u16;
        let table = config.verify.then(|| VerifyTable::new(config.block_count));
        let connections = queues
            .into_iter()
            .enumerate()
            .map(|(index, mut queue)| {
                assert!(queue.slot_count() >= config.queue_depth as usize);
                // Only verify mode looks at read data: otherwise copying it out of the receive
                // buffer is a second pass over every byte read for nothing.
                queue.set_keep_read_data(config.verify);
                for slot in 0..queue.slot_count() as u16 {
                    fill_pattern(queue.data_mut(slot), slot);
                }
                let workload = Workload::new(
                    config.pattern,
                    config.read_percent,
                    config.block_count,
                    config.seed,
                    index as u16,
                    count,
                );
                let idle = InFlight {
                    kind: IoKind::Read,
                    block: 0,
                    sequence: 0,
                    started: Instant::now(),
                };
                Connection {
                    in_flight: vec![idle; queue.slot_count()],
                    queue,
                    workload,
                    stats: ConnectionStats {
                        latency: Histogram::new(),
                        ..ConnectionStats::default()
                    },
                }
            })
            .collect();
        Runner {
            config,
            connections,
            table,
            measuring: false,
            errors_logged: 0,
        }
    }

    /// Runs every phase; returns the per-connection statistics and the queue pairs for closing.
    /// With `ack_state`, what was acknowledged is saved whether the phases finished or the target
    /// went away (a crash test kills it on purpose).
    pub fn run(
        mut self,
        controller: &mut Controller,
    ) -> Result<(Vec<ConnectionStats>, Vec<QueuePair>), RunError> {
        let phases = self.run_phases(controller);
        if let (Some(path), Some(table)) = (&self.config.ack_state, &self.table) {
            let state = crate::ack_state::AckState {
                run_id: self.config.run_id,
                io_size_bytes: self.config.io_size_bytes,
                block_count: self.config.block_count,
                blocks: table.ack_state().collect(),
            };
            if let Err(e) = state.save(path) {
                log::error!("{e}");
            }
        }
        phases?;
        let mut stats = Vec::new();
        let mut queues = Vec::new();
        for connection in self.connections {
            stats.push(connection.stats);
            queues.push(connection.queue);
        }
        Ok((stats, queues))
    }

    fn run_phases(&mut self, controller: &mut Controller) -> Result<(), RunError> {
        if self.config.verify {
            let sweep = Workload::sweep(IoKind::Write, self.config.block_count);
            self.drive(
                controller,
                Source::Sweep {
                    workload: sweep,
                    remaining: self.config.block_count,
                },
                None,
            )?;
        }
        let start = Instant::now();
        self.drive(controller, Source::Workload, Some(start))?;
        if self.config.verify && self.config.pattern.writes() {
            let sweep = Workload::sweep(IoKind::Read, self.config.block_count);
            self.drive(
                controller,
                Source::Sweep {
                    workload: sweep,
                    remaining: self.config.block_count,
                },
                None,
            )?;
        }
        Ok(())
    }

    /// Polls until the source is exhausted (sweep) or the timed phase from `timed_start` ended,
    /// then until every command completed.
    fn drive(
        &mut self,
        controller: &mut Controller,
        mut source: Source,
        timed_start: Option<Instant>,
    ) -> Result<(), RunError> {
        let measure_start = timed_start.map(|start| start + self.config.warmup);
        let measure_end = measure_start.map(|start| start + self.config.measured);
        let mut issuing = true;
        let mut drain_deadline = None;
        loop {
            let mut in_flight = 0;
            for index in 0..self.connections.len() {
                let completed_at = self.receive(index)?;
                let queue_depth = self.config.queue_depth as usize;
                if issuing && self.connections[index].queue.in_flight_count() < queue_depth {
                    self.refill(
                        index,
                        &mut source,
                        completed_at.unwrap_or_else(Instant::now),
                    );
                }
                let connection = &mut self.connections[index];
                connection.queue.flush().map_err(|error| RunError::Queue {
                    qid: connection.queue.qid(),
                    error,
                })?;
                in_flight += connection.queue.in_flight_count();
            }
            let now = Instant::now();
            controller.poll_keep_alive(now).map_err(RunError::Admin)?;
            if let (Some(start), false) = (measure_start, self.measuring) {
                if now >= start && issuing {
                    self.start_measuring();
                }
            }
            let source_done = match (&source, measure_end) {
                (Source::Sweep { remaining, .. }, _) => *remaining == 0,
                (Source::Workload, Some(end)) => now >= end,
                (Source::Workload, None) => unreachable!("the timed phase has an end"),
            };
            if issuing && source_done {
                issuing = false;
                self.measuring = false;
                drain_deadline = Some(now + DRAIN_TIMEOUT);
            }
            if !issuing && in_flight == 0 {
                return Ok(());
            }
            if drain_deadline.is_some_and(|deadline| now > deadline) {
                return Err(RunError::Stuck { in_flight });
            }
        }
    }

    fn start_measuring(&mut self) {
        self.measuring = true;
        for connection in &mut self.connections {
            connection.stats.latency.clear();
            connection.stats.reads = 0;
            connection.stats.writes = 0;
        }
    }

    /// One read on connection `index` and the completions it carried; returns the clock reading
    /// taken for them (none when nothing arrived: an idle pass reads no clock).
    fn receive(&mut self, index: usize) -> Result<Option<Instant>, RunError> {
        let connection = &mut self.connections[index];
        let qid = connection.queue.qid();
        let read = connection.queue.poll_receive();
        if read.map_err(|error| RunError::Queue { qid, error })? == 0 {
            return Ok(None);
        }
        let now = Instant::now();
        while let Some(done) = self.connections[index].queue.take_done() {
            self.complete(index, done, now);
        }
        Ok(Some(now))
    }

    fn complete(&mut self, index: usize, done: Done, now: Instant) {
        let io_size = self.config.io_size_bytes as usize;
        let sectors_per_io = u64::from(self.config.io_size_bytes) / verify::SECTOR_BYTES as u64;
        let connection = &mut self.connections[index];
        let io = connection.in_flight[done.slot as usize];
        let lba = io.block * sectors_per_io;
        let status = done.completion.status;
        let success = status.is_success();
        if !success {
            connection.stats.errors += 1;
            if self.errors_logged < ERRORS_LOGGED_MAX {
                self.errors_logged += 1;
                log::error!(
                    "qid {}: {:?} at LBA {lba} failed: {}",
                    connection.queue.qid(),
                    io.kind,
                    describe_status(&status)
                );
            }
        }
        if let Some(table) = &mut self.table {
            match io.kind {
                IoKind::Write => table.end_write(io.block, success.then_some(io.sequence)),
                IoKind::Read => {
                    table.end_read(io.block);
                    let data = &connection.queue.data(done.slot)[..io_size];
                    if success && verify::checkable(io.sequence) {
                        if let Err(mismatch) =
                            verify::check_block(data, lba, self.config.run_id, io.sequence)
                        {
                            connection.stats.mismatches += 1;
                            if self.errors_logged < ERRORS_LOGGED_MAX {
                                self.errors_logged += 1;
                                log::error!("qid {}: {mismatch}", connection.queue.qid());
                            }
                        }
                    }
                }
            }
        }
        if self.measuring && success {
            let latency_ns = now.saturating_duration_since(io.started).as_nanos() as u64;
            connection.stats.latency.record(latency_ns);
            match io.kind {
                IoKind::Read => connection.stats.reads += 1,
                IoKind::Write => connection.stats.writes += 1,
            }
        }
        connection.queue.release(done.slot);
    }

    /// Submits commands until connection `index` has `queue_depth` in flight or the source is dry.
    fn refill(&mut self, index: usize, source: &mut Source, now: Instant) {
        let config = &self.config;
        let sectors_per_io = u64::from(config.io_size_bytes) / verify::SECTOR_BYTES as u64;
        let connection = &mut self.connections[index];
        let mut busy_retries = 0;
        while connection.queue.in_flight_count() < config.queue_depth as usize {
            let request = match source {
                Source::Workload => connection.workload.next_request(),
                Source::Sweep { remaining: 0, .. } => return,
                Source::Sweep {
                    workload,
                    remaining,
                } => {
                    *remaining -= 1;
                    workload.next_request()
                }
            };
            let sequence = match &mut self.table {
                Some(table) if table.is_busy(request.block) => {
                    assert!(
                        matches!(source, Source::Workload),
                        "a sweep visits each block once"
                    );
                    busy_retries += 1;
                    if busy_retries > BUSY_BLOCK_RETRIES {
                        return;
                    }
                    continue;
                }
                Some(table) if request.kind == IoKind::Write => table.begin_write(request.block),
                Some(table) => table.begin_read(request.block),
                None => 0,
            };
            let slot = connection
                .queue
                .acquire()
                .expect("fewer in flight than slots");
            let lba = request.block * sectors_per_io;
            let (opcode, direction) = match request.kind {
                IoKind::Read => (
                    io_opcode::READ,
                    DataDirection::FromController(config.io_size_bytes),
                ),
                IoKind::Write => (
                    io_opcode::WRITE,
                    DataDirection::ToController(config.io_size_bytes),
                ),
            };
            if config.verify && request.kind == IoKind::Write {
                let data = &mut connection.queue.data_mut(slot)[..config.io_size_bytes as usize];
                verify::stamp_block(data, lba, config.run_id, sequence);
            }
            let sgl = SglDescriptor::Transport {
                length: config.io_size_bytes,
            };
            let mut command =
                Command::read_write(opcode, slot, config.nsid, lba, sectors_per_io as u32, sgl);
            connection.in_flight[slot as usize] = InFlight {
                kind: request.kind,
                block: request.block,
                sequence,
                started: now,
            };
            connection
                .queue
                .submit(slot, &mut command, direction, false);
        }
    }
}

/// Write data outside verify mode: a fixed, non-zero pattern per slot (never compressible to nothing).
fn fill_pattern(data: &mut [u8], slot: u16) {
    for (index, byte) in data.iter_mut().enumerate() {
        *byte = (index as u8).wrapping_mul(31).wrapping_add(slot as u8);
    }
}
