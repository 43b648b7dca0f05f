//! Execution: applies an admitted request to the state and encodes the response.
//!
//! Every request that touches state is a transaction with a position in one total order
//! and the locks of its keys ([`crate::scheduler`]): a single-key read or write locks its
//! key; a procedure call is prepared first (instantiated, key function run — no locks), then
//! waits for the locks of its declared keys (or of everything), then runs in the wasm
//! runtime as one transaction (see [`crate::transaction`]). Waiting never holds a thread.
//! This is the one place where requests meet state.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use transdb_proto::message::{BatchOp, Encoding, ServerStats};
use transdb_proto::{ErrorCode, ErrorResponse, Request, Response, frame};

use crate::admission;
use crate::lock_manager::{LockSet, Mode, Position, lock_id};
use crate::procedures::{MAX_RECONNAISSANCE_ATTEMPTS, Procedures, key_set_unstable};
use crate::scheduler::{Grant, Overloaded, Scheduler};
use crate::store::Store;

/// One transaction as it was ordered and answered (see [`Executor::with_history`]).
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Its position in the total order.
    pub position: Position,
    /// The request.
    pub request: Request<'static>,
    /// The response frame sent back.
    pub response: Vec<u8>,
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
        Executor {
            store,
            procedures,
            scheduler: Scheduler::with_limit(max_pending_transactions),
            call_slots: Semaphore::new(slots),
            history: None,
        }
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

    /// Admits and executes `request`, appending the response frame to `out`.
    pub async fn execute(&self, request: Request<'_>, out: &mut Vec<u8>) {
        if let Err(refusal) = admission::admit(&request) {
            return encode(&Response::Error(refusal), out);
        }
        let recorded = self.history.as_ref().map(|_| request.clone().into_owned());
        let start = out.len();
        let grant = match request {
            Request::Ping => {
                encode(&Response::Pong, out);
                None
            }
            Request::Get { key } => match self.acquire(one_key(&key, Mode::Shared), out).await {
                Some(grant) => {
                    let value = self.store.get(&key);
                    encode(&Response::Value(value.as_deref().map(Cow::Borrowed)), out);
                    Some(grant)
                }
                None => None,
            },
            Request::Put { key, value } => {
                match self.acquire(one_key(&key, Mode::Exclusive), out).await {
                    Some(grant) => {
                        self.store.put(&key, Bytes::copy_from_slice(&value));
                        encode(&Response::Stored, out);
                        Some(grant)
                    }
                    None => None,
                }
            }
            Request::Delete { key } => {
                match self.acquire(one_key(&key, Mode::Exclusive), out).await {
                    Some(grant) => {
                        encode(
                            &Response::Deleted {
                                existed: self.store.delete(&key),
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
                match self.acquire(locks, out).await {
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
                        let response = match self.store.apply(writes) {
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
            Request::Stats => match self.acquire(LockSet::All, out).await {
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
                request,
                response,
            });
        }
        drop(grant); // the locks are released after the response is final
    }

    /// Orders a transaction and waits for its locks, or answers `OVERLOADED`.
    async fn acquire(&self, locks: LockSet, out: &mut Vec<u8>) -> Option<Grant> {
        match self.scheduler.acquire(locks).await {
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
            let grant = self.acquire(prepared.lock_set(), out).await?;
            let response = match prepared.execute(&self.store, args) {
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
