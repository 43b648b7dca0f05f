//! In-process benchmark of the procedure call path, without the network: bank transfers
//! between random accounts through the real wasm runtime, the scheduler's key locks and the
//! transaction, with 1 and 2 threads, uniform and with a hot account. The threads are the
//! workers of one multi-threaded Tokio runtime, as in the server, each keeping several calls
//! in flight, so a call waiting for a lock never idles a core.
//!
//! Run: `scripts/build-procedures && cargo bench -p transdb-host --bench procedure_calls`
//! (options after `--`: `--seconds N`, `--accounts N`, `--shards N`; default one shard per
//! core, like the server).

use std::sync::Arc;
use std::time::{Duration, Instant};

use transdb_host::procedures::Procedures;
use transdb_host::runtime::{Runtime, RuntimeLimits};
use transdb_host::scheduler::Scheduler;
use transdb_host::store::Store;
use transdb_proto::message::Encoding;

mod harness;

#[derive(serde::Serialize)]
struct Transfer<'a> {
    from: &'a str,
    to: &'a str,
    amount: i64,
}

fn main() {
    let mut seconds = 3.0;
    let mut accounts = 10_000usize;
    let mut shards = transdb_host::config::default_shards();
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--seconds" => {
                seconds = arguments
                    .next()
                    .and_then(|value| value.parse().ok())
                    .expect("--seconds N")
            }
            "--accounts" => {
                accounts = arguments
                    .next()
                    .and_then(|value| value.parse().ok())
                    .expect("--accounts N")
            }
            "--shards" => {
                shards = arguments
                    .next()
                    .and_then(|value| value.parse().ok())
                    .expect("--shards N")
            }
            _ => {} // cargo bench passes --bench
        }
    }
    let module_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/procedures/bank.wasm"
    );
    let module = std::fs::read(module_path).unwrap_or_else(|error| {
        panic!("cannot read {module_path} ({error}): run scripts/build-procedures first")
    });
    let duration = Duration::from_secs_f64(seconds);
    println!(
        "bank transfers through the wasm runtime, in process, {accounts} accounts, {shards} shards, {seconds} s per row"
    );
    println!(
        "{:<34} {:>8} {:>14} {:>12}",
        "case", "threads", "transfers/s", "ns/transfer"
    );
    for (case, hot_fraction) in [("uniform", 0.0), ("90% touch one hot account", 0.9)] {
        for threads in [1, 2] {
            let rate = run(&module, accounts, shards, threads, hot_fraction, duration);
            println!(
                "{case:<34} {threads:>8} {rate:>14.0} {:>12.0}",
                1e9 / rate * threads as f64
            );
        }
    }
}

/// Calls each thread keeps in flight: like the server's workers, a thread never waits for a
/// lock itself; a waiting call yields and another runs.
const CALLS_IN_FLIGHT_PER_THREAD: usize = 16;

fn run(
    module: &[u8],
    accounts: usize,
    shards: usize,
    threads: usize,
    hot_fraction: f64,
    duration: Duration,
) -> f64 {
    let store = Arc::new(Store::new(shards));
    let scheduler = Scheduler::new();
    let procedures = Arc::new(Procedures::new(
        Runtime::new(RuntimeLimits::default()).unwrap(),
        10,
    ));
    procedures.deploy("bank", module).unwrap();
    let names: Arc<Vec<String>> = Arc::new(
        (0..accounts)
            .map(|account| format!("acct-{account}"))
            .collect(),
    );
    for name in names.iter() {
        store.put(
            &format!("account:{name}"),
            bytes::Bytes::from_static(b"1000000000"),
            0,
        );
    }
    harness::run_tasks(
        threads,
        CALLS_IN_FLIGHT_PER_THREAD,
        duration,
        move |seed, deadline| {
            let (store, procedures, names, scheduler) = (
                store.clone(),
                procedures.clone(),
                names.clone(),
                scheduler.clone(),
            );
            async move {
                let mut next = harness::random_generator(seed);
                let mut done = 0u64;
                while Instant::now() < deadline {
                    let hot = (next() % 1000) as f64 / 1000.0 < hot_fraction;
                    let from = if hot {
                        0
                    } else {
                        (next() % names.len() as u64) as usize
                    };
                    let to =
                        (from + 1 + (next() % (names.len() as u64 - 1)) as usize) % names.len();
                    let transfer = Transfer {
                        from: &names[from],
                        to: &names[to],
                        amount: 1,
                    };
                    let arguments = postcard::to_allocvec(&transfer).unwrap();
                    let prepared = procedures
                        .prepare("bank", "transfer", Encoding::Postcard, &arguments, &store)
                        .unwrap();
                    let grant = scheduler.acquire(prepared.lock_set()).await.unwrap();
                    prepared
                        .execute(&store, &arguments, grant.position())
                        .unwrap();
                    drop(grant);
                    done += 1;
                    // Let the other calls of this thread run, as a server's worker does.
                    tokio::task::yield_now().await;
                }
                done
            }
        },
    )
}
