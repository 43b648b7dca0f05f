//! The bank app, as `scripts/demo` runs it: its own server, transfers, the total check.

use std::process::Command;

#[test]
fn the_demo_runs_transfers_and_finds_the_total_unchanged() {
    let module = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/procedures/bank.wasm"
    );
    assert!(
        std::path::Path::new(module).exists(),
        "{module} is missing: build the procedures with scripts/build-procedures (scripts/test does it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bank-app"))
        .current_dir(dir.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--module",
            module,
            "--accounts",
            "20",
            "--clients",
            "8",
            "--duration",
            "1",
            "--exit",
        ])
        .env_remove("TRANSDB_SERVER")
        .output()
        .expect("bank-app runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bank-app failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("deployed bank version"), "{stdout}");
    assert!(stdout.contains("20 accounts hold 20000 units"), "{stdout}");
    assert!(stdout.contains("transfers committed"), "{stdout}");
    assert!(stdout.contains("latency ms: p50"), "{stdout}");
    assert!(stdout.contains("total unchanged: 20000 units"), "{stdout}");
    assert!(
        dir.path().join("transdb-data/cert.pem").exists(),
        "the server used ./transdb-data"
    );
}

#[test]
fn a_missing_module_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bank-app"))
        .current_dir(dir.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--module",
            "nowhere.wasm",
            "--exit",
        ])
        .output()
        .expect("bank-app runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("scripts/build-procedures"), "{stderr}");
}
