//! `transdb shell`: an interactive shell over one client connection.
//!
//! On a terminal it edits lines and keeps a history in `~/.transdb_history` (none if HOME
//! is unset); otherwise it reads commands from stdin one a line, with no prompt, so it can
//! be scripted. Verbs are case-insensitive; `HELP` lists them. An error prints
//! `(error) <message>` and the shell goes on; `QUIT`, `EXIT` or the end of input (Ctrl-D)
//! ends it with exit status 0, rolling back a transaction left open.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use transdb_client::{Client, ClientConfig, Transaction};
use transdb_proto::ErrorCode;

/// The history file's name, in the home directory.
pub const HISTORY_FILE: &str = ".transdb_history";

/// Key prefix of `BENCHMARK` when none is given.
pub const DEFAULT_BENCHMARK_PREFIX: &str = "bench:";

/// Value size of `BENCHMARK` when none is given, in bytes.
pub const DEFAULT_BENCHMARK_VALUE_BYTES: usize = 100;

const HELP: &str = "\
GET key                  print the value (UTF-8, lossily) or (nil)
PUT key value            set key to value (the rest of the line)
DELETE key               remove key; prints 1 if it existed, else 0
BEGIN                    start a transaction: GET, PUT and DELETE go to it until
COMMIT                   apply its writes atomically; prints its position (CONFLICT: retry it)
ROLLBACK                 discard its writes
BATCH op ...             several writes atomically, in order: BATCH put a 1 put b 2 delete c
CALL module proc [json]  call a procedure with JSON arguments (the rest of the line)
STATS                    the server's statistics and state hash
BENCHMARK ops [prefix] [valuesize]
                         ops sequential PUTs then GETs of prefix0, prefix1, ... (default
                         prefix bench:, 100-byte values); prints ops/s. Deletes nothing.
HELP                     this list
QUIT, EXIT               leave the shell (so does Ctrl-D); an open transaction is rolled back";

/// Connects to `server` and runs the shell until `QUIT`, `EXIT` or the end of input.
pub fn run(server: &str, config: ClientConfig) -> Result<ExitCode> {
    // A worker thread keeps the connection alive (QUIC keep-alives) while the shell waits
    // for a line, which blocks this thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = runtime.block_on(Client::connect(server, config))?;
    let mut input = Input::open();
    let mut shell = Shell {
        client,
        transaction: None,
    };
    let mut stdout = std::io::stdout();
    loop {
        let prompt = if shell.transaction.is_some() {
            "transdb(tx)> "
        } else {
            "transdb> "
        };
        let Some(line) = input.read_line(prompt)? else {
            break;
        };
        let outcome = runtime.block_on(shell.execute(&line));
        match outcome {
            Ok(Step::Continue(output)) => {
                if !output.is_empty() {
                    writeln!(stdout, "{output}")?;
                }
            }
            Ok(Step::Quit) => break,
            Err(error) => writeln!(stdout, "(error) {error:#}")?,
        }
        stdout.flush()?;
    }
    if let Some(transaction) = shell.transaction.take() {
        let rolled_back = runtime.block_on(transaction.rollback());
        if rolled_back.is_ok() {
            writeln!(stdout, "(the open transaction was rolled back)")?;
        }
    }
    input.save_history();
    runtime.block_on(shell.client.close());
    Ok(ExitCode::SUCCESS)
}

/// Where lines come from: a line editor on a terminal, plain stdin otherwise.
enum Input {
    Editor {
        editor: Box<rustyline::DefaultEditor>,
        history: Option<PathBuf>,
    },
    Plain(std::io::StdinLock<'static>),
}

impl Input {
    fn open() -> Input {
        if std::io::stdin().is_terminal() {
            match rustyline::DefaultEditor::new() {
                Ok(mut editor) => {
                    let history =
                        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(HISTORY_FILE));
                    if let Some(path) = &history {
                        // A missing or unreadable history only means starting without one.
                        let _ = editor.load_history(path);
                    }
                    return Input::Editor {
                        editor: Box::new(editor),
                        history,
                    };
                }
                Err(error) => eprintln!("transdb: no line editing ({error}); reading plain lines"),
            }
        }
        Input::Plain(std::io::stdin().lock())
    }

    /// The next line without its line ending, or `None` at the end of input.
    fn read_line(&mut self, prompt: &str) -> Result<Option<String>> {
        match self {
            Input::Editor { editor, .. } => loop {
                match editor.readline(prompt) {
                    Ok(line) => {
                        if !line.trim().is_empty() {
                            let _ = editor.add_history_entry(line.as_str());
                        }
                        return Ok(Some(line));
                    }
                    // Ctrl-C abandons the line being typed, as in other shells.
                    Err(rustyline::error::ReadlineError::Interrupted) => {
                        eprintln!("(type QUIT or press Ctrl-D to leave)");
                    }
                    Err(rustyline::error::ReadlineError::Eof) => return Ok(None),
                    Err(error) => return Err(error).context("cannot read a line"),
                }
            },
            Input::Plain(stdin) => {
                let mut line = String::new();
                if stdin
                    .read_line(&mut line)
                    .context("cannot read a line from stdin")?
                    == 0
                {
                    return Ok(None);
                }
                let trimmed = line.trim_end_matches(['\n', '\r']).len();
                line.truncate(trimmed);
                Ok(Some(line))
            }
        }
    }

    fn save_history(&mut self) {
        if let Input::Editor {
            editor,
            history: Some(path),
        } = self
            && let Err(error) = editor.save_history(path)
        {
            eprintln!(
                "transdb: cannot save the history to {}: {error}",
                path.display()
            );
        }
    }
}

/// What a command asks of the loop.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Print this (nothing if empty) and read the next line.
    Continue(String),
    /// Leave the shell.
    Quit,
}

struct Shell {
    client: Client,
    /// The transaction BEGIN opened, until COMMIT, ROLLBACK or an error that ends it.
    transaction: Option<Transaction>,
}

impl Shell {
    async fn execute(&mut self, line: &str) -> Result<Step> {
        let (verb, rest) = split_word(line);
        let verb = verb.to_ascii_uppercase();
        let output = match verb.as_str() {
            "" => String::new(),
            "QUIT" | "EXIT" => return Ok(Step::Quit),
            "HELP" => HELP.to_string(),
            "GET" => {
                let key = one_key(&verb, rest)?;
                let value = match &mut self.transaction {
                    Some(transaction) => {
                        let value = transaction.get(key).await;
                        self.end_on_fatal(value)?
                    }
                    None => self.client.get(key).await?,
                };
                match value {
                    Some(value) => String::from_utf8_lossy(&value).into_owned(),
                    None => "(nil)".to_string(),
                }
            }
            "PUT" => {
                let (key, value) = split_word(rest);
                if key.is_empty() || value.is_empty() {
                    bail!("usage: PUT key value");
                }
                match &mut self.transaction {
                    Some(transaction) => {
                        let stored = transaction.put(key, value).await;
                        self.end_on_fatal(stored)?;
                    }
                    None => self.client.put(key, value).await?,
                }
                "OK".to_string()
            }
            "DELETE" => {
                let key = one_key(&verb, rest)?;
                let existed = match &mut self.transaction {
                    Some(transaction) => {
                        let existed = transaction.delete(key).await;
                        self.end_on_fatal(existed)?
                    }
                    None => self.client.delete(key).await?,
                };
                if existed { "1" } else { "0" }.to_string()
            }
            "BEGIN" => {
                no_arguments(&verb, rest)?;
                if self.transaction.is_some() {
                    bail!("a transaction is already open: COMMIT or ROLLBACK it first");
                }
                let transaction = self.client.begin().await?;
                let snapshot = transaction.snapshot();
                self.transaction = Some(transaction);
                format!("OK (snapshot at position {snapshot})")
            }
            "COMMIT" => {
                no_arguments(&verb, rest)?;
                let position = self.take_transaction()?.commit().await?;
                format!("committed at position {position}")
            }
            "ROLLBACK" => {
                no_arguments(&verb, rest)?;
                self.take_transaction()?.rollback().await?;
                "rolled back".to_string()
            }
            "BATCH" => {
                self.outside_transaction(&verb)?;
                let words: Vec<String> = rest.split_whitespace().map(String::from).collect();
                if words.is_empty() {
                    bail!("usage: BATCH put KEY VALUE | delete KEY ...");
                }
                let ops = crate::cli::parse_batch(&words)?;
                let applied = self.client.batch(&ops).await?;
                format!("{applied} writes applied")
            }
            "CALL" => {
                self.outside_transaction(&verb)?;
                let (module, rest) = split_word(rest);
                let (procedure, json) = split_word(rest);
                if module.is_empty() || procedure.is_empty() {
                    bail!("usage: CALL module procedure [json]");
                }
                let json = if json.is_empty() { "null" } else { json };
                self.client.call_json(module, procedure, json).await?
            }
            "STATS" => {
                no_arguments(&verb, rest)?;
                let stats = self.client.stats().await?;
                let mut text = Vec::new();
                crate::cli::write_stats(&mut text, &stats)?;
                String::from_utf8_lossy(&text).trim_end().to_string()
            }
            "BENCHMARK" => {
                self.outside_transaction(&verb)?;
                let options = BenchmarkOptions::parse(rest)?;
                benchmark(&self.client, &options).await?
            }
            _ => bail!("unknown command {verb:?}: type HELP for the list"),
        };
        Ok(Step::Continue(output))
    }

    fn take_transaction(&mut self) -> Result<Transaction> {
        self.transaction
            .take()
            .context("no transaction is open: BEGIN one first")
    }

    fn outside_transaction(&self, verb: &str) -> Result<()> {
        if self.transaction.is_some() {
            bail!("{verb} runs outside transactions: COMMIT or ROLLBACK the open one first");
        }
        Ok(())
    }

    /// Passes `result` on, first forgetting the transaction if its error ended it on the
    /// server (or broke its stream).
    fn end_on_fatal<T>(&mut self, result: Result<T, transdb_client::Error>) -> Result<T> {
        result.map_err(|error| {
            if ends_transaction(&error) {
                self.transaction = None;
                anyhow::anyhow!("{error}; the transaction is over")
            } else {
                error.into()
            }
        })
    }
}

/// Whether an error answered to a request inside a transaction means the transaction is
/// over (see [`Transaction`]): the others leave it open.
fn ends_transaction(error: &transdb_client::Error) -> bool {
    use transdb_client::Error;
    match error {
        Error::Rejected(response) => matches!(
            response.code,
            ErrorCode::CONFLICT
                | ErrorCode::TOO_MANY_KEYS
                | ErrorCode::TRANSACTION_TOO_LARGE
                | ErrorCode::TRANSACTION_TIMEOUT
                | ErrorCode::NO_TRANSACTION
        ),
        Error::Config(_) => false,
        _ => true,
    }
}

/// The first whitespace-separated word of `text` and the rest, leading whitespace removed
/// from both.
fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim_start();
    match text.find(char::is_whitespace) {
        Some(end) => (&text[..end], text[end..].trim_start()),
        None => (text, ""),
    }
}

fn one_key<'a>(verb: &str, rest: &'a str) -> Result<&'a str> {
    let (key, extra) = split_word(rest);
    if key.is_empty() || !extra.trim().is_empty() {
        bail!("usage: {verb} key");
    }
    Ok(key)
}

fn no_arguments(verb: &str, rest: &str) -> Result<()> {
    if !rest.trim().is_empty() {
        bail!("{verb} takes no arguments");
    }
    Ok(())
}

/// `BENCHMARK ops [prefix] [valuesize]`.
#[derive(Debug, PartialEq, Eq)]
struct BenchmarkOptions {
    ops: u64,
    prefix: String,
    value_bytes: usize,
}

impl BenchmarkOptions {
    fn parse(text: &str) -> Result<Self> {
        const USAGE: &str = "usage: BENCHMARK ops [prefix] [valuesize]";
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.is_empty() || words.len() > 3 {
            bail!(USAGE);
        }
        let ops = words[0]
            .parse::<u64>()
            .ok()
            .filter(|&ops| ops > 0)
            .with_context(|| format!("{USAGE}: ops must be a positive number"))?;
        let prefix = words
            .get(1)
            .map_or(DEFAULT_BENCHMARK_PREFIX, |prefix| prefix)
            .to_string();
        let value_bytes = match words.get(2) {
            Some(size) => size
                .parse()
                .with_context(|| format!("{USAGE}: valuesize must be a number of bytes"))?,
            None => DEFAULT_BENCHMARK_VALUE_BYTES,
        };
        Ok(Self {
            ops,
            prefix,
            value_bytes,
        })
    }
}

async fn benchmark(client: &Client, options: &BenchmarkOptions) -> Result<String> {
    let value = vec![b'x'; options.value_bytes];
    let key = |index: u64| format!("{}{index}", options.prefix);
    let start = Instant::now();
    for index in 0..options.ops {
        client.put(&key(index), &value).await?;
    }
    let puts = start.elapsed();
    let start = Instant::now();
    let mut wrong = 0u64;
    for index in 0..options.ops {
        if client.get(&key(index)).await?.as_deref() != Some(value.as_slice()) {
            wrong += 1;
        }
    }
    let gets = start.elapsed();
    let mut report = format!(
        "PUT: {} ops in {:.3} s, {:.0} ops/s\nGET: {} ops in {:.3} s, {:.0} ops/s",
        options.ops,
        puts.as_secs_f64(),
        rate(options.ops, puts),
        options.ops,
        gets.as_secs_f64(),
        rate(options.ops, gets),
    );
    if wrong > 0 {
        // Another client wrote the same keys meanwhile.
        report.push_str(&format!(
            "\n{wrong} GETs did not read what was written (another client changed the keys)"
        ));
    }
    Ok(report)
}

fn rate(ops: u64, elapsed: Duration) -> f64 {
    ops as f64 / elapsed.as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_off_the_front_and_the_rest_stays_whole() {
        assert_eq!(
            split_word("  put  k  hello  world "),
            ("put", "k  hello  world ")
        );
        assert_eq!(split_word("get"), ("get", ""));
        assert_eq!(split_word("   "), ("", ""));
    }

    #[test]
    fn benchmark_options_have_defaults_and_refuse_nonsense() {
        assert_eq!(
            BenchmarkOptions::parse("100").unwrap(),
            BenchmarkOptions {
                ops: 100,
                prefix: DEFAULT_BENCHMARK_PREFIX.into(),
                value_bytes: DEFAULT_BENCHMARK_VALUE_BYTES
            }
        );
        assert_eq!(
            BenchmarkOptions::parse("5 b: 10").unwrap(),
            BenchmarkOptions {
                ops: 5,
                prefix: "b:".into(),
                value_bytes: 10
            }
        );
        for bad in ["", "0", "x", "1 p q", "1 p 2 3"] {
            assert!(BenchmarkOptions::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_transaction_ending_errors_end_the_transaction() {
        use transdb_client::Error;
        use transdb_proto::ErrorResponse;
        let rejected = |code| Error::Rejected(ErrorResponse::new(code, "x"));
        assert!(ends_transaction(&rejected(ErrorCode::CONFLICT)));
        assert!(ends_transaction(&rejected(ErrorCode::TRANSACTION_TIMEOUT)));
        assert!(!ends_transaction(&rejected(ErrorCode::KEY_TOO_LARGE)));
        assert!(ends_transaction(&Error::Protocol("x".into())));
    }
}
