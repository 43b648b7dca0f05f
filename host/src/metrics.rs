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
    /// gauges of `stats` (whose `requests`, `errors` and `procedures` are not used: the
    /// histograms here are finer).
    pub fn prometheus(&self, stats: &ServerStats) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            "transdb_uptime_seconds",
            "Seconds since the server started.",
            "gauge",
            format!("{}", stats.uptime_ms as f64 / 1e3),
        );
        gauge(
            "transdb_connections",
            "Open QUIC connections (authenticated or not).",
            "gauge",
            stats.connections.to_string(),
        );
        gauge(
            "transdb_auth_failures_total",
            "Connections and HTTP requests refused as unauthenticated.",
            "counter",
            stats.auth_failures.to_string(),
        );
        gauge(
            "transdb_modules",
            "Deployed modules.",
            "gauge",
            stats.modules.to_string(),
        );
        gauge(
            "transdb_store_bytes",
            "What --max-memory counts: keys and values plus a fixed overhead per key.",
            "gauge",
            stats.memory.store_bytes.to_string(),
        );
        if let Some(limit) = stats.memory.store_limit {
            gauge(
                "transdb_store_limit_bytes",
                "--max-memory.",
                "gauge",
                limit.to_string(),
            );
        }
        if let Some(resident) = stats.memory.process_resident {
            gauge(
                "transdb_process_resident_memory_bytes",
                "Resident memory of the server process.",
                "gauge",
                resident.to_string(),
            );
        }
        gauge(
            "transdb_log_next_position",
            "The next position the total order gives out.",
            "gauge",
            stats.log.next_position.to_string(),
        );
        if let Some(durable) = stats.log.durable_position {
            gauge(
                "transdb_log_durable_position",
                "Every position below this one is durable.",
                "gauge",
                durable.to_string(),
            );
        }
        gauge(
            "transdb_log_durability_lag",
            "Positions ordered and not yet durable.",
            "gauge",
            stats.log.durability_lag.to_string(),
        );
        let _ = writeln!(out, "# HELP transdb_shard_keys Keys per shard.");
        let _ = writeln!(out, "# TYPE transdb_shard_keys gauge");
        for (index, shard) in stats.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "transdb_shard_keys{{shard=\"{index}\"}} {}",
                shard.keys
            );
        }
        let _ = writeln!(
            out,
            "# HELP transdb_shard_bytes Bytes of keys and values per shard."
        );
        let _ = writeln!(out, "# TYPE transdb_shard_bytes gauge");
        for (index, shard) in stats.shards.iter().enumerate() {
            let _ = writeln!(
                out,
                "transdb_shard_bytes{{shard=\"{index}\"}} {}",
                shard.bytes
            );
        }

        let _ = writeln!(
            out,
            "# HELP transdb_request_duration_seconds Requests answered, by kind, from arrival to answer."
        );
        let _ = writeln!(out, "# TYPE transdb_request_duration_seconds histogram");
        for (kind, name) in self.kinds.iter().zip(Request::KINDS) {
            if kind.latency.count() > 0 {
                kind.latency.write_prometheus(
                    &mut out,
                    "transdb_request_duration_seconds",
                    &format!("kind=\"{name}\""),
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP transdb_request_errors_total Requests answered with an error, by kind."
        );
        let _ = writeln!(out, "# TYPE transdb_request_errors_total counter");
        for (kind, name) in self.kinds.iter().zip(Request::KINDS) {
            if kind.latency.count() > 0 {
                let _ = writeln!(
                    out,
                    "transdb_request_errors_total{{kind=\"{name}\"}} {}",
                    kind.errors.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP transdb_errors_total Error answers (aborts and refusals), by code."
        );
        let _ = writeln!(out, "# TYPE transdb_errors_total counter");
        for error in self.errors() {
            let _ = writeln!(
                out,
                "transdb_errors_total{{code=\"{}\",name=\"{}\"}} {}",
                error.code, error.name, error.count
            );
        }

        let table = self.procedures.read();
        let procedures: Vec<_> = table
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
            .collect();
        drop(table);
        let _ = writeln!(
            out,
            "# HELP transdb_call_duration_seconds Procedure calls answered, from arrival to answer."
        );
        let _ = writeln!(out, "# TYPE transdb_call_duration_seconds histogram");
        for (labels, metrics) in &procedures {
            metrics
                .latency
                .write_prometheus(&mut out, "transdb_call_duration_seconds", labels);
        }
        let _ = writeln!(
            out,
            "# HELP transdb_call_errors_total Procedure calls answered with an error."
        );
        let _ = writeln!(out, "# TYPE transdb_call_errors_total counter");
        for (labels, metrics) in &procedures {
            let _ = writeln!(
                out,
                "transdb_call_errors_total{{{labels}}} {}",
                metrics.errors.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP transdb_call_fuel_total Fuel procedure calls used (key functions and runs)."
        );
        let _ = writeln!(out, "# TYPE transdb_call_fuel_total counter");
        for (labels, metrics) in &procedures {
            let _ = writeln!(
                out,
                "transdb_call_fuel_total{{{labels}}} {}",
                metrics.fuel.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP transdb_http_responses_total HTTP gateway responses, by status class."
        );
        let _ = writeln!(out, "# TYPE transdb_http_responses_total counter");
        for (class, count) in self.http_responses.iter().enumerate().skip(1) {
            let _ = writeln!(
                out,
                "transdb_http_responses_total{{class=\"{class}xx\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        out
    }
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
