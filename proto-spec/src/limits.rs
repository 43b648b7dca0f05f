//! Named limits of the protocol. Each is checked by the server (the authority) and, where
//! cheap, by clients before sending, with the same function and therefore the same message.

use alloc::format;

use crate::error::{ErrorCode, ErrorResponse};

/// Largest key, in bytes of its UTF-8 encoding. Keys are addresses, not payload: 1 KiB is far
/// more than any sensible key and keeps lock tables and logs compact.
pub const MAX_KEY_BYTES: usize = 1024;

/// Largest value, in bytes. 4 MiB bounds the memory one request can pin while it is read,
/// applied and answered, and matches the seed specification.
pub const MAX_VALUE_BYTES: usize = 4 * 1024 * 1024;

/// Room in a frame beyond the largest value: the message tag, the key and the length
/// prefixes of both. A value up to 64 KiB over [`MAX_VALUE_BYTES`] therefore still arrives
/// as a well-formed frame and is answered with [`ErrorCode::VALUE_TOO_LARGE`], which names
/// the limit, rather than a bare stream reset.
pub const FRAME_SLACK_BYTES: usize = 64 * 1024;

/// Largest frame payload (the bytes after the 4-byte length prefix), in either direction.
/// The length prefix is checked against this before a single payload byte is read.
pub const MAX_FRAME_BYTES: usize = MAX_VALUE_BYTES + FRAME_SLACK_BYTES;

/// Most writes in one batch: bounds the keys one transaction locks (the frame limit bounds
/// their bytes).
pub const MAX_BATCH_OPS: usize = 10_000;

/// Checks a batch's size and every key and value in it.
pub fn check_batch(ops: &[crate::message::BatchOp<'_>]) -> Result<(), ErrorResponse> {
    if ops.len() > MAX_BATCH_OPS {
        return Err(ErrorResponse::new(
            ErrorCode::TOO_MANY_KEYS,
            format!(
                "the batch has {} writes; the limit (MAX_BATCH_OPS) is {MAX_BATCH_OPS}: split it",
                ops.len()
            ),
        ));
    }
    for op in ops {
        check_key(op.key())?;
        if let crate::message::BatchOp::Put { value, .. } = op {
            check_value(value)?;
        }
    }
    Ok(())
}

/// Checks a key against [`MAX_KEY_BYTES`]. (UTF-8 validity is guaranteed by the type.)
pub fn check_key(key: &str) -> Result<(), ErrorResponse> {
    if key.len() > MAX_KEY_BYTES {
        return Err(ErrorResponse::new(
            ErrorCode::KEY_TOO_LARGE,
            format!(
                "key is {} bytes; the limit (MAX_KEY_BYTES) is {MAX_KEY_BYTES} bytes of UTF-8: use a shorter key",
                key.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a value against [`MAX_VALUE_BYTES`].
pub fn check_value(value: &[u8]) -> Result<(), ErrorResponse> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(ErrorResponse::new(
            ErrorCode::VALUE_TOO_LARGE,
            format!(
                "value is {} bytes; the limit (MAX_VALUE_BYTES) is {MAX_VALUE_BYTES} bytes: split it across several keys",
                value.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn key_at_the_limit_is_accepted_and_one_byte_more_is_refused_naming_the_limit() {
        assert!(check_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        let error = check_key(&"k".repeat(MAX_KEY_BYTES + 1)).unwrap_err();
        assert_eq!(error.code, ErrorCode::KEY_TOO_LARGE);
        assert!(error.message.contains("MAX_KEY_BYTES"), "{}", error.message);
        assert!(error.message.contains("1025"), "{}", error.message);
    }

    #[test]
    fn key_limit_counts_utf8_bytes_not_characters() {
        // 'é' is two bytes: 512 of them are exactly 1 KiB, 513 are over.
        assert!(check_key(&"é".repeat(512)).is_ok());
        assert!(check_key(&"é".repeat(513)).is_err());
        assert!(check_key("").is_ok());
    }

    #[test]
    fn value_at_the_limit_is_accepted_and_one_byte_more_is_refused_naming_the_limit() {
        assert!(check_value(&vec![0; MAX_VALUE_BYTES]).is_ok());
        let error = check_value(&vec![0; MAX_VALUE_BYTES + 1]).unwrap_err();
        assert_eq!(error.code, ErrorCode::VALUE_TOO_LARGE);
        assert!(
            error.message.contains("MAX_VALUE_BYTES"),
            "{}",
            error.message
        );
    }
}
