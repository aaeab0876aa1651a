//! Rate-limited logging of what a host does wrong, one command at a time (an invalid opcode, a
//! bad data digest): a host, or a fuzzer like SPDK's `nvme_fuzz`, can send such commands as fast
//! as the target answers them, and one line each made a target write hundreds of megabytes of
//! log in minutes. Each queue pair logs at most [`COMMAND_ERROR_LINES_PER_SECOND`] of them in a
//! one-second window; the rest are counted, and the count is logged as one line before the next
//! line that is let through, or when the queue pair goes away.

use std::cell::Cell;
use std::fmt;

/// Command-error lines one queue pair logs per window at most.
pub const COMMAND_ERROR_LINES_PER_SECOND: u32 = 10;
/// The limiter's window.
pub const LOG_WINDOW_US: u64 = 1_000_000;

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it, after a line saying that `suppressed` similar ones were not (if any were).
    Log { suppressed: u64 },
    /// Count it, don't log it.
    Suppress,
}

/// A per-queue-pair budget of lines per window. Interior mutability: commands execute against
/// a shared `&QueueState`, and a queue pair is only ever polled by one reactor.
#[derive(Debug, Default)]
pub struct LogLimit {
    window_start_us: Cell<u64>,
    logged: Cell<u32>,
    suppressed: Cell<u64>,
}

impl LogLimit {
    pub fn new() -> LogLimit {
        LogLimit::default()
    }

    /// Decides about one line at `now_us`.
    pub fn admit(&self, now_us: u64) -> Admit {
        if now_us.saturating_sub(self.window_start_us.get()) >= LOG_WINDOW_US {
            self.window_start_us.set(now_us);
            self.logged.set(0);
        }
        if self.logged.get() >= COMMAND_ERROR_LINES_PER_SECOND {
            self.suppressed.set(self.suppressed.get() + 1);
            return Admit::Suppress;
        }
        self.logged.set(self.logged.get() + 1);
        Admit::Log {
            suppressed: self.suppressed.replace(0),
        }
    }

    /// Lines suppressed and not yet reported (taken: reported once).
    pub fn take_suppressed(&self) -> u64 {
        self.suppressed.replace(0)
    }

    /// Logs `line` at `level` unless the budget is spent; `context` names the queue pair, also
    /// in the "suppressed" line.
    pub fn log(
        &self,
        now_us: u64,
        level: log::Level,
        context: fmt::Arguments<'_>,
        line: fmt::Arguments<'_>,
    ) {
        if !log::log_enabled!(level) {
            return;
        }
        match self.admit(now_us) {
            Admit::Suppress => {}
            Admit::Log { suppressed } => {
                if suppressed > 0 {
                    log::log!(
                        level,
                        "nvmf: {context}: {suppressed} similar messages suppressed"
                    );
                }
                log::log!(level, "nvmf: {context}: {line}");
            }
        }
    }

    /// The queue pair goes away: report what is still counted.
    pub fn flush(&self, context: fmt::Arguments<'_>) {
        let suppressed = self.take_suppressed();
        if suppressed > 0 {
            log::info!("nvmf: {context}: {suppressed} similar messages suppressed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: u32 = COMMAND_ERROR_LINES_PER_SECOND;

    #[test]
    fn a_burst_logs_n_lines_then_counts() {
        let limit = LogLimit::new();
        let start = 5 * LOG_WINDOW_US;
        for i in 0..N {
            assert_eq!(
                limit.admit(start + u64::from(i)),
                Admit::Log { suppressed: 0 },
                "line {i}"
            );
        }
        for i in 0..1000 {
            assert_eq!(limit.admit(start + 100 + i), Admit::Suppress);
        }
        // The next window: the first line carries the count, once.
        let next = start + LOG_WINDOW_US;
        assert_eq!(limit.admit(next), Admit::Log { suppressed: 1000 });
        assert_eq!(limit.admit(next + 1), Admit::Log { suppressed: 0 });
        assert_eq!(limit.take_suppressed(), 0);
    }

    #[test]
    fn the_window_restarts_at_the_first_line_after_it_ends() {
        let limit = LogLimit::new();
        let start = 10 * LOG_WINDOW_US;
        for _ in 0..N {
            assert!(matches!(limit.admit(start), Admit::Log { .. }));
        }
        assert_eq!(limit.admit(start + LOG_WINDOW_US - 1), Admit::Suppress);
        // A quiet period longer than a window: a whole new budget.
        let later = start + 3 * LOG_WINDOW_US + 17;
        assert_eq!(limit.admit(later), Admit::Log { suppressed: 1 });
        for _ in 1..N {
            assert_eq!(limit.admit(later + 10), Admit::Log { suppressed: 0 });
        }
        assert_eq!(limit.admit(later + LOG_WINDOW_US - 1), Admit::Suppress);
        assert_eq!(
            limit.admit(later + LOG_WINDOW_US),
            Admit::Log { suppressed: 1 }
        );
    }

    #[test]
    fn a_steady_flood_logs_at_most_n_lines_per_window() {
        let limit = LogLimit::new();
        let mut logged = 0u64;
        let mut reported = 0u64;
        let lines = 200_000u64;
        let span_us = 20 * LOG_WINDOW_US;
        for i in 0..lines {
            if let Admit::Log { suppressed } = limit.admit(LOG_WINDOW_US + i * span_us / lines) {
                logged += 1;
                reported += suppressed;
            }
        }
        reported += limit.take_suppressed();
        assert!(logged <= 20 * u64::from(N) + u64::from(N), "{logged} lines");
        assert!(logged >= 19 * u64::from(N));
        assert_eq!(logged + reported, lines, "every line logged or counted");
    }
}
