//! Group-commit statistics of one shard: how long each `fdatasync` took and
//! how many records and bytes each commit made durable.
//!
//! The committer records into histograms allocated when the shard opens.
//! HdrHistogram's `saturating_record` writes one preallocated counter, so the
//! commit path neither allocates nor locks. The shard's owner takes the
//! statistics with [`crate::Shard::take_commit_stats`], which swaps in fresh
//! histograms outside the commit path.

use hdrhistogram::Histogram;

/// The maximum `fdatasync` latency the histogram resolves, in microseconds
/// (10 minutes). A slower sync is recorded as this value.
pub const FSYNC_MAX_US: u64 = 600 * 1_000_000;

/// The maximum commit batch the histogram resolves, in records. A larger
/// batch is recorded as this value.
pub const BATCH_MAX_RECORDS: u64 = 1 << 20;

/// The maximum commit batch the histogram resolves, in bytes (1 TiB). A
/// larger batch is recorded as this value.
pub const BATCH_MAX_BYTES: u64 = 1 << 40;

/// Two significant digits keep each histogram between 14 and 35 KB with these
/// bounds. Values below 256 are exact, and larger ones are within 1 %.
const SIGNIFICANT_DIGITS: u8 = 2;

fn histogram(max: u64) -> Histogram<u64> {
    Histogram::new_with_bounds(1, max, SIGNIFICANT_DIGITS)
        .expect("the bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low)")
}

/// Group-commit statistics gathered over some interval.
///
/// The histograms give the distribution, and the `*_total` fields give exact
/// sums, because a histogram's sum is only as precise as its buckets.
#[derive(Clone, Debug)]
pub struct CommitStats {
    /// The latency of each `fdatasync` call, in microseconds, whether it
    /// succeeded or failed. One commit syncs every segment it wrote to, so
    /// it may make more than one call. The committer task measures it, so it
    /// includes the wait for the executor to poll the task again after the
    /// sync completed.
    pub fsync_us: Histogram<u64>,
    /// Records made durable per successful commit.
    pub batch_records: Histogram<u64>,
    /// Bytes of records made durable per successful commit.
    pub batch_bytes: Histogram<u64>,
    /// The exact sum of the latencies in `fsync_us`, in microseconds.
    pub fsync_total_us: u64,
    /// The exact sum of `batch_records`.
    pub batch_records_total: u64,
    /// The exact sum of `batch_bytes`.
    pub batch_bytes_total: u64,
    /// `fdatasync` calls that returned an error. Each one retires the
    /// segment it synced.
    pub fsync_failures: u64,
}

impl Default for CommitStats {
    fn default() -> CommitStats {
        CommitStats::new()
    }
}

impl CommitStats {
    /// Creates empty statistics.
    pub fn new() -> CommitStats {
        CommitStats {
            fsync_us: histogram(FSYNC_MAX_US),
            batch_records: histogram(BATCH_MAX_RECORDS),
            batch_bytes: histogram(BATCH_MAX_BYTES),
            fsync_total_us: 0,
            batch_records_total: 0,
            batch_bytes_total: 0,
            fsync_failures: 0,
        }
    }

    /// Returns the number of successful commits.
    pub fn commits(&self) -> u64 {
        self.batch_records.len()
    }

    /// Adds `other`'s samples to these.
    pub fn add(&mut self, other: &CommitStats) {
        // Histograms from `CommitStats::new` share bounds, so adding them
        // cannot fail. NOTE: the fields are public, and samples of a
        // histogram built elsewhere with narrower bounds would be dropped.
        let _ = self.fsync_us.add(&other.fsync_us);
        let _ = self.batch_records.add(&other.batch_records);
        let _ = self.batch_bytes.add(&other.batch_bytes);
        self.fsync_total_us = self.fsync_total_us.saturating_add(other.fsync_total_us);
        self.batch_records_total = self
            .batch_records_total
            .saturating_add(other.batch_records_total);
        self.batch_bytes_total = self
            .batch_bytes_total
            .saturating_add(other.batch_bytes_total);
        self.fsync_failures = self.fsync_failures.saturating_add(other.fsync_failures);
    }

    pub(crate) fn record_fsync(&mut self, latency_us: u64, succeeded: bool) {
        self.fsync_us.saturating_record(latency_us);
        self.fsync_total_us = self.fsync_total_us.saturating_add(latency_us);
        if !succeeded {
            self.fsync_failures = self.fsync_failures.saturating_add(1);
        }
    }

    pub(crate) fn record_commit(&mut self, records: u64, bytes: u64) {
        self.batch_records.saturating_record(records);
        self.batch_bytes.saturating_record(bytes);
        self.batch_records_total = self.batch_records_total.saturating_add(records);
        self.batch_bytes_total = self.batch_bytes_total.saturating_add(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_merges_samples_and_sums() {
        let mut total = CommitStats::new();
        let mut delta = CommitStats::new();
        delta.record_fsync(150, true);
        delta.record_fsync(2_000_000, false);
        delta.record_commit(3, 6_000);
        total.add(&delta);
        total.add(&delta);
        assert_eq!(total.fsync_us.len(), 4);
        assert_eq!(total.fsync_total_us, 2 * 2_000_150);
        assert_eq!(total.fsync_failures, 2);
        assert_eq!(total.commits(), 2);
        assert_eq!(total.batch_records_total, 6);
        assert_eq!(total.batch_bytes_total, 12_000);
        assert_eq!(total.batch_records.max(), 3);
    }

    #[test]
    fn record_saturates_above_bounds() {
        let mut stats = CommitStats::new();
        stats.record_commit(BATCH_MAX_RECORDS * 4, BATCH_MAX_BYTES * 4);
        stats.record_fsync(FSYNC_MAX_US * 4, true);
        assert_eq!(stats.commits(), 1);
        assert!(
            stats
                .batch_records
                .equivalent(stats.batch_records.max(), BATCH_MAX_RECORDS)
        );
        assert!(
            stats
                .fsync_us
                .equivalent(stats.fsync_us.max(), FSYNC_MAX_US)
        );
        assert_eq!(stats.batch_records_total, BATCH_MAX_RECORDS * 4);
        assert_eq!(stats.fsync_total_us, FSYNC_MAX_US * 4);
    }
}
