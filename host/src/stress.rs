//! `transdb stress`: drives a server with concurrent writers and transfers for a while and
//! checks, while it runs, that what the server answers is correct.
//!
//! - Each of `--writers` tasks owns `--keys-per-writer` keys nobody else touches and puts,
//!   deletes, batch-writes and reads them at random. Every read must see the writer's last
//!   acknowledged value. A write that failed in a way that leaves its effect unknown (the
//!   connection broke, or `DURABILITY_FAILED`) adds its value to what the next read may see.
//! - `--transferers` tasks run `bank.transfer` between `--accounts` accounts opened for this
//!   run. Every `--check-interval-ms` a checker reads all balances in one interactive
//!   transaction (one snapshot), and, with at most 1,000 accounts, also by `bank.total` (one
//!   locked read): the total must be what was opened and no balance may be negative.
//! - After the clock runs out, every key and the total are checked once more.
//!
//! Exit status: 0 pass; 1 the error rate (failed requests / all requests) is above
//! `--max-error-rate`; 2 more than `--max-violations` correctness violations (this wins over
//! 1); 3 the server could not be started or reached, or the run could not be set up.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use parking_lot::Mutex;
use serde::Serialize;
use transdb_client::{BatchOp, Client, ClientConfig, Error};
use transdb_proto::ErrorCode;

use crate::bench::{self, Random, TargetArgs, Transfer};

/// Exit status: the run passed.
pub const EXIT_PASS: u8 = 0;
/// Exit status: the error rate was above `--max-error-rate`.
pub const EXIT_ERRORS: u8 = 1;
/// Exit status: more correctness violations than `--max-violations`.
pub const EXIT_VIOLATIONS: u8 = 2;
/// Exit status: the server could not be started or reached, or the run not set up.
pub const EXIT_SETUP: u8 = 3;

/// Violations kept with their description (the rest are only counted).
const VIOLATIONS_KEPT: usize = 20;
/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(200);

/// Options of `transdb stress`.
#[derive(clap::Args, Debug, Clone)]
pub struct StressArgs {
    /// Seconds to run.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Tasks that write and read keys they own.
    #[arg(long, default_value_t = 8)]
    pub writers: usize,
    /// Keys each writer owns.
    #[arg(long, default_value_t = 8)]
    pub keys_per_writer: usize,
    /// Tasks that run bank transfers.
    #[arg(long, default_value_t = 8)]
    pub transferers: usize,
    /// Accounts the transfers move money between (opened for this run).
    #[arg(long, default_value_t = 1_000)]
    pub accounts: usize,
    /// Opening balance of each account.
    #[arg(long, default_value_t = 100)]
    pub balance: i64,
    /// Milliseconds between two checks of the bank's total while the run goes on.
    #[arg(long, default_value_t = 500)]
    pub check_interval_ms: u64,
    /// Highest acceptable fraction (0 to 1) of requests that fail.
    #[arg(long, default_value_t = 0.01)]
    pub max_error_rate: f64,
    /// Most correctness violations accepted.
    #[arg(long, default_value_t = 0)]
    pub max_violations: u64,
    /// Print one JSON object instead of the report (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Names this run's keys (`stress:<ID>:<writer>:<n>`) and accounts (`stress-<ID>-<n>`)
    /// [default: fresh for every run, so that earlier runs cannot interfere].
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
    /// Where the load goes.
    #[command(flatten)]
    pub target: TargetArgs,
}

/// The result of a run; `--json` prints it as it is.
#[derive(Debug, Default, Serialize)]
pub struct StressReport {
    /// 0 pass, 1 too many errors, 2 too many violations, 3 setup failed.
    pub exit_code: u8,
    /// Whether the run passed.
    pub passed: bool,
    /// Measured seconds.
    pub duration_s: f64,
    /// Requests answered (including transfers the procedure aborted).
    pub ops: u64,
    /// Failed requests.
    pub errors: u64,
    /// Failed requests by kind.
    pub errors_by_kind: BTreeMap<String, u64>,
    /// `errors / (ops + errors)`.
    pub error_rate: f64,
    /// Reads of owned keys checked.
    pub reads_checked: u64,
    /// Checks of the bank's total.
    pub total_checks: u64,
    /// Correctness violations found.
    pub violations: u64,
    /// The first violations, described.
    pub violation_details: Vec<String>,
    /// Why the run could not be set up (exit status 3).
    pub setup_error: Option<String>,
}

/// What the tasks of a run share.
struct Shared {
    stop: AtomicBool,
    ops: AtomicU64,
    reads_checked: AtomicU64,
    total_checks: AtomicU64,
    violations: AtomicU64,
    details: Mutex<Vec<String>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn violation(&self, what: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        let mut details = self.details.lock();
        if details.len() < VIOLATIONS_KEPT {
            details.push(what);
        }
    }

    fn error(&self, error: &Error) {
        *self
            .errors
            .lock()
            .entry(bench::error_kind(error))
            .or_default() += 1;
    }
}

/// Runs `transdb stress` and prints its report; the exit status says how it went.
pub async fn main(
    server: &str,
    client_config: impl FnOnce() -> Result<ClientConfig>,
    args: &StressArgs,
) -> ExitCode {
    let report = run(server, client_config, args).await;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("the report serialises")
        );
    } else {
        report.print();
    }
    ExitCode::from(report.exit_code)
}

/// Runs the stress test and returns its report.
pub async fn run(
    server: &str,
    client_config: impl FnOnce() -> Result<ClientConfig>,
    args: &StressArgs,
) -> StressReport {
    let setup_failed = |error: anyhow::Error| StressReport {
        exit_code: EXIT_SETUP,
        setup_error: Some(format!("{error:#}")),
        ..StressReport::default()
    };
    if let Err(error) = check_args(args) {
        return setup_failed(error);
    }
    let target = match bench::Target::open(server, client_config, &args.target).await {
        Ok(target) => target,
        Err(error) => return setup_failed(error),
    };
    let report = match stress(&target, args).await {
        Ok(report) => report,
        Err(error) => setup_failed(error),
    };
    target.close().await;
    report
}

fn check_args(args: &StressArgs) -> Result<()> {
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    if args.writers > bench::MAX_CLIENTS || args.transferers > bench::MAX_CLIENTS {
        bail!(
            "--writers and --transferers must each be at most {}",
            bench::MAX_CLIENTS
        );
    }
    if args.writers + args.transferers == 0 {
        bail!("--writers and --transferers cannot both be 0");
    }
    if args.writers > 0 && args.keys_per_writer == 0 {
        bail!("--keys-per-writer must be at least 1");
    }
    if args.accounts < 2 {
        bail!("--accounts must be at least 2");
    }
    if args.balance < 0 {
        bail!("--balance must not be negative");
    }
    if args.balance.checked_mul(args.accounts as i64).is_none() {
        bail!("--balance times --accounts must fit in a 64-bit signed integer");
    }
    if !(0.0..=1.0).contains(&args.max_error_rate) {
        bail!("--max-error-rate must be between 0 and 1");
    }
    if let Some(id) = &args.run_id
        && (id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        bail!("--run-id must be 1 to 64 letters, digits, `-` or `_`");
    }
    if args.check_interval_ms == 0 {
        bail!("--check-interval-ms must be at least 1");
    }
    Ok(())
}

/// The balances under `keys`, read at one snapshot, and (with `use_procedure`) the total
/// of `names` by one `bank.total` call: checked against `expected`.
async fn check_total(
    client: &Client,
    keys: &[String],
    expected: i64,
    use_procedure: bool,
    names: &[String],
    shared: &Shared,
) -> Result<(), Error> {
    let mut transaction = client.begin().await?;
    let snapshot = transaction.snapshot();
    let mut total = 0i64;
    let mut negative = Vec::new();
    let mut missing = Vec::new();
    for key in keys {
        match bench::balance(transaction.get(key).await?) {
            Some(balance) => {
                total += balance;
                if balance < 0 {
                    negative.push(format!("{key}={balance}"));
                }
            }
            None => missing.push(key.clone()),
        }
    }
    transaction.rollback().await?;
    if total != expected || !negative.is_empty() || !missing.is_empty() {
        shared.violation(format!(
            "snapshot {snapshot}: total {total}, expected {expected}; negative: {negative:?}; \
             missing or unreadable: {missing:?}"
        ));
    }
    if use_procedure {
        let total = bench::bank_total(client, names).await?;
        if total != expected {
            shared.violation(format!("bank.total: {total}, expected {expected}"));
        }
    }
    shared.total_checks.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn stress(target: &bench::Target, args: &StressArgs) -> Result<StressReport> {
    let setup = Client::connect(&target.addr, target.config.clone()).await?;
    let run = args.run_id.clone().unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or_default();
        format!("{:016x}", nanos ^ std::process::id() as u64)
    });
    let names: Vec<String> = (0..args.accounts)
        .map(|index| format!("stress-{run}-{index}"))
        .collect();
    let keys: Vec<String> = names.iter().map(|name| bench::account_key(name)).collect();
    // The total to conserve: what the accounts hold before any transfer (a reused --run-id
    // finds its accounts as the earlier run left them).
    let mut expected = 0;
    if args.transferers > 0 {
        bench::ensure_bank(&setup, &args.target.module).await?;
        let existing = bench::open_accounts(&setup, &names, args.balance)
            .await
            .context("cannot open the run's accounts")?;
        expected = if existing == 0 {
            args.balance * args.accounts as i64
        } else {
            bench::bank_total(&setup, &names)
                .await
                .context("cannot read the total of the accounts an earlier run left")?
        };
    }
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
        reads_checked: AtomicU64::new(0),
        total_checks: AtomicU64::new(0),
        violations: AtomicU64::new(0),
        details: Mutex::new(Vec::new()),
        errors: Mutex::new(BTreeMap::new()),
    });
    let names = Arc::new(names);
    let keys = Arc::new(keys);
    let use_procedure = names.len() <= bench::TOTAL_CHUNK;

    let mut writers = Vec::new();
    for writer in 0..args.writers {
        let client = Client::connect(&target.addr, target.config.clone()).await?;
        let owned: Vec<String> = (0..args.keys_per_writer)
            .map(|index| format!("stress:{run}:{writer}:{index}"))
            .collect();
        let shared = shared.clone();
        let seed = args.seed.wrapping_mul(1_000).wrapping_add(writer as u64);
        writers.push(tokio::spawn(writer_loop(client, owned, seed, shared)));
    }
    let mut transferers = Vec::new();
    for transferer in 0..args.transferers {
        let client = Client::connect(&target.addr, target.config.clone()).await?;
        let (names, shared) = (names.clone(), shared.clone());
        let seed = args
            .seed
            .wrapping_mul(1_000)
            .wrapping_add(500 + transferer as u64);
        transferers.push(tokio::spawn(transfer_loop(client, names, seed, shared)));
    }
    let checker = (args.transferers > 0).then(|| {
        let (client, keys, names, shared) =
            (setup.clone(), keys.clone(), names.clone(), shared.clone());
        let interval = Duration::from_millis(args.check_interval_ms);
        tokio::spawn(async move {
            while !shared.stop.load(Ordering::Relaxed) {
                if let Err(error) =
                    check_total(&client, &keys, expected, use_procedure, &names, &shared).await
                {
                    shared.error(&error);
                }
                tokio::time::sleep(interval).await;
            }
        })
    });

    let duration = Duration::from_secs_f64(args.duration);
    let progress = bench::progress_bar(duration, args.json);
    let start = Instant::now();
    while start.elapsed() < duration {
        tokio::time::sleep(PROGRESS_TICK.min(duration.saturating_sub(start.elapsed()))).await;
        progress.set_position(start.elapsed().min(duration).as_millis() as u64);
        progress.set_message(format!(
            "{} ops, {} errors, {} violations",
            shared.ops.load(Ordering::Relaxed),
            shared.errors.lock().values().sum::<u64>(),
            shared.violations.load(Ordering::Relaxed)
        ));
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut finals = Vec::new();
    for writer in writers {
        finals.push(writer.await.context("a writer panicked")?);
    }
    for transferer in transferers {
        transferer.await.context("a transferer panicked")?;
    }
    if let Some(checker) = checker {
        checker.await.context("the checker panicked")?;
    }
    let duration_s = start.elapsed().as_secs_f64();
    progress.finish_and_clear();

    // The final word: every owned key and the total, with nothing else running.
    for (client, owned) in finals {
        for (key, mut state) in owned {
            match client.get(&key).await {
                Ok(value) => state.check(&key, value, &shared),
                Err(error) => shared.error(&error),
            }
        }
        client.close().await;
    }
    if args.transferers > 0 {
        if let Err(error) =
            check_total(&setup, &keys, expected, use_procedure, &names, &shared).await
        {
            shared.error(&error);
        }
        match bench::bank_total(&setup, &names).await {
            Ok(total) if total != expected => shared.violation(format!(
                "after the run, bank.total over all accounts: {total}, expected {expected}"
            )),
            Ok(_) => {}
            Err(error) => {
                if !args.json {
                    eprintln!("the final bank.total failed: {error:#}");
                }
                *shared
                    .errors
                    .lock()
                    .entry("final_total".into())
                    .or_default() += 1;
            }
        }
    }
    setup.close().await;

    let errors_by_kind = shared.errors.lock().clone();
    let errors: u64 = errors_by_kind.values().sum();
    let ops = shared.ops.load(Ordering::Relaxed);
    let violations = shared.violations.load(Ordering::Relaxed);
    let error_rate = if ops + errors == 0 {
        0.0
    } else {
        errors as f64 / (ops + errors) as f64
    };
    let exit_code = if violations > args.max_violations {
        EXIT_VIOLATIONS
    } else if error_rate > args.max_error_rate {
        EXIT_ERRORS
    } else {
        EXIT_PASS
    };
    Ok(StressReport {
        exit_code,
        passed: exit_code == EXIT_PASS,
        duration_s,
        ops,
        errors,
        errors_by_kind,
        error_rate,
        reads_checked: shared.reads_checked.load(Ordering::Relaxed),
        total_checks: shared.total_checks.load(Ordering::Relaxed),
        violations,
        violation_details: shared.details.lock().clone(),
        setup_error: None,
    })
}

/// What a read of an owned key may return: the last acknowledged value, plus the values of
/// writes since whose outcome is unknown; empty: anything (the key's start is unknown).
struct KeyState {
    possible: Vec<Option<Vec<u8>>>,
}

impl KeyState {
    /// Checks a read, then takes what was read as the key's known value (so one violation
    /// is reported once, not at every later read).
    fn check(&mut self, key: &str, read: Option<Vec<u8>>, shared: &Shared) {
        shared.reads_checked.fetch_add(1, Ordering::Relaxed);
        if !self.possible.is_empty() && !self.possible.contains(&read) {
            let show = |value: &Option<Vec<u8>>| match value {
                Some(bytes) => format!("{:?}", String::from_utf8_lossy(bytes)),
                None => "nothing".to_owned(),
            };
            shared.violation(format!(
                "{key}: read {}, but the last acknowledged write left {}",
                show(&read),
                self.possible
                    .iter()
                    .map(show)
                    .collect::<Vec<_>>()
                    .join(" or ")
            ));
        }
        self.possible = vec![read];
    }

    /// A write of `value` succeeded (`Ok`) or failed (`Err`).
    fn wrote(&mut self, value: Option<Vec<u8>>, outcome: &Result<(), Error>) {
        match outcome {
            Ok(()) => self.possible = vec![value],
            Err(error) if effect_unknown(error) => {
                if !self.possible.is_empty() && !self.possible.contains(&value) {
                    self.possible.push(value);
                }
            }
            Err(_) => {}
        }
    }
}

/// Counts a request's outcome: an operation, or an error by kind.
fn count(outcome: &Result<(), Error>, shared: &Shared) {
    match outcome {
        Ok(()) => {
            shared.ops.fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => shared.error(error),
    }
}

/// Whether a failed write may still have been applied.
fn effect_unknown(error: &Error) -> bool {
    match error {
        Error::Rejected(response) => response.code == ErrorCode::DURABILITY_FAILED,
        Error::ConnectionLost { .. } | Error::StreamReset { .. } | Error::Protocol(_) => true,
        Error::Config(_) | Error::Connect { .. } => false,
    }
}

async fn writer_loop(
    client: Client,
    owned: Vec<String>,
    seed: u64,
    shared: Arc<Shared>,
) -> (Client, Vec<(String, KeyState)>) {
    let mut random = Random::new(seed);
    // Start from a known state: a reused --run-id finds the values of an earlier run. If the
    // delete fails, the key may hold anything, and the first read is taken as it is.
    let mut keys = Vec::with_capacity(owned.len());
    for key in owned {
        let outcome = client.delete(&key).await.map(drop);
        count(&outcome, &shared);
        let possible = if outcome.is_ok() {
            vec![None]
        } else {
            Vec::new()
        };
        keys.push((key, KeyState { possible }));
    }
    let mut counter = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let index = random.below(keys.len() as u64) as usize;
        counter += 1;
        let value = format!("{seed}:{counter}").into_bytes();
        match random.below(10) {
            // Read: must see the last acknowledged write.
            0..=3 => {
                let (key, state) = &mut keys[index];
                match client.get(key).await {
                    Ok(read) => {
                        shared.ops.fetch_add(1, Ordering::Relaxed);
                        state.check(key, read, &shared);
                    }
                    Err(error) => shared.error(&error),
                }
            }
            4..=7 => {
                let (key, state) = &mut keys[index];
                let outcome = client.put(key, &value).await;
                count(&outcome, &shared);
                state.wrote(Some(value), &outcome);
            }
            8 => {
                let (key, state) = &mut keys[index];
                let outcome = client.delete(key).await.map(drop);
                count(&outcome, &shared);
                state.wrote(None, &outcome);
            }
            // A batch over two owned keys: both writes apply, or neither.
            _ => {
                let other = (index + 1) % keys.len();
                let ops = [
                    BatchOp::Put {
                        key: keys[index].0.as_str().into(),
                        value: value.as_slice().into(),
                    },
                    BatchOp::Put {
                        key: keys[other].0.as_str().into(),
                        value: value.as_slice().into(),
                    },
                ];
                let outcome = client.batch(&ops).await.map(drop);
                count(&outcome, &shared);
                keys[index].1.wrote(Some(value.clone()), &outcome);
                keys[other].1.wrote(Some(value), &outcome);
            }
        }
    }
    (client, keys)
}

async fn transfer_loop(client: Client, names: Arc<Vec<String>>, seed: u64, shared: Arc<Shared>) {
    let mut random = Random::new(seed);
    while !shared.stop.load(Ordering::Relaxed) {
        let (from, to) = bench::pick_pair(&mut random, names.len(), 0.0);
        let transfer = Transfer {
            from: &names[from],
            to: &names[to],
            amount: 1 + random.below(20) as i64,
        };
        match client.call::<_, ()>("bank", "transfer", &transfer).await {
            Ok(()) => {
                shared.ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(Error::Rejected(error))
                if error.code == ErrorCode::ABORTED
                    && error.message.contains("insufficient funds") =>
            {
                shared.ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => shared.error(&error),
        }
    }
}

impl StressReport {
    /// Prints the human-readable report.
    pub fn print(&self) {
        if let Some(error) = &self.setup_error {
            eprintln!("transdb stress: could not run: {error}");
            eprintln!("exit status {EXIT_SETUP}");
            return;
        }
        println!(
            "{} ops in {:.1} s ({:.0}/s); {} reads of owned keys and {} totals checked",
            self.ops,
            self.duration_s,
            self.ops as f64 / self.duration_s,
            self.reads_checked,
            self.total_checks
        );
        println!(
            "errors: {} ({:.4} % of requests){}",
            self.errors,
            self.error_rate * 100.0,
            if self.errors_by_kind.is_empty() {
                String::new()
            } else {
                format!(": {:?}", self.errors_by_kind)
            }
        );
        println!("violations: {}", self.violations);
        for detail in &self.violation_details {
            println!("  {detail}");
        }
        let verdict = match self.exit_code {
            EXIT_PASS => "PASS",
            EXIT_ERRORS => "FAIL: error rate above --max-error-rate",
            _ => "FAIL: correctness violations above --max-violations",
        };
        println!("{verdict} (exit status {})", self.exit_code);
    }
}
