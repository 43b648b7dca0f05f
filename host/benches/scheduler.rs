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
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let (scheduler, ids) = (scheduler.clone(), ids.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let local = tokio::task::LocalSet::new();
                let tasks: Vec<_> = (0..16u64)
                    .map(|task| {
                        let (scheduler, ids) = (scheduler.clone(), ids.clone());
                        let mut random =
                            (thread as u64 * 16 + task + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        local.spawn_local(async move {
                            let mut next = move || {
                                random ^= random << 13;
                                random ^= random >> 7;
                                random ^= random << 17;
                                random
                            };
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
                        })
                    })
                    .collect();
                runtime.block_on(local.run_until(async move {
                    let mut total = 0;
                    for task in tasks {
                        total += task.await.unwrap();
                    }
                    total
                }))
            })
        })
        .collect();
    let total: u64 = handles
        .into_iter()
        .map(|handle| handle.join().unwrap())
        .sum();
    total as f64 / start.elapsed().as_secs_f64()
}
