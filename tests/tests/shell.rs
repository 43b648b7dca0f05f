//! `transdb shell` as a child process, scripted through stdin (not a terminal: no prompt,
//! one answer per command).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;

use transdb_client::{Client, ClientConfig};
use transdb_tests::{ChildServer, cli, procedure_module, transdb_command};

fn config_of(dir: &Path) -> ClientConfig {
    ClientConfig::for_data_dir(&dir.join("transdb-data")).unwrap()
}

/// Runs `future` on a runtime of its own (the shell itself runs in a child process).
fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// Checks `lines` in order: each expectation is an exact line, or a prefix if it ends
/// with `*`.
fn assert_lines(lines: &[&str], expected: &[&str]) {
    assert_eq!(
        lines.len(),
        expected.len(),
        "line count differs:\n{}",
        lines.join("\n")
    );
    for (line, expected) in lines.iter().zip(expected) {
        match expected.strip_suffix('*') {
            Some(prefix) => assert!(line.starts_with(prefix), "{line:?} vs {expected:?}"),
            None => assert_eq!(line, expected),
        }
    }
}

#[test]
fn a_scripted_shell_session_runs_every_command_and_survives_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path(), "127.0.0.1:0", &[]);
    let addr = server.addr.to_string();
    block_on(async {
        let client = Client::connect(&addr, config_of(dir.path())).await.unwrap();
        client
            .deploy("bank", &procedure_module("bank"))
            .await
            .unwrap();
        client.close().await;
    });
    let long_key = "k".repeat(1025);
    let script = format!(
        "help
PUT plain hello   world
get plain
BEGIN
put tx:a 1
PUT tx:b 2
get tx:a
Commit
begin
put rb:x 9
delete plain
rollback
get plain
get rb:x
COMMIT
GET {long_key}
BATCH put b:1 one PUT b:2 two delete tx:b

CALL bank open {{\"account\":\"alice\",\"balance\":100}}
CALL bank balance {{\"account\":\"alice\"}}
STATS
BENCHMARK 100
frobnicate
QUIT
PUT after quit
"
    );
    let run = |args: &[&str], stdin: &[u8]| {
        let mut full = vec!["--server", addr.as_str()];
        full.extend_from_slice(args);
        cli(dir.path(), &full, stdin)
    };
    let shell = run(&["shell"], script.as_bytes());
    let stdout = String::from_utf8(shell.stdout).unwrap();
    assert!(shell.status.success(), "{}\n{stdout}", shell.stderr);
    assert!(!stdout.contains("transdb>"), "no prompt without a terminal");

    // HELP comes first: one line per command (BENCHMARK's takes three).
    let lines: Vec<&str> = stdout.lines().collect();
    let help_end = lines.iter().position(|line| *line == "OK").unwrap();
    let help = lines[..help_end].join("\n");
    for verb in [
        "GET",
        "PUT",
        "DELETE",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "BATCH",
        "CALL",
        "STATS",
        "BENCHMARK",
        "HELP",
        "QUIT",
    ] {
        assert!(
            lines[..help_end].iter().any(|line| line.starts_with(verb)),
            "{verb} is missing from HELP:\n{help}"
        );
    }
    assert!(help.contains("Deletes nothing"), "{help}");

    // STATS prints a block whose length depends on what was counted: checked on its own.
    // (No errors by code: the long key and COMMIT without BEGIN are refused client-side.)
    let stats_start = lines
        .iter()
        .position(|line| line.starts_with("uptime "))
        .expect("STATS printed its block");
    let stats_end = lines
        .iter()
        .position(|line| line.starts_with("PUT: 100 ops in"))
        .expect("BENCHMARK ran after STATS");
    let stats = &lines[stats_start..stats_end];
    for expected in [
        "position ",
        "log durable through ",
        "state hash ",
        "memory: store ",
        "connections ",
        "authentication failures 0",
        "modules 1",
        "shard 0: ",
        "shard 1: ",
        "requests:",
        "  Begin ",
        "  Commit ",
        "  Rollback ",
        "  Batch ",
        "procedures:",
        "  bank.balance: 1 calls, 0 errors, ",
        "  bank.open: 1 calls, 0 errors, ",
    ] {
        assert!(
            stats.iter().any(|line| line.starts_with(expected)),
            "{expected:?} is missing from STATS:\n{}",
            stats.join("\n")
        );
    }
    let mut rest = lines[help_end..stats_start].to_vec();
    rest.push("(the STATS block)");
    rest.extend_from_slice(&lines[stats_end..]);
    assert_lines(
        &rest,
        &[
            "OK",
            "hello   world",
            "OK (snapshot at position *",
            "OK",
            "OK",
            "1",
            "committed at position *",
            "OK (snapshot at position *",
            "OK",
            "1",
            "rolled back",
            "hello   world",
            "(nil)",
            "(error) no transaction is open: BEGIN one first",
            "(error) *",
            "3 writes applied",
            "null",
            "100",
            "(the STATS block)",
            "PUT: 100 ops in *",
            "GET: 100 ops in *",
            "(error) unknown command \"FROBNICATE\": type HELP for the list",
        ],
    );
    let key_error = lines[help_end + 14];
    assert!(key_error.contains("KEY_TOO_LARGE"), "{key_error}");

    // The committed transaction and the batch are visible to other clients; the rolled-back
    // transaction wrote nothing; nothing after QUIT ran.
    let get = |key: &str| run(&["get", key], b"");
    assert_eq!(get("tx:a").stdout, b"1");
    assert_eq!(get("tx:b").status.code(), Some(1), "deleted by the batch");
    assert_eq!(get("b:1").stdout, b"one");
    assert_eq!(get("b:2").stdout, b"two");
    assert_eq!(get("plain").stdout, b"hello   world");
    assert_eq!(get("rb:x").status.code(), Some(1));
    assert_eq!(get("after").status.code(), Some(1));
    assert_eq!(get("account:alice").stdout, b"100");
    assert_eq!(get("bench:99").stdout, vec![b'x'; 100]);

    // The end of input (Ctrl-D) also ends the shell with 0, rolling back an open transaction.
    let eof = run(&["shell"], b"BEGIN\nPUT open:tx 1\n");
    let stdout = String::from_utf8(eof.stdout).unwrap();
    assert!(eof.status.success(), "{}", eof.stderr);
    assert!(
        stdout.ends_with("(the open transaction was rolled back)\n"),
        "{stdout}"
    );
    assert_eq!(get("open:tx").status.code(), Some(1));
}

/// A shell child process driven one command at a time.
struct Shell {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Shell {
    fn start(dir: &Path, addr: &str) -> Shell {
        let mut child = transdb_command(dir)
            .args(["--server", addr, "shell"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("transdb shell runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Shell {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends `command` and returns the one line it answers.
    fn say(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        assert!(self.stdout.read_line(&mut line).unwrap() > 0, "shell ended");
        line.trim_end().to_string()
    }
}

#[test]
fn a_conflict_ends_the_shells_transaction_and_the_shell_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(dir.path(), "127.0.0.1:0", &[]);
    let addr = server.addr.to_string();
    let mut shell = Shell::start(dir.path(), &addr);
    assert_eq!(shell.say("put c original"), "OK");
    assert!(shell.say("BEGIN").starts_with("OK (snapshot"));
    assert_eq!(shell.say("GET c"), "original");
    // Another client changes what the transaction read, after its snapshot.
    block_on(async {
        let client = Client::connect(&addr, config_of(dir.path())).await.unwrap();
        client.put("c", "theirs").await.unwrap();
        client.close().await;
    });
    assert_eq!(shell.say("PUT c mine"), "OK");
    let conflict = shell.say("COMMIT");
    assert!(
        conflict.starts_with("(error) ") && conflict.contains("CONFLICT"),
        "{conflict}"
    );
    // The transaction is over: the prompt-less shell is back outside it.
    assert_eq!(
        shell.say("ROLLBACK"),
        "(error) no transaction is open: BEGIN one first"
    );
    assert_eq!(shell.say("GET c"), "theirs");
    drop(shell.stdin);
    let status = shell.child.wait().unwrap();
    assert!(status.success());
}
