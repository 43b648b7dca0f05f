//! Fuzzing of the frame decoder, run by `cargo test` on the stable toolchain with bolero.
//!
//! Properties, for any bytes a peer may send:
//! - `frame::split`, `frame::decode::<Request>` and `frame::decode::<Response>` never panic;
//! - whatever decodes re-encodes (`frame::encode_to_vec`) into a frame that splits whole and
//!   decodes back to an equal value, and re-encoding that is a fixed point;
//! - a length prefix over `MAX_FRAME_BYTES` is refused from the 4 header bytes alone, before
//!   any payload byte is there; one within the limit waits for exactly `length` bytes.
//!
//! Each target runs `TRANSDB_FUZZ_ITERATIONS` random inputs (default: a few thousand, well
//! under a second each in a debug build), optionally capped at `TRANSDB_FUZZ_SECONDS`, after
//! replaying every file in `tests/__fuzz__/<target>/corpus` (and `crashes`). A failing input
//! is written to `tests/__fuzz__/<target>/corpus/` (and its hex printed) so that it is
//! replayed from then on; commit it with the fix. `BOLERO_RANDOM_SEED=<seed>` (printed on a
//! failure) replays a failing random input.
//!
//! Run: `cargo test -p transdb-proto --test fuzz_frames`; longer:
//! `TRANSDB_FUZZ_ITERATIONS=1000000 TRANSDB_FUZZ_SECONDS=60 cargo test -p transdb-proto
//! --test fuzz_frames -- --nocapture`.

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Duration;

use bolero::generator::bolero_generator::TypeGenerator;
use bolero::produce;
use transdb_proto::frame::{self, FrameError, HEADER_BYTES};
use transdb_proto::limits::MAX_FRAME_BYTES;
use transdb_proto::{Request, Response};

/// Random inputs per target when `TRANSDB_FUZZ_ITERATIONS` is not set.
const DEFAULT_ITERATIONS: usize = 20_000;

fn iterations() -> usize {
    std::env::var("TRANSDB_FUZZ_ITERATIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS)
}

fn time_cap() -> Option<Duration> {
    std::env::var("TRANSDB_FUZZ_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .map(Duration::from_secs_f64)
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/__fuzz__")
        .join(target)
        .join("corpus")
}

thread_local! {
    /// Payloads checked on this thread, how many decoded as a request or a response, and
    /// how many of those were not the canonical encoding of what they decoded to (postcard
    /// accepts e.g. over-long varints: allowed, and reported for information).
    static DECODED: RefCell<[usize; 4]> = const { RefCell::new([0; 4]) };
    /// The smallest input that failed on this thread (one test, one target), for
    /// [`save_failure`].
    static FAILED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Runs `check` on `input`; if it panics, remembers the input (the smallest failing one,
/// which is the shrunk one once bolero has shrunk it) before passing the panic on.
fn remembering<T>(input: &[u8], check: impl FnOnce() -> T) -> T {
    match panic::catch_unwind(AssertUnwindSafe(check)) {
        Ok(value) => value,
        Err(payload) => {
            FAILED.with_borrow_mut(|failed| {
                if failed
                    .as_ref()
                    .is_none_or(|known| input.len() < known.len())
                {
                    *failed = Some(input.to_vec());
                }
            });
            panic::resume_unwind(payload)
        }
    }
}

/// Runs a bolero target and, if it fails, writes the smallest failing input into the
/// target's corpus directory so that every later run replays it.
fn run_target(target: &str, body: impl FnOnce()) {
    DECODED.set([0; 4]);
    let outcome = panic::catch_unwind(AssertUnwindSafe(body));
    let [payloads, requests, responses, non_canonical] = DECODED.take();
    eprintln!(
        "fuzz target {target}: {payloads} payloads checked, {requests} decoded as requests, \
         {responses} as responses ({non_canonical} of those not in canonical encoding)"
    );
    if let Err(payload) = outcome {
        if let Some(input) = FAILED.take() {
            save_failure(target, &input);
        }
        panic::resume_unwind(payload);
    }
}

fn save_failure(target: &str, input: &[u8]) {
    let dir = corpus_dir(target);
    // FNV-1a: a stable name, so the same input is saved once.
    let hash = input.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let path = dir.join(format!("failure-{hash:016x}"));
    let hex: String = input.iter().map(|byte| format!("{byte:02x}")).collect();
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, input)) {
        Ok(()) => eprintln!(
            "fuzz target {target}: failing input saved to {} (replayed by every run from now on): {hex}",
            path.display()
        ),
        Err(error) => eprintln!(
            "fuzz target {target}: cannot save the failing input to {} ({error}): {hex}",
            path.display()
        ),
    }
}

/// The checks for one frame payload: decoding never panics (a panic fails the target), and
/// whatever decodes, as a request or a response, survives a round trip.
fn check_payload(payload: &[u8]) {
    DECODED.with_borrow_mut(|counts| counts[0] += 1);
    if let Ok(request) = frame::decode::<Request<'_>>(payload) {
        let frame = frame::encode_to_vec(&request).expect("a decoded request re-encodes");
        let again = roundtrip::<Request<'_>>(&frame);
        assert_eq!(
            again, request,
            "request round trip of payload {payload:02x?}"
        );
        // The encoding of a decoded value is canonical: encoding it again changes nothing.
        assert_eq!(
            frame::encode_to_vec(&again).unwrap(),
            frame,
            "re-encoding is a fixed point"
        );
        assert_eq!(request.clone().into_owned(), request);
        DECODED.with_borrow_mut(|counts| {
            counts[1] += 1;
            counts[3] += usize::from(frame[HEADER_BYTES..] != *payload);
        });
    }
    if let Ok(response) = frame::decode::<Response<'_>>(payload) {
        let frame = frame::encode_to_vec(&response).expect("a decoded response re-encodes");
        let again = roundtrip::<Response<'_>>(&frame);
        assert_eq!(
            again, response,
            "response round trip of payload {payload:02x?}"
        );
        assert_eq!(
            frame::encode_to_vec(&again).unwrap(),
            frame,
            "re-encoding is a fixed point"
        );
        assert_eq!(response.clone().into_owned(), response);
        DECODED.with_borrow_mut(|counts| {
            counts[2] += 1;
            counts[3] += usize::from(frame[HEADER_BYTES..] != *payload);
        });
    }
}

/// Splits `frame` (exactly one whole frame) and decodes its payload.
fn roundtrip<'a, T: serde::Deserialize<'a>>(frame: &'a [u8]) -> T {
    let (payload, consumed) = frame::split(frame)
        .expect("an encoded frame is within the limit")
        .expect("an encoded frame is whole");
    assert_eq!(consumed, frame.len(), "one frame, consumed whole");
    assert_eq!(payload.len() + HEADER_BYTES, frame.len());
    frame::decode(payload).expect("an encoded frame decodes")
}

/// `bytes` as a receiver sees a stream: frame after frame until one is incomplete or
/// refused; every complete payload is checked.
fn check_stream(bytes: &[u8]) {
    let mut rest = bytes;
    loop {
        match frame::split(rest) {
            Ok(Some((payload, consumed))) => {
                assert!(consumed >= HEADER_BYTES && consumed <= rest.len());
                assert_eq!(consumed, HEADER_BYTES + payload.len());
                assert!(payload.len() <= MAX_FRAME_BYTES);
                check_payload(payload);
                rest = &rest[consumed..];
            }
            Ok(None) => {
                // More bytes are needed: fewer than a header, or a header within the limit
                // announcing more than is there.
                if let Some(header) = rest.first_chunk::<HEADER_BYTES>() {
                    let length = u32::from_be_bytes(*header) as usize;
                    assert!(length <= MAX_FRAME_BYTES);
                    assert!(rest.len() < HEADER_BYTES + length);
                }
                break;
            }
            Err(FrameError::TooLarge { length }) => {
                assert!(length > MAX_FRAME_BYTES);
                let header = rest
                    .first_chunk::<HEADER_BYTES>()
                    .expect("a header was read");
                assert_eq!(length, u32::from_be_bytes(*header) as usize);
                break;
            }
            Err(other) => panic!("split reported {other:?}, which only TooLarge may be"),
        }
    }
}

/// Arbitrary bytes as a stream of frames, and as one bare payload.
#[test]
fn fuzz_frame_bytes() {
    run_target("frame_bytes", || {
        bolero::check!(name = "frame_bytes")
            .with_iterations(iterations())
            .with_test_time(time_cap().unwrap_or(Duration::MAX))
            .for_each(|bytes: &[u8]| {
                remembering(bytes, || {
                    check_stream(bytes);
                    check_payload(bytes);
                })
            });
    });
}

/// One postcard token; a sequence of them is a payload shaped like a message (a variant
/// index, then varints, strings, byte strings, booleans, options), so that far more inputs
/// get past the first byte than random bytes do, whatever the message types look like.
#[derive(Debug, TypeGenerator)]
enum Token {
    /// A small varint: a variant index, a count or a length.
    Small(u8),
    /// Any varint.
    Varint(u64),
    /// A varint written with redundant continuation bytes (not the canonical encoding).
    Overlong(u8, u8),
    /// A length-prefixed UTF-8 string.
    Str(String),
    /// A length-prefixed byte string.
    Bytes(Vec<u8>),
    /// A length prefix that lies about what follows.
    LyingLength(u16, Vec<u8>),
    /// A raw byte (a bool, an option tag, garbage).
    Raw(u8),
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn encode_tokens(tokens: &[Token]) -> Vec<u8> {
    let mut out = Vec::new();
    for token in tokens {
        match token {
            Token::Small(value) => varint(u64::from(value % 24), &mut out),
            Token::Varint(value) => varint(*value, &mut out),
            Token::Overlong(value, extra) => {
                out.push((value & 0x7f) | 0x80);
                out.extend(std::iter::repeat_n(0x80, usize::from(extra % 4)));
                out.push(0);
            }
            Token::Str(text) => {
                varint(text.len() as u64, &mut out);
                out.extend_from_slice(text.as_bytes());
            }
            Token::Bytes(bytes) => {
                varint(bytes.len() as u64, &mut out);
                out.extend_from_slice(bytes);
            }
            Token::LyingLength(length, bytes) => {
                varint(u64::from(*length), &mut out);
                out.extend_from_slice(bytes);
            }
            Token::Raw(byte) => out.push(*byte),
        }
    }
    out
}

/// Message-shaped payloads: a variant index followed by a few tokens.
#[test]
fn fuzz_frame_tokens() {
    run_target("frame_tokens", || {
        bolero::check!(name = "frame_tokens")
            .with_generator((
                produce::<u8>(),
                produce::<Vec<Token>>().with().len(0usize..=8),
            ))
            .with_iterations(iterations())
            .with_test_time(time_cap().unwrap_or(Duration::MAX))
            .for_each(|(variant, tokens)| {
                let mut payload = Vec::new();
                varint(u64::from(variant % 20), &mut payload);
                payload.extend(encode_tokens(tokens));
                remembering(&payload, || {
                    check_payload(&payload);
                    let mut framed = (payload.len() as u32).to_be_bytes().to_vec();
                    framed.extend_from_slice(&payload);
                    check_stream(&framed);
                })
            });
    });
}

/// An edit of a valid frame.
#[derive(Debug, TypeGenerator)]
enum Mutation {
    /// Flip bits of the byte at (an offset modulo the length).
    Flip(u16, u8),
    /// Set a byte.
    Set(u16, u8),
    /// Insert a byte.
    Insert(u16, u8),
    /// Remove a byte.
    Remove(u16),
    /// Cut the frame short.
    Truncate(u16),
    /// Append bytes.
    Append(Vec<u8>),
}

fn mutate(frame: &mut Vec<u8>, mutation: &Mutation) {
    let at = |offset: u16, len: usize| usize::from(offset) % len.max(1);
    match mutation {
        Mutation::Flip(offset, bits) if !frame.is_empty() => {
            let index = at(*offset, frame.len());
            frame[index] ^= bits;
        }
        Mutation::Set(offset, byte) if !frame.is_empty() => {
            let index = at(*offset, frame.len());
            frame[index] = *byte;
        }
        Mutation::Insert(offset, byte) => {
            let index = at(*offset, frame.len() + 1);
            frame.insert(index, *byte);
        }
        Mutation::Remove(offset) if !frame.is_empty() => {
            let index = at(*offset, frame.len());
            frame.remove(index);
        }
        Mutation::Truncate(length) => frame.truncate(usize::from(*length)),
        Mutation::Append(bytes) => frame.extend_from_slice(bytes),
        _ => {}
    }
}

/// The frames of the test vectors in `SPEC.md`: every kind of message the spec shows.
fn spec_vectors() -> Vec<Vec<u8>> {
    let spec = include_str!("../SPEC.md");
    let block = spec
        .split("```vectors\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("SPEC.md has a ```vectors block");
    block
        .lines()
        .filter_map(|line| line.rsplit_once("=>"))
        .map(|(_, hex)| {
            let hex: String = hex.split_whitespace().collect();
            (0..hex.len())
                .step_by(2)
                .map(|index| u8::from_str_radix(&hex[index..index + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

/// The spec's test vectors, edited: near-valid frames reach deep into every message type.
#[test]
fn fuzz_spec_vector_mutations() {
    let vectors = spec_vectors();
    assert!(vectors.len() > 10, "SPEC.md has test vectors");
    for vector in &vectors {
        // Unedited, each vector is one whole frame that decodes as a request or a response.
        let (payload, consumed) = frame::split(vector).unwrap().unwrap();
        assert_eq!(consumed, vector.len());
        assert!(
            frame::decode::<Request<'_>>(payload).is_ok()
                || frame::decode::<Response<'_>>(payload).is_ok()
        );
        check_stream(vector);
    }
    run_target("spec_vector_mutations", || {
        bolero::check!(name = "spec_vector_mutations")
            .with_generator((
                produce::<u8>(),
                produce::<Vec<Mutation>>().with().len(0usize..=4),
            ))
            .with_iterations(iterations())
            .with_test_time(time_cap().unwrap_or(Duration::MAX))
            .for_each(|(which, mutations)| {
                let mut frame = vectors[usize::from(*which) % vectors.len()].clone();
                for mutation in mutations {
                    mutate(&mut frame, mutation);
                }
                remembering(&frame, || {
                    check_stream(&frame);
                    if frame.len() >= HEADER_BYTES {
                        check_payload(&frame[HEADER_BYTES..]);
                    }
                })
            });
    });
}

/// A length prefix: anywhere, or near the limit.
#[derive(Debug, TypeGenerator)]
enum Length {
    Any(u32),
    NearLimit(i16),
    Small(u8),
}

impl Length {
    fn value(&self) -> u32 {
        match self {
            Length::Any(value) => *value,
            Length::NearLimit(delta) => (MAX_FRAME_BYTES as i64 + i64::from(*delta)) as u32,
            Length::Small(value) => u32::from(*value),
        }
    }
}

/// Any length prefix followed by any number of payload bytes: over the limit it is refused
/// whatever follows (even nothing: before the payload is read), within it `split` waits for
/// exactly `length` bytes and returns exactly those.
#[test]
fn fuzz_length_prefix() {
    run_target("length_prefix", || {
        bolero::check!(name = "length_prefix")
            .with_type::<(Length, Vec<u8>)>()
            .with_iterations(iterations())
            .with_test_time(time_cap().unwrap_or(Duration::MAX))
            .for_each(|(length, tail)| {
                let length = length.value();
                let mut buffer = length.to_be_bytes().to_vec();
                buffer.extend_from_slice(tail);
                remembering(&buffer, || {
                    let announced = length as usize;
                    let header = length.to_be_bytes();
                    if announced > MAX_FRAME_BYTES {
                        let refused = FrameError::TooLarge { length: announced };
                        assert_eq!(frame::payload_length(header), Err(refused));
                        assert_eq!(
                            frame::split(&header),
                            Err(refused),
                            "refused from the header alone"
                        );
                        assert_eq!(frame::split(&buffer), Err(refused));
                        assert_eq!(refused.code(), transdb_proto::ErrorCode::FRAME_TOO_LARGE);
                    } else {
                        assert_eq!(frame::payload_length(header), Ok(announced));
                        assert_eq!(
                            frame::split(&header),
                            if announced == 0 {
                                Ok(Some((&[][..], HEADER_BYTES)))
                            } else {
                                Ok(None)
                            }
                        );
                        match frame::split(&buffer) {
                            Ok(Some((payload, consumed))) => {
                                assert!(tail.len() >= announced);
                                assert_eq!(payload, &tail[..announced]);
                                assert_eq!(consumed, HEADER_BYTES + announced);
                            }
                            Ok(None) => assert!(tail.len() < announced),
                            Err(error) => panic!("a length within the limit was refused: {error}"),
                        }
                    }
                    // Fewer than four bytes are never an error: more are needed.
                    for cut in 0..HEADER_BYTES {
                        assert_eq!(frame::split(&buffer[..cut]), Ok(None));
                    }
                })
            });
    });
}
