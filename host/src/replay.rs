//! Replaying the command log (recovery): one command at a time, in log order, each at its
//! logged position ([`Scheduler::advance_to`]), through the same store, scheduler and
//! runtime as when it first ran, so it decides every transaction as the original did and
//! ends in the same state.
//!
//! A call runs the module version the log names (deploys are compiled as the replay reaches
//! them and kept by version), and does nothing if another version is deployed at its
//! position, as it did then. A reconnoitred call gets its logged key set instead of a new
//! reconnaissance.
//!
//! Replaying in parallel — order in log order, run as locks are granted, as the live server
//! does — was tried and measured (`cargo bench -p transdb-host --bench recovery`): with one
//! task per command and the turn handed from task to task, 1,000,000 transfers took 33 s
//! instead of 15 s on two cores; a cross-thread hand-off per command costs more than the
//! second core gives. Batching commands per task is what a faster replay needs.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use transdb_proto::{ErrorCode, Request};

use crate::executor::{Executor, LogCommand, batch_locks, batch_writes, commit_at, one_key};
use crate::lock_manager::{LockSet, Mode, Position};
use crate::procedures::{DeployedModule, Procedures};
use crate::scheduler::Scheduler;
use crate::store::Store;

/// Replays logged commands; see the module documentation.
pub struct Replayer {
    store: Arc<Store>,
    procedures: Arc<Procedures>,
    scheduler: Arc<Scheduler>,
    modules: Option<crate::durability::ModuleStore>,
    /// Every module version deployed so far in the replay (and in the checkpoint before
    /// it), by SHA-256.
    versions: HashMap<[u8; 32], Arc<DeployedModule>>,
}

impl Replayer {
    /// A replayer into `executor`, whose modules so far (from a checkpoint) are known.
    pub fn new(executor: &Executor) -> Replayer {
        let (names, _) = executor.procedures.versions();
        let versions = names
            .iter()
            .filter_map(|(name, digest)| Some((*digest, executor.procedures.module(name).ok()?)))
            .collect();
        Replayer {
            store: executor.store.clone(),
            procedures: executor.procedures.clone(),
            scheduler: executor.scheduler.clone(),
            modules: executor.persistence().map(|p| p.modules.clone()),
            versions,
        }
    }

    /// Replays the command `payload` logged at `position` (after every earlier one).
    ///
    /// # Errors
    /// If it cannot be replayed (undecodable, a module missing from the module store, a
    /// call the machine could not prepare): the log was not written as this server writes
    /// it, or cannot be replayed here. Every command before it has been applied.
    pub async fn push(&mut self, position: Position, payload: &[u8]) -> Result<(), String> {
        let command: LogCommand<'_> = postcard::from_bytes(payload).map_err(|error| {
            format!("the command logged at position {position} cannot be decoded ({error}): was it written by another version of TransDB?")
        })?;
        self.scheduler.advance_to(position);
        let store = &self.store;
        match command {
            LogCommand::Request(Request::Put { key, value }) => {
                let at = self.lock(one_key(&key, Mode::Exclusive)).await?;
                store.put(&key, Bytes::copy_from_slice(&value), at);
            }
            LogCommand::Request(Request::Delete { key }) => {
                let at = self.lock(one_key(&key, Mode::Exclusive)).await?;
                store.delete(&key, at);
            }
            LogCommand::Request(Request::Batch { ops }) => {
                let writes = batch_writes(ops);
                let at = self
                    .lock(batch_locks(writes.iter().map(|(key, _)| key)))
                    .await?;
                let _ = store.apply(writes, at);
            }
            LogCommand::Request(Request::Undeploy { name }) => {
                let at = self.lock(LockSet::All).await?;
                self.procedures.uninstall(&name, at);
            }
            LogCommand::Request(other) => {
                return Err(format!(
                    "the command logged at position {position} is a {} request, which is never logged: the log was not written by this version of TransDB",
                    other.kind()
                ));
            }
            LogCommand::Commit(plan) => {
                let at = self.lock(plan.lock_set()).await?;
                let _ = commit_at(store, plan, at);
            }
            LogCommand::Call {
                module,
                version,
                procedure,
                encoding,
                args,
                keys,
            } => {
                // Another version at this position (or one never deployed before it): the
                // call did nothing here; it was prepared again, later.
                let Some(deployed) = self.versions.get(&version).cloned() else {
                    return Ok(());
                };
                if self.procedures.current_digest(&module) != Some(version) {
                    return Ok(());
                }
                let given = keys.map(|keys| keys.into_iter().collect());
                let prepared = match self
                    .procedures
                    .prepare_in(&deployed, &procedure, encoding, &args, store, given)
                {
                    Ok(prepared) => prepared,
                    // The machine, not the call: it would not fail the same way each time.
                    Err(error)
                        if matches!(
                            error.code,
                            ErrorCode::INTERNAL
                                | ErrorCode::OVERLOADED
                                | ErrorCode::DEADLINE_EXCEEDED
                        ) =>
                    {
                        return Err(format!(
                            "the call logged at position {position} could not be prepared: {}",
                            error.message
                        ));
                    }
                    // It failed the same way when it ran, before it was ordered.
                    Err(_) => return Ok(()),
                };
                let at = self.lock(prepared.lock_set()).await?;
                let _ = prepared.execute(store, &args, at);
            }
            LogCommand::Deploy { name, version } => {
                let Some(modules) = &self.modules else {
                    return Err("a deploy is logged but the server keeps no module store".into());
                };
                let bytes = modules.load(&version).map_err(|error| {
                    format!("the module {name:?} deployed at position {position} is missing from the module store or damaged: {error}. Restore the data directory from a backup (`transdb restore`)")
                })?;
                let procedures = self.procedures.clone();
                let compiled =
                    tokio::task::spawn_blocking(move || procedures.compile_module(&name, &bytes))
                        .await
                        .map_err(|panic| format!("compiling a logged module panicked: {panic}"))?;
                let at = self.lock(LockSet::All).await?;
                let installed = compiled.and_then(|module| {
                    self.versions.insert(version, module.clone());
                    self.procedures.install(module, at)
                });
                if let Err(error) = installed {
                    tracing::warn!(position, error = %error.message, "a logged deploy failed in the replay: as it did when it ran, or because this server's limits are lower than then (restart with those)");
                }
            }
        }
        Ok(())
    }

    /// Takes the command's position and locks (nothing else runs: at once).
    async fn lock(&self, locks: LockSet) -> Result<Position, String> {
        let grant = self
            .scheduler
            .acquire(locks)
            .await
            .map_err(|refused| format!("replay refused: {refused:?}"))?;
        Ok(grant.position())
    }
}
