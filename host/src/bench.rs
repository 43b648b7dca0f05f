//! `transdb bench`: a load generator for a running server, or for one it starts in-process.
//!
//! Workloads (`--workload`):
//! - `read-heavy` (95 % get / 5 % put), `balanced` (50/50), `write-heavy` (5/95),
//!   `put-only` and `get-only`, over `--key-space` keys `bench:<n>` with `--value-size`-byte values (loaded
//!   before the clock starts, except for `put-only`);
//! - `bank`: `bank.transfer` of 1 unit between two random accounts of `--accounts` (opened
//!   with `--balance` each if missing); `--hot-fraction F` makes a fraction F of transfers
//!   touch account 0, for contention;
//! - `interactive-bank`: the same transfer as an interactive transaction (begin, two
//!   snapshot reads, two writes, commit); a commit that loses a race is a `conflict` abort.
//!
//! `--clients C` tasks each keep `--pipeline P` requests in flight: they send P, wait for all
//! P answers, and send the next P (as `redis-benchmark -P` does). Pipelined requests travel
//! together on one stream ([`Client::pipeline`]); `interactive-bank` runs P transactions at
//! once instead. Clients share
//! `--connections` QUIC connections (default 1: the tasks of an application share one
//! `Client`, and so one connection, whose packets then carry several requests each). A transaction the workload
//! itself gives up (insufficient funds, a conflict) is an *abort* and counts as an operation;
//! anything else that fails is an *error*, counted by kind and not as an operation.
//!
//! `--rate R` paces the clients to R operations per second in all (to measure latency below
//! saturation). A paced client that is behind its schedule counts its operations' latency
//! from when they were due, not from when they were sent, so a server that falls behind
//! shows it in the percentiles (no coordinated omission); being woken up to
//! 2 ms late by the timer (whose tick is a millisecond) does not count.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use transdb_client::{BatchOp, Client, ClientConfig, Error};
use transdb_proto::ErrorCode;

use crate::cli::DurabilityArg;
use crate::config::ServerConfig;
use crate::server::Server;

/// Accounts a `bank.total` call sums at most (its fuel bounds how many it can read).
pub const TOTAL_CHUNK: usize = 1_000;
/// Most `--clients` (tasks of this process).
pub const MAX_CLIENTS: usize = 10_000;
/// Most `--pipeline` (requests one client writes before reading the answers).
pub const MAX_PIPELINE: usize = 10_000;
/// Calls or batches in flight while accounts are opened or keys loaded.
const SETUP_CONCURRENCY: usize = 64;
/// Keys per batch while loading the key space.
const LOAD_BATCH: usize = 100;
/// How late a paced client's timer may wake it before the delay counts as the server's
/// (Tokio's timer ticks every millisecond).
const TIMER_SLACK: Duration = Duration::from_millis(2);
/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// What `transdb bench` runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// 95 % get, 5 % put.
    ReadHeavy,
    /// 50 % get, 50 % put.
    Balanced,
    /// 5 % get, 95 % put.
    WriteHeavy,
    /// Only puts.
    PutOnly,
    /// Only gets.
    GetOnly,
    /// `bank.transfer` between random accounts.
    Bank,
    /// The same transfer as an interactive transaction.
    InteractiveBank,
}

impl Workload {
    /// The fraction of operations that read, for the key-value workloads.
    fn read_fraction(self) -> Option<f64> {
        match self {
            Workload::ReadHeavy => Some(0.95),
            Workload::Balanced => Some(0.5),
            Workload::WriteHeavy => Some(0.05),
            Workload::PutOnly => Some(0.0),
            Workload::GetOnly => Some(1.0),
            Workload::Bank | Workload::InteractiveBank => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Workload::ReadHeavy => "read-heavy",
            Workload::Balanced => "balanced",
            Workload::WriteHeavy => "write-heavy",
            Workload::PutOnly => "put-only",
            Workload::GetOnly => "get-only",
            Workload::Bank => "bank",
            Workload::InteractiveBank => "interactive-bank",
        }
    }
}

/// Where the load goes: `--server` (global), or a server started in this process.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// Start a server in this process, on 127.0.0.1 and a fresh temporary data directory
    /// that is removed afterwards, instead of using --server.
    #[arg(long)]
    pub embedded: bool,
    /// Durability of the --embedded server.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync, requires = "embedded")]
    pub durability: DurabilityArg,
    /// The bank module, deployed as `bank` if the server has no module of that name.
    #[arg(
        long,
        default_value = "target/procedures/bank.wasm",
        value_name = "FILE"
    )]
    pub module: PathBuf,
}

/// Options of `transdb bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to run.
    #[arg(long, value_enum, default_value_t = Workload::Balanced)]
    pub workload: Workload,
    /// Concurrent client tasks.
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// Seconds to run (after loading).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Keys of the key-value workloads.
    #[arg(long, default_value_t = 10_000)]
    pub key_space: u64,
    /// Bytes per value of the key-value workloads.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Requests each client sends before waiting for their answers.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// QUIC connections the clients share (an application's tasks share one `Client`).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Operations per second of all clients together [default: as fast as they can].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Accounts of the bank workloads.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: usize,
    /// Opening balance of each account the bank workloads open.
    #[arg(long, default_value_t = 1_000)]
    pub balance: i64,
    /// Fraction (0 to 1) of transfers that touch account 0.
    #[arg(long, default_value_t = 0.0)]
    pub hot_fraction: f64,
    /// Print one JSON object instead of the report (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// Seed of the random choices (runs with one seed make the same requests).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the load goes.
    #[command(flatten)]
    pub target: TargetArgs,
}

/// The result of a run; `--json` prints it as it is.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The workload's name.
    pub workload: &'static str,
    /// Client tasks.
    pub clients: usize,
    /// Connections they shared.
    pub connections: usize,
    /// Requests in flight per client.
    pub pipeline: usize,
    /// The pace asked for with `--rate`, in operations per second.
    pub target_rate: Option<f64>,
    /// Measured seconds.
    pub duration_s: f64,
    /// Operations completed (committed or aborted).
    pub ops: u64,
    /// Operations that committed (for the key-value workloads: all of them).
    pub committed: u64,
    /// `ops` per second.
    pub throughput_ops_per_sec: f64,
    /// Latency percentiles of completed operations, in milliseconds.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Failed requests (not counted in `ops`).
    pub errors: u64,
    /// Failed requests by kind (the error code's name, or `connection`, `protocol`, ...).
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Transactions the workload gave up.
    pub aborts: u64,
    /// Aborts by reason (`insufficient_funds`, `conflict`, ...).
    pub aborts_by_kind: BTreeMap<String, u64>,
    /// The server's address.
    pub server: String,
    /// The embedded server's durability, if the run started one.
    pub embedded_durability: Option<String>,
    /// Bank workloads: the total of all balances before and after the run.
    pub bank_total: Option<BankTotal>,
}

/// The money in the bank before and after a run: equal, or transfers were not atomic.
#[derive(Debug, Serialize)]
pub struct BankTotal {
    /// Before the run.
    pub before: i64,
    /// After the run.
    pub after: i64,
}

/// A server this process started for the run, and what clients need to reach it.
pub(crate) struct Target {
    pub(crate) addr: String,
    pub(crate) config: ClientConfig,
    pub(crate) embedded: Option<(Server, tempfile::TempDir)>,
}

impl Target {
    /// Connects to `--server`, or starts an embedded server first.
    pub(crate) async fn open(
        server: &str,
        client_config: impl FnOnce() -> Result<ClientConfig>,
        args: &TargetArgs,
    ) -> Result<Target> {
        if !args.embedded {
            return Ok(Target {
                addr: server.to_owned(),
                config: client_config()?,
                embedded: None,
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("transdb-bench-")
            .tempdir()
            .context("cannot create a temporary data directory for --embedded")?;
        let mut config = ServerConfig::new(dir.path());
        config.listen = "127.0.0.1:0".parse().expect("a valid address");
        config.durability = args
            .durability
            .durability(crate::log::DEFAULT_FSYNC_INTERVAL);
        let server = Server::start(config)
            .await
            .context("cannot start the embedded server")?;
        let client = server.admin_client_config()?;
        Ok(Target {
            addr: server.local_addr().to_string(),
            config: client,
            embedded: Some((server, dir)),
        })
    }

    pub(crate) async fn close(self) {
        if let Some((server, dir)) = self.embedded {
            server.shutdown().await;
            drop(dir);
        }
    }
}

/// Makes sure module `bank` is deployed: keeps the one there, or deploys `file`.
pub(crate) async fn ensure_bank(client: &Client, file: &std::path::Path) -> Result<()> {
    let modules = client.modules().await?;
    if modules.iter().any(|module| module.name == "bank") {
        return Ok(());
    }
    let bytes = std::fs::read(file).with_context(|| {
        format!(
            "the server has no `bank` module and {} cannot be read: build it with \
             scripts/build-procedures, or pass --module FILE",
            file.display()
        )
    })?;
    client.deploy("bank", &bytes).await?;
    Ok(())
}

/// The name of account `index`.
pub(crate) fn account(index: usize) -> String {
    format!("acct-{index}")
}

/// The key `bank` keeps an account's balance under.
pub(crate) fn account_key(name: &str) -> String {
    format!("account:{name}")
}

/// `bank.open` arguments (postcard, the field order of `transdb_procedures_bank::Open`).
#[derive(Serialize)]
struct Open<'a> {
    account: &'a str,
    balance: i64,
}

/// `bank.transfer` arguments (the field order of `transdb_procedures_bank::Transfer`).
#[derive(Serialize)]
pub(crate) struct Transfer<'a> {
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) amount: i64,
}

/// `bank.total` arguments.
#[derive(Serialize)]
struct Accounts<'a> {
    accounts: &'a [String],
}

/// Opens accounts that do not exist yet, with `balance` each (by `bank.open`, 64 at a
/// time); returns how many existed already.
pub async fn open_accounts(client: &Client, names: &[String], balance: i64) -> Result<u64> {
    let mut existing = 0;
    for chunk in names.chunks(SETUP_CONCURRENCY) {
        let mut opening = tokio::task::JoinSet::new();
        for name in chunk {
            let (client, name) = (client.clone(), name.clone());
            opening.spawn(async move {
                let open = Open {
                    account: &name,
                    balance,
                };
                client.call::<_, ()>("bank", "open", &open).await
            });
        }
        while let Some(opened) = opening.join_next().await {
            match opened? {
                Ok(()) => {}
                Err(Error::Rejected(error))
                    if error.code == ErrorCode::ABORTED
                        && error.message.contains("already exists") =>
                {
                    existing += 1;
                }
                Err(error) => return Err(error).context("cannot open the accounts"),
            }
        }
    }
    Ok(existing)
}

/// The sum of the balances of `names` by `bank.total`, in chunks of [`TOTAL_CHUNK`]: one
/// consistent total only while no transfer runs.
pub async fn bank_total(client: &Client, names: &[String]) -> Result<i64, Error> {
    let mut total = 0i64;
    for chunk in names.chunks(TOTAL_CHUNK) {
        let sum: i64 = client
            .call("bank", "total", &Accounts { accounts: chunk })
            .await?;
        total += sum;
    }
    Ok(total)
}

/// xorshift64*: cheap, deterministic per seed, and enough to pick keys.
pub struct Random(u64);

impl Random {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Random {
        Random(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
}

/// Two distinct accounts; with probability `hot`, one of them is account 0.
pub fn pick_pair(random: &mut Random, accounts: usize, hot: f64) -> (usize, usize) {
    let n = accounts as u64;
    let mut from = random.below(n);
    let mut to = (from + 1 + random.below(n - 1)) % n;
    if random.chance(hot) {
        if random.next() & 1 == 0 {
            from = 0;
            to = 1 + random.below(n - 1);
        } else {
            to = 0;
            from = 1 + random.below(n - 1);
        }
    }
    (from as usize, to as usize)
}

/// The name an error is counted under: its code's name, or what kind of failure it was.
pub(crate) fn error_kind(error: &Error) -> String {
    if let Some(name) = error.code().and_then(ErrorCode::name) {
        return name.to_ascii_lowercase();
    }
    match error {
        Error::Config(_) => "client_config",
        Error::Connect { .. } => "connect",
        Error::ConnectionLost { .. } => "connection_lost",
        Error::StreamReset { .. } => "stream_reset",
        Error::Protocol(_) => "protocol",
        Error::Rejected(_) => "rejected",
    }
    .to_owned()
}

/// What one operation came to.
enum Outcome {
    Committed,
    Aborted(&'static str),
    /// The error's kind and message.
    Failed(String, String),
}

/// One client's tally.
struct Tally {
    committed: u64,
    aborts: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    latency_us: Histogram<u64>,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            committed: 0,
            aborts: BTreeMap::new(),
            errors: BTreeMap::new(),
            latency_us: Histogram::new(3).expect("valid precision"),
            first_error: None,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.committed += other.committed;
        for (kind, count) in other.aborts {
            *self.aborts.entry(kind).or_default() += count;
        }
        for (kind, count) in other.errors {
            *self.errors.entry(kind).or_default() += count;
        }
        self.latency_us
            .add(&other.latency_us)
            .expect("same precision");
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// What every client of a run shares.
struct Plan {
    workload: Workload,
    key_space: u64,
    value: Vec<u8>,
    accounts: Vec<String>,
    hot_fraction: f64,
}

/// Runs `transdb bench`.
pub async fn run(
    server: &str,
    client_config: impl FnOnce() -> Result<ClientConfig>,
    args: &BenchArgs,
) -> Result<BenchReport> {
    check_args(args)?;
    let target = Target::open(server, client_config, &args.target).await?;
    let outcome = bench(&target, args).await;
    target.close().await;
    outcome
}

fn check_args(args: &BenchArgs) -> Result<()> {
    if !(1..=MAX_CLIENTS).contains(&args.clients) {
        bail!("--clients must be between 1 and {MAX_CLIENTS}");
    }
    if !(1..=MAX_PIPELINE).contains(&args.pipeline) {
        bail!("--pipeline must be between 1 and {MAX_PIPELINE}");
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    if args
        .rate
        .is_some_and(|rate| !(rate > 0.0 && rate.is_finite()))
    {
        bail!("--rate must be a positive number of operations per second");
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.key_space == 0 {
        bail!("--key-space must be at least 1");
    }
    if args.value_size > transdb_proto::limits::MAX_VALUE_BYTES {
        bail!(
            "--value-size must be at most {} bytes (the protocol's value limit)",
            transdb_proto::limits::MAX_VALUE_BYTES
        );
    }
    if args.accounts < 2 {
        bail!("--accounts must be at least 2");
    }
    if args.balance < 0 {
        bail!("--balance must not be negative");
    }
    if !(0.0..=1.0).contains(&args.hot_fraction) {
        bail!("--hot-fraction must be between 0 and 1");
    }
    Ok(())
}

async fn bench(target: &Target, args: &BenchArgs) -> Result<BenchReport> {
    let setup = Client::connect(&target.addr, target.config.clone()).await?;
    let mut random = Random::new(args.seed);
    let value: Vec<u8> = (0..args.value_size)
        .map(|_| b'a' + random.below(26) as u8)
        .collect();
    let bank = args.workload.read_fraction().is_none();
    let accounts: Vec<String> = if bank {
        (0..args.accounts).map(account).collect()
    } else {
        Vec::new()
    };
    let mut before = None;
    if bank {
        ensure_bank(&setup, &args.target.module).await?;
        open_accounts(&setup, &accounts, args.balance).await?;
        before = Some(
            bank_total(&setup, &accounts)
                .await
                .context("bank.total failed")?,
        );
    } else if args.workload != Workload::PutOnly {
        // Every get finds a value.
        load_keys(&setup, args.key_space, &value).await?;
    }
    let plan = Arc::new(Plan {
        workload: args.workload,
        key_space: args.key_space,
        value,
        accounts,
        hot_fraction: args.hot_fraction,
    });

    let connections = args.connections.min(args.clients);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(Client::connect(&target.addr, target.config.clone()).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(args.clients);
    for index in 0..args.clients {
        let client = clients[index % connections].clone();
        let (plan, stop, done) = (plan.clone(), stop.clone(), done.clone());
        let seed = args.seed.wrapping_add(index as u64 + 1);
        let pipeline = args.pipeline;
        // Each client's share of --rate, as the time between two of its rounds.
        let period = args
            .rate
            .map(|rate| Duration::from_secs_f64((args.clients * pipeline) as f64 / rate));
        tasks.push(tokio::spawn(async move {
            client_loop(client, plan, seed, pipeline, period, stop, done).await
        }));
    }
    let duration = Duration::from_secs_f64(args.duration);
    let start = Instant::now();
    let progress = progress_bar(duration, args.json);
    while start.elapsed() < duration {
        tokio::time::sleep(PROGRESS_TICK.min(duration.saturating_sub(start.elapsed()))).await;
        let elapsed = start.elapsed().min(duration);
        progress.set_position(elapsed.as_millis() as u64);
        let count = done.load(Ordering::Relaxed);
        progress.set_message(format!(
            "{count} ops, {:.0}/s",
            count as f64 / elapsed.as_secs_f64().max(1e-3)
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::new();
    for task in tasks {
        tally.merge(task.await.context("a client task panicked")?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    progress.finish_and_clear();

    let bank_total = match before {
        Some(before) => Some(BankTotal {
            before,
            after: bank_total(&setup, &plan.accounts)
                .await
                .context("bank.total failed")?,
        }),
        None => None,
    };
    setup.close().await;
    for client in clients {
        client.close().await;
    }
    if let Some(error) = &tally.first_error
        && !args.json
    {
        eprintln!("first error: {error}");
    }
    let aborts: u64 = tally.aborts.values().sum();
    let ops = tally.committed + aborts;
    let latency = &tally.latency_us;
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(BenchReport {
        workload: args.workload.name(),
        clients: args.clients,
        connections,
        pipeline: args.pipeline,
        target_rate: args.rate,
        duration_s: elapsed,
        ops,
        committed: tally.committed,
        throughput_ops_per_sec: ops as f64 / elapsed,
        p50_ms: ms(latency.value_at_quantile(0.50)),
        p95_ms: ms(latency.value_at_quantile(0.95)),
        p99_ms: ms(latency.value_at_quantile(0.99)),
        max_ms: ms(latency.max()),
        mean_ms: latency.mean() / 1000.0,
        errors: tally.errors.values().sum(),
        errors_by_kind: tally.errors,
        aborts,
        aborts_by_kind: tally.aborts,
        server: target.addr.clone(),
        embedded_durability: args
            .target
            .embedded
            .then(|| format!("{:?}", args.target.durability).to_ascii_lowercase()),
        bank_total,
    })
}

/// A progress bar over `duration` on stderr, or a hidden one (`--json`). It draws only on a
/// terminal.
pub(crate) fn progress_bar(duration: Duration, hidden: bool) -> indicatif::ProgressBar {
    if hidden {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {elapsed:>3} {msg}")
            .expect("a valid template"),
    );
    bar
}

/// The key of key-value workload key `index`.
fn bench_key(index: u64) -> String {
    format!("bench:{index:012}")
}

/// Puts every key of the key space, so that gets find values.
async fn load_keys(client: &Client, key_space: u64, value: &[u8]) -> Result<()> {
    // As many keys per batch as fit in one request frame (a value may be up to 4 MiB).
    let per_batch =
        (transdb_proto::limits::MAX_VALUE_BYTES / (value.len() + 64)).clamp(1, LOAD_BATCH);
    let value: Arc<[u8]> = value.into();
    let batches: Vec<(u64, u64)> = (0..key_space)
        .step_by(per_batch)
        .map(|first| (first, (first + per_batch as u64).min(key_space)))
        .collect();
    for group in batches.chunks(SETUP_CONCURRENCY) {
        let mut loading = tokio::task::JoinSet::new();
        for &(first, end) in group {
            let (client, value) = (client.clone(), value.clone());
            loading.spawn(async move {
                let keys: Vec<String> = (first..end).map(bench_key).collect();
                let ops: Vec<BatchOp<'_>> = keys
                    .iter()
                    .map(|key| BatchOp::Put {
                        key: key.as_str().into(),
                        value: value[..].into(),
                    })
                    .collect();
                client.batch(&ops).await
            });
        }
        while let Some(loaded) = loading.join_next().await {
            loaded?.context("cannot load the key space")?;
        }
    }
    Ok(())
}

async fn client_loop(
    client: Client,
    plan: Arc<Plan>,
    seed: u64,
    pipeline: usize,
    period: Option<Duration>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Tally {
    let mut random = Random::new(seed);
    let mut tally = Tally::new();
    let mut round = Vec::with_capacity(pipeline);
    // Paced clients start at random offsets within one period, not all at once.
    let mut due = period.map(|period| {
        tokio::time::Instant::now() + period.mul_f64(random.below(1_000) as f64 / 1_000.0)
    });
    while !stop.load(Ordering::Relaxed) {
        let started = match (&mut due, period) {
            (Some(due), Some(period)) => {
                tokio::time::sleep_until(*due).await;
                let woke = Instant::now();
                // A client behind its schedule (its previous round ran long) counts from when
                // the round was due; one woken a little late by the timer's granularity
                // (a millisecond) counts from when it sends.
                let late = woke.saturating_duration_since(due.into_std());
                let started = if late <= TIMER_SLACK {
                    woke
                } else {
                    due.into_std()
                };
                *due += period;
                started
            }
            _ => Instant::now(),
        };
        let outcomes = if pipeline > 1 && plan.workload != Workload::InteractiveBank {
            pipelined(&client, &plan, &mut random, pipeline).await
        } else {
            round.clear();
            for _ in 0..pipeline {
                round.push(operation(&client, &plan, &mut random));
            }
            futures_util::future::join_all(round.drain(..)).await
        };
        for (outcome, finished) in outcomes {
            let latency = finished.saturating_duration_since(started);
            match outcome {
                Outcome::Committed => tally.committed += 1,
                Outcome::Aborted(kind) => *tally.aborts.entry(kind.to_owned()).or_default() += 1,
                Outcome::Failed(kind, message) => {
                    *tally.errors.entry(kind).or_default() += 1;
                    tally.first_error.get_or_insert(message);
                    continue;
                }
            }
            let _ = tally.latency_us.record(latency.as_micros() as u64);
        }
        done.fetch_add(pipeline as u64, Ordering::Relaxed);
    }
    tally
}

/// `pipeline` operations of the plan's workload sent on one stream
/// ([`Client::pipeline`]), and when their answers were in.
async fn pipelined(
    client: &Client,
    plan: &Plan,
    random: &mut Random,
    pipeline: usize,
) -> Vec<(Outcome, Instant)> {
    use std::borrow::Cow;
    use transdb_proto::Request;
    let mut requests = Vec::with_capacity(pipeline);
    for _ in 0..pipeline {
        requests.push(match plan.workload.read_fraction() {
            Some(reads) => {
                let key = Cow::Owned(bench_key(random.below(plan.key_space)));
                if random.chance(reads) {
                    Request::Get { key }
                } else {
                    Request::Put {
                        key,
                        value: Cow::Borrowed(&plan.value[..]),
                    }
                }
            }
            None => {
                let (from, to) = pick_pair(random, plan.accounts.len(), plan.hot_fraction);
                let transfer = Transfer {
                    from: &plan.accounts[from],
                    to: &plan.accounts[to],
                    amount: 1,
                };
                Request::Call {
                    module: Cow::Borrowed("bank"),
                    procedure: Cow::Borrowed("transfer"),
                    encoding: transdb_proto::message::Encoding::Postcard,
                    args: Cow::Owned(postcard::to_allocvec(&transfer).expect("encodable")),
                }
            }
        });
    }
    let answers = client.pipeline(&requests).await;
    let finished = Instant::now();
    match answers {
        Ok(answers) => answers
            .into_iter()
            .map(|answer| (settle(answer.map(drop)), finished))
            .collect(),
        Err(error) => (0..pipeline).map(|_| (failed(&error), finished)).collect(),
    }
}

/// One operation of the plan's workload, and when it finished.
fn operation<'a>(
    client: &'a Client,
    plan: &'a Plan,
    random: &mut Random,
) -> impl Future<Output = (Outcome, Instant)> + 'a {
    enum Op {
        Get(String),
        Put(String),
        Transfer(usize, usize),
        Interactive(usize, usize),
    }
    let op = match plan.workload.read_fraction() {
        Some(reads) => {
            let key = bench_key(random.below(plan.key_space));
            if random.chance(reads) {
                Op::Get(key)
            } else {
                Op::Put(key)
            }
        }
        None => {
            let (from, to) = pick_pair(random, plan.accounts.len(), plan.hot_fraction);
            if plan.workload == Workload::Bank {
                Op::Transfer(from, to)
            } else {
                Op::Interactive(from, to)
            }
        }
    };
    async move {
        let outcome = match op {
            Op::Get(key) => settle(client.get(&key).await.map(drop)),
            Op::Put(key) => settle(client.put(&key, &plan.value).await),
            Op::Transfer(from, to) => {
                let transfer = Transfer {
                    from: &plan.accounts[from],
                    to: &plan.accounts[to],
                    amount: 1,
                };
                settle(client.call::<_, ()>("bank", "transfer", &transfer).await)
            }
            Op::Interactive(from, to) => {
                interactive_transfer(client, &plan.accounts[from], &plan.accounts[to]).await
            }
        };
        (outcome, Instant::now())
    }
}

fn settle(result: Result<(), Error>) -> Outcome {
    match result {
        Ok(()) => Outcome::Committed,
        Err(Error::Rejected(error))
            if error.code == ErrorCode::ABORTED && error.message.contains("insufficient funds") =>
        {
            Outcome::Aborted("insufficient_funds")
        }
        Err(Error::Rejected(error)) if error.code == ErrorCode::ABORTED => {
            Outcome::Aborted("aborted")
        }
        Err(error) => failed(&error),
    }
}

fn failed(error: &Error) -> Outcome {
    Outcome::Failed(error_kind(error), error.to_string())
}

/// Moves 1 unit from `from` to `to` in an interactive transaction.
async fn interactive_transfer(client: &Client, from: &str, to: &str) -> Outcome {
    let result: Result<Outcome, Error> = async {
        let mut transaction = client.begin().await?;
        let from_key = account_key(from);
        let to_key = account_key(to);
        let (Some(from_balance), Some(to_balance)) = (
            balance(transaction.get(&from_key).await?),
            balance(transaction.get(&to_key).await?),
        ) else {
            transaction.rollback().await?;
            return Ok(Outcome::Aborted("unknown_account"));
        };
        if from_balance < 1 {
            transaction.rollback().await?;
            return Ok(Outcome::Aborted("insufficient_funds"));
        }
        transaction
            .put(&from_key, (from_balance - 1).to_string())
            .await?;
        transaction
            .put(&to_key, (to_balance + 1).to_string())
            .await?;
        transaction.commit().await?;
        Ok(Outcome::Committed)
    }
    .await;
    match result {
        Ok(outcome) => outcome,
        Err(error) if error.code() == Some(ErrorCode::CONFLICT) => Outcome::Aborted("conflict"),
        Err(error) => failed(&error),
    }
}

/// A balance as `bank` stores it: decimal text.
pub(crate) fn balance(value: Option<Vec<u8>>) -> Option<i64> {
    std::str::from_utf8(&value?).ok()?.trim().parse().ok()
}

impl BenchReport {
    /// Prints the human-readable report.
    pub fn print(&self) {
        println!(
            "{} for {:.1} s: {} clients on {} connections, pipeline {}{}, server {}{}",
            self.workload,
            self.duration_s,
            self.clients,
            self.connections,
            self.pipeline,
            self.target_rate
                .map(|rate| format!(", paced to {rate:.0} ops/s"))
                .unwrap_or_default(),
            self.server,
            self.embedded_durability
                .as_ref()
                .map(|mode| format!(" (embedded, --durability {mode})"))
                .unwrap_or_default()
        );
        println!(
            "  {} ops ({} committed, {} aborted): {:.0} ops/s",
            self.ops, self.committed, self.aborts, self.throughput_ops_per_sec
        );
        println!(
            "  latency ms: p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}  mean {:.3}",
            self.p50_ms, self.p95_ms, self.p99_ms, self.max_ms, self.mean_ms
        );
        let list = |counts: &BTreeMap<String, u64>| {
            if counts.is_empty() {
                "none".to_owned()
            } else {
                counts
                    .iter()
                    .map(|(kind, count)| format!("{kind} {count}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        println!("  aborts: {}", list(&self.aborts_by_kind));
        println!("  errors: {}", list(&self.errors_by_kind));
        if let Some(total) = &self.bank_total {
            if total.before == total.after {
                println!("  bank total unchanged: {}", total.after);
            } else {
                println!(
                    "  BANK TOTAL CHANGED: {} before, {} after",
                    total.before, total.after
                );
            }
        }
    }

    /// Whether the run found the bank's total changed (transfers were not atomic).
    pub fn total_changed(&self) -> bool {
        self.bank_total
            .as_ref()
            .is_some_and(|total| total.before != total.after)
    }
}
