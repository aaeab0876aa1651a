//! Turning per-connection statistics into the printed table and the `--json` line.

use std::time::Duration;

use crate::histogram::Histogram;
use crate::run::ConnectionStats;

/// The figures of one connection or of the total.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub ios: u64,
    pub reads: u64,
    pub writes: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub lat_us_min: f64,
    pub lat_us_avg: f64,
    pub lat_us_p50: f64,
    pub lat_us_p99: f64,
    pub lat_us_p999: f64,
    pub lat_us_max: f64,
    pub errors: u64,
    pub mismatches: u64,
}

impl Summary {
    pub fn new(stats: &ConnectionStats, measured: Duration, io_size_bytes: u32) -> Summary {
        let ios = stats.latency.count();
        assert_eq!(
            ios,
            stats.reads + stats.writes,
            "every measured I/O has one latency"
        );
        let seconds = measured.as_secs_f64();
        let latency = &stats.latency;
        let us = |ns: u64| ns as f64 / 1000.0;
        Summary {
            ios,
            reads: stats.reads,
            writes: stats.writes,
            iops: ios as f64 / seconds,
            mib_s: ios as f64 * f64::from(io_size_bytes) / seconds / (1024.0 * 1024.0),
            lat_us_min: us(latency.min_ns()),
            lat_us_avg: latency.mean_ns() / 1000.0,
            lat_us_p50: us(latency.quantile_ns(0.5)),
            lat_us_p99: us(latency.quantile_ns(0.99)),
            lat_us_p999: us(latency.quantile_ns(0.999)),
            lat_us_max: us(latency.max_ns()),
            errors: stats.errors,
            mismatches: stats.mismatches,
        }
    }

    pub fn json(&self) -> String {
        format!(
            "{{\"ios\":{},\"reads\":{},\"writes\":{},\"iops\":{:.1},\"mib_s\":{:.2},\"lat_us_min\":{:.2},\"lat_us_avg\":{:.2},\"lat_us_p50\":{:.2},\"lat_us_p99\":{:.2},\
             \"lat_us_p999\":{:.2},\"lat_us_max\":{:.2},\"errors\":{},\"verify_mismatches\":{}}}",
            self.ios,
            self.reads,
            self.writes,
            self.iops,
            self.mib_s,
            self.lat_us_min,
            self.lat_us_avg,
            self.lat_us_p50,
            self.lat_us_p99,
            self.lat_us_p999,
            self.lat_us_max,
            self.errors,
            self.mismatches
        )
    }

    fn row(&self, name: &str) -> String {
        format!(
            "{name:<12} {:>12.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10.2} {:>7}",
            self.iops,
            self.mib_s,
            self.lat_us_min,
            self.lat_us_avg,
            self.lat_us_p50,
            self.lat_us_p99,
            self.lat_us_p999,
            self.lat_us_max,
            self.errors + self.mismatches
        )
    }
}

/// Sums the connections (histograms merged) into the total.
pub fn total(stats: &[ConnectionStats]) -> ConnectionStats {
    let mut sum = ConnectionStats {
        latency: Histogram::new(),
        ..ConnectionStats::default()
    };
    for connection in stats {
        sum.latency.merge(&connection.latency);
        sum.reads += connection.reads;
        sum.writes += connection.writes;
        sum.errors += connection.errors;
        sum.mismatches += connection.mismatches;
    }
    sum
}

/// The human-readable table: one row per connection (by qid) and the total.
pub fn table(stats: &[ConnectionStats], measured: Duration, io_size_bytes: u32) -> String {
    let mut text = format!(
        "{:<12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7}\n",
        "", "IOPS", "MiB/s", "min µs", "avg µs", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "errors"
    );
    for (index, connection) in stats.iter().enumerate() {
        let summary = Summary::new(connection, measured, io_size_bytes);
        text.push_str(&summary.row(&format!("qid {}", index + 1)));
        text.push('\n');
    }
    text.push_str(&Summary::new(&total(stats), measured, io_size_bytes).row("total"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_merge_and_json_has_every_field() {
        let mut first = ConnectionStats {
            latency: Histogram::new(),
            ..ConnectionStats::default()
        };
        let mut second = first.clone();
        for _ in 0..1000 {
            first.latency.record(10_000);
        }
        first.writes = 1000;
        second.latency.record(30_000);
        second.reads = 1;
        second.errors = 2;
        let sum = total(&[first.clone(), second.clone()]);
        assert_eq!(
            (sum.reads, sum.writes, sum.errors, sum.latency.count()),
            (1, 1000, 2, 1001)
        );
        let summary = Summary::new(&sum, Duration::from_secs(2), 4096);
        assert!((summary.iops - 500.5).abs() < 1e-9);
        assert!((summary.mib_s - 500.5 * 4096.0 / 1048576.0).abs() < 1e-9);
        assert!(
            (summary.lat_us_p50 - 10.0).abs() < 0.1 && (summary.lat_us_max - 30.0).abs() < 1e-9
        );
        let json = summary.json();
        for key in [
            "ios",
            "lat_us_min",
            "iops",
            "mib_s",
            "lat_us_avg",
            "lat_us_p50",
            "lat_us_p99",
            "lat_us_p999",
            "lat_us_max",
            "errors",
        ] {
            assert!(
                json.contains(&format!("\"{key}\":")),
                "{key} missing in {json}"
            );
        }
        let text = table(&[first, second], Duration::from_secs(2), 4096);
        assert_eq!(text.lines().count(), 4);
        assert!(text.lines().last().unwrap().starts_with("total"));
    }
}
