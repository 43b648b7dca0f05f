//! The command log: the ordered *input* of every transaction that can change state, in
//! position order, made durable with group commit.
//!
//! The sequencer's leader appends each batch as it hands it on ([`CommandLog::append`]),
//! after the batch's positions are assigned and before anything else is ordered. A log
//! thread writes what accumulated and, in [`Durability::Sync`], fsyncs it: one `fdatasync`
//! for everything appended while the previous one ran (group commit). A reply waits until
//! the log is durable through its transaction's position ([`CommandLog::wait_durable`]); a
//! transaction may run before that (its effects are in memory only), because everything a
//! later transaction can see was appended before it, so a durable later transaction implies
//! a durable earlier one. Recovery replays the log after the newest checkpoint through the
//! same deterministic executor.
//!
//! # Files
//!
//! `log/` holds segment files named by the position of their first record, zero-padded to
//! 20 digits (`00000000000000001024.log`), so that name order is log order. A segment is
//! a 40-byte header followed by records:
//!
//! ```text
//! header  8 bytes magic "TDBLOG" 0x00 0x03
//!         u64 LE  first position (the name's)
//!         u64 LE  position of the last record of the segment before it (u64::MAX: none),
//!                 so that a missing segment, or records missing at the end of one, show
//!         u64 LE  salt: random per segment, the seed of its records' checksums, so that
//!                 bytes a client wrote (a value holding a copy of a record) never read as
//!                 a valid record of this segment
//!         u32 LE  CRC32C of the 32 bytes before it; u32 zero
//! record  u32 LE  payload length L (at most MAX_RECORD_BYTES)
//!         u32 LE  CRC32C of (the salt, the length, position and synced fields, the payload)
//!         u64 LE  position (strictly increasing through the log)
//!         u64 LE  synced: every byte of the segment below this offset had been fsynced
//!                 when the record was written
//!         L bytes payload: one postcard-encoded command (crate::executor::LogCommand)
//! ```
//!
//! A new segment is started once the current one reaches the segment size; its file and
//! the directory are fsynced before records go in. The log thread encodes the records, so
//! the sequencer's leader only hands over what it ordered.
//!
//! # Damage
//!
//! Reading stops at the first record that is cut short, fails its checksum, or does not
//! advance the position. In the last segment that is a torn tail — a crash during a write,
//! which may leave any mix of written and unwritten pages of what was not yet fsynced — unless
//! a valid record after it says (by its `synced` field) that the damaged bytes had been
//! fsynced: then they were on disk and were damaged later. A torn tail is cut, with a log
//! line saying how many bytes were dropped; a last segment without a complete header (a crash
//! while it was created) is removed. Anything else — damage in an earlier segment (each was
//! fsynced whole before the next was started), damage that valid records prove was durable,
//! a segment whose predecessor's last record is not the one found — is damage in the middle:
//! recovery stops with an error naming the file and offset, since applying what follows
//! would be a guess.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use crate::lock_manager::Position;

/// The first eight bytes of a segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TDBLOG\x00\x03";
/// Bytes of a segment's header: the magic, the first position, the previous segment's last
/// position, the salt, a checksum of those and four zero bytes.
pub const SEGMENT_HEADER_BYTES: usize = 40;
/// The header's "previous" when no segment came before.
pub const NO_PREVIOUS: Position = Position::MAX;
/// Bytes of a record's header: length, checksum, position, synced offset.
pub const RECORD_HEADER_BYTES: usize = 24;
/// Largest record payload. A command is at most one request frame plus its key set, far
/// below this; a larger length read from disk is damage.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;
/// Default size at which a new segment is started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Default interval between background fsyncs in [`Durability::Async`].
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes appended and not yet written at most; beyond, new transactions are refused with
/// `OVERLOADED` until the disk catches up.
pub const MAX_UNWRITTEN_BYTES: usize = 64 * 1024 * 1024;
/// The log's directory inside the data directory.
pub const LOG_DIR: &str = "log";

/// What a reply promises about a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// A reply is sent only once its transaction's batch is fsynced: nothing acknowledged is
    /// lost by a crash of the process or the machine.
    Sync,
    /// Replies do not wait; the log is written at once and fsynced every `interval`. A crash
    /// of the process loses at most what was not yet written (milliseconds); a crash of the
    /// machine loses at most `interval` of acknowledged transactions.
    Async {
        /// Time between fsyncs.
        interval: Duration,
    },
    /// No log: the state lives in memory only and a restart starts empty.
    None,
}

/// A record read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The transaction's position.
    pub position: Position,
    /// The encoded command.
    pub payload: Vec<u8>,
}

/// A segment's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The position its name says it starts at.
    pub first: Position,
    /// The position of the last record of the segment before it, if there was one.
    pub previous: Option<Position>,
    /// The seed of its records' checksums.
    pub salt: u64,
}

impl SegmentHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut bytes = [0u8; SEGMENT_HEADER_BYTES];
        bytes[..8].copy_from_slice(&SEGMENT_MAGIC);
        bytes[8..16].copy_from_slice(&self.first.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.previous.unwrap_or(NO_PREVIOUS).to_le_bytes());
        bytes[24..32].copy_from_slice(&self.salt.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..32]);
        bytes[32..36].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// The header at the start of `bytes`, or what is wrong with it.
    fn decode(bytes: &[u8]) -> Result<SegmentHeader, &'static str> {
        if bytes.len() < SEGMENT_HEADER_BYTES || bytes[..8] != SEGMENT_MAGIC {
            return Err("not a TransDB log segment (wrong magic or format version)");
        }
        let stored = u32::from_le_bytes(bytes[32..36].try_into().expect("4 bytes"));
        if crc32c::crc32c(&bytes[..32]) != stored || bytes[36..40] != [0; 4] {
            return Err("the segment header fails its checksum");
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Ok(SegmentHeader {
            first: u64_at(8),
            previous: Some(u64_at(16)).filter(|&previous| previous != NO_PREVIOUS),
            salt: u64_at(24),
        })
    }
}

/// A fresh random salt for a new segment.
fn new_salt() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos()),
    );
    hasher.finish()
}

/// Appends one record of a segment whose salt is `salt`, written when every byte of the
/// segment below `synced` was fsynced, to `out`.
///
/// # Panics
/// If `payload` is longer than [`MAX_RECORD_BYTES`] (the scheduler refuses such a command
/// before ordering it).
pub fn encode_record(
    salt: u64,
    synced: u64,
    position: Position,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    assert!(payload.len() <= MAX_RECORD_BYTES, "log record too large");
    let length = (payload.len() as u32).to_le_bytes();
    let position = position.to_le_bytes();
    let synced = synced.to_le_bytes();
    out.extend_from_slice(&length);
    out.extend_from_slice(&checksum(salt, &length, &position, &synced, payload).to_le_bytes());
    out.extend_from_slice(&position);
    out.extend_from_slice(&synced);
    out.extend_from_slice(payload);
}

fn checksum(
    salt: u64,
    length: &[u8; 4],
    position: &[u8; 8],
    synced: &[u8; 8],
    payload: &[u8],
) -> u32 {
    let crc = crc32c::crc32c(&salt.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, length);
    let crc = crc32c::crc32c_append(crc, position);
    let crc = crc32c::crc32c_append(crc, synced);
    crc32c::crc32c_append(crc, payload)
}

/// One segment file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Its path.
    pub path: PathBuf,
    /// The position its name says it starts at.
    pub first: Position,
}

/// The segments in `dir`, in log order (an empty list if `dir` does not exist).
///
/// # Errors
/// If `dir` cannot be read.
pub fn segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut segments = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".log"))
            .filter(|stem| stem.len() == 20)
            .and_then(|stem| stem.parse::<Position>().ok());
        if let Some(first) = first {
            segments.push(Segment { path, first });
        }
    }
    segments.sort_by_key(|segment| segment.first);
    Ok(segments)
}

/// The file name of the segment starting at `first`.
pub fn segment_name(first: Position) -> String {
    format!("{first:020}.log")
}

/// What reading one segment found.
#[derive(Debug)]
pub struct SegmentContents {
    /// Its header; `None` for a last segment whose header was never completely written
    /// (then it holds nothing and is all torn).
    pub header: Option<SegmentHeader>,
    /// Its valid records, in order.
    pub records: Vec<Record>,
    /// Bytes of the file that are valid (header and records).
    pub valid_bytes: u64,
    /// Bytes after the valid ones: a torn tail to cut (only ever in the last segment).
    pub torn_bytes: u64,
    /// Why reading stopped early, if it did.
    pub torn_reason: Option<String>,
}

/// The log is damaged where a torn write cannot explain it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the command log is damaged in the middle: {path} at byte {offset}: {reason}. Nothing after it was applied. \
     Restore the data directory from a backup (`transdb restore`), or, accepting the loss of every transaction \
     from this point on, move this segment and every later one out of {dir}"
)]
pub struct Corrupt {
    /// The segment.
    pub path: String,
    /// The directory of the log.
    pub dir: String,
    /// The byte offset of the first bad record.
    pub offset: u64,
    /// What is wrong there.
    pub reason: String,
}

/// Reads a segment's bytes. `after` is the position of the last record of the segments
/// before it (its header must name it; `None` for the first segment read, whose
/// predecessor the caller checks); `last` says whether it is the last segment, the only one
/// that may have a torn tail.
///
/// # Errors
/// [`Corrupt`] if it is damaged anywhere but in a torn tail of the last segment.
pub fn read_segment(
    segment: &Segment,
    bytes: &[u8],
    after: Option<Position>,
    last: bool,
) -> Result<SegmentContents, Corrupt> {
    let corrupt = |offset: u64, reason: String| Corrupt {
        path: segment.path.display().to_string(),
        dir: segment
            .path
            .parent()
            .map(|dir| dir.display().to_string())
            .unwrap_or_default(),
        offset,
        reason,
    };
    // A crash while the segment was created leaves a header cut short, or zeros where the
    // file system allocated but never wrote it: nothing was in it yet.
    let unwritten_header =
        bytes.len() < SEGMENT_HEADER_BYTES || bytes.iter().all(|&byte| byte == 0);
    if unwritten_header {
        return if last {
            Ok(SegmentContents {
                header: None,
                records: Vec::new(),
                valid_bytes: 0,
                torn_bytes: bytes.len() as u64,
                torn_reason: Some("the segment's header was never completely written".into()),
            })
        } else {
            Err(corrupt(0, "the segment header is incomplete".into()))
        };
    }
    let header = SegmentHeader::decode(bytes).map_err(|reason| corrupt(0, reason.into()))?;
    if header.first != segment.first {
        return Err(corrupt(
            8,
            format!(
                "the header says the segment starts at position {}, its name says {}",
                header.first, segment.first
            ),
        ));
    }
    if after.is_some() && header.previous != after {
        let name = |position: Option<Position>| {
            position.map_or("no position".to_string(), |position| position.to_string())
        };
        return Err(corrupt(
            16,
            format!(
                "the segment follows one whose last record is at {}, but the last record found before it is at {} (records or a segment are missing)",
                name(header.previous),
                name(after),
            ),
        ));
    }
    let salt = header.salt;
    let mut records = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES;
    let mut previous = after;
    while offset < bytes.len() {
        match parse_record(&bytes[offset..], salt, previous, segment.first) {
            Ok((record, length, _)) => {
                previous = Some(record.position);
                records.push(record);
                offset += length;
            }
            Err(reason) => {
                // A valid record written after these bytes were fsynced proves they were on
                // disk: damaged since, not torn.
                let durable_later = bytes[offset..].iter().any(|&byte| byte != 0)
                    && (offset + 1..bytes.len()).any(|later| {
                        parse_record(&bytes[later..], salt, previous, segment.first)
                            .is_ok_and(|(_, _, synced)| synced > offset as u64)
                    });
                if !last || durable_later {
                    let reason = if durable_later {
                        format!(
                            "{reason}, and valid records follow that were written after it was on disk"
                        )
                    } else {
                        format!("{reason}, in a segment that later segments follow")
                    };
                    return Err(corrupt(offset as u64, reason));
                }
                return Ok(SegmentContents {
                    header: Some(header),
                    records,
                    valid_bytes: offset as u64,
                    torn_bytes: (bytes.len() - offset) as u64,
                    torn_reason: Some(reason),
                });
            }
        }
    }
    Ok(SegmentContents {
        header: Some(header),
        records,
        valid_bytes: bytes.len() as u64,
        torn_bytes: 0,
        torn_reason: None,
    })
}

/// Parses the record at the start of `bytes`; returns it, its length in bytes and its
/// `synced` field.
fn parse_record(
    bytes: &[u8],
    salt: u64,
    previous: Option<Position>,
    segment_first: Position,
) -> Result<(Record, usize, u64), String> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(format!(
            "a record header is cut short ({} of {RECORD_HEADER_BYTES} bytes)",
            bytes.len()
        ));
    }
    let length_field: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
    let length = u32::from_le_bytes(length_field) as usize;
    let stored = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let position_field: [u8; 8] = bytes[8..16].try_into().expect("8 bytes");
    let position = u64::from_le_bytes(position_field);
    let synced_field: [u8; 8] = bytes[16..24].try_into().expect("8 bytes");
    if length > MAX_RECORD_BYTES {
        return Err(format!(
            "a record claims {length} bytes, more than the largest ({MAX_RECORD_BYTES})"
        ));
    }
    let Some(payload) = bytes.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + length) else {
        return Err(format!(
            "a record of {length} bytes is cut short ({} bytes left)",
            bytes.len() - RECORD_HEADER_BYTES
        ));
    };
    if checksum(salt, &length_field, &position_field, &synced_field, payload) != stored {
        return Err("a record fails its checksum".into());
    }
    if previous.is_some_and(|previous| position <= previous) || position < segment_first {
        return Err(format!(
            "a record's position {position} does not follow {}",
            previous.map_or(segment_first.to_string(), |previous| previous.to_string())
        ));
    }
    Ok((
        Record {
            position,
            payload: payload.to_vec(),
        },
        RECORD_HEADER_BYTES + length,
        u64::from_le_bytes(synced_field),
    ))
}

/// Where appending goes on after recovery.
#[derive(Clone, Debug, Default)]
pub struct Tail {
    /// The last segment, its valid length and its salt; `None` starts a new segment.
    pub segment: Option<(PathBuf, u64, u64)>,
    /// The position of the last record in the log, if any (the next segment's header
    /// names it).
    pub last: Option<Position>,
}

/// The replies waiting for the log, each woken once, when its position is durable (a
/// broadcast to all of them at every fsync would wake most for nothing).
#[derive(Default)]
struct Waiters {
    /// Every position below this is durable (or was never logged).
    durable: Position,
    /// The log failed: nothing more becomes durable.
    failed: bool,
    /// By the end they wait for: woken once `durable` reaches it.
    waiting: BTreeMap<Position, Vec<oneshot::Sender<()>>>,
}

/// The command log could not make a transaction durable.
#[derive(Clone, Debug, thiserror::Error)]
#[error("the command log failed: {0}")]
pub struct LogFailed(pub String);

/// The command log of a running server. See the module documentation.
pub struct CommandLog {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    waiters: Mutex<Waiters>,
    /// `waiters.durable`, readable without the lock (it only grows).
    durable: AtomicU64,
    durability: Durability,
    dir: PathBuf,
    segment_bytes: u64,
    /// Bytes appended and not yet written.
    unwritten: AtomicUsize,
    /// Why it failed (set once; read on every transaction, without a lock).
    failure: std::sync::OnceLock<String>,
}

#[derive(Default)]
struct Pending {
    /// Records appended and not yet taken by the log thread, in position order.
    records: Vec<(Position, Vec<u8>)>,
    /// Every position below this has been appended (or was never to be logged).
    next: Position,
    closing: bool,
}

impl CommandLog {
    /// Opens the log in `dir` for appending after `tail` (what recovery left), with
    /// positions from `next` on, and starts its thread.
    ///
    /// # Errors
    /// If the last segment cannot be opened.
    pub fn open(
        dir: &Path,
        tail: Tail,
        next: Position,
        durability: Durability,
        segment_bytes: u64,
    ) -> io::Result<CommandLog> {
        assert!(
            durability != Durability::None,
            "with --durability none there is no log"
        );
        fs::create_dir_all(dir)?;
        let current = match tail.segment {
            Some((path, length, salt)) => {
                let file = OpenOptions::new().append(true).open(&path)?;
                // Recovery fsynced it.
                Some(Current {
                    file,
                    length,
                    salt,
                    synced: length,
                })
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                next,
                ..Pending::default()
            }),
            wake: Condvar::new(),
            waiters: Mutex::new(Waiters {
                durable: next,
                ..Waiters::default()
            }),
            durable: AtomicU64::new(next),
            durability,
            dir: dir.to_owned(),
            segment_bytes: segment_bytes.max(SEGMENT_HEADER_BYTES as u64 + 1),
            unwritten: AtomicUsize::new(0),
            failure: std::sync::OnceLock::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("transdb-log".into())
                .spawn(move || {
                    let mut writer = Writer {
                        shared: &shared,
                        current,
                        written: next,
                        last: tail.last,
                        buffer: Vec::new(),
                    };
                    if let Err(error) = writer.run() {
                        shared.fail(format!("{error}"));
                    }
                })?
        };
        Ok(CommandLog {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Appends the records of one batch (`(position, command)`, in position order) and
    /// notes that every position below `next` has been handed on. Called by the
    /// sequencer's leader only, batch after batch.
    pub fn append(&self, records: Vec<(Position, Vec<u8>)>, next: Position) {
        let added: usize = records
            .iter()
            .map(|(_, payload)| RECORD_HEADER_BYTES + payload.len())
            .sum();
        // Counted before the log thread can take them (and subtract them).
        self.shared.unwritten.fetch_add(added, Ordering::Relaxed);
        let mut pending = self.shared.pending.lock();
        // Only reads, and everything appended before them is durable: so are they, without
        // a round through the log thread.
        let durable_at_once = records.is_empty()
            && pending.records.is_empty()
            && self.shared.durable.load(Ordering::Acquire) >= pending.next;
        if pending.records.is_empty() {
            pending.records = records;
        } else {
            pending.records.extend(records);
        }
        pending.next = next;
        drop(pending);
        if durable_at_once {
            self.shared.publish(next);
        } else {
            self.shared.wake.notify_one();
        }
    }

    /// Whether new transactions may be ordered: the log has not failed, and is not too far
    /// behind.
    ///
    /// # Errors
    /// [`Refusal`] saying which.
    pub fn admit(&self) -> Result<(), Refusal> {
        if let Some(failure) = self.failure() {
            return Err(Refusal::Failed(failure));
        }
        let unwritten = self.shared.unwritten.load(Ordering::Relaxed);
        if unwritten >= MAX_UNWRITTEN_BYTES {
            return Err(Refusal::Behind { unwritten });
        }
        Ok(())
    }

    /// Why the log failed, if it did.
    pub fn failure(&self) -> Option<LogFailed> {
        self.shared.failure.get().cloned().map(LogFailed)
    }

    /// Waits until every position below `end` is durable — in [`Durability::Async`], only
    /// checks that the log has not failed.
    ///
    /// # Errors
    /// If the log failed before that.
    pub async fn wait_durable(&self, end: Position) -> Result<(), LogFailed> {
        if let Durability::Async { .. } = self.shared.durability {
            return match self.failure() {
                Some(failure) => Err(failure),
                None => Ok(()),
            };
        }
        if self.shared.durable.load(Ordering::Acquire) >= end {
            return Ok(());
        }
        let woken = {
            let mut waiters = self.shared.waiters.lock();
            if waiters.durable >= end {
                return Ok(());
            }
            if waiters.failed {
                return Err(self.stopped());
            }
            let (wake, woken) = oneshot::channel();
            waiters.waiting.entry(end).or_default().push(wake);
            woken
        };
        // Dropped unsent when the log fails.
        woken.await.map_err(|_| self.stopped())
    }

    fn stopped(&self) -> LogFailed {
        self.failure()
            .unwrap_or_else(|| LogFailed("the log stopped".into()))
    }

    /// Every position below this is durable.
    pub fn durable(&self) -> Position {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// Writes and fsyncs everything appended, then stops the log thread. Idempotent.
    pub fn close(&self) {
        self.shared.pending.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for CommandLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// Why the log refuses new transactions.
#[derive(Clone, Debug)]
pub enum Refusal {
    /// It failed.
    Failed(LogFailed),
    /// This many bytes wait to be written.
    Behind {
        /// The bytes.
        unwritten: usize,
    },
    /// The transaction's command is longer than [`MAX_RECORD_BYTES`].
    TooLarge {
        /// Its length.
        bytes: usize,
    },
}

impl Shared {
    fn fail(&self, reason: String) {
        tracing::error!(%reason, "the command log failed: refusing every transaction from now on; restart the server to recover what is durable");
        // The first failure is the reason; the thread stops at it.
        let _ = self.failure.set(reason);
        let mut waiters = self.waiters.lock();
        waiters.failed = true;
        // Dropping the senders wakes every waiter with the failure.
        let waiting = std::mem::take(&mut waiters.waiting);
        drop(waiters);
        drop(waiting);
    }

    /// Every position below `durable` is durable: wakes the replies waiting for that.
    fn publish(&self, durable: Position) {
        let mut waiters = self.waiters.lock();
        if durable <= waiters.durable {
            return;
        }
        waiters.durable = durable;
        self.durable.store(durable, Ordering::Release);
        let later = waiters.waiting.split_off(&(durable + 1));
        let ready = std::mem::replace(&mut waiters.waiting, later);
        drop(waiters);
        for wake in ready.into_values().flatten() {
            let _ = wake.send(());
        }
    }
}

/// The log thread's state.
struct Writer<'a> {
    shared: &'a Shared,
    /// The segment being appended to.
    current: Option<Current>,
    /// Every position below this has been written (if it was logged).
    written: Position,
    /// The position of the last record written.
    last: Option<Position>,
    /// Encoded records not yet written to the current segment.
    buffer: Vec<u8>,
}

/// The segment being appended to.
struct Current {
    file: File,
    /// Its length, with what is in the writer's buffer.
    length: u64,
    salt: u64,
    /// Every byte below this offset is fsynced.
    synced: u64,
}

impl Writer<'_> {
    fn run(&mut self) -> io::Result<()> {
        let interval = match self.shared.durability {
            Durability::Async { interval } => Some(interval),
            _ => None,
        };
        let mut dirty = false;
        let mut last_sync = Instant::now();
        loop {
            let (records, next, closing) = {
                let mut pending = self.shared.pending.lock();
                loop {
                    if !pending.records.is_empty() || pending.next > self.written || pending.closing
                    {
                        break;
                    }
                    match interval {
                        Some(interval) if dirty => {
                            let left = interval.saturating_sub(last_sync.elapsed());
                            if left.is_zero()
                                || self.shared.wake.wait_for(&mut pending, left).timed_out()
                            {
                                break;
                            }
                        }
                        _ => self.shared.wake.wait(&mut pending),
                    }
                }
                (
                    std::mem::take(&mut pending.records),
                    pending.next,
                    pending.closing,
                )
            };
            if !records.is_empty() {
                let bytes = self.write(&records)?;
                self.shared.unwritten.fetch_sub(bytes, Ordering::Relaxed);
                dirty = true;
            }
            self.written = next;
            let sync_now = match interval {
                None => dirty,
                Some(interval) => dirty && (closing || last_sync.elapsed() >= interval),
            };
            if sync_now {
                self.sync()?;
                dirty = false;
                last_sync = Instant::now();
            }
            if !dirty {
                self.shared.publish(next);
            }
            if closing && self.shared.pending.lock().records.is_empty() {
                return Ok(());
            }
        }
    }

    /// Encodes and writes `records`, starting new segments as they fill up; returns the
    /// bytes they took.
    fn write(&mut self, records: &[(Position, Vec<u8>)]) -> io::Result<usize> {
        let mut bytes = 0;
        for (position, payload) in records {
            let full = self
                .current
                .as_ref()
                .is_none_or(|current| current.length >= self.shared.segment_bytes);
            if full {
                self.flush()?;
                if self.current.is_some() {
                    self.sync()?;
                }
                self.current = Some(self.create_segment(*position)?);
            }
            let current = self.current.as_mut().expect("a segment is open");
            let before = self.buffer.len();
            encode_record(
                current.salt,
                current.synced,
                *position,
                payload,
                &mut self.buffer,
            );
            current.length += (self.buffer.len() - before) as u64;
            bytes += self.buffer.len() - before;
            self.last = Some(*position);
        }
        self.flush()?;
        Ok(bytes)
    }

    /// Writes the buffer to the current segment.
    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let current = self.current.as_mut().expect("records went to a segment");
        fail::fail_point!("log-write", |_| Err(io::Error::other(
            "injected fault at log-write"
        )));
        current.file.write_all(&self.buffer)?;
        self.buffer.clear();
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        fail::fail_point!("log-fsync", |_| Err(io::Error::other(
            "injected fault at log-fsync"
        )));
        if let Some(current) = &mut self.current {
            current.file.sync_data()?;
            // `sync` runs after `flush`: the buffer is empty.
            current.synced = current.length;
        }
        Ok(())
    }

    /// Creates the segment starting at `first`: header written, file and directory fsynced.
    fn create_segment(&self, first: Position) -> io::Result<Current> {
        fail::fail_point!("log-create-segment", |_| Err(io::Error::other(
            "injected fault at log-create-segment"
        )));
        let path = self.shared.dir.join(segment_name(first));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let header = SegmentHeader {
            first,
            previous: self.last,
            salt: new_salt(),
        };
        file.write_all(&header.encode())?;
        file.sync_all()?;
        sync_dir(&self.shared.dir)?;
        tracing::debug!(path = %path.display(), "new log segment");
        Ok(Current {
            file,
            length: SEGMENT_HEADER_BYTES as u64,
            salt: header.salt,
            synced: SEGMENT_HEADER_BYTES as u64,
        })
    }
}

/// Fsyncs a directory, so that the names created or renamed in it are durable.
///
/// # Errors
/// If the directory cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fail::fail_point!("sync-dir", |_| Err(io::Error::other(
        "injected fault at sync-dir"
    )));
    File::open(dir)?.sync_all()
}

/// Removes (or, with `archive`, moves there) every segment in `dir` whose records are all
/// below `position`: every segment but the last whose successor starts at or below it.
/// Returns how many.
///
/// # Errors
/// If a segment cannot be removed or moved.
pub fn truncate_before(
    dir: &Path,
    position: Position,
    archive: Option<&Path>,
) -> io::Result<usize> {
    let segments = segments(dir)?;
    let mut removed = 0;
    for pair in segments.windows(2) {
        if pair[1].first > position {
            break;
        }
        match archive {
            Some(archive) => {
                fs::create_dir_all(archive)?;
                let target = archive.join(pair[0].path.file_name().expect("a segment file"));
                if fs::rename(&pair[0].path, &target).is_err() {
                    // Another file system: copy, sync, then remove.
                    fs::copy(&pair[0].path, &target)?;
                    File::open(&target)?.sync_all()?;
                    fs::remove_file(&pair[0].path)?;
                }
                sync_dir(archive)?;
            }
            None => fs::remove_file(&pair[0].path)?,
        }
        removed += 1;
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Bytes of all segments in `dir`.
pub fn size(dir: &Path) -> u64 {
    segments(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|segment| fs::metadata(&segment.path).ok())
        .map(|metadata| metadata.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: u64 = 0x5a17;

    fn segment_bytes(first: Position, records: &[(Position, &[u8])]) -> Vec<u8> {
        let header = SegmentHeader {
            first,
            previous: None,
            salt: SALT,
        };
        // As the log thread writes with an fsync after each record.
        let mut bytes = header.encode().to_vec();
        for (position, payload) in records {
            let synced = bytes.len() as u64;
            encode_record(SALT, synced, *position, payload, &mut bytes);
        }
        bytes
    }

    fn segment(first: Position) -> Segment {
        Segment {
            path: PathBuf::from(segment_name(first)),
            first,
        }
    }

    #[test]
    fn records_read_back_in_order() {
        let bytes = segment_bytes(5, &[(5, b"a"), (7, b""), (9, b"ccc")]);
        let contents = read_segment(&segment(5), &bytes, None, true).unwrap();
        let positions: Vec<_> = contents.records.iter().map(|r| r.position).collect();
        assert_eq!(positions, [5, 7, 9]);
        assert_eq!(contents.records[2].payload, b"ccc");
        assert_eq!(contents.valid_bytes, bytes.len() as u64);
        assert_eq!(contents.torn_bytes, 0);
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_byte() {
        let full = segment_bytes(0, &[(0, b"first"), (1, b"second"), (2, b"third")]);
        let two = segment_bytes(0, &[(0, b"first"), (1, b"second")]).len();
        for cut in two..full.len() {
            let contents = read_segment(&segment(0), &full[..cut], None, true).unwrap();
            assert_eq!(contents.records.len(), 2, "cut at {cut}");
            assert_eq!(contents.valid_bytes, two as u64);
            assert_eq!(contents.torn_bytes, (cut - two) as u64);
        }
    }

    #[test]
    fn damage_before_valid_records_is_an_error() {
        let mut bytes = segment_bytes(0, &[(0, b"first"), (1, b"second"), (2, b"third")]);
        bytes[SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES] ^= 1; // the first payload
        let error = read_segment(&segment(0), &bytes, None, true).unwrap_err();
        assert_eq!(error.offset, SEGMENT_HEADER_BYTES as u64);
        assert!(
            error.to_string().contains("valid records follow"),
            "{error}"
        );
    }

    #[test]
    fn damage_in_what_was_never_fsynced_is_a_torn_tail() {
        // Three records written in one round, before any fsync: a crash may leave the later
        // pages written and an earlier one not.
        let header = SegmentHeader {
            first: 0,
            previous: None,
            salt: SALT,
        };
        let mut bytes = header.encode().to_vec();
        let synced = bytes.len() as u64;
        encode_record(SALT, synced, 0, b"first", &mut bytes);
        let second = bytes.len();
        encode_record(SALT, synced, 1, b"second", &mut bytes);
        encode_record(SALT, synced, 2, b"third", &mut bytes);
        for byte in &mut bytes[second..second + RECORD_HEADER_BYTES] {
            *byte = 0; // a page that never reached the disk
        }
        let contents = read_segment(&segment(0), &bytes, None, true).unwrap();
        assert_eq!(contents.records.len(), 1);
        assert_eq!(contents.valid_bytes, second as u64);
        assert!(read_segment(&segment(0), &bytes, None, false).is_err());
    }

    #[test]
    fn a_record_copied_into_a_value_does_not_read_as_one_of_this_segment() {
        // A client value holding a record of another segment (another salt).
        let mut forged = Vec::new();
        encode_record(SALT + 1, 0, 9, b"forged", &mut forged);
        let full = segment_bytes(0, &[(0, b"first"), (1, &forged)]);
        let one = segment_bytes(0, &[(0, b"first")]).len();
        for cut in one + 1..full.len() {
            let contents = read_segment(&segment(0), &full[..cut], None, true).unwrap();
            assert_eq!(contents.records.len(), 1, "cut at {cut}");
        }
    }

    #[test]
    fn a_segment_must_follow_the_last_record_before_it() {
        let mut bytes = SegmentHeader {
            first: 5,
            previous: Some(3),
            salt: SALT,
        }
        .encode()
        .to_vec();
        encode_record(SALT, SEGMENT_HEADER_BYTES as u64, 5, b"x", &mut bytes);
        assert!(read_segment(&segment(5), &bytes, Some(3), true).is_ok());
        let error = read_segment(&segment(5), &bytes, Some(2), true).unwrap_err();
        assert!(error.to_string().contains("missing"), "{error}");
    }

    /// Reads take positions but no records: when everything before them is durable, they
    /// are durable at once, without waiting for a round of the log thread.
    #[test]
    fn positions_without_records_after_durable_ones_are_durable_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = CommandLog::open(
            dir.path(),
            Tail::default(),
            0,
            Durability::Sync,
            DEFAULT_SEGMENT_BYTES,
        )
        .unwrap();
        log.append(Vec::new(), 5);
        assert_eq!(log.durable(), 5, "reads only: durable when appended");
        log.append(vec![(5, b"put".to_vec())], 6);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(log.wait_durable(6)).unwrap();
        log.append(Vec::new(), 9);
        assert_eq!(log.durable(), 9, "the record before them is durable");
        log.close();
    }

    #[test]
    fn positions_must_advance() {
        let bytes = segment_bytes(0, &[(3, b"a"), (3, b"b")]);
        let contents = read_segment(&segment(0), &bytes, None, true).unwrap();
        assert_eq!(contents.records.len(), 1);
        assert!(contents.torn_reason.unwrap().contains("does not follow"));
        assert!(read_segment(&segment(0), &bytes, None, false).is_err());
    }
}
