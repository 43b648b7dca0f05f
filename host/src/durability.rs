//! Durability: the data directory's module store and checkpoints, recovery, backup and
//! restore. The command log itself is [`crate::log`].
//!
//! # The data directory
//!
//! ```text
//! DATA_DIR/
//!   log/00000000000000000000.log      command log segments (crate::log)
//!   checkpoints/00000000000000052113.checkpoint   the newest checkpoint
//!   modules/<sha-256 hex>.wasm        every deployed module's bytes, by content
//!   server.crt, server.key, LOCK      identity and the running server's lock
//! ```
//!
//! # Checkpoints
//!
//! A checkpoint at `S` is the state after every position below `S`: taken from an MVCC
//! snapshot ([`crate::scheduler::Scheduler::snapshot`]) while traffic goes on. It is
//! written to `NAME.tmp`, fsynced, renamed to `{S:020}.checkpoint`, and the directory
//! fsynced; then the log segments wholly below `S` and the older checkpoints are removed
//! (with `--log-archive DIR`, the segments are moved there instead). The format:
//!
//! ```text
//! 8 bytes  magic "TDBCKPT" 0x01
//! u64 LE   position S
//! u32 LE   module count, then per module: u16 LE name length, name, 32-byte SHA-256
//! u64 LE   entry count, then per entry: u32 LE key length, key,
//!          u64 LE position that wrote the value, u32 LE value length, value
//! u32 LE   CRC32C of every byte before it
//! ```
//!
//! Each key keeps the position that wrote it, because an interactive commit logged before a
//! restart validates its reads against those positions when it is replayed.
//!
//! # Recovery
//!
//! Load the newest checkpoint (its modules compiled from the module store), then replay
//! every logged command at or after its position through the executor, one at a time in
//! log order; cut a torn tail; open the log for appending. A damaged checkpoint or a log
//! damaged in the middle stops the start with an error that says what to do.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use transdb_proto::{ErrorCode, ErrorResponse};

use crate::executor::Executor;
use crate::hex;
use crate::lock_manager::Position;
use crate::log::{self, CommandLog, Durability, LOG_DIR, Tail, sync_dir};

/// Checkpoints' directory inside the data directory.
pub const CHECKPOINT_DIR: &str = "checkpoints";
/// The module store's directory inside the data directory.
pub const MODULE_DIR: &str = "modules";
/// The first eight bytes of a checkpoint.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"TDBCKPT\x01";
/// Default time between periodic checkpoints (when anything was logged meanwhile).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(600);
/// Default log growth that triggers a checkpoint: it bounds what a restart replays (about
/// 700,000 bank transfers, some 10 s of replay on one core; see the recovery benchmark).
pub const DEFAULT_CHECKPOINT_LOG_BYTES: u64 = 64 * 1024 * 1024;

/// Deployed modules' bytes, stored by their SHA-256 (what the log's deploys name).
#[derive(Clone, Debug)]
pub struct ModuleStore {
    dir: PathBuf,
}

impl ModuleStore {
    /// The store in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> ModuleStore {
        ModuleStore { dir: dir.into() }
    }

    /// The file of the module whose SHA-256 is `digest`.
    pub fn path(&self, digest: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}.wasm", hex(digest)))
    }

    /// Stores `bytes` (whose SHA-256 is `digest`) durably: temp file, fsync, rename,
    /// directory fsync. Storing the same bytes again does nothing.
    ///
    /// # Errors
    /// If the file cannot be written.
    pub fn save(&self, digest: &[u8; 32], bytes: &[u8]) -> io::Result<()> {
        let path = self.path(digest);
        if path.exists() {
            return Ok(());
        }
        fs::create_dir_all(&self.dir)?;
        write_durably(&path, |file| file.write_all(bytes))
    }

    /// The bytes of the module whose SHA-256 is `digest`, checked against it.
    ///
    /// # Errors
    /// If the file is missing, unreadable or does not hash to `digest`.
    pub fn load(&self, digest: &[u8; 32]) -> io::Result<Vec<u8>> {
        let path = self.path(digest);
        let bytes = fs::read(&path).map_err(|error| {
            io::Error::new(error.kind(), format!("{}: {error}", path.display()))
        })?;
        if Sha256::digest(&bytes).as_slice() != digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} does not match its SHA-256: the file is damaged",
                    path.display()
                ),
            ));
        }
        Ok(bytes)
    }
}

/// Writes `path` through a temp file: written by `write`, fsynced, renamed over `path`,
/// directory fsynced. A crash leaves the old file or the new one, never a mix.
fn write_durably(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path.parent().expect("a file in a directory");
    let temp = path.with_extension("tmp");
    let file = File::create(&temp)?;
    let mut writer = BufWriter::with_capacity(1 << 20, &file);
    write(&mut writer)?;
    writer.flush()?;
    drop(writer);
    fail::fail_point!("checkpoint-fsync", |_| Err(io::Error::other(
        "injected fault at checkpoint-fsync"
    )));
    file.sync_all()?;
    drop(file);
    fail::fail_point!("checkpoint-rename", |_| Err(io::Error::other(
        "injected fault at checkpoint-rename"
    )));
    fs::rename(&temp, path)?;
    sync_dir(dir)
}

/// What the data directory holds besides the log, for a server that keeps one.
pub struct Persistence {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Deployed modules' bytes.
    pub modules: ModuleStore,
    /// Where log segments go once a checkpoint covers them (`None`: removed).
    pub archive: Option<PathBuf>,
    /// One checkpoint or backup at a time.
    checkpointing: tokio::sync::Mutex<()>,
}

impl Persistence {
    /// The persistence of `data_dir`, archiving covered log segments to `archive`.
    pub fn new(data_dir: &Path, archive: Option<PathBuf>) -> Persistence {
        Persistence {
            data_dir: data_dir.to_owned(),
            modules: ModuleStore::new(data_dir.join(MODULE_DIR)),
            archive,
            checkpointing: tokio::sync::Mutex::new(()),
        }
    }

    fn log_dir(&self) -> PathBuf {
        self.data_dir.join(LOG_DIR)
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.data_dir.join(CHECKPOINT_DIR)
    }
}

/// A checkpoint's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointData {
    /// The state after every position below this.
    pub position: Position,
    /// The deployed modules: name and SHA-256.
    pub modules: Vec<(String, [u8; 32])>,
    /// Every key: the key, the position that wrote its value, the value.
    pub entries: Vec<(String, Position, Bytes)>,
}

/// What a checkpoint or backup wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// It holds the state after every position below this.
    pub position: Position,
    /// Keys in it.
    pub keys: u64,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its file.
    pub path: PathBuf,
}

/// The file name of the checkpoint at `position`.
pub fn checkpoint_name(position: Position) -> String {
    format!("{position:020}.checkpoint")
}

/// Writes `data` as a checkpoint file in `dir` (durably); returns its path and size.
///
/// # Errors
/// If it cannot be written.
pub fn write_checkpoint(dir: &Path, data: &CheckpointData) -> io::Result<(PathBuf, u64)> {
    fs::create_dir_all(dir)?;
    let path = dir.join(checkpoint_name(data.position));
    let mut size = 0u64;
    write_durably(&path, |writer| {
        let mut out = Checksummed {
            inner: writer,
            crc: 0,
            bytes: 0,
        };
        out.put(&CHECKPOINT_MAGIC)?;
        out.put(&data.position.to_le_bytes())?;
        out.put(&(data.modules.len() as u32).to_le_bytes())?;
        for (name, digest) in &data.modules {
            out.put(&(name.len() as u16).to_le_bytes())?;
            out.put(name.as_bytes())?;
            out.put(digest)?;
        }
        out.put(&(data.entries.len() as u64).to_le_bytes())?;
        for (key, position, value) in &data.entries {
            out.put(&(key.len() as u32).to_le_bytes())?;
            out.put(key.as_bytes())?;
            out.put(&position.to_le_bytes())?;
            out.put(&(value.len() as u32).to_le_bytes())?;
            out.put(value)?;
        }
        let crc = out.crc;
        out.put(&crc.to_le_bytes())?;
        size = out.bytes;
        Ok(())
    })?;
    Ok((path, size))
}

struct Checksummed<'a, W: Write> {
    inner: &'a mut W,
    crc: u32,
    bytes: u64,
}

impl<W: Write> Checksummed<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.bytes += bytes.len() as u64;
        self.inner.write_all(bytes)
    }
}

/// Reads and checks the checkpoint at `path`.
///
/// # Errors
/// If it cannot be read, fails its checksum, or is malformed.
pub fn read_checkpoint(path: &Path) -> anyhow::Result<CheckpointData> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read the checkpoint {}", path.display()))?;
    let damaged = |what: &str| {
        anyhow::anyhow!(
            "the checkpoint {} is damaged ({what}): restore the data directory from a backup (`transdb restore`)",
            path.display()
        )
    };
    if bytes.len() < CHECKPOINT_MAGIC.len() + 4 || bytes[..8] != CHECKPOINT_MAGIC {
        return Err(damaged(
            "not a TransDB checkpoint, or another format version",
        ));
    }
    let (body, stored) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(stored.try_into().expect("4 bytes")) {
        return Err(damaged("it fails its checksum"));
    }
    let mut reader = Reader { bytes: &body[8..] };
    let parse = |reader: &mut Reader<'_>| -> Option<CheckpointData> {
        let position = reader.u64()?;
        let module_count = reader.u32()?;
        let mut modules = Vec::new();
        for _ in 0..module_count {
            let length = reader.u16()? as usize;
            let name = String::from_utf8(reader.take(length)?.to_vec()).ok()?;
            let digest: [u8; 32] = reader.take(32)?.try_into().ok()?;
            modules.push((name, digest));
        }
        let entry_count = reader.u64()?;
        let mut entries = Vec::with_capacity(entry_count.min(1 << 24) as usize);
        for _ in 0..entry_count {
            let length = reader.u32()? as usize;
            let key = String::from_utf8(reader.take(length)?.to_vec()).ok()?;
            let version = reader.u64()?;
            let length = reader.u32()? as usize;
            let value = Bytes::copy_from_slice(reader.take(length)?);
            entries.push((key, version, value));
        }
        reader.bytes.is_empty().then_some(CheckpointData {
            position,
            modules,
            entries,
        })
    };
    parse(&mut reader).ok_or_else(|| damaged("its contents do not parse"))
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, length: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < length {
            return None;
        }
        let (taken, rest) = self.bytes.split_at(length);
        self.bytes = rest;
        Some(taken)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// The checkpoints in `dir`, oldest first.
fn checkpoints(dir: &Path) -> io::Result<Vec<(Position, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let position = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".checkpoint"))
            .and_then(|stem| stem.parse::<Position>().ok());
        if let Some(position) = position {
            found.push((position, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Takes a consistent copy of the state without stopping traffic: an MVCC snapshot at
/// `S`, the modules deployed before `S`, every key as of `S`.
async fn capture(executor: &Executor) -> CheckpointData {
    loop {
        let snapshot = executor.scheduler.snapshot().await;
        let position = snapshot.position();
        let (modules, last_install) = executor.procedures.versions();
        // A deploy ordered at or after `S` already ran: the module list is not the one at
        // `S`. Deploys are rare; take a new snapshot.
        if last_install.is_some_and(|installed| installed >= position) {
            continue;
        }
        let store = executor.store.clone();
        let entries = tokio::task::spawn_blocking(move || store.entries_at(position))
            .await
            .expect("collecting entries does not panic");
        if snapshot.close() {
            executor.store.prune();
        }
        return CheckpointData {
            position,
            modules,
            entries,
        };
    }
}

/// After the log failed, memory may hold effects that were never made durable (answered
/// `DURABILITY_FAILED`): a checkpoint must not make them durable behind the clients' backs.
fn refuse_after_log_failure(executor: &Executor) -> Result<(), ErrorResponse> {
    match executor.scheduler.log().and_then(|log| log.failure()) {
        Some(failed) => Err(crate::executor::log_failed_earlier(&failed)),
        None => Ok(()),
    }
}

fn not_durable() -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::NOT_DURABLE,
        "the server runs with --durability none and keeps nothing on disk: restart it with --durability sync (or async) to take checkpoints and backups",
    )
}

fn io_error(what: &str, error: impl std::fmt::Display) -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::INTERNAL,
        format!(
            "{what}: {error}; nothing was removed, the previous checkpoint and the log still hold the state"
        ),
    )
}

/// Writes a checkpoint of the running server's state into its data directory, then
/// removes (or archives) the log segments and the checkpoints it makes unnecessary.
///
/// # Errors
/// `NOT_DURABLE` without a data directory; `INTERNAL` if the checkpoint cannot be written.
pub async fn checkpoint(executor: &Executor) -> Result<CheckpointInfo, ErrorResponse> {
    let persistence = executor.persistence().ok_or_else(not_durable)?;
    refuse_after_log_failure(executor)?;
    let _one_at_a_time = persistence.checkpointing.lock().await;
    let started = Instant::now();
    let data = capture(executor).await;
    let (dir, log_dir, archive) = (
        persistence.checkpoint_dir(),
        persistence.log_dir(),
        persistence.archive.clone(),
    );
    let keys = data.entries.len() as u64;
    let position = data.position;
    let (path, bytes) = tokio::task::spawn_blocking(move || {
        let (path, bytes) = write_checkpoint(&dir, &data)?;
        for (older, older_path) in checkpoints(&dir)? {
            if older < position {
                fs::remove_file(older_path)?;
            }
        }
        let removed = log::truncate_before(&log_dir, position, archive.as_deref())?;
        tracing::debug!(removed, "log segments covered by the checkpoint");
        Ok::<_, io::Error>((path, bytes))
    })
    .await
    .map_err(|panic| io_error("the checkpoint failed", panic))?
    .map_err(|error| io_error("cannot write the checkpoint", error))?;
    tracing::info!(position, keys, bytes, elapsed = ?started.elapsed(), path = %path.display(), "checkpoint written");
    Ok(CheckpointInfo {
        position,
        keys,
        bytes,
        path,
    })
}

/// Writes a consistent copy of the running server's state — a checkpoint and the modules
/// it names — into `dir` (on the server's machine), which must not exist or be empty. The
/// copy is a data directory: `transdb restore` (or `transdb serve --data-dir` on it) starts
/// from it.
///
/// # Errors
/// `NOT_DURABLE` without a module store; `INVALID_PATH` for a non-empty `dir`;
/// `INTERNAL` if it cannot be written.
pub async fn backup(executor: &Executor, dir: &Path) -> Result<CheckpointInfo, ErrorResponse> {
    let persistence = executor.persistence().ok_or_else(not_durable)?;
    refuse_after_log_failure(executor)?;
    let nonempty = fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if nonempty || (dir.exists() && !dir.is_dir()) {
        return Err(ErrorResponse::new(
            ErrorCode::INVALID_PATH,
            format!(
                "the backup directory {} exists and is not empty: choose a new directory",
                dir.display()
            ),
        ));
    }
    let _one_at_a_time = persistence.checkpointing.lock().await;
    let data = capture(executor).await;
    let (keys, position) = (data.entries.len() as u64, data.position);
    let (dir, modules) = (dir.to_owned(), persistence.modules.clone());
    let (path, bytes) = tokio::task::spawn_blocking(move || {
        let target = ModuleStore::new(dir.join(MODULE_DIR));
        for (_, digest) in &data.modules {
            target.save(digest, &modules.load(digest)?)?;
        }
        let written = write_checkpoint(&dir.join(CHECKPOINT_DIR), &data)?;
        sync_dir(&dir)?;
        Ok::<_, io::Error>(written)
    })
    .await
    .map_err(|panic| io_error("the backup failed", panic))?
    .map_err(|error| io_error("cannot write the backup", error))?;
    tracing::info!(position, keys, bytes, path = %path.display(), "backup written");
    Ok(CheckpointInfo {
        position,
        keys,
        bytes,
        path,
    })
}

/// Copies the backup in `from` into `data_dir`, which must hold no state yet (no log and no
/// checkpoint). Offline: no server may be using `data_dir`.
///
/// # Errors
/// If the backup is missing or damaged, or `data_dir` already holds state.
pub fn restore(from: &Path, data_dir: &Path) -> anyhow::Result<CheckpointInfo> {
    let Some((position, source)) = checkpoints(&from.join(CHECKPOINT_DIR))
        .with_context(|| format!("cannot read the backup {}", from.display()))?
        .pop()
    else {
        bail!(
            "{} holds no checkpoint: give the directory `transdb backup` wrote",
            from.display()
        );
    };
    let data = read_checkpoint(&source)?;
    let modules = ModuleStore::new(from.join(MODULE_DIR));
    if !log::segments(&data_dir.join(LOG_DIR))?.is_empty()
        || !checkpoints(&data_dir.join(CHECKPOINT_DIR))?.is_empty()
    {
        bail!(
            "{} already holds a database (a log or a checkpoint): restore into a new --data-dir",
            data_dir.display()
        );
    }
    let target = ModuleStore::new(data_dir.join(MODULE_DIR));
    for (name, digest) in &data.modules {
        let bytes = modules
            .load(digest)
            .with_context(|| format!("the backup's module {name:?} is missing or damaged"))?;
        target.save(digest, &bytes)?;
    }
    let (path, bytes) = write_checkpoint(&data_dir.join(CHECKPOINT_DIR), &data)?;
    sync_dir(data_dir)?;
    Ok(CheckpointInfo {
        position,
        keys: data.entries.len() as u64,
        bytes,
        path,
    })
}

/// What recovery did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The checkpoint loaded, if any: its position.
    pub checkpoint: Option<Position>,
    /// Keys loaded from it.
    pub checkpoint_keys: u64,
    /// Log records replayed after it.
    pub replayed: u64,
    /// Bytes of a torn log tail that were cut.
    pub torn_bytes: u64,
    /// The next position to be given out.
    pub next: Position,
    /// How long it took.
    pub elapsed: Duration,
}

/// Restores the state in `executor` (fresh: empty store, no modules) from its data
/// directory, then opens the log and attaches it, with `durability` (not `None`).
///
/// # Errors
/// If a checkpoint or the middle of the log is damaged, a module is missing, or a file
/// cannot be read or written. The error says what to do.
pub async fn recover(
    executor: &Executor,
    durability: Durability,
    segment_bytes: u64,
) -> anyhow::Result<Recovery> {
    let started = Instant::now();
    let persistence = executor
        .persistence()
        .context("recovery needs the data directory")?;
    let mut recovery = Recovery {
        checkpoint: None,
        checkpoint_keys: 0,
        replayed: 0,
        torn_bytes: 0,
        next: 0,
        elapsed: Duration::ZERO,
    };
    // What a crash or a failed checkpoint left half-written: never used, never needed.
    for dir in [
        persistence.checkpoint_dir(),
        persistence.data_dir.join(MODULE_DIR),
    ] {
        remove_temp_files(&dir)?;
    }
    if let Some((_, path)) = checkpoints(&persistence.checkpoint_dir())?.pop() {
        let data = tokio::task::spawn_blocking(move || read_checkpoint(&path)).await??;
        for (name, digest) in data.modules {
            let bytes = persistence
                .modules
                .load(&digest)
                .with_context(|| format!("the checkpoint's module {name:?} is missing from the module store: restore the data directory from a backup"))?;
            let procedures = executor.procedures.clone();
            let module =
                tokio::task::spawn_blocking(move || procedures.compile(&name, &bytes)).await?;
            let module = module.map_err(|error| {
                anyhow::anyhow!(
                    "a checkpointed module no longer compiles: {}",
                    error.message
                )
            })?;
            executor.procedures.restore(module);
        }
        recovery.checkpoint_keys = data.entries.len() as u64;
        for (key, version, value) in data.entries {
            executor.store.put(&key, value, version);
        }
        executor.scheduler.advance_to(data.position);
        recovery.checkpoint = Some(data.position);
    }
    let from = recovery.checkpoint.unwrap_or(0);
    let log_dir = persistence.log_dir();
    let segments = log::segments(&log_dir)
        .with_context(|| format!("cannot read the log directory {}", log_dir.display()))?;
    let mut last = None;
    let mut tail = Tail::default();
    let mut replayer = crate::replay::Replayer::new(executor);
    for (index, segment) in segments.iter().enumerate() {
        let bytes = fs::read(&segment.path)
            .with_context(|| format!("cannot read {}", segment.path.display()))?;
        let is_last = index + 1 == segments.len();
        let contents = log::read_segment(segment, &bytes, last, is_last)?;
        drop(bytes);
        if index == 0
            && let Some(previous) = contents.header.and_then(|header| header.previous)
            && previous >= from
        {
            bail!(
                "the command log is damaged in the middle: its first segment {} follows records up to position {previous}, \
                 but no segment holds them and the checkpoint covers only the positions below {from}: segments are missing. \
                 Restore the data directory from a backup (`transdb restore`)",
                segment.path.display()
            );
        }
        for record in contents.records.iter() {
            last = Some(record.position);
            if record.position < from {
                continue;
            }
            replayer
                .push(record.position, &record.payload)
                .await
                .map_err(anyhow::Error::msg)?;
            recovery.replayed += 1;
        }
        if contents.torn_bytes > 0 {
            tracing::warn!(
                segment = %segment.path.display(),
                dropped_bytes = contents.torn_bytes,
                reason = contents.torn_reason.as_deref().unwrap_or(""),
                "cut a torn tail off the command log (a crash during a write; nothing in it was acknowledged in sync mode)"
            );
            recovery.torn_bytes = contents.torn_bytes;
        }
        let Some(header) = contents.header.filter(|_| !contents.records.is_empty()) else {
            if is_last {
                // Created by a crash-interrupted rotation: nothing in it was durable.
                // Appending goes on in the segment before (or a new one).
                fs::remove_file(&segment.path)?;
                sync_dir(&log_dir)?;
            }
            continue;
        };
        // Cut a torn tail; either way make what is kept durable: records written after it
        // say it is on disk.
        let file = fs::OpenOptions::new().write(true).open(&segment.path)?;
        if contents.torn_bytes > 0 {
            file.set_len(contents.valid_bytes)?;
        }
        file.sync_all()?;
        tail.segment = Some((segment.path.clone(), contents.valid_bytes, header.salt));
    }
    tail.last = last;
    let next = executor
        .scheduler
        .next_position()
        .max(last.map_or(0, |last| last + 1));
    executor.scheduler.advance_to(next);
    let log = CommandLog::open(&log_dir, tail, next, durability, segment_bytes)
        .with_context(|| format!("cannot open the log in {}", log_dir.display()))?;
    executor.scheduler.attach_log(Arc::new(log));
    recovery.next = next;
    recovery.elapsed = started.elapsed();
    Ok(recovery)
}

/// Removes the `*.tmp` files of [`write_durably`] from `dir`.
fn remove_temp_files(dir: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|extension| extension == "tmp") {
            tracing::info!(path = %path.display(), "removing a half-written file");
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_reads_back_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let data = CheckpointData {
            position: 42,
            modules: vec![("bank".into(), [7; 32])],
            entries: vec![
                ("a".into(), 3, Bytes::from_static(b"one")),
                ("é".into(), 41, Bytes::new()),
            ],
        };
        let (path, size) = write_checkpoint(dir.path(), &data).unwrap();
        assert_eq!(path.file_name().unwrap(), "00000000000000000042.checkpoint");
        assert_eq!(fs::metadata(&path).unwrap().len(), size);
        assert_eq!(read_checkpoint(&path).unwrap(), data);
        let bytes = fs::read(&path).unwrap();
        for index in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[index] ^= 0x10;
            fs::write(&path, &damaged).unwrap();
            let error = read_checkpoint(&path).unwrap_err().to_string();
            assert!(error.contains("damaged"), "{error}");
        }
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read_checkpoint(&path).is_err());
    }

    #[test]
    fn the_module_store_checks_what_it_loads() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModuleStore::new(dir.path());
        let digest: [u8; 32] = Sha256::digest(b"module").into();
        store.save(&digest, b"module").unwrap();
        assert_eq!(store.load(&digest).unwrap(), b"module");
        fs::write(store.path(&digest), b"other").unwrap();
        assert!(store.load(&digest).is_err());
    }
}
