//! What the host's fuzz targets (`fuzz_abi.rs`, `fuzz_modules.rs`) share: how long they
//! run, how a failing input is kept as a regression, and what they check a call against (the
//! error codes a guest may cause, a store's contents, a request served by an executor).
//!
//! - `TRANSDB_FUZZ_ITERATIONS=N`: random inputs per target (each target has a small
//!   default, a few seconds in a debug build, for CI). `BOLERO_RANDOM_ITERATIONS` overrides it.
//! - `TRANSDB_FUZZ_SECONDS=S`: stop a target after `S` seconds even if inputs remain.
//! - Every file in `tests/__fuzz__/<target>/corpus/` (and `crashes/`) is replayed first, by
//!   bolero, before the random inputs.
//! - An input that fails is written to `tests/__fuzz__/<target>/corpus/failure-<hash>` (and
//!   printed in hex), so every later run replays it: commit it with the fix.
//! - `BOLERO_RANDOM_SEED=<seed>` (printed on a failure) replays one random input.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use transdb_host::executor::Executor;
use transdb_host::store::Store;
use transdb_proto::ErrorCode;
use transdb_proto::frame;
use transdb_proto::message::{Request, Response};

/// Random inputs per target: `TRANSDB_FUZZ_ITERATIONS`, else `default`.
pub fn iterations(default: usize) -> usize {
    std::env::var("TRANSDB_FUZZ_ITERATIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// The time cap of a target: `TRANSDB_FUZZ_SECONDS`, else none.
pub fn time_cap() -> Duration {
    std::env::var("TRANSDB_FUZZ_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::MAX)
}

/// The directory bolero replays a target's corpus from, given `check!(name = target)` in a
/// test file of `tests/`.
pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/__fuzz__")
        .join(target)
        .join("corpus")
}

thread_local! {
    /// The smallest input that failed on this thread (one test runs one target).
    static FAILED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Runs `check` on `input`; if it panics, remembers the input (the smallest failing one:
/// once bolero has shrunk it, the shrunk one) before passing the panic on.
pub fn remembering<T>(input: &[u8], check: impl FnOnce() -> T) -> T {
    match panic::catch_unwind(AssertUnwindSafe(check)) {
        Ok(value) => value,
        Err(payload) => {
            FAILED.with_borrow_mut(|failed| {
                if failed
                    .as_ref()
                    .is_none_or(|known| input.len() < known.len())
                {
                    *failed = Some(input.to_vec());
                }
            });
            panic::resume_unwind(payload)
        }
    }
}

/// Runs the bolero target `body` and, if it fails, writes the smallest failing input into
/// the target's corpus directory so that every later run replays it. Prints how long the
/// target ran.
pub fn run_target(target: &str, body: impl FnOnce()) {
    FAILED.set(None);
    let start = Instant::now();
    let outcome = panic::catch_unwind(AssertUnwindSafe(body));
    eprintln!(
        "fuzz target {target}: finished in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    if let Err(payload) = outcome {
        if let Some(input) = FAILED.take() {
            save_failure(target, &input);
        }
        panic::resume_unwind(payload);
    }
}

/// FNV-1a of `bytes`.
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `input` followed by `extra` bytes drawn from a generator seeded with it. Bolero's random
/// byte inputs are at most 64 bytes, too few for a module or a long program; this way the
/// fuzz input still decides everything (a corpus file replays exactly), its own bytes come
/// first (where a mutating fuzzer edits them), and there is enough to decode from.
pub fn expand(input: &[u8], extra: usize) -> Vec<u8> {
    let mut state = hash(input);
    let mut out = Vec::with_capacity(input.len() + extra + 8);
    out.extend_from_slice(input);
    while out.len() < input.len() + extra {
        // SplitMix64.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(input.len() + extra);
    out
}

fn save_failure(target: &str, input: &[u8]) {
    let dir = corpus_dir(target);
    // A stable name, so that the same input is saved once.
    let hash = hash(input);
    let path = dir.join(format!("failure-{hash:016x}"));
    let hex: String = input.iter().map(|byte| format!("{byte:02x}")).collect();
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input)) {
        Ok(()) => eprintln!(
            "fuzz target {target}: failing input saved to {} (replayed by every run from now on): {hex}",
            path.display()
        ),
        Err(error) => eprintln!(
            "fuzz target {target}: cannot save the failing input to {} ({error}): {hex}",
            path.display()
        ),
    }
}

/// The codes a guest may cause a call to fail with: any other code (`INTERNAL` above all)
/// answering a call of a fuzzed guest is a host bug.
pub const GUEST_ERRORS: &[ErrorCode] = &[
    ErrorCode::KEY_TOO_LARGE,
    ErrorCode::VALUE_TOO_LARGE,
    ErrorCode::ABORTED,
    ErrorCode::GUEST_PANIC,
    ErrorCode::OUT_OF_FUEL,
    ErrorCode::GUEST_TRAP,
    ErrorCode::INVALID_ARGUMENTS,
    ErrorCode::OUTPUT_TOO_LARGE,
    ErrorCode::KEY_NOT_DECLARED,
    ErrorCode::TOO_MANY_KEYS,
    // A clean refusal, though with fuel ending calls in milliseconds and the backstop at
    // 60 s it does not happen here.
    ErrorCode::DEADLINE_EXCEEDED,
    ErrorCode::INVALID_VALUE,
    ErrorCode::ABI_VIOLATION,
    ErrorCode::KEY_SET_UNSTABLE,
];

/// Every key of `store` with its newest value.
pub fn contents(store: &Store) -> BTreeMap<String, Bytes> {
    store
        .entries_at(u64::MAX)
        .into_iter()
        .map(|(key, _, value)| (key, value))
        .collect()
}

/// Runs `request` on `executor` (on the current-thread runtime `tokio`), as a server does,
/// and returns its answer, which must be exactly one whole frame that decodes.
pub fn execute(
    tokio: &tokio::runtime::Runtime,
    executor: &Executor,
    request: Request<'_>,
) -> Response<'static> {
    let mut out = Vec::new();
    tokio.block_on(executor.execute(request, &mut out));
    let (payload, consumed) = frame::split(&out)
        .expect("the response is within the frame limit")
        .expect("the response is a whole frame");
    assert_eq!(consumed, out.len(), "exactly one response frame");
    frame::decode::<Response<'_>>(payload)
        .expect("the response decodes")
        .into_owned()
}
