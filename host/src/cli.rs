//! The `transdb` command line: `serve` runs a server, the other commands are a client.
//!
//! Exit status: 0 success, 1 `get` of a missing key, 2 any error (the message on stderr
//! says what to do). `transdb stress` has its own: see [`crate::stress`].

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use transdb_client::{Client, ClientConfig, ClientIdentity};
use transdb_proto::Role;

use crate::config::{
    self, CertificateFiles, DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_STREAMS_PER_CONNECTION, ServerConfig,
};
use crate::identity::CERTIFICATE_FILE;
use crate::log::Durability;
use crate::procedures;
use crate::runtime::{self, RuntimeLimits};
use crate::server::Server;

/// TransDB: a transactional in-memory key-value server with WebAssembly stored procedures.
#[derive(Parser, Debug)]
#[command(name = "transdb", version, about, propagate_version = true)]
pub struct Cli {
    /// Server address for the client commands.
    #[arg(long, global = true, env = "TRANSDB_SERVER", default_value = DEFAULT_LISTEN)]
    pub server: String,
    /// Certificate (PEM or DER) the client trusts: the server's self-signed certificate or
    /// its CA. Default: transdb-data/cert.pem in the current directory.
    #[arg(long, global = true, env = "TRANSDB_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Name to verify the server's certificate against (default: the host of --server).
    #[arg(long, global = true, value_name = "NAME")]
    pub server_name: Option<String>,
    /// File holding the token the client authenticates with. Default: the TRANSDB_TOKEN
    /// environment variable, else transdb-data/admin.token in the current directory (the
    /// admin token a server writes there on first start).
    #[arg(long, global = true, env = "TRANSDB_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Client certificate (PEM or DER) for servers that accept certificates (--client-ca).
    #[arg(long, global = true, requires = "client_key", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
    /// Private key of --client-cert.
    #[arg(long, global = true, requires = "client_cert", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a server (stops gracefully on SIGINT/SIGTERM).
    Serve(Box<ServeArgs>),
    /// Set KEY to VALUE; `-` as VALUE reads the raw bytes from stdin.
    Put {
        /// The key (UTF-8, at most 1024 bytes).
        key: String,
        /// The value, or `-` to read it from stdin.
        value: String,
    },
    /// Write the raw value of KEY to stdout; exit 1 with `not found` if it does not exist.
    Get {
        /// The key.
        key: String,
    },
    /// Remove KEY (succeeds whether or not it existed).
    Delete {
        /// The key.
        key: String,
    },
    /// Check that the server answers, and print the round-trip time.
    Ping,
    /// Deploy a WebAssembly module (e.g. target/procedures/bank.wasm) as NAME, replacing any
    /// module of that name.
    Deploy {
        /// Module name.
        name: String,
        /// The .wasm file.
        file: PathBuf,
    },
    /// Remove the module NAME (admin); calls after it get MODULE_NOT_FOUND.
    Undeploy {
        /// Module name.
        name: String,
    },
    /// Call a procedure as one transaction and print its JSON result.
    Call {
        /// Module name.
        module: String,
        /// Procedure name.
        procedure: String,
        /// Arguments as JSON, e.g. '{"from":"alice","to":"bob","amount":30}'.
        #[arg(long, default_value = "null")]
        json: String,
    },
    /// List deployed modules, their versions and procedures.
    Procedures,
    /// Print the server's statistics: keys and bytes per shard, memory, connections,
    /// requests by kind with latency, errors by code, calls per procedure with fuel, the
    /// log's durable position, uptime, and the hash of its state (equal states, equal
    /// hashes).
    Stats {
        /// Print one JSON object (the fields of `ServerStats` in SPEC.md) instead.
        #[arg(long)]
        json: bool,
    },
    /// Apply several writes atomically, in order: `transdb batch put a 1 put b 2 delete c`.
    Batch {
        /// `put KEY VALUE` and `delete KEY`, repeated.
        #[arg(required = true, num_args = 1.., value_name = "OP")]
        ops: Vec<String>,
    },
    /// An interactive shell: GET, PUT, DELETE, transactions (BEGIN, COMMIT, ROLLBACK),
    /// BATCH, CALL, STATS, BENCHMARK; HELP lists them. Reads stdin plainly when it is not a
    /// terminal.
    Shell,
    /// Make the server write a checkpoint now (without stopping traffic) and drop the log
    /// it covers.
    Checkpoint,
    /// Make the server write a consistent copy of its state into DIR, a new or empty
    /// directory on the server's machine; `transdb restore` starts a data directory from it.
    Backup {
        /// The directory, as the server's machine names it (an absolute path is safest).
        dir: String,
    },
    /// Measure throughput and latency: a workload from many clients for a while, against
    /// --server or a server started in this process (--embedded).
    Bench(Box<crate::bench::BenchArgs>),
    /// Drive a server with concurrent writers and transfers and check correctness while it
    /// runs. Exit status: 0 pass, 1 error rate above --max-error-rate, 2 more correctness
    /// violations than --max-violations, 3 the server could not be started or reached.
    Stress(Box<crate::stress::StressArgs>),
    /// Manage the server's tokens (admin): create, list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Shut the server down gracefully (admin): it answers what is in flight and exits.
    Shutdown,
    /// Offline: make a new data directory from a backup (then `transdb serve --data-dir`).
    Restore {
        /// The directory `transdb backup` wrote.
        #[arg(long)]
        from: PathBuf,
        /// The data directory to create; it must hold no database yet.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
}

/// `transdb token ...`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token and print it (only this once: the server keeps only its hash).
    Create {
        /// What the token may do.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// A label for people (default: the role's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the tokens: id, role, name, creation time (never the secrets).
    List,
    /// Revoke a token by id; connections using it are closed.
    Revoke {
        /// The token's id (the 16 hex digits after `tdb_`), as `transdb token list` shows.
        id: String,
    },
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::from_name(text).ok_or_else(|| format!("unknown role {text:?}: use read, write or admin"))
}

/// `--durability` of `transdb serve`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DurabilityArg {
    /// A reply waits until its transaction is fsynced (group commit): a crash loses nothing
    /// acknowledged.
    Sync,
    /// Replies do not wait; the log is fsynced every --fsync-interval-ms: a machine crash
    /// may lose that much.
    Async,
    /// Memory only: a restart starts empty.
    None,
}

impl DurabilityArg {
    /// The server setting for this choice; `fsync_interval` applies to `Async`.
    pub fn durability(self, fsync_interval: Duration) -> Durability {
        match self {
            DurabilityArg::Sync => Durability::Sync,
            DurabilityArg::Async => Durability::Async {
                interval: fsync_interval,
            },
            DurabilityArg::None => Durability::None,
        }
    }
}

/// `--log-format` of `transdb serve`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the current span's fields and the list of spans.
    Json,
}

/// Options of `transdb serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// UDP address to listen on.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Directory for the server's files: certificate, key, command log, checkpoints, modules.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// What a reply promises about a crash (see the README).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync)]
    pub durability: DurabilityArg,
    /// With --durability async: milliseconds between fsyncs of the log.
    #[arg(long, default_value_t = crate::log::DEFAULT_FSYNC_INTERVAL.as_millis() as u64)]
    pub fsync_interval_ms: u64,
    /// Seconds between periodic checkpoints (if anything was logged meanwhile); 0: none on a timer.
    #[arg(long, default_value_t = crate::durability::DEFAULT_CHECKPOINT_INTERVAL.as_secs())]
    pub checkpoint_interval_secs: u64,
    /// Write a checkpoint once the log has grown by this many bytes; 0: none on size.
    #[arg(long, default_value_t = crate::durability::DEFAULT_CHECKPOINT_LOG_BYTES)]
    pub checkpoint_log_bytes: u64,
    /// Size in bytes at which the log starts a new segment file.
    #[arg(long, default_value_t = crate::log::DEFAULT_SEGMENT_BYTES)]
    pub log_segment_bytes: u64,
    /// Move log segments that a checkpoint covers here instead of deleting them (an archive
    /// for audit or point-in-time replay).
    #[arg(long, value_name = "DIR")]
    pub log_archive: Option<PathBuf>,
    /// Number of shards [default: one per core].
    #[arg(long)]
    pub shards: Option<usize>,
    /// Certificate chain file (PEM or DER). Default: a self-signed certificate generated
    /// in the data directory on first start.
    #[arg(long, requires = "key", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key file (PEM or DER) of --cert.
    #[arg(long, requires = "cert", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Also serve HTTP on this TCP address: /keys/{key}, /call/{module}/{procedure},
    /// /metrics and /health, with the same tokens (`Authorization: Bearer`). Plain HTTP:
    /// keep it on loopback, or put a TLS proxy in front. `--http` alone: 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    pub http: Option<SocketAddr>,
    /// HTTP requests served at once, at most; beyond, 503 (retry later).
    #[arg(long, default_value_t = crate::http::DEFAULT_MAX_HTTP_REQUESTS)]
    pub max_http_requests: usize,
    /// Log level or filter (e.g. `debug`, `transdb_host=trace`); overrides RUST_LOG.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format on stderr: `text` for people, `json` for one JSON object per line
    /// (timestamp, level, target, fields and the spans: `remote`, `request_id`, ...).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Maximum number of client connections.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Maximum number of concurrent requests (streams) per connection.
    #[arg(long, default_value_t = DEFAULT_MAX_STREAMS_PER_CONNECTION)]
    pub max_streams_per_connection: u32,
    /// Seconds a silent connection lives.
    #[arg(long, default_value_t = config::DEFAULT_IDLE_TIMEOUT.as_secs())]
    pub idle_timeout_secs: u64,
    /// Seconds shutdown waits for in-flight requests.
    #[arg(long, default_value_t = config::DEFAULT_SHUTDOWN_GRACE.as_secs())]
    pub shutdown_grace_secs: u64,
    /// Fuel per procedure call (about one unit per wasm instruction).
    #[arg(long, default_value_t = runtime::DEFAULT_FUEL_PER_CALL)]
    pub fuel_per_call: u64,
    /// Linear memory per procedure call, in bytes.
    #[arg(long, default_value_t = runtime::DEFAULT_MEMORY_BYTES)]
    pub max_memory_bytes: usize,
    /// Wasm stack per procedure call, in bytes.
    #[arg(long, default_value_t = runtime::DEFAULT_WASM_STACK_BYTES)]
    pub wasm_stack_bytes: usize,
    /// Table elements per module instance.
    #[arg(long, default_value_t = runtime::DEFAULT_TABLE_ELEMENTS)]
    pub max_table_elements: usize,
    /// Largest procedure result, in bytes.
    #[arg(long, default_value_t = runtime::DEFAULT_OUTPUT_BYTES)]
    pub max_output_bytes: usize,
    /// Distinct keys one transaction (call or interactive transaction) may declare or touch.
    #[arg(long, default_value_t = runtime::DEFAULT_KEYS_PER_CALL)]
    pub max_keys_per_call: usize,
    /// Largest module, in bytes.
    #[arg(long, default_value_t = runtime::DEFAULT_MODULE_BYTES)]
    pub max_module_bytes: usize,
    /// Deployed modules at most.
    #[arg(long, default_value_t = procedures::DEFAULT_MAX_MODULES)]
    pub max_modules: usize,
    /// Procedure calls running at once.
    #[arg(long, default_value_t = runtime::DEFAULT_CONCURRENT_CALLS)]
    pub max_concurrent_calls: u32,
    /// Transactions ordered and unfinished at most; beyond, new requests get OVERLOADED.
    #[arg(long, default_value_t = crate::scheduler::DEFAULT_MAX_PENDING_TRANSACTIONS)]
    pub max_pending_transactions: usize,
    /// Wall-clock backstop per call, in milliseconds (fuel is the real CPU limit).
    #[arg(long, default_value_t = runtime::DEFAULT_DEADLINE.as_millis() as u64)]
    pub call_deadline_ms: u64,
    /// Milliseconds an interactive transaction may wait between two requests before it is
    /// rolled back (TRANSACTION_TIMEOUT).
    #[arg(long, default_value_t = crate::interactive::DEFAULT_TRANSACTION_IDLE_TIMEOUT.as_millis() as u64)]
    pub transaction_idle_timeout_ms: u64,
    /// Bytes of writes (keys and values) one interactive transaction may buffer.
    #[arg(long, default_value_t = crate::interactive::DEFAULT_MAX_TRANSACTION_BYTES)]
    pub max_transaction_bytes: usize,
    /// Size limit of the store (keys, values and 64 bytes per key), e.g. 8GiB: beyond it,
    /// requests that could add data get STORE_FULL and nothing is evicted. 0: no limit.
    /// [default: half the machine's memory]
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// Bytes of request frames being read or executed at once, over all connections; a
    /// request beyond it is refused with OVERLOADED.
    #[arg(long, value_name = "SIZE", default_value = "1GiB")]
    pub max_request_memory: String,
    /// Seconds a stream may make no progress (no request, a request half-sent, a response
    /// unread) before it is reset with STREAM_TIMEOUT.
    #[arg(long, default_value_t = config::DEFAULT_STREAM_TIMEOUT.as_secs())]
    pub stream_timeout_secs: u64,
    /// Seconds a new connection has to authenticate before it is closed.
    #[arg(long, default_value_t = config::DEFAULT_AUTH_TIMEOUT.as_secs())]
    pub auth_timeout_secs: u64,
    /// Accept client certificates issued by the CA in FILE, granting ROLE (read, write or
    /// admin): `--client-ca write=apps-ca.pem`. Repeat for several CAs. Tokens keep working.
    #[arg(long, value_parser = parse_client_ca_arg, value_name = "ROLE=FILE")]
    pub client_ca: Vec<(Role, PathBuf)>,
}

fn parse_client_ca_arg(text: &str) -> Result<(Role, PathBuf), String> {
    crate::auth::parse_client_ca(text).map_err(|error| error.to_string())
}

/// Runs the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // `transdb stress` reserves 1 and 2 for what it finds; a usage error means the
            // run could not be set up.
            let stress = subcommand(std::env::args().skip(1)).as_deref() == Some("stress");
            if stress && error.use_stderr() {
                let _ = error.print();
                return ExitCode::from(crate::stress::EXIT_SETUP);
            }
            error.exit();
        }
    };
    let outcome = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Bench(ref args) => bench(&cli, args),
        Command::Stress(ref args) => {
            return load_runtime().map_or(ExitCode::from(crate::stress::EXIT_SETUP), |runtime| {
                runtime.block_on(crate::stress::main(
                    &cli.server,
                    || client_config(&cli),
                    args,
                ))
            });
        }
        Command::Restore {
            ref from,
            ref data_dir,
        } => restore(from, data_dir),
        Command::Shell => {
            client_config(&cli).and_then(|config| crate::shell::run(&cli.server, config))
        }
        ref command => run_client(&cli, command),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("transdb: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs) -> Result<ExitCode> {
    init_logging(args.log_level.as_deref(), args.log_format)?;
    let mut config = ServerConfig::new(&args.data_dir);
    config.listen = args.listen;
    config.http = args.http;
    config.max_http_requests = args.max_http_requests.max(1);
    config.shards = args.shards.unwrap_or_else(config::default_shards);
    config.certificate_files = args
        .cert
        .zip(args.key)
        .map(|(certificate, key)| CertificateFiles { certificate, key });
    config.max_connections = args.max_connections;
    config.max_streams_per_connection = args.max_streams_per_connection;
    config.idle_timeout = Duration::from_secs(args.idle_timeout_secs);
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    config.max_modules = args.max_modules;
    config.max_pending_transactions = args.max_pending_transactions;
    config.transaction_idle_timeout = Duration::from_millis(args.transaction_idle_timeout_ms);
    config.max_transaction_bytes = args.max_transaction_bytes;
    if let Some(max_memory) = &args.max_memory {
        config.max_memory = config::parse_size(max_memory)
            .map_err(|error| anyhow::anyhow!("--max-memory: {error}"))?;
    }
    config.max_request_memory = config::parse_size(&args.max_request_memory)
        .map_err(|error| anyhow::anyhow!("--max-request-memory: {error}"))?
        .context("--max-request-memory cannot be unlimited: give a size such as 1GiB")?;
    config.stream_timeout = Duration::from_secs(args.stream_timeout_secs.max(1));
    config.auth_timeout = Duration::from_secs(args.auth_timeout_secs.max(1));
    config.client_cas = args.client_ca;
    config.durability = args
        .durability
        .durability(Duration::from_millis(args.fsync_interval_ms.max(1)));
    config.checkpoint_interval = Duration::from_secs(args.checkpoint_interval_secs);
    config.checkpoint_log_bytes = args.checkpoint_log_bytes;
    config.log_segment_bytes = args.log_segment_bytes;
    config.log_archive = args.log_archive;
    config.runtime = RuntimeLimits {
        fuel_per_call: args.fuel_per_call,
        memory_bytes: args.max_memory_bytes,
        wasm_stack_bytes: args.wasm_stack_bytes,
        table_elements: args.max_table_elements,
        output_bytes: args
            .max_output_bytes
            .min(transdb_proto::limits::MAX_VALUE_BYTES),
        keys_per_call: args.max_keys_per_call,
        module_bytes: args
            .max_module_bytes
            .min(transdb_proto::limits::MAX_VALUE_BYTES),
        concurrent_calls: args.max_concurrent_calls,
        deadline: Duration::from_millis(args.call_deadline_ms),
        log_lines_per_call: runtime::DEFAULT_LOG_LINES_PER_CALL,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config::default_shards())
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let server = Server::start(config.clone()).await?;
        println!(
            "transdb listening on {} (data dir {}, {} shards, certificate {})",
            server.local_addr(),
            config.data_dir.display(),
            config.shards,
            server.certificate_path().display()
        );
        if let Some(http) = server.http_addr() {
            println!("transdb HTTP gateway on http://{http}");
        }
        tokio::select! {
            signal = wait_for_signal() => signal?,
            () = server.shutdown_requested() => println!("transdb: shutdown requested by an admin"),
        }
        let in_flight = server.begin_shutdown();
        println!("transdb shutting down: waiting for {in_flight} in-flight requests");
        let report = server.shutdown().await;
        println!("transdb stopped ({} requests abandoned)", report.abandoned);
        Ok(ExitCode::SUCCESS)
    })
}

/// The subcommand named in `arguments` (the program name left out): the first argument
/// that is neither a global option nor its value.
fn subcommand(arguments: impl IntoIterator<Item = String>) -> Option<String> {
    const GLOBALS_WITH_VALUES: [&str; 6] = [
        "--server",
        "--ca",
        "--server-name",
        "--token-file",
        "--client-cert",
        "--client-key",
    ];
    let mut arguments = arguments.into_iter();
    while let Some(argument) = arguments.next() {
        if GLOBALS_WITH_VALUES.contains(&argument.as_str()) {
            arguments.next();
        } else if !argument.starts_with('-') {
            return Some(argument);
        }
    }
    None
}

/// The runtime of `bench` and `stress`: a worker per core, as the server has, so that an
/// embedded server and the clients share the machine as two processes would.
fn load_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn bench(cli: &Cli, args: &crate::bench::BenchArgs) -> Result<ExitCode> {
    let runtime = load_runtime()?;
    let report = runtime.block_on(crate::bench::run(&cli.server, || client_config(cli), args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report.print();
    }
    if report.total_changed() {
        anyhow::bail!("the bank's total changed during the run: transfers were not atomic");
    }
    Ok(ExitCode::SUCCESS)
}

fn restore(from: &std::path::Path, data_dir: &std::path::Path) -> Result<ExitCode> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let _lock = crate::server::lock_data_dir(data_dir)?;
    let info = crate::durability::restore(from, data_dir)?;
    println!(
        "restored {} keys at position {} into {}; start it with `transdb serve --data-dir {}`",
        info.keys,
        info.position,
        data_dir.display(),
        data_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn init_logging(level: Option<&str>, format: LogFormat) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => {
            EnvFilter::try_new(level).with_context(|| format!("invalid --log-level {level:?}"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // `span` holds the current span's fields (e.g. `request_id`), `spans` every
        // enclosing one (e.g. the connection's `remote`).
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    Ok(())
}

async fn wait_for_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT")?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")?;
    Ok(())
}

fn client_config(cli: &Cli) -> Result<ClientConfig> {
    let ca = match &cli.ca {
        Some(path) => path.clone(),
        None => {
            let default = PathBuf::from(DEFAULT_DATA_DIR).join(CERTIFICATE_FILE);
            if !default.exists() {
                anyhow::bail!(
                    "no certificate to trust: {} does not exist here. Run this in the directory where \
                     `transdb serve` runs, or pass the server's certificate with --ca FILE (or TRANSDB_CA)",
                    default.display()
                );
            }
            default
        }
    };
    let mut config = ClientConfig::from_ca_file(&ca)?;
    config.server_name = cli.server_name.clone();
    if let Some((certificate, key)) = cli.client_cert.as_ref().zip(cli.client_key.as_ref()) {
        config.client_identity = Some(ClientIdentity::load(certificate, key)?);
    }
    let default_token = PathBuf::from(DEFAULT_DATA_DIR).join(crate::auth::ADMIN_TOKEN_FILE);
    config.token = match (&cli.token_file, std::env::var("TRANSDB_TOKEN")) {
        (Some(file), _) => Some(transdb_client::read_token_file(file)?),
        (None, Ok(token)) if !token.trim().is_empty() => Some(token.trim().to_string()),
        _ if default_token.exists() => Some(transdb_client::read_token_file(&default_token)?),
        _ if config.client_identity.is_some() => None,
        _ => anyhow::bail!(
            "no token to authenticate with: {} does not exist here. Run this in the directory where \
             `transdb serve` runs (it writes its admin token there), or pass a token file with \
             --token-file FILE (or TRANSDB_TOKEN_FILE), or the token in TRANSDB_TOKEN",
            default_token.display()
        ),
    };
    Ok(config)
}

fn run_client(cli: &Cli, command: &Command) -> Result<ExitCode> {
    let config = client_config(cli)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let client = Client::connect(&cli.server, config).await?;
        let outcome = client_command(&client, command).await;
        client.close().await;
        outcome
    })
}

async fn client_command(client: &Client, command: &Command) -> Result<ExitCode> {
    match command {
        Command::Put { key, value } => {
            let bytes = if value == "-" {
                let mut buffer = Vec::new();
                std::io::stdin()
                    .lock()
                    .read_to_end(&mut buffer)
                    .context("cannot read the value from stdin")?;
                buffer
            } else {
                value.clone().into_bytes()
            };
            client.put(key, bytes).await?;
        }
        Command::Get { key } => match client.get(key).await? {
            Some(value) => {
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(&value)?;
                stdout.flush()?;
            }
            None => {
                eprintln!("not found");
                return Ok(ExitCode::from(1));
            }
        },
        Command::Delete { key } => {
            client.delete(key).await?;
        }
        Command::Ping => {
            let start = std::time::Instant::now();
            client.ping().await?;
            println!(
                "pong from {} in {:?}",
                client.server_addr(),
                start.elapsed()
            );
        }
        Command::Deploy { name, file } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let info = client.deploy(name, &bytes).await?;
            println!(
                "deployed {} version {} ({} bytes): {}",
                info.name,
                &info.version[..12.min(info.version.len())],
                info.size_bytes,
                info.procedures
                    .iter()
                    .map(|procedure| procedure.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Command::Call {
            module,
            procedure,
            json,
        } => {
            let output = client.call_json(module, procedure, json).await?;
            println!("{output}");
        }
        Command::Procedures => {
            let modules = client.modules().await?;
            if modules.is_empty() {
                println!("no modules deployed (deploy one with `transdb deploy NAME FILE.wasm`)");
            }
            for module in modules {
                println!(
                    "{} version {} ({} bytes)",
                    module.name,
                    &module.version[..12.min(module.version.len())],
                    module.size_bytes
                );
                for procedure in module.procedures {
                    let keys = if procedure.declares_keys {
                        "keys declared"
                    } else {
                        "keys discovered by a reconnaissance run"
                    };
                    println!("  {} ({keys})", procedure.name);
                }
            }
        }
        Command::Batch { ops } => {
            let ops = parse_batch(ops)?;
            let applied = client.batch(&ops).await?;
            println!("{applied} writes applied");
        }
        Command::Stats { json } => {
            let stats = client.stats().await?;
            if *json {
                let text = serde_json::to_string_pretty(&stats)?;
                writeln!(std::io::stdout().lock(), "{text}")?;
            } else {
                write_stats(&mut std::io::stdout().lock(), &stats)?;
            }
        }
        Command::Checkpoint => {
            let info = client.checkpoint().await?;
            println!(
                "checkpoint at position {}: {} keys, {} bytes, {}",
                info.position, info.keys, info.bytes, info.path
            );
        }
        Command::Backup { dir } => {
            let info = client.backup(dir).await?;
            println!(
                "backup at position {}: {} keys, {} bytes, {}",
                info.position, info.keys, info.bytes, info.path
            );
        }
        Command::Token(TokenCommand::Create { role, name }) => {
            let name = name.clone().unwrap_or_else(|| role.name().to_string());
            let (token, info) = client.create_token(&name, *role).await?;
            eprintln!(
                "created token {} ({}, role {}): it is printed once, below; store it now",
                info.id, info.name, info.role
            );
            println!("{token}");
        }
        Command::Token(TokenCommand::List) => {
            for token in client.tokens().await? {
                println!(
                    "{}  {:<5}  {}  created {}",
                    token.id, token.role, token.name, token.created_unix_secs
                );
            }
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            if client.revoke_token(id).await? {
                println!("revoked {id}");
            } else {
                eprintln!("no token with id {id} (see `transdb token list`)");
                return Ok(ExitCode::from(1));
            }
        }
        Command::Undeploy { name } => {
            if client.undeploy(name).await? {
                println!("undeployed {name}");
            } else {
                eprintln!("no module {name} is deployed (see `transdb procedures`)");
                return Ok(ExitCode::from(1));
            }
        }
        Command::Shutdown => {
            client.shutdown_server().await?;
            println!("the server is shutting down");
        }
        Command::Serve(_)
        | Command::Restore { .. }
        | Command::Bench(_)
        | Command::Stress(_)
        | Command::Shell => {
            unreachable!("serve, restore, bench, stress and shell are handled by the caller")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes what `transdb stats` prints (the shell's `STATS` too).
pub(crate) fn write_stats(
    out: &mut impl Write,
    stats: &transdb_client::ServerStats,
) -> std::io::Result<()> {
    let latency = |latency: &transdb_client::Latency| {
        format!(
            "p50 {} p95 {} p99 {} max {}",
            micros(latency.p50_us),
            micros(latency.p95_us),
            micros(latency.p99_us),
            micros(latency.max_us)
        )
    };
    writeln!(out, "uptime {}", uptime(stats.uptime_ms))?;
    writeln!(out, "position {}", stats.position)?;
    match stats.log.durable_position {
        Some(durable) => writeln!(
            out,
            "log durable through {durable} (lag {} positions)",
            stats.log.durability_lag
        )?,
        None => writeln!(out, "log none (--durability none: nothing is kept on disk)")?,
    }
    writeln!(out, "state hash {}", stats.state_hash)?;
    let memory = &stats.memory;
    write!(out, "memory: store {}", bytes(memory.store_bytes))?;
    if let Some(limit) = memory.store_limit {
        write!(out, " of {} (--max-memory)", bytes(limit))?;
    }
    if let Some(resident) = memory.process_resident {
        write!(out, ", process resident {}", bytes(resident))?;
    }
    writeln!(out)?;
    writeln!(out, "connections {}", stats.connections)?;
    writeln!(out, "authentication failures {}", stats.auth_failures)?;
    writeln!(out, "modules {}", stats.modules)?;
    for (index, shard) in stats.shards.iter().enumerate() {
        writeln!(
            out,
            "shard {index}: {} keys, {} bytes",
            shard.keys, shard.bytes
        )?;
    }
    if !stats.requests.is_empty() {
        writeln!(out, "requests:")?;
        for request in &stats.requests {
            writeln!(
                out,
                "  {:<12} {:>10} answered, {:>8} errors, {}",
                request.kind,
                request.count,
                request.errors,
                latency(&request.latency)
            )?;
        }
    }
    if !stats.errors.is_empty() {
        writeln!(out, "errors by code:")?;
        for error in &stats.errors {
            writeln!(
                out,
                "  {:<22} {:>3} {:>10}",
                error.name, error.code, error.count
            )?;
        }
    }
    if !stats.procedures.is_empty() {
        writeln!(out, "procedures:")?;
        for procedure in &stats.procedures {
            writeln!(
                out,
                "  {}.{}: {} calls, {} errors, {} fuel, {}",
                procedure.module,
                procedure.procedure,
                procedure.calls,
                procedure.errors,
                procedure.fuel_used,
                latency(&procedure.latency)
            )?;
        }
    }
    Ok(())
}

/// Microseconds for people: `850µs`, `12.3ms`, `1.20s`.
fn micros(micros: u64) -> String {
    match micros {
        0..1_000 => format!("{micros}µs"),
        1_000..1_000_000 => format!("{:.1}ms", micros as f64 / 1e3),
        _ => format!("{:.2}s", micros as f64 / 1e6),
    }
}

/// Bytes for people: `512 B`, `1.5 MiB`.
fn bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// An uptime for people: `3d 4h 5m 6s`.
fn uptime(millis: u64) -> String {
    let seconds = millis / 1000;
    let (days, hours, minutes, seconds) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m {seconds}s"),
        (0, _, _) => format!("{hours}h {minutes}m {seconds}s"),
        _ => format!("{days}d {hours}h {minutes}m {seconds}s"),
    }
}

/// Parses `put KEY VALUE` / `delete KEY` sequences (operation words in any case).
pub(crate) fn parse_batch(words: &[String]) -> Result<Vec<transdb_client::BatchOp<'static>>> {
    use transdb_client::BatchOp;
    let mut ops = Vec::new();
    let mut words = words.iter();
    while let Some(word) = words.next() {
        let missing = |what: &str| {
            anyhow::anyhow!("batch: `{word}` needs {what} (e.g. `put KEY VALUE` or `delete KEY`)")
        };
        match word.to_ascii_lowercase().as_str() {
            "put" => {
                let key = words.next().ok_or_else(|| missing("a key and a value"))?;
                let value = words.next().ok_or_else(|| missing("a value"))?;
                ops.push(BatchOp::Put {
                    key: key.clone().into(),
                    value: value.clone().into_bytes().into(),
                });
            }
            "delete" => {
                let key = words.next().ok_or_else(|| missing("a key"))?;
                ops.push(BatchOp::Delete {
                    key: key.clone().into(),
                });
            }
            other => anyhow::bail!(
                "batch: unknown operation `{other}`: use `put KEY VALUE` or `delete KEY`"
            ),
        }
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use transdb_client::BatchOp;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn batch_words_become_operations_in_order() {
        let ops = parse_batch(&words("PUT a 1 put b 2 Delete c")).unwrap();
        assert_eq!(
            ops,
            vec![
                BatchOp::Put {
                    key: "a".into(),
                    value: b"1".as_slice().into()
                },
                BatchOp::Put {
                    key: "b".into(),
                    value: b"2".as_slice().into()
                },
                BatchOp::Delete { key: "c".into() },
            ]
        );
    }

    #[test]
    fn the_subcommand_is_found_past_global_options() {
        let find = |line: &str| subcommand(words(line));
        assert_eq!(find("stress --duration 1").as_deref(), Some("stress"));
        assert_eq!(
            find("--server 127.0.0.1:1 --ca cert.pem stress --bogus").as_deref(),
            Some("stress")
        );
        assert_eq!(find("--server=h:1 stress").as_deref(), Some("stress"));
        assert_eq!(find("get stress --bogus").as_deref(), Some("get"));
        assert_eq!(find("--server stress get").as_deref(), Some("get"));
        assert_eq!(find("--help"), None);
    }

    #[test]
    fn malformed_batches_say_what_is_missing() {
        assert!(
            parse_batch(&words("put a"))
                .unwrap_err()
                .to_string()
                .contains("needs a value")
        );
        assert!(
            parse_batch(&words("delete"))
                .unwrap_err()
                .to_string()
                .contains("needs a key")
        );
        assert!(
            parse_batch(&words("get a"))
                .unwrap_err()
                .to_string()
                .contains("unknown operation `get`")
        );
    }
}
