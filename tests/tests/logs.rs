//! Structured logs: `transdb serve --log-format json` writes one JSON object per stderr
//! line, and every line logged while serving a request carries that request's id.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;

use serde_json::Value;
use transdb_client::{Client, ClientConfig};
use transdb_tests::{PATIENCE, cli, procedure_module, transdb_binary};

/// The lines of a server's stderr, parsed, after it ran `work` and stopped.
async fn json_log_of(work: impl AsyncFnOnce(Client)) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(transdb_binary())
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "2"])
        .args(["--log-format", "json", "--log-level", "debug"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("transdb serve starts");
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map(|line| line.expect("stderr is UTF-8"))
            .collect::<Vec<String>>()
    });
    let (sender, stdout_lines) = channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let wait_for = |prefix: &str| loop {
        let line = stdout_lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|error| panic!("no stdout line {prefix:?} ({error})"));
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.to_string();
        }
    };
    let addr = wait_for("transdb listening on ")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    let config = ClientConfig::for_data_dir(&dir.path().join("transdb-data")).unwrap();
    let client = Client::connect(&addr, config).await.unwrap();
    work(client).await;

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM failed");
    wait_for("transdb stopped");
    assert!(child.wait().unwrap().success());
    let lines = log.join().unwrap();
    assert!(!lines.is_empty(), "the server logged nothing");
    lines
        .iter()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}"));
            assert!(value.is_object(), "not a JSON object: {line}");
            for key in ["timestamp", "level", "target", "fields"] {
                assert!(value.get(key).is_some(), "no {key:?}: {line}");
            }
            value
        })
        .collect()
}

/// The value of `field` in the innermost span of `line` that has it.
fn span_field<'a>(line: &'a Value, field: &str) -> Option<&'a Value> {
    let spans = line.get("spans")?.as_array()?;
    spans.iter().rev().find_map(|span| span.get(field))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_levels_spans_and_a_request_id_per_request() {
    let lines = json_log_of(async |client: Client| {
        client.put("greeting", "hello").await.unwrap();
        client
            .deploy("kit", &procedure_module("testkit"))
            .await
            .unwrap();
        for message in ["first", "second"] {
            let said = client
                .call_json("kit", "log", &format!(r#"{{"message":"{message}"}}"#))
                .await
                .unwrap();
            assert_eq!(said, format!(r#""{message}""#));
        }
        assert_eq!(
            client.get("greeting").await.unwrap().as_deref(),
            Some(b"hello".as_slice())
        );
        client.close().await;
    })
    .await;

    let guest_line = |message: &str| {
        let text = format!("testkit says: {message}");
        lines
            .iter()
            .find(|line| line["fields"]["message"] == text.as_str())
            .unwrap_or_else(|| panic!("no log line {text:?}"))
    };
    let mut ids = Vec::new();
    for message in ["first", "second"] {
        let line = guest_line(message);
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["target"], "transdb::procedure", "{line}");
        assert_eq!(line["fields"]["module"], "kit", "{line}");
        assert_eq!(line["fields"]["procedure"], "log", "{line}");
        assert_eq!(line["span"]["name"], "request", "{line}");
        assert_eq!(line["span"]["kind"], "Call", "{line}");
        let id = line["span"]["request_id"].clone();
        assert!(id.is_u64() || id.is_string(), "request_id {id}: {line}");
        assert_eq!(span_field(line, "request_id"), Some(&id), "{line}");
        // The guest line carries the id itself too: at the default `info` level the
        // `request` span is off, and this is what ties a guest log to its request.
        assert_eq!(line["fields"]["request_id"], id, "{line}");
        assert!(span_field(line, "remote").is_some(), "no remote: {line}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "two requests got the same request_id");

    let authenticated = lines
        .iter()
        .find(|line| line["fields"]["message"] == "connection authenticated")
        .expect("a `connection authenticated` line");
    assert_eq!(authenticated["level"], "DEBUG", "{authenticated}");
    let remote = span_field(authenticated, "remote").expect("the connection's remote");
    assert!(
        remote
            .as_str()
            .is_some_and(|remote| remote.starts_with("127.0.0.1:")),
        "{authenticated}"
    );
}

#[test]
fn an_unknown_log_format_is_refused_naming_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    let output = cli(dir.path(), &["serve", "--log-format", "bogus"], b"");
    assert!(!output.status.success());
    for part in ["--log-format", "bogus", "text", "json"] {
        assert!(output.stderr.contains(part), "{}", output.stderr);
    }
    assert!(
        !dir.path().join("transdb-data").exists(),
        "a refused command line started a server"
    );
}
