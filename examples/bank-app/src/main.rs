//! The bank demo. Deploys `procedures/bank`, opens accounts, runs concurrent clients that
//! transfer money between random accounts for a while, prints throughput and latency
//! percentiles, and checks that the total of all balances is unchanged.
//!
//! Without `--server` it starts a server itself, on the embedded defaults
//! (127.0.0.1:7878, ./transdb-data), and keeps it running afterwards so that the CLI can
//! look at the accounts (`--exit` stops it instead).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use hdrhistogram::Histogram;
use transdb_client::{Client, ClientConfig, Error};
use transdb_host::bench::{Random, bank_total, open_accounts, pick_pair};
use transdb_host::cli::DurabilityArg;
use transdb_host::{Server, ServerConfig};
use transdb_procedures_bank::Transfer;
use transdb_proto::ErrorCode;

/// The server's allocator, as in the `transdb` binary (see docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run the bank demo against a TransDB server.
#[derive(Parser, Debug)]
#[command(name = "bank-app", version, about)]
struct Args {
    /// Server to use; without it, the app starts one on the embedded defaults.
    #[arg(long, env = "TRANSDB_SERVER")]
    server: Option<String>,
    /// Address for the server the app starts itself (without --server).
    #[arg(long, default_value = transdb_host::config::DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// Certificate to trust for --server (default: transdb-data/cert.pem).
    #[arg(long, env = "TRANSDB_CA")]
    ca: Option<PathBuf>,
    /// Admin token file for --server (the app deploys the bank module), default:
    /// transdb-data/admin.token.
    #[arg(long, env = "TRANSDB_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The bank module to deploy.
    #[arg(long, default_value = "target/procedures/bank.wasm")]
    module: PathBuf,
    /// Number of accounts.
    #[arg(long, default_value_t = 1_000)]
    accounts: usize,
    /// Opening balance of each account.
    #[arg(long, default_value_t = 1_000)]
    balance: i64,
    /// Concurrent transfer clients.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// Seconds to run transfers.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Stop a server the app started once the run is over, instead of keeping it running.
    #[arg(long)]
    exit: bool,
    /// Durability of the server the app starts itself (without --server).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync)]
    durability: DurabilityArg,
    /// Data directory of the server the app starts itself (without --server).
    #[arg(long, default_value = transdb_host::config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
}

/// Tasks per QUIC connection: one connection carries many concurrent requests.
const CLIENTS_PER_CONNECTION: usize = 10;

fn main() -> Result<()> {
    let args = Args::parse();
    if args.accounts < 2 || args.clients == 0 || args.duration == 0 {
        bail!("--accounts must be at least 2, --clients and --duration at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let module = std::fs::read(&args.module).with_context(|| {
        format!(
            "cannot read {}: build the procedures first with scripts/build-procedures",
            args.module.display()
        )
    })?;
    let (server, addr, config) = match &args.server {
        Some(addr) => (
            None,
            addr.clone(),
            ClientConfig::from_ca_file(
                &args
                    .ca
                    .clone()
                    .unwrap_or_else(|| "transdb-data/cert.pem".into()),
            )?
            .with_token_file(
                &args
                    .token_file
                    .clone()
                    .unwrap_or_else(|| "transdb-data/admin.token".into()),
            )?,
        ),
        None => {
            tracing_subscriber::fmt()
                .with_env_filter("warn")
                .with_writer(std::io::stderr)
                .init();
            let mut config = ServerConfig::new(&args.data_dir);
            config.listen = args.listen;
            config.durability = args
                .durability
                .durability(transdb_host::log::DEFAULT_FSYNC_INTERVAL);
            let server = Server::start(config)
                .await
                .context("cannot start a server (is one already running here? then pass --server 127.0.0.1:7878)")?;
            println!(
                "started a TransDB server on {} (data in {}, --durability {:?})",
                server.local_addr(),
                args.data_dir.display(),
                args.durability
            );
            let (addr, config) = (
                server.local_addr().to_string(),
                server.admin_client_config()?,
            );
            (Some(server), addr, config)
        }
    };
    let client = Client::connect(&addr, config.clone()).await?;
    let info = client.deploy("bank", &module).await?;
    println!(
        "deployed bank version {} ({} procedures)",
        &info.version[..12],
        info.procedures.len()
    );

    let names: Vec<String> = (0..args.accounts)
        .map(|account| format!("acct-{account}"))
        .collect();
    let existing = open_accounts(&client, &names, args.balance).await?;
    if existing > 0 {
        println!("{existing} accounts existed already (kept as they are)");
    }
    let before = bank_total(&client, &names).await?;
    println!(
        "{} accounts hold {before} units; {} clients transfer for {} s",
        names.len(),
        args.clients,
        args.duration
    );

    let names = Arc::new(names);
    let report = transfer_for(&addr, &config, names.clone(), &args).await?;
    report.print();

    let after = bank_total(&client, &names).await?;
    if after != before {
        bail!("TOTAL CHANGED: {before} before, {after} after: transfers were not atomic");
    }
    println!("total unchanged: {after} units (every transfer was atomic)");
    if report.errors > 0 {
        bail!("{} transfers failed with errors", report.errors);
    }

    if let Some(server) = server {
        if !args.exit {
            println!(
                "\nthe server keeps running on {addr}. Try, in another terminal of this directory:\n  \
                 transdb --server {addr} call bank balance --json '{{\"account\":\"acct-1\"}}'\n  \
                 transdb --server {addr} procedures\nCtrl-C stops it."
            );
            tokio::signal::ctrl_c().await?;
        }
        client.close().await;
        server.shutdown().await;
    }
    Ok(())
}

struct Report {
    committed: u64,
    aborted: u64,
    errors: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

impl Report {
    fn print(&self) {
        let seconds = self.elapsed.as_secs_f64();
        let quantile = |q: f64| self.latency_us.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{} transfers committed, {} aborted (insufficient funds), {} errors in {seconds:.1} s: {:.0} transfers/s",
            self.committed,
            self.aborted,
            self.errors,
            (self.committed + self.aborted) as f64 / seconds
        );
        println!(
            "latency ms: p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}",
            quantile(0.50),
            quantile(0.95),
            quantile(0.99),
            self.latency_us.max() as f64 / 1000.0
        );
    }
}

async fn transfer_for(
    addr: &str,
    config: &ClientConfig,
    names: Arc<Vec<String>>,
    args: &Args,
) -> Result<Report> {
    let duration = Duration::from_secs(args.duration);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let mut connection = None;
    for worker in 0..args.clients {
        if worker % CLIENTS_PER_CONNECTION == 0 {
            connection = Some(Client::connect(addr, config.clone()).await?);
        }
        let client = connection.clone().expect("set above");
        let (names, done, stop) = (names.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            transfer_loop(client, names, worker as u64, done, stop).await
        }));
    }
    let progress = indicatif::ProgressBar::new(duration.as_millis() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {elapsed:>3} {msg}")
            .expect("valid template"),
    );
    let start = Instant::now();
    while start.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let elapsed = start.elapsed().min(duration);
        progress.set_position(elapsed.as_millis() as u64);
        let count = done.load(Ordering::Relaxed);
        progress.set_message(format!(
            "{count} transfers, {:.0}/s",
            count as f64 / elapsed.as_secs_f64()
        ));
    }
    stop.store(true, Ordering::Relaxed);
    progress.finish_and_clear();
    let mut report = Report {
        committed: 0,
        aborted: 0,
        errors: 0,
        elapsed: start.elapsed(),
        latency_us: Histogram::new(3).expect("valid precision"),
    };
    for task in tasks {
        let outcome = task.await?;
        report.committed += outcome.committed;
        report.aborted += outcome.aborted;
        report.errors += outcome.errors;
        report
            .latency_us
            .add(&outcome.latency_us)
            .expect("same precision");
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

struct Outcome {
    committed: u64,
    aborted: u64,
    errors: u64,
    latency_us: Histogram<u64>,
}

async fn transfer_loop(
    client: Client,
    names: Arc<Vec<String>>,
    seed: u64,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Outcome {
    let mut random = Random::new(seed);
    let mut outcome = Outcome {
        committed: 0,
        aborted: 0,
        errors: 0,
        latency_us: Histogram::new(3).expect("valid precision"),
    };
    while !stop.load(Ordering::Relaxed) {
        let (from, to) = pick_pair(&mut random, names.len(), 0.0);
        let transfer = Transfer {
            from: names[from].clone(),
            to: names[to].clone(),
            amount: 1 + random.below(10) as i64,
        };
        let started = Instant::now();
        match client.call::<_, ()>("bank", "transfer", &transfer).await {
            Ok(()) => outcome.committed += 1,
            Err(Error::Rejected(error)) if error.code == ErrorCode::ABORTED => outcome.aborted += 1,
            Err(error) => {
                if outcome.errors == 0 {
                    eprintln!("transfer failed: {error}");
                }
                outcome.errors += 1;
            }
        }
        let _ = outcome
            .latency_us
            .record(started.elapsed().as_micros() as u64);
        done.fetch_add(1, Ordering::Relaxed);
    }
    outcome
}
