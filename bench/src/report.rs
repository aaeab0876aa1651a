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
        let mut json = String::from("{");
        for field in &FIELDS {
            if let Some(key) = field.key {
                if json.len() > 1 {
                    json.push(',');
                }
                json.push_str(&format!("\"{key}\":{}", (field.value)(self)));
            }
        }
        json.push('}');
        json
    }

    fn row(&self, name: &str) -> String {
        let mut row = format!("{name:<NAME_WIDTH$}");
        for field in &FIELDS {
            if let Some((_, width)) = field.column {
                row.push_str(&format!(" {:>width$}", (field.value)(self).to_string()));
            }
        }
        row
    }
}

/// A printed figure: a count, or a measurement with its digits after the point.
enum Figure {
    Count(u64),
    Decimal(f64, usize),
}

impl std::fmt::Display for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Figure::Count(count) => write!(f, "{count}"),
            Figure::Decimal(value, decimals) => write!(f, "{value:.decimals$}"),
        }
    }
}

/// One figure of a [`Summary`] and where it is printed.
struct Field {
    /// Key in the `--json` line (`None`: table only).
    key: Option<&'static str>,
    /// Heading and width of its table column (`None`: JSON only).
    column: Option<(&'static str, usize)>,
    value: fn(&Summary) -> Figure,
}

impl Field {
    const fn json(key: &'static str, value: fn(&Summary) -> Figure) -> Field {
        Field {
            key: Some(key),
            column: None,
            value,
        }
    }

    const fn column(heading: &'static str, width: usize, value: fn(&Summary) -> Figure) -> Field {
        Field {
            key: None,
            column: Some((heading, width)),
            value,
        }
    }

    const fn both(
        key: &'static str,
        heading: &'static str,
        width: usize,
        value: fn(&Summary) -> Figure,
    ) -> Field {
        Field {
            key: Some(key),
            column: Some((heading, width)),
            value,
        }
    }
}

/// Width of the table's first column (the connection's name).
const NAME_WIDTH: usize = 12;

/// Every figure, in printing order: the JSON line and the table both come from this list. The table
/// folds errors and verify mismatches into one column; the JSON line keeps them apart.
const FIELDS: [Field; 14] = [
    Field::json("ios", |summary| Figure::Count(summary.ios)),
    Field::json("reads", |summary| Figure::Count(summary.reads)),
    Field::json("writes", |summary| Figure::Count(summary.writes)),
    Field::both("iops", "IOPS", 12, |summary| {
        Figure::Decimal(summary.iops, 1)
    }),
    Field::both("mib_s", "MiB/s", 9, |summary| {
        Figure::Decimal(summary.mib_s, 2)
    }),
    Field::both("lat_us_min", "min µs", 9, |summary| {
        Figure::Decimal(summary.lat_us_min, 2)
    }),
    Field::both("lat_us_avg", "avg µs", 9, |summary| {
        Figure::Decimal(summary.lat_us_avg, 2)
    }),
    Field::both("lat_us_p50", "p50 µs", 9, |summary| {
        Figure::Decimal(summary.lat_us_p50, 2)
    }),
    Field::both("lat_us_p99", "p99 µs", 9, |summary| {
        Figure::Decimal(summary.lat_us_p99, 2)
    }),
    Field::both("lat_us_p999", "p99.9 µs", 9, |summary| {
        Figure::Decimal(summary.lat_us_p999, 2)
    }),
    Field::both("lat_us_max", "max µs", 10, |summary| {
        Figure::Decimal(summary.lat_us_max, 2)
    }),
    Field::json("errors", |summary| Figure::Count(summary.errors)),
    Field::json("verify_mismatches", |summary| {
        Figure::Count(summary.mismatches)
    }),
    Field::column("errors", 7, |summary| {
        Figure::Count(summary.errors + summary.mismatches)
    }),
];

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
    let mut text = format!("{:<NAME_WIDTH$}", "");
    for field in &FIELDS {
        if let Some((heading, width)) = field.column {
            text.push_str(&format!(" {heading:>width$}"));
        }
    }
    text.push('\n');
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
        second.mismatches = 3;
        let sum = total(&[first.clone(), second.clone()]);
        assert_eq!(
            (
                sum.reads,
                sum.writes,
                sum.errors,
                sum.mismatches,
                sum.latency.count()
            ),
            (1, 1000, 2, 3, 1001)
        );
        let summary = Summary::new(&sum, Duration::from_secs(2), 4096);
        assert!((summary.iops - 500.5).abs() < 1e-9);
        assert!((summary.mib_s - 500.5 * 4096.0 / 1048576.0).abs() < 1e-9);
        assert!(
            (summary.lat_us_p50 - 10.0).abs() < 0.1 && (summary.lat_us_max - 30.0).abs() < 1e-9
        );
        let json = summary.json();
        let keys = [
            "ios",
            "reads",
            "writes",
            "iops",
            "mib_s",
            "lat_us_min",
            "lat_us_avg",
            "lat_us_p50",
            "lat_us_p99",
            "lat_us_p999",
            "lat_us_max",
            "errors",
            "verify_mismatches",
        ];
        for key in keys {
            assert!(
                json.contains(&format!("\"{key}\":")),
                "{key} missing in {json}"
            );
        }
        assert_eq!(json.matches(':').count(), keys.len(), "{json}");
        for (key, value) in [
            ("ios", "1001"),
            ("reads", "1"),
            ("writes", "1000"),
            ("iops", "500.5"),
            ("lat_us_max", "30.00"),
            ("errors", "2"),
            ("verify_mismatches", "3"),
        ] {
            assert!(
                json.contains(&format!("\"{key}\":{value},"))
                    || json.ends_with(&format!("\"{key}\":{value}}}")),
                "{key} is not {value} in {json}"
            );
        }
        let text = table(&[first, second], Duration::from_secs(2), 4096);
        assert_eq!(text.lines().count(), 4);
        let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "IOPS", "MiB/s", "min", "µs", "avg", "µs", "p50", "µs", "p99", "µs", "p99.9", "µs",
                "max", "µs", "errors"
            ]
        );
        let total_row: Vec<&str> = text.lines().last().unwrap().split_whitespace().collect();
        assert_eq!(total_row.len(), 10, "name, eight figures, errors: {text}");
        assert_eq!(total_row[0], "total");
        assert_eq!(total_row[1], "500.5", "IOPS: {text}");
        assert_eq!(total_row[8], "30.00", "max: {text}");
        assert_eq!(
            total_row[9], "5",
            "errors and verify mismatches together: {text}"
        );
    }
}
