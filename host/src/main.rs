//! The `transdb` binary: `transdb serve` runs a server; the other commands are its client.

fn main() -> std::process::ExitCode {
    transdb_host::cli::main()
}
