//! Support for TransDB's end-to-end tests: servers in-process and as child processes of the
//! real `transdb` binary, clients, and raw QUIC connections for speaking bad protocol.
//!
//! The child-process helpers use the binary that `cargo test --workspace` builds next to
//! the test executables (`target/<profile>/transdb`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use tempfile::TempDir;
use transdb_client::{Client, ClientConfig};
use transdb_host::{Server, ServerConfig};

/// Upper bound for anything a test waits for; hitting it is a failure, never a pacing device.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A server in this process on a free loopback port, with its own data directory.
pub struct TestServer {
    /// The running server.
    pub server: Server,
    /// Its data directory (deleted on drop).
    pub data_dir: TempDir,
}

impl TestServer {
    /// Starts a server with the embedded defaults (except the port and data directory).
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts a server after `adjust` has changed its configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let data_dir = tempfile::tempdir().expect("temporary directory");
        let mut config = ServerConfig::new(data_dir.path());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.shards = 2;
        adjust(&mut config);
        let server = Server::start(config).await.expect("server starts");
        TestServer { server, data_dir }
    }

    /// The server's address as `host:port`.
    pub fn addr(&self) -> String {
        self.server.local_addr().to_string()
    }

    /// A client that trusts this server's certificate.
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr(), self.client_config())
            .await
            .expect("client connects")
    }

    /// The configuration of a client that trusts this server and authenticates with its
    /// admin token.
    pub fn client_config(&self) -> ClientConfig {
        self.server
            .admin_client_config()
            .expect("certificate and admin token load")
    }

    /// The server's admin token.
    pub fn admin_token(&self) -> String {
        admin_token(self.data_dir.path())
    }

    /// A raw QUIC connection to this server, authenticated with the admin token.
    pub async fn raw_connection(&self) -> quinn::Connection {
        let connection = raw_connection(
            self.server.local_addr(),
            self.certificate(),
            transdb_proto::ALPN,
        )
        .await
        .expect("raw connection");
        let answer = authenticate(&connection, Some(&self.admin_token())).await;
        assert!(
            matches!(answer, transdb_proto::Response::Authenticated { .. }),
            "{answer:?}"
        );
        connection
    }

    /// The server's certificate.
    pub fn certificate(&self) -> CertificateDer<'static> {
        transdb_client::tls::load_certificates(self.server.certificate_path())
            .unwrap()
            .remove(0)
    }
}

/// The bytes of a procedure module built by `scripts/build-procedures`
/// (`target/procedures/<name>.wasm`).
///
/// # Panics
/// With the command to run if it has not been built.
pub fn procedure_module(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/procedures")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "cannot read {} ({error}): build the procedures first with `scripts/build-procedures` \
             (`scripts/test` does it before running the tests)",
            path.display()
        )
    })
}

/// The admin token a server wrote into `data_dir` on first start.
pub fn admin_token(data_dir: &Path) -> String {
    transdb_client::read_token_file(&data_dir.join(transdb_client::ADMIN_TOKEN_FILE))
        .expect("the server wrote its admin token")
}

/// Sends `Authenticate { token }` on a new stream of `connection` and returns the answer.
pub async fn authenticate(
    connection: &quinn::Connection,
    token: Option<&str>,
) -> transdb_proto::Response<'static> {
    let (mut send, mut recv) = connection.open_bi().await.expect("open a stream");
    let request = transdb_proto::Request::Authenticate {
        token: token.map(Into::into),
    };
    send.write_all(&transdb_proto::frame::encode_to_vec(&request).unwrap())
        .await
        .expect("send Authenticate");
    let _ = send.finish();
    transdb_client::wire::FrameReader::new()
        .next::<transdb_proto::Response<'_>>(&mut recv)
        .await
        .expect("an answer to Authenticate")
        .expect("an answer, not the end of the stream")
        .into_owned()
}

/// Sends `bytes` on a new stream of `connection` (a raw one: see
/// [`TestServer::raw_connection`]), finishing the stream if `finish`, and returns what came
/// back: the response frames' bytes, or the code the server reset the stream with.
///
/// The bytes need not be well-formed frames: this is for speaking bad protocol. The server
/// may reset the stream before all of them are written; the outcome is then the reset.
///
/// # Panics
/// If the stream has neither ended nor been reset within [`PATIENCE`], if the answer is
/// longer than two frames of `MAX_FRAME_BYTES`, or if the stream ends any other way (the
/// connection lost).
pub async fn exchange(
    connection: &quinn::Connection,
    bytes: &[u8],
    finish: bool,
) -> Result<Vec<u8>, transdb_proto::ErrorCode> {
    let (mut send, mut recv) = connection.open_bi().await.expect("open a stream");
    // The server may reset before everything is written; the read below reports the code.
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    let answer = recv.read_to_end(2 * transdb_proto::limits::MAX_FRAME_BYTES);
    let outcome = tokio::time::timeout(PATIENCE, answer)
        .await
        .expect("the stream ends within PATIENCE");
    match outcome {
        Ok(bytes) => Ok(bytes),
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            Err(transdb_proto::ErrorCode(code.into_inner() as u16))
        }
        Err(other) => panic!("unexpected stream outcome: {other}"),
    }
}

/// Sends a `Ping` on a new stream of `connection` (a raw one: see
/// [`TestServer::raw_connection`]) and checks that the answer is exactly one frame, a `Pong`.
///
/// # Panics
/// If the stream is reset or the answer is anything else (see also [`exchange`]).
pub async fn ping(connection: &quinn::Connection) {
    let reply = exchange(
        connection,
        &transdb_proto::frame::encode_to_vec(&transdb_proto::Request::Ping).unwrap(),
        true,
    )
    .await
    .expect("a Pong, not a reset");
    let (payload, used) = transdb_proto::frame::split(&reply)
        .unwrap()
        .expect("a whole frame");
    assert_eq!(used, reply.len(), "exactly one frame");
    assert_eq!(
        transdb_proto::frame::decode::<transdb_proto::Response<'_>>(payload).unwrap(),
        transdb_proto::Response::Pong
    );
}

/// A raw QUIC connection to `addr` trusting `certificate`, offering `alpn` (not
/// authenticated: see [`authenticate`]).
pub async fn raw_connection(
    addr: SocketAddr,
    certificate: CertificateDer<'static>,
    alpn: &[u8],
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate).unwrap();
    let mut tls =
        rustls::ClientConfig::builder_with_provider(transdb_client::tls::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint.connect(addr, "localhost").unwrap().await
}

/// The `transdb` binary built by this `cargo test` run.
///
/// # Panics
/// With instructions if it is missing or older than the sources it is built from.
pub fn transdb_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TRANSDB_BIN") {
        return path.into();
    }
    let test_executable = std::env::current_exe().expect("test executable path");
    let profile_dir = test_executable
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join(format!("transdb{}", std::env::consts::EXE_SUFFIX));
    let hint = "run the tests with `cargo test --workspace` (it builds the transdb binary), \
                or build it first with `cargo build -p transdb-host`";
    let built = std::fs::metadata(&binary)
        .and_then(|metadata| metadata.modified())
        .unwrap_or_else(|_| panic!("no transdb binary at {}: {hint}", binary.display()));
    // Stale if any source it is built from changed after it was linked. (Comparing with the
    // libraries in `deps/` is not reliable: several feature variants of one crate live there.)
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest_source = ["host/src", "proto-spec/src", "sdk/client/src"]
        .iter()
        .filter_map(|dir| newest_modification(&workspace.join(dir)))
        .max();
    if let Some(source) = newest_source {
        assert!(
            built >= source,
            "{} is older than the server's sources: {hint}",
            binary.display()
        );
    }
    binary
}

/// A command that runs the `transdb` binary ([`transdb_binary`]) in `cwd`, without the
/// `TRANSDB_SERVER`, `TRANSDB_CA`, `TRANSDB_TOKEN` and `TRANSDB_TOKEN_FILE` variables: a
/// test runs the CLI as a newcomer would, never with the developer's environment.
pub fn transdb_command(cwd: &Path) -> Command {
    let mut command = Command::new(transdb_binary());
    command
        .current_dir(cwd)
        .env_remove("TRANSDB_SERVER")
        .env_remove("TRANSDB_CA")
        .env_remove("TRANSDB_TOKEN")
        .env_remove("TRANSDB_TOKEN_FILE");
    command
}

/// The newest modification time of the files under `dir`.
fn newest_modification(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
        let path = entry.path();
        let modified = if path.is_dir() {
            newest_modification(&path)
        } else {
            entry
                .metadata()
                .and_then(|metadata| metadata.modified())
                .ok()
        };
        newest = newest.max(modified);
    }
    newest
}

/// A `transdb serve` child process. Killed on drop if still running.
pub struct ChildServer {
    child: Child,
    lines: Receiver<String>,
    log_lines: Receiver<String>,
    /// The address it printed it listens on.
    pub addr: SocketAddr,
}

impl ChildServer {
    /// Runs `transdb serve --listen <listen> <extra...>` in `cwd` and waits until it
    /// prints the address it listens on.
    pub fn start(cwd: &Path, listen: &str, extra: &[&str]) -> ChildServer {
        let mut child = Command::new(transdb_binary())
            .current_dir(cwd)
            .args(["serve", "--listen", listen, "--shards", "2"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("transdb serve starts");
        let lines = line_channel(child.stdout.take().unwrap(), "server");
        let log_lines = line_channel(child.stderr.take().unwrap(), "server log");
        let mut server = ChildServer {
            child,
            lines,
            log_lines,
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        let line = server.wait_for_line("transdb listening on ");
        let addr = line["transdb listening on ".len()..]
            .split_whitespace()
            .next()
            .unwrap();
        server.addr = addr.parse().expect("printed address parses");
        server
    }

    /// Waits for the next stdout line that starts with `prefix` and returns it.
    ///
    /// # Panics
    /// If the process ends or [`PATIENCE`] passes first.
    pub fn wait_for_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no line starting with {prefix:?} within {PATIENCE:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "server exited ({:?}) before printing {prefix:?}",
                        self.child.wait()
                    )
                }
            }
        }
    }

    /// Waits for the next line of the server's log (stderr) that contains all of `parts`.
    pub fn wait_for_log(&mut self, parts: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self
                .log_lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if parts.iter().all(|part| line.contains(part)) => return line,
                Ok(_) => continue,
                Err(error) => panic!("no log line containing {parts:?} ({error})"),
            }
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit (at most [`PATIENCE`]).
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {PATIENCE:?}"
            );
            // Process exit has no portable waitable-with-timeout; the lines channel closes
            // when stdout does, which is the exit for our purposes.
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.child.wait().unwrap(),
            }
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn line_channel(
    output: impl std::io::Read + Send + 'static,
    tag: &'static str,
) -> Receiver<String> {
    let (sender, receiver) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            println!("[{tag}] {line}");
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

/// Output of one CLI run.
pub struct CliOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Raw stdout.
    pub stdout: Vec<u8>,
    /// Stderr as text.
    pub stderr: String,
}

/// Runs the `transdb` CLI in `cwd` with `args`, feeding `stdin`.
pub fn cli(cwd: &Path, args: &[&str], stdin: &[u8]) -> CliOutput {
    use std::io::Write;
    let mut child = transdb_command(cwd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("transdb runs");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    CliOutput {
        status: output.status,
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into(),
    }
}

/// A small seeded PRNG (xorshift64), so a test's workload is reproducible from its seed.
pub struct Xorshift(u64);

impl Xorshift {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next number.
    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}
