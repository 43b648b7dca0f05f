//! `transdb bench` and `transdb stress` as a user runs them: the real binary as a child
//! process, against a server it embeds (`--embedded`) or a `transdb serve` child, with the
//! `--json` reports parsed and checked, and the exit statuses.
//!
//! Every run is one to three seconds long. These tests check what the tools report and how
//! they exit, not how fast the server is: timing is only compared by loose ratios.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use serde_json::Value;
use transdb_client::{Client, ClientConfig};
use transdb_tests::{ChildServer, CliOutput, PATIENCE, cli, procedure_module};

// ---------------------------------------------------------------------------------------
// Running the binary and reading its reports.

/// The bank module built by `scripts/build-procedures`, as an absolute path.
fn bank_module() -> String {
    // Panics with the command to run if it has not been built.
    procedure_module("bank");
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/procedures/bank.wasm")
        .canonicalize()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

/// Runs `transdb <args>` in an empty directory, so that no `./transdb-data` is trusted by
/// accident.
fn transdb(args: &[&str]) -> CliOutput {
    let dir = tempfile::tempdir().unwrap();
    cli(dir.path(), args, b"")
}

/// Runs `transdb <args>` on another thread, so the test can act while it runs.
fn spawn_transdb(args: Vec<String>) -> JoinHandle<CliOutput> {
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        transdb(&args)
    })
}

/// The one JSON object a `--json` run printed on stdout.
fn json_report(output: &CliOutput) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "stdout is not one JSON object ({error}): {:?}\nstderr: {}",
            String::from_utf8_lossy(&output.stdout),
            output.stderr
        )
    })
}

/// A numeric field of a report.
fn number(report: &Value, field: &str) -> f64 {
    report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {report}"))
}

/// A count field of a report.
fn count(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a count in {report}"))
}

/// `transdb bench --embedded --durability none --json --clients 4 <extra...>`, which must
/// succeed; its report.
fn bench_embedded(extra: &[&str]) -> Value {
    let mut args = vec![
        "bench",
        "--embedded",
        "--durability",
        "none",
        "--json",
        "--clients",
        "4",
    ];
    args.extend_from_slice(extra);
    let output = transdb(&args);
    assert!(
        output.status.success(),
        "{args:?}: {:?}\n{}",
        output.status,
        output.stderr
    );
    json_report(&output)
}

/// What every bench report must satisfy: the fields are there, work was done without
/// errors, the percentiles are ordered and the throughput is the operations per second.
fn assert_consistent_bench_report(report: &Value, workload: &str, duration_s: f64) {
    for field in [
        "workload",
        "clients",
        "duration_s",
        "ops",
        "throughput_ops_per_sec",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "errors",
        "aborts",
    ] {
        assert!(report.get(field).is_some(), "no {field} in {report}");
    }
    assert_eq!(report["workload"], workload, "{report}");
    assert_eq!(count(report, "clients"), 4, "{report}");
    assert_eq!(count(report, "errors"), 0, "{report}");
    let ops = count(report, "ops");
    assert!(ops > 0, "{report}");
    assert_eq!(
        count(report, "committed") + count(report, "aborts"),
        ops,
        "an operation commits or aborts: {report}"
    );
    let measured = number(report, "duration_s");
    assert!(
        measured >= duration_s && measured < duration_s + PATIENCE.as_secs_f64(),
        "ran for the --duration asked: {report}"
    );
    let throughput = number(report, "throughput_ops_per_sec");
    let expected = ops as f64 / measured;
    assert!(
        (throughput - expected).abs() <= 1e-6 * expected,
        "throughput {throughput} is not ops / duration_s = {expected}: {report}"
    );
    let [p50, p95, p99, max] = ["p50_ms", "p95_ms", "p99_ms", "max_ms"].map(|f| number(report, f));
    assert!(
        0.0 < p50 && p50 <= p95 && p95 <= p99 && p99 <= max,
        "percentiles out of order: {report}"
    );
}

/// `transdb serve --durability none <extra...>` in `dir`, and the certificate to trust.
fn serve(dir: &Path, extra: &[&str]) -> (ChildServer, PathBuf) {
    let mut args = vec!["--durability", "none"];
    args.extend_from_slice(extra);
    let server = ChildServer::start(dir, "127.0.0.1:0", &args);
    (server, dir.join("transdb-data/cert.pem"))
}

/// A client of a child server.
async fn client_of(server: &ChildServer, ca: &Path) -> Client {
    let config =
        ClientConfig::for_data_dir(ca.parent().unwrap()).expect("certificate and token load");
    Client::connect(&server.addr.to_string(), config)
        .await
        .expect("client connects")
}

/// `--server <addr> --ca <ca> --token-file <admin token>` for a child server.
fn target_args(server: &ChildServer, ca: &Path) -> Vec<String> {
    vec![
        "--server".into(),
        server.addr.to_string(),
        "--ca".into(),
        ca.to_str().unwrap().into(),
        "--token-file".into(),
        ca.with_file_name("admin.token").to_str().unwrap().into(),
    ]
}

/// `transdb stress` against `server`, then `options` (split at whitespace).
fn stress_args(server: &ChildServer, ca: &Path, options: &str) -> Vec<String> {
    let mut args = vec!["stress".to_owned()];
    args.extend(target_args(server, ca));
    args.extend(options.split_whitespace().map(String::from));
    args
}

// ---------------------------------------------------------------------------------------
// transdb bench

#[test]
fn every_key_value_workload_reports_consistent_numbers_and_no_errors() {
    for workload in [
        "put-only",
        "get-only",
        "read-heavy",
        "balanced",
        "write-heavy",
    ] {
        let report = bench_embedded(&[
            "--workload",
            workload,
            "--duration",
            "1",
            "--key-space",
            "100",
        ]);
        assert_consistent_bench_report(&report, workload, 1.0);
        assert_eq!(count(&report, "aborts"), 0, "puts and gets never abort");
        assert!(report["bank_total"].is_null(), "{report}");
        assert_eq!(report["embedded_durability"], "none", "{report}");
    }
}

#[test]
fn bank_workloads_move_money_without_changing_the_total() {
    let module = bank_module();
    for workload in ["bank", "interactive-bank"] {
        let report = bench_embedded(&[
            "--workload",
            workload,
            "--duration",
            "1",
            "--accounts",
            "100",
            "--balance",
            "500",
            "--module",
            &module,
        ]);
        assert_consistent_bench_report(&report, workload, 1.0);
        assert_eq!(report["bank_total"]["before"], 100 * 500, "{report}");
        assert_eq!(report["bank_total"]["after"], 100 * 500, "{report}");
        let aborts_by_kind: u64 = report["aborts_by_kind"]
            .as_object()
            .unwrap()
            .values()
            .map(|count| count.as_u64().unwrap())
            .sum();
        assert_eq!(aborts_by_kind, count(&report, "aborts"), "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_only_against_a_served_child_fills_exactly_its_key_space() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = serve(dir.path(), &[]);
    let mut args = vec!["bench".to_owned()];
    args.extend(target_args(&server, &ca));
    // Keys are chosen at random: 8 clients for 2 s make far more than the ~225 puts that
    // hit all 50 keys on average.
    args.extend(
        [
            "--workload",
            "put-only",
            "--key-space",
            "50",
            "--value-size",
            "300",
            "--clients",
            "8",
            "--duration",
            "2",
            "--json",
        ]
        .map(String::from),
    );
    let output = spawn_transdb(args).join().unwrap();
    assert!(output.status.success(), "{}", output.stderr);
    let report = json_report(&output);
    assert_eq!(report["server"], server.addr.to_string(), "{report}");
    assert!(report["embedded_durability"].is_null(), "{report}");
    assert_eq!(count(&report, "errors"), 0, "{report}");

    let client = client_of(&server, &ca).await;
    let mut values = Vec::new();
    for index in 0..50 {
        let key = format!("bench:{index:012}");
        let value = client
            .get(&key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{key} was never written ({report})"));
        assert_eq!(value.len(), 300, "{key}");
        values.push(value);
    }
    assert!(
        values.iter().all(|value| value == &values[0]),
        "one run puts one value"
    );
    assert_eq!(
        client.get("bench:000000000050").await.unwrap(),
        None,
        "nothing outside --key-space"
    );
    client.close().await;
}

#[test]
fn the_human_report_shows_throughput_and_latency_percentiles() {
    let output = transdb(&[
        "bench",
        "--embedded",
        "--durability",
        "none",
        "--workload",
        "get-only",
        "--key-space",
        "100",
        "--clients",
        "4",
        "--duration",
        "1",
    ]);
    assert!(output.status.success(), "{}", output.stderr);
    let report = String::from_utf8(output.stdout).unwrap();
    assert!(report.starts_with("get-only for "), "{report}");
    assert!(report.contains("ops/s"), "{report}");
    assert!(report.contains("p99"), "{report}");
    assert!(report.contains("errors: none"), "{report}");
}

#[test]
fn pipelined_clients_are_reported_with_their_depth() {
    let report = bench_embedded(&[
        "--workload",
        "balanced",
        "--key-space",
        "100",
        "--pipeline",
        "4",
        "--duration",
        "1",
    ]);
    assert_consistent_bench_report(&report, "balanced", 1.0);
    assert_eq!(count(&report, "pipeline"), 4, "{report}");
}

#[test]
fn a_paced_run_stays_near_its_target_rate() {
    let report = bench_embedded(&[
        "--workload",
        "balanced",
        "--key-space",
        "100",
        "--rate",
        "100",
        "--duration",
        "2",
    ]);
    assert_consistent_bench_report(&report, "balanced", 2.0);
    assert_eq!(number(&report, "target_rate"), 100.0, "{report}");
    let throughput = number(&report, "throughput_ops_per_sec");
    assert!(
        (30.0..=130.0).contains(&throughput),
        "paced to 100 ops/s, measured {throughput}: {report}"
    );
}

#[test]
fn bench_refuses_bad_arguments_saying_which() {
    let too_large = (transdb_proto::limits::MAX_VALUE_BYTES + 1).to_string();
    for (bad, says) in [
        (["--clients", "0"], "--clients"),
        (["--clients", "10001"], "--clients"),
        (["--pipeline", "0"], "--pipeline"),
        (["--hot-fraction", "2"], "--hot-fraction"),
        (["--value-size", too_large.as_str()], "--value-size"),
    ] {
        let mut args = vec!["bench", "--embedded", "--durability", "none"];
        args.extend_from_slice(&bad);
        let output = transdb(&args);
        assert_eq!(output.status.code(), Some(2), "{bad:?}: {}", output.stderr);
        assert!(output.stdout.is_empty(), "{bad:?}: no report");
        assert!(
            output.stderr.contains(says),
            "{bad:?}: the message names {says}: {}",
            output.stderr
        );
    }
}

#[test]
fn bench_without_the_bank_module_says_how_to_get_it() {
    let nowhere = tempfile::tempdir().unwrap();
    let missing = nowhere.path().join("bank.wasm");
    let output = transdb(&[
        "bench",
        "--embedded",
        "--durability",
        "none",
        "--workload",
        "bank",
        "--accounts",
        "10",
        "--duration",
        "1",
        "--module",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", output.stderr);
    for hint in [
        "scripts/build-procedures",
        "--module",
        missing.to_str().unwrap(),
    ] {
        assert!(output.stderr.contains(hint), "{}", output.stderr);
    }
}

// ---------------------------------------------------------------------------------------
// transdb stress

#[test]
fn stress_passes_against_a_correct_server() {
    let module = bank_module();
    let output = transdb(&[
        "stress",
        "--embedded",
        "--durability",
        "none",
        "--duration",
        "2",
        "--json",
        "--module",
        &module,
        "--accounts",
        "100",
    ]);
    let report = json_report(&output);
    assert_eq!(output.status.code(), Some(0), "{report}");
    assert_eq!(report["exit_code"], 0, "{report}");
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(count(&report, "violations"), 0, "{report}");
    assert_eq!(count(&report, "errors"), 0, "{report}");
    assert!(count(&report, "ops") > 0, "{report}");
    assert!(count(&report, "reads_checked") > 0, "{report}");
    assert!(count(&report, "total_checks") > 0, "{report}");
    assert!(report["setup_error"].is_null(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_write_to_an_owned_key_is_a_violation_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = serve(dir.path(), &[]);
    let client = client_of(&server, &ca).await;
    let args = stress_args(
        &server,
        &ca,
        "--run-id t1 --duration 3 --writers 2 --keys-per-writer 2 --transferers 0 --json",
    );
    let stress = spawn_transdb(args);
    // Writer 0 owns this key; nobody else may change it while the run lasts.
    let start = Instant::now();
    while !stress.is_finished() {
        client.put("stress:t1:0:0", b"rogue").await.unwrap();
        assert!(start.elapsed() < PATIENCE, "the stress run does not end");
    }
    let output = stress.join().unwrap();
    let report = json_report(&output);
    assert_eq!(output.status.code(), Some(2), "{report}");
    assert_eq!(report["passed"], false, "{report}");
    assert!(count(&report, "violations") > 0, "{report}");
    let details = report["violation_details"].to_string();
    assert!(
        details.contains("stress:t1:0:0") && details.contains("rogue"),
        "the violation names the key and what was read: {details}"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_appearing_in_an_account_is_a_violation_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = serve(dir.path(), &[]);
    let client = client_of(&server, &ca).await;
    let mut args = stress_args(
        &server,
        &ca,
        "--run-id t1 --duration 3 --writers 2 --keys-per-writer 2 --transferers 2 --accounts 50 --balance 100 --json",
    );
    args.extend(["--module".to_owned(), bank_module()]);
    let stress = spawn_transdb(args);
    // The run opens its accounts after it starts: wait for the first one.
    let account = "account:stress-t1-0";
    let start = Instant::now();
    while client.get(account).await.unwrap().is_none() {
        assert!(
            !stress.is_finished(),
            "the run ended before opening {account}"
        );
        assert!(start.elapsed() < PATIENCE, "{account} was never opened");
    }
    // More than all the run's money (50 × 100) together: the total can only be wrong now.
    client.put(account, "1000000").await.unwrap();
    let output = stress.join().unwrap();
    let report = json_report(&output);
    assert_eq!(output.status.code(), Some(2), "{report}");
    assert_eq!(report["exit_code"], 2, "{report}");
    assert!(count(&report, "violations") > 0, "{report}");
    let details = report["violation_details"].to_string();
    assert!(
        details.contains("expected 5000"),
        "the violation says what the total should be: {details}"
    );
    client.close().await;
}

#[test]
fn a_rerun_with_the_same_run_id_passes_against_a_correct_server() {
    let dir = tempfile::tempdir().unwrap();
    let (server, ca) = serve(dir.path(), &[]);
    // The second run finds the keys the first one left; with seed 3 some writer reads a
    // key before it writes it. What an earlier run left is not a violation of this one.
    for seed in ["1", "3"] {
        let args = stress_args(
            &server,
            &ca,
            &format!(
                "--run-id again --seed {seed} --duration 1 --writers 2 --keys-per-writer 2 --transferers 0 --json"
            ),
        );
        let output = spawn_transdb(args).join().unwrap();
        let report = json_report(&output);
        assert_eq!(output.status.code(), Some(0), "seed {seed}: {report}");
        assert_eq!(count(&report, "violations"), 0, "seed {seed}: {report}");
    }
}

#[test]
fn stress_errors_above_the_allowed_rate_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    // The checker reads all 50 balances in one transaction: over the limit, so every check
    // fails with TOO_MANY_KEYS, while the transfers (2 keys) and the writers go through.
    let (server, ca) = serve(dir.path(), &["--max-keys-per-call", "20"]);
    let mut args = stress_args(
        &server,
        &ca,
        "--duration 1 --writers 2 --transferers 2 --accounts 50 --max-error-rate 0 --json",
    );
    args.extend(["--module".to_owned(), bank_module()]);
    let output = spawn_transdb(args).join().unwrap();
    let report = json_report(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert_eq!(report["exit_code"], 1, "{report}");
    assert_eq!(count(&report, "violations"), 0, "{report}");
    assert!(count(&report, "errors") > 0, "{report}");
    assert!(number(&report, "error_rate") > 0.0, "{report}");
    assert!(
        count(&report["errors_by_kind"], "too_many_keys") > 0,
        "{report}"
    );
}

#[test]
fn stress_exits_3_when_no_server_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, ca) = serve(dir.path(), &[]);
    let addr = server.addr.to_string();
    server.terminate();
    assert!(server.wait().success());
    let output = transdb(&[
        "stress",
        "--server",
        &addr,
        "--ca",
        ca.to_str().unwrap(),
        "--token-file",
        ca.with_file_name("admin.token").to_str().unwrap(),
        "--duration",
        "1",
        "--json",
    ]);
    let report = json_report(&output);
    assert_eq!(output.status.code(), Some(3), "{report}");
    assert_eq!(report["passed"], false, "{report}");
    let why = report["setup_error"].as_str().unwrap_or_default();
    assert!(why.contains(&addr), "the error names the address: {report}");
}

#[test]
fn stress_usage_errors_exit_3() {
    let bad_rate = transdb(&["stress", "--max-error-rate", "2", "--json"]);
    let report = json_report(&bad_rate);
    assert_eq!(bad_rate.status.code(), Some(3), "{report}");
    let why = report["setup_error"].as_str().unwrap_or_default();
    assert!(why.contains("--max-error-rate"), "{report}");

    let unknown = transdb(&["stress", "--no-such-flag"]);
    assert_eq!(unknown.status.code(), Some(3), "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("--no-such-flag"),
        "{}",
        unknown.stderr
    );
}

#[test]
fn a_usage_error_of_another_command_exits_2_even_with_stress_among_its_arguments() {
    // `stress` here is a key, not the subcommand: the client commands' status 2 applies.
    let output = transdb(&["get", "stress", "--no-such-flag"]);
    assert_eq!(output.status.code(), Some(2), "{}", output.stderr);
}
