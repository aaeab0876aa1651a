//! A preallocated log-linear latency histogram (HdrHistogram's layout, fixed precision).
//!
//! Values are nanoseconds. Each power-of-two range `[2^k, 2^(k+1))` is split into
//! [`SUB_BUCKETS`] equal buckets, so a bucket is at most 1/128 of its values wide (< 0.8 %
//! error; quantiles report the bucket's midpoint). Values below 2 * [`SUB_BUCKETS`] ns are exact.
//! Recording is an index computation and an increment: no allocation after [`Histogram::new`].

const SUB_BUCKET_BITS: u32 = 7;
/// Buckets per power of two.
pub const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;
/// Largest distinguishable value's exponent: 2^40 ns is about 18 minutes; larger values clamp.
const EXPONENT_MAX: u32 = 40;
const BUCKET_COUNT: usize = ((EXPONENT_MAX - SUB_BUCKET_BITS + 1) as usize + 1) * SUB_BUCKETS;

const _: () = assert!(SUB_BUCKET_BITS >= 7, "precision must stay near 1 %");
const _: () = assert!(EXPONENT_MAX < 63);

#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKET_COUNT],
            count: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }

    fn index(value_ns: u64) -> usize {
        let value = value_ns.min((1u64 << (EXPONENT_MAX + 1)) - 1);
        if value < SUB_BUCKETS as u64 {
            return value as usize;
        }
        let exponent = 63 - value.leading_zeros();
        let mantissa = (value >> (exponent - SUB_BUCKET_BITS)) as usize & (SUB_BUCKETS - 1);
        (exponent - SUB_BUCKET_BITS + 1) as usize * SUB_BUCKETS + mantissa
    }

    /// The smallest value and the width of bucket `index`.
    fn bucket_range(index: usize) -> (u64, u64) {
        if index < SUB_BUCKETS {
            return (index as u64, 1);
        }
        let exponent = (index / SUB_BUCKETS) as u32 + SUB_BUCKET_BITS - 1;
        let width = 1u64 << (exponent - SUB_BUCKET_BITS);
        let low = (1u64 << exponent) + (index % SUB_BUCKETS) as u64 * width;
        (low, width)
    }

    #[inline]
    pub fn record(&mut self, value_ns: u64) {
        self.counts[Self::index(value_ns)] += 1;
        self.count += 1;
        self.sum_ns += u128::from(value_ns);
        self.min_ns = self.min_ns.min(value_ns);
        self.max_ns = self.max_ns.max(value_ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.count = 0;
        self.sum_ns = 0;
        self.min_ns = u64::MAX;
        self.max_ns = 0;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    pub fn min_ns(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min_ns
        }
    }

    pub fn mean_ns(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_ns as f64 / self.count as f64
        }
    }

    /// The value at `quantile` (0.0..=1.0): the midpoint of the bucket holding that rank,
    /// clamped to the recorded min and max.
    pub fn quantile_ns(&self, quantile: f64) -> u64 {
        assert!((0.0..=1.0).contains(&quantile));
        if self.count == 0 {
            return 0;
        }
        let rank = ((quantile * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (index, &bucket_count) in self.counts.iter().enumerate() {
            seen += bucket_count;
            if seen >= rank {
                let (low, width) = Self::bucket_range(index);
                return (low + width / 2).clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_range_agree_everywhere() {
        for value in (0..5000u64)
            .chain((1..40).map(|k| (1u64 << k) - 1))
            .chain((1..40).map(|k| 1u64 << k))
        {
            let (low, width) = Histogram::bucket_range(Histogram::index(value));
            assert!(
                low <= value && value < low + width,
                "value {value} bucket [{low}, +{width})"
            );
            assert!(width == 1 || (width as f64) / (low as f64) <= 1.0 / SUB_BUCKETS as f64);
        }
        assert_eq!(Histogram::index(u64::MAX), BUCKET_COUNT - 1);
    }

    #[test]
    fn quantiles_within_one_percent() {
        let mut histogram = Histogram::new();
        for value in 1..=100_000u64 {
            histogram.record(value * 10);
        }
        for (quantile, expected) in [(0.5, 500_000.0), (0.99, 990_000.0), (0.999, 999_000.0)] {
            let found = histogram.quantile_ns(quantile) as f64;
            assert!(
                (found - expected).abs() / expected < 0.01,
                "q{quantile}: {found} vs {expected}"
            );
        }
        assert_eq!(histogram.quantile_ns(1.0), 1_000_000);
        assert_eq!(histogram.min_ns(), 10);
        assert!((histogram.mean_ns() - 500_005.0).abs() < 1e-6);
    }

    #[test]
    fn merge_and_clear() {
        let mut first = Histogram::new();
        let mut second = Histogram::new();
        first.record(100);
        second.record(200);
        second.record(u64::MAX);
        first.merge(&second);
        assert_eq!(
            (first.count(), first.min_ns(), first.max_ns()),
            (3, 100, u64::MAX)
        );
        assert_eq!(first.quantile_ns(0.5), 200, "values below 256 ns are exact");
        first.clear();
        assert_eq!(
            (
                first.count(),
                first.min_ns(),
                first.max_ns(),
                first.quantile_ns(0.5)
            ),
            (0, 0, 0, 0)
        );
        first.record(7);
        assert_eq!(first.quantile_ns(0.99), 7);
    }
}
