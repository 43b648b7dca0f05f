//! Execution: applies an admitted request to the store and encodes the response.
//!
//! Single-key requests run directly on the calling network task under their shard's lock
//! (see [`crate::store`]); procedure calls run in the wasm runtime as one transaction over
//! the shards of their key set (see [`crate::transaction`]). The sequencer and scheduler
//! will sit in front of this; it stays the one place where requests meet state.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use transdb_proto::{ErrorCode, ErrorResponse, Request, Response, frame};

use crate::admission;
use crate::procedures::Procedures;
use crate::store::Store;

/// What requests execute against: the shards and the deployed procedures.
pub struct Executor {
    /// The shards.
    pub store: Arc<Store>,
    /// The deployed modules and their runtime.
    pub procedures: Arc<Procedures>,
}

impl Executor {
    /// Admits and executes `request`, appending the response frame to `out`. A deploy
    /// compiles the module: run it off the async workers.
    pub fn execute(&self, request: Request<'_>, out: &mut Vec<u8>) {
        if let Err(refusal) = admission::admit(&request) {
            return encode(&Response::Error(refusal), out);
        }
        let store = &*self.store;
        match request {
            Request::Deploy { name, module } => {
                let response = match self.procedures.deploy(&name, &module) {
                    Ok(info) => Response::Deployed(info),
                    Err(error) => Response::Error(error),
                };
                encode(&response, out);
            }
            Request::Call {
                module,
                procedure,
                encoding,
                args,
            } => {
                let response =
                    match self
                        .procedures
                        .call(&module, &procedure, encoding, &args, &self.store)
                    {
                        Ok(output) => Response::Output(Cow::Owned(output)),
                        Err(error) => Response::Error(error),
                    };
                encode(&response, out);
            }
            Request::ListModules => encode(&Response::Modules(self.procedures.list()), out),
            other => execute_key_value(store, other, out),
        }
    }
}

fn execute_key_value(store: &Store, request: Request<'_>, out: &mut Vec<u8>) {
    match request {
        Request::Ping => encode(&Response::Pong, out),
        Request::Get { key } => {
            let value = store.get(&key);
            encode(&Response::Value(value.as_deref().map(Cow::Borrowed)), out);
        }
        Request::Put { key, value } => {
            store.put(&key, Bytes::copy_from_slice(&value));
            encode(&Response::Stored, out);
        }
        Request::Delete { key } => {
            let existed = store.delete(&key);
            encode(&Response::Deleted { existed }, out);
        }
        Request::Deploy { .. } | Request::Call { .. } | Request::ListModules => {
            unreachable!("handled by Executor::execute")
        }
    }
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
        Executor {
            store: Arc::new(Store::new(2)),
            procedures: Arc::new(Procedures::new(runtime, 10)),
        }
    }

    fn run(executor: &Executor, request: Request<'_>) -> Response<'static> {
        let mut out = Vec::new();
        executor.execute(request, &mut out);
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
