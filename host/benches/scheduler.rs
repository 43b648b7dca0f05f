//! What ordering and locking cost per transaction, without wasm or network: a transaction
//! of two exclusive keys (a transfer's lock set) is ordered, granted and released through
//! the real `Scheduler` and `LockManager`, from 1 and 2 threads, on uniform keys and with
//! 90 % of transactions touching one hot key.
//!
//! Run: `cargo bench -p transdb-host --bench scheduler` (`-- --seconds N`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use transdb_host::lock_manager::{LockSet, Mode, lock_id};
use transdb_host::scheduler::Scheduler;

mod harness;

const KEYS: u64 = 10_000;

fn main() {
    let mut seconds = 2.0;
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        if argument == "--seconds" {
            seconds = arguments
                .next()
                .and_then(|value| value.parse().ok())
                .expect("--seconds N");
        }
    }
    let duration = Duration::from_secs_f64(seconds);
    let ids: Arc<Vec<u64>> = Arc::new(
        (0..KEYS)
            .map(|key| lock_id(&format!("account:acct-{key}")))
            .collect(),
    );
    println!("ordering + locking of 2-key transactions (no execution), {seconds} s per row");
    println!(
        "{:<30} {:>8} {:>16} {:>14}",
        "case", "threads", "transactions/s", "ns/transaction"
    );
    for (case, hot_fraction) in [("uniform", 0.0), ("90% touch one hot key", 0.9)] {
        for threads in [1, 2] {
            let rate = run(&ids, threads, hot_fraction, duration);
            println!(
                "{case:<30} {threads:>8} {rate:>16.0} {:>14.0}",
                1e9 / rate * threads as f64
            );
        }
    }
}

fn run(ids: &Arc<Vec<u64>>, threads: usize, hot_fraction: f64, duration: Duration) -> f64 {
    let scheduler = Scheduler::new();
    let ids = ids.clone();
    harness::run_tasks(threads, 16, duration, move |seed, deadline| {
        let (scheduler, ids) = (scheduler.clone(), ids.clone());
        async move {
            let mut next = harness::random_generator(seed);
            let mut done = 0u64;
            while Instant::now() < deadline {
                for _ in 0..64 {
                    let hot = (next() % 1000) as f64 / 1000.0 < hot_fraction;
                    let from = if hot { 0 } else { next() % KEYS };
                    let to = (from + 1 + next() % (KEYS - 1)) % KEYS;
                    let locks = LockSet::Keys(vec![
                        (ids[from as usize], Mode::Exclusive),
                        (ids[to as usize], Mode::Exclusive),
                    ]);
                    drop(scheduler.acquire(locks).await.unwrap());
                    done += 1;
                }
                tokio::task::yield_now().await;
            }
            done
        }
    })
}
