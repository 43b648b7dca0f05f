//! Recovery benchmark: how long a restart takes to replay a command log of bank transfers.
//!
//! Writes a data directory whose log holds a deploy of `procedures/bank`, the opening of
//! 10,000 accounts and N transfers between random accounts (N = 1,000,000 by default),
//! written through the real command log exactly as a server logs them, then times
//! [`transdb_host::durability::recover`] on a fresh executor: reading and checking every
//! record, and replaying every transfer through the wasm runtime and the scheduler. At the
//! end it checks that the total of all balances is unchanged.
//!
//! Run: `scripts/build-procedures && cargo bench -p transdb-host --bench recovery`
//! (options after `--`: `--transfers N`, `--accounts N`).

use std::sync::Arc;
use std::time::Instant;

use transdb_host::durability::{self, Persistence};
use transdb_host::executor::{Executor, LogCommand};
use transdb_host::log::{CommandLog, DEFAULT_SEGMENT_BYTES, Durability, LOG_DIR, Tail};
use transdb_host::procedures::Procedures;
use transdb_host::runtime::{Runtime, RuntimeLimits};
use transdb_host::store::Store;
use transdb_proto::message::Encoding;

#[allow(dead_code)] // the shared driver is for the throughput benchmarks
mod harness;

#[derive(serde::Serialize)]
struct Transfer<'a> {
    from: &'a str,
    to: &'a str,
    amount: i64,
}

#[derive(serde::Serialize)]
struct Open<'a> {
    account: &'a str,
    balance: i64,
}

fn main() {
    let mut transfers = 1_000_000u64;
    let mut accounts = 10_000usize;
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        let mut value = || arguments.next().and_then(|value| value.parse().ok());
        match argument.as_str() {
            "--transfers" => transfers = value().expect("--transfers N"),
            "--accounts" => accounts = value().expect("--accounts N") as usize,
            _ => {} // cargo bench passes --bench
        }
    }
    let module_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/procedures/bank.wasm"
    );
    let module = std::fs::read(module_path)
        .unwrap_or_else(|error| panic!("{module_path}: {error}: run scripts/build-procedures"));
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..accounts).map(|index| format!("acct-{index}")).collect();

    // The log, as a server writes it.
    let digest = {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(&module).into();
        Persistence::new(dir.path(), None)
            .modules
            .save(&digest, &module)
            .unwrap();
        digest
    };
    let started = Instant::now();
    let log = CommandLog::open(
        &dir.path().join(LOG_DIR),
        Tail::default(),
        0,
        Durability::Async {
            interval: std::time::Duration::from_secs(1),
        },
        DEFAULT_SEGMENT_BYTES,
    )
    .unwrap();
    let call = |procedure: &str, args: Vec<u8>| {
        LogCommand::Call {
            module: "bank".into(),
            version: digest,
            procedure: procedure.to_owned().into(),
            encoding: Encoding::Postcard,
            args: args.into(),
            keys: None,
        }
        .encode()
    };
    let mut position = 0;
    let mut batch = vec![(
        position,
        LogCommand::Deploy {
            name: "bank".into(),
            version: digest,
        }
        .encode(),
    )];
    for name in &names {
        position += 1;
        let args = postcard::to_allocvec(&Open {
            account: name,
            balance: 1_000,
        })
        .unwrap();
        batch.push((position, call("open", args)));
    }
    let mut random = harness::random_generator(7);
    for _ in 0..transfers {
        position += 1;
        let from = &names[random() as usize % accounts];
        let to = &names[random() as usize % accounts];
        let args = postcard::to_allocvec(&Transfer {
            from,
            to,
            amount: (random() % 50) as i64 + 1,
        })
        .unwrap();
        batch.push((position, call("transfer", args)));
        if batch.len() == 1024 {
            log.append(std::mem::take(&mut batch), position + 1);
        }
    }
    log.append(batch, position + 1);
    log.close();
    let log_bytes = transdb_host::log::size(&dir.path().join(LOG_DIR));
    println!(
        "wrote a log of {} records ({} transfers), {:.1} MB, in {:.1} s",
        position + 1,
        transfers,
        log_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    // Recovery.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let executor = Executor::new(
        Arc::new(Store::new(transdb_host::config::default_shards())),
        Arc::new(Procedures::new(
            Runtime::new(RuntimeLimits::default()).unwrap(),
            10,
        )),
        100_000,
    )
    .with_persistence(Persistence::new(dir.path(), None));
    let recovery = runtime
        .block_on(durability::recover(
            &executor,
            Durability::Sync,
            DEFAULT_SEGMENT_BYTES,
        ))
        .unwrap();
    let seconds = recovery.elapsed.as_secs_f64();
    println!(
        "recovery: replayed {} records in {seconds:.2} s: {:.0} records/s ({:.0} MB/s of log)",
        recovery.replayed,
        recovery.replayed as f64 / seconds,
        log_bytes as f64 / 1e6 / seconds,
    );

    // Balances are plain keys holding decimal text.
    let total: i64 = names
        .iter()
        .map(|name| {
            let value = executor.store.get(&format!("account:{name}")).unwrap();
            std::str::from_utf8(&value).unwrap().parse::<i64>().unwrap()
        })
        .sum();
    assert_eq!(
        total,
        accounts as i64 * 1_000,
        "the total changed in replay"
    );
    println!("total unchanged after replay: {total}");
}
