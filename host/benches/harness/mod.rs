//! What the benchmarks share: a cheap random generator and a driver that runs `tasks` async
//! tasks per thread on a multi-threaded Tokio runtime of `threads` workers until a deadline
//! — the server's own set-up: a task waiting for a lock yields and another runs, and a task
//! woken by another task's release runs next on the waker's worker.

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

/// Runs `threads × tasks` copies of `task(seed, deadline)` on a runtime of `threads` workers
/// and returns the operations they report, per second.
pub fn run_tasks<F, T>(threads: usize, tasks: usize, duration: Duration, task: F) -> f64
where
    F: Fn(u64, Instant) -> T + Clone + Send + 'static,
    T: Future<Output = u64> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .build()
        .unwrap();
    let start = Instant::now();
    let deadline = start + duration;
    let total: u64 = runtime.block_on(async move {
        let handles: Vec<_> = (0..threads * tasks)
            .map(|index| tokio::spawn(task(index as u64, deadline)))
            .collect();
        let mut total = 0;
        for handle in handles {
            total += handle.await.unwrap();
        }
        total
    });
    total as f64 / start.elapsed().as_secs_f64()
}
