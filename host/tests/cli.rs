//! The `transdb` binary's argument handling. (Its presence also makes `cargo test
//! --workspace` build the binary that the end-to-end tests in `tests/` run.)

use std::process::Command;

fn transdb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_transdb"))
        .args(args)
        .output()
        .expect("transdb runs")
}

#[test]
fn help_lists_every_command() {
    let output = transdb(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for command in ["serve", "put", "get", "delete", "ping"] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
}

#[test]
fn usage_errors_exit_2_and_name_the_problem() {
    let output = transdb(&["put", "only-a-key"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("VALUE"));
}

#[test]
fn serve_help_documents_the_embedded_defaults() {
    let output = transdb(&["serve", "--help"]);
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(help.contains("127.0.0.1:7878"), "{help}");
    assert!(help.contains("transdb-data"), "{help}");
}
