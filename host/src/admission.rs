//! Admission: the checks a decoded request passes before it may touch any state.
//!
//! These are the connection's role ([`authorize`]), the key, value and argument size
//! limits ([`admit`]), and whether a request could add data to a full store
//! ([`adds_data`]). A refused request is answered with an error response and changes
//! nothing; the stream and connection stay usable.

use transdb_proto::message::BatchOp;
use transdb_proto::{ErrorCode, ErrorResponse, Request, Role, limits};

/// The weakest role that may send `request`. A `Call` needs only `read`: the executor
/// refuses, before ordering it, a call by a `read` connection of a procedure that may write.
pub fn required_role(request: &Request<'_>) -> Role {
    match request {
        Request::Ping
        | Request::Authenticate { .. }
        | Request::Get { .. }
        | Request::Stats
        | Request::ListModules
        | Request::Begin
        | Request::Commit
        | Request::Rollback
        | Request::Call { .. } => Role::Read,
        Request::Put { .. } | Request::Delete { .. } | Request::Batch { .. } => Role::Write,
        Request::Deploy { .. }
        | Request::Checkpoint
        | Request::Backup { .. }
        | Request::CreateToken { .. }
        | Request::RevokeToken { .. }
        | Request::ListTokens
        | Request::Shutdown
        | Request::Undeploy { .. } => Role::Admin,
    }
}

/// `Ok` if a connection with `role` may send `request`, else `PERMISSION_DENIED`.
pub fn authorize(role: Role, request: &Request<'_>) -> Result<(), ErrorResponse> {
    let required = required_role(request);
    if role >= required {
        return Ok(());
    }
    Err(ErrorResponse::new(
        ErrorCode::PERMISSION_DENIED,
        format!(
            "{} needs the {required} role and this connection has the {role} role: \
             connect with a token of the {required} role (an admin creates one with \
             `transdb token create NAME --role {required}`)",
            request.kind()
        ),
    ))
}

/// Whether `request` could add data to the store (refused while it is full). Calls and
/// commits are judged by the executor, which knows what they write.
pub fn adds_data(request: &Request<'_>) -> bool {
    match request {
        Request::Put { .. } => true,
        Request::Batch { ops } => ops.iter().any(|op| matches!(op, BatchOp::Put { .. })),
        _ => false,
    }
}

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
        | Request::Backup { .. }
        | Request::Authenticate { .. }
        | Request::CreateToken { .. }
        | Request::RevokeToken { .. }
        | Request::ListTokens
        | Request::Shutdown
        | Request::Undeploy { .. } => Ok(()),
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

    #[test]
    fn roles_allow_what_the_model_says() {
        let get = Request::Get { key: "k".into() };
        let put = Request::Put {
            key: "k".into(),
            value: b"v".as_slice().into(),
        };
        let deploy = Request::Deploy {
            name: "m".into(),
            module: b"".as_slice().into(),
        };
        for (request, weakest) in [
            (&get, Role::Read),
            (&Request::Stats, Role::Read),
            (&put, Role::Write),
            (&Request::Delete { key: "k".into() }, Role::Write),
            (&Request::Batch { ops: vec![] }, Role::Write),
            (&deploy, Role::Admin),
            (&Request::Checkpoint, Role::Admin),
            (&Request::Shutdown, Role::Admin),
            (&Request::ListTokens, Role::Admin),
        ] {
            for role in Role::ALL {
                let allowed = authorize(role, request);
                assert_eq!(
                    allowed.is_ok(),
                    role >= weakest,
                    "{role} {}",
                    request.kind()
                );
                if let Err(error) = allowed {
                    assert_eq!(error.code, ErrorCode::PERMISSION_DENIED);
                    assert!(error.message.contains(weakest.name()), "{}", error.message);
                }
            }
        }
    }
}
