//! Execution: applies an admitted request to the store and encodes the response.
//!
//! Single-key requests run directly on the calling network task under their shard's lock
//! (see [`crate::store`]). Multi-key transactions will run here behind the sequencer and
//! scheduler; this module stays the one place where requests meet state.

use std::borrow::Cow;

use bytes::Bytes;
use transdb_proto::{ErrorCode, ErrorResponse, Request, Response, frame};

use crate::admission;
use crate::store::Store;

/// Admits and executes `request`, appending the response frame to `out`.
pub fn execute(store: &Store, request: Request<'_>, out: &mut Vec<u8>) {
    if let Err(refusal) = admission::admit(&request) {
        return encode(&Response::Error(refusal), out);
    }
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

    fn run(store: &Store, request: Request<'_>) -> Response<'static> {
        let mut out = Vec::new();
        execute(store, request, &mut out);
        let (payload, consumed) = frame::split(&out).unwrap().unwrap();
        assert_eq!(consumed, out.len(), "exactly one response frame");
        frame::decode::<Response<'_>>(payload).unwrap().into_owned()
    }

    #[test]
    fn requests_get_their_answers() {
        let store = Store::new(2);
        assert_eq!(run(&store, Request::Ping), Response::Pong);
        assert_eq!(
            run(&store, Request::Get { key: "k".into() }),
            Response::Value(None)
        );
        assert_eq!(
            run(
                &store,
                Request::Put {
                    key: "k".into(),
                    value: b"v".into()
                }
            ),
            Response::Stored
        );
        assert_eq!(
            run(&store, Request::Get { key: "k".into() }),
            Response::Value(Some(b"v".to_vec().into()))
        );
        assert_eq!(
            run(&store, Request::Delete { key: "k".into() }),
            Response::Deleted { existed: true }
        );
        assert_eq!(
            run(&store, Request::Delete { key: "k".into() }),
            Response::Deleted { existed: false }
        );
    }

    #[test]
    fn refused_requests_change_nothing() {
        let store = Store::new(1);
        let value = vec![1; transdb_proto::limits::MAX_VALUE_BYTES + 1];
        let response = run(
            &store,
            Request::Put {
                key: "k".into(),
                value: value.as_slice().into(),
            },
        );
        assert!(
            matches!(response, Response::Error(ref error) if error.code == ErrorCode::VALUE_TOO_LARGE)
        );
        assert_eq!(store.get("k"), None);
        assert_eq!(store.shard_stats()[0].keys, 0);
    }
}
