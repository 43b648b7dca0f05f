//! Admission: the checks a decoded request passes before it may touch any state.
//!
//! Today these are the key, value and argument size limits; authentication, rate limits and key-set
//! extraction join them here. A refused request is answered with an error response and
//! changes nothing; the stream and connection stay usable.

use transdb_proto::{ErrorResponse, Request, limits};

/// `Ok` if `request` may be executed, else the error response that refuses it.
pub fn admit(request: &Request<'_>) -> Result<(), ErrorResponse> {
    match request {
        Request::Ping | Request::Begin | Request::Commit | Request::Rollback => Ok(()),
        Request::Get { key } | Request::Delete { key } => limits::check_key(key),
        Request::Put { key, value } => {
            limits::check_key(key)?;
            limits::check_value(value)
        }
        // Names and module contents are checked by the registry, which knows the limits.
        Request::Deploy { .. }
        | Request::ListModules
        | Request::Stats
        | Request::Checkpoint
        | Request::Backup { .. } => Ok(()),
        Request::Batch { ops } => limits::check_batch(ops),
        Request::Call { args, .. } => limits::check_value(args).map_err(|mut error| {
            error.message = error.message.replace("value", "arguments");
            error
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use transdb_proto::ErrorCode;
    use transdb_proto::limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};

    #[test]
    fn every_keyed_request_is_checked() {
        let long = "x".repeat(MAX_KEY_BYTES + 1);
        for request in [
            Request::Get {
                key: long.as_str().into(),
            },
            Request::Delete {
                key: long.as_str().into(),
            },
            Request::Put {
                key: long.as_str().into(),
                value: b"".into(),
            },
        ] {
            assert_eq!(admit(&request).unwrap_err().code, ErrorCode::KEY_TOO_LARGE);
        }
        let value = vec![0; MAX_VALUE_BYTES + 1];
        let put = Request::Put {
            key: "k".into(),
            value: value.as_slice().into(),
        };
        assert_eq!(admit(&put).unwrap_err().code, ErrorCode::VALUE_TOO_LARGE);
        assert!(admit(&Request::Ping).is_ok());
    }
}
