//! What the server counts, for `Stats` (`transdb stats`) and `GET /metrics`: requests by
//! kind with their latency, error answers by code, calls, errors, fuel and latency per
//! procedure, and uptime.
//!
//! Counted where requests arrive (the QUIC and HTTP front ends, through
//! [`crate::executor::Executor::serve`]), never in the deterministic part: a replay counts
//! nothing. Recording is a handful of relaxed atomic additions; only a procedure's first
//! call takes a write lock, to add it to the table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use transdb_proto::message::{ErrorStats, Latency, ProcedureStats, RequestStats, ServerStats};
use transdb_proto::{ErrorCode, Request};

/// Sub-buckets per power of two in a [`Histogram`]: 8, so a bucket's ends are within
/// 12.5 % of each other.
const SUB_BITS: u32 = 3;
/// Buckets that cover every `u64` of nanoseconds.
const BUCKETS: usize = ((64 - SUB_BITS + 1) as usize) << SUB_BITS;
/// Error codes counted one by one; higher ones (none defined) share the last slot.
const ERROR_SLOTS: usize = 128;
/// At most this many procedures are counted one by one (only procedures that exist get a
/// row, but modules can be replaced by ones with other procedures any number of times);
/// calls of later ones are counted under module `(other)`.
pub const MAX_COUNTED_PROCEDURES: usize = 1_000;

/// A latency histogram of atomic log-linear buckets (nanoseconds).
pub struct Histogram {
    counts: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

/// The bucket of `value`.
fn bucket(value: u64) -> usize {
    if value < 1 << SUB_BITS {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros();
    let sub = (value >> (exponent - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    ((((exponent - SUB_BITS + 1) as u64) << SUB_BITS) | sub) as usize
}

/// The largest value in bucket `index`.
fn bucket_end(index: usize) -> u64 {
    if index < 1 << SUB_BITS {
        return index as u64;
    }
    let group = (index >> SUB_BITS) as u32;
    let sub = (index & ((1 << SUB_BITS) - 1)) as u64;
    let shift = group - 1;
    let start = ((1u64 << SUB_BITS) + sub) << shift;
    start + ((1u64 << shift) - 1)
}

impl Histogram {
    /// Counts one observation.
    pub fn record(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket(nanos)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(nanos, Ordering::Relaxed);
        self.max_ns.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The counts, bucket by bucket (a consistent enough copy: each count is exact, the set
    /// may straddle a concurrent observation).
    fn snapshot(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect()
    }

    /// The `quantile` (0..=1) in nanoseconds: the end of the bucket it falls in, at most the
    /// largest observation; 0 without observations.
    fn quantile(counts: &[u64], quantile: f64, max: u64) -> u64 {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((quantile * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return bucket_end(index).min(max);
            }
        }
        max
    }

    /// Percentiles in microseconds.
    pub fn latency(&self) -> Latency {
        let counts = self.snapshot();
        let max = self.max_ns.load(Ordering::Relaxed);
        let micros = |nanos: u64| nanos.div_ceil(1_000);
        Latency {
            p50_us: micros(Self::quantile(&counts, 0.50, max)),
            p95_us: micros(Self::quantile(&counts, 0.95, max)),
            p99_us: micros(Self::quantile(&counts, 0.99, max)),
            max_us: micros(max),
        }
    }

    /// Writes the histogram in the Prometheus text format as `name` with `labels` (`k="v"`
    /// pairs, comma-separated, or empty): cumulative buckets at each power of two from
    /// about 1 µs to 34 s, then `+Inf`, `_sum` and `_count`, in seconds.
    fn write_prometheus(&self, out: &mut String, name: &str, labels: &str) {
        let counts = self.snapshot();
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        let mut index = 0;
        for power in 10..=35u32 {
            let below = 1u64 << power;
            // Every bucket ends at or below 2^power - 1 up to bucket(2^power).
            while index < bucket(below) {
                cumulative += counts[index];
                index += 1;
            }
            let seconds = below as f64 / 1e9;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{separator}le=\"{seconds}\"}} {cumulative}"
            );
        }
        let total: u64 = counts.iter().sum();
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{separator}le=\"+Inf\"}} {total}"
        );
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = |labels: &str| {
            if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {total}", braces(labels));
    }
}

/// Counters of one request kind.
#[derive(Default)]
struct KindMetrics {
    errors: AtomicU64,
    latency: Histogram,
}

/// Counters of one procedure.
#[derive(Default)]
struct ProcedureMetrics {
    errors: AtomicU64,
    fuel: AtomicU64,
    latency: Histogram,
}

type ByProcedure = BTreeMap<Box<str>, BTreeMap<Box<str>, Arc<ProcedureMetrics>>>;

/// What one answer was, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not an error.
    Ok,
    /// An error with this code.
    Error(ErrorCode),
    /// A refusal of the HTTP gateway that has no code of the protocol (its lock wait ran
    /// out, its path did not decode): counted as an error of its kind only.
    Refused,
}

/// The server's counters. See the module documentation.
pub struct Metrics {
    started: Instant,
    kinds: Box<[KindMetrics]>,
    errors: Box<[AtomicU64]>,
    procedures: RwLock<(ByProcedure, usize)>,
    http_responses: [AtomicU64; 6],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            kinds: (0..Request::KINDS.len())
                .map(|_| KindMetrics::default())
                .collect(),
            errors: (0..ERROR_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            procedures: RwLock::new((BTreeMap::new(), 0)),
            http_responses: Default::default(),
        }
    }
}

impl Metrics {
    /// Counts a request of kind `number` ([`Request::number`]) answered after `elapsed`.
    pub fn record(&self, number: usize, outcome: Outcome, elapsed: Duration) {
        let kind = &self.kinds[number];
        kind.latency.record(elapsed);
        match outcome {
            Outcome::Ok => {}
            Outcome::Error(code) => {
                kind.errors.fetch_add(1, Ordering::Relaxed);
                self.errors[usize::from(code.0).min(ERROR_SLOTS - 1)]
                    .fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Refused => {
                kind.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts a call of `module.procedure` that used `fuel` and was answered after `elapsed`.
    pub fn record_call(
        &self,
        module: &str,
        procedure: &str,
        outcome: Outcome,
        fuel: u64,
        elapsed: Duration,
    ) {
        let found = {
            let table = self.procedures.read();
            table
                .0
                .get(module)
                .and_then(|procedures| procedures.get(procedure))
                .cloned()
        };
        let metrics = match found {
            Some(metrics) => metrics,
            None => {
                let mut table = self.procedures.write();
                let (by_module, counted) = &mut *table;
                let existing = by_module
                    .get(module)
                    .and_then(|procedures| procedures.get(procedure))
                    .cloned();
                match existing {
                    Some(metrics) => metrics,
                    None => {
                        let (module, procedure) = if *counted < MAX_COUNTED_PROCEDURES {
                            *counted += 1;
                            (module, procedure)
                        } else {
                            ("(other)", "(other)")
                        };
                        by_module
                            .entry(module.into())
                            .or_default()
                            .entry(procedure.into())
                            .or_default()
                            .clone()
                    }
                }
            }
        };
        metrics.latency.record(elapsed);
        metrics.fuel.fetch_add(fuel, Ordering::Relaxed);
        if outcome != Outcome::Ok {
            metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an HTTP response with `status`.
    pub fn record_http(&self, status: u16) {
        let class = usize::from(status / 100).min(5);
        self.http_responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Time since the server started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Requests by kind, for `Stats`.
    pub fn requests(&self) -> Vec<RequestStats> {
        self.kinds
            .iter()
            .zip(Request::KINDS)
            .filter(|(kind, _)| kind.latency.count() > 0)
            .map(|(kind, name)| RequestStats {
                kind: name.to_owned(),
                count: kind.latency.count(),
                errors: kind.errors.load(Ordering::Relaxed),
                latency: kind.latency.latency(),
            })
            .collect()
    }

    /// Error answers by code, for `Stats`.
    pub fn errors(&self) -> Vec<ErrorStats> {
        self.errors
            .iter()
            .enumerate()
            .map(|(code, count)| (code as u16, count.load(Ordering::Relaxed)))
            .filter(|(_, count)| *count > 0)
            .map(|(code, count)| ErrorStats {
                code,
                name: ErrorCode(code).name().unwrap_or_default().to_owned(),
                count,
            })
            .collect()
    }

    /// Calls by procedure, for `Stats`.
    pub fn procedures(&self) -> Vec<ProcedureStats> {
        let table = self.procedures.read();
        table
            .0
            .iter()
            .flat_map(|(module, procedures)| {
                procedures
                    .iter()
                    .map(move |(procedure, metrics)| ProcedureStats {
                        module: module.to_string(),
                        procedure: procedure.to_string(),
                        calls: metrics.latency.count(),
                        errors: metrics.errors.load(Ordering::Relaxed),
                        fuel_used: metrics.fuel.load(Ordering::Relaxed),
                        latency: metrics.latency.latency(),
                    })
            })
            .collect()
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4), with the
    /// gauges of `stats` ([`crate::executor::Executor::gauges`]).
    pub fn prometheus(&self, stats: &ServerStats) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let one = |value: u64| vec![(String::new(), value.to_string())];
        let optional = |value: Option<u64>| value.map(one).unwrap_or_default();
        let families: [(&str, &str, &str, Rows); 12] = [
            (
                "transdb_uptime_seconds",
                "gauge",
                "Seconds since the server started.",
                vec![(String::new(), (stats.uptime_ms as f64 / 1e3).to_string())],
            ),
            (
                "transdb_connections",
                "gauge",
                "Open QUIC connections (authenticated or not).",
                one(stats.connections),
            ),
            (
                "transdb_auth_failures_total",
                "counter",
                "Connections and HTTP requests refused as unauthenticated.",
                one(stats.auth_failures),
            ),
            (
                "transdb_modules",
                "gauge",
                "Deployed modules.",
                one(stats.modules),
            ),
            (
                "transdb_store_bytes",
                "gauge",
                "What --max-memory counts: keys and values plus a fixed overhead per key.",
                one(stats.memory.store_bytes),
            ),
            (
                "transdb_store_limit_bytes",
                "gauge",
                "--max-memory.",
                optional(stats.memory.store_limit),
            ),
            (
                "transdb_process_resident_memory_bytes",
                "gauge",
                "Resident memory of the server process.",
                optional(stats.memory.process_resident),
            ),
            (
                "transdb_log_next_position",
                "gauge",
                "The next position the total order gives out.",
                one(stats.log.next_position),
            ),
            (
                "transdb_log_durable_position",
                "gauge",
                "Every position below this one is durable.",
                optional(stats.log.durable_position),
            ),
            (
                "transdb_log_durability_lag",
                "gauge",
                "Positions ordered and not yet durable.",
                one(stats.log.durability_lag),
            ),
            (
                "transdb_shard_keys",
                "gauge",
                "Keys per shard.",
                shard_rows(stats, |shard| shard.keys),
            ),
            (
                "transdb_shard_bytes",
                "gauge",
                "Bytes of keys and values per shard.",
                shard_rows(stats, |shard| shard.bytes),
            ),
        ];
        for (name, kind, help, rows) in families {
            family(&mut out, name, kind, help, rows);
        }

        let kinds: Vec<_> = self
            .kinds
            .iter()
            .zip(Request::KINDS)
            .filter(|(kind, _)| kind.latency.count() > 0)
            .map(|(kind, name)| (format!("kind=\"{name}\""), kind))
            .collect();
        histograms(
            &mut out,
            "transdb_request_duration_seconds",
            "Requests answered, by kind, from arrival to answer.",
            kinds.iter().map(|(labels, kind)| (labels, &kind.latency)),
        );
        family(
            &mut out,
            "transdb_request_errors_total",
            "counter",
            "Requests answered with an error, by kind.",
            counts(kinds.iter().map(|(labels, kind)| (labels, &kind.errors))),
        );
        family(
            &mut out,
            "transdb_errors_total",
            "counter",
            "Error answers (aborts and refusals), by code.",
            self.errors()
                .into_iter()
                .map(|error| {
                    (
                        format!("code=\"{}\",name=\"{}\"", error.code, error.name),
                        error.count.to_string(),
                    )
                })
                .collect(),
        );

        let procedures: Vec<_> = {
            let table = self.procedures.read();
            table
                .0
                .iter()
                .flat_map(|(module, procedures)| {
                    procedures.iter().map(move |(procedure, metrics)| {
                        (
                            format!(
                                "module=\"{}\",procedure=\"{}\"",
                                escape(module),
                                escape(procedure)
                            ),
                            metrics.clone(),
                        )
                    })
                })
                .collect()
        };
        histograms(
            &mut out,
            "transdb_call_duration_seconds",
            "Procedure calls answered, from arrival to answer.",
            procedures
                .iter()
                .map(|(labels, metrics)| (labels, &metrics.latency)),
        );
        family(
            &mut out,
            "transdb_call_errors_total",
            "counter",
            "Procedure calls answered with an error.",
            counts(
                procedures
                    .iter()
                    .map(|(labels, metrics)| (labels, &metrics.errors)),
            ),
        );
        family(
            &mut out,
            "transdb_call_fuel_total",
            "counter",
            "Fuel procedure calls used (key functions and runs).",
            counts(
                procedures
                    .iter()
                    .map(|(labels, metrics)| (labels, &metrics.fuel)),
            ),
        );
        let classes: Vec<_> = (1..self.http_responses.len())
            .map(|class| format!("class=\"{class}xx\""))
            .collect();
        family(
            &mut out,
            "transdb_http_responses_total",
            "counter",
            "HTTP gateway responses, by status class.",
            counts(classes.iter().zip(&self.http_responses[1..])),
        );
        out
    }
}

/// Samples of one metric family: labels (`k="v"` pairs, or empty) and value.
type Rows = Vec<(String, String)>;

/// Writes one metric family: its `HELP` and `TYPE` lines, then a sample per row (labels
/// as `k="v"` pairs, or empty, and the value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, rows: Rows) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in rows {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// Writes a histogram family: a histogram per labelled row.
fn histograms<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (&'a String, &'a Histogram)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (labels, histogram) in rows {
        histogram.write_prometheus(out, name, labels);
    }
}

/// Rows of counters read now.
fn counts<'a>(rows: impl Iterator<Item = (&'a String, &'a AtomicU64)>) -> Rows {
    rows.map(|(labels, count)| (labels.clone(), count.load(Ordering::Relaxed).to_string()))
        .collect()
}

/// A row per shard of `value`.
fn shard_rows(
    stats: &ServerStats,
    value: impl Fn(&transdb_proto::message::ShardStats) -> u64,
) -> Rows {
    stats
        .shards
        .iter()
        .enumerate()
        .map(|(index, shard)| (format!("shard=\"{index}\""), value(shard).to_string()))
        .collect()
}

/// A label value escaped for the Prometheus text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The server process's resident memory in bytes (Linux: `VmRSS` of `/proc/self/status`).
pub fn process_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order_within_an_eighth() {
        let mut previous_end = None;
        for index in 0..BUCKETS {
            let end = bucket_end(index);
            if let Some(previous) = previous_end {
                assert_eq!(
                    bucket(previous + 1),
                    index,
                    "bucket {index} starts after {previous}"
                );
            }
            assert_eq!(bucket(end), index);
            previous_end = Some(end);
        }
        assert_eq!(previous_end, Some(u64::MAX));
        for value in [9u64, 100, 1_000, 123_456_789, u64::MAX / 3] {
            let end = bucket_end(bucket(value));
            assert!(end >= value && (end - value) as f64 <= value as f64 / 8.0);
        }
    }

    #[test]
    fn percentiles_come_from_the_observations() {
        let histogram = Histogram::default();
        for micros in 1..=1000u64 {
            histogram.record(Duration::from_micros(micros));
        }
        let latency = histogram.latency();
        let near = |got: u64, want: u64| got >= want && got as f64 <= want as f64 * 1.125 + 1.0;
        assert!(near(latency.p50_us, 500), "{latency:?}");
        assert!(near(latency.p95_us, 950), "{latency:?}");
        assert!(near(latency.p99_us, 990), "{latency:?}");
        assert_eq!(latency.max_us, 1000);
        assert_eq!(Histogram::default().latency(), Latency::default());
    }

    #[test]
    fn prometheus_buckets_are_cumulative_and_end_with_the_count() {
        let histogram = Histogram::default();
        histogram.record(Duration::from_nanos(500));
        histogram.record(Duration::from_micros(3));
        histogram.record(Duration::from_secs(100));
        let mut out = String::new();
        histogram.write_prometheus(&mut out, "x", "kind=\"Get\"");
        let counts: Vec<u64> = out
            .lines()
            .filter(|line| line.starts_with("x_bucket"))
            .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(counts.windows(2).all(|pair| pair[0] <= pair[1]), "{out}");
        assert_eq!(counts[0], 1, "{out}"); // 500 ns <= 1.024 µs
        assert_eq!(counts[2], 2, "{out}"); // 3 µs <= 4.096 µs
        assert_eq!(counts[counts.len() - 2], 2, "{out}"); // 100 s > 34 s
        assert_eq!(*counts.last().unwrap(), 3);
        assert!(out.contains("x_count{kind=\"Get\"} 3"), "{out}");
        assert!(out.contains("le=\"0.000001024\""), "{out}");
    }

    #[test]
    fn procedures_past_the_limit_share_one_row() {
        let metrics = Metrics::default();
        for index in 0..MAX_COUNTED_PROCEDURES + 5 {
            metrics.record_call("m", &format!("p{index}"), Outcome::Ok, 7, Duration::ZERO);
        }
        metrics.record_call(
            "m",
            "p0",
            Outcome::Error(ErrorCode::ABORTED),
            3,
            Duration::ZERO,
        );
        let rows = metrics.procedures();
        assert_eq!(rows.len(), MAX_COUNTED_PROCEDURES + 1);
        let other = rows.iter().find(|row| row.module == "(other)").unwrap();
        assert_eq!((other.calls, other.fuel_used), (5, 35));
        let p0 = rows.iter().find(|row| row.procedure == "p0").unwrap();
        assert_eq!((p0.calls, p0.errors, p0.fuel_used), (2, 1, 10));
    }
}
