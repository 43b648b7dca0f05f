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
use tokio::sync::Semaphore;
use transdb_proto::{ErrorCode, ErrorResponse, Request, Response, frame};

use crate::admission;
use crate::lock_manager::{LockSet, Mode, lock_id};
use crate::procedures::Procedures;
use crate::scheduler::Scheduler;
use crate::store::Store;

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
}

impl Executor {
    /// An executor over `store` and `procedures`.
    pub fn new(store: Arc<Store>, procedures: Arc<Procedures>) -> Executor {
        // One slot stays free for a deploy's trial instantiation.
        let slots = (procedures.runtime().limits().concurrent_calls as usize)
            .saturating_sub(1)
            .max(1);
        Executor {
            store,
            procedures,
            scheduler: Scheduler::new(),
            call_slots: Semaphore::new(slots),
        }
    }

    /// Admits and executes `request`, appending the response frame to `out`.
    pub async fn execute(&self, request: Request<'_>, out: &mut Vec<u8>) {
        if let Err(refusal) = admission::admit(&request) {
            return encode(&Response::Error(refusal), out);
        }
        let response = match request {
            Request::Ping => Response::Pong,
            Request::Get { key } => {
                let _locks = self.scheduler.acquire(one_key(&key, Mode::Shared)).await;
                let value = self.store.get(&key);
                return encode(&Response::Value(value.as_deref().map(Cow::Borrowed)), out);
            }
            Request::Put { key, value } => {
                let _locks = self.scheduler.acquire(one_key(&key, Mode::Exclusive)).await;
                self.store.put(&key, Bytes::copy_from_slice(&value));
                Response::Stored
            }
            Request::Delete { key } => {
                let _locks = self.scheduler.acquire(one_key(&key, Mode::Exclusive)).await;
                Response::Deleted {
                    existed: self.store.delete(&key),
                }
            }
            Request::Call {
                module,
                procedure,
                encoding,
                args,
            } => match self.call(&module, &procedure, encoding, &args).await {
                Ok(output) => Response::Output(Cow::Owned(output)),
                Err(error) => Response::Error(error),
            },
            Request::Deploy { name, module } => {
                // Compiling takes milliseconds to seconds: not on an async worker.
                let (procedures, name, module) = (
                    self.procedures.clone(),
                    name.into_owned(),
                    module.into_owned(),
                );
                match tokio::task::spawn_blocking(move || procedures.deploy(&name, &module)).await {
                    Ok(Ok(info)) => Response::Deployed(info),
                    Ok(Err(error)) => Response::Error(error),
                    Err(panic) => Response::Error(ErrorResponse::new(
                        ErrorCode::INTERNAL,
                        format!("deploy failed: {panic}"),
                    )),
                }
            }
            Request::ListModules => Response::Modules(self.procedures.list()),
        };
        encode(&response, out);
    }

    async fn call(
        &self,
        module: &str,
        procedure: &str,
        encoding: transdb_proto::message::Encoding,
        args: &[u8],
    ) -> Result<Vec<u8>, ErrorResponse> {
        let _slot = self
            .call_slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let prepared = self.procedures.prepare(module, procedure, encoding, args)?;
        let _locks = self.scheduler.acquire(prepared.lock_set()).await;
        prepared.execute(&self.store, args)
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
