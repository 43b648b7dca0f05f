//! Execution: applies an admitted request to the state and encodes the response.
//!
//! Every request that touches state is a transaction with a position in one total order
//! and the locks of its keys ([`crate::scheduler`]): a single-key read or write locks its
//! key; a procedure call is prepared first (instantiated, key function run — no locks), then
//! waits for the locks of its declared keys (or of everything), then runs in the wasm
//! runtime as one transaction (see [`crate::transaction`]). Waiting never holds a thread.
//! An interactive transaction ([`crate::interactive`]) lives in the [`Session`] of its
//! stream and is ordered only at commit. This is the one place where requests meet state.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use transdb_proto::message::{BatchOp, Encoding, ServerStats};
use transdb_proto::{ErrorCode, ErrorResponse, Request, Response, frame};

use crate::admission;
use crate::interactive::{CommitPlan, Interactive, InteractiveLimits};
use crate::lock_manager::{LockSet, Mode, Position, lock_id};
use crate::procedures::{MAX_RECONNAISSANCE_ATTEMPTS, Procedures, key_set_unstable};
use crate::scheduler::{Grant, Overloaded, Scheduler};
use crate::store::Store;

/// One transaction as it was ordered and answered (see [`Executor::with_history`]).
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Its position in the total order.
    pub position: Position,
    /// What was ordered: the input a replay needs.
    pub command: Command,
    /// The response frame sent back.
    pub response: Vec<u8>,
}

/// What one ordered transaction was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A request that is a transaction of its own.
    Request(Request<'static>),
    /// The commit of an interactive transaction (its reads' versions and its writes).
    Commit(CommitPlan),
}

/// The state of one request stream: the interactive transaction open on it, if any.
/// Dropping the session rolls that transaction back.
#[derive(Default)]
pub struct Session {
    transaction: Option<Interactive>,
}

impl Session {
    /// Whether an interactive transaction is open on this stream.
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }
}

/// What requests execute against: the shards, the deployed procedures, the scheduler.
pub struct Executor {
    /// The shards.
    pub store: Arc<Store>,
    /// The deployed modules and their runtime.
    pub procedures: Arc<Procedures>,
    /// Orders transactions and grants their locks.
    pub scheduler: Arc<Scheduler>,
    /// One permit per instance slot a call may hold (taken before instantiating), so calls
    /// waiting for locks can never exhaust the slots that earlier calls need to finish.
    call_slots: Semaphore,
    /// Every ordered transaction, when recording (tests; the command log will do this).
    history: Option<Mutex<Vec<Recorded>>>,
    /// The bounds of interactive transactions.
    interactive_limits: InteractiveLimits,
}

impl Executor {
    /// An executor over `store` and `procedures`, refusing new transactions while
    /// `max_pending_transactions` are unfinished.
    pub fn new(
        store: Arc<Store>,
        procedures: Arc<Procedures>,
        max_pending_transactions: usize,
    ) -> Executor {
        // One slot stays free for a deploy's trial instantiation.
        let slots = (procedures.runtime().limits().concurrent_calls as usize)
            .saturating_sub(1)
            .max(1);
        let interactive_limits = InteractiveLimits {
            max_keys: procedures.runtime().limits().keys_per_call,
            max_write_bytes: crate::interactive::DEFAULT_MAX_TRANSACTION_BYTES,
        };
        Executor {
            scheduler: Scheduler::with_limit(
                max_pending_transactions,
                store.snapshot_floor().clone(),
            ),
            store,
            procedures,
            call_slots: Semaphore::new(slots),
            history: None,
            interactive_limits,
        }
    }

    /// Bounds interactive transactions' buffered writes at `max_write_bytes`.
    pub fn with_max_transaction_bytes(mut self, max_write_bytes: usize) -> Executor {
        self.interactive_limits.max_write_bytes = max_write_bytes;
        self
    }

    /// Records every ordered transaction with its position and response, for
    /// [`Executor::take_history`]: what a replay needs to reproduce the state.
    pub fn with_history(mut self) -> Executor {
        self.history = Some(Mutex::new(Vec::new()));
        self
    }

    /// The transactions recorded so far, in position order.
    pub fn take_history(&self) -> Vec<Recorded> {
        let mut history = self
            .history
            .as_ref()
            .map(|history| std::mem::take(&mut *history.lock()))
            .unwrap_or_default();
        history.sort_by_key(|recorded| recorded.position);
        history
    }

    /// Admits and executes `request` on a stream of its own, appending the response frame to
    /// `out`. (A `Begin` here opens a transaction that ends with the request.)
    pub async fn execute(&self, request: Request<'_>, out: &mut Vec<u8>) {
        self.execute_in(&mut Session::default(), request, out).await;
    }

    /// Replays a recorded transaction at its recorded position (positions can have gaps:
    /// a call retried after its reconnaissance took one and recorded nothing), appending
    /// the response frame to `out`. Replay one transaction at a time, in position order.
    pub async fn replay(&self, recorded: &Recorded, out: &mut Vec<u8>) {
        self.scheduler.advance_to(recorded.position);
        match &recorded.command {
            Command::Request(request) => self.execute(request.clone(), out).await,
            Command::Commit(plan) => self.commit(plan.clone(), out).await,
        }
    }

    /// Admits and executes `request`, a request of the stream whose state is `session`,
    /// appending the response frame to `out`.
    pub async fn execute_in(&self, session: &mut Session, request: Request<'_>, out: &mut Vec<u8>) {
        if let Err(refusal) = admission::admit(&request) {
            return encode(&Response::Error(refusal), out);
        }
        if session.in_transaction() {
            return self.in_transaction(session, request, out).await;
        }
        let recorded = self.history.as_ref().map(|_| request.clone().into_owned());
        let input_bytes = input_bytes(&request);
        let start = out.len();
        let grant = match request {
            Request::Begin => {
                let snapshot = self.scheduler.snapshot().await;
                let transaction =
                    Interactive::new(self.store.clone(), snapshot, self.interactive_limits);
                encode(
                    &Response::Begun {
                        snapshot: transaction.snapshot(),
                    },
                    out,
                );
                session.transaction = Some(transaction);
                None
            }
            Request::Commit | Request::Rollback => {
                encode(
                    &Response::Error(ErrorResponse::new(
                        ErrorCode::NO_TRANSACTION,
                        "there is no open transaction on this stream: send Begin first (a transaction lives on one stream)",
                    )),
                    out,
                );
                None
            }
            Request::Ping => {
                encode(&Response::Pong, out);
                None
            }
            Request::Get { key } => match self
                .acquire(one_key(&key, Mode::Shared), input_bytes, out)
                .await
            {
                Some(grant) => {
                    let value = self.store.get(&key);
                    encode(&Response::Value(value.as_deref().map(Cow::Borrowed)), out);
                    Some(grant)
                }
                None => None,
            },
            Request::Put { key, value } => {
                match self
                    .acquire(one_key(&key, Mode::Exclusive), input_bytes, out)
                    .await
                {
                    Some(grant) => {
                        self.store
                            .put(&key, Bytes::copy_from_slice(&value), grant.position());
                        encode(&Response::Stored, out);
                        Some(grant)
                    }
                    None => None,
                }
            }
            Request::Delete { key } => {
                match self
                    .acquire(one_key(&key, Mode::Exclusive), input_bytes, out)
                    .await
                {
                    Some(grant) => {
                        encode(
                            &Response::Deleted {
                                existed: self.store.delete(&key, grant.position()),
                            },
                            out,
                        );
                        Some(grant)
                    }
                    None => None,
                }
            }
            Request::Call {
                module,
                procedure,
                encoding,
                args,
            } => self.call(&module, &procedure, encoding, &args, out).await,
            Request::Batch { ops } => {
                let locks = LockSet::Keys(
                    ops.iter()
                        .map(|op| (lock_id(op.key()), Mode::Exclusive))
                        .collect(),
                );
                match self.acquire(locks, input_bytes, out).await {
                    Some(grant) => {
                        let count = ops.len() as u64;
                        let writes = ops
                            .into_iter()
                            .map(|op| match op {
                                BatchOp::Put { key, value } => {
                                    (key.into_owned(), Some(Bytes::copy_from_slice(&value)))
                                }
                                BatchOp::Delete { key } => (key.into_owned(), None),
                            })
                            .collect();
                        let response = match self.store.apply(writes, grant.position()) {
                            Ok(()) => Response::Batched { ops: count },
                            Err(reason) => Response::Error(ErrorResponse::new(
                                ErrorCode::INTERNAL,
                                format!("commit aborted: {reason}"),
                            )),
                        };
                        encode(&response, out);
                        Some(grant)
                    }
                    None => None,
                }
            }
            Request::Stats => match self.acquire(LockSet::All, input_bytes, out).await {
                Some(grant) => {
                    encode(&Response::Stats(self.stats(grant.position())), out);
                    Some(grant)
                }
                None => None,
            },
            Request::Deploy { name, module } => {
                // Compiling takes milliseconds to seconds: not on an async worker.
                let (procedures, name, module) = (
                    self.procedures.clone(),
                    name.into_owned(),
                    module.into_owned(),
                );
                let response =
                    match tokio::task::spawn_blocking(move || procedures.deploy(&name, &module))
                        .await
                    {
                        Ok(Ok(info)) => Response::Deployed(info),
                        Ok(Err(error)) => Response::Error(error),
                        Err(panic) => Response::Error(ErrorResponse::new(
                            ErrorCode::INTERNAL,
                            format!("deploy failed: {panic}"),
                        )),
                    };
                encode(&response, out);
                None
            }
            Request::ListModules => {
                encode(&Response::Modules(self.procedures.list()), out);
                None
            }
        };
        if let (Some(history), Some(grant), Some(request)) = (&self.history, &grant, recorded) {
            let response = out[start..].to_vec();
            history.lock().push(Recorded {
                position: grant.position(),
                command: Command::Request(request),
                response,
            });
        }
        drop(grant); // the locks are released after the response is final
    }

    /// A request on a stream with an open interactive transaction.
    async fn in_transaction(&self, session: &mut Session, request: Request<'_>, out: &mut Vec<u8>) {
        let transaction = session.transaction.as_mut().expect("a transaction is open");
        let result = match request {
            Request::Ping => Ok(Response::Pong),
            Request::Get { key } => match transaction.get(&key) {
                Ok(value) => {
                    return encode(&Response::Value(value.as_deref().map(Cow::Borrowed)), out);
                }
                Err(error) => Err(error),
            },
            Request::Put { key, value } => transaction.put(&key, &value).map(|()| Response::Stored),
            Request::Delete { key } => transaction
                .delete(&key)
                .map(|existed| Response::Deleted { existed }),
            Request::Rollback => {
                session.transaction = None;
                Ok(Response::RolledBack)
            }
            Request::Commit => {
                let transaction = session.transaction.take().expect("open");
                match transaction.finish() {
                    Err(snapshot) => Ok(Response::Committed { position: snapshot }),
                    Ok(plan) => {
                        self.commit(plan, out).await;
                        return;
                    }
                }
            }
            other => Err(ErrorResponse::new(
                ErrorCode::TRANSACTION_OPEN,
                format!(
                    "this stream has an open transaction, so it cannot run {:?}: only Get, Put, Delete, Commit, Rollback and Ping until the transaction ends",
                    other.kind()
                ),
            )),
        };
        match result {
            Ok(response) => encode(&response, out),
            Err(error) => {
                // Past a limit, the transaction cannot go on as the client meant it.
                if matches!(
                    error.code,
                    ErrorCode::TOO_MANY_KEYS | ErrorCode::TRANSACTION_TOO_LARGE
                ) {
                    session.transaction = None;
                }
                encode(&Response::Error(error), out);
            }
        }
    }

    /// Orders and applies an interactive transaction's commit (or refuses it with
    /// `CONFLICT`), appending the response to `out`.
    async fn commit(&self, plan: CommitPlan, out: &mut Vec<u8>) {
        let start = out.len();
        let Some(grant) = self.acquire(plan.lock_set(), plan.input_bytes(), out).await else {
            return;
        };
        let recorded = self.history.as_ref().map(|_| plan.clone());
        let response = match plan.validate(&self.store) {
            Err(conflict) => Response::Error(conflict),
            Ok(()) => match self.store.apply(plan.writes, grant.position()) {
                Ok(()) => Response::Committed {
                    position: grant.position(),
                },
                Err(reason) => Response::Error(ErrorResponse::new(
                    ErrorCode::INTERNAL,
                    format!("commit aborted: {reason}"),
                )),
            },
        };
        encode(&response, out);
        if let (Some(history), Some(plan)) = (&self.history, recorded) {
            history.lock().push(Recorded {
                position: grant.position(),
                command: Command::Commit(plan),
                response: out[start..].to_vec(),
            });
        }
        drop(grant);
    }

    /// Orders a transaction of `input_bytes` ordered input and waits for its locks, or
    /// answers `OVERLOADED`.
    async fn acquire(
        &self,
        locks: LockSet,
        input_bytes: usize,
        out: &mut Vec<u8>,
    ) -> Option<Grant> {
        match self.scheduler.acquire_sized(locks, input_bytes).await {
            Ok(grant) => Some(grant),
            Err(overloaded) => {
                encode(&Response::Error(overloaded_error(overloaded)), out);
                None
            }
        }
    }

    async fn call(
        &self,
        module: &str,
        procedure: &str,
        encoding: Encoding,
        args: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<Grant> {
        let _slot = self
            .call_slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        for _ in 0..MAX_RECONNAISSANCE_ATTEMPTS {
            let prepared =
                match self
                    .procedures
                    .prepare(module, procedure, encoding, args, &self.store)
                {
                    Ok(prepared) => prepared,
                    Err(error) => {
                        encode(&Response::Error(error), out);
                        return None;
                    }
                };
            let reconnoitred = prepared.reconnoitred();
            let grant = self
                .acquire(
                    prepared.lock_set(),
                    module.len() + procedure.len() + args.len(),
                    out,
                )
                .await?;
            let response = match prepared.execute(&self.store, args, grant.position()) {
                Ok(output) => Response::Output(Cow::Owned(output)),
                // The state moved between reconnaissance and execution: a deterministic
                // abort at this position, with no effect; try again at a later one.
                Err(error) if reconnoitred && error.code == ErrorCode::KEY_NOT_DECLARED => continue,
                Err(error) => Response::Error(error),
            };
            encode(&response, out);
            return Some(grant);
        }
        encode(
            &Response::Error(key_set_unstable(MAX_RECONNAISSANCE_ATTEMPTS)),
            out,
        );
        None
    }

    fn stats(&self, position: Position) -> ServerStats {
        let hash = self.store.state_hash();
        ServerStats {
            position,
            state_hash: hash.iter().map(|byte| format!("{byte:02x}")).collect(),
            shards: self
                .store
                .shard_stats()
                .into_iter()
                .map(|shard| transdb_proto::message::ShardStats {
                    keys: shard.keys as u64,
                    bytes: shard.bytes as u64,
                })
                .collect(),
            modules: self.procedures.list().len() as u64,
        }
    }
}

fn overloaded_error(overloaded: Overloaded) -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::OVERLOADED,
        format!(
            "{} transactions are pending, the limit (--max-pending-transactions): nothing was done, retry shortly",
            overloaded.limit
        ),
    )
}

/// The size of what a request puts in the order (keys, values, arguments): what the
/// sequencer's byte cap counts.
fn input_bytes(request: &Request<'_>) -> usize {
    match request {
        Request::Get { key } | Request::Delete { key } => key.len(),
        Request::Put { key, value } => key.len() + value.len(),
        Request::Call {
            module,
            procedure,
            args,
            ..
        } => module.len() + procedure.len() + args.len(),
        Request::Batch { ops } => ops
            .iter()
            .map(|op| match op {
                BatchOp::Put { key, value } => key.len() + value.len(),
                BatchOp::Delete { key } => key.len(),
            })
            .sum(),
        Request::Deploy { name, module } => name.len() + module.len(),
        _ => 0,
    }
}

fn one_key(key: &str, mode: Mode) -> LockSet {
    LockSet::Keys(vec![(lock_id(key), mode)])
}

fn encode(response: &Response<'_>, out: &mut Vec<u8>) {
    if let Err(error) = frame::encode(response, out) {
        // Unreachable while values are bounded below the frame limit; answer rather than panic.
        tracing::error!(%error, "response does not fit in a frame");
        let internal = Response::Error(ErrorResponse::new(
            ErrorCode::INTERNAL,
            "response too large to send",
        ));
        frame::encode(&internal, out).expect("a short error response fits in a frame");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executor() -> Executor {
        let runtime =
            crate::runtime::Runtime::new(crate::runtime::RuntimeLimits::default()).unwrap();
        Executor::new(
            Arc::new(Store::new(2)),
            Arc::new(Procedures::new(runtime, 10)),
            1000,
        )
    }

    fn run(executor: &Executor, request: Request<'_>) -> Response<'static> {
        let mut out = Vec::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(executor.execute(request, &mut out));
        let (payload, consumed) = frame::split(&out).unwrap().unwrap();
        assert_eq!(consumed, out.len(), "exactly one response frame");
        frame::decode::<Response<'_>>(payload).unwrap().into_owned()
    }

    #[test]
    fn requests_get_their_answers() {
        let executor = &executor();
        assert_eq!(run(executor, Request::Ping), Response::Pong);
        assert_eq!(
            run(executor, Request::Get { key: "k".into() }),
            Response::Value(None)
        );
        assert_eq!(
            run(
                executor,
                Request::Put {
                    key: "k".into(),
                    value: b"v".into()
                }
            ),
            Response::Stored
        );
        assert_eq!(
            run(executor, Request::Get { key: "k".into() }),
            Response::Value(Some(b"v".to_vec().into()))
        );
        assert_eq!(
            run(executor, Request::Delete { key: "k".into() }),
            Response::Deleted { existed: true }
        );
        assert_eq!(
            run(executor, Request::Delete { key: "k".into() }),
            Response::Deleted { existed: false }
        );
    }

    #[test]
    fn refused_requests_change_nothing() {
        let executor = executor();
        let value = vec![1; transdb_proto::limits::MAX_VALUE_BYTES + 1];
        let put = Request::Put {
            key: "k".into(),
            value: value.as_slice().into(),
        };
        let response = run(&executor, put);
        assert!(
            matches!(response, Response::Error(ref error) if error.code == ErrorCode::VALUE_TOO_LARGE)
        );
        assert_eq!(executor.store.get("k"), None);
        assert_eq!(
            executor
                .store
                .shard_stats()
                .iter()
                .map(|stats| stats.keys)
                .sum::<usize>(),
            0
        );

        let call = |args: &[u8]| Request::Call {
            module: "m".into(),
            procedure: "p".into(),
            encoding: transdb_proto::message::Encoding::Json,
            args: args.to_vec().into(),
        };
        let too_large = run(&executor, call(&value));
        assert!(
            matches!(too_large, Response::Error(ref error) if error.code == ErrorCode::VALUE_TOO_LARGE && error.message.contains("arguments")),
            "{too_large:?}"
        );
        let missing = run(&executor, call(b"{}"));
        assert!(
            matches!(missing, Response::Error(ref error) if error.code == ErrorCode::MODULE_NOT_FOUND),
            "{missing:?}"
        );
    }
}
