//! Torn and corrupt command logs: recovery never panics and never applies a damaged record.
//!
//! Each test writes a real command log in-process (an [`Executor`] with a data directory,
//! its log attached by [`durability::recover`], non-wasm commands only: `Put`, `Delete`,
//! `Batch` and interactive commits), notes the state after every record, and then damages
//! copies of the data directory — cut at every byte offset, bits flipped at every byte,
//! segment headers torn, records with a valid checksum and a payload that is no command —
//! and recovers each copy in a fresh executor.
//!
//! What a damaged log must do (see `transdb_host::log`): damage in the last segment with no
//! valid record after it is a torn tail (a crash during a write) and is cut, recovering
//! exactly the whole records before it; any other damage stops recovery with an error that
//! names the file and says what to do, and changes nothing on disk.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tempfile::TempDir;
use transdb_host::durability::{self, Persistence, Recovery};
use transdb_host::executor::{Executor, LogCommand, Session};
use transdb_host::log::{
    self, Durability, LOG_DIR, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, Segment, encode_record,
    read_segment,
};
use transdb_host::procedures::Procedures;
use transdb_host::runtime::{Runtime, RuntimeLimits};
use transdb_host::store::Store;
use transdb_proto::message::BatchOp;
use transdb_proto::{Request, Response, frame};

/// Segments so large that every log here is one segment.
const ONE_SEGMENT: u64 = log::DEFAULT_SEGMENT_BYTES;
/// Segments so small that a log of a dozen records spans several.
const SMALL_SEGMENTS: u64 = 200;

type Hash = [u8; 32];

/// A fresh executor (empty store, new scheduler, no modules) keeping its data in
/// `data_dir`.
fn executor(data_dir: &Path) -> Executor {
    // Nothing here deploys a module, so every executor can share one empty set of
    // procedures: a wasm engine per executor would cost more than the recovery under test.
    static PROCEDURES: OnceLock<Arc<Procedures>> = OnceLock::new();
    let procedures = PROCEDURES.get_or_init(|| {
        let runtime = Runtime::new(RuntimeLimits::default()).expect("wasm runtime");
        Arc::new(Procedures::new(runtime, 10))
    });
    assert!(
        procedures.list().is_empty(),
        "no module is ever deployed here"
    );
    Executor::new(Arc::new(Store::new(2)), procedures.clone(), 1000)
        .with_persistence(Persistence::new(data_dir, None))
}

/// Recovers `data_dir` into a fresh executor on a task of its own, so that a panic is
/// reported as a failure of `case` rather than lost. Returns the executor (its log
/// attached if recovery succeeded) and recovery's outcome, an error as its full text.
async fn recover(
    data_dir: &Path,
    segment_bytes: u64,
    case: &str,
) -> (Executor, Result<Recovery, String>) {
    let data_dir = data_dir.to_owned();
    let task = tokio::spawn(async move {
        let executor = executor(&data_dir);
        let recovery = durability::recover(&executor, Durability::Sync, segment_bytes)
            .await
            .map_err(|error| format!("{error:#}"));
        (executor, recovery)
    });
    match task.await {
        Ok(outcome) => outcome,
        Err(error) => panic!("recovery panicked ({case}): {error}"),
    }
}

/// Flushes and stops the executor's log, so that its files can be read and copied.
fn close(executor: Executor) {
    if let Some(log) = executor.scheduler.log() {
        log.close();
    }
}

fn decode(out: &[u8]) -> Response<'static> {
    let (payload, consumed) = frame::split(out).unwrap().expect("a whole response frame");
    assert_eq!(consumed, out.len(), "exactly one response frame");
    frame::decode::<Response<'_>>(payload).unwrap().into_owned()
}

/// Runs `request` on a stream of its own and returns the (durable) response.
async fn run(executor: &Executor, request: Request<'static>) -> Response<'static> {
    let mut out = Vec::new();
    executor.execute(request, &mut out).await;
    decode(&out)
}

/// One step of a workload: exactly one logged record.
#[derive(Clone)]
enum Step {
    /// A `Put`, `Delete` or `Batch`.
    Request(Request<'static>),
    /// An interactive transaction that writes: `Begin`, these requests, `Commit`.
    Interactive(Vec<Request<'static>>),
}

fn put(key: &str, value: &str) -> Request<'static> {
    Request::Put {
        key: key.to_owned().into(),
        value: value.as_bytes().to_vec().into(),
    }
}

fn delete(key: &str) -> Request<'static> {
    Request::Delete {
        key: key.to_owned().into(),
    }
}

fn get(key: &str) -> Request<'static> {
    Request::Get {
        key: key.to_owned().into(),
    }
}

fn batch(puts: &[(&str, &str)], deletes: &[&str]) -> Request<'static> {
    let mut ops: Vec<BatchOp<'static>> = puts
        .iter()
        .map(|(key, value)| BatchOp::Put {
            key: (*key).to_owned().into(),
            value: value.as_bytes().to_vec().into(),
        })
        .collect();
    ops.extend(deletes.iter().map(|key| BatchOp::Delete {
        key: (*key).to_owned().into(),
    }));
    Request::Batch { ops }
}

/// Ten steps, each changing the state, every kind of non-wasm record among them; the last
/// three are an interactive commit, a batch and a put.
fn workload(tag: &str) -> Vec<Step> {
    let key = |name: &str| format!("{tag}{name}");
    vec![
        Step::Request(put(&key("a"), "one")),
        Step::Request(put(&key("b"), "two")),
        Step::Request(batch(
            &[(&key("c"), "three"), (&key("d"), "four")],
            &[&key("a")],
        )),
        Step::Interactive(vec![
            get(&key("b")),
            put(&key("e"), "five, written in a transaction"),
            delete(&key("c")),
        ]),
        Step::Request(delete(&key("b"))),
        Step::Request(put(&key("a"), "one again, with a longer value")),
        Step::Request(batch(&[(&key("f"), "six")], &[&key("d")])),
        Step::Interactive(vec![get(&key("a")), put(&key("a"), "seven")]),
        Step::Request(batch(
            &[(&key("g"), "eight"), (&key("h"), "nine")],
            &[&key("e")],
        )),
        Step::Request(put(&key("i"), "ten")),
    ]
}

/// Runs `step` and checks that it did what it should (so it was logged).
async fn apply(executor: &Executor, step: &Step) {
    match step {
        Step::Request(request) => {
            let response = run(executor, request.clone()).await;
            assert!(
                matches!(
                    response,
                    Response::Stored | Response::Deleted { .. } | Response::Batched { .. }
                ),
                "{request:?} answered {response:?}"
            );
        }
        Step::Interactive(requests) => {
            let mut session = Session::default();
            let mut step = async |request: Request<'static>| {
                let mut out = Vec::new();
                executor.execute_in(&mut session, request, &mut out).await;
                decode(&out)
            };
            assert!(matches!(step(Request::Begin).await, Response::Begun { .. }));
            for request in requests {
                let response = step(request.clone()).await;
                assert!(
                    !matches!(response, Response::Error(_)),
                    "{request:?} answered {response:?}"
                );
            }
            let committed = step(Request::Commit).await;
            assert!(
                matches!(committed, Response::Committed { .. }),
                "{committed:?}"
            );
        }
    }
}

/// Where one record lies in its segment file.
#[derive(Clone, Copy, Debug)]
struct Span {
    /// Its first byte.
    start: usize,
    /// One past its last byte.
    end: usize,
    /// Its position in the order.
    position: u64,
}

/// One segment file of a written log.
#[derive(Clone, Debug)]
struct SegmentFile {
    name: String,
    bytes: Vec<u8>,
    records: Vec<Span>,
}

/// A log written by a workload, and the state after each prefix of it.
struct Written {
    segments: Vec<SegmentFile>,
    /// `hashes[k]`: the state hash after the first `k` records of the log (`hashes[0]`: empty).
    hashes: Vec<Hash>,
}

impl Written {
    /// Records in segments before `segment`.
    fn records_before(&self, segment: usize) -> usize {
        self.segments[..segment]
            .iter()
            .map(|segment| segment.records.len())
            .sum()
    }

    /// The log's files, with segment `index`'s bytes replaced by `bytes` (`None`: removed).
    fn with(&self, index: usize, bytes: Option<Vec<u8>>) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = self
            .segments
            .iter()
            .map(|segment| (segment.name.clone(), segment.bytes.clone()))
            .collect();
        match bytes {
            Some(bytes) => files[index].1 = bytes,
            None => {
                files.remove(index);
            }
        }
        files
    }
}

/// Writes a log with `steps`, starting segments at `segment_bytes`, and reads it back.
async fn write_log(steps: &[Step], segment_bytes: u64) -> Written {
    let dir = tempfile::tempdir().unwrap();
    let (executor, recovery) = recover(dir.path(), segment_bytes, "an empty data directory").await;
    let recovery = recovery.expect("an empty data directory recovers");
    assert_eq!((recovery.replayed, recovery.next), (0, 0));
    let mut hashes = vec![executor.store.state_hash()];
    for step in steps {
        apply(&executor, step).await;
        hashes.push(executor.store.state_hash());
    }
    close(executor);
    // The data directory holds the log and nothing else: a copy of the log is a copy of it.
    let entries: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(entries, [LOG_DIR], "the data directory holds only the log");

    let mut segments = Vec::new();
    let mut after = None;
    let all = log::segments(&dir.path().join(LOG_DIR)).unwrap();
    for (index, segment) in all.iter().enumerate() {
        let bytes = fs::read(&segment.path).unwrap();
        let contents = read_segment(segment, &bytes, after, index + 1 == all.len())
            .expect("the log as written reads back");
        assert_eq!(contents.torn_bytes, 0, "the log as written is whole");
        let mut offset = SEGMENT_HEADER_BYTES;
        let mut records = Vec::new();
        for record in &contents.records {
            let end = offset + RECORD_HEADER_BYTES + record.payload.len();
            records.push(Span {
                start: offset,
                end,
                position: record.position,
            });
            offset = end;
            after = Some(record.position);
        }
        assert_eq!(offset, bytes.len(), "records fill the segment");
        segments.push(SegmentFile {
            name: log::segment_name(segment.first),
            bytes,
            records,
        });
    }
    let written = Written { segments, hashes };
    assert_eq!(
        written.records_before(written.segments.len()),
        steps.len(),
        "every step is one record"
    );
    // Positions are given out one by one from 0: record k is at position k.
    let positions: Vec<u64> = written
        .segments
        .iter()
        .flat_map(|segment| segment.records.iter().map(|span| span.position))
        .collect();
    assert_eq!(positions, (0..steps.len() as u64).collect::<Vec<_>>());
    // Every step changes the state, so each prefix is told apart from the others.
    let mut distinct = written.hashes.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), written.hashes.len(), "every prefix differs");
    written
}

/// A new data directory whose log holds `files` (name, bytes).
fn data_dir(files: &[(String, Vec<u8>)]) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join(LOG_DIR);
    fs::create_dir(&log_dir).unwrap();
    for (name, bytes) in files {
        fs::write(log_dir.join(name), bytes).unwrap();
    }
    dir
}

fn segment_path(dir: &TempDir, name: &str) -> PathBuf {
    dir.path().join(LOG_DIR).join(name)
}

/// The log files in `dir`, as `data_dir` takes them.
fn files_in(dir: &TempDir) -> Vec<(String, Vec<u8>)> {
    log::segments(&dir.path().join(LOG_DIR))
        .unwrap()
        .into_iter()
        .map(|Segment { path, .. }| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read(&path).unwrap())
        })
        .collect()
}

/// Checks that a recovery that found damage in the middle of the log failed as it should:
/// an error naming the segment file and the offset of the bad record (`segment`, `offset`)
/// and saying what to do; nothing on disk changed; no record from `damaged` (a global
/// index) on was applied; and no log was attached.
fn assert_damaged_in_the_middle(
    case: &str,
    dir: &TempDir,
    files: &[(String, Vec<u8>)],
    outcome: (Executor, Result<Recovery, String>),
    (segment, offset): (&str, usize),
    written: &Written,
    damaged: usize,
) {
    let (executor, result) = outcome;
    let error = match result {
        Ok(recovery) => panic!("{case}: recovered ({recovery:?}) from a log damaged in the middle"),
        Err(error) => error,
    };
    for part in [
        "the command log is damaged in the middle",
        &*segment_path(dir, segment).display().to_string(),
        &format!(" at byte {offset}: "),
        "Nothing after it was applied",
        "transdb restore",
        "move this segment and every later one out of",
    ] {
        assert!(error.contains(part), "{case}: {part:?} is not in: {error}");
    }
    assert_eq!(
        &files_in(dir),
        files,
        "{case}: a failed recovery changed the log"
    );
    assert!(
        written.hashes[..=damaged].contains(&executor.store.state_hash()),
        "{case}: the state is not a prefix before the damaged record {damaged}"
    );
    assert!(
        executor.scheduler.log().is_none(),
        "{case}: a log was attached"
    );
}

/// Checks a recovery that should have cut a torn tail: it succeeded, replayed exactly the
/// first `whole` records (global count) and reached their state, reported `torn` bytes, and
/// left the segment `name` at `valid` bytes — the first `valid` bytes of `original`, or no
/// file when no whole record is left in it (`valid` at most the header). Returns the executor, log attached.
fn assert_recovered_prefix(
    case: &str,
    dir: &TempDir,
    outcome: (Executor, Result<Recovery, String>),
    written: &Written,
    whole: usize,
    (name, original, valid, torn): (&str, &[u8], usize, usize),
) -> Executor {
    let (executor, result) = outcome;
    let recovery = result.unwrap_or_else(|error| panic!("{case}: recovery failed: {error}"));
    assert_eq!(
        executor.store.state_hash(),
        written.hashes[whole],
        "{case}: the state is not the state after the {whole} whole records"
    );
    assert_eq!(recovery.replayed, whole as u64, "{case}: records replayed");
    assert_eq!(
        recovery.torn_bytes, torn as u64,
        "{case}: torn bytes reported"
    );
    assert_eq!(recovery.next, whole as u64, "{case}: next position");
    assert_eq!(recovery.checkpoint, None, "{case}");
    let path = segment_path(dir, name);
    if valid <= SEGMENT_HEADER_BYTES {
        assert!(
            !path.exists(),
            "{case}: the torn segment {name} is still there"
        );
    } else {
        let left = fs::read(&path).unwrap();
        assert_eq!(
            left.len(),
            valid,
            "{case}: the segment is not cut back to {valid}"
        );
        assert_eq!(left, original[..valid], "{case}: the valid bytes changed");
    }
    assert!(
        executor.scheduler.log().is_some(),
        "{case}: no log attached"
    );
    executor
}

/// After a recovery that cut a torn tail (`executor`, `whole` records recovered): a new
/// write is acknowledged, appends to the log, and survives another recovery, which finds
/// nothing torn.
async fn assert_appends_after(
    case: &str,
    dir: &TempDir,
    executor: Executor,
    whole: usize,
    segment_bytes: u64,
) {
    let before = log::size(&dir.path().join(LOG_DIR));
    let response = run(&executor, put("written after recovery", case)).await;
    assert_eq!(response, Response::Stored, "{case}: the new write");
    let expected = executor.store.state_hash();
    close(executor);
    assert!(
        log::size(&dir.path().join(LOG_DIR)) > before,
        "{case}: the new write was not appended"
    );
    let (again, result) = recover(dir.path(), segment_bytes, case).await;
    let recovery = result.unwrap_or_else(|error| panic!("{case}: second recovery: {error}"));
    assert_eq!(
        recovery.torn_bytes, 0,
        "{case}: second recovery found a torn tail"
    );
    assert_eq!(
        recovery.replayed,
        whole as u64 + 1,
        "{case}: second recovery"
    );
    assert_eq!(
        again.store.state_hash(),
        expected,
        "{case}: the write after recovery was lost"
    );
    close(again);
}

/// A torn tail at any byte: for every offset from the start of the third-to-last record to
/// the end of the file, a copy of the log cut there recovers without error to exactly the
/// state of the whole records before the cut (never a partial record); `torn_bytes` reports
/// the bytes after the last whole record, and the file is cut back to it; then a new write
/// is appended and survives another recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_cut_at_any_byte_recovers_its_whole_records() {
    let written = write_log(&workload(""), ONE_SEGMENT).await;
    assert_eq!(written.segments.len(), 1, "one segment");
    let segment = &written.segments[0];
    let records = &segment.records;
    let first_cut = records[records.len() - 3].start;
    for cut in first_cut..=segment.bytes.len() {
        let case = format!("cut at byte {cut} of {}", segment.bytes.len());
        let whole = records.iter().filter(|span| span.end <= cut).count();
        let valid = records[whole - 1].end;
        let dir = data_dir(&written.with(0, Some(segment.bytes[..cut].to_vec())));
        let outcome = recover(dir.path(), ONE_SEGMENT, &case).await;
        let executor = assert_recovered_prefix(
            &case,
            &dir,
            outcome,
            &written,
            whole,
            (&segment.name, &segment.bytes, valid, cut - valid),
        );
        assert_appends_after(&case, &dir, executor, whole, ONE_SEGMENT).await;
    }
}

/// A torn tail is recognised whatever the clients wrote: the last record is a `Put` whose
/// value holds the bytes of a whole valid record (at a later position, its command valid).
/// Cut at any byte of that last record, or with a bit flipped anywhere in its header, the
/// log must still recover the records before it — the record-like bytes inside the value
/// are data, not "valid records that follow" the damage — and never apply them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_like_values_do_not_turn_a_torn_tail_into_an_error() {
    let mut inner = Vec::new();
    let command = LogCommand::Request(put("planted", "by a client")).encode();
    // The client cannot know the segment's salt: any other one.
    encode_record(0, 0, 1_000, &command, &mut inner);
    let mut steps = workload("");
    steps.push(Step::Request(Request::Put {
        key: "record-like".into(),
        value: [b"before ".as_slice(), &inner, b" after"].concat().into(),
    }));
    let written = write_log(&steps, ONE_SEGMENT).await;
    let segment = &written.segments[0];
    let last = segment.records.len() - 1;
    let span = segment.records[last];
    let mut cases = Vec::new();
    for cut in span.start..span.end {
        cases.push((
            format!("cut at byte {cut} (the last record is {span:?})"),
            segment.bytes[..cut].to_vec(),
        ));
    }
    for byte in span.start..span.start + RECORD_HEADER_BYTES {
        let mut bytes = segment.bytes.clone();
        bytes[byte] ^= 0x01;
        cases.push((
            format!("bit flipped at byte {byte} (the last record is {span:?})"),
            bytes,
        ));
    }
    for (case, bytes) in cases {
        let torn = bytes.len() - span.start;
        let dir = data_dir(&written.with(0, Some(bytes)));
        let outcome = recover(dir.path(), ONE_SEGMENT, &case).await;
        let executor = assert_recovered_prefix(
            &case,
            &dir,
            outcome,
            &written,
            last,
            (&segment.name, &segment.bytes, span.start, torn),
        );
        close(executor);
    }
}

/// Bit flips (masks 0x01, 0x10, 0x80 and 0xff) at every byte of the log, each in a copy:
/// - in the last record, the damage looks like a torn tail: recovery succeeds with the state
///   before that record (the damaged record is never applied) and cuts it off;
/// - in any earlier record (the second-to-last included: a valid record follows it) or in
///   the segment's header, recovery fails, without a panic, with an error saying the log
///   is damaged in the middle, naming the segment file and the offset, and telling the user
///   what to do; nothing is applied after the damage and nothing on disk changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bits_are_never_applied() {
    let written = write_log(&workload(""), ONE_SEGMENT).await;
    let segment = &written.segments[0];
    let records = &segment.records;
    let last = records.len() - 1;
    for index in 0..segment.bytes.len() {
        let record = records
            .iter()
            .position(|span| span.start <= index && index < span.end);
        for mask in [0x01u8, 0x10, 0x80, 0xff] {
            let case = format!("bits {mask:#04x} flipped at byte {index} (record {record:?})");
            let mut bytes = segment.bytes.clone();
            bytes[index] ^= mask;
            let files = written.with(0, Some(bytes));
            let dir = data_dir(&files);
            let outcome = recover(dir.path(), ONE_SEGMENT, &case).await;
            match record {
                Some(record) if record == last => {
                    let start = records[last].start;
                    let torn = segment.bytes.len() - start;
                    let executor = assert_recovered_prefix(
                        &case,
                        &dir,
                        outcome,
                        &written,
                        last,
                        (&segment.name, &segment.bytes, start, torn),
                    );
                    if index == records[last].start {
                        // Once per record's worth: what follows the cut is a usable log.
                        assert_appends_after(&case, &dir, executor, last, ONE_SEGMENT).await;
                    } else {
                        close(executor);
                    }
                }
                Some(record) => assert_damaged_in_the_middle(
                    &case,
                    &dir,
                    &files,
                    outcome,
                    (&segment.name, records[record].start),
                    &written,
                    record,
                ),
                // The header: the wrong magic, or a header that fails its checksum.
                None => assert_damaged_in_the_middle(
                    &case,
                    &dir,
                    &files,
                    outcome,
                    (&segment.name, 0),
                    &written,
                    0,
                ),
            }
        }
    }
}

/// Several segments (a few hundred bytes each): only the last one may have a torn tail.
/// - Damage in a segment that later segments follow — cut at any byte inside its last record,
///   its header cut short, or a bit flipped anywhere in its last record — is an error that
///   names that segment, and changes nothing.
/// - The last segment with a torn header (1 to 15 of its 16 bytes; an empty file is
///   `an_empty_last_segment_is_dropped`) is removed and recovery succeeds with every record
///   of the earlier segments; new writes then append and survive another recovery.
/// - The last segment cut at any byte after its header recovers its whole records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_last_segment_may_be_torn() {
    let mut steps = workload("first ");
    steps.extend(workload("second "));
    let written = write_log(&steps, SMALL_SEGMENTS).await;
    let count = written.segments.len();
    assert!(count >= 3, "{count} segments: make them smaller");

    for (index, segment) in written.segments[..count - 1].iter().enumerate() {
        let last = segment.records.last().expect("a segment with records");
        let damaged = written.records_before(index) + segment.records.len() - 1;
        let mut cases = Vec::new();
        // Cut inside the record (a cut at its start drops whole records: see
        // `a_non_last_segment_missing_whole_records_is_an_error`).
        for cut in last.start + 1..segment.bytes.len() {
            cases.push((
                format!("segment {index} of {count} cut at byte {cut}"),
                segment.bytes[..cut].to_vec(),
                last.start,
                damaged,
            ));
        }
        for length in 0..SEGMENT_HEADER_BYTES {
            cases.push((
                format!("segment {index} of {count} cut to {length} header bytes"),
                segment.bytes[..length].to_vec(),
                0,
                written.records_before(index),
            ));
        }
        for byte in last.start..last.end {
            let mut bytes = segment.bytes.clone();
            bytes[byte] ^= 0x01;
            cases.push((
                format!("segment {index} of {count}: bit flipped at byte {byte}"),
                bytes,
                last.start,
                damaged,
            ));
        }
        for (case, bytes, offset, damaged) in cases {
            let files = written.with(index, Some(bytes));
            let dir = data_dir(&files);
            let outcome = recover(dir.path(), SMALL_SEGMENTS, &case).await;
            assert_damaged_in_the_middle(
                &case,
                &dir,
                &files,
                outcome,
                (&segment.name, offset),
                &written,
                damaged,
            );
        }
    }

    let last = &written.segments[count - 1];
    let before_last = written.records_before(count - 1);
    // An empty last segment: see `an_empty_last_segment_is_dropped`.
    for length in 1..SEGMENT_HEADER_BYTES {
        let case = format!("the last segment cut to {length} header bytes");
        let dir = data_dir(&written.with(count - 1, Some(last.bytes[..length].to_vec())));
        let outcome = recover(dir.path(), SMALL_SEGMENTS, &case).await;
        let executor = assert_recovered_prefix(
            &case,
            &dir,
            outcome,
            &written,
            before_last,
            (&last.name, &last.bytes, 0, length),
        );
        assert_appends_after(&case, &dir, executor, before_last, SMALL_SEGMENTS).await;
    }
    for cut in SEGMENT_HEADER_BYTES..=last.bytes.len() {
        let case = format!("the last segment cut at byte {cut}");
        let in_segment = last.records.iter().filter(|span| span.end <= cut).count();
        let valid = last.records[..in_segment]
            .last()
            .map_or(SEGMENT_HEADER_BYTES, |span| span.end);
        let dir = data_dir(&written.with(count - 1, Some(last.bytes[..cut].to_vec())));
        let outcome = recover(dir.path(), SMALL_SEGMENTS, &case).await;
        let whole = before_last + in_segment;
        let executor = assert_recovered_prefix(
            &case,
            &dir,
            outcome,
            &written,
            whole,
            (&last.name, &last.bytes, valid, cut - valid),
        );
        assert_appends_after(&case, &dir, executor, whole, SMALL_SEGMENTS).await;
    }
}

/// An empty last segment (a crash after the file was created, before its header was
/// written) holds no record: recovery succeeds with every record before it, and new writes
/// go where the next recovery reads them back. Both with earlier segments and as the only
/// segment of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_last_segment_is_dropped() {
    let mut steps = workload("first ");
    steps.extend(workload("second "));
    let several = write_log(&steps, SMALL_SEGMENTS).await;
    let count = several.segments.len();
    let cases = [
        (
            "an empty last segment after others",
            several.with(count - 1, Some(Vec::new())),
            several.records_before(count - 1),
        ),
        (
            "an empty first segment",
            vec![(log::segment_name(0), Vec::new())],
            0,
        ),
    ];
    for (case, files, whole) in cases {
        let dir = data_dir(&files);
        let (executor, result) = recover(dir.path(), SMALL_SEGMENTS, case).await;
        let recovery = result.unwrap_or_else(|error| panic!("{case}: {error}"));
        assert_eq!(recovery.replayed, whole as u64, "{case}");
        assert_eq!(
            executor.store.state_hash(),
            several.hashes[whole],
            "{case}: the state is not the state after the {whole} whole records"
        );
        assert_appends_after(case, &dir, executor, whole, SMALL_SEGMENTS).await;
    }
}

/// A segment that later segments follow and that lost whole records at its end (cut exactly
/// at a record boundary), or a whole segment missing between two others, is damage too:
/// those records were fsynced before the next segment was started, so they were
/// acknowledged, and replaying the later segments without them would apply transactions
/// to a state they never saw. Recovery must fail, naming the segment, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_last_segment_missing_whole_records_is_an_error() {
    let mut steps = workload("first ");
    steps.extend(workload("second "));
    let written = write_log(&steps, SMALL_SEGMENTS).await;
    let count = written.segments.len();
    assert!(count >= 3, "{count} segments: make them smaller");
    let mut cases = Vec::new();
    for (index, segment) in written.segments[..count - 1].iter().enumerate() {
        for (kept, span) in segment.records.iter().enumerate().skip(1) {
            let lost = segment.records.len() - kept;
            cases.push((
                format!("segment {index} of {count} without its last {lost} records"),
                written.with(index, Some(segment.bytes[..span.start].to_vec())),
                written.records_before(index) + kept,
            ));
        }
    }
    for index in 1..count - 1 {
        cases.push((
            format!("segment {index} of {count} missing"),
            written.with(index, None),
            written.records_before(index),
        ));
    }
    for (case, files, damaged) in cases {
        let dir = data_dir(&files);
        let (executor, result) = recover(dir.path(), SMALL_SEGMENTS, &case).await;
        if let Ok(recovery) = result {
            panic!(
                "{case}: recovered ({recovery:?}), silently without acknowledged records \
                 (state after {} records expected to be refused)",
                written.records_before(count)
            );
        }
        let error = result.unwrap_err();
        for part in ["damaged", "transdb restore"] {
            assert!(error.contains(part), "{case}: {part:?} is not in: {error}");
        }
        assert_eq!(
            files_in(&dir),
            files,
            "{case}: a failed recovery changed the log"
        );
        assert!(
            written.hashes[..=damaged].contains(&executor.store.state_hash()),
            "{case}: records after the missing ones were applied"
        );
    }
}

/// A record whose checksum is valid but whose payload is not a command that decodes — as
/// another version of TransDB, or a bug, could write — stops recovery with an error naming
/// its position, not a panic: whether it is the last record or valid records follow it,
/// nothing from it on is applied and the log is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_command_stops_recovery() {
    let steps = workload("");
    let written = write_log(&steps[..4], ONE_SEGMENT).await;
    let segment = &written.segments[0];
    let position = segment.records.len() as u64;
    let command = LogCommand::Request(put("k", "a valid command")).encode();
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("an empty payload", Vec::new()),
        ("a variant that does not exist", vec![0x7f, 1, 2, 3]),
        ("a varint that never ends", vec![0xff; 16]),
        (
            "a valid command cut short",
            command[..command.len() - 1].to_vec(),
        ),
        ("a request that does not exist", vec![0, 0x7f, 1, b'k']),
        ("a key that is not UTF-8", {
            // `Request::Put` with a one-byte key 0xff.
            let mut bytes = LogCommand::Request(put("k", "v")).encode();
            let key = bytes.iter().position(|&byte| byte == b'k').unwrap();
            bytes[key] = 0xff;
            bytes
        }),
    ];
    let salt = u64::from_le_bytes(segment.bytes[24..32].try_into().unwrap());
    for (what, payload) in payloads {
        assert!(refused(&payload).await, "{what}: the payload is a command");
        for followed in [false, true] {
            let case = format!("{what} at position {position}, followed: {followed}");
            let mut bytes = segment.bytes.clone();
            // Written after everything before them was fsynced, as the log thread would.
            let synced = bytes.len() as u64;
            encode_record(salt, synced, position, &payload, &mut bytes);
            if followed {
                let synced = bytes.len() as u64;
                encode_record(salt, synced, position + 1, &command, &mut bytes);
            }
            let files = written.with(0, Some(bytes));
            let dir = data_dir(&files);
            let (executor, result) = recover(dir.path(), ONE_SEGMENT, &case).await;
            let error = match result {
                Ok(recovery) => panic!("{case}: recovered ({recovery:?})"),
                Err(error) => error,
            };
            for part in [
                &*format!("the command logged at position {position} cannot be decoded"),
                "another version of TransDB",
            ] {
                assert!(error.contains(part), "{case}: {part:?} is not in: {error}");
            }
            assert_eq!(
                executor.store.state_hash(),
                written.hashes[position as usize],
                "{case}: the records before it are not exactly what was applied"
            );
            assert!(
                executor.scheduler.log().is_none(),
                "{case}: a log was attached"
            );
            assert_eq!(files_in(&dir), files, "{case}: the log changed");
        }
    }
}

/// Whether a fresh executor refuses to replay `payload` (nothing on disk is involved).
async fn refused(payload: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let executor = executor(dir.path());
    let mut replayer = transdb_host::replay::Replayer::new(&executor);
    replayer.push(0, payload).await.is_err()
}
