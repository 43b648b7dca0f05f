//! What the benchmarks share: a cheap random generator and a driver that runs, on each of
//! `threads` threads, `tasks` async tasks on a local runtime until a deadline — as the
//! server's workers do, a task waiting for a lock yields and another runs.

use std::future::Future;
use std::time::{Duration, Instant};

/// xorshift64: cheap, deterministic per seed, and enough to pick accounts.
pub fn random_generator(seed: u64) -> impl FnMut() -> u64 {
    let mut state = (seed + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Runs `task(seed, deadline)` as `tasks` local async tasks on each of `threads` threads and
/// returns the operations they report, per second.
pub fn run_tasks<F, T>(threads: usize, tasks: usize, duration: Duration, task: F) -> f64
where
    F: Fn(u64, Instant) -> T + Clone + Send + 'static,
    T: Future<Output = u64> + 'static,
{
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..threads)
        .map(|thread| {
            let task = task.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let local = tokio::task::LocalSet::new();
                let handles: Vec<_> = (0..tasks)
                    .map(|index| local.spawn_local(task((thread * tasks + index) as u64, deadline)))
                    .collect();
                runtime.block_on(local.run_until(async move {
                    let mut total = 0;
                    for handle in handles {
                        total += handle.await.unwrap();
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
