//! The `transdb` binary: `transdb serve` runs a server; the other commands are its client.

/// mimalloc: many small, short-lived allocations per request (frames, streams, wasm stores)
/// cost 10-15 % less CPU than with glibc's malloc (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    transdb_host::cli::main()
}
