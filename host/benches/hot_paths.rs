//! Criterion micro-benchmarks of the hot paths a request crosses, each alone and on one
//! thread, so that a change to one of them shows up as a number rather than as noise in the
//! end-to-end benchmarks (`procedure_calls`, `scheduler`):
//!
//! - `frame`: encoding a typical message into a reused buffer (as the server writes its
//!   answers) and splitting + decoding one (as it reads requests): a `Get` of a short key,
//!   a `Put` of 256 bytes, a bank `Call` with postcard arguments, a `Value` of 256 bytes;
//!   and reading a length prefix;
//! - `shard`: the key hash, the key-to-shard map, and a `Store::get` hit on 10,000 keys of
//!   256 bytes in 2 shards;
//! - `lock`: ordering, granting and releasing a transaction that locks 2 keys exclusively
//!   (a transfer's lock set) through the real `Scheduler`, and through the bare
//!   `LockManager` underneath it;
//! - `wasm_call`: one bank `transfer` through the real runtime (instantiate, discover the
//!   keys, lock, run, commit), and its first half (`prepare`) alone.
//!
//! Every benchmark counts one operation per iteration, so criterion's `thrpt` is operations
//! per second and `time` is the cost of one.
//!
//! Run: `scripts/build-procedures && cargo bench -p transdb-host --bench hot_paths`; one
//! group: `cargo bench -p transdb-host --bench hot_paths -- frame` (the argument filters
//! benchmark names by regular expression); shorter runs: `-- --warm-up-time 1
//! --measurement-time 2`.

use std::borrow::Cow;
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use transdb_host::lock_manager::{LockManager, LockSet, Mode, Position, lock_id};
use transdb_host::procedures::Procedures;
use transdb_host::runtime::{PreparedCall, Runtime, RuntimeLimits};
use transdb_host::scheduler::Scheduler;
use transdb_host::store::Store;
use transdb_proto::frame;
use transdb_proto::message::{Encoding, Request, Response};
use transdb_proto::shard::{key_hash, shard_for_key};

/// Keys in the populated store and in the pool the lock benchmarks draw from: enough that
/// the store does not fit in a core's L1/L2 cache, as on a server.
const KEYS: usize = 10_000;
/// Shards of the store: one per core of the 2-core machines TransDB targets.
const SHARDS: usize = 2;
/// The size of the values written and read: a small record.
const VALUE_BYTES: usize = 256;
/// What every account starts with: enough for any number of 1-unit transfers a run makes.
const INITIAL_BALANCE: &[u8] = b"1000000000";

/// The arguments of the bank's `transfer` (as `procedures/bank` declares them).
#[derive(serde::Serialize)]
struct Transfer<'a> {
    from: &'a str,
    to: &'a str,
    amount: i64,
}

/// The name of account `index`, and the key of its balance (`procedures/bank`'s scheme).
fn account(index: usize) -> String {
    format!("acct-{index}")
}

fn account_key(index: usize) -> String {
    format!("account:{}", account(index))
}

/// Steps through `0..len` with a stride coprime to it, so consecutive operations touch
/// unrelated keys (no cache line reused by chance) yet every key is visited.
struct Cycle {
    next: usize,
    len: usize,
}

impl Cycle {
    const STRIDE: usize = 7_919; // prime, so coprime to any `len` it does not divide

    fn new(len: usize) -> Self {
        assert!(len > 0 && !len.is_multiple_of(Self::STRIDE));
        Self { next: 0, len }
    }

    fn next(&mut self) -> usize {
        let current = self.next;
        self.next = (self.next + Self::STRIDE) % self.len;
        current
    }
}

fn frame_codec(c: &mut Criterion) {
    let value = vec![0xa5; VALUE_BYTES];
    let transfer_args = postcard::to_allocvec(&Transfer {
        from: "acct-17",
        to: "acct-4711",
        amount: 30,
    })
    .unwrap();
    let requests = [
        (
            "get_request",
            Request::Get {
                key: "account:acct-4711".into(),
            },
        ),
        (
            "put_request_256_bytes",
            Request::Put {
                key: "account:acct-4711".into(),
                value: Cow::Borrowed(&value),
            },
        ),
        (
            "call_request_transfer",
            Request::Call {
                module: "bank".into(),
                procedure: "transfer".into(),
                encoding: Encoding::Postcard,
                args: Cow::Borrowed(&transfer_args),
            },
        ),
    ];
    let response = Response::Value(Some(Cow::Borrowed(&value)));

    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(1));
    let mut buffer = Vec::new();
    for (name, request) in &requests {
        group.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| {
                buffer.clear();
                frame::encode(black_box(request), &mut buffer).unwrap();
                black_box(&buffer);
            })
        });
    }
    group.bench_function("encode/value_response_256_bytes", |b| {
        b.iter(|| {
            buffer.clear();
            frame::encode(black_box(&response), &mut buffer).unwrap();
            black_box(&buffer);
        })
    });
    for (name, request) in &requests {
        let encoded = frame::encode_to_vec(request).unwrap();
        let (payload, _) = frame::split(&encoded).unwrap().unwrap();
        assert_eq!(&frame::decode::<Request<'_>>(payload).unwrap(), request);
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| {
                let (payload, _) = frame::split(black_box(&encoded)).unwrap().unwrap();
                black_box(frame::decode::<Request<'_>>(payload).unwrap());
            })
        });
    }
    let encoded = frame::encode_to_vec(&response).unwrap();
    let (payload, _) = frame::split(&encoded).unwrap().unwrap();
    assert_eq!(frame::decode::<Response<'_>>(payload).unwrap(), response);
    group.bench_function("decode/value_response_256_bytes", |b| {
        b.iter(|| {
            let (payload, _) = frame::split(black_box(&encoded)).unwrap().unwrap();
            black_box(frame::decode::<Response<'_>>(payload).unwrap());
        })
    });
    let header = *encoded.first_chunk::<{ frame::HEADER_BYTES }>().unwrap();
    group.bench_function("payload_length", |b| {
        b.iter(|| black_box(frame::payload_length(black_box(header)).unwrap()))
    });
    group.finish();
}

fn shard_lookup(c: &mut Criterion) {
    let keys: Vec<String> = (0..KEYS).map(account_key).collect();
    let store = Store::new(SHARDS);
    let value = Bytes::from(vec![0x5a; VALUE_BYTES]);
    for key in &keys {
        store.put(key, value.clone(), 0);
    }
    assert_eq!(
        store
            .shard_stats()
            .iter()
            .map(|stats| stats.keys)
            .sum::<usize>(),
        KEYS
    );
    let key = keys[4711].as_str();

    let mut group = c.benchmark_group("shard");
    group.throughput(Throughput::Elements(1));
    group.bench_function("key_hash", |b| {
        b.iter(|| black_box(key_hash(black_box(key))))
    });
    group.bench_function("shard_for_key", |b| {
        b.iter(|| black_box(shard_for_key(black_box(key), black_box(SHARDS))))
    });
    group.bench_function("store_shard_index", |b| {
        b.iter(|| black_box(store.shard_index(black_box(key))))
    });
    group.bench_function("store_get_hit_256_bytes", |b| {
        let mut cycle = Cycle::new(keys.len());
        b.iter(|| {
            let value = store.get(&keys[cycle.next()]);
            assert!(value.is_some());
            black_box(value)
        })
    });
    group.finish();
}

/// The lock set of a transfer between accounts `from` and `to`.
fn two_exclusive_keys(ids: &[u64], from: usize, to: usize) -> LockSet {
    LockSet::Keys(vec![
        (ids[from], Mode::Exclusive),
        (ids[to], Mode::Exclusive),
    ])
}

fn lock_manager(c: &mut Criterion) {
    let ids: Vec<u64> = (0..KEYS)
        .map(|index| lock_id(&account_key(index)))
        .collect();

    let mut group = c.benchmark_group("lock");
    group.throughput(Throughput::Elements(1));
    group.bench_function("scheduler_acquire_release_2_keys", |b| {
        let scheduler = Scheduler::new();
        let mut cycle = Cycle::new(KEYS);
        b.iter(|| {
            let from = cycle.next();
            let locks = two_exclusive_keys(&ids, from, (from + 1) % KEYS);
            // Nothing else holds a lock, so the grant comes at once, on this thread.
            let grant = scheduler.acquire_blocking(locks).unwrap();
            black_box(grant.position());
            drop(grant);
        });
        assert_eq!(scheduler.in_progress(), 0);
    });
    group.bench_function("lock_manager_request_release_2_keys", |b| {
        let mut locks = LockManager::new();
        let mut position: Position = 0;
        let mut cycle = Cycle::new(KEYS);
        b.iter(|| {
            let from = cycle.next();
            let granted =
                locks.request(position, two_exclusive_keys(&ids, from, (from + 1) % KEYS));
            assert!(granted);
            let runnable = locks.release(position);
            assert!(runnable.is_empty());
            position += 1;
        });
        assert!(locks.is_empty());
    });
    group.finish();
}

/// The bank module deployed on a store of [`KEYS`] funded accounts.
struct Bank {
    store: Arc<Store>,
    scheduler: Arc<Scheduler>,
    procedures: Procedures,
    names: Vec<String>,
}

impl Bank {
    /// # Panics
    /// If `target/procedures/bank.wasm` is missing: `scripts/build-procedures` builds it.
    fn new() -> Self {
        let module_path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/procedures/bank.wasm"
        );
        let module = std::fs::read(module_path).unwrap_or_else(|error| {
            panic!("cannot read {module_path} ({error}): run scripts/build-procedures first")
        });
        let store = Arc::new(Store::new(SHARDS));
        let procedures = Procedures::new(Runtime::new(RuntimeLimits::default()).unwrap(), 10);
        procedures.deploy("bank", &module).unwrap();
        for index in 0..KEYS {
            store.put(&account_key(index), Bytes::from_static(INITIAL_BALANCE), 0);
        }
        Self {
            store,
            scheduler: Scheduler::new(),
            procedures,
            names: (0..KEYS).map(account).collect(),
        }
    }

    /// The postcard arguments of a transfer of 1 from account `from` to the next one.
    fn transfer_arguments(&self, from: usize) -> Vec<u8> {
        postcard::to_allocvec(&Transfer {
            from: &self.names[from],
            to: &self.names[(from + 1) % KEYS],
            amount: 1,
        })
        .unwrap()
    }

    /// The first half of a transfer call with `arguments`: instantiated, keys declared.
    fn prepare_transfer(&self, arguments: &[u8]) -> PreparedCall {
        self.procedures
            .prepare(
                "bank",
                "transfer",
                Encoding::Postcard,
                arguments,
                &self.store,
            )
            .unwrap()
    }

    /// The sum of all balances.
    fn total(&self) -> i64 {
        (0..KEYS)
            .map(|index| parse_balance(&self.store.get(&account_key(index)).unwrap()))
            .sum()
    }
}

fn parse_balance(bytes: &[u8]) -> i64 {
    std::str::from_utf8(bytes).unwrap().parse().unwrap()
}

fn wasm_call(c: &mut Criterion) {
    // Built by the first benchmark that runs, so that a run filtered to other groups needs
    // neither the module nor the time to compile it.
    let mut bank: Option<Bank> = None;
    let mut group = c.benchmark_group("wasm_call");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bank_transfer", |b| {
        let bank = bank.get_or_insert_with(Bank::new);
        let mut cycle = Cycle::new(KEYS);
        b.iter(|| {
            let arguments = bank.transfer_arguments(cycle.next());
            let prepared = bank.prepare_transfer(&arguments);
            let grant = bank
                .scheduler
                .acquire_blocking(prepared.lock_set())
                .unwrap();
            let output = prepared
                .execute(&bank.store, &arguments, grant.position())
                .unwrap();
            drop(grant);
            black_box(output)
        })
    });
    group.bench_function("bank_transfer_prepare_only", |b| {
        let bank = bank.get_or_insert_with(Bank::new);
        let mut cycle = Cycle::new(KEYS);
        b.iter(|| {
            let arguments = bank.transfer_arguments(cycle.next());
            let prepared = bank.prepare_transfer(&arguments);
            black_box(prepared.lock_set())
        })
    });
    group.finish();
    if let Some(bank) = bank {
        // Every transfer moved one unit between two accounts: the total is unchanged.
        assert_eq!(bank.total(), parse_balance(INITIAL_BALANCE) * KEYS as i64);
    }
}

criterion_group!(benches, frame_codec, shard_lookup, lock_manager, wasm_call);
criterion_main!(benches);
