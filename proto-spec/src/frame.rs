//! Framing: every message travels as `length: u32 big-endian` followed by `length` bytes
//! of postcard payload, with `length <= MAX_FRAME_BYTES` checked before the payload is read.
//! A payload must decode to exactly one message with no bytes left over.

use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::limits::MAX_FRAME_BYTES;

/// Size of the length prefix.
pub const HEADER_BYTES: usize = 4;

/// Why bytes are not a valid frame. Each maps to the [`ErrorCode`] of the stream reset
/// a receiver answers it with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME_BYTES`].
    TooLarge {
        /// The length the prefix announced.
        length: usize,
    },
    /// The payload is not exactly one valid message.
    Malformed,
    /// The data ended inside a frame.
    Truncated,
}

impl FrameError {
    /// The code a receiver resets the stream with.
    pub fn code(self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            FrameError::Malformed => ErrorCode::MALFORMED_FRAME,
            FrameError::Truncated => ErrorCode::TRUNCATED_FRAME,
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { length } => write!(
                f,
                "frame of {length} bytes exceeds MAX_FRAME_BYTES ({MAX_FRAME_BYTES})"
            ),
            FrameError::Malformed => f.write_str("frame payload is not a valid message"),
            FrameError::Truncated => f.write_str("stream ended in the middle of a frame"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FrameError {}

/// Appends `message` as one frame (prefix + payload) to `out`.
///
/// # Errors
/// [`FrameError::TooLarge`] if the payload would exceed [`MAX_FRAME_BYTES`]; `out` is then
/// left as it was.
pub fn encode<T: Serialize>(message: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    let encoded = postcard::to_extend(message, core::mem::take(out));
    *out = match encoded {
        Ok(buffer) => buffer,
        // Serializing our own message types into a Vec cannot fail.
        Err(_) => unreachable!("postcard serialization into a Vec failed"),
    };
    let length = out.len() - start - HEADER_BYTES;
    if length > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(FrameError::TooLarge { length });
    }
    out[start..start + HEADER_BYTES].copy_from_slice(&(length as u32).to_be_bytes());
    Ok(())
}

/// `message` as one frame in a new buffer.
pub fn encode_to_vec<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode(message, &mut out)?;
    Ok(out)
}

/// The payload length announced by a length prefix, checked against [`MAX_FRAME_BYTES`].
pub fn payload_length(header: [u8; HEADER_BYTES]) -> Result<usize, FrameError> {
    let length = u32::from_be_bytes(header) as usize;
    if length > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { length });
    }
    Ok(length)
}

/// Decodes one frame payload (without its prefix) into exactly one message.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes(payload) {
        Ok((message, [])) => Ok(message),
        Ok(_) | Err(_) => Err(FrameError::Malformed),
    }
}

/// Splits the first complete frame off the front of `buffer`.
///
/// Returns `Ok(Some((payload, consumed)))` for a complete frame, `Ok(None)` if more bytes
/// are needed, or an error as soon as the prefix is over the limit.
pub fn split(buffer: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let Some(header) = buffer.first_chunk::<HEADER_BYTES>() else {
        return Ok(None);
    };
    let length = payload_length(*header)?;
    let end = HEADER_BYTES + length;
    Ok(buffer.get(HEADER_BYTES..end).map(|payload| (payload, end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorResponse;
    use crate::limits::MAX_VALUE_BYTES;
    use crate::message::{Request, Response};
    use alloc::string::String;
    use alloc::vec;

    fn roundtrip_request(request: Request<'_>) {
        let frame = encode_to_vec(&request).unwrap();
        let (payload, consumed) = split(&frame).unwrap().unwrap();
        assert_eq!(consumed, frame.len());
        let decoded = decode::<Request<'_>>(payload).unwrap();
        // Strings and bytes are borrowed from the frame, not copied.
        if let Request::Get { key } | Request::Delete { key } | Request::Put { key, .. } = &decoded
        {
            assert!(matches!(key, alloc::borrow::Cow::Borrowed(_)));
        }
        assert_eq!(decoded, request);
    }

    #[test]
    fn every_request_kind_roundtrips() {
        roundtrip_request(Request::Ping);
        roundtrip_request(Request::Get {
            key: "ключ 🔑".into(),
        });
        roundtrip_request(Request::Put {
            key: "".into(),
            value: vec![0, 255, 10, 13].into(),
        });
        roundtrip_request(Request::Delete {
            key: "k".repeat(1024).into(),
        });
    }

    #[test]
    fn the_largest_value_with_the_largest_key_fits_in_a_frame() {
        let request = Request::Put {
            key: "k".repeat(1024).into(),
            value: vec![7; MAX_VALUE_BYTES].into(),
        };
        roundtrip_request(request);
    }

    #[test]
    fn a_payload_over_the_limit_is_not_encoded() {
        let request = Request::Put {
            key: "".into(),
            value: vec![0; MAX_FRAME_BYTES].into(),
        };
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            encode(&request, &mut out),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn an_oversized_prefix_is_refused_before_the_payload_arrives() {
        let header = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert_eq!(
            split(&header),
            Err(FrameError::TooLarge {
                length: MAX_FRAME_BYTES + 1
            })
        );
        assert_eq!(split(&(MAX_FRAME_BYTES as u32).to_be_bytes()), Ok(None));
    }

    #[test]
    fn partial_frames_ask_for_more_bytes() {
        let frame = encode_to_vec(&Request::Get { key: "abc".into() }).unwrap();
        for cut in 0..frame.len() {
            assert_eq!(split(&frame[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn trailing_bytes_and_garbage_are_malformed() {
        let mut frame = encode_to_vec(&Request::Ping).unwrap();
        frame.push(0);
        assert_eq!(
            decode::<Request>(&frame[HEADER_BYTES..]),
            Err(FrameError::Malformed)
        );
        assert_eq!(decode::<Request>(&[0xff, 0xff]), Err(FrameError::Malformed));
        assert_eq!(decode::<Request>(&[]), Err(FrameError::Malformed));
        // A Get whose key is not UTF-8.
        assert_eq!(decode::<Request>(&[1, 1, 0xff]), Err(FrameError::Malformed));
    }

    /// The hex test vectors in `SPEC.md` (the fenced block tagged `vectors`) are exactly
    /// the frames this encoder produces for the messages named here.
    #[test]
    fn spec_test_vectors_match_the_encoder() {
        let messages: &[(&str, Vec<u8>)] = &[
            ("request Ping", encode_to_vec(&Request::Ping).unwrap()),
            (
                "request Get{key:\"a\"}",
                encode_to_vec(&Request::Get { key: "a".into() }).unwrap(),
            ),
            (
                "request Put{key:\"é\",value:[0x00,0xff]}",
                encode_to_vec(&Request::Put {
                    key: "é".into(),
                    value: vec![0x00, 0xff].into(),
                })
                .unwrap(),
            ),
            (
                "request Delete{key:\"bob\"}",
                encode_to_vec(&Request::Delete { key: "bob".into() }).unwrap(),
            ),
            (
                "request Call{module:\"m\",procedure:\"p\",encoding:Json,args:\"{}\"}",
                encode_to_vec(&Request::Call {
                    module: "m".into(),
                    procedure: "p".into(),
                    encoding: crate::message::Encoding::Json,
                    args: b"{}".as_slice().into(),
                })
                .unwrap(),
            ),
            (
                "request ListModules",
                encode_to_vec(&Request::ListModules).unwrap(),
            ),
            ("request Stats", encode_to_vec(&Request::Stats).unwrap()),
            (
                "request Batch[Put{key:\"a\",value:\"1\"},Delete{key:\"c\"}]",
                encode_to_vec(&Request::Batch {
                    ops: vec![
                        crate::message::BatchOp::Put {
                            key: "a".into(),
                            value: b"1".as_slice().into(),
                        },
                        crate::message::BatchOp::Delete { key: "c".into() },
                    ],
                })
                .unwrap(),
            ),
            ("request Begin", encode_to_vec(&Request::Begin).unwrap()),
            ("request Commit", encode_to_vec(&Request::Commit).unwrap()),
            (
                "request Rollback",
                encode_to_vec(&Request::Rollback).unwrap(),
            ),
            (
                "response Begun{snapshot:300}",
                encode_to_vec(&Response::Begun { snapshot: 300 }).unwrap(),
            ),
            (
                "response Committed{position:5}",
                encode_to_vec(&Response::Committed { position: 5 }).unwrap(),
            ),
            (
                "response RolledBack",
                encode_to_vec(&Response::RolledBack).unwrap(),
            ),
            (
                "request Checkpoint",
                encode_to_vec(&Request::Checkpoint).unwrap(),
            ),
            (
                "request Backup{dir:\"b\"}",
                encode_to_vec(&Request::Backup { dir: "b".into() }).unwrap(),
            ),
            (
                "response Checkpointed{position:5,keys:2,bytes:300,path:\"c\"}",
                encode_to_vec(&Response::Checkpointed(crate::message::CheckpointInfo {
                    position: 5,
                    keys: 2,
                    bytes: 300,
                    path: "c".into(),
                }))
                .unwrap(),
            ),
            (
                "request Authenticate{token:Some(\"t\")}",
                encode_to_vec(&Request::Authenticate {
                    token: Some("t".into()),
                })
                .unwrap(),
            ),
            (
                "request CreateToken{name:\"ci\",role:Write}",
                encode_to_vec(&Request::CreateToken {
                    name: "ci".into(),
                    role: crate::message::Role::Write,
                })
                .unwrap(),
            ),
            (
                "request RevokeToken{id:\"ab\"}",
                encode_to_vec(&Request::RevokeToken { id: "ab".into() }).unwrap(),
            ),
            (
                "request ListTokens",
                encode_to_vec(&Request::ListTokens).unwrap(),
            ),
            (
                "request Shutdown",
                encode_to_vec(&Request::Shutdown).unwrap(),
            ),
            (
                "request Undeploy{name:\"m\"}",
                encode_to_vec(&Request::Undeploy { name: "m".into() }).unwrap(),
            ),
            (
                "response Authenticated{role:Write}",
                encode_to_vec(&Response::Authenticated {
                    role: crate::message::Role::Write,
                })
                .unwrap(),
            ),
            (
                "response ShuttingDown",
                encode_to_vec(&Response::ShuttingDown).unwrap(),
            ),
            (
                "response Output(\"ok\")",
                encode_to_vec(&Response::Output(b"ok".as_slice().into())).unwrap(),
            ),
            ("response Pong", encode_to_vec(&Response::Pong).unwrap()),
            (
                "response Value(None)",
                encode_to_vec(&Response::Value(None)).unwrap(),
            ),
            (
                "response Value(Some(\"hi\"))",
                encode_to_vec(&Response::Value(Some(b"hi".as_slice().into()))).unwrap(),
            ),
            ("response Stored", encode_to_vec(&Response::Stored).unwrap()),
            (
                "response Deleted{existed:true}",
                encode_to_vec(&Response::Deleted { existed: true }).unwrap(),
            ),
            (
                "response Error{code:KEY_TOO_LARGE,message:\"no\"}",
                encode_to_vec(&Response::Error(ErrorResponse::new(
                    crate::ErrorCode::KEY_TOO_LARGE,
                    "no",
                )))
                .unwrap(),
            ),
        ];
        let spec = include_str!("../SPEC.md");
        let block = spec
            .split("```vectors\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("SPEC.md has a ```vectors block");
        let mut seen = 0;
        for line in block.lines().filter(|line| !line.trim().is_empty()) {
            let (label, hex_text) = line
                .rsplit_once("=>")
                .expect("vector line is `label => hex`");
            let label = label.trim();
            let expected = hex::decode(hex_text.split_whitespace().collect::<String>()).unwrap();
            let (_, encoded) = messages
                .iter()
                .find(|(name, _)| *name == label)
                .unwrap_or_else(|| panic!("SPEC.md vector {label:?} is not checked by this test"));
            assert_eq!(
                hex::encode(encoded),
                hex::encode(&expected),
                "vector {label}"
            );
            seen += 1;
        }
        assert_eq!(
            seen,
            messages.len(),
            "every checked message has a vector in SPEC.md"
        );
    }
}
