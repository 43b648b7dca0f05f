//! Execution: applies an admitted request to the state and encodes the response.
//!
//! Every request that touches state is a transaction with a position in one total order
//! and the locks of its keys ([`crate::scheduler`]): a single-key read or write locks its
//! key; a procedure call is prepared first (instantiated, key function run — no locks), then
//! waits for the locks of its declared keys (or of everything), then runs in the wasm
//! runtime as one transaction (see [`crate::transaction`]). Waiting never holds a thread.
//! An interactive transaction ([`crate::interactive`]) lives in the [`Session`] of its
//! stream and is ordered only at commit. This is the one place where requests meet state.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use transdb_proto::message::{BatchOp, Encoding, ServerStats};
use transdb_proto::{ErrorCode, ErrorResponse, Request, Response, Role, frame};

use crate::admission;
use crate::durability::Persistence;
use crate::interactive::{CommitPlan, Interactive, InteractiveLimits};
use crate::lock_manager::{LockSet, Mode, Position, lock_id};
use crate::log::{LogFailed, Refusal};
use crate::metrics::{Metrics, Outcome};
use crate::procedures::{MAX_RECONNAISSANCE_ATTEMPTS, Procedures, key_set_unstable};
use crate::scheduler::{Grant, Refused, Scheduler};
use crate::store::Store;

/// What the command log records for one ordered transaction that can change state: its
/// input, enough for a replay at the same position to do exactly what it did (see
/// [`crate::log`]). Encoded with postcard; the variant order is part of the log format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogCommand<'a> {
    /// A `Put`, `Delete` or `Batch`.
    #[serde(borrow)]
    Request(Request<'a>),
    /// A procedure call.
    Call {
        /// The module's name.
        #[serde(borrow)]
        module: Cow<'a, str>,
        /// The version (SHA-256) of the module it was prepared with: if another version is
        /// deployed at its position, it does nothing (it was prepared again, later).
        version: [u8; 32],
        /// The procedure.
        #[serde(borrow)]
        procedure: Cow<'a, str>,
        /// The arguments' encoding.
        encoding: Encoding,
        /// The arguments.
        #[serde(borrow, with = "serde_bytes")]
        args: Cow<'a, [u8]>,
        /// The keys a reconnaissance run found (`true`: written), in key order; `None` when
        /// the procedure's key function declares them (a replay runs it again).
        keys: Option<Vec<(String, bool)>>,
    },
    /// An interactive transaction's commit.
    Commit(CommitPlan),
    /// A deploy: the module's bytes are in the module store under `version`.
    Deploy {
        /// The module's name.
        name: String,
        /// The SHA-256 of its bytes.
        version: [u8; 32],
    },
}

impl LogCommand<'_> {
    /// The command encoded for the log.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a command always encodes")
    }
}

/// One transaction as it was ordered and answered (see [`Executor::with_history`]).
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Its position in the total order.
    pub position: Position,
    /// What was ordered: the input a replay needs.
    pub command: Command,
    /// The response frame sent back.
    pub response: Vec<u8>,
}

/// What one ordered transaction was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A request that is a transaction of its own.
    Request(Request<'static>),
    /// The commit of an interactive transaction (its reads' versions and its writes).
    Commit(CommitPlan),
}

/// The state of one request stream: its connection's role and the interactive transaction
/// open on it, if any. Dropping the session rolls that transaction back.
pub struct Session {
    role: Role,
    transaction: Option<Interactive>,
    /// What the last call on this stream used (for [`Executor::serve`]'s counters).
    meter: CallMeter,
}

/// What a call used, for the counters.
#[derive(Clone, Copy, Debug, Default)]
struct CallMeter {
    /// Fuel its runs used.
    fuel: u64,
    /// Whether its module and procedure exist (only those get a row of their own: the
    /// names of a failed lookup are the caller's, unchecked).
    found: bool,
}

impl Default for Session {
    /// A session of the server itself (replay, in-process tools): every request allowed.
    fn default() -> Self {
        Session::new(Role::Admin)
    }
}

impl Session {
    /// A stream of a connection authenticated with `role`.
    pub fn new(role: Role) -> Self {
        Session {
            role,
            transaction: None,
            meter: CallMeter::default(),
        }
    }

    /// Whether an interactive transaction is open on this stream.
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }
}

/// What requests execute against: the shards, the deployed procedures, the scheduler.
pub struct Executor {
    /// The shards.
    pub store: Arc<Store>,
    /// The deployed modules and their runtime.
    pub procedures: Arc<Procedures>,
    /// Orders transactions and grants their locks.
    pub scheduler: Arc<Scheduler>,
    /// One permit per instance slot a call may hold (taken before instantiating), so calls
    /// waiting for locks can never exhaust the slots that earlier calls need to finish.
    call_slots: Semaphore,
    /// Every ordered transaction, when recording (tests; the command log will do this).
    history: Option<Mutex<Vec<Recorded>>>,
    /// The bounds of interactive transactions.
    interactive_limits: InteractiveLimits,
    /// The data directory's checkpoints and module store, unless `--durability none`.
    persistence: Option<Persistence>,
    /// Beyond this many bytes in the store (see [`Store::memory_bytes`]), requests that
    /// could add data are refused with `STORE_FULL`.
    max_store_bytes: Option<usize>,
    /// What the network front end counts, for `Stats`.
    pub front_end: FrontEndCounters,
    /// Requests, errors and calls counted by [`Executor::serve`], for `Stats` and metrics.
    pub metrics: Metrics,
}

/// What the network front end counts, reported by `Stats`.
#[derive(Default)]
pub struct FrontEndCounters {
    /// Open connections (authenticated or not).
    pub connections: AtomicUsize,
    /// Connections refused for a missing, wrong or revoked token or certificate.
    pub auth_failures: AtomicU64,
}

impl Executor {
    /// An executor over `store` and `procedures`, refusing new transactions while
    /// `max_pending_transactions` are unfinished.
    pub fn new(
        store: Arc<Store>,
        procedures: Arc<Procedures>,
        max_pending_transactions: usize,
    ) -> Executor {
        // One slot stays free for a deploy's trial instantiation.
        let slots = (procedures.runtime().limits().concurrent_calls as usize)
            .saturating_sub(1)
            .max(1);
        let interactive_limits = InteractiveLimits {
            max_keys: procedures.runtime().limits().keys_per_call,
            max_write_bytes: crate::interactive::DEFAULT_MAX_TRANSACTION_BYTES,
        };
        Executor {
            scheduler: Scheduler::with_limit(
                max_pending_transactions,
                store.snapshot_floor().clone(),
            ),
            store,
            procedures,
            call_slots: Semaphore::new(slots),
            history: None,
            interactive_limits,
            persistence: None,
            max_store_bytes: None,
            front_end: FrontEndCounters::default(),
            metrics: Metrics::default(),
        }
    }

    /// Refuses requests that could add data once the store holds `max_bytes` (`--max-memory`).
    pub fn with_max_store_bytes(mut self, max_bytes: Option<usize>) -> Executor {
        self.max_store_bytes = max_bytes;
        self
    }

    /// `STORE_FULL` if the store holds its memory limit.
    fn check_store_space(&self) -> Result<(), ErrorResponse> {
        match self.max_store_bytes {
            Some(limit) => {
                let used = self.store.memory_bytes();
                if used >= limit {
                    Err(ErrorResponse::new(
                        ErrorCode::STORE_FULL,
                        format!(
                            "the store is full: it holds {used} bytes and the limit (--max-memory) is {limit}; \
                             nothing was written: delete keys (Delete and batches of deletes are always accepted) \
                             or raise the limit"
                        ),
                    ))
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        }
    }

    /// Stores deployed modules and checkpoints in `persistence` (the log itself is attached
    /// to the scheduler after recovery).
    pub fn with_persistence(mut self, persistence: Persistence) -> Executor {
        self.persistence = Some(persistence);
        self
    }

    /// The data directory's checkpoints and module store, if the server keeps any.
    pub fn persistence(&self) -> Option<&Persistence> {
        self.persistence.as_ref()
    }

    /// Bounds interactive transactions' buffered writes at `max_write_bytes`.
    pub fn with_max_transaction_bytes(mut self, max_write_bytes: usize) -> Executor {
        self.interactive_limits.max_write_bytes = max_write_bytes;
        self
    }

    /// Records every ordered transaction with its position and response, for
    /// [`Executor::take_history`]: what a replay needs to reproduce the state.
    pub fn with_history(mut self) -> Executor {
        self.history = Some(Mutex::new(Vec::new()));
        self
    }

    /// The transactions recorded so far, in position order.
    pub fn take_history(&self) -> Vec<Recorded> {
        let mut history = self
            .history
            .as_ref()
            .map(|history| std::mem::take(&mut *history.lock()))
            .unwrap_or_default();
        history.sort_by_key(|recorded| recorded.position);
        history
    }

    /// Admits and executes `request` on a stream of its own, appending the response frame to
    /// `out`. (A `Begin` here opens a transaction that ends with the request.)
    pub async fn execute(&self, request: Request<'_>, out: &mut Vec<u8>) {
        self.execute_in(&mut Session::default(), request, out).await;
    }

    /// Replays a recorded transaction at its recorded position (positions can have gaps:
    /// a call retried after its reconnaissance took one and recorded nothing), appending
    /// the response frame to `out`. Replay one transaction at a time, in position order.
    pub async fn replay(&self, recorded: &Recorded, out: &mut Vec<u8>) {
        self.scheduler.advance_to(recorded.position);
        match &recorded.command {
            Command::Request(request) => self.execute(request.clone(), out).await,
            Command::Commit(plan) => self.commit(plan.clone(), out).await,
        }
    }

    /// [`Executor::execute_in`] for a front end (QUIC, HTTP): also counts the request, its
    /// outcome and its latency since it `arrived`, and a call's procedure and fuel, in
    /// [`Executor::metrics`].
    pub async fn serve(
        &self,
        session: &mut Session,
        request: Request<'_>,
        arrived: Instant,
        out: &mut Vec<u8>,
    ) {
        let start = out.len();
        let number = request.number();
        let call = match &request {
            Request::Call {
                module, procedure, ..
            } if !session.in_transaction() => Some((module.clone(), procedure.clone())),
            _ => None,
        };
        session.meter = CallMeter::default();
        self.execute_in(session, request, out).await;
        let elapsed = arrived.elapsed();
        let outcome = outcome(&out[start..]);
        self.metrics.record(number, outcome, elapsed);
        if let Some((module, procedure)) = call
            && session.meter.found
        {
            self.metrics
                .record_call(&module, &procedure, outcome, session.meter.fuel, elapsed);
        }
    }

    /// Admits and executes `request`, a request of the stream whose state is `session`,
    /// appending the response frame to `out`.
    pub async fn execute_in(&self, session: &mut Session, request: Request<'_>, out: &mut Vec<u8>) {
        if let Err(refusal) = admission::authorize(session.role, &request)
            .and_then(|()| admission::admit(&request))
            .and_then(|()| {
                if admission::adds_data(&request) {
                    self.check_store_space()
                } else {
                    Ok(())
                }
            })
        {
            return encode(&Response::Error(refusal), out);
        }
        if session.in_transaction() {
            return self.in_transaction(session, request, out).await;
        }
        let recorded = self.history.as_ref().map(|_| request.clone().into_owned());
        let input_bytes = input_bytes(&request);
        let mut record = match &request {
            Request::Put { .. }
            | Request::Delete { .. }
            | Request::Batch { .. }
            | Request::Undeploy { .. }
                if self.scheduler.logging() =>
            {
                Some(LogCommand::Request(request.clone()).encode())
            }
            _ => None,
        };
        let start = out.len();
        let grant = match request {
            Request::Begin => {
                let snapshot = self.scheduler.snapshot().await;
                // What the snapshot shows must be durable before anything is read from it.
                if let Err(failed) = self.durable(snapshot.position()).await {
                    return encode(&Response::Error(log_failed_earlier(&failed)), out);
                }
                let transaction =
                    Interactive::new(self.store.clone(), snapshot, self.interactive_limits);
                encode(
                    &Response::Begun {
                        snapshot: transaction.snapshot(),
                    },
                    out,
                );
                session.transaction = Some(transaction);
                None
            }
            Request::Commit | Request::Rollback => {
                encode(
                    &Response::Error(ErrorResponse::new(
                        ErrorCode::NO_TRANSACTION,
                        "there is no open transaction on this stream: send Begin first (a transaction lives on one stream)",
                    )),
                    out,
                );
                None
            }
            Request::Ping => {
                encode(&Response::Pong, out);
                None
            }
            Request::Get { key } => match self
                .acquire(one_key(&key, Mode::Shared), input_bytes, None, out)
                .await
            {
                Some(grant) => {
                    let value = self.store.get(&key);
                    encode(&Response::Value(value.as_deref().map(Cow::Borrowed)), out);
                    Some(grant)
                }
                None => None,
            },
            Request::Put { key, value } => {
                match self
                    .acquire(
                        one_key(&key, Mode::Exclusive),
                        input_bytes,
                        record.take(),
                        out,
                    )
                    .await
                {
                    Some(grant) => {
                        self.store
                            .put(&key, Bytes::copy_from_slice(&value), grant.position());
                        encode(&Response::Stored, out);
                        Some(grant)
                    }
                    None => None,
                }
            }
            Request::Delete { key } => {
                match self
                    .acquire(
                        one_key(&key, Mode::Exclusive),
                        input_bytes,
                        record.take(),
                        out,
                    )
                    .await
                {
                    Some(grant) => {
                        encode(
                            &Response::Deleted {
                                existed: self.store.delete(&key, grant.position()),
                            },
                            out,
                        );
                        Some(grant)
                    }
                    None => None,
                }
            }
            Request::Call {
                module,
                procedure,
                encoding,
                args,
            } => {
                let read_only = session.role < Role::Write;
                self.call(
                    &module,
                    &procedure,
                    encoding,
                    &args,
                    read_only,
                    &mut session.meter,
                    out,
                )
                .await
            }
            Request::Batch { ops } => {
                let locks = batch_locks(ops.iter().map(BatchOp::key));
                match self.acquire(locks, input_bytes, record.take(), out).await {
                    Some(grant) => {
                        let count = ops.len() as u64;
                        let writes = batch_writes(ops);
                        let response = match self.store.apply(writes, grant.position()) {
                            Ok(()) => Response::Batched { ops: count },
                            Err(reason) => Response::Error(ErrorResponse::new(
                                ErrorCode::INTERNAL,
                                format!("commit aborted: {reason}"),
                            )),
                        };
                        encode(&response, out);
                        Some(grant)
                    }
                    None => None,
                }
            }
            Request::Stats => match self.acquire(LockSet::All, input_bytes, None, out).await {
                Some(grant) => {
                    encode(&Response::Stats(self.stats(grant.position())), out);
                    Some(grant)
                }
                None => None,
            },
            Request::Deploy { name, module } => {
                self.deploy(name.into_owned(), module.into_owned(), out)
                    .await
            }
            Request::Undeploy { name } => {
                if let Err(error) = crate::procedures::check_name(&name, true, "module") {
                    encode(&Response::Error(error), out);
                    None
                } else {
                    // Every lock, like a deploy: calls ordered after it find no module.
                    let grant = self
                        .acquire(LockSet::All, input_bytes, record.take(), out)
                        .await;
                    if let Some(grant) = &grant {
                        let existed = self.procedures.uninstall(&name, grant.position());
                        encode(&Response::Undeployed { existed }, out);
                    }
                    grant
                }
            }
            Request::ListModules => {
                encode(&Response::Modules(self.procedures.list()), out);
                None
            }
            Request::Checkpoint => {
                let written = crate::durability::checkpoint(self).await;
                encode(&checkpointed(written), out);
                None
            }
            Request::Backup { dir } => {
                let written = crate::durability::backup(self, std::path::Path::new(&*dir)).await;
                encode(&checkpointed(written), out);
                None
            }
            // Connection-level requests: the network front end answers them before they
            // reach the executor.
            Request::Authenticate { .. }
            | Request::CreateToken { .. }
            | Request::RevokeToken { .. }
            | Request::ListTokens
            | Request::Shutdown => {
                encode(
                    &Response::Error(ErrorResponse::new(
                        ErrorCode::PERMISSION_DENIED,
                        "authentication, tokens and shutdown are requests of a connection: \
                         send them to a server over QUIC",
                    )),
                    out,
                );
                None
            }
        };
        if let (Some(history), Some(grant), Some(request)) = (&self.history, &grant, recorded) {
            let response = out[start..].to_vec();
            history.lock().push(Recorded {
                position: grant.position(),
                command: Command::Request(request),
                response,
            });
        }
        let Some(grant) = grant else { return };
        let position = grant.position();
        drop(grant); // the locks are released after the response is final
        self.settle(position, start, out).await;
    }

    /// Waits until the transaction at `position` is durable (every position up to it is:
    /// it may have read what they wrote) before its response, from `start` in `out`, is
    /// sent; if the log failed, replaces the response with `DURABILITY_FAILED`.
    async fn settle(&self, position: Position, start: usize, out: &mut Vec<u8>) {
        if let Err(failed) = self.durable(position + 1).await {
            out.truncate(start);
            encode(&Response::Error(durability_failed(&failed)), out);
        }
    }

    /// Waits until every position below `end` is durable (at once without a log).
    async fn durable(&self, end: Position) -> Result<(), LogFailed> {
        match self.scheduler.log() {
            Some(log) => log.wait_durable(end).await,
            None => Ok(()),
        }
    }

    /// Compiles a module, stores its bytes, and installs it at its position in the order.
    async fn deploy(&self, name: String, bytes: Vec<u8>, out: &mut Vec<u8>) -> Option<Grant> {
        // Compiling takes milliseconds to seconds, storing an fsync: not on an async worker.
        let procedures = self.procedures.clone();
        let modules = self.persistence.as_ref().map(|p| p.modules.clone());
        let compiled = tokio::task::spawn_blocking(move || {
            let compiled = procedures.compile(&name, &bytes)?;
            if let Some(modules) = modules {
                modules.save(&compiled.digest(), &bytes).map_err(|error| {
                    ErrorResponse::new(
                        ErrorCode::INTERNAL,
                        format!("cannot store the module in the data directory: {error}; nothing was deployed"),
                    )
                })?;
            }
            Ok::<_, ErrorResponse>(compiled)
        })
        .await;
        let compiled = match compiled {
            Ok(Ok(compiled)) => compiled,
            Ok(Err(error)) => {
                encode(&Response::Error(error), out);
                return None;
            }
            Err(panic) => {
                encode(
                    &Response::Error(ErrorResponse::new(
                        ErrorCode::INTERNAL,
                        format!("deploy failed: {panic}"),
                    )),
                    out,
                );
                return None;
            }
        };
        let record = self.scheduler.logging().then(|| {
            LogCommand::Deploy {
                name: compiled.name().to_owned(),
                version: compiled.digest(),
            }
            .encode()
        });
        // Every lock: calls before it run on the old version, calls after it on the new.
        let grant = self
            .acquire(LockSet::All, compiled.name().len() + 32, record, out)
            .await?;
        let response = match self.procedures.install(compiled, grant.position()) {
            Ok(info) => Response::Deployed(info),
            Err(error) => Response::Error(error),
        };
        encode(&response, out);
        Some(grant)
    }

    /// A request on a stream with an open interactive transaction.
    async fn in_transaction(&self, session: &mut Session, request: Request<'_>, out: &mut Vec<u8>) {
        let transaction = session.transaction.as_mut().expect("a transaction is open");
        let result = match request {
            Request::Ping => Ok(Response::Pong),
            Request::Get { key } => match transaction.get(&key) {
                Ok(value) => {
                    return encode(&Response::Value(value.as_deref().map(Cow::Borrowed)), out);
                }
                Err(error) => Err(error),
            },
            Request::Put { key, value } => transaction.put(&key, &value).map(|()| Response::Stored),
            Request::Delete { key } => transaction
                .delete(&key)
                .map(|existed| Response::Deleted { existed }),
            Request::Rollback => {
                session.transaction = None;
                Ok(Response::RolledBack)
            }
            Request::Commit => {
                let transaction = session.transaction.take().expect("open");
                match transaction.finish() {
                    Err(snapshot) => Ok(Response::Committed { position: snapshot }),
                    Ok(plan) => {
                        if plan.writes.iter().any(|(_, value)| value.is_some())
                            && let Err(full) = self.check_store_space()
                        {
                            // Ends the transaction, like any refused Commit.
                            return encode(&Response::Error(full), out);
                        }
                        self.commit(plan, out).await;
                        return;
                    }
                }
            }
            other => Err(ErrorResponse::new(
                ErrorCode::TRANSACTION_OPEN,
                format!(
                    "this stream has an open transaction, so it cannot run {:?}: only Get, Put, Delete, Commit, Rollback and Ping until the transaction ends",
                    other.kind()
                ),
            )),
        };
        match result {
            Ok(response) => encode(&response, out),
            Err(error) => {
                // Past a limit, the transaction cannot go on as the client meant it.
                if matches!(
                    error.code,
                    ErrorCode::TOO_MANY_KEYS | ErrorCode::TRANSACTION_TOO_LARGE
                ) {
                    session.transaction = None;
                }
                encode(&Response::Error(error), out);
            }
        }
    }

    /// Orders and applies an interactive transaction's commit (or refuses it with
    /// `CONFLICT`), appending the response to `out`.
    async fn commit(&self, plan: CommitPlan, out: &mut Vec<u8>) {
        let start = out.len();
        let record = self
            .scheduler
            .logging()
            .then(|| LogCommand::Commit(plan.clone()).encode());
        let Some(grant) = self
            .acquire(plan.lock_set(), plan.input_bytes(), record, out)
            .await
        else {
            return;
        };
        let recorded = self.history.as_ref().map(|_| plan.clone());
        let response = commit_at(&self.store, plan, grant.position());
        encode(&response, out);
        if let (Some(history), Some(plan)) = (&self.history, recorded) {
            history.lock().push(Recorded {
                position: grant.position(),
                command: Command::Commit(plan),
                response: out[start..].to_vec(),
            });
        }
        let position = grant.position();
        drop(grant);
        self.settle(position, start, out).await;
    }

    /// Orders a transaction of `input_bytes` ordered input, logging `record`, and waits for
    /// its locks; or answers why it was refused.
    async fn acquire(
        &self,
        locks: LockSet,
        input_bytes: usize,
        record: Option<Vec<u8>>,
        out: &mut Vec<u8>,
    ) -> Option<Grant> {
        match self
            .scheduler
            .acquire_sized(locks, input_bytes, record)
            .await
        {
            Ok(grant) => Some(grant),
            Err(refused) => {
                encode(&Response::Error(refused_error(refused)), out);
                None
            }
        }
    }

    /// Prepares, orders and runs a call (again, with fresh reconnaissance, while its key
    /// set proves stale); records in `meter` whether the procedure exists and the fuel its
    /// runs used.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        module: &str,
        procedure: &str,
        encoding: Encoding,
        args: &[u8],
        read_only: bool,
        meter: &mut CallMeter,
        out: &mut Vec<u8>,
    ) -> Option<Grant> {
        let _slot = self
            .call_slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        for _ in 0..MAX_RECONNAISSANCE_ATTEMPTS {
            let prepared = self.procedures.module(module).and_then(|deployed| {
                let prepared = self.procedures.prepare_in(
                    &deployed,
                    procedure,
                    encoding,
                    args,
                    &self.store,
                    None,
                )?;
                Ok((deployed, prepared))
            });
            meter.found = match &prepared {
                Ok(_) => true,
                Err(error) => !matches!(
                    error.code,
                    ErrorCode::INVALID_NAME
                        | ErrorCode::MODULE_NOT_FOUND
                        | ErrorCode::PROCEDURE_NOT_FOUND
                ),
            };
            let (deployed, prepared) = match prepared {
                Ok(prepared) => prepared,
                Err(error) => {
                    encode(&Response::Error(error), out);
                    return None;
                }
            };
            let writes = prepared
                .declared_keys()
                .is_none_or(|keys| keys.values().any(|write| *write));
            if writes {
                let refusal = if read_only {
                    Err(ErrorResponse::new(
                        ErrorCode::PERMISSION_DENIED,
                        format!(
                            "{module}.{procedure} may write, and this connection's role (read) may call \
                             only procedures that write nothing: use a token with the write role"
                        ),
                    ))
                } else {
                    self.check_store_space()
                };
                if let Err(error) = refusal {
                    encode(&Response::Error(error), out);
                    return None;
                }
            }
            let reconnoitred = prepared.reconnoitred();
            let record = self.scheduler.logging().then(|| {
                LogCommand::Call {
                    module: Cow::Borrowed(module),
                    version: deployed.digest(),
                    procedure: Cow::Borrowed(procedure),
                    encoding,
                    args: Cow::Borrowed(args),
                    keys: reconnoitred.then(|| {
                        let mut keys: Vec<(String, bool)> = prepared
                            .declared_keys()
                            .into_iter()
                            .flatten()
                            .map(|(key, write)| (key.clone(), *write))
                            .collect();
                        keys.sort_unstable();
                        keys
                    }),
                }
                .encode()
            });
            let grant = self
                .acquire(
                    prepared.lock_set(),
                    module.len() + procedure.len() + args.len(),
                    record,
                    out,
                )
                .await?;
            // Replaced between preparation and this position: it does nothing here (a
            // replay sees the same version at this position) and runs again, later.
            if self.procedures.current_digest(module) != Some(deployed.digest()) {
                continue;
            }
            let (result, fuel) = prepared.execute_metered(&self.store, args, grant.position());
            meter.fuel += fuel;
            let response = match result {
                Ok(output) => Response::Output(Cow::Owned(output)),
                // The state moved between reconnaissance and execution: a deterministic
                // abort at this position, with no effect; try again at a later one.
                Err(error) if reconnoitred && error.code == ErrorCode::KEY_NOT_DECLARED => continue,
                Err(error) => Response::Error(error),
            };
            encode(&response, out);
            return Some(grant);
        }
        encode(
            &Response::Error(key_set_unstable(MAX_RECONNAISSANCE_ATTEMPTS)),
            out,
        );
        None
    }

    /// The server's statistics for `Stats` at `position`: [`Executor::gauges`], the state's
    /// hash, and what [`Executor::metrics`] counted.
    fn stats(&self, position: Position) -> ServerStats {
        ServerStats {
            state_hash: crate::hex(&self.store.state_hash()),
            requests: self.metrics.requests(),
            errors: self.metrics.errors(),
            procedures: self.metrics.procedures(),
            ..self.gauges(position)
        }
    }

    /// The figures of `Stats` read without ordering anything (for `GET /metrics`): sizes,
    /// connections, memory, the log, uptime; no state hash (hashing every entry needs every
    /// lock) and no counts (the metrics have them, finer).
    pub fn gauges(&self, position: Position) -> ServerStats {
        // Durable first: it only grows, and never past the next position read after it.
        let durable_position = self.scheduler.log().map(|log| log.durable());
        let next_position = self.scheduler.next_position();
        ServerStats {
            position,
            state_hash: String::new(),
            shards: self
                .store
                .shard_stats()
                .into_iter()
                .map(|shard| transdb_proto::message::ShardStats {
                    keys: shard.keys as u64,
                    bytes: shard.bytes as u64,
                })
                .collect(),
            modules: self.procedures.list().len() as u64,
            connections: self.front_end.connections.load(Ordering::Relaxed) as u64,
            auth_failures: self.front_end.auth_failures.load(Ordering::Relaxed),
            uptime_ms: self.metrics.uptime().as_millis() as u64,
            memory: transdb_proto::message::MemoryStats {
                store_bytes: self.store.memory_bytes() as u64,
                store_limit: self.max_store_bytes.map(|limit| limit as u64),
                process_resident: crate::metrics::process_resident_bytes(),
            },
            log: transdb_proto::message::LogStats {
                next_position,
                durable_position,
                durability_lag: durable_position
                    .map_or(0, |durable| next_position.saturating_sub(durable)),
            },
            requests: Vec::new(),
            errors: Vec::new(),
            procedures: Vec::new(),
        }
    }
}

/// Whether the response frame `frame` is an error, and its code.
fn outcome(frame: &[u8]) -> Outcome {
    // `Response::Error` is variant 0: its payload starts with a zero byte.
    match frame.get(frame::HEADER_BYTES) {
        Some(0) => match frame::decode::<Response<'_>>(&frame[frame::HEADER_BYTES..]) {
            Ok(Response::Error(error)) => Outcome::Error(error.code),
            _ => Outcome::Ok,
        },
        _ => Outcome::Ok,
    }
}

fn checkpointed(
    written: Result<crate::durability::CheckpointInfo, ErrorResponse>,
) -> Response<'static> {
    match written {
        Ok(info) => Response::Checkpointed(transdb_proto::message::CheckpointInfo {
            position: info.position,
            keys: info.keys,
            bytes: info.bytes,
            path: info.path.display().to_string(),
        }),
        Err(error) => Response::Error(error),
    }
}

fn refused_error(refused: Refused) -> ErrorResponse {
    match refused {
        Refused::Overloaded { limit } => ErrorResponse::new(
            ErrorCode::OVERLOADED,
            format!(
                "{limit} transactions are pending, the limit (--max-pending-transactions): nothing was done, retry shortly"
            ),
        ),
        Refused::Log(Refusal::Behind { unwritten }) => ErrorResponse::new(
            ErrorCode::OVERLOADED,
            format!(
                "the command log has {unwritten} bytes waiting for the disk (the limit is {}): nothing was done, retry shortly",
                crate::log::MAX_UNWRITTEN_BYTES
            ),
        ),
        Refused::Log(Refusal::Failed(failed)) => log_failed_earlier(&failed),
        Refused::Log(Refusal::TooLarge { bytes }) => ErrorResponse::new(
            ErrorCode::TRANSACTION_TOO_LARGE,
            format!(
                "the transaction's input is {bytes} bytes, more than a command log record holds ({} bytes): nothing was done; split it into smaller transactions",
                crate::log::MAX_RECORD_BYTES
            ),
        ),
    }
}

/// The answer to a request refused, before anything was done, because the log failed.
pub(crate) fn log_failed_earlier(failed: &LogFailed) -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::DURABILITY_FAILED,
        format!(
            "{failed}. Nothing was done: the server refuses every transaction since then; restart it, which recovers everything that was made durable"
        ),
    )
}

fn durability_failed(failed: &LogFailed) -> ErrorResponse {
    ErrorResponse::new(
        ErrorCode::DURABILITY_FAILED,
        format!(
            "{failed}. This transaction may or may not have taken effect; the server refuses every transaction until it is restarted, which recovers everything that was made durable"
        ),
    )
}

/// The size of what a request puts in the order (keys, values, arguments): what the
/// sequencer's byte cap counts.
fn input_bytes(request: &Request<'_>) -> usize {
    match request {
        Request::Get { key } | Request::Delete { key } => key.len(),
        Request::Put { key, value } => key.len() + value.len(),
        Request::Call {
            module,
            procedure,
            args,
            ..
        } => module.len() + procedure.len() + args.len(),
        Request::Batch { ops } => ops
            .iter()
            .map(|op| match op {
                BatchOp::Put { key, value } => key.len() + value.len(),
                BatchOp::Delete { key } => key.len(),
            })
            .sum(),
        Request::Deploy { name, module } => name.len() + module.len(),
        Request::Undeploy { name } => name.len(),
        _ => 0,
    }
}

/// Decides an interactive commit at `position`, its locks held: validates the versions it
/// read and applies its writes, or answers `CONFLICT`.
pub(crate) fn commit_at(store: &Store, plan: CommitPlan, position: Position) -> Response<'static> {
    match plan.validate(store) {
        Err(conflict) => Response::Error(conflict),
        Ok(()) => match store.apply(plan.writes, position) {
            Ok(()) => Response::Committed { position },
            Err(reason) => Response::Error(ErrorResponse::new(
                ErrorCode::INTERNAL,
                format!("commit aborted: {reason}"),
            )),
        },
    }
}

/// A batch's writes, in order (`None` deletes).
pub(crate) fn batch_writes(ops: Vec<BatchOp<'_>>) -> Vec<(String, Option<Bytes>)> {
    ops.into_iter()
        .map(|op| match op {
            BatchOp::Put { key, value } => (key.into_owned(), Some(Bytes::copy_from_slice(&value))),
            BatchOp::Delete { key } => (key.into_owned(), None),
        })
        .collect()
}

/// A batch's locks: every key it writes, exclusive.
pub(crate) fn batch_locks<K: AsRef<str>>(keys: impl Iterator<Item = K>) -> LockSet {
    LockSet::Keys(
        keys.map(|key| (lock_id(key.as_ref()), Mode::Exclusive))
            .collect(),
    )
}

/// The locks of a one-key transaction.
pub(crate) fn one_key(key: &str, mode: Mode) -> LockSet {
    LockSet::Keys(vec![(lock_id(key), mode)])
}

/// Appends `response` as a frame to `out` (an `INTERNAL` error if it cannot be framed).
pub(crate) fn encode(response: &Response<'_>, out: &mut Vec<u8>) {
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
        Executor::new(
            Arc::new(Store::new(2)),
            Arc::new(Procedures::new(runtime, 10)),
            1000,
        )
    }

    fn run(executor: &Executor, request: Request<'_>) -> Response<'static> {
        let mut out = Vec::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(executor.execute(request, &mut out));
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
